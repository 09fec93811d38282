"""Analytic FLOPs (mae_fast.flops) against torch's FLOP counter on the real reference forward."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae_fast import reference
from mae_fast.tools import flops, variants


def _counted_forward(model, imgs, ratio):
    # the math attention backend decomposes into bmm, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        if ratio > 0:
            model(imgs, mask_ratio=ratio)
        else:
            variants.AllPatchLoss(model)(imgs, mask_ratio=0.0)
    return fc.get_total_flops() / imgs.shape[0]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("img,patch", [(32, 8), (48, 16), (24, 4)])
def test_reference_forward_flops_exact(ratio, img, patch):
    torch.manual_seed(0)
    model = reference.create_model("mae_vit_tiny_patch8", img_size=img, patch_size=patch)
    imgs = torch.randn(2, 3, img, img)
    assert flops.forward_flops(flops.dims_of(model), ratio) == _counted_forward(model, imgs, ratio)


def test_dims_from_config_match_model():
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_tiny_patch8"):
        d = flops.dims_of_config(name)
        assert d == flops.dims_of(reference.create_model(name)) if name.endswith("tiny_patch8") else d.img_h == 224
    b = flops.dims_of_config("mae_vit_base_patch16")
    assert (b.embed_dim, b.depth, b.mlp_hidden, b.decoder_embed_dim, b.decoder_depth, b.num_patches) == (768, 12, 3072, 512, 8, 196)
    assert flops.dims_of_config("mae_vit_base_patch16", img_size=224, patch_size=8).num_patches == 784


def test_variant_options_and_training():
    d = flops.dims_of_config("mae_vit_base_patch16")
    L, K, D, Dd, P = 196, 49, 768, 512, 768
    full = flops.forward_flops(d, 0.75)
    assert full - flops.forward_flops(d, 0.75, embed_visible_only=True) == 2 * (L - K) * P * D
    assert full - flops.forward_flops(d, 0.75, pred_masked_only=True) == 2 * ((1 + L) - (L - K)) * Dd * P
    assert flops.train_flops(d, 0.75) == 3 * full
    # ViT-B/16 MAE at 75%: about 19.6 GFLOP forward (encoder on 50 tokens, decoder on 197)
    assert full == pytest.approx(19.56e9, rel=0.01)
    parts = flops.flops_breakdown(d, 0.75)
    assert sum(parts.values()) == full and parts["encoder_attention"] == 12 * 4 * 50 * 50 * 768
    with pytest.raises(ValueError, match="mask_ratio"):
        flops.forward_flops(d, 1.0)
