"""Benchmark of the token kernels (gather_tokens, gather_patches, unshuffle_tokens), forward and backward.

For each D (default 1024 and 512) at N=256, L=196 (224x224, p=16), K=49 (75% masking), bf16:
  gather_tokens     x [N,L,D] + pos_embed (fixed) at ids_keep, cls prefix -> [N,1+K,D]
                    reference: x + pos_embed; gather with the index repeated D times; cat the cls row
  unshuffle_tokens  x [N,1+K,D], ids_restore, mask_token -> + decoder pos_embed (fixed) -> [N,1+L,D]
                    reference: mask_token.repeat; cat; gather with the repeated index; cat cls; + pos_embed
  gather_patches    imgs [N,3,224,224] -> visible raw patches [N,K,768] (imgs needs grad for the bwd row)
                    reference copy: reshape/permute of imgs + gather with the repeated index
  patch_embed       visible-only embedding F.linear(gather_patches(imgs), W, b) vs the reference Conv2d on
                    all patches then the gather (both include the GEMM; imgs needs no grad, W and b do)
Implementations: mae_fast, reference eager, torch.compile(reference). Forward rows time the call with
autograd recording (as in training); backward rows time torch.autograd.grad of a retained graph
(torch._functorch.config.donated_buffer is turned off for that). On CUDA every call is timed twice:
median_ms is the device time (the call captured in a CUDA graph and replayed: these copies take tens of
microseconds, less than the Python dispatch of an op, so plain calls would time the host), and eager_ms
the plain calls (what an uncaptured training loop sees). GB/s, frac_copy and speedup_vs_eager use
median_ms; eager_speedup_vs_eager uses eager_ms.

bytes: what each op must read and write once (rows of x/grad/out that are touched, the position table
once, the ids); GB/s = bytes / median time; frac_copy = GB/s / copy bandwidth measured in the same run
(benchutil.copy_bandwidth, read + write). patch_embed rows carry no bytes (GEMM-bound): compare times.

GPU:  python bench/bench_tokens.py --json bench/results/tokens_h200.json
CPU:  python bench/bench_tokens.py --small
"""
import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from mae_fast import benchutil
from mae_fast.ops.tokens import gather_patches, gather_tokens, unshuffle_tokens

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small sizes (CPU check): N=4, D=64 and 40, fp32")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="image height and width")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 (fp32 with --small)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-graphs", action="store_true",
                    help="time plain calls only (default on CUDA: also CUDA-graph replay, the device time)")
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--json", default=None, help="write results with provenance to this path")
    args = ap.parse_args(argv)
    if args.small:
        args.n, args.size, args.patch = min(args.n, 4), min(args.size, 64), min(args.patch, 8)
        args.dims = [64, 40]
        args.dtype = args.dtype or "fp32"
        args.rep_ms = min(args.rep_ms, 50.0)
    args.dtype = args.dtype or "bf16"
    return args


# ------------------------------------------------------------------ the reference's eager ops
def ref_gather_tokens(x, ids_keep, pos_embed, prefix):
    D = x.shape[-1]
    x = x + pos_embed  # [N, L, D]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    return torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1+K, D]


def ref_unshuffle(x, ids_restore, mask_token, pos_embed):
    N, T, D = x.shape
    mask_tokens = mask_token.repeat(N, ids_restore.shape[1] + 1 - T, 1)  # [N, L-K, D]
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, D]
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))  # [N, L, D]
    x = torch.cat([x[:, :1], x_], dim=1)  # [N, 1+L, D]
    return x + pos_embed


def ref_gather_patches(imgs, ids_keep, p):
    N, C, H, W = imgs.shape
    x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)  # [N, L, E]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, C * p * p))  # [N, K, E]


def ref_patch_embed(imgs, ids_keep, weight, bias, p):
    x = F.conv2d(imgs, weight, bias, stride=p)  # [N, D, h, w]
    x = x.flatten(2).transpose(1, 2)  # [N, L, D]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))  # [N, K, D]


def fast_patch_embed(imgs, ids_keep, weight, bias, p):
    return F.linear(gather_patches(imgs, ids_keep, p), weight.flatten(1), bias)  # [N, K, D]


# ------------------------------------------------------------------ timing
def _graph_time(call, stream, rep_ms, device):
    """Device time of call(): captured once in a CUDA graph (on `stream`, where its inputs were made), replayed."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        call()
    return benchutil.time_fn(graph.replay, rep_ms=rep_ms, device=device)


def time_fwd_bwd(fn, inputs, grad_wrt, rep_ms, device, graphs):
    """-> {"fwd": (device timing, eager timing), "bwd": (...)}: fn(*inputs) with autograd recording, and
    torch.autograd.grad of a retained graph. Eager timing: plain calls (host overhead included when the
    host is slower than the device); device timing: CUDA-graph replay (None without graphs)."""
    stream = torch.cuda.Stream() if graphs else None
    with torch.cuda.stream(stream) if graphs else contextlib.nullcontext():
        out = fn(*inputs)
        g = torch.randn_like(out)
        calls = {"fwd": lambda: fn(*inputs),
                 "bwd": lambda: torch.autograd.grad(out, grad_wrt, g, retain_graph=True)}
        res = {}
        for name, call in calls.items():
            eager = benchutil.time_fn(call, rep_ms=rep_ms, device=device)
            res[name] = (_graph_time(call, stream, rep_ms, device) if graphs else None, eager)
    return res


def run(args):
    # timing a retained backward graph repeatedly needs compiled backwards that do not donate their
    # saved buffers (a memory optimisation; it does not change the kernels timed)
    torch._functorch.config.donated_buffer = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graphs = device.type == "cuda" and not args.no_graphs
    dtype = DTYPES[args.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    N, p, C = args.n, args.patch, 3
    h = args.size // p
    L = h * h
    K = int(L * (1 - args.ratio))
    E = C * p * p
    gen = torch.Generator().manual_seed(0)
    ids_shuffle = torch.rand(N, L, generator=gen).argsort(1)  # [N, L]
    ids_restore = ids_shuffle.argsort(1).to(device)  # [N, L]
    ids_keep = ids_shuffle[:, :K].contiguous().to(device)  # [N, K]
    ib = ids_keep.element_size()
    copy_bw = benchutil.copy_bandwidth(device)
    rows = []

    def add(op, D, direction, impl, tg, te, nbytes):
        t = tg or te  # device time where CUDA graphs are used, else the eager time
        row = {"op": op, "D": D, "dir": direction, "impl": impl, "median_ms": t["median_ms"],
               "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"], "eager_ms": te["median_ms"],
               "eager_p20_ms": te["p20_ms"], "eager_p80_ms": te["p80_ms"], "bytes": nbytes}
        if nbytes:
            row["GB/s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
            row["frac_copy"] = nbytes / (t["median_ms"] * 1e-3) / copy_bw
        rows.append(row)

    def bench(op, D, impls, inputs, grad_idx, fwd_bytes, bwd_bytes):
        grad_wrt = [inputs[i] for i in grad_idx]
        for impl, fn in impls:
            res = time_fwd_bwd(fn, inputs, grad_wrt, args.rep_ms, device, graphs)
            add(op, D, "fwd", impl, *res["fwd"], fwd_bytes)
            add(op, D, "bwd", impl, *res["bwd"], bwd_bytes)
            print(f"  {op:16s} D={D:<5d} {impl:18s} " + "  ".join(
                f"{k} {rows[-2 + i]['median_ms']:.4f} ms (eager {rows[-2 + i]['eager_ms']:.4f})"
                for i, k in enumerate(("fwd", "bwd"))), file=sys.stderr)

    def impls(fast, ref):
        out = [("mae_fast", fast), ("reference eager", ref)]
        if not args.no_compile:
            out.append(("reference compile", torch.compile(ref)))
        return out

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    for D in args.dims:
        # gather_tokens: x and the cls prefix need grad, pos_embed is fixed (as in MAE)
        x, pos, pre = rand(N, L, D, grad=True), rand(1, L, D), rand(1, 1, D, grad=True)
        fb = (N * K * D + L * D + N * (1 + K) * D) * es + N * K * ib  # read kept rows, pos, write out
        bb = (N * (1 + K) * D + N * L * D + D) * es + N * K * ib  # read grad, write grad_x (+zeros), prefix
        bench("gather_tokens", D, impls(lambda a, b, c, d: gather_tokens(a, b, c, d), ref_gather_tokens),
              [x, ids_keep, pos, pre], [0, 3], fb, bb)
        del x, pos, pre

        # unshuffle_tokens: x and mask_token need grad, the decoder pos_embed is fixed
        x, mt, dpos = rand(N, 1 + K, D, grad=True), rand(1, 1, D, grad=True), rand(1, 1 + L, D)
        fb = (N * (1 + K) * D + (1 + L) * D + N * (1 + L) * D) * es + N * L * ib
        bb = (N * (1 + L) * D + N * (1 + K) * D + D) * es + N * L * ib
        bench("unshuffle_tokens", D, impls(lambda a, b, c, d: unshuffle_tokens(a, b, c, d), ref_unshuffle),
              [x, ids_restore, mt, dpos], [0, 2], fb, bb)
        del x, mt, dpos

        # gather_patches alone (a pure copy; imgs needs grad here so the backward kernel is timed)
        imgs = rand(N, C, args.size, args.size, grad=True)
        fb = 2 * N * K * E * es + N * K * ib
        bb = (N * K * E + N * C * args.size * args.size) * es + N * K * ib
        bench("gather_patches", D,
              impls(lambda a, b: gather_patches(a, b, p), lambda a, b: ref_gather_patches(a, b, p)),
              [imgs, ids_keep], [0], fb, bb)

        # visible-only patch embedding (GEMM included): imgs needs no grad, W and b do
        imgs = imgs.detach()
        weight = rand(D, C, p, p, grad=True)
        bias = rand(D, grad=True)
        bench("patch_embed", D,
              impls(lambda a, b, c, d: fast_patch_embed(a, b, c, d, p),
                    lambda a, b, c, d: ref_patch_embed(a, b, c, d, p)),
              [imgs, ids_keep, weight, bias], [2, 3], 0, 0)
        del imgs, weight, bias

    for r in rows:  # speedup against the reference's eager ops, same op/D/direction
        base = next(b for b in rows if (b["op"], b["D"], b["dir"], b["impl"]) == (r["op"], r["D"], r["dir"],
                                                                                  "reference eager"))
        r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
        r["eager_speedup_vs_eager"] = base["eager_ms"] / r["eager_ms"]
    config = {"N": N, "L": L, "K": K, "image": args.size, "patch": p, "dims": args.dims, "dtype": args.dtype,
              "ids_dtype": str(ids_keep.dtype).replace("torch.", ""), "copy_bandwidth_GBps": copy_bw / 1e9,
              "timing": "cuda graph replay (device time); eager_ms: plain calls" if graphs else "plain calls"}
    return config, rows


def main(argv=None):
    args = parse_args(argv)
    config, rows = run(args)
    if args.json:
        benchutil.write_json(args.json, {"provenance": benchutil.provenance(argv), "config": config, "rows": rows})
    print(f"copy bandwidth {config['copy_bandwidth_GBps']:.1f} GB/s (read + write); N={config['N']} "
          f"L={config['L']} K={config['K']} {config['dtype']}")
    print(f"timing: {config['timing']}")
    print(benchutil.format_table(rows, ["op", "D", "dir", "impl", "median_ms", "eager_ms", "GB/s", "frac_copy",
                                        "speedup_vs_eager", "eager_speedup_vs_eager"]))


if __name__ == "__main__":
    main()
