"""The fast MaskedAutoencoderViT and its factories (official names, short aliases, the tiny config)."""
from .. import configs as _configs
from .mae import MaskedAutoencoderViT, init_weights, load_pretrained_encoder

MODELS = _configs.factories(MaskedAutoencoderViT)
mae_vit_base_patch16_dec512d8b = MODELS["mae_vit_base_patch16_dec512d8b"]
mae_vit_large_patch16_dec512d8b = MODELS["mae_vit_large_patch16_dec512d8b"]
mae_vit_huge_patch14_dec512d8b = MODELS["mae_vit_huge_patch14_dec512d8b"]
mae_vit_tiny_patch8_dec128d2b = MODELS["mae_vit_tiny_patch8_dec128d2b"]
mae_vit_base_patch16 = MODELS["mae_vit_base_patch16"]
mae_vit_large_patch16 = MODELS["mae_vit_large_patch16"]
mae_vit_huge_patch14 = MODELS["mae_vit_huge_patch14"]
mae_vit_tiny_patch8 = MODELS["mae_vit_tiny_patch8"]


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build the fast model by factory name; keyword arguments override the config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["MaskedAutoencoderViT", "MODELS", "create_model", "init_weights", "load_pretrained_encoder", *MODELS]
