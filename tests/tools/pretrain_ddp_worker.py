"""Worker for tests/tools/test_pretrain_ddp.py (not a test module): `mae-fast pretrain` runs under torchrun.

Every process runs the same command lines through ``cli.main``, in one process group started here (a
command ends only a group it started itself; a process that starts a second group after ending one can
read the first one's stale addresses from torchrun's store). Argument 1 is the folder of images, argument
2 the output folder. Records, per rank, into
OUT/rank<r>.json: the steps at which this process wrote a checkpoint, and the exit of each command that must
fail (its SystemExit code). Run A also keeps a copy of its step-3 checkpoint (A/at3.pth) for a resume.
"""
import json
import os
import shutil
import sys

import torch

from mae_fast.tools import cli, distributed, pretrain

TINY = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu", "--lr", "1e-3"]


def main() -> None:
    images, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    saves = []
    real_save = pretrain.save_checkpoint

    def keep(path, model, opt, sched, step, cfg):
        real_save(path, model, opt, sched, step, cfg)
        saves.append([cfg.output_dir, step])
        if step == 3 and cfg.output_dir.endswith("A"):
            shutil.copy(path, os.path.join(cfg.output_dir, "at3.pth"))

    pretrain.save_checkpoint = keep
    distributed.setup(torch.device("cpu"))
    run = ["pretrain", images, *TINY, "--log-every", "1"]
    cli.main([*run, "--steps", "6", "--save-every", "3", "--output-dir", os.path.join(out, "A")])
    cli.main([*run, "--steps", "6", "--resume", os.path.join(out, "A", "at3.pth"), "--output-dir",
              os.path.join(out, "B")])
    cli.main([*run, "--steps", "3", "--accum-iter", "2", "--output-dir", os.path.join(out, "C")])
    exits = {}
    for name, argv in (("batch", ["--batch-size", "3"]), ("loader", ["--loader", "gpu"]),
                       ("resume", ["--resume", os.path.join(out, "nothing.pth")])):
        try:
            cli.main([*run, "--steps", "2", *argv, "--output-dir", os.path.join(out, name)])
            exits[name] = None
        except SystemExit as e:
            exits[name] = e.code
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"saves": saves, "exits": exits}, f)
    distributed.finish()  # both ranks here, then the group ends; leave without the interpreter's teardown,
    sys.stdout.flush()  # which has hung in gloo's native code when a peer left first
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
