"""The `mae-fast` command (also `python -m mae_fast`).

Subcommands:
  bench   training-step throughput (forward, backward, AdamW step), images/s
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _ratio(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mask-ratio must be a number, got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--mask-ratio must be in [0, 1), got {v}")
    return v


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="training-step throughput of the MAE (forward, backward, AdamW step)",
        description="Time training steps and print images/s. Defaults: mae_vit_base_patch16, batch 256, "
        "bf16 autocast on a GPU; mae_vit_tiny_patch8 (64x64 images), batch 32, fp32 on a CPU.",
    )
    p.add_argument("--model", help="factory name from mae_fast.reference (e.g. mae_vit_base_patch16)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"))
    p.add_argument("--steps", type=_positive_int("--steps"), help="timed steps")
    p.add_argument("--warmup", type=_positive_int("--warmup"), help="untimed warm-up steps")
    p.add_argument("--mask-ratio", type=_ratio, default=0.75)
    p.add_argument("--img-size", type=_positive_int("--img-size"))
    p.add_argument("--patch-size", type=_positive_int("--patch-size"))
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", metavar="PATH", help="write the results document (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from . import benchmark, benchutil, reference

    if args.model is not None and args.model not in reference.MODELS:
        raise SystemExit(f"mae-fast bench: --model {args.model!r} is unknown; choose one of {sorted(reference.MODELS)}")
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise SystemExit(f"mae-fast bench: --device {args.device!r} is not a device") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("mae-fast bench: --device cuda asked for, but CUDA is not available")
    cfg = benchmark.default_config(
        args.device, model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
    )
    cfg.mask_ratio = args.mask_ratio
    cfg.img_size = args.img_size
    cfg.patch_size = args.patch_size
    cfg.dtype = args.dtype
    if cfg.resolved_device().type == "cpu" and cfg.dtype == "fp16":
        raise SystemExit("mae-fast bench: --dtype fp16 is for CUDA; use fp32 or bf16 on a CPU")
    doc = benchmark.run(cfg, argv=getattr(args, "argv", None), progress=not args.no_progress)
    if args.json:
        benchutil.write_json(args.json, doc)
    print(benchmark.format_results(doc))
    if args.json:
        print(f"results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-fast", description="mae_fast: fast Masked Autoencoder pretraining")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_bench_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["mae-fast", *argv]  # recorded in result files as the command
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
