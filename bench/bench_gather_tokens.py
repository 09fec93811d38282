"""gather_tokens, forward and backward, beside the reference's eager ops and torch.compile of them.

x [N, L, D] (+ pos_embed, fixed, at ids_keep) with the cls row in front -> [N, 1+K, D], at N=256, L=196
(224 px, p = 16), K=49 (75% masking), D = 1024 and 512. Reference: x + pos_embed, a gather with the index
repeated D times, a cat of the cls row (``mae_fast.reference.gather_visible``). bytes: kept rows of x,
the position table and the output (forward); grad, grad_x with its zero rows and the prefix (backward).

    python bench/bench_gather_tokens.py [--json bench/results/gather_tokens_h200.json]
    python bench/bench_gather_tokens.py --small
"""
import _harness
import torch

from mae_fast import ops, reference


def main(argv=None):
    b, args, N, L, K = _harness.token_bench("gather_tokens", __doc__, argv)
    ids_keep = torch.rand(N, L, generator=b.gen).argsort(1)[:, :K].contiguous().to(b.device)  # [N, K]
    es, ib = torch.tensor([], dtype=b.dtype).element_size(), ids_keep.element_size()
    for D in args.dims:
        x, pos, pre = b.randn(N, L, D, grad=True), b.randn(1, L, D), b.randn(1, 1, D, grad=True)
        fwd = (N * K * D + L * D + N * (1 + K) * D) * es + N * K * ib
        bwd = (N * (1 + K) * D + N * L * D + D) * es + N * K * ib
        b.forward_backward("gather_tokens", f"D={D}", b.impls(ops.gather_tokens, reference.gather_visible),
                           [x, ids_keep, pos, pre], [0, 3], fwd, bwd)
    return b.finish()


if __name__ == "__main__":
    main()
