"""unshuffle_tokens, forward and backward, beside the reference's eager ops and torch.compile of them.

The decoder input: x [N, 1+K, D], ids_restore [N, L], mask_token, + the decoder pos_embed (fixed)
-> [N, 1+L, D], at N=256, L=196, K=49, D = 1024 and 512. Reference: mask_token.repeat, a cat, a gather
with the repeated index, a cat of the cls row, + pos_embed (``mae_fast.reference.decoder_input``). bytes:
x, the position table, the output (forward); grad, grad_x and the mask token (backward).

    python bench/bench_unshuffle_tokens.py [--json bench/results/unshuffle_tokens_h200.json]
    python bench/bench_unshuffle_tokens.py --small
"""
import _harness
import torch

from mae_fast import ops, reference


def main(argv=None):
    b, args, N, L, K = _harness.token_bench("unshuffle_tokens", __doc__, argv)
    ids_restore = torch.rand(N, L, generator=b.gen).argsort(1).argsort(1).to(b.device)  # [N, L]
    es, ib = torch.tensor([], dtype=b.dtype).element_size(), ids_restore.element_size()
    for D in args.dims:
        x, mt, dpos = b.randn(N, 1 + K, D, grad=True), b.randn(1, 1, D, grad=True), b.randn(1, 1 + L, D)
        fwd = (N * (1 + K) * D + (1 + L) * D + N * (1 + L) * D) * es + N * L * ib
        bwd = (N * (1 + L) * D + N * (1 + K) * D + D) * es + N * L * ib
        b.forward_backward("unshuffle_tokens", f"D={D}", b.impls(ops.unshuffle_tokens, reference.decoder_input),
                           [x, ids_restore, mt, dpos], [0, 2], fwd, bwd)
    return b.finish()


if __name__ == "__main__":
    main()
