"""Benchmark of the masking engine (mae_fast.ops.random_masking) against the reference double argsort.

Cases (N, L, mask_ratio, frames): (256, 196, 0.75, 1) and (32, 1568, 0.9, 8) from the issue, plus
(1024, 196, 0.75, 1) and (32, 1568, 0.9, 1) on the GPU.
Implementations (all produce ids_keep, ids_restore, mask; masking has no backward: indices only):
  reference       the official random_masking without the x gather: torch.rand [N, L] + argsort +
                  argsort + ids_shuffle[:, :K] + the mask gather (over all L tokens, as the image MAE does)
  reference_tube  tube cases only: the same on the spatial noise [N, L/T], then repeated over the T frames
  compiled        torch.compile(reference) (GPU, or CPU with --compile)
  mae_fast        random_masking(N, L, ratio, frames=T) (Philox keys, one kernel launch on CUDA)
  mae_fast_noise  random_masking(..., noise=noise) (parity mode; noise drawn outside the timing)
bytes: the outputs written once (ids_keep 8*N*K, ids_restore 8*N*L, mask 4*N*L; + the noise read in
noise mode); GB/s = bytes / median; frac_copy = GB/s / copy bandwidth measured in the same run
(benchutil.copy_bandwidth, read + write). kernels: CUDA kernel launches per call (torch.profiler).
speedup: reference median / this median.

GPU:  python bench/bench_masking.py --json bench/results/masking_h200.json
CPU:  python bench/bench_masking.py --small   (the issue's two CPU sizes, shorter timing)
"""
import argparse
import sys

import torch

from mae_fast import benchutil
from mae_fast.ops.masking import random_masking

CPU_CASES = [(256, 196, 0.75, 1), (32, 1568, 0.9, 8)]
GPU_CASES = [(256, 196, 0.75, 1), (32, 1568, 0.9, 8), (1024, 196, 0.75, 1), (32, 1568, 0.9, 1)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU check: the issue's CPU sizes, short timing")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference) on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on GPU")
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--json", default=None, help="write results with provenance to this path")
    args = ap.parse_args(argv)
    if args.small:
        args.rep_ms = min(args.rep_ms, 100.0)
    return args


def reference_masking(N, L, ratio, device):
    """The reference's ops (mae_fast.reference.random_masking) without the gather of x."""
    K = int(L * (1 - ratio))
    noise = torch.rand(N, L, device=device)  # [N, L]
    ids_shuffle = torch.argsort(noise, dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    ids_keep = ids_shuffle[:, :K]  # [N, K]
    mask = torch.ones(N, L, device=device)  # [N, L]
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [N, L]
    return ids_keep, ids_restore, mask


def reference_tube(N, L, ratio, frames, device):
    """Tube masking the plain way: the reference on spatial noise, repeated over the frames."""
    Ls = L // frames
    ids_keep, ids_restore, mask = reference_masking(N, Ls, ratio, device)
    t = torch.arange(frames, device=device).view(1, frames, 1)  # [1, T, 1]
    keep = (t * Ls + ids_keep[:, None, :]).reshape(N, -1)  # [N, K]
    mask = mask.repeat(1, frames)  # [N, L]
    return keep, ids_restore, mask


def count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cases = GPU_CASES if cuda else CPU_CASES
    copy_bw = benchutil.copy_bandwidth(device)
    do_compile = (cuda and not args.no_compile) or (not cuda and args.compile)
    compiled_ref = torch.compile(reference_masking, dynamic=False) if do_compile else None
    rows = []
    for N, L, ratio, frames in cases:
        Ls = L // frames
        K = frames * int(Ls * (1 - ratio))
        out_bytes = 8 * N * K + 8 * N * L + 4 * N * L
        noise = torch.rand(N, Ls, device=device)  # [N, L / T]
        impls = [("reference", lambda: reference_masking(N, L, ratio, device), out_bytes)]
        if frames > 1:
            impls.append(("reference_tube", lambda: reference_tube(N, L, ratio, frames, device), out_bytes))
        if compiled_ref is not None:
            impls.append(("compiled", lambda: compiled_ref(N, L, ratio, device), out_bytes))
        impls.append(("mae_fast", lambda: random_masking(N, L, ratio, device=device, frames=frames), out_bytes))
        impls.append(("mae_fast_noise", lambda: random_masking(N, L, ratio, frames=frames, noise=noise),
                      out_bytes + noise.numel() * noise.element_size()))
        ref_ms = None
        for name, fn, nbytes in impls:
            t = benchutil.time_fn(fn, rep_ms=args.rep_ms, device=device)
            if name == "reference":
                ref_ms = t["median_ms"]
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
            row = dict(N=N, L=L, ratio=ratio, frames=frames, K=K, impl=name, **t, bytes=nbytes, GBs=gbs,
                       frac_copy=gbs * 1e9 / copy_bw, speedup=ref_ms / t["median_ms"])
            if cuda:
                row["kernels"] = count_kernels(fn)
            rows.append(row)
    payload = {
        "benchmark": "masking",
        "provenance": benchutil.provenance(sys.argv if argv is None else ["bench/bench_masking.py", *argv], device),
        "copy_bandwidth_GBs": copy_bw / 1e9,
        "cpu_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        benchutil.write_json(args.json, payload)
    cols = ["N", "L", "frames", "K", "impl", "median_ms", "p20_ms", "p80_ms", "GBs", "frac_copy", "speedup"]
    if cuda:
        cols.append("kernels")
    print(f"device: {payload['provenance']['device']}; copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
          f"threads {torch.get_num_threads()}")
    print(benchutil.format_table(rows, cols))
    return payload


if __name__ == "__main__":
    main()
