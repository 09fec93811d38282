"""qkv_attention on the MAE shapes, forward and forward+backward, beside SDPA's flash, cuDNN and efficient kernels.

Batch 256, bf16, from the packed qkv [B, N, 3C] of the qkv GEMM to the [B, N, C] the output projection reads:
ViT-B and ViT-L encoders at mask ratio 0.75 (1 + 49 tokens, head dim 64, 12 and 16 heads) and the decoder
(1 + 196 tokens, head dim 32, 16 heads). SDPA reads q, k, v as views into qkv and its output is transposed
into [B, N, C] (a copy), and its backward's dq, dk, dv are packed into the qkv gradient (a copy), as the stock
attention does; mae_fast reads and writes the packed layouts itself. "reference eager" is SDPA with its own
choice of kernel. TFLOP/s counts useful FLOPs only (4 B H N^2 hd forward, 2.5 times that backward; no padding).
``--sweep`` also times other tile sizes and warp counts of the mae_fast kernels (for tuning on a GPU).

    python bench/bench_qkv_attention.py [--json bench/results/qkv_attention_h200.json] [--sweep]
    python bench/bench_qkv_attention.py --small
"""
import _harness
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mae_fast.kernels import qkv_attention as tiles
from mae_fast.ops.qkv_attention import qkv_attention

CASES = [("vit_b_enc", 256, 12, 50, 64), ("vit_l_enc", 256, 16, 50, 64), ("decoder", 256, 16, 197, 32)]
SMALL = [("tiny_enc", 2, 2, 17, 64), ("tiny_dec", 1, 2, 70, 32)]
SDPA = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa(H, backend=None):
    """The stock attention on the packed qkv: views in, [B, N, C] out."""
    def run(qkv):
        B, N, C3 = qkv.shape
        q, k, v = qkv.view(B, N, 3, H, C3 // (3 * H)).permute(2, 0, 3, 1, 4)  # [B, H, N, hd] views
        if backend is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, N, C3 // 3)  # [B, N, C]
    return run


def sweep_tiles(N, hd):
    """(label, forward tiles or None, backward tiles or None): variants around the defaults."""
    fwd, bwd = tiles.forward_tiles(N, hd), tiles.backward_tiles(N, hd)
    out = []
    for bm, bn, w in ((64, 64, 4), (64, 64, 8), (128, 64, 8), (64, 32, 4), (128, 32, 8)):
        t = fwd._replace(block_m=bm, block_n=bn, blocks=-(-N // bm), num_warps=w)
        if t != fwd:
            out.append((f"fwd {bm}x{bn} w{w}", t, None))
    bq = bwd.block_m if bwd.whole else max(16, 1 << (N - 1).bit_length())
    for bn, w in ((16, 8), (32, 4), (32, 8), (64, 8)):  # one program per (b, h), key blocks of bn
        t = tiles.AttentionTiles(bq, min(bn, bq), bwd.block_d, True, 1, w)
        if t != bwd and bq * bwd.block_d <= 16384:
            out.append((f"bwd whole {bq}x{t.block_n} w{w}", None, t))
    for b, w in ((32, 4), (32, 8), (64, 8)):  # blocked: programs per key block and per query block
        t = tiles.AttentionTiles(b, b, bwd.block_d, False, 2 * -(-N // b), w)
        if t != bwd:
            out.append((f"bwd blocked {b}x{b} w{w}", None, t))
    return out


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--sweep", action="store_true", help="also time other tiles of the mae_fast kernels")
    args = _harness.parse(ap, argv)
    b = _harness.Bench("qkv_attention", args)
    cases = SMALL if (args.small or b.device.type == "cpu") else CASES
    for name, B, H, N, hd in cases:
        qkv = b.randn(B, N, 3 * H * hd, grad=True)
        g = b.randn(B, N, H * hd)
        flops = 4 * B * H * N * N * hd
        impls = [("mae_fast", lambda x, H=H: qkv_attention(x, H)), (_harness.BASELINE, sdpa(H))]
        impls += [(label, sdpa(H, backend)) for label, backend in SDPA.items()]
        if not args.no_compile:
            impls.append(("reference compile", torch.compile(sdpa(H))))
        variants = [(label, None, None) for label, _ in impls]
        if args.sweep:
            variants += sweep_tiles(N, hd)
        fns = dict(impls)
        for label, fwd_t, bwd_t in variants:
            fn = fns.get(label, fns["mae_fast"])
            saved = tiles.forward_tiles, tiles.backward_tiles
            if fwd_t is not None:
                tiles.forward_tiles = lambda n, d, t=fwd_t: t
            if bwd_t is not None:
                tiles.backward_tiles = lambda n, d, t=bwd_t: t
            try:
                fn(qkv)  # a backend that cannot run this shape is reported, not timed
                for direction, call, useful in (("fwd", lambda: fn(qkv), flops),
                                                ("fwd+bwd", lambda: torch.autograd.grad(fn(qkv), qkv, g), 3.5 * flops)):
                    timed = b.time(call)
                    ms = (timed[0] or timed[1])["median_ms"]
                    b.add("qkv_attention", name, direction, label, timed, **{"TFLOP/s": useful / (ms * 1e-3) / 1e12})
            except (RuntimeError, ValueError) as e:
                b.config.setdefault("unavailable", {})[f"{name}/{label}"] = str(e).strip().splitlines()[0][:160]
            finally:
                tiles.forward_tiles, tiles.backward_tiles = saved
    b.config["cases"] = cases
    b.config["defaults"] = {name: {"fwd": tiles.forward_tiles(N, hd)._asdict(),
                                   "bwd": tiles.backward_tiles(N, hd)._asdict()} for name, _, _, N, hd in cases}
    return b.finish(["case", "dir", "impl", "median_ms", "eager_ms", "TFLOP/s", "speedup_vs_eager",
                     "eager_speedup_vs_eager"])


if __name__ == "__main__":
    main()
