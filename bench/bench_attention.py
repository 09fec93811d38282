"""Attention backends on the MAE shapes: forward and forward+backward time, and the error against fp64 math.

The shapes an MAE runs: encoders on 1+K visible tokens (K = 49 at ratio 0.75 on a 14x14 grid, head dim
64; ViT-H/14: 1+64 tokens, head dim 80), the decoder on 1+L tokens (197 or 257, head dim 32); none is a
multiple of 128. Every backend is tried; those that cannot run are reported as such. The "auto" row is
what ``attn_backend="auto"`` measures at run time (``mae_fast.nn.attn_backends.tune``), with its choice.

    python bench/bench_attention.py [--json bench/results/attention_h200.json]
    python bench/bench_attention.py --small
"""
import _harness
import torch

from mae_fast.nn.attn_backends import BACKENDS, attention, attn_autotune_results
from mae_fast.testing import rel_err

SHAPES = [  # name, B, H, N, hd
    ("vit_b_enc", 256, 12, 50, 64),
    ("vit_l_enc", 256, 16, 50, 64),
    ("vit_h_enc", 256, 16, 65, 80),
    ("dec_b_l", 256, 16, 197, 32),
    ("dec_h", 256, 16, 257, 32),
    ("vit_b_enc_nomask", 256, 12, 197, 64),
]
SMALL = [("tiny_enc", 4, 3, 17, 64), ("tiny_dec", 4, 4, 65, 32)]


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    b = _harness.Bench("attention", args)
    b.graphs = False  # "auto" measures on its first call: time plain calls
    shapes = SMALL if (args.small or b.device.type == "cpu") else SHAPES
    for name, B, H, N, hd in shapes:
        q, k, v, g = (b.randn(B, H, N, hd) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        o64 = attention(q64, k64, v64, backend="math")  # the float64 oracle
        grads64 = torch.autograd.grad(o64, (q64, k64, v64), g.double())
        for backend in [x for x in BACKENDS if x != "auto"] + ["auto"]:
            def fwd():
                return attention(q, k, v, backend=backend)

            def fwd_bwd():
                return torch.autograd.grad(fwd(), (q, k, v), g)

            try:
                errs = {"rel_err_out": rel_err(fwd(), o64),
                        "rel_err_grad": max(rel_err(a, r) for a, r in zip(fwd_bwd(), grads64))}
            except (RuntimeError, ValueError) as e:
                b.config.setdefault("unavailable", {})[f"{name}/{backend}"] = str(e).splitlines()[0][:160]
                continue
            if backend == "auto":
                tag = f"|B={B}|H={H}|Nq={N}|Nk={N}|hd={hd}|"
                errs["auto_choice"] = next((e["backend"] for key, e in attn_autotune_results().items()
                                            if tag in key and "fwd+bwd" in key), None)
            b.add("attention", name, "fwd", backend, b.time(fwd), **errs)
            b.add("attention", name, "fwd+bwd", backend, b.time(fwd_bwd), **errs)
    b.config["shapes"] = shapes
    return b.finish(["case", "dir", "impl", "median_ms", "rel_err_out", "rel_err_grad", "auto_choice"])


if __name__ == "__main__":
    main()
