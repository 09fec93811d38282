"""Benchmark of the fused normalized-pixel loss (forward + backward) against the reference.

Compares, on the same inputs (random 75% masking):
  mae_fast full      norm_pix_loss(pred [N, L, D], imgs, mask)
  mae_fast masked    norm_pix_loss(pred [N, M, D], imgs, None, ids_masked=ids)  (decoder head on removed tokens)
  reference eager    mae_fast.reference.patch_loss (the official forward_loss)
  reference compile  torch.compile of the same function
Each row times loss + torch.autograd.grad(loss, pred) (no .grad accumulation), as called from Python
(host overhead included: at N=256 the custom-op/autograd host time is of the order of the kernels' time)
and, on CUDA, the same step replayed from a CUDA graph (graph_ms: device time only). The copy bandwidth is
measured in the same run (benchutil.copy_bandwidth: bytes read + written per second).

Bytes, per row:
  nominal  imgs read once + pred read once + grad written once (the issue's yardstick; for the masked
           row its pred and grad are [N, M, D]); frac_copy = nominal bytes / time / copy bandwidth
  moved    what the fused kernels really touch (moved = moved_fwd + moved_bwd):
           forward   the counted patches of imgs and of pred are read, the gradient (for grad_output 1)
                     is written in full, the fp32 mask is read twice (the den pre-pass and the main
                     kernel; the masked row reads ids_masked instead and needs no pre-pass)
           backward  nothing at grad_output == 1 (each program reads two scalars and returns); fp16
                     pred: the buffer is read and written once (unscaled in place)
           Skipping uncounted patches is why frac_copy can pass 1.
           N=256, 224x224, p=16, bf16, ratio 0.75: full 193.1 MB fwd + 0 bwd (nominal 231.2 MB; the
           design that saved the diff moved 308.7 MB); masked 173.7 MB fwd + 0 bwd (nominal 173.4 MB).

GPU:  python bench/bench_loss.py --json bench/results/loss_h200.json      (N=256, 224x224, p=16, bf16)
CPU:  python bench/bench_loss.py --small
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from mae_fast import benchutil, reference
from mae_fast.ops.loss import norm_pix_loss


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small sizes (CPU check): N=4, 64x64, fp32")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="image height and width")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--chans", type=int, default=3)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 (fp32 with --small)")
    ap.add_argument("--img-dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: --dtype")
    ap.add_argument("--ratio", type=float, default=0.75, help="mask ratio")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--json", default=None, help="write results with provenance to this path")
    args = ap.parse_args(argv)
    if args.small:
        args.n, args.size = min(args.n, 4), min(args.size, 64)
        args.dtype = args.dtype or "fp32"
        args.rep_ms = min(args.rep_ms, 100.0)
    args.dtype = args.dtype or "bf16"
    return args


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]
    img_dtype = DTYPES[args.img_dtype or args.dtype]
    n, c, s, p = args.n, args.chans, args.size, args.patch
    L, d = (s // p) ** 2, p * p * c
    imgs = torch.randn(n, c, s, s, generator=g).to(device=device, dtype=img_dtype)  # [N, C, H, W]
    pred = torch.randn(n, L, d, generator=g).to(device=device, dtype=dtype)  # [N, L, D]
    noise = torch.rand(n, L, generator=g).to(device)  # [N, L]
    k = reference.num_kept(L, args.ratio)
    ids_shuffle = noise.argsort(dim=1)  # [N, L]
    mask = torch.ones(n, L, device=device)
    mask.scatter_(1, ids_shuffle[:, :k], 0.0)  # 1 = removed (counted)
    ids_masked = ids_shuffle[:, k:].contiguous()  # [N, M]
    pred_m = pred.gather(1, ids_masked[:, :, None].expand(-1, -1, d)).contiguous()  # [N, M, D]
    return imgs, pred.requires_grad_(True), mask, ids_masked, pred_m.requires_grad_(True)


def moved_bytes(impl, img_bytes, pred_bytes, mask_bytes, ids_bytes, counted, masked_fraction, dtype):
    """(forward, backward) bytes the fused kernels touch for one loss + grad at grad_output 1 (see above).

    ``pred_bytes``: the row's pred (= grad) bytes; ``counted``: fraction of patches with mask != 0;
    ``masked_fraction``: M / L. NaN for the reference rows (not modelled).
    """
    bwd = 2 * pred_bytes if dtype == torch.float16 else 0.0  # fp16: the prescaled buffer is unscaled in place
    if impl == "mae_fast full":
        return counted * (img_bytes + pred_bytes) + pred_bytes + 2 * mask_bytes, bwd
    if impl == "mae_fast masked":
        return img_bytes * masked_fraction + 2 * pred_bytes + ids_bytes, bwd
    return float("nan"), float("nan")


def graphed(run, device):
    """``run`` captured in a CUDA graph (after a warm-up on a side stream): its replay, device time only."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = args.patch
    imgs, pred, mask, ids, pred_m = make_inputs(args, device)
    n, L, d = pred.shape
    M = ids.shape[1]
    esize = pred.element_size()
    counted = float((mask != 0).float().mean())

    def step(fn, x):
        def run():
            loss = fn()
            (g,) = torch.autograd.grad(loss, x)
            return loss, g
        return run

    ref_compiled = torch.compile(reference.patch_loss)
    cases = [
        ("mae_fast full", step(lambda: norm_pix_loss(pred, imgs, mask, p), pred), pred),
        ("mae_fast masked", step(lambda: norm_pix_loss(pred_m, imgs, None, p, ids_masked=ids), pred_m), pred_m),
        ("reference eager", step(lambda: reference.patch_loss(imgs, pred, mask, p, norm_pix_loss=True), pred), pred),
    ]
    if not args.no_compile:
        cases.append(("reference compile",
                      step(lambda: ref_compiled(imgs, pred, mask, p, norm_pix_loss=True), pred), pred))

    img_bytes = imgs.numel() * imgs.element_size()
    mask_bytes = mask.numel() * 4
    bw = benchutil.copy_bandwidth(device)

    # correctness first: every row's loss and gradient against the reference in fp32
    x32 = pred.detach().float().requires_grad_(True)
    ref_loss = reference.patch_loss(imgs.float(), x32, mask, p, norm_pix_loss=True)
    (ref_grad,) = torch.autograd.grad(ref_loss, x32)
    ref_loss = ref_loss.detach()
    rows = []
    for name, run, x in cases:
        loss, g = run()
        loss = loss.detach()
        if name == "mae_fast masked":
            g_full = torch.zeros_like(pred)
            g_full.scatter_(1, ids[:, :, None].expand(-1, -1, d), g)
            g = g_full
        t = benchutil.time_fn(run, rep_ms=args.rep_ms, device=device)
        xb = x.numel() * esize
        nominal = img_bytes * (M / L if x is pred_m else 1.0) + 2 * xb
        moved_fwd, moved_bwd = moved_bytes(name, img_bytes, xb, mask_bytes, ids.numel() * ids.element_size(),
                                           counted, M / L, pred.dtype)
        moved = moved_fwd + moved_bwd
        sec = t["median_ms"] * 1e-3
        extra = {}
        if device.type == "cuda" and not args.no_graph:
            # the same step replayed from a CUDA graph: no host overhead, device time only
            try:
                tg = benchutil.time_fn(graphed(run, device), rep_ms=args.rep_ms, device=device)
                extra = {"graph_ms": tg["median_ms"], "frac_copy_graph": nominal / (tg["median_ms"] * 1e-3) / bw,
                         "frac_copy_moved_graph": moved / (tg["median_ms"] * 1e-3) / bw}
            except Exception as e:  # report, do not abort the other rows
                extra = {"graph_error": f"{type(e).__name__}: {e}"[:300]}
        rows.append({
            "impl": name,
            "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
            "nominal_MB": nominal / 1e6, "frac_copy": nominal / sec / bw,
            "moved_MB": moved / 1e6, "moved_fwd_MB": moved_fwd / 1e6, "moved_bwd_MB": moved_bwd / 1e6,
            "frac_copy_moved": moved / sec / bw,
            "loss": float(loss), "loss_rel_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
            "grad_rel_err": float((g.float() - ref_grad).norm() / ref_grad.norm()),
            **extra,
        })
    base = {r["impl"]: r["median_ms"] for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = base["reference eager"] / r["median_ms"]
        if "reference compile" in base:
            r["speedup_vs_compile"] = base["reference compile"] / r["median_ms"]

    config = {"N": n, "C": args.chans, "H": args.size, "W": args.size, "patch": p, "L": L, "M": M, "D": d,
              "dtype": args.dtype, "img_dtype": args.img_dtype or args.dtype, "mask_ratio": args.ratio,
              "counted_fraction": counted, "copy_bandwidth_GBps": bw / 1e9}
    if args.json:
        benchutil.write_json(args.json, {"benchmark": "norm_pix_loss forward+backward",
                                         "provenance": benchutil.provenance(sys.argv, device),
                                         "config": config, "rows": rows})
        print(f"wrote {os.path.abspath(args.json)}")
    print(f"device: {benchutil.device_name(device)}; copy bandwidth {bw / 1e9:.1f} GB/s; config {config}")
    cols = ["impl", "median_ms", "p20_ms", "p80_ms", "nominal_MB", "frac_copy", "moved_MB", "frac_copy_moved",
            "speedup_vs_eager"] + (["speedup_vs_compile"] if "reference compile" in base else []) + ["loss_rel_err", "grad_rel_err"]
    if any("graph_ms" in r for r in rows):
        cols[cols.index("speedup_vs_eager"):cols.index("speedup_vs_eager")] = ["graph_ms", "frac_copy_graph",
                                                                                 "frac_copy_moved_graph"]
    print(benchutil.format_table(rows, cols))


if __name__ == "__main__":
    main()
