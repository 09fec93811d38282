"""An MAE built the way the official ``models_mae.py`` builds it, against mae_fast.

``OfficialStructureMAE`` is written here from the published facts of the official model: timm's
``PatchEmbed`` and ``Block`` (``Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=...)``;
the official code also passes ``qk_scale=None``, which timm 1.0 no longer takes), fixed 2-D sin-cos
position tables, ``noise = torch.rand(N, L)`` masking with a double argsort, and its forward without a
``noise`` argument. patch_model, assert_same_mae_step and strict checkpoint loads run against it.

The file runs with any timm from 0.4 to 1.0 (``make test-compat`` runs it with timm 1.0, 0.9.16 and
0.4.12, whose Block layouts differ). ``MAE_FAST_EXPECT_TIMM`` makes the run check which timm it got.
"""
import copy
import os
import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Block, PatchEmbed  # noqa: E402  (the official imports)

import mae_fast.models as M  # noqa: E402
import mae_fast.nn as mnn  # noqa: E402
from mae_fast.models.mae import load_pretrained_encoder  # noqa: E402
from mae_fast.patching import fast_class, patch_model  # noqa: E402
from mae_fast.testing import assert_same_mae_step, rel_err  # noqa: E402

pytestmark = pytest.mark.compat


def _sincos_table(dim: int, grid: int) -> np.ndarray:
    """[1 + grid*grid, dim]: a zero cls row, then per token (row r, column c) the channels
    [sin(c w), cos(c w)] and then [sin(r w), cos(r w)], w_i = 10000^(-i / (dim/4)), i < dim/4."""
    w = 10000.0 ** (-np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    r, c = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)
    col, row = np.outer(c, w), np.outer(r, w)
    table = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)


class OfficialStructureMAE(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        for table in (self.pos_embed, self.decoder_pos_embed):
            table.data.copy_(torch.from_numpy(_sincos_table(table.shape[-1], grid)).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs):  # [N, C, H, W] -> [N, L, p*p*C], vector (p-row, p-col, channel)
        p = self.patch_embed.patch_size[0]
        N, C, H, W = imgs.shape
        x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, (H // p) * (W // p), p * p * C)

    def random_masking(self, x, mask_ratio):
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        N, L, D = x.shape[0], ids_restore.shape[1], x.shape[2]
        tokens = torch.cat([x[:, 1:], self.mask_token.repeat(N, L + 1 - x.shape[1], 1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, D))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


LN = partial(nn.LayerNorm, eps=1e-6)
SMALL = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=4, decoder_embed_dim=32,
             decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=LN)
BASE = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
            decoder_num_heads=16, mlp_ratio=4, norm_layer=LN)


def _official(seed=0, **kw):
    torch.manual_seed(seed)
    return OfficialStructureMAE(**dict(SMALL, **kw))


def _imgs(N=4, size=64, dtype=torch.float32):
    return torch.randn(N, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_the_expected_timm():
    expected = os.environ.get("MAE_FAST_EXPECT_TIMM")
    if expected is not None:
        assert timm.__version__ == expected


@pytest.mark.parametrize("norm_pix,ratio", [(True, 0.75), (False, 0.75), (True, 0.5)])
def test_patch_model_gives_the_official_step(norm_pix, ratio):
    official = _official(norm_pix_loss=norm_pix)
    patched = patch_model(copy.deepcopy(official))
    assert all(type(b) is mnn.Block for b in [*patched.blocks, *patched.decoder_blocks])
    assert type(patched.patch_embed) is mnn.PatchEmbed and isinstance(patched, OfficialStructureMAE)
    assert list(patched.state_dict()) == list(official.state_dict())
    assert_same_mae_step(official, patched, _imgs(), ratio, seed=5)


def test_official_noise_reproduces_an_official_run():
    """A seeded official run and the patched model with official_noise: the same masks, step after step."""
    official = _official()
    patched = patch_model(copy.deepcopy(official), official_noise=True)
    imgs = _imgs()
    torch.manual_seed(11)
    runs = [official(imgs, 0.75) for _ in range(3)]
    torch.manual_seed(11)
    for l_ref, _, m_ref in runs:
        loss, _, mask = patched(imgs, 0.75)
        assert torch.equal(mask, m_ref) and abs(loss.item() - l_ref.item()) <= 1e-5 * l_ref.item()


def test_float64_official_model():
    official = _official(norm_pix_loss=True).double()
    patched = patch_model(copy.deepcopy(official))
    assert_same_mae_step(official, patched, _imgs(dtype=torch.float64), 0.75, pred_tol=1e-12, loss_tol=1e-12,
                         grad_tol=1e-10)


def test_patched_official_model_pickles():
    model = patch_model(_official())
    imgs, noise = _imgs(), torch.rand(4, 16)
    loss = model(imgs, 0.75, noise)[0]
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is fast_class(OfficialStructureMAE)
        assert torch.equal(clone(imgs, 0.75, noise)[0], loss)


def test_checkpoints_load_strictly_both_ways():
    official = _official(norm_pix_loss=True)
    fast = M.MaskedAutoencoderViT(norm_pix_loss=True, **SMALL)
    fast.load_state_dict(official.state_dict(), strict=True)
    assert_same_mae_step(official, fast, _imgs(), 0.75, seed=2)
    torch.manual_seed(3)
    trained = M.MaskedAutoencoderViT(norm_pix_loss=True, **SMALL)
    official.load_state_dict(trained.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(official.state_dict().values(), trained.state_dict().values()))


def test_base_model_checkpoints_and_init_tables():
    """ViT-B/16: the official structure's state_dict loads strictly into models.mae_vit_base_patch16() and back,
    the fixed position tables agree, and an encoder-only checkpoint loads with load_pretrained_encoder."""
    official = _official(**BASE)
    ours = M.mae_vit_base_patch16()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in official.state_dict().items()]
    for name in ("pos_embed", "decoder_pos_embed"):
        assert torch.equal(getattr(ours, name), getattr(official, name)), name
    ours.load_state_dict(official.state_dict(), strict=True)
    x, noise = _imgs(N=1, size=224), torch.rand(1, 196)
    with torch.no_grad():
        latent, mask, _ = ours.forward_encoder(x, 0.75, noise)
        latent_ref, mask_ref, _ = patch_model(copy.deepcopy(official)).forward_encoder(x, 0.75, noise)
    assert torch.equal(mask, mask_ref) and rel_err(latent, latent_ref) < 1e-5
    fresh = M.mae_vit_base_patch16()
    official.load_state_dict(fresh.state_dict(), strict=True)  # and the other way
    assert torch.equal(official.blocks[11].mlp.fc2.weight, fresh.blocks[11].mlp.fc2.weight)
    encoder = {k: v for k, v in ours.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    left = load_pretrained_encoder(fresh, {"model": encoder})
    assert left and all(k.startswith(("decoder_", "mask_token")) for k in left)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in encoder.items())


def test_patch_model_keeps_stochastic_depth():
    """Training mode with drop_path: the swapped block draws the same per-sample masks (older timm holds one
    drop_path module for both branches, newer timm drop_path1/drop_path2)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[Block(48, 4, 4.0, qkv_bias=True, drop_path=0.5, norm_layer=LN) for _ in range(2)]).train()
    x = torch.randn(16, 5, 48)
    torch.manual_seed(1)
    before = blocks(x)
    patch_model(blocks)
    assert all(type(b) is mnn.Block for b in blocks)
    torch.manual_seed(1)
    after = blocks(x)
    assert rel_err(after, before) < 1e-5
    torch.manual_seed(2)
    assert rel_err(blocks(x), before) > 1e-2  # the draws matter: another seed, other samples dropped
