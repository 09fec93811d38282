"""residual_add, forward and backward, beside the reference's eager ops and torch.compile of them.

A block's last add under autocast: the fp32 residual s [R, D] plus the bf16 fc2 output and its bias, rows
R = 256 x 50 (D = 768, 1024) and 256 x 197 (D = 512). Reference: s + (m + bias). bytes: s, m and out
(forward); dout and the branch's gradient (backward).

    python bench/bench_residual_add.py [--json bench/results/residual_add_h200.json]
    python bench/bench_residual_add.py --small
"""
import _harness
import torch

from mae_fast import ops

CASES = [(256 * 50, 768), (256 * 50, 1024), (256 * 197, 512)]


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("residual_add", args)
    for R, D in ([(64, 72), (50, 40)] if args.small else CASES):
        s, m, bias = b.randn(R, D, grad=True, dtype=torch.float32), b.randn(R, D, grad=True), \
            b.randn(D, grad=True, dtype=torch.float32)
        es = m.element_size()
        b.forward_backward("residual_add", f"R={R} D={D}",
                           b.impls(ops.residual_add, lambda s, m, bias: s + (m + bias)),
                           [s, m, bias], [0, 1, 2], R * D * (4 + es + 4), R * D * (4 + es))
    return b.finish()


if __name__ == "__main__":
    main()
