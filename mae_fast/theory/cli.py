"""`mae-fast theory`: the spatial scale a linear MAE learns per (mask ratio, patch size), on your images;
with --findings, the paper's findings reproduced (optimum, Ising border weights, Jacobian locality)."""
from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEFAULT_RATIOS = "0,0.25,0.5,0.75,0.9"
DEFAULT_PATCHES = "2,4,8"
DEFAULT_DAE_NOISE = 0.5
MODEL_NOTE = ("model: linear, each patch dropped independently with probability m (Bernoulli), loss on every "
              "pixel; the real MAE keeps exactly int(L (1 - m)) of L patches and scores only the masked ones "
              "(docs/THEORY.md)")


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
        "share of weight from outside the output pixel's patch, fitted decay length), on the inputs the "
        "data carries and over all weights; m = 0 is the plain autoencoder (PCA, same rank). --findings "
        "reproduces the paper's findings instead. See docs/THEORY.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (Pillow-readable)")
    src.add_argument("--sample", action="store_true", help="photographs bundled with scikit-image (no network)")
    p.add_argument("--findings", action="store_true",
                   help="print the paper's findings: the optimum by brute force, the Ising border weights, "
                   "the Jacobian locality of AE / DAE / MAE on these images and on a 1/f^2 field")
    p.add_argument("--mask-ratios", type=_float_list, default=_float_list(DEFAULT_RATIOS),
                   help=f"comma-separated ratios in [0, 1) (default {DEFAULT_RATIOS})")
    p.add_argument("--patch-sizes", type=_int_list, default=_int_list(DEFAULT_PATCHES),
                   help=f"comma-separated patch sizes dividing --size (default {DEFAULT_PATCHES})")
    p.add_argument("--size", type=int, default=32, help="images are cropped/resized to size x size (default 32)")
    p.add_argument("--rank", type=int, default=32, help="number of features k (default 32)")
    p.add_argument("--color", action="store_true", help="RGB, channel last (d = 3 size^2); default grayscale")
    p.add_argument("--samples", type=int, default=None, help="number of random crops (default 4 d)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--no-center", action="store_true",
                   help="use X^T X / n of the raw crops (default: subtract the mean crop, S is the covariance)")
    p.add_argument("--power", type=float, default=None,
                   help="share of the image power the data-weighted measures keep (default 0.99)")
    p.add_argument("--dae-noise", type=float, default=DEFAULT_DAE_NOISE,
                   help=f"--findings: denoising AE noise variance / mean pixel variance (default {DEFAULT_DAE_NOISE})")
    p.add_argument("--ridge", type=float, default=None, help="relative ridge added to V (default 1e-9)")
    p.add_argument("--json", metavar="PATH", help="write the results (JSON) here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: the scale heatmaps beside what one output pixel "
                   "looks at (with --findings: the Jacobian profiles and the Ising border weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if args.power is not None and not (0.0 < args.power <= 1.0):
        _fail(f"--power must be in (0, 1], got {args.power}")
    if not (args.dae_noise >= 0 and math.isfinite(args.dae_noise)):
        _fail(f"--dae-noise must be a finite value >= 0, got {args.dae_noise}")
    if args.findings and args.color:
        _fail("--findings is for grayscale images (the Ising and 1/f^2 fields are grayscale)")


def _source(args) -> str:
    return "sample photographs" if args.sample else args.images


def run_theory(args: argparse.Namespace) -> int:
    from ..tools.report import provenance, write_json
    from .closed_form import DEFAULT_RIDGE
    from .spatial import DEFAULT_POWER

    _validate(args)
    args.ridge = DEFAULT_RIDGE if args.ridge is None else args.ridge
    args.power = DEFAULT_POWER if args.power is None else args.power
    try:
        payload = _run_findings(args) if args.findings else _run_scan(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(str(e))
    if args.json:
        config = {"images": None if args.sample else args.images, "sample": bool(args.sample), "size": args.size,
                  "rank": args.rank, "color": bool(args.color), "samples": args.samples, "seed": args.seed,
                  "center": not args.no_center, "power": args.power, "ridge": args.ridge,
                  "weights": "squared map entries; data_*: the map on the input directions holding `power` of tr S",
                  "model": MODEL_NOTE}
        if args.findings:
            config["dae_noise"] = args.dae_noise
        write_json(args.json, {"provenance": provenance(getattr(args, "argv", None)), "config": config, **payload})
    return 0


def _second_moment(args, size=None, n_samples=None):
    from .images import images_second_moment

    return images_second_moment(None if args.sample else args.images, size or args.size,
                                n_samples=n_samples or args.samples, color=args.color, seed=args.seed,
                                center=not args.no_center)


# --- the scan over (mask ratio, patch size) --------------------------------------------------------------

SCAN_COLUMNS = ["mask_ratio", "patch_size", "data_mean_distance", "mean_distance", "data_outside_patch_fraction",
                "data_decay_length", "decay_length", "off_data_fraction", "relative_loss"]


def _scan_cells(row: dict) -> dict:
    """A scan row with the saturating measures as table text ('uniform', '> image')."""
    from .spatial import format_length

    out = dict(row)
    for prefix in ("", "data_"):
        md = row[prefix + "mean_distance"]
        out[prefix + "mean_distance"] = "uniform" if row[prefix + "saturated"] else f"{md:.2f}"
        dl = row[prefix + "decay_length"]
        out[prefix + "decay_length"] = format_length(math.inf if dl is None else dl)
    return out


def _bar(args, total: int, desc: str):
    from ..tools.progress import bar

    return bar(total, desc, enabled=not getattr(args, "no_progress", False), unit="part")


def _run_scan(args) -> dict:
    from ..tools.report import format_table
    from .scan import scan

    ratios = sorted(set(args.mask_ratios) | {0.0})  # m = 0 is the PCA baseline row
    patches = sorted(set(args.patch_sizes))
    rows, fits = [], {}
    with _bar(args, 1 + len(patches), "theory, image statistics") as bar:
        S = _second_moment(args)
        bar.update(1)
        for p in patches:  # one scan per patch size, so that the bar moves
            bar.set_description(f"theory, patch size {p}")
            r, f = scan(S, (args.size, args.size), ratios, [p], args.rank, ridge=args.ridge, power=args.power,
                        keep_fits=bool(args.plot))
            rows += r
            fits.update(f)
            bar.update(1)
    from .spatial import data_basis

    q = data_basis(S, args.power).shape[1]
    print(f"linear MAE, {_source(args)}, {args.size}x{args.size} {'RGB' if args.color else 'gray'}"
          f"{'' if args.no_center else ', centred'}, rank {args.rank}; distances in pixels "
          f"(mask_ratio 0 = plain autoencoder, PCA)")
    print(f"data_*: the map on the {q} of {S.shape[0]} input directions holding {args.power:.0%} of the image "
          f"power; others: every weight. A uniform map reads {rows[0]['uniform_mean_distance']:.2f} px "
          f"('uniform': no more local than that; '> image': no decay within the image)")
    print(MODEL_NOTE)
    print(format_table([_scan_cells(r) for r in rows], SCAN_COLUMNS))
    if args.plot:
        plot(rows, fits, ratios, patches, (args.size, args.size), 3 if args.color else 1, args.plot)
    return {"data_directions": q, "results": rows}


def _pixel_field(column: "np.ndarray", size, channels: int) -> "np.ndarray":
    """One output pixel's column of W as an (h, w) image of input weights (summed over channels)."""
    h, w = size
    return column.reshape(h, w, channels).sum(axis=2) if channels > 1 else column.reshape(h, w)


def plot(rows, fits, ratios, patches, size, channels: int, path: str) -> None:
    """Heatmaps of the mean distance (on the data and over all weights) beside the weights one output pixel
    takes from every input pixel, for PCA and for the largest ratio at each patch size."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .spatial import on_data

    h, w = size
    out_pixel = (h // 2 + max(patches) // 4, w // 2 + max(patches) // 4)  # inside a patch, not on its corner
    j = (out_pixel[0] * w + out_pixel[1]) * channels  # the output pixel's first channel
    m_top = max(ratios)
    shown = [("PCA (m=0)", fits[(0.0, patches[0])])]
    shown += [(f"m={m_top:g}, p={p}", fits[(m_top, p)]) for p in patches] if m_top > 0 else []
    fig = plt.figure(figsize=(13, max(5.0, 2.1 * len(shown))))
    gs = fig.add_gridspec(len(shown), 6, width_ratios=[3, 3, 0.15, 0.5, 2, 2], wspace=0.3)
    uniform = rows[0]["uniform_mean_distance"]
    for col, (key, title) in enumerate((("data_mean_distance", "mean distance on the data (px)"),
                                        ("mean_distance", "mean distance, all weights (px)"))):
        grid = np.full((len(ratios), len(patches)), np.nan)
        sat = np.zeros_like(grid, dtype=bool)
        for r in rows:
            i, k = ratios.index(r["mask_ratio"]), patches.index(r["patch_size"])
            grid[i, k] = r[key]
            sat[i, k] = r["data_saturated" if key.startswith("data_") else "saturated"]
        ax = fig.add_subplot(gs[:, col])
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=uniform)
        ax.set_xticks(range(len(patches)), [str(p) for p in patches])
        ax.set_yticks(range(len(ratios)), [f"{m:g}" for m in ratios] if col == 0 else [])
        ax.set_xlabel("patch size")
        if col == 0:
            ax.set_ylabel("mask ratio")
        ax.set_title(title, fontsize=9)
        for i in range(len(ratios)):
            for k in range(len(patches)):
                ax.text(k, i, "uniform" if sat[i, k] else f"{grid[i, k]:.1f}", ha="center", va="center",
                        color="w", fontsize=8)
    fig.colorbar(im, cax=fig.add_subplot(gs[:, 2]), label=f"px (a uniform map: {uniform:.1f})")
    for i, (label, fit) in enumerate(shown):
        W = fit.map
        for col, (M, what) in enumerate(((on_data(W, fit.data_basis), "on the data"), (W, "all weights"))):
            img = _pixel_field(M[:, j], size, channels)
            lim = np.abs(img).max() or 1.0
            a = fig.add_subplot(gs[i, 4 + col])
            a.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            a.plot(out_pixel[1], out_pixel[0], "k+", ms=8)
            p = fit.patch_size
            for t in range(p, max(h, w), p) if fit.mask_ratio > 0 else ():  # the patch grid
                if t < w:
                    a.axvline(t - 0.5, color="0.6", lw=0.4)
                if t < h:
                    a.axhline(t - 0.5, color="0.6", lw=0.4)
            a.set_xticks([])
            a.set_yticks([])
            if i == 0:
                a.set_title(f"weights into + ({what})", fontsize=8)
            if col == 0:
                a.set_ylabel(label, fontsize=8)
    fig.suptitle("linear MAE: how far one output pixel looks", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the paper's findings -----------------------------------------------------------------------------------

def _run_findings(args) -> dict:
    from ..tools.report import format_table
    from .covariances import power_law_covariance
    from .findings import ising_findings, jacobian_claims, jacobian_findings, optimum_check
    from .images import folder_paths, image_matrix, sample_paths

    bar = _bar(args, 6, "theory, Theorem 1 by brute force")
    say = _writer(bar)
    paths = sample_paths() if args.sample else folder_paths(args.images)
    X = image_matrix(paths, 8, n_samples=2048, seed=args.seed)
    if not args.no_center:
        X = X - X.mean(axis=0)
    optimum = []
    for m in (0.25, 0.75):
        optimum.append(optimum_check(X, 8, 4, m, rank=4, starts=3, seed=args.seed))
        bar.update(1)
    say(f"Theorem 1 by brute force: {_source(args)}, 8x8 crops, p=4, rank 4; L-BFGS from 3 random starts on "
          "the loss summed over all 16 masks, against the closed form")
    say(format_table(optimum, ["mask_ratio", "closed_form_loss", "found_loss", "rel_gap", "max_angle",
                                 "paper_form_rel_diff", "closed_form_rel_diff"]))

    bar.set_description("theory, Ising border weights")
    ising = ising_findings()
    bar.update(1)
    ratios = sorted({r["mask_ratio"] for r in ising})
    table = [{"coupling": J, **{f"m={m:g}": r["border_ratio"] for m in ratios for r in ising
                               if r["coupling"] == J and r["mask_ratio"] == m}}
             for J in sorted({r["coupling"] for r in ising})]
    say("\nIsing-like field tanh(J)^(|dr|+|dc|), 16x16, p=4, rank 15: encoder weight on patch-border pixels "
          "/ on interior pixels (< 1: PCA favours the interior; MAE > 1, growing with m)")
    say(format_table(table, ["coupling", *[f"m={m:g}" for m in ratios]]))

    bar.set_description("theory, image statistics")
    S = _second_moment(args)
    bar.update(1)
    ratios = sorted(set(args.mask_ratios) - {0.0}) or [0.75]
    patches = sorted(set(args.patch_sizes))
    jac = {}
    for name, label, cov in (("images", f"{_source(args)} {args.size}x{args.size}", S),
                             ("power_law", f"stationary 1/f^2 field {args.size}x{args.size}",
                              power_law_covariance(args.size))):
        bar.set_description(f"theory, Jacobian locality ({name})")
        rows = jacobian_findings(cov, args.size, args.rank, ratios, patches, noise=args.dae_noise, power=args.power,
                                 keep_profiles=bool(args.plot))
        bar.update(1)
        jac[name] = rows
        say(f"\nJacobian locality, {label}, rank {args.rank}, DAE noise {args.dae_noise:g} x pixel variance: "
              "decay length of mean |W| against distance and mean distance (px), on the data / all weights")
        cells = [{k: ("> image" if v is None and k.endswith("decay") else ("-" if v is None else v))
                  for k, v in r.items()} for r in rows]
        say(format_table(cells, ["model", "mask_ratio", "patch_size", "data_jacobian_decay", "jacobian_decay",
                                   "data_mean_distance", "mean_distance"]))
        for key in ("data_jacobian_decay", "data_mean_distance"):
            c = jacobian_claims(rows, key)
            say(f"  {key}: " + ", ".join(f"{claim} {'yes' if ok else 'NO'}" for claim, ok in c.items()))
    bar.close()
    if args.plot:
        plot_findings(jac, ising, args.plot)
    return {"optimum": optimum, "ising": ising,
            "jacobian": {k: [{kk: vv for kk, vv in r.items() if kk != "data_profile"} for r in v]
                         for k, v in jac.items()}}


def _writer(bar):
    """print() for text shown while ``bar`` runs: the bar is cleared, the text printed, the bar redrawn."""
    def say(*parts) -> None:
        bar.write(" ".join(str(x) for x in parts), file=sys.stdout)

    return say


def plot_findings(jac: dict, ising: list, path: str) -> None:
    """Mean |W| against distance (on the data) for AE, DAE and the MAE, per field; the Ising border ratio."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (name, rows) in zip(axes, jac.items()):
        m_top = max(r["mask_ratio"] for r in rows)
        for r in rows:
            if r["model"] == "MAE" and r["mask_ratio"] != m_top:
                continue
            radii, mean = (np.asarray(v) for v in r["data_profile"])
            label = r["model"] if r["model"] != "MAE" else f"MAE m={m_top:g} p={r['patch_size']}"
            decay = r["data_jacobian_decay"]
            ax.semilogy(radii, mean / mean[0], label=f"{label}: l {'> image' if decay is None else f'= {decay:.1f}'}")
        ax.set_xlabel("distance (px)")
        ax.set_ylabel("mean |W| / mean |W| at r = 0")
        ax.set_title({"images": "images", "power_law": "stationary 1/f^2 field"}.get(name, name) + " (on the data)",
                     fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    for J in sorted({r["coupling"] for r in ising}):
        pts = sorted((r["mask_ratio"], r["border_ratio"]) for r in ising if r["coupling"] == J)
        ax.plot(*zip(*pts), "o-", label=f"J = {J:g}")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("border / interior encoder weight")
    ax.set_title("Ising-like field 16x16, p=4, rank 15", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle("linear AE / DAE / MAE: Jacobian locality and patch-border weights", fontsize=10)
    fig.tight_layout()
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
