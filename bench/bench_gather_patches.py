"""gather_patches, forward and backward, and the visible-only patch embedding it serves, beside the reference.

gather_patches: imgs [N, 3, 224, 224] -> the raw pixels of the K = 49 visible patches [N, K, 768] (imgs
needs grad so that the backward kernel is timed); reference: unfold + the index-repeat gather
(``mae_fast.reference.visible_patches``). patch_embed: ``F.linear(gather_patches(imgs), W, b)`` against the
reference Conv2d on every patch and then the gather (both include the GEMM; rows carry no bytes: compare
times), for each embedding width D.

    python bench/bench_gather_patches.py [--json bench/results/gather_patches_h200.json]
    python bench/bench_gather_patches.py --small
"""
import _harness
import torch
import torch.nn.functional as F

from mae_fast import ops, reference


def reference_embedding(imgs, ids_keep, weight, bias, p):
    x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2)  # [N, L, D]
    return reference.gather_visible(x, ids_keep)  # [N, K, D]


def visible_embedding(imgs, ids_keep, weight, bias, p):
    return F.linear(ops.gather_patches(imgs, ids_keep, p), weight.flatten(1), bias)  # [N, K, D]


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="image height and width")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 768])
    ap.add_argument("--ratio", type=float, default=0.75)
    args = _harness.parse(ap, argv)
    if args.small:
        args.n, args.size, args.patch, args.dims = min(args.n, 4), min(args.size, 64), min(args.patch, 8), [64]
    b = _harness.Bench("gather_patches", args)
    N, p, C, S = args.n, args.patch, 3, args.size
    L = (S // p) ** 2
    K, E = reference.num_kept(L, args.ratio), C * p * p
    ids_keep = torch.rand(N, L, generator=b.gen).argsort(1)[:, :K].contiguous().to(b.device)  # [N, K]
    es, ib = torch.tensor([], dtype=b.dtype).element_size(), ids_keep.element_size()
    b.config.update(N=N, image=S, patch=p, L=L, K=K, dims=args.dims)
    imgs = b.randn(N, C, S, S, grad=True)
    b.forward_backward("gather_patches", f"p={p}",
                       b.impls(lambda a, i: ops.gather_patches(a, i, p), lambda a, i: reference.visible_patches(a, i, p)),
                       [imgs, ids_keep], [0], 2 * N * K * E * es + N * K * ib, (N * K * E + N * C * S * S) * es + N * K * ib)
    imgs = imgs.detach()
    for D in args.dims:
        weight, bias = b.randn(D, C, p, p, grad=True), b.randn(D, grad=True)
        b.forward_backward("patch_embed", f"D={D}",
                           b.impls(lambda *a: visible_embedding(*a, p), lambda *a: reference_embedding(*a, p)),
                           [imgs, ids_keep, weight, bias], [2, 3], 0, 0)
    return b.finish()


if __name__ == "__main__":
    main()
