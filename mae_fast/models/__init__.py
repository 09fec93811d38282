"""The fast MaskedAutoencoderViT and its factories (official names, short aliases, the tiny config)."""
from .. import configs as _configs
from .mae import MaskedAutoencoderViT, init_weights, load_pretrained_encoder

MODELS = _configs.factories(MaskedAutoencoderViT)
globals().update(MODELS)  # mae_vit_base_patch16(), ... : every factory name of mae_fast.configs


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build the fast model by factory name; keyword arguments override the config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["MaskedAutoencoderViT", "MODELS", "create_model", "init_weights", "load_pretrained_encoder", *MODELS]
