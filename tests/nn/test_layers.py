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
