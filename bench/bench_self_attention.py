"""self_attention (qkv GEMM + attention + the packed backward), beside F.linear + SDPA and torch.compile of it.

The MAE shapes under bf16 autocast: encoders on 1 + K = 50 tokens (C = 768, 12 heads; C = 1024, 16 heads)
and the decoder on 197 tokens (C = 512, 16 heads), batch 256. Both sides use the same attention backend
(``--backend``, default flash on CUDA), so the difference is the backward's gradient layout (dq, dk, dv
written into the packed qkv gradient with the bias gradient, instead of stack + copy + a separate sum).

    python bench/bench_self_attention.py [--json bench/results/self_attention_h200.json]
    python bench/bench_self_attention.py --small
"""
import _harness
import torch
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.nn.attn_backends import attention

CASES = [(256, 50, 768, 12), (256, 50, 1024, 16), (256, 197, 512, 16)]


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--backend", default=None, help="attention backend for both sides (default: flash on "
                                                    "CUDA, SDPA's choice on a CPU)")
    args = _harness.parse(ap, argv)
    b = _harness.Bench("self_attention", args)
    b.graphs = False  # autocast inside the timed call
    backend = args.backend or ("flash" if b.device.type == "cuda" else None)
    for B, N, C, H in ([(4, 17, 64, 4), (4, 65, 32, 2)] if args.small else CASES):
        x = b.randn(B, N, C, grad=True, dtype=torch.float32)
        w, bias = b.randn(3 * C, C, grad=True, dtype=torch.float32), b.randn(3 * C, grad=True, dtype=torch.float32)

        def reference(x, w, bias):
            q, k, v = F.linear(x, w, bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
            return attention(q, k, v, backend=backend).transpose(1, 2).reshape(B, N, C)

        def fused(x, w, bias):
            return ops.self_attention(x, w, bias, H, backend=backend)

        def under_autocast(fn):
            def run(*a):
                with torch.autocast(b.device.type, dtype=b.dtype, enabled=b.dtype != torch.float32):
                    return fn(*a)
            return run

        impls = [(name, under_autocast(fn)) for name, fn in b.impls(fused, reference)]
        b.forward_backward("self_attention", f"B={B} N={N} C={C} H={H}", impls, [x, w, bias], [0, 1, 2], 0, 0)
    return b.finish()


if __name__ == "__main__":
    main()
