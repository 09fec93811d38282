"""linear under bf16 autocast, forward and backward, beside F.linear (torch's autocast) and torch.compile of it.

The GEMMs of a ViT-B block at batch 256 (x [12800, 768] by fc1 [3072, 768], fc2 [768, 3072]): mae_fast's
linear takes the weight gradient straight out of its GEMM in fp32 and casts nothing else, where autocast
rounds it to bf16 and casts it back. The times are GEMM-bound: compare them, bytes are not counted.

    python bench/bench_linear.py [--json bench/results/linear_h200.json]
    python bench/bench_linear.py --small
"""
import _harness
import torch
import torch.nn.functional as F

from mae_fast import ops

CASES = [(256 * 50, 768, 3072), (256 * 50, 3072, 768), (256 * 197, 512, 2048)]


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("linear", args)
    b.graphs = False  # autocast inside the timed call
    for R, K, M in ([(64, 72, 288), (64, 288, 72)] if args.small else CASES):
        x = b.randn(R, K, grad=True, dtype=torch.float32)
        w, bias = b.randn(M, K, grad=True, dtype=torch.float32), b.randn(M, grad=True, dtype=torch.float32)

        def under_autocast(fn):
            def run(*a):
                with torch.autocast(b.device.type, dtype=b.dtype, enabled=b.dtype != torch.float32):
                    return fn(*a)
            return run

        impls = [(name, under_autocast(fn)) for name, fn in b.impls(ops.linear, F.linear)]
        b.forward_backward("linear", f"R={R} K={K} M={M}", impls, [x, w, bias], [0, 1, 2], 0, 0)
    return b.finish()


if __name__ == "__main__":
    main()
