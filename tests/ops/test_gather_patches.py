"""gather_patches: exact copies and every gradient against the plain way (mae_fast.reference.visible_patches:
unfold for images, Tensor.unfold for video tubelets) and an explicit-slicing oracle, images and video, fp32
and bf16, strided inputs, the visible-only embedding identities (Conv2d, Conv3d), the Triton kernels,
bad inputs; real sizes on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops, reference
from mae_fast.ops.gather_patches import gather_patches_backward_torch, gather_patches_torch
from mae_fast.testing import check_op, randn, random_ids


def sliced_tubelets(imgs, ids_keep, p, u):
    """Video oracle by explicit slicing: token l = (s, r, c) -> imgs[:, :, s*u:(s+1)*u, r*p:(r+1)*p,
    c*p:(c+1)*p] flattened in (C, u, p, p) order; then the index-repeat gather."""
    N, C, T, H, W = imgs.shape
    rows = []
    for s in range(T // u):
        for r in range(H // p):
            for c in range(W // p):
                tube = imgs[:, :, s * u:(s + 1) * u, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [N, C, u, p, p]
                rows.append(tube.reshape(N, -1))  # [N, C*u*p*p]
    x = torch.stack(rows, dim=1)  # [N, L, C*u*p*p]
    return torch.gather(x, 1, ids_keep.long().unsqueeze(-1).repeat(1, 1, x.shape[-1]))  # [N, K, C*u*p*p]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [(3, 3, 24, 40, 8, 5), (2, 3, 32, 32, 16, 1), (2, 1, 14, 28, 7, 8),
                                 (2, 3, 28, 28, 14, 1)])
def test_image_exact_and_grad(dtype, cfg):
    N, C, H, W, p, K = cfg
    L = (H // p) * (W // p)
    imgs = randn(N, C, H, W, dtype=dtype)
    ids, _ = random_ids(N, L, K, torch.int32 if N == 3 else torch.int64, seed=1)
    out = ops.gather_patches(imgs, ids, p)
    assert out.shape == (N, K, C * p * p) and out.dtype == dtype
    assert torch.equal(out, reference.visible_patches(imgs, ids, p))
    g = randn(N, K, C * p * p, dtype=dtype, seed=2)
    check_op(lambda a, b: ops.gather_patches(a, b, p), lambda a, b: reference.visible_patches(a, b, p),
             [imgs, ids], g, name="gather_patches")


def test_is_visible_patch_embedding():
    """F.linear on the gathered patches == Conv2d patch embedding of all patches, then the gather."""
    N, C, H, W, p, D, K = 2, 3, 32, 48, 8, 40, 6
    L = (H // p) * (W // p)
    imgs = randn(N, C, H, W).double()
    proj = torch.nn.Conv2d(C, D, p, stride=p).double()
    ids, _ = random_ids(N, L, K, seed=4)
    full = proj(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
    want = torch.gather(full, 1, ids.unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    got = F.linear(ops.gather_patches(imgs.float(), ids, p).double(), proj.weight.flatten(1), proj.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_strided_imgs():
    N, C, H, W, p, K = 2, 3, 16, 24, 4, 7
    imgs = randn(N, H, W, C).permute(0, 3, 1, 2)  # channels-last storage
    ids, _ = random_ids(N, (H // p) * (W // p), K, seed=2)
    assert torch.equal(ops.gather_patches(imgs, ids, p), reference.visible_patches(imgs.contiguous(), ids, p))


# (N, C, T, H, W, p, u, K): u = 2 with a non-square frame; u = 1 with an odd T; C = 1; one tubelet in time
VIDEO_CFGS = [(2, 3, 4, 16, 24, 8, 2, 5), (3, 3, 3, 16, 8, 8, 1, 4), (2, 1, 4, 8, 8, 4, 2, 3),
              (2, 2, 2, 8, 12, 4, 2, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", VIDEO_CFGS)
def test_video_exact_and_grad(dtype, cfg):
    N, C, T_, H, W, p, u, K = cfg
    L = (T_ // u) * (H // p) * (W // p)
    vid = randn(N, C, T_, H, W, dtype=dtype)
    ids, _ = random_ids(N, L, K, torch.int32 if N == 3 else torch.int64, seed=1)
    out = ops.gather_patches(vid, ids, p, t_patch_size=u)
    assert out.shape == (N, K, C * u * p * p) and out.dtype == dtype
    assert torch.equal(out, sliced_tubelets(vid, ids, p, u))
    assert torch.equal(out, reference.visible_patches(vid, ids, p, u))
    g = randn(N, K, C * u * p * p, dtype=dtype, seed=2)
    check_op(lambda a, b: ops.gather_patches(a, b, p, t_patch_size=u), lambda a, b: sliced_tubelets(a, b, p, u),
             [vid, ids], g, name="gather_patches video")
    # grad_imgs: the gradient rows at the kept tubelets, zeros at the removed ones (written once, no sum)
    leaf = vid.clone().requires_grad_(True)
    ops.gather_patches(leaf, ids, p, t_patch_size=u).backward(g)
    kept = torch.zeros(N, L, dtype=torch.bool).scatter_(1, ids.long(), True)  # [N, L]
    tokens = gather_patches_torch(leaf.grad, torch.arange(L).expand(N, L), p, u)  # [N, L, C*u*p*p]
    assert (tokens[~kept] == 0).all()


def test_video_is_conv3d_embedding():
    """F.linear on the gathered tubelets == Conv3d embedding of all tokens (flattened (s, r, c)), then the
    gather: the visible-only embedding identity of a video MAE."""
    N, C, T_, H, W, p, u, D, K = 2, 3, 4, 16, 24, 8, 2, 40, 5
    L = (T_ // u) * (H // p) * (W // p)
    vid = randn(N, C, T_, H, W).double()
    proj = torch.nn.Conv3d(C, D, kernel_size=(u, p, p), stride=(u, p, p)).double()
    ids, _ = random_ids(N, L, K, seed=4)
    full = proj(vid).flatten(2).transpose(1, 2)  # [N, L, D]
    want = torch.gather(full, 1, ids.unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    got = F.linear(ops.gather_patches(vid.float(), ids, p, t_patch_size=u).double(), proj.weight.flatten(1),
                   proj.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_image_is_one_frame_video():
    """A 4-D image and the same image as a one-frame video ([N, C, 1, H, W], u = 1): identical outputs and
    gradients (bit for bit)."""
    N, C, H, W, p, K = 2, 3, 16, 24, 8, 4
    imgs = randn(N, C, H, W)
    ids, _ = random_ids(N, (H // p) * (W // p), K, seed=5)
    g = randn(N, K, C * p * p, seed=6)
    a = imgs.clone().requires_grad_(True)
    b = imgs.clone()[:, :, None].requires_grad_(True)
    out_a = ops.gather_patches(a, ids, p)
    out_b = ops.gather_patches(b, ids, p, t_patch_size=1)
    assert torch.equal(out_a, out_b)
    out_a.backward(g)
    out_b.backward(g)
    assert a.grad.shape == (N, C, H, W) and b.grad.shape == (N, C, 1, H, W)
    assert torch.equal(a.grad, b.grad[:, :, 0])


def test_video_strided():
    """channels-last-3d and a time-sliced video are read in place (no copy) with their strides."""
    N, C, T_, H, W, p, u, K = 2, 3, 4, 8, 12, 4, 2, 5
    L = (T_ // u) * (H // p) * (W // p)
    ids, _ = random_ids(N, L, K, seed=7)
    vid = randn(N, C, T_, H, W).to(memory_format=torch.channels_last_3d)
    assert torch.equal(ops.gather_patches(vid, ids, p, t_patch_size=u), sliced_tubelets(vid.contiguous(), ids, p, u))
    sliced = randn(N, C, 2 * T_, H, W, seed=8)[:, :, ::2]  # time stride 2 * H * W
    assert torch.equal(ops.gather_patches(sliced, ids, p, t_patch_size=u),
                       sliced_tubelets(sliced.contiguous(), ids, p, u))


@pytest.mark.parametrize("cfg", [(2, 3, 8, 8, 2, 4), VIDEO_CFGS[0], VIDEO_CFGS[1]])
def test_triton_kernels_run(triton_path, cfg):
    if len(cfg) == 6:
        N, C, H, W, p, K = cfg
        T_, u = None, 1
        L = (H // p) * (W // p)
        x = randn(N, C, H, W, seed=9)
    else:
        N, C, T_, H, W, p, u, K = cfg
        L = (T_ // u) * (H // p) * (W // p)
        x = randn(N, C, T_, H, W, seed=9)
    ids, _ = random_ids(N, L, K, seed=10)
    g = randn(N, K, C * u * p * p, seed=11)
    check_op(lambda a, b: ops.gather_patches(a, b, p, t_patch_size=u),
             lambda a, b: reference.visible_patches(a, b, p, u), [x, ids], g, name="triton path")


def test_bad_inputs():
    N = 2
    ids, _ = random_ids(N, 16, 3)
    imgs = randn(N, 3, 16, 16)
    with pytest.raises(ValueError, match="positive multiples of patch_size=5"):
        ops.gather_patches(imgs, ids, 5)
    with pytest.raises(TypeError, match="patch_size"):
        ops.gather_patches(imgs, ids, 4.0)
    with pytest.raises(ValueError, match="imgs must have 4 dims"):
        ops.gather_patches(imgs[0], ids, 4)
    with pytest.raises(ValueError, match="outside"):
        ops.gather_patches(imgs, ids + 16, 4, check_indices=True)
    vid = randn(N, 3, 4, 8, 8)  # L = 2 * 2 * 2 = 8 tubelets at u = 2, p = 4
    with pytest.raises(ValueError, match=r"imgs must have 4 dims \(\[N, C, H, W\]\) or 5 dims"):
        ops.gather_patches(vid[None], ids, 4)
    with pytest.raises(ValueError, match="t_patch_size must be 1 for 4-D imgs"):
        ops.gather_patches(imgs, ids, 4, t_patch_size=2)
    with pytest.raises(ValueError, match="T=4 must be a positive multiple of t_patch_size=3"):
        ops.gather_patches(vid, ids, 4, t_patch_size=3)
    with pytest.raises(ValueError, match="t_patch_size must be a positive int, got 0"):
        ops.gather_patches(vid, ids, 4, t_patch_size=0)
    with pytest.raises(TypeError, match="t_patch_size must be a positive int, got 2.0"):
        ops.gather_patches(vid, ids, 4, t_patch_size=2.0)
    with pytest.raises(TypeError, match="t_patch_size must be a positive int, got True"):
        ops.gather_patches(vid, ids, 4, t_patch_size=True)
    with pytest.raises(ValueError, match=r"positive multiples of patch_size=3, got imgs shape \[2, 3, 4, 8, 8\]"):
        ops.gather_patches(vid, ids, 3, t_patch_size=2)
    with pytest.raises(ValueError, match="only L=8"):
        ops.gather_patches(vid, random_ids(N, 16, 9)[0], 4, t_patch_size=2)
    with pytest.raises(ValueError, match="outside"):
        ops.gather_patches(vid, ids + 8, 4, t_patch_size=2, check_indices=True)
    with pytest.raises(TypeError, match="imgs must have dtype"):
        ops.gather_patches(vid.long(), ids, 4, t_patch_size=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_real_size(dtype):
    N, L, K = 16, 196, 49
    ids, _ = random_ids(N, L, K, device="cuda")
    imgs = randn(N, 3, 224, 224, dtype=dtype, device="cuda")
    assert torch.equal(ops.gather_patches(imgs, ids, 16), reference.visible_patches(imgs, ids, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_video_real_size(dtype):
    N, C, T_, H, W, p, u = 4, 3, 16, 224, 224, 16, 2
    L = (T_ // u) * (H // p) * (W // p)
    ids, _ = random_ids(N, L, L // 10, device="cuda")
    vid = randn(N, C, T_, H, W, dtype=dtype, device="cuda").requires_grad_(True)
    out = ops.gather_patches(vid, ids, p, t_patch_size=u)
    assert torch.equal(out, gather_patches_torch(vid.detach(), ids, p, u))
    g = randn(*out.shape, dtype=dtype, seed=1, device="cuda")
    out.backward(g)
    assert torch.equal(vid.grad, gather_patches_backward_torch(g, ids, C, T_, H, W, p, u))
