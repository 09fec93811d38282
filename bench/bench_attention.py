"""Attention backends on the MAE shapes: forward+backward time and error against fp64 math.

The shapes are the ones an MAE actually runs: encoders on 1+K visible tokens (K = 49 at ratio 0.75
on a 14x14 grid, head dim 64; ViT-H/14: 1+64 tokens, head dim 80), the decoder on 1+L tokens
(197 or 257, head dim 32). None of these lengths is a multiple of 128. Every backend is run, the
ones that cannot run are reported as such. `attn_backend="auto"` measures the same thing at run time
(mae_fast.nn.attention.tune); its row shows its own time and, in `auto_choice`, what it picked.

    python bench/bench_attention.py [--json PATH] [--small]
"""
from __future__ import annotations

import argparse
import sys

import torch

from mae_fast import benchutil
from mae_fast.nn.attention import BACKENDS, attention, attn_autotune_results
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


def run_one(backend, q, k, v, g):
    def fwd():
        return attention(q, k, v, backend=backend)

    def fwd_bwd():
        out = attention(q, k, v, backend=backend)
        return torch.autograd.grad(out, (q, k, v), g)

    return fwd, fwd_bwd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU check)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = SMALL if (args.small or device.type == "cpu") else SHAPES
    backends = [b for b in BACKENDS if b != "auto"] + ["auto"]
    rows = []
    for name, B, H, N, hd in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, g = (torch.randn(B, H, N, hd, device=device, generator=gen, dtype=dtype) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        # float64 oracle (math backend)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        o64 = attention(q64, k64, v64, backend="math")
        gq64, gk64, gv64 = torch.autograd.grad(o64, (q64, k64, v64), g.double())
        for backend in backends:
            row = {"shape": name, "B": B, "H": H, "N": N, "hd": hd, "backend": backend}
            fwd, fwd_bwd = run_one(backend, q, k, v, g)
            try:
                out = fwd()
                grads = fwd_bwd()
            except (RuntimeError, ValueError) as e:
                row.update(status="unavailable", error=str(e).splitlines()[0][:160])
                rows.append(row)
                continue
            row["rel_err_out"] = rel_err(out, o64)
            row["rel_err_grad"] = max(rel_err(a, b) for a, b in zip(grads, (gq64, gk64, gv64)))
            row["fwd_ms"] = benchutil.time_fn(fwd, device=device)["median_ms"]
            row["fwd_bwd_ms"] = benchutil.time_fn(fwd_bwd, device=device)["median_ms"]
            row["status"] = "ok"
            rows.append(row)
        ok = [r for r in rows if r["shape"] == name and r["status"] == "ok" and r["backend"] != "auto"]
        best = min(ok, key=lambda r: r["fwd_bwd_ms"])["backend"] if ok else None
        tag = f"|B={B}|H={H}|Nq={N}|Nk={N}|hd={hd}|"
        chosen = [e["backend"] for key, e in attn_autotune_results().items() if tag in key and "fwd+bwd" in key]
        for r in rows:
            if r["shape"] == name:
                r["fastest_fwd_bwd"] = best
                if r["backend"] == "auto":
                    r["auto_choice"] = chosen[0] if chosen else None

    doc = benchutil.provenance(["python", *sys.argv], device)
    doc["config"] = {"dtype": args.dtype, "shapes": shapes}
    doc["results"] = rows
    if args.json:
        benchutil.write_json(args.json, doc)
    cols = ["shape", "N", "hd", "backend", "status", "fwd_ms", "fwd_bwd_ms", "rel_err_out", "rel_err_grad", "fastest_fwd_bwd",
            "auto_choice"]
    print(f"attention backends, {args.dtype}, {doc['device']}")
    print(benchutil.format_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
