"""`mae-fast pretrain`'s reconstruction pictures: original, masked, reconstruction and reconstruction with the
visible patches pasted back, for a few fixed images and a fixed mask."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from ..data import to_pixels


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 0):
    """(masked, reconstruction, reconstruction with the visible patches) for ``imgs`` [N, 3, H, W], with a
    fixed mask (noise from ``seed``). With norm_pix_loss the model predicts each patch normalised by its own
    mean and variance; they are taken from the true patch to draw it (the usual way to show such a model)."""
    N, L = imgs.shape[0], model.patch_embed.num_patches
    noise = torch.rand(N, L, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs.float())
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)  # [N, 3, H, W]
    p = model.patch_size
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * 3))  # 1 where removed
    masked = imgs * (1 - removed)  # removed patches drawn in the mean colour (0 after normalisation)
    pasted = imgs * (1 - removed) + recon * removed
    return masked, recon, pasted


def save_reconstructions(path, model, imgs: torch.Tensor, mask_ratio: float, step: int) -> None:
    """A PNG grid: one row per image; original (headed by the step), masked, reconstruction, reconstruction with
    the visible patches pasted back."""
    with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == "cuda" else []):
        masked, recon, pasted = reconstruct(model, imgs, mask_ratio)  # leaves the training RNG untouched
    columns = [f"step {step}", "masked", "reconstruction", "+ visible"]  # the first column: the originals
    size = imgs.shape[-1]
    zoom = max(1, 128 // size)  # small images are drawn larger (nearest neighbour)
    cell, gap, head = size * zoom, 4, 14
    grid = Image.new("RGB", (len(columns) * (cell + gap) + gap, head + imgs.shape[0] * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((gap + c * (cell + gap), 2), name, fill="black")
    for r in range(imgs.shape[0]):
        for c, x in enumerate((imgs[r], masked[r], recon[r], pasted[r])):
            tile = Image.fromarray(to_pixels(x)).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (gap + c * (cell + gap), head + gap + r * (cell + gap)))
    grid.save(path)
