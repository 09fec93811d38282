"""mlp under autocast, forward and forward + backward, beside ops.linear + ops.bias_gelu + ops.linear, the stock
F.linear / F.gelu / F.linear, and torch.compile of the stock path.

The MLPs of a ViT-B/16 and ViT-L/16 MAE at batch 256: encoder rows 256 x 50 at D = 768 and 1024, decoder rows
256 x 197 at D = 512, hidden 4D, exact GELU. x comes in the GEMM dtype (as the LayerNorm before the MLP
writes it) and the parameters are fp32, under autocast. The times are GEMM-bound: TFLOP/s counts the six
GEMMs' 2 R D H each (two forward, four backward), and bytes are not counted. ``fwd+bwd``: one forward and
its backward to x and every parameter.

    python bench/bench_mlp.py [--json bench/results/mlp_h200.json]
    python bench/bench_mlp.py --small
"""
import _harness
import torch
import torch.nn.functional as F

from mae_fast import ops

CASES = [(256 * 50, 768), (256 * 50, 1024), (256 * 197, 512)]


def linear_bias_gelu(x, w1, b1, w2, b2):
    """The fused block's MLP before ops.mlp: cuBLAS fc1, one bias + GELU pass, cuBLAS fc2."""
    return ops.linear(ops.bias_gelu(ops.linear(x, w1), b1), w2, b2)


def stock(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("mlp", args)
    b.graphs = False  # autocast inside the timed call
    for R, D in ([(64, 72), (50, 80)] if args.small else CASES):
        H = 4 * D
        x = b.randn(R, D, grad=True)  # the GEMM dtype
        w1, b1 = b.randn(H, D, grad=True, dtype=torch.float32), b.randn(H, grad=True, dtype=torch.float32)
        w2, b2 = b.randn(D, H, grad=True, dtype=torch.float32), b.randn(D, grad=True, dtype=torch.float32)
        inputs = [x, w1, b1, w2, b2]

        def under_autocast(fn):
            def run(*a):
                with torch.autocast(b.device.type, dtype=b.dtype, enabled=b.dtype != torch.float32):
                    return fn(*a)
            return run

        impls = [("mae_fast", ops.mlp), ("linear+bias_gelu", linear_bias_gelu), (_harness.BASELINE, stock)]
        if not args.no_compile:
            impls.append(("reference compile", torch.compile(stock)))
        gemm = 2 * R * D * H
        for impl, fn in impls:
            fn = under_autocast(fn)
            g = torch.randn_like(fn(*inputs))
            for direction, call, flops in (
                ("fwd", lambda: fn(*inputs), 2 * gemm),
                ("fwd+bwd", lambda: torch.autograd.grad(fn(*inputs), inputs, g), 6 * gemm),
            ):
                row = b.add("mlp", f"R={R} D={D} H={H}", direction, impl, b.time(call))
                row["TFLOP/s"] = flops / (row["median_ms"] * 1e-3) / 1e12
    return b.finish(["op", "case", "dir", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOP/s", "speedup_vs_eager"])


if __name__ == "__main__":
    main()
