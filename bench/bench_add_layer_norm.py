"""add_layer_norm, forward and backward, beside the reference's eager ops and torch.compile of them.

The autocast layout of a ViT block's second LayerNorm: the fp32 residual x [R, D] plus the bf16 branch (a
GEMM's output) and its bias, normalised, cast to bf16 for the next GEMM; the sum s is the next residual.
Rows R = 256 x 50 (an encoder on 1 + K tokens, D = 768 and 1024) and 256 x 197 (the decoder, D = 512).
Reference: s = x + (branch + bias); y = F.layer_norm(s).to(bf16). bytes: x, branch, s and y once (forward);
dy, s, the residual's gradient, the gradient of s and the branch's (backward).

    python bench/bench_add_layer_norm.py [--json bench/results/add_layer_norm_h200.json]
    python bench/bench_add_layer_norm.py --small
"""
import _harness
import torch
import torch.nn.functional as F

from mae_fast import ops

CASES = [(256 * 50, 768), (256 * 50, 1024), (256 * 197, 512)]


def reference(x, branch, bias, w, b):
    s = x + (branch + bias)
    return F.layer_norm(s, (x.shape[-1],), w, b, 1e-6).to(branch.dtype), s


def fused(x, branch, bias, w, b):
    return ops.add_layer_norm(x, w, b, 1e-6, branch=branch, branch_bias=bias, out_dtype=branch.dtype)


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("add_layer_norm", args)
    cases = [(64, 72), (50, 40)] if args.small else CASES
    for R, D in cases:
        x, br = b.randn(R, D, grad=True, dtype=torch.float32), b.randn(R, D, grad=True)
        bias, w, beta = (b.randn(D, grad=True, dtype=torch.float32) for _ in range(3))
        es = br.element_size()
        fwd = R * D * (4 + es + 4 + es)
        bwd = R * D * (es + 4 + 4 + 4 + es)
        impls = [(name, lambda *a, fn=fn: torch.cat([t.float().flatten() for t in fn(*a)]))
                 for name, fn in b.impls(fused, reference)]
        b.forward_backward("add_layer_norm", f"R={R} D={D}", impls, [x, br, bias, w, beta], [0, 1, 2, 3, 4], fwd, bwd)
    return b.finish()


if __name__ == "__main__":
    main()
