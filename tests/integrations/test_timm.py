"""mae_fast.nn and patch_model against real timm (1.0): constructors, state_dict keys, outputs, gradients."""
import copy
import inspect
import pickle

import pytest
import torch

timm = pytest.importorskip("timm")
from timm import layers as TL  # noqa: E402
from timm.models import vision_transformer as TV  # noqa: E402

import mae_fast.nn as mnn  # noqa: E402
from mae_fast.patching import patch_model  # noqa: E402
from mae_fast.testing import rel_err  # noqa: E402

pytestmark = pytest.mark.compat

PAIRS = [(mnn.Block, TV.Block), (mnn.Attention, TL.Attention), (mnn.Mlp, TL.Mlp), (mnn.PatchEmbed, TL.PatchEmbed),
         (mnn.LayerScale, TL.LayerScale), (mnn.DropPath, TL.DropPath)]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_every_timm_argument_in_timms_order(ours, theirs):
    """timm's parameters are ours, in the same order, with the same plain defaults (classes: see below)."""
    mine = [p for p in inspect.signature(ours).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    timms = list(inspect.signature(theirs).parameters.values())
    assert [p.name for p in mine[:len(timms)]] == [p.name for p in timms]
    assert all(p.kind is p.KEYWORD_ONLY for p in inspect.signature(ours).parameters.values() if p not in mine)
    for a, b in zip(mine, timms):
        if not isinstance(b.default, type) and not callable(b.default):
            assert a.default == b.default, a.name


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_forward_takes_timms_arguments_by_name(ours, theirs):
    """forward's parameters are timm's, in timm's order and with its defaults, so keyword calls work too."""
    mine = list(inspect.signature(ours.forward).parameters.values())
    timms = list(inspect.signature(theirs.forward).parameters.values())
    assert [(p.name, p.kind, p.default) for p in mine[:len(timms)]] == \
        [(p.name, p.kind, p.default) for p in timms]


def _vit(block_fn=None, seed=0, **kw):
    args = dict(dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5), **kw)
    if block_fn is not None:
        args.update(block_fn=block_fn, embed_layer=mnn.PatchEmbed)
    torch.manual_seed(seed)
    return timm.models.VisionTransformer(**args)


VIT_CONFIGS = {
    "default": {},
    "qk_norm_no_bias_layer_scale": dict(qk_norm=True, qkv_bias=False, proj_bias=False, init_values=1e-2),
    "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
    "reg_tokens_gap": dict(reg_tokens=2, no_embed_class=True, class_token=False, global_pool="avg"),
    "pre_norm_embed_norm": dict(pre_norm=True, embed_norm_layer="layernorm"),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "dynamic_img_pad": dict(dynamic_img_size=True, dynamic_img_pad=True),
    "swiglu_rmsnorm": dict(mlp_layer=TL.SwiGLUPacked, norm_layer="rmsnorm", act_layer="silu", mlp_ratio=2.0),
    "diff_attention": dict(attn_layer=TL.DiffAttention),
    "drop_rates": dict(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1),
    "jax_init_fix_init": dict(weight_init="jax", fix_init=True),
}


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_vision_transformer_with_mae_fast_layers_is_timms(name):
    """VisionTransformer(block_fn=mnn.Block, embed_layer=mnn.PatchEmbed): same seed -> the same weights
    (same modules, order, shapes and init), then the same logits and gradients."""
    kw = VIT_CONFIGS[name]
    theirs, ours = _vit(**kw).eval(), _vit(mnn.Block, **kw).eval()
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o) == list(sd_t)
    assert all(torch.equal(sd_o[k], sd_t[k]) for k in sd_t)
    assert all(isinstance(b, mnn.Block) for b in ours.blocks) and isinstance(ours.patch_embed, mnn.PatchEmbed)
    size = (40, 24) if "dynamic_img_size" in kw else (32, 32)
    if kw.get("dynamic_img_pad"):
        size = (37, 29)
    x = torch.randn(2, 3, *size)
    out_t, out_o = theirs(x), ours(x)
    assert rel_err(out_o, out_t) < 1e-5
    out_t.square().sum().backward()
    out_o.square().sum().backward()
    _assert_same_grads({k: p.grad for k, p in ours.named_parameters() if p.grad is not None},
                       {k: p.grad for k, p in theirs.named_parameters() if p.grad is not None})


def _assert_same_grads(got: dict, expected: dict, tol: float = 1e-4):
    """Same parameters with a gradient, each within tol (relative); gradients that are zero in exact
    arithmetic (a k_norm bias: softmax ignores a shift of every logit) are compared to the largest one."""
    assert set(got) == set(expected)
    scale = max(g.norm().item() for g in expected.values())
    for k, g in expected.items():
        assert (got[k] - g).norm().item() <= tol * max(g.norm().item(), 1e-6 * scale), k


def test_forward_with_attention_masks_is_timms():
    theirs, ours = _vit().eval(), _vit(mnn.Block).eval()
    x = torch.randn(2, 3, 32, 32)
    T = 17  # cls + 16 patches
    keep = torch.rand(T, T) > 0.4
    keep.fill_diagonal_(True)
    for kw in (dict(attn_mask=keep), dict(attn_mask=torch.randn(2, 1, T, T)), dict(is_causal=True)):
        a, b = theirs.forward_features(x, **kw), ours.forward_features(x, **kw)
        assert rel_err(b, a) < 1e-5, kw
        assert rel_err(a, theirs.forward_features(x)) > 1e-3  # the mask changes the output


ATTN = [dict(), dict(qkv_bias=True, qk_norm=True), dict(attn_head_dim=8, dim_out=20), dict(scale_norm=True),
        dict(gated=True, qkv_bias=True), dict(gated=True, scale_norm=True, qk_norm=True, proj_bias=False)]


@pytest.mark.parametrize("kw", ATTN, ids=[",".join(k) or "plain" for k in ATTN])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_is_timms(kw, fused):
    torch.manual_seed(0)
    theirs = TL.Attention(24, 4, norm_layer=TL.LayerNorm, **kw)
    theirs.fused_attn = fused
    ours = mnn.Attention(24, 4, norm_layer=TL.LayerNorm, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 9, 24)
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    for fw in (dict(), dict(attn_mask=mask), dict(attn_mask=torch.randn(9, 9)), dict(is_causal=True)):
        assert rel_err(ours(x, **fw), theirs(x, **fw)) < 1e-5, fw


MLP = [dict(), dict(bias=(True, False)), dict(bias=False, drop=(0.1, 0.0)), dict(norm_layer=TL.LayerNorm),
       dict(use_conv=True), dict(out_features=7, act_layer=torch.nn.SiLU)]


@pytest.mark.parametrize("kw", MLP, ids=[",".join(k) or "plain" for k in MLP])
def test_mlp_is_timms(kw):
    torch.manual_seed(0)
    theirs, ours = TL.Mlp(12, 20, **kw).eval(), mnn.Mlp(12, 20, **kw).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 12, 3, 3) if kw.get("use_conv") else torch.randn(2, 5, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert (ours.drop1.p, ours.drop2.p) == (theirs.drop1.p, theirs.drop2.p)


PE = [dict(), dict(norm_layer=TL.LayerNorm, bias=False), dict(flatten=False), dict(output_fmt=TL.Format.NHWC),
      dict(output_fmt="NCL"), dict(output_fmt="NLC"), dict(strict_img_size=False),
      dict(strict_img_size=False, dynamic_img_pad=True), dict(img_size=(32, 48), patch_size=(8, 16))]


@pytest.mark.parametrize("kw", PE, ids=[",".join(f"{k}={v}" for k, v in k.items()) or "plain" for k in PE])
def test_patch_embed_is_timms(kw):
    args = dict(dict(img_size=32, patch_size=8, in_chans=3, embed_dim=16), **kw)
    torch.manual_seed(0)
    theirs = TL.PatchEmbed(**args)
    ours = mnn.PatchEmbed(**args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for a in ("img_size", "patch_size", "grid_size", "num_patches", "flatten", "output_fmt", "strict_img_size",
              "dynamic_img_pad"):
        assert getattr(ours, a) == getattr(theirs, a), a
    assert ours.feat_ratio() == theirs.feat_ratio() and ours.feat_ratio(False) == theirs.feat_ratio(False)
    sizes = [tuple(theirs.img_size)]
    if not theirs.strict_img_size:
        sizes.append((16, 40) if not theirs.dynamic_img_pad else (19, 37))
    for size in sizes:
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        assert ours.dynamic_feat_size(size) == theirs.dynamic_feat_size(size)


def test_layer_scale_drop_path_and_factory_arguments_are_timms():
    x = torch.randn(8, 4, 6)
    for inplace in (False, True):
        a, b = TL.LayerScale(6, 0.3, inplace=inplace), mnn.LayerScale(6, 0.3, inplace=inplace)
        assert torch.equal(a(x.clone()), b(x.clone())) and list(a.state_dict()) == list(b.state_dict())
    for p, scale in ((0.3, True), (0.3, False), (1.0, True)):
        a, b = TL.DropPath(p, scale_by_keep=scale).train(), mnn.DropPath(p, scale_by_keep=scale).train()
        torch.manual_seed(1)
        ya = a(x)
        torch.manual_seed(1)
        assert torch.equal(b(x), ya) and a.extra_repr() == b.extra_repr()
    for dd in (dict(dtype=torch.float64), dict(device="meta")):
        a, b = TV.Block(24, 2, init_values=0.1, **dd), mnn.Block(24, 2, init_values=0.1, **dd)
        assert [(k, v.dtype, v.device) for k, v in a.state_dict().items()] == \
               [(k, v.dtype, v.device) for k, v in b.state_dict().items()]
    assert mnn.Block(24, 2).norm1.eps == TV.Block(24, 2).norm1.eps == 1e-6


def test_unsupported_timm_arguments_are_errors():
    with pytest.raises(ValueError, match="attn_layer='diff'"):
        _vit(mnn.Block, attn_layer="diff")
    with pytest.raises(ValueError, match="img_size=None"):
        mnn.PatchEmbed(img_size=None)


# ----------------------------------------------------------------------------- patch_model on timm models
def _small(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


def _beit():
    return timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                                 use_rel_pos_bias=True, init_values=0.1)


def _samvit():
    return timm.models.vision_transformer_sam.VisionTransformerSAM(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, use_rel_pos=True,
        window_size=2, global_attn_indexes=(1,), neck_chans=16)


def _unfused():
    model = _vit(qkv_bias=True)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


def _vit_with_attention(**attention_args):
    """A small timm ViT whose blocks hold timm Attention layers built with ``attention_args`` (timm's Block
    takes only an attention class, so the layers are put in after construction)."""
    model = _vit()
    torch.manual_seed(1)
    for blk in model.blocks:
        blk.attn = TL.Attention(48, num_heads=3, qkv_bias=True, **attention_args)
    return model


SWAPPED = {  # every block becomes an mae_fast.nn.Block
    "vit_tiny_patch16_224": (_small("vit_tiny_patch16_224", img_size=64), 64),
    "deit_tiny_distilled_patch16_224": (_small("deit_tiny_distilled_patch16_224", img_size=64), 64),
    "deit3_small_patch16_224 (LayerScale)": (_small("deit3_small_patch16_224", img_size=64), 64),
    "vit_wee_patch16_reg1_gap_256 (reg tokens)": (_small("vit_wee_patch16_reg1_gap_256", img_size=64), 64),
    "vit qk_norm, no bias, LayerScale": (lambda: _vit(**VIT_CONFIGS["qk_norm_no_bias_layer_scale"]), 32),
    "vit scale_attn_norm, scale_mlp_norm": (lambda: _vit(**VIT_CONFIGS["scale_norms"]), 32),
    "vit SwiGLU, RmsNorm": (lambda: _vit(**VIT_CONFIGS["swiglu_rmsnorm"]), 32),
    "vit pre_norm (CLIP layout)": (lambda: _vit(**VIT_CONFIGS["pre_norm_embed_norm"]), 32),
    "vit, timm's unfused attention": (_unfused, 32),
    "vit gated attention": (lambda: _vit_with_attention(gated=True), 32),
    "vit attn_head_dim 8 (attention width != dim)": (lambda: _vit_with_attention(attn_head_dim=8), 32),
}
LEFT = {  # nothing can be swapped exactly: patch_model raises and the model is unchanged
    "vit_dwee_patch16_reg1_gap_256 (DiffAttention)": (_small("vit_dwee_patch16_reg1_gap_256", img_size=64), 64),
    "beit": (_beit, 32),
    "samvit": (_samvit, 32),
    "twins_svt_small": (_small("twins_svt_small", img_size=64), 64),
    "visformer_tiny": (_small("visformer_tiny", img_size=64), 64),
    "convit_tiny": (_small("convit_tiny", img_size=64), 64),
    "cait_xxs24_224": (_small("cait_xxs24_224", img_size=64), 64),
    "eva02_tiny_patch14_224": (_small("eva02_tiny_patch14_224", img_size=56), 56),
    "tnt_s_patch16_224": (_small("tnt_s_patch16_224", img_size=64), 64),
    "xcit_nano_12_p16_224": (_small("xcit_nano_12_p16_224", img_size=64), 64),
    "vit_relpos_small_patch16_224": (_small("vit_relpos_small_patch16_224", img_size=64), 64),
}


def _step(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _built(table: dict, name: str):
    """(the model ``table[name]`` builds, in eval mode, seeded; an input batch of its size)."""
    make, size = table[name]
    torch.manual_seed(0)
    return make().eval(), torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", list(SWAPPED))
def test_patch_model_swaps_timm_vits_exactly(name):
    model, x = _built(SWAPPED, name)
    ref = copy.deepcopy(model)
    out_ref, g_ref = _step(ref, x)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert patch_model(model, attn_backend="math") is model
    blocks = [m for m in model.modules() if "Block" in type(m).__name__]
    assert blocks and all(type(b) is mnn.Block for b in blocks)
    assert all(a is b for a, b in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys
    out, g = _step(model, x)
    assert rel_err(out, out_ref) < 1e-5
    _assert_same_grads(g, g_ref)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("name", list(LEFT))
def test_patch_model_leaves_other_blocks_alone(name):
    model, x = _built(LEFT, name)
    before = model(x)
    modules = list(model.modules())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no timm-style Block that can be swapped exactly"):
        patch_model(model)
    assert list(model.modules()) == modules  # the very same objects, nothing swapped
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)


def test_patch_model_on_a_mixed_model_swaps_only_the_exact_blocks():
    model = _vit(depth=3).eval()
    other = timm.models.beit.Block(48, 3, qkv_bias=True, init_values=0.1)  # timm's BEiT block, also "Block"
    model.blocks[1] = other
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    patch_model(model)
    assert [type(b) for b in model.blocks] == [mnn.Block, timm.models.beit.Block, mnn.Block]
    assert model.blocks[1] is other
    assert rel_err(model(x), before) < 1e-5
