"""The reference MAE: patchify, masking, loss by hand, official key layout, init, model behaviour."""
import math

import numpy as np
import pytest
import torch

import mae_fast.reference as R


# ----------------------------------------------------------------------------- patchify
@pytest.mark.parametrize("C,H,W,p", [(3, 32, 32, 8), (1, 28, 42, 14), (5, 16, 48, 16), (3, 24, 24, 4)])
def test_patchify_roundtrip(C, H, W, p):
    imgs = torch.randn(2, C, H, W, dtype=torch.float64)
    x = R.patchify(imgs, p)
    assert x.shape == (2, (H // p) * (W // p), p * p * C)
    assert torch.equal(R.unpatchify(x, p, (H, W), C), imgs)


def test_patchify_order_by_hand():
    # patch (i, j), vector index (r * p + c) * C + ch holds imgs[n, ch, i*p + r, j*p + c]
    N, C, H, W, p = 2, 3, 8, 12, 4
    imgs = torch.randn(N, C, H, W)
    x = R.patchify(imgs, p)
    w = W // p
    for n, i, j, r, c, ch in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 2), (0, 1, 0, 2, 3, 1), (1, 0, 1, 1, 2, 0)]:
        assert x[n, i * w + j, (r * p + c) * C + ch] == imgs[n, ch, i * p + r, j * p + c]


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="patch_size"):
        R.patchify(torch.randn(1, 3, 30, 32), 8)


# ----------------------------------------------------------------------------- position tables
def test_sincos_layout_by_hand():
    D, g = 16, 3
    t = R.sincos_2d(D, g, cls_token=True)
    assert t.shape == (1 + g * g, D)
    assert np.all(t[0] == 0)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for row in range(g):
        for col in range(g):
            v = t[1 + row * g + col]
            np.testing.assert_allclose(v[: D // 4], np.sin(col * omega), rtol=0, atol=1e-15)
            np.testing.assert_allclose(v[D // 4: D // 2], np.cos(col * omega), rtol=0, atol=1e-15)
            np.testing.assert_allclose(v[D // 2: 3 * D // 4], np.sin(row * omega), rtol=0, atol=1e-15)
            np.testing.assert_allclose(v[3 * D // 4:], np.cos(row * omega), rtol=0, atol=1e-15)


def test_sincos_non_square_grid():
    t = R.sincos_2d(8, (2, 3))
    assert t.shape == (6, 8)
    # token 4 = row 1, col 1; token 2 = row 0, col 2
    np.testing.assert_allclose(t[4, :4], t[1, :4])  # same column as token 1
    np.testing.assert_allclose(t[4, 4:], t[3, 4:])  # same row as token 3


# ----------------------------------------------------------------------------- masking
@pytest.mark.parametrize("N,L,ratio", [(3, 50, 0.75), (2, 196, 0.75), (4, 64, 0.9), (1, 7, 0.5), (2, 16, 0.0)])
def test_random_masking_invariants(N, L, ratio):
    D = 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    x_masked, mask, ids_restore, ids_keep = R.random_masking(x, ratio, noise)
    K = int(L * (1 - ratio))
    assert ids_keep.shape == (N, K) and x_masked.shape == (N, K, D)
    assert mask.dtype == torch.float32 and mask.shape == (N, L)
    for n in range(N):
        assert sorted(ids_restore[n].tolist()) == list(range(L))
        kept = ids_restore[n] < K
        assert torch.equal(mask[n], (~kept).float())
        for l in range(L):
            if kept[l]:
                assert ids_keep[n, ids_restore[n, l]] == l
        # small noise is kept, in ascending noise order
        assert torch.equal(ids_keep[n], noise[n].argsort()[:K])
        assert torch.equal(x_masked[n], x[n, ids_keep[n]])


def test_num_kept_truncates():
    assert R.num_kept(196, 0.75) == 49
    assert R.num_kept(50, 0.75) == 12
    assert R.num_kept(10, 0.95) == 0


# ----------------------------------------------------------------------------- loss by hand
def _two_patch_image():
    # one image, one channel, 2x4 pixels, p = 2: patch A = [[1, 2], [3, 4]], patch B = 5 everywhere
    imgs = torch.tensor([[[[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 5.0, 5.0]]]], dtype=torch.float64)
    return imgs


def test_loss_raw_by_hand():
    imgs = _two_patch_image()
    pred = torch.zeros(1, 2, 4, dtype=torch.float64)
    loss = R.patch_loss(imgs, pred, torch.tensor([[1.0, 0.0]], dtype=torch.float64), 2)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4, abs=0)
    loss = R.patch_loss(imgs, pred, torch.tensor([[1.0, 1.0]], dtype=torch.float64), 2)
    assert loss.item() == pytest.approx(((1 + 4 + 9 + 16) / 4 + 25) / 2, abs=0)


def test_loss_norm_pix_by_hand():
    imgs = _two_patch_image()
    pred = torch.zeros(1, 2, 4, dtype=torch.float64)
    # patch A: mean 2.5, unbiased var 5/3; the normalised squares sum to 5/(5/3 + eps) over 4 values
    var, eps = 5.0 / 3.0, 1e-6
    loss_a = (2.25 + 0.25 + 0.25 + 2.25) / (var + eps) / 4  # sum of (t - mean)^2 is 5
    loss = R.patch_loss(imgs, pred, torch.tensor([[1.0, 0.0]], dtype=torch.float64), 2, norm_pix_loss=True)
    assert loss.item() == pytest.approx(loss_a, rel=1e-12)
    # patch B is constant: variance 0, the eps keeps it finite and its target is 0
    loss = R.patch_loss(imgs, pred, torch.tensor([[1.0, 1.0]], dtype=torch.float64), 2, norm_pix_loss=True)
    assert loss.item() == pytest.approx(loss_a / 2, rel=1e-12)


# ----------------------------------------------------------------------------- official layout
OFFICIAL = {  # factory: (patch, D, depth, heads)
    "mae_vit_base_patch16_dec512d8b": (16, 768, 12, 12),
    "mae_vit_large_patch16_dec512d8b": (16, 1024, 24, 16),
    "mae_vit_huge_patch14_dec512d8b": (14, 1280, 32, 16),
}


def _official_keys(p, D, depth, img=224, C=3, Dd=512, dec_depth=8):
    """The official state_dict keys and shapes, in order, written from the published layout."""
    L = (img // p) ** 2
    keys = [("cls_token", (1, 1, D)), ("pos_embed", (1, L + 1, D)), ("mask_token", (1, 1, Dd)),
            ("decoder_pos_embed", (1, L + 1, Dd)), ("patch_embed.proj.weight", (D, C, p, p)),
            ("patch_embed.proj.bias", (D,))]

    def block(prefix, d):
        return [(f"{prefix}.norm1.weight", (d,)), (f"{prefix}.norm1.bias", (d,)),
                (f"{prefix}.attn.qkv.weight", (3 * d, d)), (f"{prefix}.attn.qkv.bias", (3 * d,)),
                (f"{prefix}.attn.proj.weight", (d, d)), (f"{prefix}.attn.proj.bias", (d,)),
                (f"{prefix}.norm2.weight", (d,)), (f"{prefix}.norm2.bias", (d,)),
                (f"{prefix}.mlp.fc1.weight", (4 * d, d)), (f"{prefix}.mlp.fc1.bias", (4 * d,)),
                (f"{prefix}.mlp.fc2.weight", (d, 4 * d)), (f"{prefix}.mlp.fc2.bias", (d,))]

    for i in range(depth):
        keys += block(f"blocks.{i}", D)
    keys += [("norm.weight", (D,)), ("norm.bias", (D,)), ("decoder_embed.weight", (Dd, D)), ("decoder_embed.bias", (Dd,))]
    for i in range(dec_depth):
        keys += block(f"decoder_blocks.{i}", Dd)
    keys += [("decoder_norm.weight", (Dd,)), ("decoder_norm.bias", (Dd,)),
             ("decoder_pred.weight", (p * p * C, Dd)), ("decoder_pred.bias", (p * p * C,))]
    return keys


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_factory_state_dict_matches_official(name):
    p, D, depth, heads = OFFICIAL[name]
    with torch.device("meta"):
        model = R.create_model(name)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == _official_keys(p, D, depth)
    # parameter order (optimizer state lines up) and frozen position tables
    names = [n for n, _ in model.named_parameters()]
    assert names == [k for k, _ in _official_keys(p, D, depth)]
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.blocks[0].attn.num_heads == heads and model.decoder_blocks[0].attn.num_heads == 16
    assert model.norm.eps == 1e-6 and model.decoder_blocks[0].norm1.eps == 1e-6


def test_short_aliases():
    for short, full in [("mae_vit_base_patch16", "mae_vit_base_patch16_dec512d8b"),
                        ("mae_vit_large_patch16", "mae_vit_large_patch16_dec512d8b"),
                        ("mae_vit_huge_patch14", "mae_vit_huge_patch14_dec512d8b")]:
        with torch.device("meta"):
            a, b = R.create_model(short), R.create_model(full)
        assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    with pytest.raises(ValueError, match="unknown model"):
        R.create_model("mae_vit_giant")


def test_initialisation():
    torch.manual_seed(0)
    m = R.mae_vit_tiny_patch8()
    D = m.cls_token.shape[-1]
    table = torch.from_numpy(R.sincos_2d(D, m.patch_embed.grid_size, cls_token=True)).float()
    assert torch.equal(m.pos_embed[0], table)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            fan_in, fan_out = mod.weight.shape[1], mod.weight.shape[0]
            assert mod.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-7
            assert torch.all(mod.bias == 0)
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.5 * bound
    assert 0.01 < m.cls_token.std() < 0.04  # normal(std=0.02) over D = 192 values


# ----------------------------------------------------------------------------- model behaviour
def _tiny(**kw):
    return R.MaskedAutoencoderViT(img_size=kw.pop("img_size", 32), patch_size=kw.pop("patch_size", 8), embed_dim=32,
                                  depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                  norm_layer=R._LN, **kw)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_shapes_and_loss(norm_pix):
    torch.manual_seed(0)
    m = _tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    loss, pred, mask = m(imgs, 0.75, noise)
    assert pred.shape == (3, 16, 192) and mask.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))
    assert loss.item() == pytest.approx(R.patch_loss(imgs, pred, mask, 8, norm_pix).item(), rel=1e-6)
    # the same noise gives the same result; other noise another mask
    loss2, _, mask2 = m(imgs, 0.75, noise)
    assert torch.equal(loss, loss2) and torch.equal(mask, mask2)
    _, _, mask3 = m(imgs, 0.75, torch.rand(3, 16))
    assert not torch.equal(mask, mask3)
    loss.backward()
    assert m.cls_token.grad is not None and m.pos_embed.grad is None


def test_non_square_and_channels():
    m = _tiny(img_size=(24, 40), in_chans=1)
    loss, pred, mask = m(torch.randn(2, 1, 24, 40), 0.5)
    assert pred.shape == (2, 15, 64) and mask.shape == (2, 15) and torch.isfinite(loss)
    assert m.unpatchify(pred).shape == (2, 1, 24, 40)


def test_bad_inputs():
    m = _tiny()
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.randn(1, 3, 32, 32), 1.0)
    with pytest.raises(ValueError, match="imgs must have shape"):
        m(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="imgs must have shape"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        _tiny(img_size=30)
