"""ImageNet normalisation: 8-bit RGB levels <-> the model's inputs."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(levels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (level / 255 - mean) / std in ``dtype``, computed in fp32 on the tensor's
    device (the same numbers on a CPU and a GPU: IEEE fp32 division on both)."""
    if levels.dtype != torch.uint8:
        raise TypeError(f"levels must be uint8, got {str(levels.dtype).replace('torch.', '')}")
    if levels.dim() < 3 or levels.shape[-3] != 3:
        raise ValueError(f"levels must be [..., 3, H, W], got shape {list(levels.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=levels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=levels.device).view(3, 1, 1)
    x = levels.float()  # a new tensor: the in-place steps below touch nothing of the caller's
    return x.div_(255).sub_(mean).div_(std).to(dtype)


def to_levels(im: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float32, ImageNet-normalised."""
    return normalize(to_levels(im))


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] ImageNet-normalised -> uint8 [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    img = (x.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()
