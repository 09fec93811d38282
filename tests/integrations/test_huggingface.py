"""The reference against a peer written by someone else: HF transformers' ViTMAEForPreTraining.

Same shapes (layer_norm_eps 1e-6), the reference's weights mapped into HF, the same noise:
the same loss, logits and mask in fp32.
"""
import numpy as np
import pytest
import torch

import mae_fast.reference as R
from mae_fast.integrations import huggingface as H

transformers = pytest.importorskip("transformers")
hf_vitmae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")

CONFIGS = {
    # name: constructor arguments (two configs with non-default patch sizes, one with odd head/width)
    "p8_d64": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                   decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
    "p14_d72": dict(img_size=56, patch_size=14, embed_dim=72, depth=2, num_heads=3,
                    decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=3, in_chans=3),
    "p4_c1": dict(img_size=20, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, in_chans=1),
}


def _pair(name, norm_pix, ratio):
    torch.manual_seed(0)
    ref = R.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=norm_pix, **CONFIGS[name]).eval()
    hf = transformers.ViTMAEForPreTraining(H.vit_mae_config(ref, mask_ratio=ratio)).eval()
    hf.load_state_dict(H.to_hf_state_dict(ref.state_dict(), hf.state_dict().keys()), strict=True)
    return ref, hf


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_same_loss_logits_mask_as_hf(name, norm_pix, ratio):
    ref, hf = _pair(name, norm_pix, ratio)
    cfg = CONFIGS[name]
    C, S, p = cfg.get("in_chans", 3), cfg["img_size"], cfg["patch_size"]
    L = (S // p) ** 2
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, C, S, S, generator=gen)
    noise = torch.rand(3, L, generator=gen)
    with torch.no_grad():
        loss, pred, mask = ref(imgs, ratio, noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(ref.random_masking(torch.zeros(3, L, 1), ratio, noise)[2], out.ids_restore)


def test_hf_gradients_match():
    ref, hf = _pair("p8_d64", True, 0.75)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    ref(imgs, 0.75, noise)[0].backward()
    hf(pixel_values=imgs, noise=noise).loss.backward()
    ref_grads = {k: v.grad for k, v in ref.named_parameters() if v.grad is not None}
    hf_grads = H.from_hf_state_dict({k: v.grad for k, v in hf.named_parameters() if v.grad is not None}
                                    | {k: torch.zeros_like(v) for k, v in hf.state_dict().items()
                                       if "pos_embed" in k or "position_embeddings" in k})
    for k, g in ref_grads.items():
        torch.testing.assert_close(g, hf_grads[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_state_dict_roundtrip():
    ref, hf = _pair("p14_d72", False, 0.75)
    back = H.from_hf_state_dict(hf.state_dict())
    assert set(back) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back[k], v), k


def test_sincos_table_matches_hf():
    """HF's own sin-cos builder (written independently) gives the official table."""
    for D, g in ((64, 4), (768, 14), (512, 16)):
        ours = R.sincos_2d(D, g, cls_token=True)
        if hasattr(hf_vitmae, "get_2d_sincos_pos_embed"):  # older transformers
            theirs = hf_vitmae.get_2d_sincos_pos_embed(D, g, add_cls_token=True)
        else:  # newer: canonical [h | w] layout, rotated to the official [w | h] by HF itself
            t = hf_vitmae.build_2d_sinusoidal_position_embedding(g, g, embed_dim=D, cls_token=True, dtype=torch.float64)
            theirs = torch.cat([t[..., D // 2:], t[..., : D // 2]], dim=-1).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_config_rejects_non_square():
    ref = R.MaskedAutoencoderViT(img_size=(16, 32), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="square"):
        H.vit_mae_config(ref)
