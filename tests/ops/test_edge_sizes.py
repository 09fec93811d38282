"""The two paths agree at the edges: every op, forward and backward, at empty and minimal sizes (0 rows,
0 columns, K = 0 kept tokens, L = 0 tokens, N = 0 samples, D = 1) and with inputs of mixed float dtypes
(float64 among them), gives the same outputs, gradients and dtypes on the Triton kernels (under the
interpreter on a CPU) as on the plain torch path, and nothing crashes."""
import pytest
import torch

from mae_fast import ops
from mae_fast.ops.paths import triton_interpret
from mae_fast.testing import randn, random_ids

TRITON_RUNS = torch.cuda.is_available() or triton_interpret()

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="compares the Triton kernels (CUDA or TRITON_INTERPRET=1) "
                                                        "with the torch path")


def ids(N, L, K, seed=0):
    return random_ids(N, L, K, seed=seed) if L else (torch.zeros(N, 0, dtype=torch.int64),) * 2


def gather_tokens_case(N, L, K, D, P, dtypes=(F32, F32, F32)):
    keep, _ = ids(N, L, K)
    return (lambda x, pos, pre: ops.gather_tokens(x, keep, pos, pre if P else None),
            [randn(N, L, D, dtype=dtypes[0]), randn(1, L, D, seed=1, dtype=dtypes[1]),
             randn(1, max(P, 1), D, seed=2, dtype=dtypes[2])])


def unshuffle_case(N, L, K, D, P, dtypes=(F32, F32, F32), out_dtype=None):
    _, restore = ids(N, L, K)
    return (lambda x, mt, pos: ops.unshuffle_tokens(x, restore, mt, pos, num_prefix=P, out_dtype=out_dtype),
            [randn(N, P + K, D, dtype=dtypes[0]), randn(1, 1, D, seed=1, dtype=dtypes[1]),
             randn(1, P + L, D, seed=2, dtype=dtypes[2])])


def gather_patches_case(N, K, C, p):
    keep, _ = ids(N, 6, K)
    return lambda imgs: ops.gather_patches(imgs, keep, p), [randn(N, C, 2 * p, 3 * p)]


def add_layer_norm_case(R, D, dtypes=(F32, F32, F32, F32, F32), out_dtype=None):
    return (lambda x, w, b, br, brb: ops.add_layer_norm(x, w, b, 1e-5, branch=br, branch_bias=brb, out_dtype=out_dtype),
            [randn(R, D, dtype=dtypes[0]), randn(D, seed=1, dtype=dtypes[1]), randn(D, seed=2, dtype=dtypes[2]),
             randn(R, D, seed=3, dtype=dtypes[3]), randn(D, seed=4, dtype=dtypes[4])])


def bias_gelu_case(R, Fd, dtypes=(F32, F32)):
    return (lambda h, b: ops.bias_gelu(h, b), [randn(R, Fd, dtype=dtypes[0]), randn(Fd, seed=1, dtype=dtypes[1])])


def residual_add_case(R, D, dtypes=(F32, F32, F32)):
    return (lambda s, br, b: ops.residual_add(s, br, b),
            [randn(R, D, dtype=dtypes[0]), randn(R, D, seed=1, dtype=dtypes[1]), randn(D, seed=2, dtype=dtypes[2])])


def self_attention_case(B, N, C, H, backend="math"):
    return (lambda x, w, b: ops.self_attention(x, w, b, H, backend=backend),
            [randn(B, N, C), randn(3 * C, C, seed=1), randn(3 * C, seed=2)])


def qkv_attention_case(B, N, C, H, dtype=F32):
    return lambda qkv: ops.qkv_attention(qkv, H), [randn(B, N, 3 * C, dtype=dtype)]


def mlp_case(R, D, Hd, dtypes=(F32, F32, F32, F32, F32)):
    return (lambda x, w1, b1, w2, b2: ops.mlp(x, w1, b1, w2, b2),
            [randn(R, D, dtype=dtypes[0]), randn(Hd, D, seed=1, dtype=dtypes[1]), randn(Hd, seed=2, dtype=dtypes[2]),
             randn(D, Hd, seed=3, dtype=dtypes[3]), randn(D, seed=4, dtype=dtypes[4])])


def loss_case(N, L, dtypes=(F32, F32), norm_pix=True, C=3, p=4, masked=False):
    imgs = torch.rand(N, C, p, L * p, generator=torch.Generator().manual_seed(0)).to(dtypes[1])
    mask = torch.ones(N, L)
    D = C * p * p
    if masked:
        keep = torch.arange(L).expand(N, L)
        return (lambda pred, im: ops.norm_pix_loss(pred, im, None, p, norm_pix, ids_masked=keep),
                [randn(N, L, D, dtype=dtypes[0]), imgs])
    return lambda pred, im: ops.norm_pix_loss(pred, im, mask, p, norm_pix), [randn(N, L, D, dtype=dtypes[0]), imgs]


EDGES = {
    "gather_tokens N=0": gather_tokens_case(0, 6, 3, 8, 1),
    "gather_tokens K=0": gather_tokens_case(2, 6, 0, 8, 1),
    "gather_tokens K=0 P=0": gather_tokens_case(2, 6, 0, 8, 0),
    "gather_tokens L=0": gather_tokens_case(2, 0, 0, 8, 1),
    "gather_tokens L=0 P=0": gather_tokens_case(2, 0, 0, 8, 0),
    "gather_tokens D=0": gather_tokens_case(2, 6, 3, 0, 1),
    "gather_tokens D=1": gather_tokens_case(2, 6, 3, 1, 1),
    "unshuffle_tokens N=0": unshuffle_case(0, 6, 3, 8, 1),
    "unshuffle_tokens K=0": unshuffle_case(2, 6, 0, 8, 1),
    "unshuffle_tokens L=0": unshuffle_case(2, 0, 0, 8, 1),
    "unshuffle_tokens L=0 P=0": unshuffle_case(2, 0, 0, 8, 0),
    "unshuffle_tokens D=0": unshuffle_case(2, 6, 3, 0, 1),
    "unshuffle_tokens D=1": unshuffle_case(2, 6, 3, 1, 1),
    "gather_patches N=0": gather_patches_case(0, 3, 3, 4),
    "gather_patches K=0": gather_patches_case(2, 0, 3, 4),
    "gather_patches D=1": gather_patches_case(2, 3, 1, 1),
    "add_layer_norm R=0": add_layer_norm_case(0, 8),
    "add_layer_norm D=0": add_layer_norm_case(3, 0),
    "add_layer_norm D=1": add_layer_norm_case(3, 1),
    "bias_gelu R=0": bias_gelu_case(0, 8),
    "bias_gelu F=0": bias_gelu_case(3, 0),
    "bias_gelu F=1": bias_gelu_case(3, 1),
    "residual_add R=0": residual_add_case(0, 8),
    "residual_add D=0": residual_add_case(3, 0),
    "residual_add D=1": residual_add_case(3, 1),
    "self_attention B=0": self_attention_case(0, 5, 8, 2),
    "self_attention N=0": self_attention_case(2, 0, 8, 2),
    "self_attention N=1 hd=1": self_attention_case(2, 1, 2, 2),
    "self_attention mae_fast B=0": self_attention_case(0, 5, 8, 2, "mae_fast"),
    "self_attention mae_fast N=0": self_attention_case(2, 0, 8, 2, "mae_fast"),
    "self_attention mae_fast N=1 hd=1": self_attention_case(2, 1, 2, 2, "mae_fast"),
    "qkv_attention B=0": qkv_attention_case(0, 5, 8, 2),
    "qkv_attention N=0": qkv_attention_case(2, 0, 8, 2),
    "qkv_attention N=1": qkv_attention_case(2, 1, 8, 2),
    "mlp R=0": mlp_case(0, 8, 32),
    "mlp D=1": mlp_case(3, 1, 4),
    "mlp H=1": mlp_case(3, 8, 1),
    "norm_pix_loss L=1": loss_case(2, 1),
    "norm_pix_loss D=1": loss_case(2, 3, norm_pix=False, C=1, p=1),
    "norm_pix_loss masked L=1": loss_case(2, 1, masked=True),
}
MIXED = {
    "gather_tokens": gather_tokens_case(2, 6, 3, 8, 1, dtypes=(F32, F64, BF16)),
    "gather_tokens bf16": gather_tokens_case(2, 6, 3, 8, 1, dtypes=(BF16, F32, F64)),
    "unshuffle_tokens": unshuffle_case(2, 6, 3, 8, 1, dtypes=(BF16, F64, F32), out_dtype=F32),
    "add_layer_norm": add_layer_norm_case(3, 8, dtypes=(F32, F64, BF16, BF16, F64), out_dtype=BF16),
    "bias_gelu": bias_gelu_case(3, 8, dtypes=(F32, F64)),
    "residual_add": residual_add_case(3, 8, dtypes=(F32, BF16, F64)),
    "mlp": mlp_case(3, 8, 32, dtypes=(F32, F32, F64, F32, BF16)),
    "norm_pix_loss fp32 pred, float64 imgs": loss_case(2, 3, dtypes=(F32, F64)),
    "norm_pix_loss bf16 pred, float64 imgs": loss_case(2, 3, dtypes=(BF16, F64)),
    "norm_pix_loss float64 pred, fp32 imgs": loss_case(2, 3, dtypes=(F64, F32)),
    "norm_pix_loss masked, fp32 pred, float64 imgs": loss_case(2, 3, dtypes=(F32, F64), masked=True),
}


def outputs_and_grads(fn, inputs, path):
    """Outputs (a tuple) and the gradients of the float inputs, on ``path`` ("auto": the kernels for every
    dtype they have, under the interpreter on a CPU)."""
    with ops.path(path):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        total = sum((o.double() * (randn(*o.shape, seed=7 + i) if o.dim() else torch.tensor(1.3))).sum()
                    for i, o in enumerate(outs))
        grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    return outs, grads


TOL = {F32: 2e-6, BF16: 2 ** -7, F64: 1e-12}


def assert_same(a, b, what, inputs):
    """Same dtype and shape; values within the precision of the least precise input or output (the kernels
    compute in fp32 where the torch path may widen to a float64 input's precision)."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} on the kernels, {b.dtype} on the torch path"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} on the kernels, {tuple(b.shape)} on the torch path"
    tol = max(TOL[t.dtype] for t in (a, *inputs))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * (1 + b.abs().nan_to_num(0).max().item() if b.numel() else 1),
                               equal_nan=True, msg=what)


def check_paths(fn, inputs):
    kern, kern_grads = outputs_and_grads(fn, inputs, "auto")
    ref, ref_grads = outputs_and_grads(fn, inputs, "torch")
    assert len(kern) == len(ref)
    for i, (a, b) in enumerate(zip(kern, ref)):
        assert_same(a, b, f"output {i}", inputs)
    for i, (a, b) in enumerate(zip(kern_grads, ref_grads)):
        assert_same(a, b, f"gradient of input {i}", inputs)


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_sizes(name):
    check_paths(*EDGES[name])


@pytest.mark.parametrize("name", list(MIXED))
def test_mixed_dtypes(name):
    check_paths(*MIXED[name])


def test_loss_dtype_follows_float64():
    """The documented dtype: fp32 for every input dtype, float64 when pred or imgs is float64, on every path."""
    for dtypes, want in (((F32, F64), F64), ((F64, F32), F64), ((BF16, F32), F32), ((F32, F32), F32)):
        fn, inputs = loss_case(2, 3, dtypes=dtypes)
        for path in ("auto", "torch"):
            with ops.path(path):
                assert fn(*inputs).dtype == want, (dtypes, path)


def test_random_masking_edges():
    for N, L, ratio in ((0, 16, 0.75), (3, 16, 0.99), (3, 1, 0.5)):
        m = ops.random_masking(N, L, ratio)
        K = int(L * (1 - ratio))
        assert m.ids_keep.shape == (N, K) and m.ids_restore.shape == (N, L) and m.mask.shape == (N, L)
