"""patch_model without timm: what is swapped or left, refusal before any change, pickling, the RNG,
official_noise and float64 (the reference model stands in for the official one here; the real timm
classes and an official-structure MAE are in tests/integrations)."""
import copy
import pickle

import pytest
import torch

import mae_fast.models as M
import mae_fast.nn as mnn
import mae_fast.reference as R
from mae_fast.patching import block_refusal, fast_class, patch_model
from mae_fast.testing import assert_same_mae_step, rel_err

CFG = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=16,
           decoder_depth=1, decoder_num_heads=2, norm_layer=R._LN)


class OfficialForward(R.MaskedAutoencoderViT):
    """The official forward signature (no noise): random_masking draws torch.rand(N, L) itself."""

    def forward(self, imgs, mask_ratio=0.75):
        return super().forward(imgs, mask_ratio)


def _mae(cls=R.MaskedAutoencoderViT, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**dict(CFG, **kw))


def _imgs(N=3, dtype=torch.float32):
    return torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


class Net(torch.nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = torch.nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


def test_only_exact_blocks_are_swapped_the_rest_left_as_is():
    class SubBlock(R.Block):  # a subclass may compute something else: left alone
        pass

    torch.manual_seed(0)
    hooked, extra = R.Block(16, 2, qkv_bias=True), R.Block(16, 2, qkv_bias=True)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    extra.register_parameter("gamma", torch.nn.Parameter(torch.ones(16)))
    plain, sub = R.Block(16, 2, qkv_bias=True), SubBlock(16, 2, qkv_bias=True)
    net = Net(plain, sub, hooked, extra)
    assert block_refusal(plain) is None
    assert "is not timm's ViT Block" in block_refusal(sub)
    assert "hooks" in block_refusal(hooked) and "own parameters" in block_refusal(extra)
    x = torch.randn(2, 5, 16)
    before = net(x)
    patch_model(net, attn_backend="math")
    assert isinstance(net.blocks[0], mnn.Block)
    assert [net.blocks[i] for i in (1, 2, 3)] == [sub, hooked, extra]  # the very same objects
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)


def test_nothing_swappable_is_an_error_and_changes_nothing():
    class OtherBlock(torch.nn.Module):  # named like a block, not timm's
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2, self.mlp = (torch.nn.LayerNorm(8), R.Attention(8, 2),
                                                           torch.nn.LayerNorm(8), torch.nn.Identity())

    Block = type("Block", (OtherBlock,), {})
    net = Net(Block())
    with pytest.raises(ValueError, match=r"no timm-style Block that can be swapped exactly \(blocks.0: .*Block is not"):
        patch_model(net)
    assert type(net.blocks[0]) is Block


def test_mae_with_another_patch_embed_is_refused_before_any_change():
    model = _mae()
    model.patch_embed.proj.stride = (4, 4)  # not a kernel = stride = patch convolution any more
    blocks = list(model.blocks)
    with pytest.raises(ValueError, match="kernel = stride = patch convolution"):
        patch_model(model)
    assert type(model) is R.MaskedAutoencoderViT and list(model.blocks) == blocks  # untouched
    model = _mae()
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, 18, 24))  # a second prefix token
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 18, 24\), not \(1, 17, 24\)"):
        patch_model(model)
    with pytest.raises(TypeError, match="official_noise must be"):
        patch_model(_mae(), official_noise="yes")
    with pytest.raises(ValueError, match="official_noise applies to MAE models"):
        patch_model(Net(R.Block(16, 2)), official_noise=True)


def test_patching_draws_no_random_numbers_and_keeps_parameters():
    model = _mae()
    params = list(model.parameters())
    state = torch.get_rng_state()
    patch_model(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(a is b for a, b in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    assert not any(p.is_meta for p in model.parameters())


def test_patched_model_pickles_and_deep_copies():
    model = patch_model(_mae(norm_pix_loss=True))
    imgs, noise = _imgs(), torch.rand(3, 16)
    loss = model(imgs, 0.75, noise)[0]
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is fast_class(R.MaskedAutoencoderViT) and isinstance(clone, R.MaskedAutoencoderViT)
        assert torch.equal(clone(imgs, 0.75, noise)[0], loss)
    assert pickle.loads(pickle.dumps(patch_model(_mae(), official_noise=True))).official_noise


def test_assert_same_mae_step_takes_an_official_forward_without_noise():
    ref = _mae(OfficialForward, norm_pix_loss=True)
    fast = patch_model(copy.deepcopy(ref))
    state = torch.get_rng_state()
    assert_same_mae_step(ref, fast, _imgs(), 0.75, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the helper restores the RNG
    with pytest.raises(ValueError, match="noise: ref .* has a forward without noise"):
        assert_same_mae_step(ref, fast, _imgs(), 0.75, torch.rand(3, 16))
    with pytest.raises(AssertionError, match="mask differs"):  # a fast model on other noise is caught
        assert_same_mae_step(ref, _ShiftedNoise(patch_model(copy.deepcopy(ref))), _imgs(), 0.75)


class _ShiftedNoise(torch.nn.Module):
    """A fast model given the wrong noise (1 - noise): assert_same_mae_step must fail on it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.patch_embed = inner.patch_embed

    def forward(self, imgs, mask_ratio, noise):
        return self.inner(imgs, mask_ratio, 1 - noise)


def test_official_noise_reproduces_the_official_masks():
    ref = _mae(OfficialForward)
    fast = patch_model(copy.deepcopy(ref), official_noise=True)
    engine = patch_model(copy.deepcopy(ref))
    imgs = _imgs()
    torch.manual_seed(7)
    official = [ref(imgs, 0.75) for _ in range(2)]  # two steps: the RNG stream stays aligned
    torch.manual_seed(7)
    ours = [fast(imgs, 0.75) for _ in range(2)]
    torch.manual_seed(7)
    train_loss = fast.forward_train(imgs, 0.75)
    for (l_ref, _, m_ref), (l_fast, _, m_fast) in zip(official, ours):
        assert torch.equal(m_fast, m_ref)
        assert abs(l_fast.item() - l_ref.item()) <= 1e-5 * l_ref.item()
    assert abs(train_loss.item() - official[0][0].item()) <= 1e-5 * official[0][0].item()
    assert not torch.equal(official[0][2], official[1][2])
    torch.manual_seed(7)
    assert not torch.equal(engine(imgs, 0.75)[2], official[0][2])  # the engine's own masks are other masks


@pytest.mark.parametrize("norm_pix", [True, False])
def test_float64_models_run_and_match(norm_pix):
    ref = _mae(OfficialForward, norm_pix_loss=norm_pix).double()
    fast = patch_model(copy.deepcopy(ref))
    imgs = _imgs(dtype=torch.float64)
    assert_same_mae_step(ref, fast, imgs, 0.75, pred_tol=1e-12, loss_tol=1e-12, grad_tol=1e-10)
    own = M.MaskedAutoencoderViT(**dict(CFG, norm_pix_loss=norm_pix)).double()
    own.load_state_dict(ref.state_dict(), strict=True)
    noise = torch.rand(3, 16)
    loss, pred, mask = own(imgs, 0.75, noise)
    assert loss.dtype == pred.dtype == torch.float64
    l_ref, p_ref, m_ref = R.MaskedAutoencoderViT.forward(ref, imgs, 0.75, noise)
    assert torch.equal(mask, m_ref) and rel_err(pred, p_ref) < 1e-12 and abs(loss.item() - l_ref.item()) < 1e-12
    assert abs(own.forward_train(imgs, 0.75, noise).item() - l_ref.item()) < 1e-12
    x = torch.randn(3, 16, 24, dtype=torch.float64)
    kept, m2, restore = own.random_masking(x, 0.75, noise)
    assert torch.equal(kept, R.random_masking(x, 0.75, noise)[0]) and torch.equal(m2, m_ref)


def test_float64_video_model_matches_the_reference():
    cfg = dict(CFG, num_frames=4, t_patch_size=2, tube_masking=True, norm_pix_loss=True)
    torch.manual_seed(0)
    ref = R.MaskedAutoencoderViT(**cfg).double()
    fast = M.MaskedAutoencoderViT(**cfg).double()
    fast.load_state_dict(ref.state_dict(), strict=True)
    clips = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16)  # tube masking: one spatial noise per clip
    assert_same_mae_step(ref, fast, clips, 0.75, noise, pred_tol=1e-12, loss_tol=1e-12, grad_tol=1e-10)
