"""bias_gelu, forward and backward, beside the reference's eager ops and torch.compile of them.

The MLP's fc1 output h [R, 4D] (bf16) plus its bias, through exact GELU: rows R = 256 x 50 (encoder, 4D =
3072 and 4096) and 256 x 197 (decoder, 4D = 2048). Reference: F.gelu(h + bias) (the bias added by the
GEMM's epilogue in the reference, here by the op). bytes: h and a (forward); da, h and dh (backward).

    python bench/bench_bias_gelu.py [--json bench/results/bias_gelu_h200.json]
    python bench/bench_bias_gelu.py --small
"""
import _harness
import torch.nn.functional as F

from mae_fast import ops

CASES = [(256 * 50, 3072), (256 * 50, 4096), (256 * 197, 2048)]


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("bias_gelu", args)
    for R, Fd in ([(64, 288), (50, 160)] if args.small else CASES):
        h, bias = b.randn(R, Fd, grad=True), b.randn(Fd, grad=True)
        es = h.element_size()
        b.forward_backward("bias_gelu", f"R={R} F={Fd}", b.impls(ops.bias_gelu, lambda h, b: F.gelu(h + b)),
                           [h, bias], [0, 1], 2 * R * Fd * es, 3 * R * Fd * es)
    return b.finish()


if __name__ == "__main__":
    main()
