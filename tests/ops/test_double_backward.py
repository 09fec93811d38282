"""Double backward through every op, by every autograd API, on both CPU paths: the ops' backwards are not
differentiable, so differentiating a gradient that came out of one raises the error naming the op, however
the first and the second derivative are asked for (``.backward(create_graph=True)``, ``torch.autograd.grad``
with ``create_graph``, ``allow_unused``, with respect to the same or another input, a second-order term mixed
with a first-order one as in ``grad((g * x).sum(), x)``). torch.func transforms raise an error naming the op.
Where the op runs plain autograd (the loss when imgs requires grad), the second derivative is right.
"""
import pytest
import torch

from mae_fast import ops, reference
from mae_fast.testing import randn, random_ids


def cases():
    """name -> (call(x, other) -> a tensor, x, other): x the differentiated input, other a second input."""
    N, L, K, D = 2, 6, 3, 8
    ids_keep, ids_restore = random_ids(N, L, K, seed=1)
    imgs = torch.rand(N, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(N, L).scatter_(1, ids_restore.argsort(1)[:, K:], 1.0)
    return {
        "gather_tokens": (lambda x, pos: ops.gather_tokens(x, ids_keep, pos), randn(N, L, D), randn(1, L, D, seed=1)),
        "gather_patches": (lambda x, scale: ops.gather_patches(x * scale, ids_keep, 4), randn(N, 3, 8, 12),
                           randn(1, seed=1)),
        "unshuffle_tokens": (lambda x, mt: ops.unshuffle_tokens(x, ids_restore, mt), randn(N, 1 + K, D),
                             randn(1, 1, D, seed=1)),
        "norm_pix_loss": (lambda pred, scale: ops.norm_pix_loss(pred * scale, imgs, mask, 4), randn(N, L, 48),
                          randn(1, seed=1)),
        "add_layer_norm": (lambda x, w: ops.add_layer_norm(x, w, None, 1e-5, branch=x.flip(0))[0], randn(N, 5, D),
                           randn(D, seed=1)),
        "bias_gelu": (lambda x, b: ops.bias_gelu(x, b), randn(N, 5, D), randn(D, seed=1)),
        "residual_add": (lambda x, b: ops.residual_add(x.flip(0), x, b), randn(N, 5, D), randn(D, seed=1)),
        "linear": (lambda x, w: ops.linear(x, w), randn(N, 5, D), randn(4, D, seed=1)),
        "self_attention": (lambda x, w: ops.self_attention(x, w, None, 2, backend="math"), randn(N, 5, D),
                           randn(3 * D, D, seed=1) * D ** -0.5),
        "self_attention_mae_fast": (lambda x, w: ops.self_attention(x, w, None, 2, backend="mae_fast"),
                                    randn(N, 5, D), randn(3 * D, D, seed=1) * D ** -0.5),
        "qkv_attention": (lambda x, s: ops.qkv_attention(x * s, 2), randn(N, 5, 3 * D), randn(1, seed=1)),
        "mlp": (lambda x, w: ops.mlp(x, w, None, w.t()), randn(N, 5, D), randn(4 * D, D, seed=1) * D ** -0.5),
    }


def first_order(name, how):
    """(g = d sum(f^2) / dx, made with create_graph unless ``how`` is "plain", x, other)."""
    call, x, other = cases()[name]
    x, other = x.clone().requires_grad_(True), other.clone().requires_grad_(True)
    out = call(x, other)
    scalar = out if out.dim() == 0 else out.square().sum()
    if how in ("grad", "plain"):
        (g,) = torch.autograd.grad(scalar, x, create_graph=how == "grad")
    else:
        scalar.backward(create_graph=True)
        g = x.grad
    return g, x, other


SECOND = {
    "backward": lambda g, x, other: (g * x).sum().backward(),
    "grad": lambda g, x, other: torch.autograd.grad((g * x).sum(), x),
    "grad_allow_unused": lambda g, x, other: torch.autograd.grad(g.square().sum(), x, allow_unused=True),
    "grad_other_input": lambda g, x, other: torch.autograd.grad(g.square().sum(), other, allow_unused=True),
    "grad_both": lambda g, x, other: torch.autograd.grad(g.square().sum(), [x, other], create_graph=True),
}
KERNEL_OPS = [name for name in cases() if name != "linear"]


def op_name(case: str) -> str:
    """The op a case runs ("self_attention_mae_fast": self_attention on mae_fast's attention)."""
    return case.replace("_mae_fast", "")


def check(name, first, second):
    g, x, other = first_order(name, first)
    plain = first_order(name, "plain")[0]
    torch.testing.assert_close(g, plain)  # the first derivative is the plain one
    assert g.requires_grad, "a gradient made under create_graph=True must not pose as a constant"
    with pytest.raises(RuntimeError, match=f"mae_fast.ops.{op_name(name)}: its backward is not differentiable"):
        SECOND[second](g, x, other)


@pytest.mark.parametrize("second", list(SECOND))
@pytest.mark.parametrize("first", ["grad", "backward"])
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_second_derivative_names_the_op(each_path, name, first, second):
    check(name, first, second)


@pytest.mark.parametrize("second", list(SECOND))
@pytest.mark.parametrize("first", ["grad", "backward"])
def test_second_derivative_names_the_op_linear(torch_path, first, second):
    check("linear", first, second)


@pytest.mark.parametrize("transform", ["grad", "vjp", "vmap"])
@pytest.mark.parametrize("name", list(cases()))
def test_torch_func_names_the_op(torch_path, name, transform):
    call, x, other = cases()[name]
    f = lambda t: call(t, other).sum()  # noqa: E731
    run = {"grad": lambda: torch.func.grad(f)(x), "vjp": lambda: torch.func.vjp(f, x),
           "vmap": lambda: torch.func.vmap(f)(x.unsqueeze(0))}[transform]
    with pytest.raises(RuntimeError, match=f"mae_fast.ops.{op_name(name)}: torch.func transforms"):
        run()


def test_loss_second_derivative_through_imgs_is_right():
    """imgs requiring grad: the loss is plain autograd through the formula (as the reference), so second
    derivatives exist and equal the float64 reference's, the mixed one of the brief included."""
    imgs = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) < 0.6).float()
    mask[:, 0] = 1
    pred = randn(2, 6, 48, seed=2)
    results = []
    for dtype, loss_fn in ((torch.float32, lambda p, i: ops.norm_pix_loss(p, i, mask, 4)),
                           (torch.float64, lambda p, i: reference.patch_loss(i, p, mask.double(), 4, True))):
        p, i = pred.to(dtype).requires_grad_(True), imgs.to(dtype).requires_grad_(True)
        gp, gi = torch.autograd.grad(loss_fn(p, i), [p, i], create_graph=True)
        results.append(torch.autograd.grad((gp * p).sum() + gi.square().sum(), [p, i]))
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
