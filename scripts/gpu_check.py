"""The first call on a GPU machine, stage by stage (`scripts/gpu_check.sh` runs it after the build):

  smoke      every op forward and backward on the GPU against its own plain torch path, at one real shape;
             the masking engine's masks on the GPU against the CPU's for the same seed
  bench      `mae-fast bench` for ViT-B/16 (all five variants) and ViT-L/16 (reference, reference+compile,
             mae_fast, mae_fast+graph), batch 256, bf16, few steps; the fused-or-stock choices the fast model
             measured on the way
  attention  every attention backend ("auto"'s measurement, mae_fast's kernels among them) at MAE's shapes
  trainstep  TrainStep's GPU tests: replays equal eager steps, new masks at every replay, memory and torch's
             kernel side table flat over 100 replays, no host sync
  pretrain   `mae-fast pretrain --sample --steps 30` on CUDA, with its pinned loader and the GPU data path
  table      one table last: each measured figure beside the roofline's prediction for it
             (bench/results/roofline_predictions.json)

Each stage is timed and printed, with a deadline for the whole call (--budget seconds): a stage that would
run past it is cut short and the table says so. At most 8 files go to --out, named after the device.
``--dry-run`` runs every stage on a machine without a GPU, at tiny sizes (the ops through Triton's
interpreter, the commands on the CPU), writes the same files and prints the same table, so the script
cannot rot where no GPU is lent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICTIONS = os.path.join(ROOT, "bench", "results", "roofline_predictions.json")
MODELS = {"vit_b16": "mae_vit_base_patch16", "vit_l16": "mae_vit_large_patch16"}
VARIANTS = {"vit_b16": "reference,reference+compile,mae_fast,mae_fast+compile,mae_fast+graph",
            "vit_l16": "reference,reference+compile,mae_fast,mae_fast+graph"}


class Run:
    """Where files go, the deadline, and what each stage reported."""

    def __init__(self, out: str, budget: float, dry: bool):
        self.out, self.dry, self.t0, self.budget = out, dry, time.monotonic(), budget
        self.stages: list = []  # (name, seconds, status)
        self.device = "cpu (dry run)" if dry else _device_name()
        self.slug = "dryrun_cpu" if dry else re.sub(r"[^a-z0-9]+", "_", self.device.lower()).strip("_")
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def path(self, name: str) -> str:
        return os.path.join(self.out, f"{self.slug}_{name}")

    def stage(self, name: str, fn, cap: float):
        """Run stage ``fn(timeout)`` with at most ``cap`` seconds (less if the budget is shorter)."""
        limit = min(cap, self.left() - 20)
        print(f"\n======== {name} (at most {max(limit, 0):.0f} s)", flush=True)
        t0 = time.monotonic()
        if limit < 10:
            status = "not run: the budget is spent"
        else:
            try:
                status = fn(limit)
            except Exception as e:  # noqa: BLE001 - one stage failing must not hide the others
                traceback.print_exc()
                status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        took = time.monotonic() - t0
        self.stages.append((name, took, status))
        print(f"======== {name}: {status} ({took:.0f} s)", flush=True)
        return status


class _Tee:
    """Writes to the console and to a file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def _env(run: Run) -> dict:
    """Child processes: unbuffered, the ops' interpreter on the dry run's CPU smoke only (set per stage)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if run.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _command(cmd: list, timeout: float, env: dict) -> tuple:
    """(returncode or 'timeout', the output's last lines) of ``cmd``, killed after ``timeout`` seconds; its
    output is printed when it ends (what it wrote so far, if it was killed)."""
    print("$", " ".join(cmd), flush=True)
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=timeout)
        rc, out = res.returncode, res.stdout
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        rc, out = "timeout", out + f"\n(killed after {timeout:.0f} s)\n"
    print(out, end="" if out.endswith("\n") else "\n", flush=True)
    return rc, "\n".join(out.splitlines()[-20:])


# --------------------------------------------------------------------------- smoke: every op on the device
def _child(run: Run, stage: str, timeout: float):
    """This script's ``--{stage}-child`` in its own process (the dry run puts the ops through Triton's
    interpreter there): the rows it wrote to {stage}.json, or None when it failed."""
    env = _env(run)
    if run.dry:
        env["TRITON_INTERPRET"] = "1"
    rc, _ = _command([sys.executable, os.path.abspath(__file__), f"--{stage}-child", run.path(f"{stage}.json")]
                     + (["--dry-run"] if run.dry else []), timeout, env)
    return json.load(open(run.path(f"{stage}.json")))["rows"] if rc == 0 else None


def smoke(run: Run, timeout: float) -> str:
    rows = _child(run, "smoke", timeout)
    if rows is None:
        return "FAILED (the smoke process failed)"
    bad = [r["check"] for r in rows if not r["ok"]]
    return f"{len(rows) - len(bad)}/{len(rows)} checks ok" + (f"; failed: {', '.join(bad)}" if bad else "")


def smoke_child(path: str, dry: bool) -> None:
    """In its own process (the dry run sets TRITON_INTERPRET=1 for it): each op's forward and backward on the
    fast path against the same op on the plain torch path, the relative error (norm-wise) of the output
    and of every gradient."""
    import torch

    from mae_fast import ops
    from mae_fast.testing import rel_err

    dev = "cpu" if dry else "cuda"
    dt = torch.float32 if dry else torch.bfloat16
    tol = 1e-4 if dt == torch.float32 else 2e-2
    B, N, C, H, L, K, p = (2, 9, 64, 2, 16, 4, 8) if dry else (256, 50, 768, 12, 196, 49, 16)
    Nd, Cd, Hd = (11, 32, 2) if dry else (197, 512, 16)
    img = 32 if dry else 224
    gen = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, dtype=dt, scale=1.0):
        return (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * scale).to(dtype)

    def ids(n, length, k):
        return torch.rand(n, length, generator=gen, device=dev).argsort(1)[:, :k].contiguous()

    ids_keep = ids(B, L, K)
    restore = torch.rand(B, L, generator=gen, device=dev).argsort(1).argsort(1)
    imgs = r(B, 3, img, img, dtype=torch.float32)
    cases = {
        "add_layer_norm": (lambda x, br, w, b, bb: ops.add_layer_norm(x, w, b, 1e-6, branch=br, branch_bias=bb,
                                                                      out_dtype=dt),
                           [r(B, N, C, dtype=torch.float32), r(B, N, C), r(C, dtype=torch.float32),
                            r(C, dtype=torch.float32), r(C, dtype=torch.float32)]),
        "residual_add": (ops.residual_add, [r(B, N, C, dtype=torch.float32), r(B, N, C), r(C, dtype=torch.float32)]),
        "bias_gelu": (ops.bias_gelu, [r(B, N, 4 * C), r(4 * C, dtype=torch.float32)]),
        "linear": (ops.linear, [r(B, N, C), r(C, C), r(C)]),
        "mlp": (lambda x, w1, b1, w2: ops.mlp(x, w1, b1, w2),
                [r(B, N, C), r(4 * C, C, scale=C ** -0.5), r(4 * C), r(C, 4 * C, scale=(4 * C) ** -0.5)]),
        "self_attention (mae_fast)": (lambda x, w, b: ops.self_attention(x, w, b, H, backend="mae_fast"),
                                      [r(B, N, C), r(3 * C, C, scale=C ** -0.5), r(3 * C)]),
        "self_attention (flash)" if not dry else "self_attention (math)":
            (lambda x, w, b: ops.self_attention(x, w, b, H, backend="math" if dry else "flash"),
             [r(B, N, C), r(3 * C, C, scale=C ** -0.5), r(3 * C)]),
        "qkv_attention (decoder)": (lambda qkv: ops.qkv_attention(qkv, Hd), [r(B, Nd, 3 * Cd)]),
        "gather_tokens": (lambda x, pos, pre: ops.gather_tokens(x, ids_keep, pos, pre),
                          [r(B, L, C), r(1, L, C, dtype=torch.float32), r(1, 1, C, dtype=torch.float32)]),
        "gather_patches": (lambda im: ops.gather_patches(im, ids_keep, p), [imgs.to(dt)]),
        "unshuffle_tokens": (lambda y, mt, pos: ops.unshuffle_tokens(y, restore, mt, pos, num_prefix=1,
                                                                     out_dtype=torch.float32),
                             [r(B, 1 + K, C), r(1, 1, C, dtype=torch.float32), r(1, 1 + L, C, dtype=torch.float32)]),
        "norm_pix_loss": (lambda pred: ops.norm_pix_loss(pred, imgs, (restore >= K).float(), p),
                          [r(B, L, 3 * p * p)]),
    }
    rows = []
    for name, (fn, inputs) in cases.items():
        t0 = time.monotonic()
        try:
            results = []
            for op_path in ("auto", "torch"):
                xs = [t.detach().clone().requires_grad_(True) for t in inputs]
                with ops.path(op_path):
                    out = fn(*xs)
                    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
                    g = [torch.randn(o.shape, generator=torch.Generator(device=dev).manual_seed(1), device=dev,
                                     dtype=torch.float32).to(o.dtype) for o in outs]
                    grads = torch.autograd.grad(outs, xs, g, allow_unused=True)
                results.append(([o.detach() for o in outs], grads))
            (fo, fg), (to, tg) = results
            errs = [rel_err(a.float(), b.float()) for a, b in zip(fo, to)]
            errs += [rel_err(a.float(), b.float()) for a, b in zip(fg, tg) if a is not None and b is not None]
            worst = max(errs)
            rows.append({"check": name, "ok": bool(worst <= tol), "worst_rel_err": worst, "tol": tol,
                         "seconds": time.monotonic() - t0})
        except Exception as e:  # noqa: BLE001 - recorded, the other ops still run
            rows.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
                         "seconds": time.monotonic() - t0})
        print(f"  {rows[-1]['check']:28s} {'ok' if rows[-1]['ok'] else 'FAILED'}  "
              f"{rows[-1].get('worst_rel_err', rows[-1].get('error'))}", flush=True)
    # the masking engine: the same seed gives the same masks on the device and on the CPU
    try:
        m_dev = ops.random_masking(B, L, 0.75, generator=torch.Generator(device=dev).manual_seed(5), device=dev)
        m_cpu = ops.random_masking(B, L, 0.75, generator=torch.Generator().manual_seed(5), device="cpu")
        same = torch.equal(m_dev.ids_restore.cpu(), m_cpu.ids_restore)
        rows.append({"check": "random_masking (device = CPU)", "ok": bool(same)})
    except Exception as e:  # noqa: BLE001
        rows.append({"check": "random_masking (device = CPU)", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
    print(f"  {rows[-1]['check']:28s} {'ok' if rows[-1]['ok'] else 'FAILED'}", flush=True)
    json.dump({"device": dev, "dtype": str(dt), "rows": rows}, open(path, "w"), indent=1)


# --------------------------------------------------------------------------- the commands
def trainstep(run: Run, timeout: float) -> str:
    env = _env(run)
    if run.dry:  # the graph path's control flow on fakes (the gpu tests need CUDA)
        tests = ["tests/test_train.py", "-k", "fakes or bad_calls"]
    else:
        tests = ["-m", "gpu", "tests/test_train.py", "-k", "replays_equal or new_masks or memory_flat"]
    rc, tail = _command([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *tests], timeout, env)
    last = [ln for ln in tail.splitlines() if ln.strip()][-1:] or ["no output"]
    return f"{'ok' if rc == 0 else 'FAILED'}: {last[0].strip()}"


def pretrain(run: Run, timeout: float) -> str:
    out = tempfile.mkdtemp(prefix="pretrain_")
    args = ["--sample", "--steps", "30", "--output-dir", out, "--no-progress", "--log-every", "5",
            "--save-every", "0", "--recon-every", "0"]
    if run.dry:
        args = ["--sample", "--steps", "3", "--batch-size", "4", "--img-size", "32", "--device", "cpu",
                "--workers", "1", "--output-dir", out, "--no-progress", "--log-every", "1", "--save-every", "0",
                "--recon-every", "0"]
    rc, tail = _command([sys.executable, "-m", "mae_fast", "pretrain", *args], timeout, _env(run))
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log):
        with open(log) as src, open(run.path("pretrain_log.jsonl"), "w") as dst:
            dst.write(src.read())
    if rc != 0:
        return f"FAILED (rc {rc})"
    lines = [json.loads(ln) for ln in open(log)]
    return f"ok: {lines[-1]['step']} steps, loss {lines[-1]['loss']:.4f}, {lines[-1]['images_per_s']:.0f} img/s"


def bench(run: Run, timeout: float) -> str:
    said = []
    for i, (tag, model) in enumerate(MODELS.items()):
        left = timeout - sum(t for _, t in said)
        share = left if i == len(MODELS) - 1 else left * 0.45
        if run.dry:
            args = ["--model", "mae_vit_tiny_patch8", "--device", "cpu", "--batch-size", "2", "--img-size", "32",
                    "--steps", "2", "--warmup", "1", "--variants", "reference,mae_fast,mae_fast+graph"]
        else:
            args = ["--model", model, "--batch-size", "256", "--dtype", "bf16", "--steps", "10", "--warmup", "3",
                    "--variants", VARIANTS[tag]]
        t0 = time.monotonic()
        rc, tail = _command([sys.executable, "-m", "mae_fast", "bench", *args, "--no-progress", "--json",
                             run.path(f"bench_{tag}.json")], share, _env(run))
        said.append((f"{tag}: {'ok' if rc == 0 else f'FAILED (rc {rc})'}", time.monotonic() - t0))
    return "; ".join(s for s, _ in said)


def attention(run: Run, timeout: float) -> str:
    rows = _child(run, "attention", timeout)
    if rows is None:
        return "FAILED (the attention process failed)"
    return "; ".join(f"{r['shape']}: {r['backend']}" for r in rows)


def attention_child(path: str, dry: bool) -> None:
    """"auto"'s measurement at MAE's shapes (forward + backward, bf16): every backend's time, the choice."""
    import torch

    from mae_fast.nn import attn_backends as A

    dev = "cpu" if dry else "cuda"
    dt = torch.float32 if dry else torch.bfloat16
    shapes = {"ViT-B encoder": (256, 12, 50, 64), "ViT-L encoder": (256, 16, 50, 64),
              "decoder": (256, 16, 197, 32)}
    if dry:
        shapes = {"encoder": (2, 2, 11, 32), "decoder": (2, 2, 17, 32)}
    rows = []
    for name, (B, H, N, hd) in shapes.items():
        qkv = torch.randn(B, N, 3, H, hd, device=dev, dtype=dt)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views of one packed buffer, as in a ViT
        names = ["math", "mae_fast"] if dry else None
        res = A.tune(q, k, v, names=names)
        rows.append({"shape": name, "B_H_N_hd": [B, H, N, hd], **res})
        print(f"  {name}: {res['backend']}  {res['times_ms']}  rejected {res['rejected']}", flush=True)
    json.dump({"device": dev, "dtype": str(dt), "rows": rows}, open(path, "w"), indent=1)


# --------------------------------------------------------------------------- the table
def table(run: Run) -> str:
    """Measured step times beside the roofline's predictions, the fused-or-stock choices, each stage."""
    pred = json.load(open(PREDICTIONS)) if os.path.exists(PREDICTIONS) else {}
    lines = [f"gpu_check on {run.device}" + (" (dry run: tiny sizes on the CPU, so no predictions)" if run.dry else
                                            " (predictions: the roofline model of an H200; an H100 takes about 1.4x "
                                            "longer on memory-bound work)"),
             f"{'model':8s} {'variant':20s} {'measured ms':>12s} {'img/s':>8s} {'predicted ms':>13s} "
             f"{'speedup vs ref':>15s}"]
    choices = {}
    for tag in MODELS:
        path = run.path(f"bench_{tag}.json")
        if not os.path.exists(path):
            lines.append(f"{tag:8s} (no bench result)")
            continue
        doc = json.load(open(path))
        choices.update(doc.get("fused_choices") or {})
        for r in doc["results"]:
            p = None if run.dry else pred.get("models", {}).get(tag, {}).get(r["variant"])
            speed = r.get("speedup_vs_reference")
            lines.append(f"{tag:8s} {r['variant']:20s} {r['step_ms_median']:12.2f} {r['images_per_s']:8.0f} "
                         f"{'-' if p is None else f'{p:.2f}':>13s} {'-' if speed is None else f'{speed:.3f}x':>15s}")
    if choices:
        lines.append("fused ops against stock (measured per shape, forward + backward):")
        for key, c in choices.items():
            t = ", ".join(f"{n} {ms:.3f}" for n, ms in c["times_ms"].items())
            lines.append(f"  {c['path']:6s} {key[:90]} ({t} ms)")
    lines.append("stages:")
    for name, took, status in run.stages:
        lines.append(f"  {name:10s} {took:6.0f} s  {status}")
    lines.append(f"total {time.monotonic() - run.t0:.0f} s of a {run.budget:.0f} s budget")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="where the (at most 8) files go")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all stages together")
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
    ap.add_argument("--smoke-child", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--attention-child", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke_child:
        smoke_child(args.smoke_child, args.dry_run)
        return 0
    if args.attention_child:
        attention_child(args.attention_child, args.dry_run)
        return 0
    run = Run(args.out, args.budget, args.dry_run)
    sys.stdout = _Tee(sys.stdout, open(run.path("log.txt"), "w"))  # the whole call's output, as a file too
    if not args.dry_run and run.device == "no CUDA device":
        print("gpu_check: no CUDA device here; use --dry-run")
        return 2
    # the bench (the step times the call is for) right after the correctness smoke set; the rest after it
    caps = dict(smoke=45, bench=270, attention=30, trainstep=45, pretrain=45)
    if args.dry_run:
        caps = dict(smoke=240, bench=240, attention=120, trainstep=120, pretrain=120)
    for name, fn in (("smoke", smoke), ("bench", bench), ("attention", attention), ("trainstep", trainstep),
                     ("pretrain", pretrain)):
        run.stage(name, lambda limit, fn=fn: fn(run, limit), caps[name])
    text = table(run)
    summary = {"device": run.device, "dry_run": run.dry, "commit": os.environ.get("MAE_FAST_COMMIT"),
               "stages": [{"stage": n, "seconds": t, "status": s} for n, t, s in run.stages], "table": text}
    json.dump(summary, open(run.path("summary.json"), "w"), indent=1)
    print("\n" + text)
    return 0 if all(not s.startswith(("FAILED", "not run")) and "FAILED" not in s for _, _, s in run.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
