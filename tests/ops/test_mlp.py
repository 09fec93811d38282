"""mlp: fc2(gelu(fc1(x))) and its five gradients against F.linear / F.gelu in float64 and the same dtype,
exact and tanh GELU, fp32, bf16 and fp16, odd widths and row counts, without biases; under autocast against
torch's autocast; run-to-run determinism; the Triton kernels; the registered ops and their FLOPs; bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mae_fast import ops
from mae_fast.ops.mlp import mlp_fc1_torch, mlp_fc2_dgrad_gelu_torch
from mae_fast.testing import ULP, assert_close_to_oracle, check_op, randn, rel_err


def reference(approximate):
    return lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def run(fn, args, g):
    """(fn(*args), the gradients of its tensor inputs for the output gradient g)."""
    leaves = [t if t is None else t.clone().requires_grad_(True) for t in args]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out, [t.grad for t in leaves if t is not None]


def fast(approximate):
    return lambda x, w1, b1, w2, b2: ops.mlp(x, w1, b1, w2, b2, approximate)


def inputs(rows, D, dtype, H=None, bias=True, seed=0):
    """x [*rows, D], fc1 [H, D] (H = 4D), fc2 [D, H], scaled as nn.Linear's init (unit-size activations)."""
    H = H or 4 * D
    x = randn(*rows, D, dtype=dtype, seed=seed)
    w1 = (randn(H, D, seed=seed + 1) * D ** -0.5).to(dtype)
    w2 = (randn(D, H, seed=seed + 2) * H ** -0.5).to(dtype)
    b1 = (randn(H, seed=seed + 3) * 0.5).to(dtype) if bias else None
    b2 = (randn(D, seed=seed + 4) * 0.5).to(dtype) if bias else None
    return [x, w1, b1, w2, b2], randn(*rows, D, seed=seed + 5)


@pytest.mark.parametrize("rows,D,approximate", [((1,), 72, "none"), ((17,), 72, "tanh"), ((2, 25), 80, "none"),
                                                ((2, 70), 80, "tanh"), ((3,), 1024, "none")])
def test_fp32_against_oracle(rows, D, approximate):
    """Elementwise within twice torch's fp32 error (plus one ulp), and within 1e-5 relative (norm) of float64."""
    args, g = inputs(rows, D, torch.float32)
    out, grads = run(fast(approximate), args, g)
    exact, grads64 = run(reference(approximate), [t.double() for t in args], g.double())
    same, grads32 = run(reference(approximate), args, g)
    for name, o, e, s in zip(["out", "x", "w1", "b1", "w2", "b2"], [out, *grads], [exact, *grads64], [same, *grads32]):
        assert o.dtype == torch.float32, name
        assert_close_to_oracle(o, e, s, rtol=ULP[torch.float32], atol=1e-6 * (1 + e.abs().max().item()), name=name)
        assert rel_err(o, e) <= 1e-5, name


@pytest.mark.parametrize("dtype,rows,D,approximate", [
    (torch.bfloat16, (17,), 72, "none"), (torch.bfloat16, (130,), 80, "tanh"), (torch.bfloat16, (3,), 1024, "tanh"),
    (torch.float16, (2, 25), 72, "none"), (torch.float16, (17,), 80, "tanh")])
def test_half_against_oracle(dtype, rows, D, approximate):
    """Norm-wise (each gradient is a sum over rounded 16-bit terms: elementwise, the rounding noise of the
    two computations is random), within twice torch's error plus one rounding step (Triton's interpreter
    truncates to bf16, a bias that the next GEMM sums)."""
    args, g = inputs(rows, D, dtype, seed=1)
    check_op(fast(approximate), reference(approximate), args, g, name=f"{dtype} {approximate} rows={rows} D={D}",
             elementwise=False)


def test_without_biases_and_partial_gradients():
    (x, w1, _, w2, _), g = inputs((5, 7), 72, torch.float32, H=200, bias=False, seed=2)
    check_op(lambda x, w1, w2: ops.mlp(x, w1, None, w2), lambda x, w1, w2: reference("none")(x, w1, None, w2, None),
             [x, w1, w2], g, name="no biases")
    # only x needs a gradient: no weight-gradient GEMMs, no bias sums
    (x, w1, b1, w2, b2), g = inputs((9,), 72, torch.float32, seed=3)
    xg = x.clone().requires_grad_(True)
    ops.mlp(xg, w1, b1, w2, b2).backward(g)
    x64 = x.double().requires_grad_(True)
    reference("none")(x64, w1.double(), b1.double(), w2.double(), b2.double()).backward(g.double())
    assert rel_err(xg.grad, x64.grad) <= 1e-5
    # frozen fc1 weight: fc1's bias gradient alone
    b1g = b1.clone().requires_grad_(True)
    ops.mlp(x, w1, b1g, w2, b2).backward(g)
    b64 = b1.double().requires_grad_(True)
    reference("none")(x.double(), w1.double(), b64, w2.double(), b2.double()).backward(g.double())
    assert rel_err(b1g.grad, b64.grad) <= 1e-5


def test_strided_inputs():
    """x a strided view, fc1's weight a transposed view (a unit column stride made for the kernels), the output
    gradient expanded from a sum (row stride 0)."""
    base, g = inputs((3, 20), 72, torch.float32, seed=11)
    x = base[0][:, ::2]  # [3, 10, 72], row stride 144
    w1 = base[1].t().contiguous().t()  # [288, 72] with strides (1, 288)
    args = [x, w1, *base[2:]]
    out, grads = run(lambda *a: fast("none")(*a).sum() * g[0, 0, 0], args, torch.tensor(1.0))
    exact, grads64 = run(lambda *a: reference("none")(*a).sum() * g[0, 0, 0].double(), [t.double() for t in args],
                         torch.tensor(1.0, dtype=torch.float64))
    assert rel_err(out, exact) <= 1e-5
    for i, (a, e) in enumerate(zip(grads, grads64)):
        assert rel_err(a, e) <= 1e-5, f"grad[{i}]"


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck_float64():
    """torch.autograd.gradcheck of all five gradients (float64: the torch path, through the op's autograd
    Function), including its undefined-output-gradient check."""
    args, _ = inputs((2, 3), 8, torch.float64, H=12, seed=12)
    leaves = [t.clone().requires_grad_(True) for t in args]
    assert torch.autograd.gradcheck(fast("tanh"), leaves, fast_mode=True, check_undefined_grad=True)


def test_create_graph_is_a_clear_error():
    args, g = inputs((4,), 8, torch.float32, seed=13)
    x = args[0].clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(ops.mlp(x, *args[1:]).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="mae_fast.ops.mlp: its backward is not differentiable"):
        gx.square().sum().backward()


def test_no_rows():
    """An empty batch: an empty output and zero parameter gradients, no launch."""
    args, g = inputs((0,), 8, torch.float32, seed=15)
    out, grads = run(fast("none"), args, g)
    assert out.shape == (0, 8) and grads[0].shape == (0, 8)
    assert all(t.shape == p.shape and not t.any() for t, p in zip(grads[1:], args[1:]))


def test_float64_takes_the_torch_path():
    args, g = inputs((4,), 24, torch.float64, seed=4)
    torch.testing.assert_close(ops.mlp(*args), reference("none")(*args), rtol=1e-12, atol=1e-12)


def autocast_case(device, rows, D, x_dtype, seed):
    """ops.mlp and torch's F.linear / F.gelu under bf16 autocast (fp32 parameters, x in x_dtype: the model's
    LayerNorm hands the MLP bf16), each against float64: outputs and gradients norm-wise within twice torch's
    error; gradients in their inputs' dtypes."""
    args, g = inputs(rows, D, torch.float32, seed=seed)
    args = [args[0].to(x_dtype), *args[1:]]
    args, g = [t.to(device) for t in args], g.to(device)
    results = []
    for fn in (fast("none"), reference("none")):
        leaves = [t.clone().requires_grad_(True) for t in args]
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fn(*leaves)
        assert out.dtype == torch.bfloat16
        out.backward(g.to(out.dtype))
        results.append([out] + [t.grad for t in leaves])
    assert [t.dtype for t in results[0][1:]] == [t.dtype for t in args]
    exact = run(reference("none"), [t.double() for t in args], g.to(torch.bfloat16).double())
    for i, (ours, torch_, e) in enumerate(zip(*results, [exact[0], *exact[1]])):
        assert rel_err(ours, e) <= 2 * rel_err(torch_, e) + 1e-6, f"output {i} (0: out, then the gradients)"


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_against_torch_autocast(x_dtype):
    autocast_case("cpu", (3, 11), 72, x_dtype, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    args, g = inputs((2, 70), 80, dtype, seed=6)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in args]
        out = ops.mlp(*leaves)
        out.backward(g.to(out.dtype))
        return [out] + [t.grad for t in leaves]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_triton_kernels_run(triton_path):
    args, g = inputs((33,), 72, torch.float32, seed=7)
    check_op(fast("none"), reference("none"), args, g, name="triton path")
    assert {"mlp_fc1_kernel", "mlp_fc2_dgrad_kernel"} <= set(triton_path)


def test_registered_ops(record_ops):
    args, g = inputs((3, 4), 24, torch.float32, seed=8)
    with record_ops() as rec:
        check_op(fast("tanh"), reference("tanh"), args, g, name="registered")
    assert "mlp_fc1" in rec.calls and "mlp_fc2_dgrad_gelu" in rec.calls


def test_flop_formulas():
    R, D, H = 10, 24, 40
    args, g = inputs((R,), D, torch.float32, H=H, seed=9)
    leaves = [t.clone().requires_grad_(True) for t in args]
    with FlopCounterMode(display=False) as counter:
        out = ops.mlp(*leaves)
    assert counter.get_flop_counts()["Global"][torch.ops.mae_fast.mlp_fc1] == 2 * R * D * H
    assert counter.get_total_flops() == 2 * (2 * R * D * H)  # fc1 (ours) and fc2 (aten.addmm)
    with FlopCounterMode(display=False) as counter:
        out.backward(g)
    assert counter.get_flop_counts()["Global"][torch.ops.mae_fast.mlp_fc2_dgrad_gelu] == 2 * R * D * H
    assert counter.get_total_flops() == 4 * (2 * R * D * H)  # and three aten.mm: both weight gradients, dx


def test_torch_path_functions_are_the_oracle():
    x, w, b = randn(6, 16), randn(32, 16, seed=1), randn(32, seed=2)
    a, z = mlp_fc1_torch(x, w, b, "none")
    torch.testing.assert_close(z, F.linear(x, w, b))
    torch.testing.assert_close(a, F.gelu(F.linear(x, w, b)))
    g, w2 = randn(6, 8, seed=3), randn(8, 32, seed=4)
    dh, db = mlp_fc2_dgrad_gelu_torch(g, w2, z, "tanh", True)
    torch.testing.assert_close(dh, torch.ops.aten.gelu_backward(g @ w2, z, approximate="tanh"))
    torch.testing.assert_close(db, dh.sum(0))


def test_launch_configuration():
    """128 x 128 x 64 tiles on two warpgroups at ViT sizes; a tile height that holds a few rows; fp32 products
    in IEEE fp32 unless torch allows TF32 for its own matmuls."""
    from mae_fast.kernels.mlp import gemm_config

    cfg = gemm_config(torch.bfloat16, 256 * 50)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps) == (128, 128, 64, 8)
    assert gemm_config(torch.float16, 3).block_m == 16 and gemm_config(torch.bfloat16, 50).block_m == 64
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not gemm_config(torch.float32, 100).tf32
        torch.set_float32_matmul_precision("high")
        assert gemm_config(torch.float32, 100).tf32
    finally:
        torch.set_float32_matmul_precision(old)


def test_bad_inputs():
    (x, w1, b1, w2, b2), _ = inputs((2,), 8, torch.float32)
    with pytest.raises(ValueError, match="fc1_weight's in_features 8"):
        ops.mlp(randn(2, 7), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \[\*, 32\]"):
        ops.mlp(x, w1, b1, randn(8, 31), b2)
    with pytest.raises(ValueError, match=r"fc1_bias must have shape \[32\]"):
        ops.mlp(x, w1, randn(31), w2, b2)
    with pytest.raises(ValueError, match=r"fc2_bias must have shape \[8\]"):
        ops.mlp(x, w1, b1, w2, randn(9))
    with pytest.raises(ValueError, match="fc1_weight must have 2 dims"):
        ops.mlp(x, w1[0], b1, w2, b2)
    with pytest.raises(ValueError, match="approximate must be one of"):
        ops.mlp(x, w1, b1, w2, b2, "erf")
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.mlp(x.long(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="fc2_weight must have x's dtype"):
        ops.mlp(x, w1, b1, w2.double(), b2)
    with pytest.raises(ValueError, match="fc1_weight must be on meta"):
        ops.mlp(x.to("meta"), w1, b1, w2, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [768, 512])
def test_gpu_autocast_vit_widths(D):
    autocast_case("cuda", (8, 50), D, torch.bfloat16, seed=14)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_size(dtype):
    args, g = inputs((4, 50), 768, dtype, seed=10)
    check_op(fast("none"), reference("none"), [t.cuda() for t in args], g.cuda(), name="gpu",
             elementwise=dtype == torch.float32, rtol=None if dtype == torch.float32 else 0.0)
