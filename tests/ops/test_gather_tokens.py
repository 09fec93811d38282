"""gather_tokens: forward and every gradient against the official way (mae_fast.reference.gather_visible) in
float64 and in the same dtype, odd and real shapes, fp32 and bf16, strided inputs, the Triton kernels,
bad inputs; real sizes on a GPU."""
import pytest
import torch

from mae_fast import ops, reference
from mae_fast.kernels import _launch
from mae_fast.testing import check_op, randn, random_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_copy_is_exact(dtype, idtype):
    N, L, K, D = 3, 50, 12, 72
    x = randn(N, L, D, dtype=dtype)
    ids, _ = random_ids(N, L, K, idtype)
    out = ops.gather_tokens(x, ids)
    assert out.shape == (N, K, D) and out.dtype == dtype
    assert torch.equal(out, reference.gather_visible(x, ids))
    pre = randn(1, 2, D, dtype=dtype, seed=1)
    assert torch.equal(ops.gather_tokens(x, ids, prefix=pre), reference.gather_visible(x, ids, prefix=pre))


# (N, L, K, D, P); (19, 6, 2, 1024, 1) splits N into chunks in the backward (partial sums); D=300 has a partial
# second column block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 50, 12, 72, 1), (2, 196, 49, 1024, 1), (2, 49, 12, 40, 0), (1, 7, 7, 3, 2),
                                   (19, 6, 2, 1024, 1), (2, 9, 3, 300, 1)])
def test_against_oracle(dtype, shape):
    N, L, K, D, P = shape
    x = randn(N, L, D, dtype=dtype)
    pos = randn(1, L, D, dtype=dtype, seed=1)
    pre = randn(1, P, D, dtype=dtype, seed=2) if P else None
    ids, _ = random_ids(N, L, K, torch.int32 if D % 2 else torch.int64, seed=3)
    g = randn(N, P + K, D, dtype=dtype, seed=4)
    check_op(ops.gather_tokens, reference.gather_visible, [x, ids, pos, pre], g, name="gather_tokens")


def test_backward_splits_n():
    """The shapes above really take the split-N backward (otherwise the partial sums go untested)."""
    assert _launch.column_split(19, 7, 1024).splits > 1


def test_partial_grads_and_strided_inputs():
    """Only some inputs need grad; strided x, ids and grad are read in place."""
    N, L, K, D = 3, 50, 12, 72
    x = randn(D, N, 2 * L).permute(1, 2, 0)[:, ::2]  # [N, L, D], strided
    ids = random_ids(N, L, 2 * K, seed=5)[0][:, ::2]  # [N, K], strided
    pos = randn(1, L, D, seed=6)
    pre = randn(1, 1, D, seed=7).requires_grad_(True)
    out = ops.gather_tokens(x, ids, pos, pre)  # x and pos need no grad
    assert torch.equal(out, reference.gather_visible(x, ids, pos, pre).detach())
    g = randn(D, N, 1 + K, seed=8).permute(1, 2, 0)  # [N, 1+K, D], strided grad
    out.backward(g)
    assert torch.allclose(pre.grad, g[:, :1].sum(0, keepdim=True), atol=1e-5)


def test_triton_kernels_run(triton_path):
    N, L, K, D = 2, 16, 4, 8
    x = randn(N, L, D).requires_grad_(True)
    pos = randn(1, L, D, seed=1).requires_grad_(True)
    pre = randn(1, 1, D, seed=2).requires_grad_(True)
    ids, _ = random_ids(N, L, K)
    g = randn(N, 1 + K, D, seed=3)
    with ops.path("auto"):  # the same call on the path CPU tensors take by default
        check_op(ops.gather_tokens, reference.gather_visible, [x, ids, pos, pre], g, name="auto path")
    check_op(ops.gather_tokens, reference.gather_visible, [x, ids, pos, pre], g, name="triton path")


def test_bad_inputs():
    N, L, K, D = 2, 10, 3, 8
    x = randn(N, L, D)
    ids, _ = random_ids(N, L, K)
    with pytest.raises(ValueError, match="x must have 3 dims"):
        ops.gather_tokens(x[0], ids)
    with pytest.raises(TypeError, match="ids_keep must have dtype"):
        ops.gather_tokens(x, ids.float())
    with pytest.raises(ValueError, match="ids_keep must be on"):
        ops.gather_tokens(x, ids.to("meta"))
    with pytest.raises(ValueError, match="ids_keep must have shape"):
        ops.gather_tokens(x, ids[:1])
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        ops.gather_tokens(x, ids, pos_embed=randn(1, L + 1, D))
    with pytest.raises(ValueError, match="prefix must have shape"):
        ops.gather_tokens(x, ids, prefix=randn(1, 1, D + 1))
    with pytest.raises(ValueError, match="outside"):
        ops.gather_tokens(x, ids + L, check_indices=True)
    dup = ids.clone()
    dup[:, 1] = dup[:, 0]
    with pytest.raises(ValueError, match="distinct"):
        ops.gather_tokens(x, dup, check_indices=True)


def test_check_indices_env(monkeypatch):
    N, L, K, D = 2, 10, 3, 8
    ids, _ = random_ids(N, L, K)
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="outside"):
        ops.gather_tokens(randn(N, L, D), ids - 100)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [72, 768, 1024, 1280])
def test_gpu_real_sizes(dtype, D):
    N, L, K = 16, 196, 49
    ids, _ = random_ids(N, L, K, device="cuda")
    x = randn(N, L, D, dtype=dtype, device="cuda")
    pos = randn(1, L, D, dtype=dtype, seed=1, device="cuda")
    pre = randn(1, 1, D, dtype=dtype, seed=2, device="cuda")
    g = randn(N, 1 + K, D, dtype=dtype, seed=3, device="cuda")
    check_op(ops.gather_tokens, reference.gather_visible, [x, ids, pos, pre], g, name="gpu gather_tokens")


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N*L*D > 2**31 elements: rows past the int32 range are read correctly."""
    N, L, K, D = 11000, 196, 4, 1024  # 2.21e9 elements (4.4 GB in bf16)
    x = torch.empty(N, L, D, dtype=torch.bfloat16, device="cuda")
    x[-4:].normal_()
    ids, _ = random_ids(N, L, K, device="cuda")
    out = ops.gather_tokens(x, ids)  # [N, K, D]
    assert torch.equal(out[-4:], reference.gather_visible(x[-4:], ids[-4:]))
