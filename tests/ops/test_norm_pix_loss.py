"""norm_pix_loss: float64 oracle, the reference forward_loss, images and video tubelets, both forms, the
Triton kernels (under TRITON_INTERPRET=1 on a CPU), the eager buffer hand-out and the registered ops,
bad inputs; real sizes on a GPU."""
import contextlib
import gc
import math
import weakref

import pytest
import torch

from mae_fast import reference
from mae_fast.kernels import norm_pix_loss as K
from mae_fast.ops import norm_pix_loss
from mae_fast.ops.norm_pix_loss import norm_pix_loss_forward_torch, norm_pix_loss_forward_triton
from mae_fast.ops.paths import triton_interpret
from mae_fast.testing import assert_close_to_oracle, rel_err

TRITON_RUNS = torch.cuda.is_available() or triton_interpret()


# ------------------------------------------------------------------------------ oracle (float64)
def oracle_targets(imgs, p):
    """[N, L, p*p*C] float64 by explicit slicing, patches row-major, (row, col, channel) inside."""
    n, c, h, w = imgs.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            patch = imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].double()  # [N, C, p, p]
            rows.append(patch.permute(0, 2, 3, 1).reshape(n, -1))  # [N, p*p*C]
    return torch.stack(rows, dim=1)  # [N, L, D]


def oracle_targets_video(imgs, p, u):
    """[N, L, u*p*p*C] float64 by explicit slicing: tubelets (slot, row, column) in that order, (frame, row,
    column, channel) inside."""
    n, c, t, h, w = imgs.shape
    rows = []
    for s in range(t // u):
        for i in range(h // p):
            for j in range(w // p):
                tube = imgs[:, :, s * u:(s + 1) * u, i * p:(i + 1) * p, j * p:(j + 1) * p].double()  # [N, C, u, p, p]
                rows.append(tube.permute(0, 2, 3, 4, 1).reshape(n, -1))  # [N, u*p*p*C]
    return torch.stack(rows, dim=1)  # [N, L, D]


def oracle(pred, imgs, mask, p, norm_pix=True, eps=1e-6, ids=None, u=1):
    """(loss, grad_pred) in float64 by autograd on the textbook formula (imgs 4-D, or 5-D with tubelets of u)."""
    x = pred.detach().double().requires_grad_(True)
    t = oracle_targets(imgs, p) if imgs.dim() == 4 else oracle_targets_video(imgs, p, u)
    if ids is not None:
        t = torch.stack([t[b, ids[b].long()] for b in range(t.shape[0])])  # [N, M, D]
        w = torch.ones(t.shape[:2], dtype=torch.float64)
    else:
        w = mask.double()
    if norm_pix:
        mean = t.sum(-1, keepdim=True) / t.shape[-1]
        var = ((t - mean) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)
        t = (t - mean) / torch.sqrt(var + eps)
    row = ((x - t) ** 2).mean(-1)  # [N, Lp]
    loss = (row * w).sum() / w.sum()
    loss.backward()
    return loss.detach(), x.grad


def make_inputs(n, c, h, w, p, dtype=torch.float32, ratio=0.75, seed=0, img_dtype=None):
    g = torch.Generator().manual_seed(seed)
    L = (h // p) * (w // p)
    d = p * p * c
    imgs = (torch.rand(n, c, h, w, generator=g) * 2 + 0.5).to(img_dtype or dtype)
    pred = torch.randn(n, L, d, generator=g).to(dtype)
    noise = torch.rand(n, L, generator=g)
    k = int(L * (1 - ratio))
    ids_shuffle = noise.argsort(1)
    mask = torch.ones(n, L)
    mask.scatter_(1, ids_shuffle[:, :k], 0.0)
    ids_masked = ids_shuffle[:, k:]  # [N, M], noise order (not sorted)
    return pred, imgs, mask, ids_masked


def make_video_inputs(n, c, t, h, w, p, u, dtype=torch.float32, ratio=0.75, seed=0):
    """(pred [N, L, u*p*p*C], video [N, C, T, H, W], mask [N, L], ids_masked [N, M]) with L = T/u * h * w."""
    g = torch.Generator().manual_seed(seed)
    L = (t // u) * (h // p) * (w // p)
    d = u * p * p * c
    vid = (torch.rand(n, c, t, h, w, generator=g) * 2 + 0.5).to(dtype)
    pred = torch.randn(n, L, d, generator=g).to(dtype)
    k = int(L * (1 - ratio))
    ids_shuffle = torch.rand(n, L, generator=g).argsort(1)
    mask = torch.ones(n, L).scatter_(1, ids_shuffle[:, :k], 0.0)
    return pred, vid, mask, ids_shuffle[:, k:]


def masked_rows(pred, ids):
    return torch.stack([pred[b, ids[b]] for b in range(pred.shape[0])])  # [N, M, D]


def run(pred, imgs, mask, p, **kw):
    """(loss, grad_pred) of the op."""
    x = pred.detach().clone().requires_grad_(True)
    loss = norm_pix_loss(x, imgs, mask, p, **kw)
    loss.backward()
    return loss.detach(), x.grad


def run_torch_same_dtype(pred, imgs, mask, p, norm_pix=True, eps=1e-6, ids=None, u=1):
    """The plain torch path in the op's dtype (for assert_close_to_oracle)."""
    weight = None if ids is not None else mask
    loss, gbuf, unscale = norm_pix_loss_forward_torch(pred, imgs, weight, ids, p, norm_pix, eps, u)
    return loss, (gbuf.float() * unscale).to(gbuf.dtype)


SHAPES = [
    # n, c, h, w, p
    (3, 3, 32, 48, 8),  # non-square, D = 192
    (2, 3, 28, 42, 14),  # D = 588, not a power of two
    (2, 1, 48, 16, 16),  # C = 1, D = 256
    (2, 4, 32, 32, 16),  # C = 4, D = 1024
]


# ------------------------------------------------------------------------------ accuracy, fp32
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("form", ["full", "masked"])
def test_fp32_against_float64_oracle(shape, norm_pix, form):
    n, c, h, w, p = shape
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=sum(shape))
    if form == "full":
        loss, grad = run(pred, imgs, mask, p, norm_pix=norm_pix)
        ref_loss, ref_grad = oracle(pred, imgs, mask, p, norm_pix=norm_pix)
    else:
        pm = torch.stack([pred[b, ids[b]] for b in range(n)])  # [N, M, D]
        loss, grad = run(pm, imgs, None, p, norm_pix=norm_pix, ids_masked=ids)
        ref_loss, ref_grad = oracle(pm, imgs, None, p, norm_pix=norm_pix, ids=ids)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref_loss) < 1e-5
    assert grad.dtype == torch.float32 and grad.shape == (pred.shape if form == "full" else pm.shape)
    assert rel_err(grad, ref_grad) < 1e-5


def test_patch_size_32_fp32():
    pred, imgs, mask, _ = make_inputs(2, 3, 64, 32, 32, ratio=0.5)
    loss, grad = run(pred, imgs, mask, 32)
    ref_loss, ref_grad = oracle(pred, imgs, mask, 32)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5


# ------------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["full", "masked"])
def test_low_precision_against_oracle(dtype, form):
    n, c, h, w, p = 3, 3, 32, 48, 8
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, dtype=dtype, seed=7)
    if form == "masked":
        pred = torch.stack([pred[b, ids[b]] for b in range(n)])
        mask_arg, kw, oids = None, {"ids_masked": ids}, ids
    else:
        mask_arg, kw, oids = mask, {}, None
    loss, grad = run(pred, imgs, mask_arg, p, **kw)
    ref_loss, ref_grad = oracle(pred, imgs, mask_arg, p, ids=oids)
    same_loss, same_grad = run_torch_same_dtype(pred, imgs, mask_arg, p, ids=oids)
    assert grad.dtype == dtype
    assert rel_err(loss, ref_loss) < 1e-5  # statistics in fp32 on the same (rounded) inputs
    # one ulp at the largest gradient: the buffer is rounded to the pred dtype, then (fp16) the gradient
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert_close_to_oracle(grad, ref_grad, same_grad, atol=ulp * ref_grad.abs().max().item(), name="grad")
    assert rel_err(grad, ref_grad) < ulp


def test_mixed_dtypes_bf16_pred_fp32_imgs():
    pred, imgs, mask, _ = make_inputs(2, 3, 32, 32, 8, dtype=torch.bfloat16, img_dtype=torch.float32)
    loss, grad = run(pred, imgs, mask, 8)
    ref_loss, ref_grad = oracle(pred, imgs, mask, 8)
    assert rel_err(loss, ref_loss) < 1e-5
    assert grad.dtype == torch.bfloat16 and rel_err(grad, ref_grad) < 2 ** -7


# ------------------------------------------------------------------------------ video (tubelets)
VIDEO_SHAPES = [
    # n, c, t, h, w, p, u
    (2, 3, 4, 16, 24, 8, 2),  # u = 2, non-square frame, D = 384
    (2, 3, 3, 16, 8, 8, 1),  # u = 1 with an odd T, D = 192
    (3, 1, 4, 8, 16, 4, 2),  # C = 1, D = 32
]


@pytest.mark.parametrize("shape", VIDEO_SHAPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("form", ["full", "masked"])
def test_video_fp32_against_float64_oracle(shape, norm_pix, form):
    n, c, t, h, w, p, u = shape
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u, seed=sum(shape))
    if form == "full":
        loss, grad = run(pred, vid, mask, p, norm_pix=norm_pix, t_patch_size=u)
        ref_loss, ref_grad = oracle(pred, vid, mask, p, norm_pix=norm_pix, u=u)
    else:
        pred = masked_rows(pred, ids)
        loss, grad = run(pred, vid, None, p, norm_pix=norm_pix, ids_masked=ids, t_patch_size=u)
        ref_loss, ref_grad = oracle(pred, vid, None, p, norm_pix=norm_pix, ids=ids, u=u)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == torch.float32 and grad.shape == pred.shape
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("form", ["full", "masked"])
def test_video_bf16_against_oracle(form):
    n, c, t, h, w, p, u = VIDEO_SHAPES[0]
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u, dtype=torch.bfloat16, seed=3)
    if form == "masked":
        pred = masked_rows(pred, ids)
        mask_arg, kw, oids = None, {"ids_masked": ids}, ids
    else:
        mask_arg, kw, oids = mask, {}, None
    loss, grad = run(pred, vid, mask_arg, p, t_patch_size=u, **kw)
    ref_loss, ref_grad = oracle(pred, vid, mask_arg, p, ids=oids, u=u)
    _, same_grad = run_torch_same_dtype(pred, vid, mask_arg, p, ids=oids, u=u)
    assert grad.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) < 1e-5
    ulp = 2.0 ** -7
    assert_close_to_oracle(grad, ref_grad, same_grad, atol=ulp * ref_grad.abs().max().item(), name="grad")
    assert rel_err(grad, ref_grad) < ulp


@pytest.mark.parametrize("norm_pix", [True, False])
def test_video_matches_reference_patchify_formula(norm_pix):
    """Equal to the reference-style video loss: patchify by reshape + permute, then forward_loss; the
    masked-only form gives the same value and the full gradient's masked rows."""
    n, c, t, h, w, p, u = 2, 3, 4, 16, 24, 8, 2
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u, seed=4)
    L, d = pred.shape[1], pred.shape[2]
    target = vid.reshape(n, c, t // u, u, h // p, p, w // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(n, L, d)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    x = pred.clone().requires_grad_(True)
    ref = (((x - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    ref.backward()
    loss, grad = run(pred, vid, mask, p, norm_pix=norm_pix, t_patch_size=u)
    assert rel_err(loss, ref.detach()) < 1e-5 and rel_err(grad, x.grad) < 1e-5
    loss_m, grad_m = run(masked_rows(pred, ids), vid, mask, p, norm_pix=norm_pix, ids_masked=ids, t_patch_size=u)
    assert rel_err(loss_m, ref.detach()) < 1e-5
    assert rel_err(grad_m, masked_rows(x.grad, ids)) < 1e-5


def test_image_is_one_frame_video():
    """A 4-D image and the same image as a one-frame video (u = 1): the same loss and gradient, bit for bit."""
    pred, imgs, mask, ids = make_inputs(2, 3, 16, 24, 8, seed=26)
    a = run(pred, imgs, mask, 8)
    b = run(pred, imgs[:, :, None], mask, 8, t_patch_size=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    pm = masked_rows(pred, ids)
    a = run(pm, imgs, None, 8, ids_masked=ids)
    b = run(pm, imgs[:, :, None], None, 8, ids_masked=ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_video_strided_and_deterministic():
    """channels-last-3d and time-sliced videos are read in place; two runs agree bit for bit."""
    n, c, t, h, w, p, u = 2, 3, 4, 8, 16, 4, 2
    pred, vid, mask, _ = make_video_inputs(n, c, t, h, w, p, u, seed=27)
    ref_loss, ref_grad = oracle(pred, vid, mask, p, u=u)
    cl = vid.to(memory_format=torch.channels_last_3d)
    big = torch.zeros(n, c, 2 * t, h, w)
    big[:, :, ::2] = vid
    for v in (cl, big[:, :, ::2]):
        assert not v.is_contiguous()
        loss, grad = run(pred, v, mask, p, t_patch_size=u)
        assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    a, b = run(pred, vid, mask, p, t_patch_size=u), run(pred, vid, mask, p, t_patch_size=u)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("form", ["full", "masked"])
def test_video_triton_path_executed_under_interpreter(triton_path, form):
    n, c, t, h, w, p, u = VIDEO_SHAPES[0]
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u, seed=28)
    if form == "masked":
        pred = masked_rows(pred, ids)
        loss, grad = run(pred, vid, None, p, ids_masked=ids, t_patch_size=u)
        ref_loss, ref_grad = oracle(pred, vid, None, p, ids=ids, u=u)
    else:
        loss, grad = run(pred, vid, mask, p, t_patch_size=u)
        ref_loss, ref_grad = oracle(pred, vid, mask, p, u=u)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_video_triton_through_registered_ops(triton_path, record_ops):
    """The path torch.compile takes (the registered ops), video; grad_output != 1."""
    n, c, t, h, w, p, u = VIDEO_SHAPES[1]
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u, seed=29)
    x = pred.clone().requires_grad_(True)
    with record_ops() as rec:
        (grad,) = torch.autograd.grad(norm_pix_loss(x, vid, mask, p, t_patch_size=u) * 2.5, x)
    assert "norm_pix_loss_fwd" in rec.calls and "norm_pix_loss_bwd" in rec.calls
    ref_loss, ref_grad = oracle(pred, vid, mask, p, u=u)
    assert rel_err(grad, 2.5 * ref_grad) < 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes 0/0, inf-inf
def test_video_non_finite_imgs_raise_when_checked():
    n, c, t, h, w, p, u = 2, 3, 4, 8, 16, 4, 2  # L = 2 * 2 * 4 = 16 tubelets
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u, seed=30, ratio=0.5)
    l = 1 * 8 + 1 * 4 + 2  # slot 1, row 1, column 2: frames 2-3, rows 4-7, columns 8-11
    mask[1] = 0.0
    mask[1, l] = 1.0
    dirty = vid.clone()
    dirty[1, 2, 3, 5, 9] = float("nan")
    with pytest.raises(ValueError, match=rf"imgs has non-finite values.*clip 1, tubelet {l}\b"):
        norm_pix_loss(pred, dirty, mask, p, t_patch_size=u)
    ids_l = torch.tensor([[0, 1], [l, 0]])
    with pytest.raises(ValueError, match=rf"clip 1, tubelet {l}\b"):
        norm_pix_loss(pred[:, :2], dirty, None, p, ids_masked=ids_l, t_patch_size=u)
    mask[1, l] = 0.0
    mask[1, l + 1] = 1.0  # the NaN's tubelet no longer counts: not read
    assert torch.isfinite(norm_pix_loss(pred, dirty, mask, p, t_patch_size=u))


def test_video_bad_inputs():
    n, c, t, h, w, p, u = 2, 3, 4, 8, 16, 4, 2
    pred, vid, mask, ids = make_video_inputs(n, c, t, h, w, p, u)  # L = 16, D = 96
    img_pred, imgs, img_mask, _ = make_inputs(2, 3, 16, 24, 8)
    with pytest.raises(ValueError, match=r"imgs must have 4 dims \(\[N, C, H, W\]\) or 5 dims"):
        norm_pix_loss(pred, vid[None], mask, p, t_patch_size=u)
    with pytest.raises(ValueError, match="t_patch_size must be 1 for 4-D imgs"):
        norm_pix_loss(img_pred, imgs, img_mask, 8, t_patch_size=2)
    with pytest.raises(ValueError, match=r"positive multiple of t_patch_size=3, got imgs shape \[2, 3, 4, 8, 16\]"):
        norm_pix_loss(pred, vid, mask, p, t_patch_size=3)
    with pytest.raises(ValueError, match="positive multiple of t_patch_size=2"):
        norm_pix_loss(pred, vid[:, :, :0], mask, p, t_patch_size=u)
    with pytest.raises(ValueError, match="t_patch_size must be a positive int, got 0"):
        norm_pix_loss(pred, vid, mask, p, t_patch_size=0)
    with pytest.raises(TypeError, match="t_patch_size must be a positive int, got 2.0"):
        norm_pix_loss(pred, vid, mask, p, t_patch_size=2.0)
    with pytest.raises(ValueError, match=r"patch_size=3, got imgs shape \[2, 3, 4, 8, 16\]"):
        norm_pix_loss(pred, vid, mask, 3, t_patch_size=u)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 32, 48\], got \[2, 16, 96\]"):
        norm_pix_loss(pred, vid, mask, p)  # u forgotten: read as 32 one-frame tokens of D = 48
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 16\]"):
        norm_pix_loss(pred, vid, mask[:, :-1], p, t_patch_size=u)
    pm = masked_rows(pred, ids)
    with pytest.raises(ValueError, match=r"ids_masked has entries outside \[0, 16\)"):
        norm_pix_loss(pm, vid, None, p, ids_masked=ids + 16, t_patch_size=u)
    with pytest.raises(ValueError, match="at least 2 values"):
        norm_pix_loss(torch.zeros(1, 2, 1), torch.zeros(1, 1, 2, 1, 1), torch.ones(1, 2), 1)


# ------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_reference_forward_loss(norm_pix):
    n, c, h, w, p = 2, 3, 32, 48, 16
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=3)
    x = pred.clone().requires_grad_(True)
    ref = reference.patch_loss(imgs, x, mask, p, norm_pix_loss=norm_pix, eps=1e-6)
    ref.backward()
    loss, grad = run(pred, imgs, mask, p, norm_pix=norm_pix)
    assert rel_err(loss, ref.detach()) < 1e-5
    assert rel_err(grad, x.grad) < 1e-5
    # masked-only form: the same value; its gradient is the full gradient's masked rows
    pm = torch.stack([pred[b, ids[b]] for b in range(n)])
    loss_m, grad_m = run(pm, imgs, mask, p, norm_pix=norm_pix, ids_masked=ids)
    assert rel_err(loss_m, ref.detach()) < 1e-5
    full_rows = torch.stack([x.grad[b, ids[b]] for b in range(n)])
    assert rel_err(grad_m, full_rows) < 1e-5


def test_reference_model_forward_loss():
    model = reference.MaskedAutoencoderViT(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1,
                                           num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                           decoder_num_heads=2, norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32)
    ref_loss, pred, mask = model(imgs, mask_ratio=0.75)
    loss = norm_pix_loss(pred, imgs, mask, 8)
    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-5


# ------------------------------------------------------------------------------ Triton really runs
def _form_matches_oracle(form, n, c, h, w, p, seed):
    """The op's loss and gradient in the full or masked-only form against the float64 oracle."""
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=seed)
    if form == "masked":
        pred = torch.stack([pred[b, ids[b]] for b in range(n)])
        loss, grad = run(pred, imgs, None, p, ids_masked=ids)
        ref_loss, ref_grad = oracle(pred, imgs, None, p, ids=ids)
    else:
        loss, grad = run(pred, imgs, mask, p)
        ref_loss, ref_grad = oracle(pred, imgs, mask, p)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("form", ["full", "masked"])
def test_triton_path_executed_under_interpreter(triton_path, form):
    _form_matches_oracle(form, 2, 3, 24, 40, 8, seed=11)


@pytest.mark.parametrize("form", ["full", "masked"])
def test_triton_through_registered_ops(triton_path, record_ops, form):
    """The path torch.compile takes: the registered ops, functional forward and backward."""
    with record_ops() as rec:
        _form_matches_oracle(form, 2, 3, 16, 40, 8, seed=13)
    assert len(rec.calls["norm_pix_loss_fwd"]) == 1 and len(rec.calls["norm_pix_loss_bwd"]) == 1


def test_triton_multi_iteration_programs(triton_path):
    """Programs that loop over several blocks (partial last program) in the forward, the den pre-pass and
    the finishing reduction (launch configurations given explicitly; the scale kernel: below)."""
    n, c, h, w, p = 3, 3, 32, 40, 8  # 60 rows of D = 192
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=5, ratio=0.5)
    mask = mask * (0.25 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)))  # fractional
    fwd = K.fwd_config(60, p, c)._replace(block_p=4, iters=3, grid=5)  # 12 rows per program
    configs = {"fwd": fwd, "den": K.BlockConfig(16, 1), "finish": K.BlockConfig(2, 1)}  # 60 weights in 4 steps
    ref_loss, ref_grad = oracle(pred, imgs, mask, p)
    loss, gbuf, unscale = norm_pix_loss_forward_triton(pred, imgs, mask, None, p, True, 1e-6, configs=configs)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(gbuf * unscale, ref_grad) < 1e-5
    pm = torch.stack([pred[b, ids[b]] for b in range(n)])  # 3 x 10 = 30 rows
    configs["fwd"] = fwd._replace(grid=3)
    loss_m, gbuf_m, _ = norm_pix_loss_forward_triton(pm, imgs, None, ids, p, True, 1e-6, configs=configs)
    ref_loss_m, ref_grad_m = oracle(pm, imgs, None, p, ids=ids)
    assert rel_err(loss_m, ref_loss_m) < 1e-5 and rel_err(gbuf_m, ref_grad_m) < 1e-5


def test_launch_configs():
    den_config, finish_config, fwd_config, scale_config = K.den_config, K.finish_config, K.fwd_config, K.scale_config
    for R, P, C, U in [(256 * 196, 16, 3, 1), (256 * 147, 14, 3, 1), (7, 8, 1, 1), (10**6, 4, 3, 1), (3, 32, 3, 1),
                       (5, 16, 4, 1), (64 * 1568, 16, 3, 2), (9, 8, 3, 3)]:
        pp_pad, c_pad, block_p, iters, _, grid = fwd_config(R, P, C, U)
        assert pp_pad >= U * P * P and c_pad >= C and pp_pad & (pp_pad - 1) == 0 and c_pad & (c_pad - 1) == 0
        assert grid * block_p * iters >= R > (grid - 1) * block_p * iters
        T = R * U * P * P * C
        block, iters, _, grid_s = scale_config(T)
        assert block & (block - 1) == 0 and grid_s * block * iters >= T > (grid_s - 1) * block * iters
        assert grid_s <= 2048 or iters == 8
        block, _ = finish_config(grid)
        assert block & (block - 1) == 0
        block, _ = den_config(R)
        assert block & (block - 1) == 0 and 128 <= block <= 16384


# ------------------------------------------------------------------------------ semantics
def test_masked_form_equals_full_form_with_mask_given():
    n, c, h, w, p = 3, 3, 32, 48, 8
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=2)
    loss_full, grad_full = run(pred, imgs, mask, p)
    pm = torch.stack([pred[b, ids[b]] for b in range(n)])
    loss_m, grad_m = run(pm, imgs, mask, p, ids_masked=ids.to(torch.int32))
    assert rel_err(loss_m, loss_full) < 1e-6
    assert rel_err(grad_m, torch.stack([grad_full[b, ids[b]] for b in range(n)])) < 1e-6
    kept = mask == 0
    assert (grad_full[kept] == 0).all()


def test_constant_patches_finite():
    n, c, h, w, p = 2, 3, 16, 32, 8
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=4, ratio=0.5)
    imgs[:, :, :8, :8] = 0.37  # patch 0 constant in every channel
    imgs[:, :, 8:, 24:] = 0.0  # last patch all zeros
    mask[:, 0] = 1.0
    mask[:, -1] = 1.0
    loss, grad = run(pred, imgs, mask, p)
    ref_loss, ref_grad = oracle(pred, imgs, mask, p)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_fractional_mask_weights():
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=6)
    weights = mask * torch.rand(mask.shape)
    weights[:, 0] = 0.5
    loss, grad = run(pred, imgs, weights, 8)
    ref_loss, ref_grad = oracle(pred, imgs, weights, 8)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_non_contiguous_inputs_and_bool_mask():
    n, c, h, w, p = 2, 3, 16, 24, 8
    pred, imgs, mask, _ = make_inputs(n, c, h, w, p, seed=8)
    imgs_cl = imgs.to(memory_format=torch.channels_last)
    big = torch.randn(n, pred.shape[1], 2 * pred.shape[2])
    big[:, :, ::2] = pred
    pred_strided = big[:, :, ::2]  # [N, L, D], stride 2 in D
    assert not pred_strided.is_contiguous() and not imgs_cl.is_contiguous()
    loss, grad = run(pred_strided, imgs_cl, mask.bool(), p)
    ref_loss, ref_grad = oracle(pred, imgs, mask, p)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_grad_output_scaling_and_no_input_mutation():
    pred, imgs, mask, ids = make_inputs(2, 3, 16, 24, 8, seed=9)
    pm = torch.stack([pred[b, ids[b]] for b in range(2)])  # [N, M, D]
    copies = [t.clone() for t in (pred, imgs, mask, ids, pm)]
    x = pred.clone().requires_grad_(True)
    (norm_pix_loss(x, imgs, mask, 8) * 3.5).backward()
    _, ref_grad = oracle(pred, imgs, mask, 8)
    assert rel_err(x.grad, 3.5 * ref_grad) < 1e-5
    # the user's own tensors as the op's arguments (the in-place backward scales only its own buffer)
    x_user = pm.requires_grad_(True)
    (norm_pix_loss(x_user, imgs, mask, 8, ids_masked=ids) * 3.5).backward()
    pm.requires_grad_(False)
    for a, b in zip(copies, (pred, imgs, mask, ids, pm)):
        assert torch.equal(a, b)
    # imgs needing grad does not break anything (imgs are constants for this loss)
    y = pred.clone().requires_grad_(True)
    norm_pix_loss(y, imgs.clone().requires_grad_(True), mask, 8).backward()
    assert rel_err(y.grad, ref_grad) < 1e-5


def test_backward_twice_with_retain_graph():
    """Eagerly (Triton or torch path) the first backward hands out the buffer, a second one raises a clear
    error."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=14)
    x = pred.clone().requires_grad_(True)
    loss = norm_pix_loss(x, imgs, mask, 8)
    torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second time.*retain_graph.*Compute the loss again"):
        torch.autograd.grad(loss, x)


def test_registered_ops_backward_twice(record_ops):
    """The registered ops (what torch.compile runs) never hand out the saved buffer: each backward returns
    a new tensor."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=15)
    x = pred.clone().requires_grad_(True)
    with record_ops():
        loss = norm_pix_loss(x, imgs, mask, 8)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        g1_copy = g1.clone()
        (g2,) = torch.autograd.grad(loss * 0.5, x)
    _, ref_grad = oracle(pred, imgs, mask, 8)
    assert g1.data_ptr() != g2.data_ptr() and torch.equal(g1, g1_copy)
    assert rel_err(g1, ref_grad) < 1e-5 and rel_err(g2, 0.5 * ref_grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_backward_hands_out_forward_buffer(dtype):
    """go == 1: the returned gradient is the forward's buffer itself (unchanged for fp32; fp16 unscaled in
    place); go == 3: the same buffer, scaled in place. Equal to the float64 oracle either way."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=16, dtype=dtype)
    _, ref_grad = oracle(pred, imgs, mask, 8)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -10
    for go in (1.0, 3.0):
        x = pred.clone().requires_grad_(True)
        loss = norm_pix_loss(x, imgs, mask, 8)
        buf = loss.grad_fn.buffer[0]  # the backward node holds the forward's gradient buffer
        before = buf.clone()
        (grad,) = torch.autograd.grad(loss * go if go != 1.0 else loss, x)
        assert grad is buf  # no copy: the forward's buffer is the gradient
        if dtype == torch.float32 and go == 1.0:
            assert torch.equal(grad, before)  # untouched: the backward exited at once
        else:
            assert not torch.equal(grad, before)
        assert rel_err(grad, go * ref_grad) < tol


def test_eager_backward_keeps_no_reference():
    """After backward the gradient buffer lives only as the caller's gradient, even with the graph kept."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=17)
    x = pred.clone().requires_grad_(True)
    loss = norm_pix_loss(x, imgs, mask, 8)
    assert len(loss.grad_fn.buffer) == 2  # the node holds the buffer until backward
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert not loss.grad_fn.buffer
    ref = weakref.ref(grad)
    del grad
    gc.collect()
    assert ref() is None  # freed although the graph (and its node) is still alive


@pytest.mark.parametrize("go", [0.5, 3.0])
@pytest.mark.parametrize("path", ["eager", "registered"])
def test_grad_output_scaling_paths(record_ops, go, path):
    """grad_output != 1 scales the gradient: eagerly (in place) and through the registered ops (new tensor)."""
    with (record_ops() if path == "registered" else contextlib.nullcontext()):
        _grad_output_scaling(go)


def _grad_output_scaling(go):
    n, c, h, w, p = 2, 3, 16, 24, 8
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=18)
    x = pred.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(norm_pix_loss(x, imgs, mask, p) * go, x)
    _, ref_grad = oracle(pred, imgs, mask, p)
    assert rel_err(grad, go * ref_grad) < 1e-5
    pm = torch.stack([pred[b, ids[b]] for b in range(n)]).requires_grad_(True)
    (grad_m,) = torch.autograd.grad(norm_pix_loss(pm, imgs, None, p, ids_masked=ids) * go, pm)
    _, ref_grad_m = oracle(pm, imgs, None, p, ids=ids)
    assert rel_err(grad_m, go * ref_grad_m) < 1e-5


@pytest.mark.parametrize("form", ["full", "masked"])
def test_fp16_gradscaler_gradients_accurate(form):
    """fp16 with a large denominator: the unit gradient (about 2.7e-5 here, 1e-7 at N=256) is below fp16's
    normal range; with a GradScaler-like grad_output of 65536 the gradient must still be accurate."""
    n, c, h, w, p = 16, 3, 32, 64, 16  # D = 768, 8 patches, 6 counted: sum(mask) = 96
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, dtype=torch.float16, seed=19)
    if form == "masked":
        pred = torch.stack([pred[b, ids[b]] for b in range(n)])
        mask_arg, kw, oids = None, {"ids_masked": ids}, ids
    else:
        mask_arg, kw, oids = mask, {}, None
    x = pred.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(norm_pix_loss(x, imgs, mask_arg, p, **kw) * 65536.0, x)
    _, ref_grad = oracle(pred, imgs, mask_arg, p, ids=oids)
    assert grad.dtype == torch.float16
    # elementwise one rounding (plus a floor far below the values): rounding the unit gradient to fp16 and
    # then scaling it (no prescale) misses this bound on about one element in ten
    exact = 65536.0 * ref_grad
    err = (grad.double() - exact).abs()
    assert (err <= 2.0 ** -10 * exact.abs() + 2.0 ** -14 * exact.abs().max()).all()


@pytest.mark.parametrize("form", ["full", "masked"])
def test_fp16_gradient_range(each_path, form):
    """fp16 pred against fp32 targets of up to 4e5 (norm_pix off): |pred - target| far above what a global
    buffer scale allows, while the true gradient (and a GradScaler-scaled one) fits in fp16. Every element
    comes back finite and within one fp16 rounding of the float64 gradient."""
    pred, imgs, mask, ids = make_inputs(2, 3, 16, 24, 8, dtype=torch.float16, seed=27, img_dtype=torch.float32)
    imgs = imgs * 2e5
    if form == "masked":
        pred, mask_arg, kw, oids = masked_rows(pred, ids), None, {"ids_masked": ids}, ids
    else:
        mask_arg, kw, oids = mask, {}, None
    _, ref_grad = oracle(pred, imgs, mask_arg, 8, norm_pix=False, ids=oids)
    assert (imgs.amax() - pred.abs().amax()) > 2.6e5  # a buffer holding diff / 4 would overflow
    for go in (1.0, 2.0 ** math.floor(math.log2(30000.0 / ref_grad.abs().max().item()))):  # as a GradScaler
        x = pred.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(norm_pix_loss(x, imgs, mask_arg, 8, norm_pix=False, **kw) * go, x)
        exact = go * ref_grad
        assert exact.abs().max() < 65504 and torch.isfinite(grad).all()
        assert ((grad.double() - exact).abs() <= 2.0 ** -10 * exact.abs() + 2.0 ** -24).all()


def test_fp16_row_scale_is_exact_powers_of_two():
    """The per-row fp16 scale: a power of two putting each row's largest |value| in [2**14, 2**15), its
    inverse exact; rows of zeros, with NaN or with an infinity get 1 (the torch twin of the kernels')."""
    from mae_fast.ops.norm_pix_loss import _row_scale_torch
    g = torch.tensor([[3e-9, -1.0], [70000.0, 2.0], [0.0, 0.0], [float("nan"), 5.0], [float("inf"), 1.0],
                      [1e-40, 0.0]])[None]  # [1, 6, 2]
    s, inv = _row_scale_torch(g)
    top = (g.nan_to_num(0.0).abs().amax(-1, keepdim=True) * s)[0, :4, 0]
    assert ((top[[0, 1, 3]] >= 2**14) & (top[[0, 1, 3]] < 2**15)).all() and top[2] == 0
    assert s[0, 2] == 1 and s[0, 4] == 1 and torch.equal(s * inv, torch.ones_like(s))
    assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))  # powers of two


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_keeps_fp32_math(each_path, dtype):
    """Inside CPU autocast (fp16 or bf16) the loss and its gradient are those without autocast, bitwise:
    pixel-scale targets (0..255, norm_pix off) no longer overflow a half-precision reduction."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=28)
    imgs, pred = imgs * 100.0, pred * 100.0
    plain = run(pred, imgs, mask, 8, norm_pix=False)
    with torch.autocast("cpu", dtype=dtype):
        cast = run(pred, imgs, mask, 8, norm_pix=False)
    assert torch.isfinite(cast[0]) and torch.equal(cast[0], plain[0]) and torch.equal(cast[1], plain[1])
    ref_loss, _ = oracle(pred, imgs, mask, 8, norm_pix=False)
    assert rel_err(cast[0], ref_loss) < 1e-5


def test_scale_kernel_row_factors(triton_path):
    """ROWS: each row of D values is multiplied by grad_output * its own unscale."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.randn(6, 5, generator=torch.Generator().manual_seed(26)).to(dev)
    unscale = torch.tensor([1.0, 0.5, 2.0, 0.25, 4.0, 1.0], device=dev)[:, None]
    out = torch.empty_like(src)
    K.norm_pix_loss_bwd_kernel[(1,)](src, torch.tensor([3.0], device=dev), unscale, out, 30, 5, BLOCK=16, ITERS=2,
                          IN_PLACE=False, ROWS=True)
    assert torch.equal(out, src * 3.0 * unscale)


def test_loss_without_gradient(record_ops):
    """no_grad / a pred that does not require grad: the same loss, and no gradient buffer is written."""
    pred, imgs, mask, ids = make_inputs(2, 3, 16, 24, 8, seed=20)
    with record_ops() as rec:
        with_grad = norm_pix_loss(pred.clone().requires_grad_(True), imgs, mask, 8).detach()
        with torch.no_grad():
            a = norm_pix_loss(pred.clone().requires_grad_(True), imgs, mask, 8)
        b = norm_pix_loss(pred, imgs, mask, 8)
    assert torch.equal(a, with_grad) and torch.equal(b, with_grad) and not b.requires_grad
    calls = rec.calls["norm_pix_loss_fwd"]  # (args, (loss, gbuf, unscale)); write_grad is the last argument
    assert [args[-1] for args, _ in calls] == [True, False, False]
    assert [out[1].numel() for _, out in calls] == [pred.numel(), 0, 0]


def test_scale_kernel_in_place_early_exit(triton_path):
    """In place, a factor of exactly 1 returns before any load or store; otherwise out = src * factor."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = lambda *v: torch.tensor(v, device=dev)  # noqa: E731
    src = torch.randn(1000, generator=torch.Generator().manual_seed(25)).to(dev)
    one, unscale = t(1.0), torch.ones((), device=dev)
    out = torch.full((1000,), 7.0, device=dev)  # a distinct out shows whether anything was stored
    K.norm_pix_loss_bwd_kernel[(2,)](src, one, unscale, out, 1000, 1, BLOCK=128, ITERS=4, IN_PLACE=True, ROWS=False)
    assert (out == 7.0).all()
    K.norm_pix_loss_bwd_kernel[(2,)](src, t(4.0), torch.tensor(0.25, device=dev), out, 1000, 1, BLOCK=128, ITERS=4,
                          IN_PLACE=True, ROWS=False)
    assert (out == 7.0).all()  # the factor is grad_output * unscale
    K.norm_pix_loss_bwd_kernel[(2,)](src, t(3.0), unscale, out, 1000, 1, BLOCK=128, ITERS=4, IN_PLACE=True, ROWS=False)
    assert torch.equal(out, src * 3.0)
    K.norm_pix_loss_bwd_kernel[(2,)](src, one, unscale, out, 1000, 1, BLOCK=128, ITERS=4, IN_PLACE=False, ROWS=False)
    assert torch.equal(out, src)  # out of place: always written


@pytest.mark.parametrize("triton", [False, True])
def test_den_prepass_fractional_weights(triton):
    """sum(weight) of the pre-pass (Triton: looping one-program kernel) against float64, and the loss and
    gradient with fractional weights, zero rows and weights above 1."""
    if triton and not TRITON_RUNS:
        pytest.skip("the Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(21)
    if triton:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        wts = torch.rand(3, 50, generator=g) * 3.0  # T = 150, BLOCK 32: 5 steps, a partial last one
        wts[:, ::7] = 0.0
        wts = wts.to(dev)
        den = torch.empty((), dtype=torch.float32, device=dev)
        K.norm_pix_loss_den_kernel[(1,)](wts, den, wts.numel(), BLOCK=32)
        assert abs(float(den) - wts.double().sum().item()) <= 1e-6 * wts.double().sum().item()
        den2 = torch.empty((), dtype=torch.float32, device=dev)
        K.norm_pix_loss_den_kernel[(1,)](wts, den2, wts.numel(), BLOCK=32)
        assert torch.equal(den, den2)
    pred, imgs, mask, _ = make_inputs(3, 3, 16, 24, 8, seed=22)
    weights = mask * torch.rand(mask.shape, generator=g) * 2.5
    weights[:, 1] = 0.0
    loss, grad = run(pred, imgs, weights, 8)
    ref_loss, ref_grad = oracle(pred, imgs, weights, 8)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    assert (grad[:, 1] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes 0/0, inf-inf
def test_unchecked_empty_mask_gives_nan():
    """check=False and sum(mask) == 0: NaN loss and NaN gradient (w / den = 0 / 0), as before."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=23)
    loss, grad = run(pred, imgs, torch.zeros_like(mask), 8, check=False)
    assert torch.isnan(loss) and torch.isnan(grad).all()


def test_deterministic():
    pred, imgs, mask, _ = make_inputs(2, 3, 32, 48, 8, seed=10)
    a = run(pred, imgs, mask, 8)
    b = run(pred, imgs, mask, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_uncounted_patches_are_not_read():
    """A NaN in a patch with mask 0 does not reach the loss (documented difference from the reference)."""
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 8, seed=12, ratio=0.5)
    mask[:, 0] = 0.0
    clean = run(pred, imgs, mask, 8)
    pred2, imgs2 = pred.clone(), imgs.clone()
    pred2[:, 0] = float("nan")
    imgs2[:, :, :8, :8] = float("inf")
    dirty = run(pred2, imgs2, mask, 8)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes 0/0, inf-inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_imgs_raise_when_checked(bad):
    n, c, h, w, p = 2, 3, 16, 24, 8
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p, seed=24)
    mask[1, 4] = 1.0  # image 1, patch 4 (row 1, column 1) counts
    ids[1, 0] = 4
    ids[1, 1:] = torch.tensor([i for i in range(6) if i != 4][: ids.shape[1] - 1])
    dirty = imgs.clone()
    dirty[1, 2, 10, 12] = bad  # inside image 1, patch 4
    pm = torch.stack([pred[b, ids[b]] for b in range(n)])
    with pytest.raises(ValueError, match=r"imgs has non-finite values.*image 1, patch 4"):
        norm_pix_loss(pred, dirty, mask, p)
    with pytest.raises(ValueError, match=r"imgs has non-finite values.*image 1, patch 4"):
        norm_pix_loss(pm, dirty, None, p, ids_masked=ids)
    with pytest.raises(ValueError, match="imgs has non-finite values"):
        norm_pix_loss(pred, dirty, mask, p, check=True)
    # unchecked: computed, not finite
    assert not torch.isfinite(norm_pix_loss(pred, dirty, mask, p, check=False))


def test_bad_inputs():
    n, c, h, w, p = 2, 3, 16, 24, 8
    pred, imgs, mask, ids = make_inputs(n, c, h, w, p)
    with pytest.raises(ValueError, match="patch_size=5"):
        norm_pix_loss(pred, imgs, mask, 5)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 6, 192\]"):
        norm_pix_loss(pred[:, :, :-1], imgs, mask, p)
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 6\]"):
        norm_pix_loss(pred, imgs, mask[:, :-1], p)
    with pytest.raises(ValueError, match="mask is empty"):
        norm_pix_loss(pred, imgs, torch.zeros_like(mask), p)
    with pytest.raises(ValueError, match="mask must be given"):
        norm_pix_loss(pred, imgs, None, p)
    with pytest.raises(TypeError, match="pred must have dtype"):
        norm_pix_loss(pred.long(), imgs, mask, p)
    with pytest.raises(TypeError, match="imgs must be a torch.Tensor"):
        norm_pix_loss(pred, imgs.numpy(), mask, p)
    with pytest.raises(ValueError, match="imgs must have 4 dims"):
        norm_pix_loss(pred, imgs[0], mask, p)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        norm_pix_loss(pred, imgs, mask, 0)
    with pytest.raises(ValueError, match="is on meta"):
        norm_pix_loss(pred, imgs.to("meta"), mask, p)
    with pytest.raises(ValueError, match="is on meta"):
        norm_pix_loss(pred, imgs, mask.to("meta"), p)
    # masked-only form
    pm = torch.stack([pred[b, ids[b]] for b in range(n)])
    with pytest.raises(ValueError, match=r"pred must have shape \[2, 5, 192\]"):
        norm_pix_loss(pm[:, :-1], imgs, None, p, ids_masked=ids)
    with pytest.raises(ValueError, match="ids_masked has entries outside"):
        norm_pix_loss(pm, imgs, None, p, ids_masked=ids + 6)
    with pytest.raises(TypeError, match="ids_masked must have dtype"):
        norm_pix_loss(pm, imgs, None, p, ids_masked=ids.float())
    with pytest.raises(ValueError, match="M >= 1"):
        norm_pix_loss(pm[:, :0], imgs, None, p, ids_masked=ids[:, :0])
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 6\]"):
        norm_pix_loss(pm, imgs, mask[:, :-1], p, ids_masked=ids)
    wrong = 1.0 - mask
    with pytest.raises(ValueError, match="mask does not match ids_masked"):
        norm_pix_loss(pm, imgs, wrong, p, ids_masked=ids)
    with pytest.raises(ValueError, match="is on meta"):
        norm_pix_loss(pm, imgs, None, p, ids_masked=ids.to("meta"))
    with pytest.raises(ValueError, match="at least one channel"):
        norm_pix_loss(pred[:, :, :0], imgs[:, :0], mask, p, norm_pix=False)
    with pytest.raises(ValueError, match="at least one image"):
        norm_pix_loss(pred[:0], imgs[:0], mask[:0], p)
    with pytest.raises(ValueError, match="patch_size=8"):
        norm_pix_loss(pred, imgs[:, :, :12], mask, p)
    with pytest.raises(ValueError, match="mask must have dtype|mask must have 2 dims"):
        norm_pix_loss(pred, imgs, mask[None], p)
    with pytest.raises(ValueError, match="ids_masked must have shape"):
        norm_pix_loss(pm, imgs, None, p, ids_masked=ids[:1])
    with pytest.raises(ValueError, match="at least 2 values"):
        norm_pix_loss(torch.zeros(1, 4, 1), torch.zeros(1, 1, 2, 2), torch.ones(1, 4), 1)
    for bad_eps in (None, "1e-6", True):
        with pytest.raises(TypeError, match="eps must be a real number"):
            norm_pix_loss(pred, imgs, mask, p, eps=bad_eps)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        norm_pix_loss(pred, imgs, mask, p, eps=float("nan"))
    assert norm_pix_loss(pred, imgs, mask, p, eps=torch.tensor(1e-6)) == norm_pix_loss(pred, imgs, mask, p)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [14, 16])
def test_gpu_real_sizes(dtype, p):
    n, c, size = 16, 3, 224
    pred, imgs, mask, ids = make_inputs(n, c, size, size, p, dtype=dtype, seed=p)
    loss, grad = run(pred.cuda(), imgs.cuda(), mask.cuda(), p)
    ref_loss, ref_grad = oracle(pred, imgs, mask, p)
    same_loss, same_grad = run_torch_same_dtype(pred, imgs, mask, p)
    assert rel_err(loss, ref_loss) < 1e-5
    ulp = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert_close_to_oracle(grad, ref_grad, same_grad, atol=ulp * ref_grad.abs().max().item(), name="grad")
    pm = torch.stack([pred[b, ids[b]] for b in range(n)])
    loss_m, grad_m = run(pm.cuda(), imgs.cuda(), None, p, ids_masked=ids.cuda())
    assert rel_err(loss_m, ref_loss) < 1e-5
    # same rows as the full form (fp16 gradients here are subnormal: compare with the op, not the oracle)
    assert rel_err(grad_m, torch.stack([grad[b, ids[b]] for b in range(n)]).cpu()) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_video_real_size(dtype):
    n, c, t, size, p, u = 4, 3, 16, 224, 16, 2  # L = 8 * 196 = 1568 tubelets, D = 1536
    pred, vid, mask, ids = make_video_inputs(n, c, t, size, size, p, u, dtype=dtype, seed=p)
    loss, grad = run(pred.cuda(), vid.cuda(), mask.cuda(), p, t_patch_size=u)
    ref_loss, ref_grad = oracle(pred, vid, mask, p, u=u)
    _, same_grad = run_torch_same_dtype(pred, vid, mask, p, u=u)
    assert rel_err(loss, ref_loss) < 1e-5
    ulp = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7}[dtype]
    assert_close_to_oracle(grad, ref_grad, same_grad, atol=ulp * ref_grad.abs().max().item(), name="grad")
    loss_m, _ = run(masked_rows(pred, ids).cuda(), vid.cuda(), None, p, ids_masked=ids.cuda(), t_patch_size=u)
    assert rel_err(loss_m, ref_loss) < 1e-5


@pytest.mark.gpu
def test_gpu_compile_triton_visible_and_reference():
    n, c, size, p = 8, 3, 224, 16
    pred, imgs, mask, ids = make_inputs(n, c, size, size, p, dtype=torch.bfloat16, seed=1)
    pred, imgs, mask, ids = pred.cuda(), imgs.cuda(), mask.cuda(), ids.cuda()
    x = pred.clone().requires_grad_(True)
    eager = norm_pix_loss(x, imgs, mask, p)
    eager.backward()
    ge = x.grad.clone()
    x.grad = None
    comp = torch.compile(lambda a, b, m: norm_pix_loss(a, b, m, p), fullgraph=True)(x, imgs, mask)
    comp.backward()
    # same kernels; inductor may pass the float arguments (eps, 2/D) as fp64: last-bit differences only
    assert rel_err(comp, eager) < 1e-6 and rel_err(x.grad, ge) < 1e-2
    assert (x.grad.float() - ge.float()).abs().max() <= 2 ** -7 * ge.float().abs().max()
    r = reference.patch_loss(imgs.float(), pred.float(), mask, p, norm_pix_loss=True)
    assert rel_err(eager, r) < 1e-5
    pm = torch.stack([pred[b, ids[b]] for b in range(n)]).requires_grad_(True)
    comp_m = torch.compile(lambda a, b, i: norm_pix_loss(a, b, None, p, ids_masked=i), fullgraph=True)(pm, imgs, ids)
    comp_m.backward()
    assert rel_err(comp_m, r) < 1e-5
    assert rel_err(pm.grad, torch.stack([ge[b, ids[b]] for b in range(n)])) < 1e-2


def test_one_patch_per_image_leaves_imgs_alone():
    """p == H == W with C == 1: patchify is a view of imgs; the torch path must not write through it."""
    imgs = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(30))
    keep = imgs.clone()
    pred = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(31))
    mask = torch.ones(2, 1)
    x = pred.clone().requires_grad_(True)
    loss = norm_pix_loss(x, imgs, mask, 8)
    loss.backward()
    ref_loss, ref_grad = oracle(pred, imgs, mask, 8)
    assert torch.equal(imgs, keep)
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert rel_err(x.grad, ref_grad) < 1e-5
