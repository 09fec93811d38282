"""The `mae-fast` command (also `python -m mae_fast`).

Subcommands:
  pretrain MAE pretraining on a folder of images (the official recipe), checkpoints and reconstruction
           pictures
  bench    training-step throughput (forward, backward, AdamW step): reference and mae_fast, eager and
           torch.compile, and mae_fast's step as one CUDA graph, side by side; images/s, memory, FLOPs, MFU,
           speedup
  sweep    the same over mask ratios x patch sizes; JSON and a PNG plot
  profile  one step of each under torch.profiler: where the time goes, top ops, Chrome traces
  theory   the linear-MAE theory (spatial scale per mask ratio and patch size), when installed

bench, sweep and profile take video models too: --num-frames T (clips [N, C, T, H, W]), --t-patch-size u
(tubelet frames; default 2 for video) and --tube (tube masking).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import defaults

# Nothing here imports torch at module level: `mae-fast --help` answers without it. Each command imports
# what it needs when it runs.


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it takes a value, has a fixed default and the text does not
    state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text or action.default is None
                or action.default is argparse.SUPPRESS):  # nargs 0: on/off flags, whose help says what they do
            return text
        return text + " (default: %(default)s)"


def _number_arg(name: str, kind: type, op: str, bound: int):
    """An argparse type: ``kind`` (int or float) with ``value op bound`` (op ">" or ">="; NaN fails both)."""
    what = "an integer" if kind is int else "a number"

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {s!r}") from None
        if not (v > bound if op == ">" else v >= bound):
            raise argparse.ArgumentTypeError(f"{name} must be {op} {bound}, got {v}")
        return v

    return parse


def _positive_int(name: str):
    return _number_arg(name, int, ">=", 1)


def _nonneg_int(name: str):
    return _number_arg(name, int, ">=", 0)


def _positive_float(name: str):
    return _number_arg(name, float, ">", 0)


def _nonneg_float(name: str):
    return _number_arg(name, float, ">=", 0)


def _ratio(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mask-ratio must be a number, got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--mask-ratio must be in [0, 1), got {v}")
    return v


def _list_arg(name: str, kind: type, check, rule: str):
    """An argparse type: comma-separated values of ``kind``, each with ``check(value)`` true (``rule`` says
    what it asks), at least one."""
    what = "numbers" if kind is float else "integers"

    def parse(s: str) -> list:
        out = []
        for part in (p for p in s.split(",") if p.strip()):
            try:
                v = kind(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} must be comma-separated {what}, got {part!r}") from None
            if not check(v):
                raise argparse.ArgumentTypeError(f"{name}: every value must be {rule}, got {v}")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError(f"{name}: give at least one value")
        return out

    return parse


_ratio_list = _list_arg("--mask-ratios", float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def _int_list(name: str):
    return _list_arg(name, int, lambda v: v >= 1, ">= 1")


def _variant_list(s: str) -> List[str]:
    from .variants import ALL_VARIANTS

    out = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in out if v not in ALL_VARIANTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--variants: unknown variant(s) {bad}; choose from {','.join(ALL_VARIANTS)}")
    return out


def _model_args(p: argparse.ArgumentParser, table: dict, batch_help: str) -> None:
    """--model, --batch-size and --img-size: every command's."""
    p.add_argument("--model", help="factory name (mae_fast.configs.NAMES), e.g. mae_vit_large_patch16 (default: "
                   f"{defaults.per_device(table, 'model')})")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"),
                   help=f"{batch_help} (default: {defaults.per_device(table, 'batch_size')})")
    p.add_argument("--img-size", type=_positive_int("--img-size"), help="image side in pixels (default: the model's)")


def _ratio_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-ratio", type=_ratio, default=0.75, help="fraction of patches removed")


def _device_args(p: argparse.ArgumentParser, dtypes=("auto", "fp32", "bf16", "fp16")) -> None:
    """--dtype, --device and --threads: every command's."""
    p.add_argument("--dtype", choices=list(dtypes), default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=_positive_int("--threads"),
                   help="CPU threads torch uses (default: torch's, one per physical core)")


def _timing_args(p: argparse.ArgumentParser, table: dict, steps_help: str, variants_help: str) -> None:
    """--steps, --variants and --peak-tflops: bench's and sweep's."""
    p.add_argument("--steps", type=_positive_int("--steps"),
                   help=f"{steps_help} (default: {defaults.per_device(table, 'steps')})")
    p.add_argument("--variants", type=_variant_list, help=variants_help)
    p.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"),
                   help="peak TFLOP/s for MFU (default: a large matmul measured in the same run)")


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _common_args(p: argparse.ArgumentParser, ratio: bool = True, patch: bool = True, table: dict = defaults.BENCH,
                 warmup: Optional[str] = None) -> None:
    """The flags bench, sweep and profile share."""
    _model_args(p, table, "per device")
    p.add_argument("--warmup", type=_positive_int("--warmup"),
                   help=f"untimed warm-up steps (default: {warmup or defaults.per_device(table, 'warmup')})")
    if ratio:
        _ratio_arg(p)
    if patch:
        p.add_argument("--patch-size", type=_positive_int("--patch-size"), help="default: the model's")
    p.add_argument("--num-frames", type=_positive_int("--num-frames"), metavar="T",
                   help="video: clips of T frames [N, C, T, H, W] (default: the image model); the default batch "
                   "is then the image default divided by T/U (same tokens per batch)")
    p.add_argument("--t-patch-size", type=_positive_int("--t-patch-size"), metavar="U",
                   help="video: frames per tubelet, dividing --num-frames (default 2 with --num-frames > 1, else 1)")
    p.add_argument("--tube", action="store_true",
                   help="video: tube masking (one spatial mask per clip, repeated over the T/U tubelet slots)")
    _device_args(p)
    p.add_argument("--json", metavar="PATH", help="write the results document (JSON) here")
    _progress_arg(p)


def add_pretrain_parser(sub) -> None:
    t = defaults.PRETRAIN
    p = sub.add_parser(
        "pretrain", formatter_class=HelpFormatter,
        help="MAE pretraining on a folder of images: checkpoints and reconstruction pictures",
        description="Pretrain an MAE on the images in DIR (subfolders included) with the official recipe: "
        "RandomResizedCrop(0.2-1) and flips, AdamW(0.9, 0.95), weight decay 0.05, lr = blr x images per step / "
        "256 with linear warm-up and cosine decay per step, the normalized-pixel loss. The fast model trains "
        "through mae_fast.TrainStep (one CUDA graph per step on one GPU). Writes checkpoint.pth (model, "
        "optimizer, scheduler, step, RNG states), recon_<step>.png (original / masked / reconstruction / + "
        "visible) and log.jsonl into --output-dir. --sample trains on photographs shipped with scikit-image. "
        "Under torchrun --nproc_per_node=N (and --nnodes for several machines) it trains with "
        "DistributedDataParallel, eager steps: --batch-size is split over the processes, each sample's crop, "
        "flip and mask are those of one process, and so are the losses (docs/PRETRAIN.md).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("images", nargs="?", metavar="DIR", help="folder of images (png, jpg, ...; searched recursively)")
    src.add_argument("--sample", action="store_true",
                     help="train on the photographs shipped with scikit-image instead (nothing is downloaded)")
    p.add_argument("--output-dir", default="output_dir", metavar="DIR", help="where checkpoints, pictures and the log go")
    _model_args(p, t, "images per micro-batch over all processes (under torchrun each process takes an equal "
                "part)")
    p.add_argument("--accum-iter", type=_positive_int("--accum-iter"), default=1,
                   help="micro-batches per optimizer step (gradient accumulation): a step trains batch-size x "
                   "accum-iter images, and --steps, the log and the lr rule count such steps")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int("--steps"),
                   help=f"optimizer steps in all (default: {defaults.per_device(t, 'steps')})")
    g.add_argument("--epochs", type=_positive_float("--epochs"), help="instead of --steps: passes over the images")
    p.add_argument("--warmup-steps", type=_nonneg_int("--warmup-steps"),
                   help="linear lr warm-up (default: 5%% of the steps, as the official 40 of 800 epochs)")
    _ratio_arg(p)
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="plain pixel loss (default: the normalized-pixel loss)")
    p.add_argument("--blr", type=_positive_float("--blr"), default=1.5e-4,
                   help="base lr: lr = blr x batch-size x accum-iter / 256")
    p.add_argument("--lr", type=_positive_float("--lr"), help="the peak lr itself (default: from --blr)")
    p.add_argument("--min-lr", type=_nonneg_float("--min-lr"), default=0.0, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=_nonneg_float("--weight-decay"), default=0.05,
                   help="AdamW weight decay (none on biases and norms)")
    p.add_argument("--grad-clip", type=_positive_float("--grad-clip"),
                   help="clip the gradient norm to this (default: no clipping, as the official recipe)")
    _device_args(p, dtypes=("auto", "fp32", "bf16"))
    p.add_argument("--workers", type=_nonneg_int("--workers"),
                   help="data loading processes per training process (default: half the cores less one, shared "
                   "by a node's training processes, at most 8; 0 loads in the training process)")
    p.add_argument("--loader", choices=["auto", "cpu", "gpu"], default="auto",
                   help="gpu: the workers only read files, nvJPEG decodes on the GPU and one kernel crops, resizes, "
                   "flips and normalises the batch (needs torchvision); cpu: Pillow does it all in the workers; "
                   "auto: gpu on CUDA, cpu elsewhere. Both give the same samples")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, masks and data order")
    p.add_argument("--log-every", type=_positive_int("--log-every"), default=10, help="steps per log line")
    p.add_argument("--save-every", type=_nonneg_int("--save-every"),
                   help="steps between checkpoints, each replacing the last; 0: only the one at the end "
                   f"(default: {defaults.per_device(t, 'save_every')})")
    p.add_argument("--recon-every", type=_nonneg_int("--recon-every"),
                   help="steps between reconstruction pictures; 0: only the one at the end "
                   f"(default: {defaults.per_device(t, 'recon_every')})")
    p.add_argument("--recon-images", type=_positive_int("--recon-images"), default=4,
                   help="images in each reconstruction picture")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or without a value from --output-dir/checkpoint.pth")
    _progress_arg(p)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from . import distributed, pretrain

    if args.sample:
        args.images = None
    _threads(args)
    cfg = pretrain.config_from_args(args)
    ours = not distributed.running()  # under torchrun the command ends the process group it starts
    try:
        pretrain.run(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        if getattr(e, "every_process", False):  # under torchrun every process is here: end together, say it once
            if ours:
                distributed.finish()
            if distributed.env_rank() != 0:
                raise SystemExit(1) from None
        elif distributed.world_size() > 1:  # this process alone (torchrun stops the others)
            _fail("pretrain", f"rank {distributed.env_rank()}: {e}")
        _fail("pretrain", str(e))
    if ours:
        distributed.finish()  # under torchrun: wait for rank 0's files, then tear down together
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", formatter_class=HelpFormatter,
        help="training-step throughput of the MAE (forward, backward, AdamW step)",
        description="Time training steps of the reference and mae_fast, eager and torch.compile (default mode), "
        "and mae_fast's whole step as one CUDA graph (mae_fast.TrainStep), "
        "interleaved in one process, and print images/s, step time (median, p20, p80), peak memory, FLOPs per "
        "image, MFU and speedup over the reference. Defaults: mae_vit_base_patch16, batch 256, bf16 autocast, "
        "all five variants on a GPU; mae_vit_tiny_patch8 (64x64 images), batch 32, fp32, eager only on a CPU. "
        "Under torchrun --nproc_per_node=N it runs DDP and reports per-device and total images/s.",
    )
    _common_args(p)
    _timing_args(p, defaults.BENCH, "timed steps per variant",
                 "comma-separated subset of reference,reference+compile,mae_fast,mae_fast+compile,mae_fast+graph "
                 "(default: all five on a GPU, reference,mae_fast on a CPU)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include the +compile variants (default on a GPU)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    p.add_argument("--data", metavar="DIR", help="also time the data loaders on the images in DIR ('sample': the "
                   "bundled photographs) beside the training step of `mae-fast pretrain`, and say which bounds training")
    p.set_defaults(func=run_bench)


def add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", formatter_class=HelpFormatter,
        help="throughput over mask ratios x patch sizes, with a plot",
        description="Training-step throughput at every (mask ratio, patch size), image size fixed: images/s, "
        "speedup over the unmasked reference step (ratio 0; the loss there is the mean over all patches, "
        "since the official masked mean divides by zero) and over the reference at the same point, peak "
        "memory. Defaults on a GPU: mae_vit_base_patch16 at 224px, batch 64, patch sizes 8,14,16,32; on a "
        "CPU: mae_vit_tiny_patch8 at 64px, batch 8, patch sizes 8,16,32. Points where the MAE would keep no "
        "patch (int(L (1 - ratio)) = 0) are not run; the table says which.",
    )
    _common_args(p, ratio=False, patch=False, table=defaults.SWEEP)
    _timing_args(p, defaults.SWEEP, "timed steps per point and variant", "default: reference,mae_fast (eager)")
    p.add_argument("--mask-ratios", type=_ratio_list, help="comma-separated; 0, the baseline, is always added "
                   f"(default: {','.join(f'{r:g}' for r in defaults.SWEEP_RATIOS)})")
    p.add_argument("--patch-sizes", type=_int_list("--patch-sizes"), help="comma-separated, dividing the image size "
                   f"(default: {defaults.per_device(defaults.SWEEP, 'patch_sizes')})")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: speedup against mask ratio per patch size")
    p.add_argument("--theory", metavar="DIR",
                   help="put the linear-MAE predicted spatial scale beside each point, from the images in DIR "
                   "('sample': the bundled photographs)")
    p.add_argument("--theory-size", type=_positive_int("--theory-size"), default=32,
                   help="image side the linear theory runs on (same patch grid; default 32)")
    p.add_argument("--theory-rank", type=_positive_int("--theory-rank"), default=32,
                   help="number of features of the linear MAE (default 32)")
    p.set_defaults(func=run_sweep)


def add_profile_parser(sub) -> None:
    p = sub.add_parser(
        "profile", formatter_class=HelpFormatter,
        help="one training step under torch.profiler: where the time goes",
        description="Profile one training step (after warm-up) of mae_fast and of the reference: time per "
        "category (masking, gather, patch embedding, attention, other GEMMs, norms, unshuffle, loss, optimizer, "
        "other), top ops, and a Chrome trace per variant.",
    )
    _common_args(p, warmup=str(defaults.PROFILE_WARMUP))
    p.add_argument("--variants", type=_variant_list, help="default: reference,mae_fast (eager)")
    p.add_argument("--trace", metavar="DIR", help="write Chrome traces (trace_<variant>.json.gz, gzipped JSON: chrome://tracing and "
                   "ui.perfetto.dev open it) into DIR")
    p.add_argument("--top", type=_positive_int("--top"), default=15, help="top ops listed per variant")
    p.set_defaults(func=run_profile)


def _fail(cmd: str, msg: str):
    raise SystemExit(f"mae-fast {cmd}: {msg}")


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _video(cmd: str, args: argparse.Namespace) -> dict:
    """num_frames, t_patch_size, tube_masking from the flags, with the video default --t-patch-size 2 (the
    tool's check_config checks the result; a default that does not divide --num-frames is said here)."""
    T, u, tube = args.num_frames, args.t_patch_size, bool(args.tube)
    if T is None:
        if u is not None and u != 1:
            _fail(cmd, f"--t-patch-size {u} needs a video model: give --num-frames (a multiple of {u})")
        if tube:
            _fail(cmd, "--tube (tube masking) needs a video model: give --num-frames > 1")
        return {"num_frames": 1, "t_patch_size": 1, "tube_masking": False}
    if u is None:
        u = 2 if T > 1 else 1
        if T % u:
            _fail(cmd, f"--num-frames {T} is not a multiple of --t-patch-size {u} (the default for video; give "
                       "--t-patch-size)")
    return {"num_frames": T, "t_patch_size": u, "tube_masking": tube}


def _bench_config(args: argparse.Namespace, video: dict):
    from . import bench

    cfg = bench.default_config(args.device, model=args.model, batch_size=args.batch_size,
                                   steps=getattr(args, "steps", None), warmup=args.warmup, **video)
    cfg.mask_ratio = args.mask_ratio
    cfg.img_size = args.img_size
    cfg.patch_size = args.patch_size
    cfg.dtype = args.dtype
    cfg.variants = getattr(args, "variants", None)
    cfg.compile = getattr(args, "compile", None)
    cfg.peak_tflops = getattr(args, "peak_tflops", None)
    return cfg


def _emit(doc: dict, text: str, args: argparse.Namespace, rank0: bool = True) -> None:
    from . import report

    if not rank0:
        return
    if args.json:
        report.write_json(args.json, doc)
    print(text)
    if args.json:
        print(f"results written to {args.json}")


def run_bench(args: argparse.Namespace) -> int:
    from . import bench, distributed, report, variants

    _threads(args)
    try:
        cfg = _bench_config(args, _video("bench", args))
        bench.check_config(cfg)
    except ValueError as e:
        _fail("bench", str(e))
    if args.data is not None:
        return _bench_data(cfg, args)
    try:
        doc = bench.run(cfg, argv=getattr(args, "argv", None), progress=not args.no_progress)
    except (ValueError, variants.VariantUnavailable) as e:
        _fail("bench", str(e))
    _emit(doc, report.format_results(doc), args, distributed.rank() == 0)
    distributed.finish()  # under torchrun: wait for rank 0's files, then tear down together
    return 0


def _bench_data(cfg, args: argparse.Namespace) -> int:
    from . import data_bench, distributed, variants

    if distributed.world_size() > 1:
        _fail("bench", "--data times one process's loaders; run it without torchrun")
    try:
        doc = data_bench.run(cfg, None if args.data == "sample" else args.data, argv=getattr(args, "argv", None),
                             progress=not args.no_progress)
    except (ValueError, ImportError, FileNotFoundError, variants.VariantUnavailable) as e:
        _fail("bench", f"--data: {e}")
    _emit(doc, data_bench.format_results(doc), args)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from . import sweep, variants

    _threads(args)
    video = _video("sweep", args)
    try:
        cfg = sweep.default_config(args.device, model=args.model, batch_size=args.batch_size, steps=args.steps,
                               warmup=args.warmup, patch_sizes=args.patch_sizes, **video)
    except ValueError as e:
        _fail("sweep", str(e))
    cfg.img_size = args.img_size
    cfg.dtype = args.dtype
    cfg.variants = args.variants
    cfg.peak_tflops = args.peak_tflops
    cfg.theory = args.theory
    cfg.theory_size = args.theory_size
    cfg.theory_rank = args.theory_rank
    if args.mask_ratios is not None:
        cfg.mask_ratios = args.mask_ratios
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("sweep", "--plot needs matplotlib (pip install matplotlib)")
    if args.theory and args.theory != "sample":
        import os

        if not os.path.isdir(args.theory):
            _fail("sweep", f"--theory {args.theory!r} is not a folder (give a folder of images, or 'sample')")
    try:
        sweep.check_config(cfg)
        doc = sweep.run(cfg, argv=getattr(args, "argv", None), progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError, variants.VariantUnavailable) as e:
        _fail("sweep", str(e))
    _emit(doc, sweep.format_results(doc), args)
    if args.plot:
        sweep.plot(doc, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from . import bench, profile, variants

    _threads(args)
    try:
        cfg = _bench_config(args, _video("profile", args))
        cfg.steps = 1
        if cfg.warmup is None:
            cfg.warmup = defaults.PROFILE_WARMUP
        if not cfg.variants:
            cfg.compile = False
        bench.check_config(cfg)
        doc = profile.run(cfg, trace_dir=args.trace, argv=getattr(args, "argv", None), top=args.top,
                          progress=not args.no_progress)
    except (ValueError, variants.VariantUnavailable) as e:
        _fail("profile", str(e))
    _emit(doc, profile.format_results(doc), args)
    return 0


def _add_theory(sub) -> None:
    try:
        from ..theory.cli import add_theory_parser
    except ImportError:  # the theory needs numpy/scipy/Pillow; without them `theory` is just absent
        return
    add_theory_parser(sub)


def build_parser(prog: str = "mae-fast") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="mae_fast: fast Masked Autoencoder pretraining. "
                                     f"`{prog} COMMAND --help` lists a command's options and defaults.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_pretrain_parser(sub)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    add_profile_parser(sub)
    _add_theory(sub)
    return parser


# OpenMP threads that spin while they wait make a CPU step many times slower as soon as another process
# takes a core: on a busy 2-core CPU a bench step took 5.4 s with spinning threads, 0.27 s with sleeping
# ones. The commands therefore ask for sleeping threads unless OMP_WAIT_POLICY is set. It only takes effect
# when torch is imported after this, as it is in the command (torch loads OpenMP when imported).
OMP_WAIT_POLICY = "PASSIVE"


def main(argv: Optional[List[str]] = None, prog: str = "mae-fast") -> int:
    """The command line ``prog argv...`` (``python -m mae_fast`` passes its own name as ``prog``)."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.argv = [prog, *argv]  # recorded in result files as the command
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
