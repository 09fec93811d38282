"""Worker for tests/models/test_mae.py::test_ddp_two_processes_match_one (not a test module).

Under torchrun (2 processes, gloo): DDP over the fast model, each rank on its half of every batch.
With --single: one process on the whole batch. Same init, same batches, same masks (explicit noise).
Saves the initial and final state dicts to $MAE_FAST_DDP_OUT/{ddp,single}.pt.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

import mae_fast.models as M
import mae_fast.reference as R

STEPS, BATCH = 5, 4


def main() -> None:
    single = "--single" in sys.argv
    out = os.environ["MAE_FAST_DDP_OUT"]
    torch.manual_seed(0)
    model = M.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                                   decoder_depth=1, decoder_num_heads=2, norm_layer=R._LN, norm_pix_loss=True)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rank, world = 0, 1
    net = model
    if not single:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a lost peer fails, not hangs
        rank, world = dist.get_rank(), dist.get_world_size()
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        imgs = torch.randn(BATCH, 3, 32, 32, generator=gen)
        noise = torch.rand(BATCH, 16, generator=gen)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = net(imgs[part], 0.75, noise[part])[0]  # every sample has the same number of removed patches
        loss.backward()  # DDP averages gradients over ranks: the mean over the whole batch
        opt.step()
        opt.zero_grad()
    if not single:
        dist.barrier()  # both ranks done training
    if rank == 0:
        torch.save({"init": init, "final": model.state_dict()}, os.path.join(out, "single.pt" if single else "ddp.pt"))
    if not single:
        # Leave together: a rank whose peer has exited can hang in gloo's native teardown at interpreter
        # exit (seen in CI: rank 1 idle after main() returned). Barrier, destroy, then exit without the
        # interpreter's teardown; this is a test worker, its file is already written.
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
