"""Tests of gather_tokens, gather_patches, unshuffle_tokens: forward and every gradient against float64
references written the way the official MAE writes them (index-repeat gather, unfold for patches,
explicit slicing for video tubelets, cat + gather + add for the decoder input), on odd and real shapes,
fp32 and bf16; the Triton path under TRITON_INTERPRET=1; torch.compile; bad inputs. GPU-marked tests run
real sizes on CUDA.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_fast.ops import tokens as T
from mae_fast.ops._common import use_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------- helpers
def make_ids(N, L, K, idtype=torch.int64, device="cpu", seed=0):
    """(ids_keep [N, K], ids_restore [N, L]) as the official random_masking makes them."""
    g = torch.Generator().manual_seed(seed)
    ids_shuffle = torch.rand(N, L, generator=g).argsort(1)  # [N, L]
    ids_restore = ids_shuffle.argsort(1)  # [N, L]
    return ids_shuffle[:, :K].to(idtype).to(device), ids_restore.to(idtype).to(device)


def rnd(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def close(out, exact, same, dtype, name):
    """|out - exact| <= 2 |torch same dtype - exact| + rtol |exact| + atol, elementwise.

    rtol is one ulp of the dtype: the Triton interpreter rounds fp32 -> bf16/fp16 by truncation (the GPU
    rounds to nearest even), so a kernel result may be one ulp off where torch's rounding is exact; for
    fp32 the last term allows the fp32 summation error of the reductions over a few hundred rows
    (summed in another order than torch's), relative to the largest value.
    """
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    o, e, s = (t.detach().double().cpu() for t in (out, exact, same))
    assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(o).all(), f"{name}: non-finite"
    bad = (o - e).abs() > 2 * (s - e).abs() + rtol * e.abs() + 1e-6 * (1 + e.abs().max())
    assert not bad.any(), f"{name}: {int(bad.sum())}/{o.numel()} elements off, max err {(o - e).abs().max():.3g}"


def ref_gather_tokens(x, ids_keep, pos_embed=None, prefix=None):
    """The reference: pos added to all tokens, index repeated D times, cat of the prefix."""
    N, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed  # [N, L, D]
    out = torch.gather(x, 1, ids_keep.long().unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    if prefix is not None:
        out = torch.cat([prefix.expand(N, -1, -1), out], dim=1)  # [N, P+K, D]
    return out


def ref_unshuffle(x, ids_restore, mask_token, pos_embed=None, P=1):
    N, T_in, D = x.shape
    L = ids_restore.shape[1]
    mt = mask_token.reshape(1, 1, D).repeat(N, L + P - T_in, 1)  # [N, L-K, D]
    x_ = torch.cat([x[:, P:], mt], dim=1)  # [N, L, D]
    x_ = torch.gather(x_, 1, ids_restore.long().unsqueeze(-1).repeat(1, 1, D))  # [N, L, D]
    out = torch.cat([x[:, :P], x_], dim=1)  # [N, P+L, D]
    return out if pos_embed is None else out + pos_embed


def ref_gather_patches(imgs, ids_keep, p):
    cols = F.unfold(imgs, kernel_size=p, stride=p)  # [N, C*p*p, L] in (C, p, p) order
    x = cols.transpose(1, 2)  # [N, L, C*p*p]
    return torch.gather(x, 1, ids_keep.long().unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def ref_gather_patches_video(imgs, ids_keep, p, u):
    """Video oracle by explicit slicing: token l = (s, r, c) -> imgs[:, :, s*u:(s+1)*u, r*p:(r+1)*p,
    c*p:(c+1)*p] flattened in (C, u, p, p) order; then the index-repeat gather."""
    N, C, T, H, W = imgs.shape
    h, w = H // p, W // p
    rows = []
    for s in range(T // u):
        for r in range(h):
            for c in range(w):
                tube = imgs[:, :, s * u:(s + 1) * u, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [N, C, u, p, p]
                rows.append(tube.reshape(N, -1))  # [N, C*u*p*p]
    x = torch.stack(rows, dim=1)  # [N, L, C*u*p*p]
    return torch.gather(x, 1, ids_keep.long().unsqueeze(-1).repeat(1, 1, x.shape[-1]))  # [N, K, C*u*p*p]


def grads(fn, inputs, g):
    """Run fn(*inputs) with grad on the float inputs, backward with g; -> (out, [grads])."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out, [t.grad if (t is not None and t.is_floating_point()) else None for t in leaves]


def compare_all(fn, ref, inputs, g, dtype, name):
    out, gr = grads(fn, inputs, g)
    ex, gex = grads(ref, [t.double() if t is not None and t.is_floating_point() else t for t in inputs], g.double())
    sm, gsm = grads(ref, inputs, g)
    close(out, ex, sm, dtype, f"{name} out")
    for i, (a, b, c) in enumerate(zip(gr, gex, gsm)):
        if b is None:
            continue
        assert a is not None, f"{name}: missing grad of input {i}"
        assert a.dtype == inputs[i].dtype, f"{name}: grad {i} dtype {a.dtype}"
        close(a, b, c, dtype, f"{name} grad[{i}]")


# ----------------------------------------------------------------------------------- gather_tokens
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_gather_tokens_copy_exact(dtype, idtype):
    N, L, K, D = 3, 50, 12, 72
    x = rnd(N, L, D, dtype=dtype)
    ids, _ = make_ids(N, L, K, idtype)
    out = T.gather_tokens(x, ids)
    assert out.shape == (N, K, D) and out.dtype == dtype
    assert torch.equal(out, ref_gather_tokens(x, ids))
    pre = rnd(1, 2, D, dtype=dtype, seed=1)
    out = T.gather_tokens(x, ids, prefix=pre)
    assert torch.equal(out, ref_gather_tokens(x, ids, prefix=pre))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (N, L, K, D, P); (19, 6, 2, 1024, 1) splits N into 5 chunks in the backward (partial sums); D=300 has a
# partial second column block
@pytest.mark.parametrize("shape", [(3, 50, 12, 72, 1), (2, 196, 49, 1024, 1), (2, 49, 12, 40, 0), (1, 7, 7, 3, 2),
                                   (19, 6, 2, 1024, 1), (2, 9, 3, 300, 1)])
def test_gather_tokens_grads(dtype, shape):
    N, L, K, D, P = shape
    x = rnd(N, L, D, dtype=dtype)
    pos = rnd(1, L, D, dtype=dtype, seed=1)
    pre = rnd(1, P, D, dtype=dtype, seed=2) if P else None
    ids, _ = make_ids(N, L, K, torch.int32 if D % 2 else torch.int64, seed=3)
    g = rnd(N, P + K, D, dtype=dtype, seed=4)

    def fn(x, ids, pos, pre):
        return T.gather_tokens(x, ids, pos, pre)

    compare_all(fn, ref_gather_tokens, [x, ids, pos, pre], g, dtype, "gather_tokens")


def test_gather_tokens_partial_grads_and_strided():
    """Only some inputs need grad; strided x, ids and grad are read in place."""
    N, L, K, D = 3, 50, 12, 72
    base = rnd(D, N, 2 * L)
    x = base.permute(1, 2, 0)[:, ::2]  # [N, L, D], strided
    ids_full, _ = make_ids(N, L, 2 * K, seed=5)
    ids = ids_full[:, ::2]  # [N, K], strided
    pos = rnd(1, L, D, seed=6)
    pre = rnd(1, 1, D, seed=7).requires_grad_(True)
    out = T.gather_tokens(x, ids, pos, pre)  # x and pos need no grad
    assert torch.equal(out, ref_gather_tokens(x, ids, pos, pre).detach())
    g = rnd(D, N, 1 + K, seed=8).permute(1, 2, 0)  # [N, 1+K, D], strided grad
    out.backward(g)
    assert torch.allclose(pre.grad, g[:, :1].sum(0, keepdim=True), atol=1e-5)


def test_backward_splits_n():
    """The shapes above really take the split-N backward (otherwise the partial sums go untested)."""
    from mae_fast.kernels import gather_tokens as kg
    assert kg.bwd_blocks(19, 7, 1024)[2] > 1


# ----------------------------------------------------------------------------------- unshuffle_tokens
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_unshuffle_copy_exact(dtype, idtype):
    N, L, K, D = 3, 50, 12, 72
    x = rnd(N, 1 + K, D, dtype=dtype)
    mt = rnd(1, 1, D, dtype=dtype, seed=1)
    _, ids_restore = make_ids(N, L, K, idtype)
    out = T.unshuffle_tokens(x, ids_restore, mt)
    assert out.shape == (N, 1 + L, D) and out.dtype == dtype
    assert torch.equal(out, ref_unshuffle(x, ids_restore, mt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 50, 12, 72, 1), (2, 196, 49, 512, 1), (2, 49, 12, 40, 0), (4, 9, 0, 8, 2),
                                   (19, 6, 2, 1024, 1), (2, 9, 3, 300, 1)])
def test_unshuffle_grads(dtype, shape):
    N, L, K, D, P = shape
    x = rnd(N, P + K, D, dtype=dtype)
    mt = rnd(1, 1, D, dtype=dtype, seed=1)
    pos = rnd(1, P + L, D, dtype=dtype, seed=2)
    _, ids_restore = make_ids(N, L, K, torch.int32 if D % 2 else torch.int64, seed=3)
    g = rnd(N, P + L, D, dtype=dtype, seed=4)

    def fn(x, ids, mt, pos):
        return T.unshuffle_tokens(x, ids, mt, pos, num_prefix=P)

    def ref(x, ids, mt, pos):
        return ref_unshuffle(x, ids, mt, pos, P)

    compare_all(fn, ref, [x, ids_restore, mt, pos], g, dtype, "unshuffle_tokens")


def test_unshuffle_mixed_dtypes_and_1d_mask_token():
    """bf16 x with fp32 parameters (autocast style): output bf16, grads in each parameter's dtype."""
    N, L, K, D = 3, 50, 12, 72
    x = rnd(N, 1 + K, D, dtype=torch.bfloat16).requires_grad_(True)
    mt = rnd(D, seed=1).requires_grad_(True)
    pos = rnd(1, 1 + L, D, seed=2).requires_grad_(True)
    _, ids_restore = make_ids(N, L, K)
    out = T.unshuffle_tokens(x, ids_restore, mt, pos)
    assert out.dtype == torch.bfloat16
    exact = ref_unshuffle(x.double(), ids_restore, mt.double(), pos.double())
    close(out, exact, exact.to(torch.bfloat16), torch.bfloat16, "mixed out")
    g = rnd(N, 1 + L, D, dtype=torch.bfloat16, seed=3)
    out.backward(g)
    assert mt.grad.shape == (D,) and mt.grad.dtype == torch.float32
    assert pos.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    removed = (ids_restore >= K).unsqueeze(-1)  # [N, L, 1]
    assert torch.allclose(mt.grad.double(), (g[:, 1:].double() * removed).sum((0, 1)), atol=1e-5)
    assert torch.allclose(pos.grad.double(), g.double().sum(0, keepdim=True), atol=1e-5)


def test_unshuffle_only_mask_token_grad():
    N, L, K, D = 3, 50, 12, 72
    x = rnd(N, 1 + K, D)
    mt = rnd(1, 1, D, seed=1).requires_grad_(True)
    _, ids_restore = make_ids(N, L, K)
    g = rnd(N, 1 + L, D, seed=2)
    T.unshuffle_tokens(x, ids_restore, mt, rnd(1, 1 + L, D, seed=3)).backward(g)
    removed = (ids_restore >= K).unsqueeze(-1)  # [N, L, 1]
    assert torch.allclose(mt.grad[0, 0].double(), (g[:, 1:].double() * removed).sum((0, 1)), atol=1e-5)


def test_round_trip_gather_then_unshuffle():
    """unshuffle(gather(x)) puts every kept token back in place and the mask token everywhere else."""
    N, L, K, D = 4, 50, 13, 24
    x = rnd(N, L, D)
    pre = rnd(1, 1, D, seed=1)
    mt = rnd(1, 1, D, seed=2)
    ids_keep, ids_restore = make_ids(N, L, K, seed=9)
    out = T.unshuffle_tokens(T.gather_tokens(x, ids_keep, prefix=pre), ids_restore, mt)  # [N, 1+L, D]
    kept = (ids_restore < K).unsqueeze(-1)  # [N, L, 1]
    assert torch.equal(out[:, 1:], torch.where(kept, x, mt.expand(N, L, D)))
    assert torch.equal(out[:, 0], pre[0, 0].expand(N, D))


@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 4), L=st.integers(1, 20), kf=st.floats(0, 1), D=st.integers(1, 40), P=st.integers(0, 2),
       i32=st.booleans(), seed=st.integers(0, 1000))
def test_round_trip_property(N, L, kf, D, P, i32, seed):
    """Any shape: gather equals the reference exactly; unshuffle(gather(x)) restores the kept tokens."""
    K = int(kf * L)
    x = rnd(N, L, D, seed=seed)
    pre = rnd(1, P, D, seed=seed + 1) if P else None
    mt = rnd(1, 1, D, seed=seed + 2)
    ids_keep, ids_restore = make_ids(N, L, K, torch.int32 if i32 else torch.int64, seed=seed)
    y = T.gather_tokens(x, ids_keep, prefix=pre)  # [N, P+K, D]
    assert torch.equal(y, ref_gather_tokens(x, ids_keep, prefix=pre))
    out = T.unshuffle_tokens(y, ids_restore, mt, num_prefix=P)  # [N, P+L, D]
    kept = (ids_restore < K).unsqueeze(-1)  # [N, L, 1]
    assert torch.equal(out[:, P:], torch.where(kept, x, mt.expand(N, L, D)))


# ----------------------------------------------------------------------------------- gather_patches
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [(3, 3, 24, 40, 8, 5), (2, 3, 32, 32, 16, 1), (2, 1, 14, 28, 7, 8),
                                 (2, 3, 28, 28, 14, 1)])
def test_gather_patches_exact_and_grad(dtype, cfg):
    N, C, H, W, p, K = cfg
    L = (H // p) * (W // p)
    imgs = rnd(N, C, H, W, dtype=dtype)
    ids, _ = make_ids(N, L, K, torch.int32 if N == 3 else torch.int64, seed=1)
    out = T.gather_patches(imgs, ids, p)
    assert out.shape == (N, K, C * p * p) and out.dtype == dtype
    assert torch.equal(out, ref_gather_patches(imgs, ids, p))
    g = rnd(N, K, C * p * p, dtype=dtype, seed=2)
    compare_all(lambda a, b: T.gather_patches(a, b, p), lambda a, b: ref_gather_patches(a, b, p),
                [imgs, ids], g, dtype, "gather_patches")


def test_gather_patches_is_visible_patch_embedding():
    """F.linear on the gathered patches == Conv2d patch embedding of all patches, then the gather."""
    N, C, H, W, p, D, K = 2, 3, 32, 48, 8, 40, 6
    L = (H // p) * (W // p)
    imgs = rnd(N, C, H, W).double()
    proj = torch.nn.Conv2d(C, D, p, stride=p).double()
    ids, _ = make_ids(N, L, K, seed=4)
    full = proj(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
    want = torch.gather(full, 1, ids.unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    got = F.linear(T.gather_patches(imgs.float(), ids, p).double(), proj.weight.flatten(1), proj.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_gather_patches_strided_imgs():
    N, C, H, W, p, K = 2, 3, 16, 24, 4, 7
    imgs = rnd(N, H, W, C).permute(0, 3, 1, 2)  # channels-last storage
    ids, _ = make_ids(N, (H // p) * (W // p), K, seed=2)
    assert torch.equal(T.gather_patches(imgs, ids, p), ref_gather_patches(imgs.contiguous(), ids, p))


# (N, C, T, H, W, p, u, K): u = 2 with a non-square frame; u = 1 with an odd T; C = 1; one tubelet in time
VIDEO_CFGS = [(2, 3, 4, 16, 24, 8, 2, 5), (3, 3, 3, 16, 8, 8, 1, 4), (2, 1, 4, 8, 8, 4, 2, 3),
              (2, 2, 2, 8, 12, 4, 2, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", VIDEO_CFGS)
def test_gather_patches_video_exact_and_grad(dtype, cfg):
    N, C, T_, H, W, p, u, K = cfg
    L = (T_ // u) * (H // p) * (W // p)
    vid = rnd(N, C, T_, H, W, dtype=dtype)
    ids, _ = make_ids(N, L, K, torch.int32 if N == 3 else torch.int64, seed=1)
    out = T.gather_patches(vid, ids, p, t_patch_size=u)
    assert out.shape == (N, K, C * u * p * p) and out.dtype == dtype
    assert torch.equal(out, ref_gather_patches_video(vid, ids, p, u))
    g = rnd(N, K, C * u * p * p, dtype=dtype, seed=2)

    def fn(a, b):
        return T.gather_patches(a, b, p, t_patch_size=u)

    def ref(a, b):
        return ref_gather_patches_video(a, b, p, u)

    compare_all(fn, ref, [vid, ids], g, dtype, "gather_patches video")
    # grad_imgs: the gradient rows at the kept tubelets, zeros at the removed ones (written once, no sum)
    leaf = vid.clone().requires_grad_(True)
    T.gather_patches(leaf, ids, p, t_patch_size=u).backward(g)
    kept = torch.zeros(N, L, dtype=torch.bool).scatter_(1, ids.long(), True)  # [N, L]
    tokens = T._gather_patches_torch(leaf.grad, torch.arange(L).expand(N, L), p, u)  # [N, L, C*u*p*p]
    assert (tokens[~kept] == 0).all()


def test_gather_patches_video_is_conv3d_embedding():
    """F.linear on the gathered tubelets == Conv3d embedding of all tokens (flattened (s, r, c)), then the
    gather: the visible-only embedding identity of a video MAE."""
    N, C, T_, H, W, p, u, D, K = 2, 3, 4, 16, 24, 8, 2, 40, 5
    L = (T_ // u) * (H // p) * (W // p)
    vid = rnd(N, C, T_, H, W).double()
    proj = torch.nn.Conv3d(C, D, kernel_size=(u, p, p), stride=(u, p, p)).double()
    ids, _ = make_ids(N, L, K, seed=4)
    full = proj(vid).flatten(2).transpose(1, 2)  # [N, L, D]
    want = torch.gather(full, 1, ids.unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    got = F.linear(T.gather_patches(vid.float(), ids, p, t_patch_size=u).double(), proj.weight.flatten(1), proj.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_gather_patches_image_is_one_frame_video():
    """A 4-D image and the same image as a one-frame video ([N, C, 1, H, W], u = 1): identical outputs and
    gradients (bit for bit)."""
    N, C, H, W, p, K = 2, 3, 16, 24, 8, 4
    imgs = rnd(N, C, H, W)
    ids, _ = make_ids(N, (H // p) * (W // p), K, seed=5)
    g = rnd(N, K, C * p * p, seed=6)
    a = imgs.clone().requires_grad_(True)
    b = imgs.clone()[:, :, None].requires_grad_(True)
    out_a = T.gather_patches(a, ids, p)
    out_b = T.gather_patches(b, ids, p, t_patch_size=1)
    assert torch.equal(out_a, out_b)
    out_a.backward(g)
    out_b.backward(g)
    assert a.grad.shape == (N, C, H, W) and b.grad.shape == (N, C, 1, H, W)
    assert torch.equal(a.grad, b.grad[:, :, 0])


def test_gather_patches_video_strided():
    """channels-last-3d and a time-sliced video are read in place (no copy) with their strides."""
    N, C, T_, H, W, p, u, K = 2, 3, 4, 8, 12, 4, 2, 5
    L = (T_ // u) * (H // p) * (W // p)
    ids, _ = make_ids(N, L, K, seed=7)
    vid = rnd(N, C, T_, H, W).to(memory_format=torch.channels_last_3d)
    assert torch.equal(T.gather_patches(vid, ids, p, t_patch_size=u),
                       ref_gather_patches_video(vid.contiguous(), ids, p, u))
    sliced = rnd(N, C, 2 * T_, H, W, seed=8)[:, :, ::2]  # time stride 2 * H * W
    assert torch.equal(T.gather_patches(sliced, ids, p, t_patch_size=u),
                       ref_gather_patches_video(sliced.contiguous(), ids, p, u))


# ----------------------------------------------------------------------------------- Triton path really runs
_TORCH_PATHS = ["_gather_tokens_torch", "_gather_tokens_bwd_torch", "_unshuffle_torch", "_unshuffle_bwd_torch",
                "_gather_patches_torch", "_gather_patches_bwd_torch"]


@pytest.fixture
def triton_only(monkeypatch):
    """Under the interpreter, make every torch path raise: the ops must run the Triton kernels."""
    if not INTERPRET:
        pytest.skip("the Triton path runs on CPU only under TRITON_INTERPRET=1")

    def boom(*a, **k):
        raise AssertionError("torch path used where the Triton kernels must run")

    for name in _TORCH_PATHS:
        monkeypatch.setattr(T, name, boom)


@pytest.mark.parametrize("cfg", [VIDEO_CFGS[0], VIDEO_CFGS[1]])
def test_interpreter_runs_triton_path_video(triton_only, cfg):
    N, C, T_, H, W, p, u, K = cfg
    L = (T_ // u) * (H // p) * (W // p)
    vid = rnd(N, C, T_, H, W, seed=9)
    ids, _ = make_ids(N, L, K, seed=10)
    g = rnd(N, K, C * u * p * p, seed=11)
    leaf = vid.clone().requires_grad_(True)
    out = T.gather_patches(leaf, ids, p, t_patch_size=u)
    out.backward(g)
    ref_leaf = vid.double().requires_grad_(True)
    ref_gather_patches_video(ref_leaf, ids, p, u).backward(g.double())
    assert torch.equal(out.double(), ref_gather_patches_video(vid.double(), ids, p, u))
    assert torch.equal(leaf.grad.double(), ref_leaf.grad)



@pytest.mark.skipif(not INTERPRET, reason="the Triton path runs on CPU only under TRITON_INTERPRET=1")
def test_interpreter_runs_triton_path(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch path used where the Triton kernels must run")

    for name in ["_gather_tokens_torch", "_gather_tokens_bwd_torch", "_unshuffle_torch", "_unshuffle_bwd_torch",
                 "_gather_patches_torch", "_gather_patches_bwd_torch"]:
        monkeypatch.setattr(T, name, boom)
    assert use_triton(torch.empty(1))
    N, L, K, D = 2, 16, 4, 8
    x = rnd(N, L, D).requires_grad_(True)
    pos = rnd(1, L, D, seed=1).requires_grad_(True)
    pre = rnd(1, 1, D, seed=2).requires_grad_(True)
    mt = rnd(1, 1, D, seed=3).requires_grad_(True)
    ids_keep, ids_restore = make_ids(N, L, K)
    y = T.gather_tokens(x, ids_keep, pos, pre)
    z = T.unshuffle_tokens(y, ids_restore, mt, torch.zeros(1, 1 + L, D, requires_grad=True))
    imgs = rnd(N, 2, 8, 8, seed=4).requires_grad_(True)
    w = T.gather_patches(imgs, ids_keep, 2)
    (z.square().sum() + w.square().sum()).backward()
    assert x.grad is not None and mt.grad is not None and imgs.grad is not None


# ----------------------------------------------------------------------------------- compile
def _all_ops_fn():
    def fn(x, ids_keep, ids_restore, pos, pre, mt, dpos, imgs, vid):
        y = T.gather_tokens(x, ids_keep, pos, pre)  # [N, 1+K, D]
        z = T.unshuffle_tokens(y * 2, ids_restore, mt, dpos)  # [N, 1+L, D]
        w = T.gather_patches(imgs, ids_keep, 4)  # [N, K, C*p*p]
        v = T.gather_patches(vid, ids_keep, 4, t_patch_size=2)  # [N, K, C*u*p*p]
        return z.square().sum() + w.sin().sum() + v.cos().sum()
    return fn


def _compile_check(device):
    N, L, K, D = 3, 16, 5, 24
    ids_keep, ids_restore = make_ids(N, L, K, device=device)
    inputs = [rnd(N, L, D), ids_keep, ids_restore, rnd(1, L, D, seed=1), rnd(1, 1, D, seed=2),
              rnd(1, 1, D, seed=3), rnd(1, 1 + L, D, seed=4), rnd(N, 2, 16, 16, seed=5),
              rnd(N, 2, 4, 8, 16, seed=6)]  # video: T' * h * w = 2 * 2 * 4 = L tubelets
    inputs = [t.to(device) for t in inputs]
    fn = _all_ops_fn()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        loss = f(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves if t.is_floating_point()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_cpu_subprocess():
    """torch.compile(fullgraph=True), forward and backward, of all three ops (gather_patches on an image and
    on a video) on CPU (torch path; run in a subprocess without TRITON_INTERPRET, which does not mix with
    compile)."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        import test_tokens as tt
        tt._compile_check("cpu")
        print("COMPILE_OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "COMPILE_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.gpu
def test_compile_fullgraph_cuda():
    _compile_check("cuda")


# ----------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    N, L, K, D = 2, 10, 3, 8
    x = rnd(N, L, D)
    ids_keep, ids_restore = make_ids(N, L, K)
    with pytest.raises(ValueError, match="x must have 3 dims"):
        T.gather_tokens(x[0], ids_keep)
    with pytest.raises(TypeError, match="ids_keep must have dtype"):
        T.gather_tokens(x, ids_keep.float())
    with pytest.raises(ValueError, match="ids_keep must be on"):
        T.gather_tokens(x, ids_keep.to("meta"))
    with pytest.raises(ValueError, match="ids_keep must have shape"):
        T.gather_tokens(x, ids_keep[:1])
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        T.gather_tokens(x, ids_keep, pos_embed=rnd(1, L + 1, D))
    with pytest.raises(ValueError, match="prefix must have shape"):
        T.gather_tokens(x, ids_keep, prefix=rnd(1, 1, D + 1))
    with pytest.raises(ValueError, match="outside"):
        T.gather_tokens(x, ids_keep + L, check_indices=True)
    dup = ids_keep.clone()
    dup[:, 1] = dup[:, 0]
    with pytest.raises(ValueError, match="distinct"):
        T.gather_tokens(x, dup, check_indices=True)
    y = rnd(N, 1 + K, D)
    with pytest.raises(ValueError, match="mask_token must have shape"):
        T.unshuffle_tokens(y, ids_restore, rnd(1, 1, D + 1))
    with pytest.raises(TypeError, match="mask_token must be a torch.Tensor"):
        T.unshuffle_tokens(y, ids_restore, None)
    with pytest.raises(TypeError, match="ids_restore must have dtype"):
        T.unshuffle_tokens(y, ids_restore.to(torch.int16), rnd(1, 1, D))
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        T.unshuffle_tokens(y, ids_restore, rnd(1, 1, D), rnd(1, L, D))
    with pytest.raises(ValueError, match="ids_restore has only"):
        T.unshuffle_tokens(rnd(N, L + 2, D), ids_restore, rnd(1, 1, D))
    with pytest.raises(ValueError, match="num_prefix"):
        T.unshuffle_tokens(y, ids_restore, rnd(1, 1, D), num_prefix=-1)
    bad = ids_restore.clone()
    bad[:, 0] = bad[:, 1]
    with pytest.raises(ValueError, match="permutations"):
        T.unshuffle_tokens(y, bad, rnd(1, 1, D), check_indices=True)
    imgs = rnd(N, 3, 16, 16)
    with pytest.raises(ValueError, match="positive multiples of patch_size=5"):
        T.gather_patches(imgs, ids_keep, 5)
    with pytest.raises(TypeError, match="patch_size"):
        T.gather_patches(imgs, ids_keep, 4.0)
    with pytest.raises(ValueError, match="imgs must have 4 dims"):
        T.gather_patches(imgs[0], ids_keep, 4)
    with pytest.raises(ValueError, match="outside"):
        T.gather_patches(imgs, ids_keep + 16, 4, check_indices=True)
    vid = rnd(N, 3, 4, 8, 8)  # L = 2 * 2 * 2 = 8 tubelets at u = 2, p = 4
    with pytest.raises(ValueError, match=r"imgs must have 4 dims \(\[N, C, H, W\]\) or 5 dims"):
        T.gather_patches(vid[None], ids_keep, 4)
    with pytest.raises(ValueError, match="t_patch_size must be 1 for 4-D imgs"):
        T.gather_patches(imgs, ids_keep, 4, t_patch_size=2)
    with pytest.raises(ValueError, match="T=4 must be a positive multiple of t_patch_size=3"):
        T.gather_patches(vid, ids_keep, 4, t_patch_size=3)
    with pytest.raises(ValueError, match="t_patch_size must be a positive int, got 0"):
        T.gather_patches(vid, ids_keep, 4, t_patch_size=0)
    with pytest.raises(TypeError, match="t_patch_size must be a positive int, got 2.0"):
        T.gather_patches(vid, ids_keep, 4, t_patch_size=2.0)
    with pytest.raises(TypeError, match="t_patch_size must be a positive int, got True"):
        T.gather_patches(vid, ids_keep, 4, t_patch_size=True)
    with pytest.raises(ValueError, match=r"positive multiples of patch_size=3, got imgs shape \[2, 3, 4, 8, 8\]"):
        T.gather_patches(vid, ids_keep, 3, t_patch_size=2)
    with pytest.raises(ValueError, match="only L=8"):
        T.gather_patches(vid, make_ids(N, 16, 9)[0], 4, t_patch_size=2)
    with pytest.raises(ValueError, match="outside"):
        T.gather_patches(vid, ids_keep + 8, 4, t_patch_size=2, check_indices=True)
    with pytest.raises(TypeError, match="imgs must have dtype"):
        T.gather_patches(vid.double(), ids_keep, 4, t_patch_size=2)


def test_check_indices_env(monkeypatch):
    N, L, K, D = 2, 10, 3, 8
    x = rnd(N, L, D)
    ids_keep, _ = make_ids(N, L, K)
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="outside"):
        T.gather_tokens(x, ids_keep - 100)


# ----------------------------------------------------------------------------------- GPU (real sizes)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [72, 768, 1024, 1280])
def test_gpu_real_sizes(dtype, D):
    N, L, K = 16, 196, 49
    ids_keep, ids_restore = make_ids(N, L, K, device="cuda")
    x = rnd(N, L, D, dtype=dtype, device="cuda")
    pos = rnd(1, L, D, dtype=dtype, seed=1, device="cuda")
    pre = rnd(1, 1, D, dtype=dtype, seed=2, device="cuda")
    g = rnd(N, 1 + K, D, dtype=dtype, seed=3, device="cuda")
    compare_all(lambda *a: T.gather_tokens(*a), ref_gather_tokens, [x, ids_keep, pos, pre], g, dtype, "gpu gather")
    y = rnd(N, 1 + K, D, dtype=dtype, device="cuda")
    mt = rnd(1, 1, D, dtype=dtype, seed=4, device="cuda")
    dpos = rnd(1, 1 + L, D, dtype=dtype, seed=5, device="cuda")
    g2 = rnd(N, 1 + L, D, dtype=dtype, seed=6, device="cuda")
    compare_all(lambda a, b, c, d: T.unshuffle_tokens(a, b, c, d), lambda a, b, c, d: ref_unshuffle(a, b, c, d),
                [y, ids_restore, mt, dpos], g2, dtype, "gpu unshuffle")
    imgs = rnd(N, 3, 224, 224, dtype=dtype, device="cuda")
    assert torch.equal(T.gather_patches(imgs, ids_keep, 16), ref_gather_patches(imgs, ids_keep, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_video_real_size(dtype):
    N, C, T_, H, W, p, u = 4, 3, 16, 224, 224, 16, 2
    L = (T_ // u) * (H // p) * (W // p)
    ids_keep, _ = make_ids(N, L, L // 10, device="cuda")
    vid = rnd(N, C, T_, H, W, dtype=dtype, device="cuda")
    out = T.gather_patches(vid, ids_keep, p, t_patch_size=u)
    assert torch.equal(out, T._gather_patches_torch(vid, ids_keep, p, u))
    g = rnd(*out.shape, dtype=dtype, seed=1, device="cuda")
    gi = torch.ops.mae_fast.gather_patches_backward(g, ids_keep, C, T_, H, W, p, u)
    assert torch.equal(gi, T._gather_patches_bwd_torch(g, ids_keep, C, T_, H, W, p, u))


@pytest.mark.gpu
def test_gpu_backward_deterministic():
    N, L, K, D = 256, 196, 49, 512
    ids_keep, ids_restore = make_ids(N, L, K, device="cuda")
    y = rnd(N, 1 + K, D, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    mt = rnd(1, 1, D, device="cuda").requires_grad_(True)
    dpos = rnd(1, 1 + L, D, device="cuda").requires_grad_(True)
    g = rnd(N, 1 + L, D, dtype=torch.bfloat16, seed=1, device="cuda")
    res = []
    for _ in range(2):
        mt.grad = dpos.grad = y.grad = None
        T.unshuffle_tokens(y, ids_restore, mt, dpos).backward(g)
        res.append((mt.grad.clone(), dpos.grad.clone(), y.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*res))


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N*L*D > 2**31 elements: rows past the int32 range are read and written correctly."""
    N, L, K, D = 11000, 196, 4, 1024  # 2.21e9 elements (4.4 GB in bf16)
    x = torch.empty(N, L, D, dtype=torch.bfloat16, device="cuda")
    x[-4:].normal_()
    ids_keep, ids_restore = make_ids(N, L, K, device="cuda")
    out = T.gather_tokens(x, ids_keep)  # [N, K, D]
    want = torch.gather(x[-4:], 1, ids_keep[-4:].unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(out[-4:], want)
    del x
    y = rnd(N, 1 + K, D, dtype=torch.bfloat16, device="cuda")
    mt = rnd(1, 1, D, dtype=torch.bfloat16, seed=1, device="cuda")
    z = T.unshuffle_tokens(y, ids_restore, mt)  # [N, 1+L, D], 2.2e9 elements
    assert torch.equal(z[-4:], ref_unshuffle(y[-4:], ids_restore[-4:], mt))
