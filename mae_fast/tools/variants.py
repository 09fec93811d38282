"""The variants `mae-fast bench`, `sweep` and `profile` time, and how each is built.

  reference           mae_fast.reference, eager
  reference+compile   torch.compile(reference model), default mode (the model only, not the optimizer)
  mae_fast            mae_fast.models.create_model (the fast model), eager, trained through its
                      ``forward_train`` (loss only, its own fast path) when it has one
  mae_fast+compile    torch.compile of the same, default mode
  mae_fast+graph      the fast model trained by mae_fast.TrainStep: AdamW(fused=True, capturable=True) and the
                      whole step (forward, backward, optimizer) one CUDA graph replay. On a CPU the same
                      TrainStep call runs eagerly with the other variants' AdamW (the table says so).
                      Not under DDP, not with fp16 (TrainStep has no loss scaling).

Mask ratio 0 (no masking): the official loss averages over removed patches and divides by zero there. Here
the loss at ratio 0 is the mean over all patches; the reference variants switch to it (``AllPatchLoss``) so
the unmasked baseline of a sweep is a real training step.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch
import torch.nn as nn

from .. import reference

if TYPE_CHECKING:
    from .bench import BenchConfig

ALL_VARIANTS = ["reference", "reference+compile", "mae_fast", "mae_fast+compile", "mae_fast+graph"]
GRAPH = "mae_fast+graph"


class VariantUnavailable(RuntimeError):
    """A variant was asked for that cannot be built here (e.g. mae_fast.models does not import)."""


class AllPatchLoss(nn.Module):
    """The reference with the ratio-0 loss defined: at mask_ratio 0 the loss is the mean over all patches.

    For mask_ratio > 0 it is the reference's forward, unchanged.
    """

    def __init__(self, model: reference.MaskedAutoencoderViT):
        super().__init__()
        self.model = model

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        m = self.model
        if mask_ratio > 0:
            return m(imgs, mask_ratio, noise)
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.0, noise)  # [N, 1+L, D], mask all 0
        pred = m.forward_decoder(latent, ids_restore)  # [N, L, (u*)p*p*C]
        loss = m.forward_loss(imgs, pred, torch.ones_like(mask))  # every patch counts
        return loss, pred, mask


def _model_kwargs(cfg: BenchConfig) -> dict:
    kwargs = {"norm_pix_loss": cfg.norm_pix_loss, **cfg.video_kwargs()}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    return kwargs


def _create(factory, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """factory(name, **kwargs) on ``device``: built there directly on a GPU (initialising ViT-L on the host
    takes seconds, and a sweep builds dozens of models), on the host otherwise."""
    ctx = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        model = factory(cfg.model, **_model_kwargs(cfg))
    return model.to(device)


def build_reference(cfg: BenchConfig, device: torch.device) -> nn.Module:
    model = _create(reference.create_model, cfg, device)
    return AllPatchLoss(model) if cfg.mask_ratio == 0 else model


def build_reference_compiled(cfg: BenchConfig, device: torch.device) -> nn.Module:
    return torch.compile(build_reference(cfg, device))


def fast_models_module():
    """mae_fast.models, or VariantUnavailable saying why it cannot be used."""
    try:
        mod = importlib.import_module("mae_fast.models")
    except ImportError as e:
        raise VariantUnavailable(
            f"the mae_fast variants need mae_fast.models (create_model), which does not import here: {e}"
        ) from e
    if not hasattr(mod, "create_model"):
        raise VariantUnavailable("the mae_fast variants need mae_fast.models.create_model, which is missing")
    return mod


def fast_available() -> bool:
    try:
        fast_models_module()
        return True
    except VariantUnavailable:
        return False


class TrainLoss(nn.Module):
    """The fast model's training path: ``forward_train`` (the loss only; the model chooses its fast path,
    e.g. the decoder head on removed tokens only) when it has one, else its ``forward``. A module, so that
    torch.compile and DDP see that path through ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.uses_forward_train = callable(getattr(model, "forward_train", None))

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        if self.uses_forward_train:
            return self.model.forward_train(imgs, mask_ratio)
        return self.model(imgs, mask_ratio)[0]


def build_mae_fast(cfg: BenchConfig, device: torch.device) -> nn.Module:
    return TrainLoss(_create(fast_models_module().create_model, cfg, device))


def build_mae_fast_compiled(cfg: BenchConfig, device: torch.device) -> nn.Module:
    return torch.compile(build_mae_fast(cfg, device))


VARIANTS: Dict[str, Callable[[BenchConfig, torch.device], nn.Module]] = {
    "reference": build_reference,
    "reference+compile": build_reference_compiled,
    "mae_fast": build_mae_fast,
    "mae_fast+compile": build_mae_fast_compiled,
    GRAPH: build_mae_fast,  # the same model; the step is mae_fast.TrainStep (see runner.Runner)
}


def graph_unavailable(cfg: BenchConfig, distributed: bool = False) -> Optional[str]:
    """Why the mae_fast+graph variant cannot run with these settings (None: it can)."""
    if cfg.resolved_dtype() == "fp16":
        return "mae_fast+graph: TrainStep does not do fp16 loss scaling (use --dtype bf16 or fp32)"
    if distributed:
        return "mae_fast+graph: TrainStep does not capture DDP steps (its gradient all-reduce)"
    return None


def resolve_variants(cfg: BenchConfig, distributed: bool = False) -> tuple:
    """(variants to run, {skipped variant: why}). Explicitly asked-for variants are never skipped."""
    if cfg.variants:
        unknown = [v for v in cfg.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; available: {sorted(VARIANTS)}")
        if any(v.startswith("mae_fast") for v in cfg.variants) and VARIANTS["mae_fast"] is build_mae_fast:
            fast_models_module()  # asked for: a clear VariantUnavailable now, before any timing
        if GRAPH in cfg.variants and graph_unavailable(cfg, distributed):
            raise VariantUnavailable(graph_unavailable(cfg, distributed))
        return list(dict.fromkeys(cfg.variants)), {}
    names = ["reference", "mae_fast"]
    if cfg.resolved_compile():
        names = ["reference", "reference+compile", "mae_fast", "mae_fast+compile"]
    skipped = {}
    if cfg.resolved_device().type == "cuda":  # the graph variant by default where there are CUDA graphs
        why = graph_unavailable(cfg, distributed)
        if why:
            skipped[GRAPH] = why
        else:
            names.append(GRAPH)
    try:
        fast_models_module()
    except VariantUnavailable as e:
        why = str(e)
        for v in [n for n in names if n.startswith("mae_fast")]:
            skipped[v] = why
        names = [n for n in names if not n.startswith("mae_fast")]
    return names, skipped


def flops_options(name: str, model: nn.Module) -> dict:
    """How to count a variant's FLOPs: the reference embeds all patches and predicts all rows; the fast
    model may say what it does through attributes of the same names; by default: visible-only embedding
    (ARCHITECTURE.md) and a head on removed tokens only when it trains through ``forward_train``."""
    if name.startswith("reference"):
        return {"embed_visible_only": False, "pred_masked_only": False}
    wrapper = getattr(model, "_orig_mod", model)
    inner = getattr(wrapper, "model", wrapper)
    head_default = bool(getattr(wrapper, "uses_forward_train", False))  # forward_train: head on removed tokens
    return {
        "embed_visible_only": bool(getattr(inner, "embed_visible_only", True)),
        "pred_masked_only": bool(getattr(inner, "pred_masked_only", head_default)),
    }
