"""norm_pix_loss, forward + backward, beside the reference's eager forward_loss and torch.compile of it.

On the same inputs (random 75% masking, N=256, 224 px, p=16): "mae_fast full" (pred [N, L, D] with the
mask), "mae_fast masked" (pred [N, M, D] for the removed patches only, with ids_masked), and the
reference ``mae_fast.reference.patch_loss``. Each row times loss + torch.autograd.grad(loss, pred) and
checks loss and gradient against the reference in fp32 first.

bytes: nominal = imgs read once + pred read once + grad written once (frac_copy uses it); moved = what
the fused kernels touch: the counted patches of imgs and pred read, the gradient written in full and the
fp32 mask read twice (the den pre-pass and the main kernel) in the forward; the masked form reads
ids_masked instead and needs no pre-pass; the backward moves nothing at grad_output 1 (fp16: the buffer
is unscaled in place, read and written once). Skipping uncounted patches is why frac_copy can pass 1.

    python bench/bench_norm_pix_loss.py [--json bench/results/norm_pix_loss_h200.json]
    python bench/bench_norm_pix_loss.py --small
"""
import _harness
import torch

from mae_fast import ops, reference


def moved_bytes(impl, img_bytes, pred_bytes, mask_bytes, ids_bytes, counted, masked_fraction, dtype):
    """Bytes the fused kernels touch for one loss + grad at grad_output 1 (NaN for the reference rows)."""
    bwd = 2 * pred_bytes if dtype == torch.float16 else 0.0
    if impl == "mae_fast full":
        return counted * (img_bytes + pred_bytes) + pred_bytes + 2 * mask_bytes + bwd
    if impl == "mae_fast masked":
        return img_bytes * masked_fraction + 2 * pred_bytes + ids_bytes + bwd
    return float("nan")


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="image height and width")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--chans", type=int, default=3)
    ap.add_argument("--img-dtype", default=None, choices=list(_harness.DTYPES), help="default: --dtype")
    ap.add_argument("--ratio", type=float, default=0.75)
    args = _harness.parse(ap, argv)
    if args.small:
        args.n, args.size = min(args.n, 4), min(args.size, 64)
    b = _harness.Bench("norm_pix_loss", args)
    n, c, s, p = args.n, args.chans, args.size, args.patch
    L, d = (s // p) ** 2, p * p * c
    imgs = b.randn(n, c, s, s, dtype=_harness.DTYPES[args.img_dtype or args.dtype])  # [N, C, H, W]
    pred = b.randn(n, L, d, grad=True)  # [N, L, D]
    k = reference.num_kept(L, args.ratio)
    ids_shuffle = torch.rand(n, L, generator=b.gen).argsort(1).to(b.device)  # [N, L]
    mask = torch.ones(n, L, device=b.device).scatter_(1, ids_shuffle[:, :k], 0.0)  # 1 = removed (counted)
    ids = ids_shuffle[:, k:].contiguous()  # [N, M]
    pred_m = pred.detach().gather(1, ids[:, :, None].expand(-1, -1, d)).contiguous().requires_grad_(True)
    M, counted = ids.shape[1], float((mask != 0).float().mean())

    def step(fn, x):
        return lambda: torch.autograd.grad(fn(), x)

    ref_compiled = torch.compile(reference.patch_loss)
    cases = [("mae_fast full", lambda: ops.norm_pix_loss(pred, imgs, mask, p), pred),
             ("mae_fast masked", lambda: ops.norm_pix_loss(pred_m, imgs, None, p, ids_masked=ids), pred_m),
             (_harness.BASELINE, lambda: reference.patch_loss(imgs, pred, mask, p, norm_pix_loss=True), pred)]
    if not args.no_compile:
        cases.append(("reference compile", lambda: ref_compiled(imgs, pred, mask, p, norm_pix_loss=True), pred))
    x32 = pred.detach().float().requires_grad_(True)
    ref_loss = reference.patch_loss(imgs.float(), x32, mask, p, norm_pix_loss=True)
    (ref_grad,) = torch.autograd.grad(ref_loss, x32)
    img_bytes, mask_bytes = imgs.numel() * imgs.element_size(), mask.numel() * 4
    for name, fn, x in cases:
        loss = fn()
        (g,) = torch.autograd.grad(loss, x)
        if x is pred_m:  # the masked rows' gradient in place, zeros elsewhere
            g = torch.zeros_like(pred).scatter_(1, ids[:, :, None].expand(-1, -1, d), g)
        xb = x.numel() * x.element_size()
        nominal = img_bytes * (M / L if x is pred_m else 1.0) + 2 * xb
        moved = moved_bytes(name, img_bytes, xb, mask_bytes, ids.numel() * ids.element_size(), counted, M / L,
                            pred.dtype)
        stream = torch.cuda.Stream() if b.graphs else None
        b.add("norm_pix_loss", f"p={p}", "fwd+bwd", name, b.time(step(fn, x), stream), nominal,
              moved_MB=moved / 1e6, loss_rel_err=abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
              grad_rel_err=float((g.float() - ref_grad).norm() / ref_grad.norm()))
    b.config.update(N=n, C=c, H=s, W=s, patch=p, L=L, M=M, D=d, mask_ratio=args.ratio, counted_fraction=counted)
    return b.finish(["impl", "median_ms", "eager_ms", "GB/s", "frac_copy", "moved_MB", "speedup_vs_eager",
                     "eager_speedup_vs_eager", "loss_rel_err", "grad_rel_err"])


if __name__ == "__main__":
    main()
