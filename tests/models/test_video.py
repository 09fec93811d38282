"""Video MAE (space-time tubelets): the reference's layout, tube masking, and fast-vs-reference parity."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mae_fast.models as M
import mae_fast.reference as R
from mae_fast import ops
from mae_fast.testing import assert_same_mae_step, rel_err

# 4 frames of 32x24 in tubelets of 2 frames x 8x8 pixels: L = 2 slots * 4 * 3 = 24 tokens
VIDEO = dict(img_size=(32, 24), patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_frames=4, t_patch_size=2)


def _pair(tube=False, norm_pix=True, seed=0, **over):
    cfg = dict(VIDEO, **over)
    torch.manual_seed(seed)
    ref = R.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=norm_pix, tube_masking=tube, **cfg)
    fast = M.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=norm_pix, tube_masking=tube, **cfg)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _inputs(model, N=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pe = model.patch_embed
    clips = torch.randn(N, pe.in_chans, pe.num_frames, *pe.img_size, generator=gen)
    L = pe.num_patches // model.mask_frames  # tube masking draws one spatial noise per clip
    return clips, torch.rand(N, L, generator=gen)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_patchify_order_and_round_trip():
    N, C, T, H, W, u, p = 2, 3, 4, 16, 24, 2, 8
    v = torch.randn(N, C, T, H, W)
    x = R.patchify(v, p, u)  # [N, L, u*p*p*C]
    assert x.shape == (N, (T // u) * (H // p) * (W // p), u * p * p * C)
    # token (slot s, row r, col c), vector entry (frame f, pixel row i, pixel col j, channel ch)
    n, s, r, c, f, i, j, ch = 1, 1, 1, 2, 1, 3, 5, 2
    tok = (s * (H // p) + r) * (W // p) + c
    ent = ((f * p + i) * p + j) * C + ch
    assert x[n, tok, ent] == v[n, ch, s * u + f, r * p + i, c * p + j]
    assert torch.equal(R.unpatchify(x, p, (H, W), C, u, num_frames=T), v)
    # one frame per tubelet and T = 1 is the image patchify
    img = torch.randn(N, C, H, W)
    assert torch.equal(R.patchify(img.unsqueeze(2), p, 1), R.patchify(img, p))
    with pytest.raises(ValueError, match="t_patch_size=2 needs a video"):
        R.patchify(img, p, 2)


def test_sincos_3d_layout():
    D, t, h, w = 72, 3, 2, 4
    table = R.sincos_3d(D, (t, h, w), cls_token=True)
    assert table.shape == (1 + t * h * w, D) and not table[0].any()
    ds = 4 * (3 * D // 16)
    space, time = table[1:, :ds].reshape(t, h * w, ds), table[1:, ds:].reshape(t, h * w, D - ds)
    for s in range(t):
        np.testing.assert_array_equal(space[s], R.sincos_2d(ds, (h, w)))  # the image table in every slot
        assert (time[s] == time[s, :1]).all()  # one time code per slot
    assert len({tuple(time[s, 0]) for s in range(t)}) == t


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_tube_masking_reference_equals_engine(ratio):
    N, T, S = 4, 3, 20
    noise = torch.rand(N, S, generator=torch.Generator().manual_seed(2))
    x = torch.randn(N, T * S, 5)
    x_masked, mask, ids_restore, ids_keep = R.random_masking(x, ratio, noise, frames=T)
    eng = ops.random_masking(N, T * S, ratio, noise=noise, frames=T)
    assert torch.equal(ids_keep, eng.ids_keep) and torch.equal(ids_restore, eng.ids_restore)
    assert torch.equal(mask, eng.mask)
    # one spatial mask repeated over the slots
    m = mask.reshape(N, T, S)
    assert (m == m[:, :1]).all() and int(m[0, 0].sum()) == S - int(S * (1 - ratio))
    assert torch.equal(x_masked, torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, 5)))


@pytest.mark.parametrize("tube,ratio,norm_pix", [(False, 0.75, True), (False, 0.9, False), (True, 0.75, True),
                                                 (True, 0.5, False)])
def test_video_parity_fp32(tube, ratio, norm_pix):
    ref, fast = _pair(tube, norm_pix)
    clips, noise = _inputs(ref)
    assert fast(clips, ratio, noise)[1].shape == (3, ref.patch_embed.num_patches, 2 * 8 * 8 * 3)
    g_ref = assert_same_mae_step(ref, fast, clips, ratio, noise)
    l_ref = ref(clips, ratio, noise)[0]
    # the training path (head on removed tokens only): same loss and gradients
    fast.zero_grad()
    l_train = fast.forward_train(clips, ratio, noise)
    l_train.backward()
    assert abs(l_train.item() - l_ref.item()) <= 1e-5 * abs(l_ref.item())
    for k, g in _grads(fast).items():
        assert rel_err(g, g_ref[k]) < 1e-4, k


def test_video_one_frame_tubelets_and_bf16_autocast():
    """t_patch_size=1 over 3 frames (a Conv3d of depth 1), under bf16 autocast."""
    ref, fast = _pair(num_frames=3, t_patch_size=1)
    clips, noise = _inputs(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l_ref = ref(clips, 0.75, noise)[0]
        l_fast = fast.forward_train(clips, 0.75, noise)
    assert abs(l_fast.item() - l_ref.item()) <= 2e-2 * abs(l_ref.item())


def test_video_visible_embedding_is_conv3d_then_gather():
    _, fast = _pair()
    clips, _ = _inputs(fast)
    m = ops.random_masking(3, fast.patch_embed.num_patches, 0.75, generator=torch.Generator().manual_seed(3))
    every = fast.patch_embed(clips)  # [N, L, D]
    D = every.shape[-1]
    expected = torch.gather(every, 1, m.ids_keep[:, :, None].expand(-1, -1, D))
    assert rel_err(fast.patch_embed.forward_visible(clips, m.ids_keep), expected) < 1e-6


def test_video_layout_and_bad_inputs():
    ref, fast = _pair(tube=True)
    assert ref.patch_embed.proj.weight.shape == (48, 3, 2, 8, 8)
    assert [(k, v.shape) for k, v in ref.state_dict().items()] == [(k, v.shape) for k, v in fast.state_dict().items()]
    assert fast.decoder_pred.out_features == 2 * 8 * 8 * 3 and fast.mask_frames == 2
    clips, noise = _inputs(fast)
    with pytest.raises(ValueError, match=r"imgs must have shape \[N, 3, 4, 32, 24\]"):
        fast(clips[:, :, 0])  # a 4-D image into a video model
    with pytest.raises(ValueError, match=r"imgs must have shape"):
        fast(clips[:, :, :2])  # too few frames
    with pytest.raises(ValueError, match="noise"):
        fast(clips, 0.75, torch.rand(3, fast.patch_embed.num_patches))  # tube masking takes [N, L/T'] noise
    with pytest.raises(ValueError, match="tube_masking needs a video model"):
        M.MaskedAutoencoderViT(**dict(VIDEO, num_frames=1, t_patch_size=1), tube_masking=True)
    with pytest.raises(ValueError, match="positive multiple of t_patch_size"):
        M.MaskedAutoencoderViT(**dict(VIDEO, num_frames=3, t_patch_size=2))


def test_video_compile_fullgraph_traces():
    """torch.compile(fullgraph=True) traces the video training path (aot_eager: no C++ build here).

    In a subprocess without TRITON_INTERPRET: the interpreter does not mix with tracing."""
    code = r"""
import torch, mae_fast.models as M, mae_fast.reference as R
torch.manual_seed(0)
cfg = dict(img_size=(32, 24), patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=4, decoder_embed_dim=32,
           decoder_depth=1, decoder_num_heads=4, num_frames=4, t_patch_size=2)
fast = M.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=True, tube_masking=True, **cfg)
clips, noise = torch.randn(3, 3, 4, 32, 24), torch.rand(3, 12)
eager = fast.forward_train(clips, 0.75, noise)
compiled = torch.compile(fast.forward_train, fullgraph=True, backend="aot_eager")(clips, 0.75, noise)
torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
compiled.backward()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
