"""mae_fast.nn: timm-compatible layers and attention backends."""
import subprocess
import sys

import pytest
import torch

import mae_fast.nn as mnn
import mae_fast.reference as R
from mae_fast.testing import rel_err


def _block_keys(prefix="", qk_norm=False, ls=False):
    keys = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias"]
    if qk_norm:
        keys += ["attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias"]
    keys += ["attn.proj.weight", "attn.proj.bias"]
    if ls:
        keys += ["ls1.gamma"]
    keys += ["norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    if ls:
        keys += ["ls2.gamma"]
    return [prefix + k for k in keys]


@pytest.mark.parametrize("qk_norm,init_values", [(False, None), (True, None), (False, 1e-5), (True, 0.1)])
def test_block_keys_are_timms(qk_norm, init_values):
    blk = mnn.Block(72, 3, qkv_bias=True, qk_norm=qk_norm, init_values=init_values)
    assert list(blk.state_dict()) == _block_keys(qk_norm=qk_norm, ls=init_values is not None)


def test_official_call_signature_and_reference_weights():
    # the official MAE code: Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=...)
    torch.manual_seed(0)
    ref = R.Block(72, 3, 4.0, qkv_bias=True, qk_scale=None, norm_layer=R._LN)
    ours = mnn.Block(72, 3, 4.0, qkv_bias=True, qk_scale=None, norm_layer=R._LN)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 50, 72, dtype=torch.float64)
    ref.double(), ours.double()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_old_timm_keywords():
    blk = mnn.Block(32, 2, drop=0.1, qk_scale=0.5)
    assert blk.attn.proj_drop.p == 0.1 and blk.mlp.drop1.p == 0.1 and blk.attn.scale == 0.5
    with pytest.raises(TypeError, match="unexpected keyword"):
        mnn.Block(32, 2, not_an_arg=1)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        mnn.Attention(30, 4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
def test_cpu_backends_match_float64(backend, dtype, tol):
    torch.manual_seed(0)
    attn = mnn.Attention(72, 3, qkv_bias=True, attn_backend=backend)
    x = torch.randn(3, 50, 72)
    exact = mnn.Attention(72, 3, qkv_bias=True, attn_backend="math").double()
    exact.load_state_dict(attn.state_dict())
    x64 = x.double().requires_grad_(True)
    out64 = exact(x64)
    out64.sum().backward()
    attn = attn.to(dtype)
    xd = x.to(dtype).requires_grad_(True)
    out = attn(xd)
    out.float().sum().backward()
    assert rel_err(out, out64) < tol
    assert rel_err(xd.grad, x64.grad) < tol
    assert rel_err(attn.qkv.weight.grad, exact.qkv.weight.grad) < tol


def test_unavailable_backend_is_an_error():
    x = torch.randn(2, 5, 32)
    for name in ("cudnn", "efficient"):
        with pytest.raises(ValueError, match=f"attn_backend='{name}' is not available on CPU"):
            mnn.Attention(32, 2, attn_backend=name)(x)
    with pytest.raises(ValueError, match="attn_backend must be"):
        mnn.Attention(32, 2, attn_backend="fastest")
    with pytest.raises(ValueError, match="attn_backend must be"):
        mnn.set_attn_backend("fastest")


def test_xformers_missing_is_an_error():
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("xformers is installed here; its absence cannot be tested")
    with pytest.raises(RuntimeError, match="needs the xformers package"):
        mnn.set_attn_backend("xformers")
    with pytest.raises(RuntimeError, match="needs the xformers package"):
        mnn.Attention(32, 2, attn_backend="xformers")(torch.randn(1, 4, 32))


def test_global_backend_setter_and_context():
    assert mnn.get_attn_backend() == "auto"
    attn = mnn.Attention(32, 2)  # None: follows the global setting
    x = torch.randn(2, 5, 32)
    with mnn.attn_backend("math"):
        assert mnn.get_attn_backend() == "math"
        a = attn(x)
        with mnn.attn_backend("efficient"):  # global setting reaches modules with attn_backend=None
            with pytest.raises(ValueError, match="not available on CPU"):
                attn(x)
    assert mnn.get_attn_backend() == "auto"
    torch.testing.assert_close(a, attn(x), rtol=1e-5, atol=1e-6)


def test_drop_path_and_layer_scale():
    dp = mnn.DropPath(0.5)
    x = torch.ones(1000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0} and 0.4 < (y[:, 0] > 0).float().mean() < 0.6
    assert torch.equal(y[:, 0], y[:, 1])  # whole samples dropped
    ls = mnn.LayerScale(3, 0.1)
    torch.testing.assert_close(ls(x[:2]), torch.full((2, 3), 0.1))


def test_block_and_attention_reject_inputs_that_are_not_tokens():
    """A 2-D input, a wrong width or a non-tensor: an error saying what tokens look like, not an unpacking error."""
    blk, attn = mnn.Block(8, 2), mnn.Attention(8, 2)
    for module in (blk, attn):
        with pytest.raises(ValueError, match=r"x must be tokens \[B, N, 8\] .* got shape \[3, 8\]"):
            module(torch.randn(3, 8))
        with pytest.raises(ValueError, match=r"got shape \[2, 3, 4\]"):
            module(torch.randn(2, 3, 4))
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            module([[0.0] * 8])
        assert module(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_patch_embed_matches_reference_and_rejects_bad_images():
    torch.manual_seed(0)
    ref = R.PatchEmbed((24, 40), 8, 2, 48)
    ours = mnn.PatchEmbed((24, 40), 8, 2, 48)
    ours.load_state_dict(ref.state_dict(), strict=True)
    imgs = torch.randn(3, 2, 24, 40)
    torch.testing.assert_close(ours(imgs), ref(imgs))
    assert ours.num_patches == 15 and ours.grid_size == (3, 5)
    with pytest.raises(ValueError, match=r"imgs must have shape \[N, 2, 24, 40\]"):
        ours(torch.randn(3, 3, 24, 40))
    with pytest.raises(TypeError, match="floating-point"):
        ours(torch.zeros(3, 2, 24, 40, dtype=torch.uint8))


def test_patch_embed_visible_only_is_exact():
    """Embedding only the kept patches equals embedding all patches and gathering them."""
    torch.manual_seed(0)
    pe = mnn.PatchEmbed(32, 8, 3, 40)
    imgs = torch.randn(3, 3, 32, 32)
    ids_keep = torch.rand(3, 16).argsort(1)[:, :5]
    full = pe.double()(imgs.double())  # [N, L, D], float64 oracle
    expected = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 40))
    got = pe.float().forward_visible(imgs, ids_keep)  # fp32: gathered pixels times the conv weight
    assert got.dtype == torch.float32 and got.shape == (3, 5, 40)
    assert rel_err(got, expected) < 1e-6
    with pytest.raises(TypeError, match="differs from the patch embedding weight dtype"):
        pe.forward_visible(imgs.bfloat16(), ids_keep)  # bf16 images, fp32 weights, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under CPU autocast the mix is fine
        assert rel_err(pe.forward_visible(imgs.bfloat16(), ids_keep), expected) < 2e-2


def test_block_compiles_fullgraph_cpu():
    """torch.compile(fullgraph=True) of a Block with an explicit backend, forward and backward."""
    code = r"""
import torch, mae_fast.nn as mnn
torch.manual_seed(0)
blk = mnn.Block(32, 2, qkv_bias=True, attn_backend="math")
x = torch.randn(2, 9, 32, requires_grad=True)
eager = blk(x); eager.sum().backward(); g = x.grad.clone(); x.grad = None
out = torch.compile(blk, fullgraph=True)(x); out.sum().backward()
torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-5)
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- timm 1.0's arguments
# (tested against real timm in tests/integrations/test_timm.py; here: what holds without timm installed)
def _attention_f64(x, attn, mask=None, causal=False):
    """softmax(q k^T * scale + mask) v written out in float64, timm's Attention step by step."""
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    qkv = (x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)).reshape(B, N, 3, H, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * hd**-0.5
    if causal:
        logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    elif mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    out = attn.norm((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * hd))
    if attn.gate is not None:
        out = out * torch.sigmoid(x @ attn.gate.weight.T + attn.gate.bias)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("kw", [dict(), dict(attn_head_dim=8, dim_out=20), dict(scale_norm=True, qk_norm=True),
                                dict(gated=True, qkv_bias=True)])
def test_attention_options_against_float64_math(kw):
    torch.manual_seed(0)
    attn = mnn.Attention(24, 4, norm_layer=torch.nn.LayerNorm, attn_backend="math", **kw).double()
    for m in attn.modules():  # non-trivial norm affine parameters
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight), torch.nn.init.normal_(m.bias)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    assert attn.attn_dim == 4 * kw.get("attn_head_dim", 6)
    assert attn(x).shape == (2, 7, kw.get("dim_out", 24))
    torch.testing.assert_close(attn(x), _attention_f64(x, attn), rtol=1e-10, atol=1e-12)
    keys = [k.split(".")[0] for k in attn.state_dict()]
    assert list(dict.fromkeys(keys)) == [k for k in ("qkv", "q_norm", "k_norm", "norm", "gate", "proj")
                                         if k in keys]  # timm's registration order


def test_attention_masks_and_causal():
    torch.manual_seed(0)
    attn = mnn.Attention(24, 3, qkv_bias=True).double()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    keep = torch.rand(2, 1, 6, 6) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for backend in (None, "math"):
        attn.attn_backend = backend
        torch.testing.assert_close(attn(x, attn_mask=keep), _attention_f64(x, attn, keep), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(attn(x, attn_mask=additive), _attention_f64(x, attn, additive), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(attn(x, is_causal=True), _attention_f64(x, attn, causal=True), rtol=1e-10, atol=1e-12)
    blk = mnn.Block(24, 3, qkv_bias=True).double()
    manual = x + blk.attn(blk.norm1(x), attn_mask=keep)
    manual = manual + blk.mlp(blk.norm2(manual))
    torch.testing.assert_close(blk(x, attn_mask=keep), manual, rtol=0, atol=0)
    assert not torch.allclose(blk(x, attn_mask=keep), blk(x))  # the mask reaches the attention
    attn.attn_backend = "xformers"
    with pytest.raises(ValueError, match="attn_mask / is_causal are not supported with attn_backend='xformers'"):
        attn(x, is_causal=True)


def test_timm_defaults_and_option_semantics():
    blk = mnn.Block(32, 2)
    assert blk.norm1.eps == 1e-6 and blk.norm2.eps == 1e-6  # timm's LayerNorm default, not torch's 1e-5
    mlp = mnn.Mlp(8, 16, bias=(True, False), drop=(0.1, 0.2))
    assert mlp.fc2.bias is None and list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight"]
    assert (mlp.drop1.p, mlp.drop2.p) == (0.1, 0.2)
    conv = mnn.Mlp(8, 16, use_conv=True, norm_layer=torch.nn.Identity)
    lin = mnn.Mlp(8, 16)
    lin.load_state_dict({k: v.flatten(1) if v.dim() == 4 else v for k, v in conv.state_dict().items()})
    x = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(conv(x), lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    blk = mnn.Block(32, 2, scale_attn_norm=True, scale_mlp_norm=True, mlp_ratio=2)
    assert isinstance(blk.attn.norm, torch.nn.LayerNorm) and blk.attn.norm.normalized_shape == (32,)
    assert isinstance(blk.mlp.norm, torch.nn.LayerNorm) and blk.mlp.norm.normalized_shape == (64,)
    ls = mnn.LayerScale(3, 0.5, inplace=True)
    y = torch.ones(2, 3)
    assert ls(y) is y and torch.equal(y, torch.full((2, 3), 0.5))
    dp = mnn.DropPath(1.0).train()  # everything dropped: zeros, not 0/0
    assert torch.equal(dp(torch.ones(4, 2)), torch.zeros(4, 2))
    dp = mnn.DropPath(0.5, scale_by_keep=False).train()
    assert set(torch.unique(dp(torch.ones(500, 2))).tolist()) == {0.0, 1.0}
    blk = mnn.Block(32, 2, dtype=torch.float64, init_values=0.1)
    assert {p.dtype for p in blk.parameters()} == {torch.float64}
    assert {p.device.type for p in mnn.Block(32, 2, device="meta").parameters()} == {"meta"}


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="norm_layer must be given when qk_norm or scale_norm"):
        mnn.Attention(32, 2, qk_norm=True)
    with pytest.raises(ValueError, match="attn_layer='diff'"):
        mnn.Block(32, 2, attn_layer="diff")
    with pytest.raises(TypeError, match="attn_layer must be"):
        mnn.Block(32, 2, attn_layer=3)
    with pytest.raises(TypeError, match="bogus"):
        mnn.Attention(32, 2, bogus=1)
    with pytest.raises(ValueError, match="bias must be a single value or a pair"):
        mnn.Mlp(8, bias=(True, True, False))

    class OtherAttention(torch.nn.Module):  # a foreign attention gets timm's keyword arguments
        def __init__(self, dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop,
                     norm_layer):
            super().__init__()
            self.got = dict(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, scale_norm=scale_norm)

        def forward(self, x, attn_mask=None, is_causal=False):
            return x * 0

    blk = mnn.Block(32, 2, qkv_bias=True, scale_attn_norm=True, attn_layer=OtherAttention)
    assert blk.attn.got == dict(dim=32, num_heads=2, qkv_bias=True, scale_norm=True)
    with pytest.raises(ValueError, match="attn_backend is for mae_fast's Attention"):
        mnn.Block(32, 2, attn_layer=OtherAttention, attn_backend="math")


def test_patch_embed_is_standalone_and_keeps_the_reference_layout():
    assert not issubclass(mnn.PatchEmbed, R.PatchEmbed)
    assert all(c.__module__ != "mae_fast.reference" for c in mnn.PatchEmbed.__mro__)
    for kw in (dict(img_size=(24, 40), patch_size=8, in_chans=2, embed_dim=16),
               dict(img_size=(32, 24), patch_size=8, in_chans=3, embed_dim=16, num_frames=4, t_patch_size=2)):
        ref, ours = R.PatchEmbed(**kw), mnn.PatchEmbed(**kw)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for a in ("img_size", "patch_size", "grid_size", "num_patches", "in_chans", "num_frames", "t_patch_size",
                  "t_grid_size", "video"):
            assert getattr(ours, a) == getattr(ref, a), a
        assert ours.input_shape() == ref.input_shape()


def test_patch_embed_timm_options():
    torch.manual_seed(0)
    pe = mnn.PatchEmbed(32, 8, 3, 16)
    x = torch.randn(2, 3, 32, 32)
    grid = pe.proj(x)  # [N, D, 4, 4]
    for fmt, expected in (("NCHW", grid), ("NHWC", grid.permute(0, 2, 3, 1)), ("NCL", grid.flatten(2)),
                          ("NLC", grid.flatten(2).transpose(1, 2))):
        other = mnn.PatchEmbed(32, 8, 3, 16, output_fmt=fmt)
        other.load_state_dict(pe.state_dict())
        assert not other.flatten and other.output_fmt == fmt
        assert torch.equal(other(x), expected), fmt
    loose = mnn.PatchEmbed(32, 8, 3, 16, strict_img_size=False)
    loose.load_state_dict(pe.state_dict())
    assert loose(torch.randn(2, 3, 16, 40)).shape == (2, 10, 16)
    with pytest.raises(ValueError, match=r"not divisible by patch_size"):
        loose(torch.randn(2, 3, 17, 40))
    with pytest.raises(ValueError, match=r"imgs must have shape \[N, 3, 32, 32\]"):
        pe(torch.randn(2, 3, 16, 40))
    pad = mnn.PatchEmbed(32, 8, 3, 16, strict_img_size=False, dynamic_img_pad=True)
    pad.load_state_dict(pe.state_dict())
    odd = torch.randn(2, 3, 17, 30)
    torch.testing.assert_close(pad(odd), pe.proj(torch.nn.functional.pad(odd, (0, 2, 0, 7))).flatten(2).transpose(1, 2))
    assert pad.dynamic_feat_size((17, 30)) == (3, 4) and pe.feat_ratio() == 8
    assert mnn.PatchEmbed(32, 8, 3, 16, bias=False).proj.bias is None
    pe.set_input_size(img_size=48)
    assert pe.grid_size == (6, 6) and pe.num_patches == 36
    with pytest.raises(NotImplementedError, match="patch_size"):
        pe.set_input_size(patch_size=4)
    with pytest.raises(ValueError, match="img_size=None"):
        mnn.PatchEmbed(None, 8, 3, 16)
    with pytest.raises(ValueError, match="output_fmt must be"):
        mnn.PatchEmbed(32, 8, 3, 16, output_fmt="NWHC")
    with pytest.raises(ValueError, match="output_fmt: not supported for video"):
        mnn.PatchEmbed(32, 8, 3, 16, output_fmt="NLC", num_frames=2)
    with pytest.raises(ValueError, match=r"img_size \(30, 32\) is not divisible"):
        mnn.PatchEmbed((30, 32), 8, 3, 16)


def test_patch_embed_visible_float64_and_rectangular_patches():
    """Inputs gather_patches does not take (float64, non-square patches): every patch embedded, the kept gathered."""
    torch.manual_seed(0)
    cases = ((mnn.PatchEmbed((24, 32), 8, 3, 16).double(), torch.randn(2, 3, 24, 32, dtype=torch.float64)),
             (mnn.PatchEmbed((24, 16), (6, 4), 3, 16), torch.randn(2, 3, 24, 16)))
    for pe, x in cases:
        ids_keep = torch.rand(2, pe.num_patches).argsort(1)[:, :5]
        conv = pe.proj(x).flatten(2).transpose(1, 2)  # [N, L, D]
        expected = torch.gather(conv, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 16))
        got = pe.forward_visible(x, ids_keep)
        assert got.dtype == x.dtype and got.shape == (2, 5, 16)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("N,hd", [(50, 64), (197, 32), (65, 80)])
@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "efficient", "math", "xformers"])
def test_cuda_backends_match_float64(backend, N, hd):
    if backend == "xformers":
        pytest.importorskip("xformers.ops")
    torch.manual_seed(0)
    H = 4
    attn = mnn.Attention(H * hd, H, qkv_bias=True, attn_backend=backend).cuda()
    exact = mnn.Attention(H * hd, H, qkv_bias=True, attn_backend="math").cuda().double()
    exact.load_state_dict(attn.state_dict())
    x = torch.randn(3, N, H * hd, device="cuda")
    x64 = x.double().requires_grad_(True)
    exact(x64).sum().backward()
    xb = x.bfloat16().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(xb)
    out.float().sum().backward()
    assert rel_err(out, exact(x64)) < 2e-2
    assert rel_err(xb.grad, x64.grad) < 3e-2
