"""Autograd corners of every op, on both CPU paths: the gradient with respect to imgs of the loss (the
reference differentiates through the normalised target), gradcheck with undefined output gradients (what
torch.compile and gradcheck hand a backward), outputs a compiled graph does not use, and the meta device.
Double backward: test_double_backward.py."""
import pytest
import torch
from torch.autograd import gradcheck

from mae_fast import ops, reference
from mae_fast.ops.paths import triton_interpret
from mae_fast.testing import randn, random_ids



def _loss_inputs(seed=0, video=False):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(2, 3, 4, 8, 12, generator=g) if video else torch.rand(2, 3, 8, 12, generator=g)
    L = 12 if video else 6
    mask = (torch.rand(2, L, generator=g) < 0.6).float()
    mask[:, 0] = 1.0
    ids = torch.stack([torch.randperm(L, generator=g)[:3] for _ in range(2)])
    return imgs, mask, ids


def _the_op(form, video):
    u = 2 if video else 1
    if form == "full":
        return lambda pred, imgs, mask, ids, norm_pix: ops.norm_pix_loss(pred, imgs, mask, 4, norm_pix, t_patch_size=u)
    return lambda pred, imgs, mask, ids, norm_pix: ops.norm_pix_loss(pred, imgs, None, 4, norm_pix, ids_masked=ids,
                                                                     t_patch_size=u)


def _reference(pred, imgs, mask, ids, norm_pix, form, u):
    if form == "masked":  # the full form with those rows counted: pred rows scattered to their patches
        L = mask.shape[1]
        full = torch.zeros(pred.shape[0], L, pred.shape[2], dtype=pred.dtype).scatter(
            1, ids[..., None].expand(-1, -1, pred.shape[2]), pred)
        mask = torch.zeros(pred.shape[0], L, dtype=pred.dtype).scatter(1, ids, 1.0)
        pred = full
    return reference.patch_loss(imgs, pred, mask, 4, norm_pix, t_patch_size=u)


# ------------------------------------------------------------------------------------------ grad of imgs
@pytest.mark.parametrize("form", ["full", "masked"])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("video", [False, True])
def test_loss_gradient_with_respect_to_imgs(form, norm_pix, video):
    """imgs requiring grad: both gradients equal the reference's (float64 autograd), and with only imgs
    requiring grad there is no in-place error and the same imgs gradient. (That case is autograd through the
    plain formula on every path: no kernel to run it on.)"""
    imgs, mask, ids = _loss_inputs(video=video)
    L, D = mask.shape[1], 3 * 4 * 4 * (2 if video else 1)
    pred = randn(2, L if form == "full" else 3, D, seed=1)
    op = _the_op(form, video)
    x, im = pred.clone().requires_grad_(True), imgs.clone().requires_grad_(True)
    loss = op(x, im, mask, ids, norm_pix)
    gx, gi = torch.autograd.grad(loss, [x, im])
    xo, io = pred.double().requires_grad_(True), imgs.double().requires_grad_(True)
    ref = _reference(xo, io, mask.double(), ids, norm_pix, form, 2 if video else 1)
    rx, ri = torch.autograd.grad(ref, [xo, io])
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gi.double(), ri, rtol=1e-4, atol=1e-6)
    im2 = imgs.clone().requires_grad_(True)
    (gi2,) = torch.autograd.grad(op(pred, im2, mask, ids, norm_pix), [im2])
    torch.testing.assert_close(gi2, gi, rtol=1e-5, atol=1e-7)
    assert torch.equal(im2.detach(), imgs)


def test_loss_imgs_gradient_under_autocast():
    """bf16 pred, fp32 imgs requiring grad, inside CPU autocast: fp32 math, gradients in the inputs' dtypes."""
    imgs, mask, ids = _loss_inputs(seed=3)
    pred = randn(2, 6, 48, seed=4, dtype=torch.bfloat16).requires_grad_(True)
    im = imgs.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.norm_pix_loss(pred, im, mask, 4)
    loss.backward()
    assert loss.dtype == torch.float32 and pred.grad.dtype == torch.bfloat16 and im.grad.dtype == torch.float32
    io = imgs.double().requires_grad_(True)
    reference.patch_loss(io, pred.detach().double(), mask.double(), 4, True).backward()
    torch.testing.assert_close(im.grad.double(), io.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ token ops
def _token_cases():
    N, L, K, D = 2, 6, 3, 4
    ids, restore = random_ids(N, L, K)
    return {
        "gather_tokens": (lambda x: ops.gather_tokens(x, ids, prefix=torch.zeros(1, 1, D)), randn(N, L, D)),
        "unshuffle_tokens": (lambda x: ops.unshuffle_tokens(x, restore, torch.zeros(D)), randn(N, 1 + K, D)),
        "gather_patches": (lambda x: ops.gather_patches(x, ids, 4), randn(N, 2, 8, 12)),
    }


# ------------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("name", ["gather_tokens", "unshuffle_tokens", "gather_patches"])
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck_token_ops(each_path, name):
    """torch.autograd.gradcheck (fp32: the ops are linear, central differences are exact up to rounding),
    including its undefined-output-gradient check."""
    fn, x = _token_cases()[name]
    assert gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-2, atol=1e-3, rtol=1e-3, fast_mode=True,
                     check_undefined_grad=True)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck_loss_through_registered_ops(each_path, record_ops):
    """The loss (quadratic in pred) through its registered ops, the path torch.compile takes and the one
    where a graph may run backward more than once; undefined output gradients included."""
    imgs, mask, ids = _loss_inputs()
    pred = randn(2, 6, 48, seed=2).requires_grad_(True)
    with record_ops() as rec:
        assert gradcheck(lambda p: ops.norm_pix_loss(p, imgs, mask, 4), (pred,), eps=1e-2, atol=2e-3, rtol=2e-3,
                         fast_mode=True, check_undefined_grad=True)
    assert "norm_pix_loss_bwd" in rec.calls


def test_registered_backwards_take_zero_gradients(each_path, record_ops):
    """What a compiled graph hands a backward whose output gradient is undefined: zeros. Every registered
    backward returns zero gradients for them."""
    N, L, K, D = 2, 6, 3, 4
    ids, restore = random_ids(N, L, K)
    with record_ops():
        gx, gpos, gpre = torch.ops.mae_fast.gather_tokens_backward(torch.zeros(N, 1 + K, D), ids, L, 1,
                                                                   True, True, True)
        assert not gx.any() and not gpos.any() and not gpre.any()
        gx, gpos, gmask = torch.ops.mae_fast.unshuffle_tokens_backward(torch.zeros(N, 1 + L, D), restore, K, 1,
                                                                       True, True, True, torch.float32)
        assert not gx.any() and not gpos.any() and not gmask.any()
        gi = torch.ops.mae_fast.gather_patches_backward(torch.zeros(N, K, 32), ids, 2, 1, 8, 12, 4, 1)
        assert not gi.any()
        imgs, mask, _ = _loss_inputs()
        loss, gbuf, unscale = torch.ops.mae_fast.norm_pix_loss_fwd(randn(2, 6, 48), imgs, mask, None, 4, True, 1e-6,
                                                                   1, True)
        assert not torch.ops.mae_fast.norm_pix_loss_bwd(gbuf, unscale, torch.zeros(())).any()


@pytest.mark.skipif(triton_interpret(), reason="torch.compile traces the plain torch path on a CPU (no interpreter)")
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_graph_with_unused_outputs(backend):
    """A compiled function whose op outputs are partly unused by the loss: gradients equal eager's."""
    N, L, K, D = 2, 6, 3, 4
    ids, restore = random_ids(N, L, K)
    imgs, mask, _ = _loss_inputs()

    def f(x, pred):
        y = ops.gather_tokens(x, ids)
        z = ops.unshuffle_tokens(y, restore, torch.zeros(D), num_prefix=0)
        return (x * 2).sum(), y, z, ops.norm_pix_loss(pred, imgs, mask, 4)

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    for pick in (lambda a, y, z, l: a, lambda a, y, z, l: y.sum() + l, lambda a, y, z, l: z.square().sum()):
        grads = []
        for fn in (f, compiled):
            x, pred = randn(N, L, D).requires_grad_(True), randn(2, 6, 48, seed=1).requires_grad_(True)
            out = pick(*fn(x, pred))
            got = torch.autograd.grad(out, [x, pred], allow_unused=True, materialize_grads=True)
            grads.append(got)
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ meta device
def test_meta_device_forward_and_backward():
    """Shapes only: every op runs forward and backward on meta tensors (no value is read)."""
    N, L, K, D = 2, 6, 3, 4
    ids, restore = (t.to("meta") for t in random_ids(N, L, K))
    x = torch.empty(N, L, D, device="meta", requires_grad=True)
    ops.gather_tokens(x, ids).sum().backward()
    assert x.grad.shape == x.shape
    y = torch.empty(N, 1 + K, D, device="meta", requires_grad=True)
    ops.unshuffle_tokens(y, restore, torch.empty(D, device="meta")).sum().backward()
    assert y.grad.shape == y.shape
    im = torch.empty(N, 2, 8, 12, device="meta", requires_grad=True)
    ops.gather_patches(im, ids, 4).sum().backward()
    assert im.grad.shape == im.shape
    for dtype in (torch.float32, torch.float16):
        pred = torch.empty(N, 6, 32, device="meta", dtype=dtype, requires_grad=True)
        ops.norm_pix_loss(pred, torch.empty(N, 2, 8, 12, device="meta"), torch.empty(N, 6, device="meta"),
                          4).backward()
        assert pred.grad.shape == pred.shape and pred.grad.dtype == dtype


def test_float64_gradients_stay_float64():
    """float64 runs on the torch path: its gradients, through repeated and invalid ids too, agree with
    torch.gather's in float64 (to 1e-12), not to fp32's precision."""
    F64 = torch.float64
    ids = torch.tensor([[2, 2, 0, 9], [1, 3, 3, 3]])  # repeats, one id outside [0, 6)
    valid = ids < 6
    x = randn(2, 6, 5, dtype=F64).requires_grad_(True)
    g = randn(2, 4, 5, dtype=F64, seed=1)
    (gx,) = torch.autograd.grad(ops.gather_tokens(x, ids, check_indices=False), x, g)
    (ref,) = torch.autograd.grad(torch.gather(x, 1, ids.clamp(max=5)[..., None].expand(-1, -1, 5)), x,
                                 g * valid[..., None])
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-12)
    restore = torch.tensor([[0, 1, 1, 4, 5, 2], [5, 4, 3, 2, 1, 0]])
    y, mt = randn(2, 1 + 3, 5, dtype=F64).requires_grad_(True), randn(5, dtype=F64).requires_grad_(True)
    gd = randn(2, 7, 5, dtype=F64, seed=2)
    got = torch.autograd.grad(ops.unshuffle_tokens(y, restore, mt, check_indices=False), [y, mt], gd)
    want = torch.autograd.grad(reference.decoder_input(y, restore, mt), [y, mt], gd)
    for a, b in zip(got, want):
        assert a.dtype == F64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    imgs = torch.rand(2, 3, 8, 12, dtype=F64).requires_grad_(True)
    pred = randn(2, 3, 48, dtype=F64).requires_grad_(True)
    ids_m = torch.tensor([[0, 2, 5], [1, 1, 4]])
    loss = ops.norm_pix_loss(pred, imgs, None, 4, ids_masked=ids_m, check=False)
    target = reference.patchify(imgs, 4).gather(1, ids_m[..., None].expand(-1, -1, 48))
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    ref_loss = ((pred - target) ** 2).mean()
    for a, b in zip(torch.autograd.grad(loss, [pred, imgs]), torch.autograd.grad(ref_loss, [pred, imgs])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
