"""resized_crop: a batch of decoded images to normalised training samples in one launch, beside its torch path.

N decoded images of --height x --width (uint8 planes, as nvJPEG gives them) with their RandomResizedCrop
boxes and flips (``mae_fast.data.crop_and_flip``) -> [N, 3, S, S] in the bench dtype (fp32 with --small).
The "reference eager" row is the op's own plain torch path on the same device (Pillow's integer arithmetic,
one image at a time; not graph-captured: it reads the metadata on the host). bytes: the pixels read once and
the output written; images_per_s per row.

    python bench/bench_resized_crop.py [--json bench/results/resized_crop_h200.json]
    python bench/bench_resized_crop.py --small
"""
import _harness
import torch

from mae_fast import data, ops
from mae_fast.ops.resized_crop import pack_images
from mae_fast import timing


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--size", type=int, default=224, help="output side S")
    args = _harness.parse(ap, argv)
    if args.small:
        args.n, args.height, args.width, args.size = min(args.n, 4), 45, 60, 24
    b = _harness.Bench("resized_crop", args)
    N, H, W, S = args.n, args.height, args.width, args.size
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g).to(b.device) for _ in range(N)]
    drawn = [data.crop_and_flip(0, k, W, H) for k in range(N)]
    pixels, offsets, shapes = pack_images(images)
    meta = (pixels, offsets, shapes, torch.tensor([x for x, _ in drawn]).to(b.device),
            torch.tensor([f for _, f in drawn]).to(b.device))
    kw = dict(mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, dtype=b.dtype, check=False)
    case = f"N={N} {W}x{H} -> {S}"
    nbytes = pixels.numel() + N * 3 * S * S * b.dtype.itemsize
    row = b.add("resized_crop", case, "fwd", "mae_fast", b.time(lambda: ops.resized_crop(*meta, S, **kw)), nbytes)
    row["images_per_s"] = N / (row["median_ms"] * 1e-3)
    with ops.path("torch"):
        eager = timing.time_fn(lambda: ops.resized_crop(*meta, S, **kw), rep_ms=args.rep_ms, device=b.device,
                               min_reps=3)
    row = b.add("resized_crop", case, "fwd", _harness.BASELINE, (None, eager), nbytes)
    row["images_per_s"] = N / (row["median_ms"] * 1e-3)
    return b.finish(["op", "case", "impl", "median_ms", "eager_ms", "images_per_s", "GB/s", "frac_copy",
                     "speedup_vs_eager"])


if __name__ == "__main__":
    main()
