"""Every tensor an op takes, in any memory layout, on both CPU paths (the Triton kernels under the
interpreter, and the plain torch path): strided views, transposed (column-major) and channels-last tensors,
expanded tensors (stride 0, as ``.expand`` and ``.sum()``'s gradient make them), views at an odd storage
offset; weights, biases, positions, mask tokens, imgs, ids, masks and the output gradient a backward gets.

The property: an op gives the same output and the same gradients whatever the layout of its inputs; the
oracle is the op itself on contiguous copies of the same values. Hypothesis draws one layout per tensor.
"""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mae_fast import ops
from mae_fast.testing import randn, random_ids

SETTINGS = settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # no shrinking:
# under the interpreter it takes minutes; the failing draw is printed as it is
KINDS = ("contiguous", "strided", "transposed", "expanded", "offset", "channels_last")


# ------------------------------------------------------------------------------------------ layouts
def lay(t: torch.Tensor, kind: str, dim: int = 0) -> torch.Tensor:
    """``t``'s values (for "expanded": its first slice along ``dim``, repeated) in the memory layout ``kind``;
    differentiable with respect to ``t``."""
    if kind == "strided":  # every other element of a tensor twice as long in the last dim: all strides doubled
        return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    if kind == "transposed":  # column-major in the last two dims
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "expanded":  # stride 0 along dim
        return t.narrow(dim, 0, 1).expand(t.shape)
    if kind == "offset":  # a view one element into its storage: a pointer not aligned to 16 bytes
        return torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


def kinds_for(t: torch.Tensor, expand_dims) -> list:
    """(kind, dim) pairs that apply to ``t``: expanding only along ``expand_dims`` (dims where equal slices
    keep the op's contract, e.g. the batch of an index tensor)."""
    out = [("contiguous", 0), ("strided", 0), ("offset", 0)]
    if t.dim() >= 2:
        out.append(("transposed", 0))
    if t.dim() == 4:
        out.append(("channels_last", 0))
    out += [("expanded", d) for d in expand_dims if t.shape[d] > 1]
    return out


# ------------------------------------------------------------------------------------------ the ops
def _both(y, s):
    return y.to(s.dtype) * 1.5 + s * 0.5


def cases():
    """name -> (inputs {name: tensor}, dims each input may be expanded along, call(**inputs) -> one tensor)."""
    N, L, K, D = 2, 6, 3, 8
    ids_keep, ids_restore = random_ids(N, L, K, seed=1)
    imgs = torch.rand(N, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(N, 6).scatter_(1, ids_restore.argsort(1)[:, K:], 1.0)  # [N, L] 1 = removed
    ids_masked = ids_restore.argsort(1)[:, K:]  # [N, L - K]
    return {
        "add_layer_norm": (
            dict(x=randn(N, 5, D, seed=3), weight=randn(D, seed=4), bias=randn(D, seed=5),
                 branch=randn(N, 5, D, seed=6), branch_bias=randn(D, seed=7)),
            dict(x=(0, 1), weight=(0,), bias=(0,), branch=(0, 1), branch_bias=(0,)),
            lambda x, weight, bias, branch, branch_bias: _both(*ops.add_layer_norm(
                x, weight, bias, 1e-5, branch=branch, branch_bias=branch_bias))),
        "add_layer_norm_no_branch": (
            dict(x=randn(N, 5, D, seed=3), weight=randn(D, seed=4), bias=randn(D, seed=5)),
            dict(x=(0, 1), weight=(0,), bias=(0,)),
            lambda x, weight, bias: _both(*ops.add_layer_norm(x, weight, bias, 1e-5))),
        "bias_gelu": (dict(h=randn(N, 5, 3 * D, seed=8), bias=randn(3 * D, seed=9)),
                      dict(h=(0, 1, 2), bias=(0,)), lambda h, bias: ops.bias_gelu(h, bias)),
        "residual_add": (dict(s=randn(N, 5, D, seed=10), branch=randn(N, 5, D, seed=11), bias=randn(D, seed=12)),
                         dict(s=(0, 1, 2), branch=(0, 1, 2), bias=(0,)),
                         lambda s, branch, bias: ops.residual_add(s, branch, bias)),
        "linear": (dict(x=randn(N, 5, D, seed=13), weight=randn(4, D, seed=14), bias=randn(4, seed=15)),
                   dict(x=(0, 1), weight=(0, 1), bias=(0,)), lambda x, weight, bias: ops.linear(x, weight, bias)),
        "self_attention": (
            dict(x=randn(N, 5, D, seed=16), qkv_weight=randn(3 * D, D, seed=17) * D ** -0.5,
                 qkv_bias=randn(3 * D, seed=18)),
            dict(x=(0, 1), qkv_weight=(1,), qkv_bias=(0,)),
            lambda x, qkv_weight, qkv_bias: ops.self_attention(x, qkv_weight, qkv_bias, 2, backend="math")),
        "self_attention_mae_fast": (
            dict(x=randn(N, 5, D, seed=16), qkv_weight=randn(3 * D, D, seed=17) * D ** -0.5,
                 qkv_bias=randn(3 * D, seed=18)),
            dict(x=(0, 1), qkv_weight=(1,), qkv_bias=(0,)),
            lambda x, qkv_weight, qkv_bias: ops.self_attention(x, qkv_weight, qkv_bias, 2, backend="mae_fast")),
        "qkv_attention": (dict(qkv=randn(N, 5, 3 * D, seed=30)), dict(qkv=(0, 1, 2)),
                          lambda qkv: ops.qkv_attention(qkv, 2)),
        "mlp": (
            dict(x=randn(N, 5, D, seed=31), fc1_weight=randn(4 * D, D, seed=32) * D ** -0.5,
                 fc1_bias=randn(4 * D, seed=33), fc2_weight=randn(D, 4 * D, seed=34) * (4 * D) ** -0.5,
                 fc2_bias=randn(D, seed=35)),
            dict(x=(0, 1), fc1_weight=(0, 1), fc1_bias=(0,), fc2_weight=(0, 1), fc2_bias=(0,)),
            lambda x, fc1_weight, fc1_bias, fc2_weight, fc2_bias: ops.mlp(x, fc1_weight, fc1_bias, fc2_weight,
                                                                          fc2_bias)),
        "gather_tokens": (
            dict(x=randn(N, L, D, seed=19), ids_keep=ids_keep, pos_embed=randn(1, L, D, seed=20),
                 prefix=randn(1, 2, D, seed=21)),
            dict(x=(0, 1, 2), ids_keep=(0,), pos_embed=(1, 2), prefix=(1, 2)),
            lambda x, ids_keep, pos_embed, prefix: ops.gather_tokens(x, ids_keep, pos_embed, prefix)),
        "gather_patches": (dict(imgs=randn(N, 3, 8, 12, seed=22), ids_keep=ids_keep), dict(imgs=(0, 1, 2, 3),
                           ids_keep=(0,)), lambda imgs, ids_keep: ops.gather_patches(imgs, ids_keep, 4)),
        "unshuffle_tokens": (
            dict(x=randn(N, 1 + K, D, seed=23), ids_restore=ids_restore, mask_token=randn(1, 1, D, seed=24),
                 pos_embed=randn(1, 1 + L, D, seed=25)),
            dict(x=(0, 1, 2), ids_restore=(0,), mask_token=(2,), pos_embed=(1, 2)),
            lambda x, ids_restore, mask_token, pos_embed: ops.unshuffle_tokens(x, ids_restore, mask_token,
                                                                               pos_embed)),
        "norm_pix_loss": (dict(pred=randn(N, 6, 48, seed=26), imgs=imgs, mask=mask),
                          dict(pred=(0, 1, 2), imgs=(0, 1, 2, 3), mask=(0,)),
                          lambda pred, imgs, mask: ops.norm_pix_loss(pred, imgs, mask, 4)),
        "norm_pix_loss_masked": (dict(pred=randn(N, L - K, 48, seed=27), imgs=imgs, ids_masked=ids_masked),
                                 dict(pred=(0, 1, 2), imgs=(0, 1, 2, 3), ids_masked=(0,)),
                                 lambda pred, imgs, ids_masked: ops.norm_pix_loss(pred, imgs, None, 4,
                                                                                  ids_masked=ids_masked)),
    }


KERNEL_OPS = [name for name in cases() if name != "linear"]  # linear has no Triton kernel: the torch path only


def run(call, inputs, layouts, grad_layout, oracle=False):
    """(output, gradients of the float inputs) with each input laid out as ``layouts`` says and the output
    gradient as ``grad_layout``; ``oracle``: contiguous copies of those same values instead."""
    leaves = {k: t.detach().clone().requires_grad_(t.is_floating_point()) for k, t in inputs.items()}
    args = {k: lay(t, *layouts[k]) for k, t in leaves.items()}
    out = call(**{k: v.contiguous() if oracle else v for k, v in args.items()})
    g = lay(randn(*out.shape, seed=99), *grad_layout) if out.dim() else torch.ones(())
    wanted = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, (g.contiguous() if oracle else g).to(out.dtype))
    return out.detach(), grads


def check_layouts(name, data):
    inputs, expand, call = cases()[name]
    layouts = {k: data.draw(st.sampled_from(kinds_for(t, expand.get(k, ()))), label=k) for k, t in inputs.items()}
    probe = call(**{k: t for k, t in inputs.items()})
    grad_kinds = kinds_for(probe, range(probe.dim())) if probe.dim() else [("contiguous", 0)]
    grad_layout = data.draw(st.sampled_from(grad_kinds), label="grad_output")
    out, grads = run(call, inputs, layouts, grad_layout)
    ref, ref_grads = run(call, inputs, layouts, grad_layout, oracle=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * (1 + r.abs().max().item()))


@pytest.mark.parametrize("name", KERNEL_OPS)
@SETTINGS
@given(data=st.data())
def test_any_layout(each_path, name, data):
    check_layouts(name, data)


@SETTINGS
@given(data=st.data())
def test_any_layout_linear(torch_path, data):
    check_layouts("linear", data)


@pytest.mark.parametrize("kind", ["strided", "transposed", "expanded", "offset"])
def test_random_masking_noise_layout(kind):
    """The noise keys of random_masking in any layout give the masks of their contiguous copy."""
    noise = lay(torch.rand(3, 16, generator=torch.Generator().manual_seed(0)), kind)
    got, want = ops.random_masking(3, 16, 0.75, noise=noise), ops.random_masking(3, 16, 0.75, noise=noise.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_parameter_views_reported(each_path):
    """The reported cases: a 1-D weight view with stride 2 and a stride-0 (expanded) bias, in add_layer_norm,
    bias_gelu and residual_add, against the same values contiguous."""
    x, r = randn(4, 8, seed=1), randn(4, 8, seed=2)
    w, b = randn(16, seed=3)[::2], randn(1, seed=4).expand(8)
    y, s = ops.add_layer_norm(x, w, b, 1e-5, branch=r, branch_bias=b)
    y0, s0 = ops.add_layer_norm(x, w.contiguous(), b.contiguous(), 1e-5, branch=r, branch_bias=b.contiguous())
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(s, s0, rtol=0, atol=0)
    torch.testing.assert_close(ops.bias_gelu(x, w), ops.bias_gelu(x, w.contiguous()), rtol=0, atol=0)
    torch.testing.assert_close(ops.residual_add(x, r, b), ops.residual_add(x, r, b.contiguous()), rtol=0, atol=0)
