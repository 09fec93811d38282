"""random_masking: the MAE mask from the C++/CUDA masking engine in ``csrc/``, one pass, no noise round trip.

``random_masking(N, L, ratio)`` returns ``Masking(ids_keep [N, K], ids_restore [N, L], mask [N, L])`` with
K = int(L * (1 - ratio)) (K = 0 and N = 0 are allowed, as in the reference), the three tensors of the
reference's double argsort: from Philox keys drawn from the device's torch generator
(``torch.manual_seed`` reproduces a run; one kernel launch on CUDA, safe under CUDA graph capture), or
from ``noise`` exactly as the reference uses it. ``frames=T``: tube masking
(one spatial mask per clip). The engine's ops are ``torch.ops.mae_fast.random_masking``,
``random_masking_seeded`` and ``masking_from_noise`` (schemas in ``csrc/masking.cpp``, fake
implementations here). docs/OPS.md has the key layout and the tube order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import _C  # noqa: F401  (registers torch.ops.mae_fast.*)
from ._checks import check_int, check_ratio

__all__ = ["Masking", "random_masking", "masking_reference", "num_kept"]


class Masking(NamedTuple):
    """ids_keep int64 [N, K], ids_restore int64 [N, L], mask float32 [N, L] (1 = removed)."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def ids_masked(self) -> torch.Tensor:
        """int64 [N, L-K]: the removed tokens in ascending-noise order (the official ``ids_shuffle[:, K:]``).

        The inverse permutation of ``ids_restore``, by one scatter; what ``norm_pix_loss(...,
        ids_masked=)`` takes when the decoder head runs on removed tokens only. Computed on each access.
        """
        ids_restore = self.ids_restore
        n, length = ids_restore.shape
        ranks = torch.arange(length, device=ids_restore.device).expand(n, length)  # [N, L]
        ids_shuffle = torch.empty_like(ids_restore).scatter_(1, ids_restore, ranks)  # [N, L]
        return ids_shuffle[:, self.ids_keep.shape[1]:]


def _fake_outputs(device, batch_size, spatial_tokens, spatial_keep, frames):
    L, K = frames * spatial_tokens, frames * spatial_keep
    ids_keep = torch.empty(batch_size, K, dtype=torch.int64, device=device)  # [N, K]
    ids_restore = torch.empty(batch_size, L, dtype=torch.int64, device=device)  # [N, L]
    mask = torch.empty(batch_size, L, dtype=torch.float32, device=device)  # [N, L]
    return ids_keep, ids_restore, mask


@torch.library.register_fake("mae_fast::random_masking")
def _random_masking_fake(device_like, batch_size, spatial_tokens, spatial_keep, frames, generator=None):
    return _fake_outputs(device_like.device, batch_size, spatial_tokens, spatial_keep, frames)


@torch.library.register_fake("mae_fast::random_masking_seeded")
def _random_masking_seeded_fake(device_like, batch_size, spatial_tokens, spatial_keep, frames, seed, offset):
    return _fake_outputs(device_like.device, batch_size, spatial_tokens, spatial_keep, frames)


@torch.library.register_fake("mae_fast::masking_from_noise")
def _masking_from_noise_fake(noise, spatial_keep, frames):
    return _fake_outputs(noise.device, noise.shape[0], noise.shape[1], spatial_keep, frames)


def _normalize_device(device, name: str = "device") -> torch.device:
    """A torch.device for ``device`` (CPU without an index, CUDA with one); ValueError naming ``name``."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"{name} must be a CPU or CUDA device, got {device!r}") from err
    else:
        raise TypeError(f"{name} must be a torch.device or a str, got {type(device).__name__}")
    if dev.type == "cpu":
        return torch.device("cpu")  # "cpu:0" is the CPU: tensors and generators report plain "cpu"
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_device(device: torch.device) -> None:
    """The engine runs on CPU and CUDA (meta: shapes only)."""
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device must be a CPU or CUDA device (or meta), got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {device} but CUDA is not available (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda is not None})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device is {device} but only {torch.cuda.device_count()} CUDA device(s) exist")


def _sizes(batch_size, num_tokens, mask_ratio, frames) -> Tuple[int, int, int, int]:
    """Validate the sizes; return (batch_size, spatial_tokens, spatial_keep, frames)."""
    batch_size = check_int("batch_size", batch_size, 0)
    num_tokens = check_int("num_tokens", num_tokens, 1)
    frames = check_int("frames", frames, 1)
    mask_ratio = check_ratio("mask_ratio", mask_ratio)
    if num_tokens % frames != 0:
        raise ValueError(f"num_tokens ({num_tokens}) must be divisible by frames ({frames})")
    spatial_tokens = num_tokens // frames
    spatial_keep = int(spatial_tokens * (1 - mask_ratio))  # as the reference: truncation; 0 keeps nothing
    return batch_size, spatial_tokens, spatial_keep, frames


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def random_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    device: Optional[Union[str, torch.device]] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    frames: int = 1,
) -> Masking:
    """Per-sample random masks for MAE: ``Masking(ids_keep [N, K], ids_restore [N, L], mask [N, L])``.

    device: where the outputs live (default: noise's device, else the generator's, else CPU).
    generator: a torch.Generator on that device (default: the device's default generator).
    noise: [N, L / frames] float keys (small = kept); the result then equals the reference's
    double argsort of it (stable ties). frames: T for tube masking (see the module docstring).
    Raises ValueError naming the bad argument.
    """
    batch_size, spatial_tokens, spatial_keep, frames = _sizes(batch_size, num_tokens, mask_ratio, frames)
    if device is None:
        if noise is not None and isinstance(noise, torch.Tensor):
            device = noise.device
        elif generator is not None and isinstance(generator, torch.Generator):
            device = generator.device
        else:
            device = torch.device("cpu")
    device = _normalize_device(device)
    _check_device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if _normalize_device(generator.device) != device:
            raise ValueError(f"generator must be on {device}, got a generator on {generator.device}")

    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        expected = (batch_size, spatial_tokens)
        if tuple(noise.shape) != expected:
            what = "[N, L]" if frames == 1 else "[N, L / frames] (one spatial noise per sample)"
            raise ValueError(f"noise must have shape {what} = {list(expected)}, got {list(noise.shape)}")
        if not noise.dtype.is_floating_point:
            raise ValueError(f"noise must have a floating dtype, got {str(noise.dtype).replace('torch.', '')}")
        if _normalize_device(noise.device) != device:
            raise ValueError(f"noise must be on {device}, got noise on {noise.device}")
        # Finite check. CPU: inside the kernel (ValueError from C++). CUDA: here, a host sync,
        # skipped while compiling or capturing a CUDA graph (non-finite noise then sorts by bits).
        if device.type == "cuda" and not _compiling() and not torch.cuda.is_current_stream_capturing():
            if not bool(torch.isfinite(noise).all()):
                raise ValueError("noise must be finite (no NaN or inf)")
        out = torch.ops.mae_fast.masking_from_noise(noise, spatial_keep, frames)
    else:
        device_like = torch.empty(0, device=device)
        out = torch.ops.mae_fast.random_masking(device_like, batch_size, spatial_tokens, spatial_keep, frames, generator)
    return Masking(*out)


def _random_masking_seeded(
    batch_size: int, num_tokens: int, mask_ratio: float, *, seed: int, offset: int = 0, device=None, frames: int = 1
) -> Masking:
    """Private: random_masking with an explicit Philox (seed, offset), same masks on every device.

    seed in [0, 2**63); offset a non-negative multiple of 4 (the CUDA generator's convention).
    """
    batch_size, spatial_tokens, spatial_keep, frames = _sizes(batch_size, num_tokens, mask_ratio, frames)
    device = _normalize_device("cpu" if device is None else device)
    _check_device(device)
    check_int("seed", seed, 0)
    check_int("offset", offset, 0)
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    if offset % 4 != 0:
        raise ValueError(f"offset must be a multiple of 4, got {offset}")
    device_like = torch.empty(0, device=device)
    return Masking(*torch.ops.mae_fast.random_masking_seeded(
        device_like, batch_size, spatial_tokens, spatial_keep, frames, seed, offset))


def masking_reference(noise: torch.Tensor, num_tokens: int, mask_ratio: float, frames: int = 1) -> Masking:
    """Plain torch implementation (the test oracle): the double argsort, stable ties.

    noise [N, L / frames]. For frames == 1 this is the reference random_masking with
    ``argsort(stable=True)``; for frames > 1 it builds the documented tube order from the
    double argsort of the key (removed, frame, noise).
    """
    N = noise.shape[0]
    _, Ls, Ks, T = _sizes(N, num_tokens, mask_ratio, frames)
    L, K = T * Ls, T * Ks
    order = torch.argsort(noise, dim=1, stable=True)  # [N, Ls] spatial tokens by ascending key
    rank = torch.argsort(order, dim=1)  # [N, Ls]
    t = torch.arange(T, device=noise.device).view(1, T, 1)  # [1, T, 1]
    ids_keep = (t * Ls + order[:, None, :Ks]).reshape(N, K)  # [N, K]
    r = rank[:, None, :]  # [N, 1, Ls]
    ids_restore = torch.where(r < Ks, t * Ks + r, K + t * (Ls - Ks) + (r - Ks)).reshape(N, L)  # [N, L]
    mask = (ids_restore >= K).to(torch.float32)  # [N, L]
    return Masking(ids_keep, ids_restore, mask)


def num_kept(num_tokens: int, mask_ratio: float, frames: int = 1) -> int:
    """K for these sizes: frames * int(num_tokens / frames * (1 - mask_ratio)) (0 keeps nothing)."""
    Ls = num_tokens // frames
    return frames * int(Ls * (1 - float(mask_ratio)))

