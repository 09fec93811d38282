"""random_masking (the masking engine) beside the reference's double argsort and torch.compile of it.

Cases (N, L, mask_ratio, frames): (256, 196, 0.75, 1) and (32, 1568, 0.9, 8) (tube masking), plus on a GPU
(1024, 196, 0.75, 1) and (32, 1568, 0.9, 1). Implementations (all give ids_keep, ids_restore and the mask;
no backward: indices only): "reference eager" (the official random_masking without the gather of x:
torch.rand, two argsorts, the mask gather; tube cases: the same on the spatial noise, repeated over the
frames), "reference compile", "mae_fast" (Philox keys, one kernel launch on CUDA) and "mae_fast noise"
(the same noise as the reference, drawn outside the timing). bytes: the outputs written once (+ the
noise read). kernels: CUDA launches per call (torch.profiler).

    python bench/bench_random_masking.py [--json bench/results/random_masking_h200.json]
    python bench/bench_random_masking.py --small
"""
import _harness
import torch

from mae_fast import ops, reference

CPU_CASES = [(256, 196, 0.75, 1), (32, 1568, 0.9, 8)]
GPU_CASES = CPU_CASES + [(1024, 196, 0.75, 1), (32, 1568, 0.9, 1)]


def reference_masking(N, L, ratio, frames, device):
    """The reference's masking of N samples of L tokens (the gather of x left out)."""
    x = torch.empty(N, L, 0, device=device)  # a zero-width x: the gather moves nothing
    if frames == 1:
        _, mask, ids_restore, ids_keep = reference.random_masking(x, ratio)
        return ids_keep, ids_restore, mask
    _, mask, ids_restore, ids_keep = reference.random_masking(x, ratio, frames=frames)
    return ids_keep, ids_restore, mask


def count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("random_masking", args)
    b.graphs = False  # the engine draws its keys from the device generator: time plain calls
    cuda = b.device.type == "cuda"
    compiled = None if args.no_compile else torch.compile(reference_masking, dynamic=False)
    for N, L, ratio, frames in GPU_CASES if cuda else CPU_CASES:
        K = ops.random_masking(N, L, ratio, frames=frames).ids_keep.shape[1]
        out_bytes = 8 * N * K + 8 * N * L + 4 * N * L
        noise = torch.rand(N, L // frames, device=b.device)  # [N, L / T]
        impls = [(_harness.BASELINE, lambda: reference_masking(N, L, ratio, frames, b.device), out_bytes),
                 ("mae_fast", lambda: ops.random_masking(N, L, ratio, device=b.device, frames=frames), out_bytes),
                 ("mae_fast noise", lambda: ops.random_masking(N, L, ratio, frames=frames, noise=noise),
                  out_bytes + noise.numel() * noise.element_size())]
        if compiled is not None:
            impls.insert(1, ("reference compile", lambda: compiled(N, L, ratio, frames, b.device), out_bytes))
        for name, fn, nbytes in impls:
            extra = {"kernels": count_kernels(fn)} if cuda else {}
            b.add("random_masking", f"N={N} L={L} r={ratio} T={frames}", "fwd", name, b.time(fn), nbytes, **extra)
    return b.finish(["case", "impl", "median_ms", "GB/s", "frac_copy", "speedup_vs_eager"] + (["kernels"] if cuda else []))


if __name__ == "__main__":
    main()
