"""`mae-fast theory`: the spatial scale a linear MAE learns per (mask ratio, patch size), on your images."""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

DEFAULT_RATIOS = "0,0.25,0.5,0.75,0.9"
DEFAULT_PATCHES = "2,4,8"
N_FEATURES = 6


def _float_list(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_theory_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `theory` subcommand (defaults: func=run_theory) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "theory",
        help="linear-MAE theory: the spatial scale learned per (mask ratio, patch size)",
        description="Closed-form linear MAE (Bisulco et al. 2025) on your images: for each mask ratio and "
        "patch size, the spatial scale of the learned map (mean distance input->output in pixels, "
        "share of weight from outside the output pixel's patch, fitted decay length), next to the plain "
        "autoencoder (PCA, same rank). See docs/THEORY.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (Pillow-readable)")
    src.add_argument("--sample", action="store_true", help="photographs bundled with scikit-image (no network)")
    p.add_argument("--mask-ratios", type=_float_list, default=_float_list(DEFAULT_RATIOS),
                   help=f"comma-separated ratios in [0, 1) (default {DEFAULT_RATIOS})")
    p.add_argument("--patch-sizes", type=_int_list, default=_int_list(DEFAULT_PATCHES),
                   help=f"comma-separated patch sizes dividing --size (default {DEFAULT_PATCHES})")
    p.add_argument("--size", type=int, default=32, help="images are cropped/resized to size x size (default 32)")
    p.add_argument("--rank", type=int, default=32, help="number of features k (default 32)")
    p.add_argument("--color", action="store_true", help="RGB, channel last (d = 3 size^2); default grayscale")
    p.add_argument("--samples", type=int, default=None, help="number of random crops (default 4 d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ridge", type=float, default=None, help="relative ridge added to V (default 1e-9)")
    p.add_argument("--json", metavar="PATH", help="write the results (JSON) here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: heatmap of the scale and the top features")
    p.set_defaults(func=run_theory)
    return p


def _fail(msg: str):
    raise SystemExit(f"mae-fast theory: {msg}")


def _validate(args) -> None:
    if not args.mask_ratios:
        _fail("--mask-ratios: give at least one ratio")
    for m in args.mask_ratios:
        if not (0.0 <= m < 1.0):
            _fail(f"--mask-ratios: every ratio must be in [0, 1), got {m}")
    if args.size < 2:
        _fail(f"--size must be >= 2, got {args.size}")
    if not args.patch_sizes:
        _fail("--patch-sizes: give at least one patch size")
    for p in args.patch_sizes:
        if p < 1 or args.size % p:
            _fail(f"--patch-sizes: {p} does not divide the image size {args.size}")
    d = args.size * args.size * (3 if args.color else 1)
    if not (1 <= args.rank <= d):
        _fail(f"--rank must be in [1, {d}] for --size {args.size}, got {args.rank}")
    if args.samples is not None and args.samples < 1:
        _fail(f"--samples must be >= 1, got {args.samples}")


def run_theory(args: argparse.Namespace) -> int:
    from ..tools.report import format_table, provenance, write_json
    from .closed_form import DEFAULT_RIDGE
    from .images import images_second_moment
    from .scan import scan

    _validate(args)
    ridge = DEFAULT_RIDGE if args.ridge is None else args.ridge
    ratios = sorted(set(args.mask_ratios) | {0.0})  # m = 0 is the PCA baseline row
    patches = sorted(set(args.patch_sizes))
    try:
        S = images_second_moment(None if args.sample else args.images, args.size, n_samples=args.samples,
                                 color=args.color, seed=args.seed)
        rows, feats = scan(S, (args.size, args.size), ratios, patches, args.rank, ridge=ridge,
                           keep_features=N_FEATURES if args.plot else 0)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(str(e))
    cols = ["mask_ratio", "patch_size", "mean_distance", "outside_patch_fraction", "decay_length",
            "baseline_mean_distance", "relative_loss"]
    print(f"linear MAE, {'sample photographs' if args.sample else args.images}, {args.size}x{args.size} "
          f"{'RGB' if args.color else 'gray'}, rank {args.rank}; distances in pixels "
          "(mask_ratio 0 = plain autoencoder, PCA)")
    print(format_table([{k: ("inf" if v is None and k.endswith("decay_length") else v) for k, v in r.items()}
                        for r in rows], cols))
    if args.json:
        payload = {
            "provenance": provenance(getattr(args, "argv", None)),
            "config": {"images": None if args.sample else args.images, "sample": bool(args.sample),
                       "size": args.size, "rank": args.rank, "color": bool(args.color), "samples": args.samples,
                       "seed": args.seed, "ridge": ridge, "weights": "squared map entries"},
            "results": rows,
        }
        write_json(args.json, payload)
    if args.plot:
        plot(rows, feats, ratios, patches, (args.size, args.size), 3 if args.color else 1, args.plot)
    return 0


def _feature_image(f: np.ndarray, size, channels: int) -> np.ndarray:
    h, w = size
    img = f.reshape(h, w, channels) if channels > 1 else f.reshape(h, w)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def plot(rows, feats, ratios, patches, size, channels: int, path: str) -> None:
    """Heatmap of the mean distance over (ratio, patch size), and top features as images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((len(ratios), len(patches)), np.nan)
    for r in rows:
        grid[ratios.index(r["mask_ratio"]), patches.index(r["patch_size"])] = r["mean_distance"]
    m_top = max(ratios)
    feat_rows = [("PCA (m=0)", feats[(0.0, patches[0])])]
    feat_rows += [(f"m={m_top:g}, p={p}", feats[(m_top, p)]) for p in patches] if m_top > 0 else []
    nf = feat_rows[0][1].shape[1]
    fig = plt.figure(figsize=(4.5 + 1.3 * nf, max(3.5, 1.3 * len(feat_rows) + 0.6)))
    gs = fig.add_gridspec(len(feat_rows), nf + 3, width_ratios=[3, 0.2, 0.3] + [1] * nf)
    ax = fig.add_subplot(gs[:, 0])
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(patches)), [str(p) for p in patches])
    ax.set_yticks(range(len(ratios)), [f"{m:g}" for m in ratios])
    ax.set_xlabel("patch size")
    ax.set_ylabel("mask ratio")
    ax.set_title("mean distance (px)")
    for i in range(len(ratios)):
        for j in range(len(patches)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, cax=fig.add_subplot(gs[:, 1]))
    for i, (label, F) in enumerate(feat_rows):
        for j in range(nf):
            a = fig.add_subplot(gs[i, 3 + j])
            a.imshow(_feature_image(F[:, j], size, channels), cmap="gray" if channels == 1 else None,
                     interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(label, fontsize=8)
    fig.suptitle("linear MAE: spatial scale and top features")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    """Stand-alone entry (python -m mae_fast.theory.cli ...)."""
    parser = argparse.ArgumentParser(prog="mae-fast")
    add_theory_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
