"""The embedded defaults of the `mae-fast` commands, one table per command and device kind.

Kept apart from the commands (and free of torch) so that ``--help`` can show them without importing torch.
On a GPU the defaults are the paper's ViT-B/16 at 224 px; on a CPU a tiny model at 64 px that runs in
seconds to minutes.
"""
from __future__ import annotations

BENCH = {
    "cpu": dict(model="mae_vit_tiny_patch8", batch_size=32, steps=20, warmup=3),
    "cuda": dict(model="mae_vit_base_patch16", batch_size=256, steps=30, warmup=5),
}
SWEEP = {  # patch sizes must divide the image size (64 for the tiny model, 224 for ViT-B)
    "cpu": dict(model="mae_vit_tiny_patch8", batch_size=8, steps=10, warmup=2, patch_sizes=[8, 16, 32]),
    "cuda": dict(model="mae_vit_base_patch16", batch_size=64, steps=8, warmup=2, patch_sizes=[8, 14, 16, 32]),
}
SWEEP_RATIOS = [0.0, 0.5, 0.6, 0.75, 0.85, 0.9, 0.95]
PROFILE_WARMUP = 3
PRETRAIN = {  # batch per step; steps: the CPU default is a demo that takes minutes, the GPU one a real run
    "cpu": dict(model="mae_vit_tiny_patch8", batch_size=32, steps=600, save_every=200, recon_every=200),
    "cuda": dict(model="mae_vit_base_patch16", batch_size=256, steps=100_000, save_every=2000, recon_every=2000),
}


def per_device(table: dict, key: str) -> str:
    """'20 on a CPU, 30 on a GPU' (for help texts)."""
    cpu, gpu = table["cpu"][key], table["cuda"][key]
    if isinstance(cpu, list):
        cpu, gpu = ",".join(map(str, cpu)), ",".join(map(str, gpu))
    return str(cpu) if cpu == gpu else f"{cpu} on a CPU, {gpu} on a GPU"
