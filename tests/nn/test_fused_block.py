"""mae_fast.nn.Block's fused forward: the same block as the module-by-module forward (fp32) and within twice its
error against float64 under bf16 autocast, for every parameter; which blocks it applies to; the chain of
run_blocks (each block's last add fused into the next norm) equals the blocks one by one."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

import mae_fast.nn as mnn
from mae_fast import ops
from mae_fast.configs import LAYER_NORM
from mae_fast.nn.fused import run_blocks
from mae_fast.ops.paths import triton_interpret
from mae_fast.testing import randn, rel_err

TRITON_RUNS = torch.cuda.is_available() or triton_interpret()


def fused_path():
    """Where the fused ops run kernels (TRITON_INTERPRET=1, CUDA): as they are; on a plain CPU, where blocks
    run their stock modules, on the ops' torch path chosen explicitly."""
    return nullcontext() if TRITON_RUNS else ops.path("torch")


def _block(dim=72, heads=3, seed=0, **kw):
    torch.manual_seed(seed)
    blk = mnn.Block(dim, heads, 4.0, qkv_bias=True, norm_layer=LAYER_NORM, **kw)
    for m in (blk.norm1, blk.norm2):  # non-trivial affine parameters
        m.weight.data.normal_(1.0, 0.1)
        m.bias.data.normal_(0.0, 0.1)
    return blk


def _step(blk, x, g, fused, autocast=False):
    blk.zero_grad()
    mnn.set_fused_blocks(fused)
    try:
        with fused_path() if fused else nullcontext():
            assert (mnn.unfused_reason(blk, x) is None) == fused  # the forward under test is the one that runs
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = blk(xx)
            out.backward(g.to(out.dtype))
    finally:
        mnn.set_fused_blocks(True)
    return {"out": out.detach(), "x": xx.grad, **{n: p.grad.clone() for n, p in blk.named_parameters()}}


def test_fused_equals_module_path_fp32():
    blk = _block()
    assert mnn.unfused_reason(blk) is None
    x, g = randn(3, 50, 72, seed=1), randn(3, 50, 72, seed=2)
    fused, plain = _step(blk, x, g, True), _step(blk, x, g, False)
    for k in plain:
        assert rel_err(fused[k], plain[k]) < 1e-5, k


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_autocast_within_twice_the_module_path_error(approximate):
    blk = _block(act_layer=lambda: nn.GELU(approximate=approximate))
    x, g = randn(3, 50, 72, seed=3), randn(3, 50, 72, seed=4)
    exact = _step(_block(act_layer=lambda: nn.GELU(approximate=approximate)).double(), x.double(), g.double(), False)
    with ops.path("torch"):  # the torch path of the ops (the Triton kernels: tests/ops, 1-ulp rounding aside)
        fused = _step(blk, x, g, True, autocast=True)
    plain = _step(blk, x, g, False, autocast=True)
    assert fused["out"].dtype == torch.float32  # the residual stream stays fp32, as in the reference
    for k in plain:
        assert rel_err(fused[k], exact[k]) <= 2 * rel_err(plain[k], exact[k]) + 1e-4, k


def test_triton_path_end_to_end(triton_path):
    blk = _block(dim=48, heads=4, seed=5)
    x, g = randn(2, 17, 48, seed=6), randn(2, 17, 48, seed=7)
    fused = _step(blk, x, g, True)
    with ops.path("torch"):
        torch_path = _step(blk, x, g, True)
    for k in fused:
        assert rel_err(fused[k], torch_path[k]) < 1e-5, k


@pytest.mark.parametrize("kwargs,reason", [
    (dict(qk_norm=True), "attn.q_norm"),
    (dict(init_values=1e-5), "ls1"),
    (dict(drop_path=0.1), "drop_path1 is active"),
    (dict(norm_layer=nn.Identity), "norm1 is Identity"),
    (dict(act_layer=nn.ReLU), "mlp.act is ReLU"),
    (dict(scale_attn_norm=True), "attn.norm"),
    (dict(scale_mlp_norm=True), "mlp.norm"),
])
def test_unfused_blocks_say_why(kwargs, reason):
    args = dict(qkv_bias=True, norm_layer=LAYER_NORM)
    args.update(kwargs)
    blk = mnn.Block(32, 2, **args)
    assert reason in mnn.unfused_reason(blk)
    x = randn(2, 5, 32)
    torch.manual_seed(0)
    out = blk(x)  # it runs, module by module
    torch.manual_seed(0)
    mnn.set_fused_blocks(False)
    try:
        torch.testing.assert_close(out, blk(x))
    finally:
        mnn.set_fused_blocks(True)


def test_dropout_keeps_training_blocks_unfused_only_while_active():
    blk = mnn.Block(32, 2, qkv_bias=True, proj_drop=0.1)
    assert "dropout proj_drop is active" in mnn.unfused_reason(blk)
    if not TRITON_RUNS:
        assert "no kernels for cpu tensors" in mnn.unfused_reason(blk.eval(), randn(2, 5, 32))
    assert mnn.unfused_reason(blk.eval()) is None
    assert mnn.unfused_reason(mnn.Block(32, 2, attn_drop=0.1)) is None  # attention dropout runs fused
    assert mnn.unfused_reason(mnn.Block(32, 2, drop_path=0.1).eval()) is None  # drop path: only while training
    assert "input is not a float [B, N, C] tensor" in mnn.unfused_reason(blk.eval(), randn(5, 32))
    mnn.set_fused_blocks(False)
    try:
        assert "turned off" in mnn.unfused_reason(blk)
    finally:
        mnn.set_fused_blocks(True)


def test_op_tracers_see_the_fused_ops_on_any_device(record_ops):
    """Under a TorchDispatchMode (fake tensors, FLOP counters, op tracers) a block runs the ops a CUDA run
    executes, on a plain CPU too, with the module path's result."""
    blk, x = _block(), randn(2, 7, 72)
    ref = blk(x)
    with record_ops() as rec:
        out = blk(x)
    assert {"add_layer_norm", "mlp_fc1", "residual_add"} <= set(rec.calls)
    assert not {"native_layer_norm", "gelu"} & set(rec.calls)  # the stock modules' ops
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_run_blocks_chain_equals_blocks_one_by_one():
    blocks = nn.ModuleList([_block(seed=i) for i in range(3)])
    blocks.insert(2, mnn.Block(72, 3, qkv_bias=True, norm_layer=LAYER_NORM, init_values=0.1))  # runs unfused
    norm = LAYER_NORM(72)
    x, g = randn(2, 9, 72, seed=8), randn(2, 9, 72, seed=9)
    results = []
    for chained in (True, False):
        blocks.zero_grad(), norm.zero_grad()
        xx = x.clone().requires_grad_(True)
        if chained:
            with fused_path():
                out = run_blocks(blocks, xx, norm)
        else:
            out = xx
            for blk in blocks:
                out = blk(out)
            out = norm(out)
        out.backward(g)
        results.append([out, xx.grad] + [p.grad for p in [*blocks.parameters(), *norm.parameters()]])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5
