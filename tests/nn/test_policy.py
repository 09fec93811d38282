"""The measured fused-or-stock choice of mae_fast.nn.policy, on the CPU with an injected clock: the faster side
is chosen and cached per shape, a wrong fused result is never chosen, the overrides, no measuring while a tracer
runs or a graph captures, nothing of the real step touched; and every stock counterpart computes what its fused
op does (so whichever side runs, the block is the same)."""
import pytest
import torch

import mae_fast.nn as mnn
from mae_fast import ops
from mae_fast.configs import LAYER_NORM
from mae_fast.nn import policy
from mae_fast.testing import randn, rel_err


@pytest.fixture
def measured(monkeypatch):
    """Measure on the CPU (the library measures on CUDA only) with a fake clock: each candidate's time comes from
    ``clock[(op, name)]`` (default 1.0 ms); yields (clock, calls) where calls lists what was timed."""
    clock, calls, current = {}, [], {}
    table = {}
    for op, cands in policy.CANDIDATES.items():
        table[op] = {}
        for name, fn in cands.items():
            def timed(*args, _op=op, _name=name, _fn=fn):
                current["who"] = (_op, _name)
                return _fn(*args)
            table[op][name] = timed

    def fake_median_ms(fn, device, warmup, reps):
        fn()
        calls.append(current["who"])
        return clock.get(current["who"], 1.0)

    monkeypatch.setattr(policy, "CANDIDATES", table)
    monkeypatch.setattr(policy, "_MEASURED_ON", ("cuda", "cpu"))
    monkeypatch.setattr(policy.timing, "median_ms", fake_median_ms)
    monkeypatch.delenv("MAE_FAST_FUSED", raising=False)
    policy.clear_fused_choices()
    with ops.path("torch"):  # the fused ops' plain torch path: kernels_apply holds on the CPU
        yield clock, calls
    policy.clear_fused_choices()
    policy.set_fused_ops(None)


def _ln_args(R=6, D=16, branch=True):
    x = randn(R, D, seed=1).requires_grad_(True)
    w, b = randn(D, seed=2).requires_grad_(True), randn(D, seed=3).requires_grad_(True)
    br = randn(R, D, seed=4).requires_grad_(True) if branch else None
    brb = randn(D, seed=5).requires_grad_(True) if branch else None
    return (x, w, b, 1e-6, br, brb, torch.float32)


def test_faster_side_is_chosen_and_cached(measured):
    clock, calls = measured
    clock[("add_layer_norm", "fused")], clock[("add_layer_norm", "stock")] = 0.5, 1.0
    args = _ln_args()
    assert policy.choose("add_layer_norm", args) == "fused"
    assert sorted(calls) == [("add_layer_norm", "fused"), ("add_layer_norm", "stock")]
    (key, entry), = policy.fused_choices().items()
    assert key.startswith("add_layer_norm|cpu|autocast=None|grad=True|float32[6, 16]g")
    assert entry["path"] == "fused" and entry["times_ms"] == {"fused": 0.5, "stock": 1.0} and entry["speedup"] == 2.0
    clock[("add_layer_norm", "fused")] = 9.0  # the cache answers: no second measurement
    assert policy.choose("add_layer_norm", _ln_args()) == "fused" and len(calls) == 2
    policy.choose("add_layer_norm", _ln_args(R=7))  # another shape measures again, and is chosen on its own
    assert len(calls) == 4 and [e["path"] for e in policy.fused_choices().values()] == ["fused", "stock"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast and grad mode are part of the key
        policy.choose("add_layer_norm", _ln_args())
    with torch.no_grad():
        policy.choose("add_layer_norm", _ln_args())
    assert len(policy.fused_choices()) == 4


def test_stock_wins_and_runs_and_the_block_says_so(measured):
    clock, _ = measured
    clock[("mlp", "fused")], clock[("mlp", "ops")], clock[("mlp", "stock")] = 2.0, 3.0, 1.0
    blk = mnn.Block(32, 2, qkv_bias=True, norm_layer=LAYER_NORM)
    x = randn(2, 5, 32, seed=7)
    out = blk(x)
    reason = mnn.unfused_reason(blk, x)
    assert reason.startswith("runs fused, but these ops were measured faster otherwise here: mlp")
    assert "stock 1 ms, fused 2 ms" in reason
    mnn.set_fused_blocks(False)
    try:
        plain = blk(x)
    finally:
        mnn.set_fused_blocks(True)
    assert rel_err(out, plain) < 1e-5
    paths = {e["op"]: e["path"] for e in policy.fused_choices().values()}
    assert paths == {"add_layer_norm": "fused", "self_attention": "fused", "linear": "fused", "mlp": "stock",
                     "residual_add": "fused"}
    mlp_entry = next(e for e in policy.fused_choices().values() if e["op"] == "mlp")
    assert mlp_entry["times_ms"] == {"fused": 2.0, "ops": 3.0, "stock": 1.0}


def test_wrong_or_failing_fused_is_never_chosen(measured, monkeypatch):
    clock, _ = measured
    clock[("residual_add", "fused")] = 0.1  # fastest, but wrong
    monkeypatch.setitem(policy.CANDIDATES["residual_add"], "fused", lambda s, b, bias: s + b)  # drops the bias
    s, b, bias = randn(4, 8, seed=1), randn(4, 8, seed=2), randn(8, seed=3)
    assert policy.choose("residual_add", (s, b, bias)) == "stock"
    (entry,) = policy.fused_choices().values()
    assert entry["rejected"]["fused"].startswith("incorrect: relative error") and "fused" not in entry["times_ms"]

    def boom(*args):
        raise RuntimeError("no kernel for this shape")
    monkeypatch.setitem(policy.CANDIDATES["bias_gelu"], "fused", boom)
    assert policy.choose("bias_gelu", (randn(4, 8), randn(8), "none")) == "stock"
    entry = next(e for e in policy.fused_choices().values() if e["op"] == "bias_gelu")
    assert entry["rejected"]["fused"] == "unavailable: RuntimeError: no kernel for this shape"


def test_overrides(measured, monkeypatch):
    _, calls = measured
    policy.set_fused_ops("stock")
    assert policy.choose("add_layer_norm", _ln_args()) == "stock" and calls == []
    assert "every fused op runs stock" in mnn.unfused_reason(mnn.Block(32, 2), randn(2, 3, 32))
    policy.set_fused_ops(None)
    monkeypatch.setenv("MAE_FAST_FUSED", "fused")
    assert policy.choose("add_layer_norm", _ln_args()) == "fused" and calls == []
    monkeypatch.setenv("MAE_FAST_FUSED", "fastest")
    with pytest.raises(ValueError, match="MAE_FAST_FUSED must be one of"):
        policy.choose("add_layer_norm", _ln_args())
    with pytest.raises(ValueError, match="mode must be None or one of"):
        policy.set_fused_ops("always")


def test_no_measuring_while_tracing_or_capturing(measured, monkeypatch, record_ops):
    _, calls = measured
    with record_ops():
        assert policy.choose("add_layer_norm", _ln_args()) == "fused"
    monkeypatch.setattr(policy, "_capturing", lambda device: True)
    assert policy.choose("add_layer_norm", _ln_args()) == "fused"
    assert calls == [] and policy.fused_choices() == {}


def test_measuring_touches_nothing_of_the_step(measured):
    args = _ln_args()
    state = torch.get_rng_state()
    policy.run("add_layer_norm", *args)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(a.grad is None for a in args if isinstance(a, torch.Tensor))


def test_a_model_step_measures_once_per_shape(measured):
    from mae_fast import models

    _, calls = measured
    torch.manual_seed(0)
    m = models.create_model("mae_vit_tiny_patch8", img_size=16)
    imgs = randn(2, 3, 16, 16, seed=3)
    m.forward_train(imgs).backward()
    first = len(calls)
    assert first > 0
    m.zero_grad()
    m.forward_train(imgs).backward()
    assert len(calls) == first  # the second step only looks its choices up


# every stock counterpart computes its fused op's function, in fp32 and under bf16 autocast
CASES = {
    "add_layer_norm": lambda: _ln_args(),
    "add_layer_norm_plain": lambda: _ln_args(branch=False)[:6] + (torch.bfloat16,),
    "bias_gelu": lambda: (randn(5, 12, seed=1).requires_grad_(True), randn(12, seed=2).requires_grad_(True), "none"),
    "residual_add": lambda: (randn(5, 8, seed=1).requires_grad_(True), randn(5, 8, seed=2).requires_grad_(True),
                             randn(8, seed=3).requires_grad_(True)),
    "linear": lambda: (randn(5, 8, seed=1).requires_grad_(True), randn(6, 8, seed=2).requires_grad_(True),
                       randn(6, seed=3).requires_grad_(True)),
    "mlp": lambda: (randn(2, 5, 8, seed=1).requires_grad_(True), randn(32, 8, seed=2).requires_grad_(True),
                    randn(32, seed=3).requires_grad_(True), randn(8, 32, seed=4).requires_grad_(True),
                    randn(8, seed=5).requires_grad_(True), "none"),
    "self_attention": lambda: (randn(2, 7, 16, seed=1).requires_grad_(True), randn(48, 16, seed=2).requires_grad_(True),
                               randn(48, seed=3).requires_grad_(True), 2, None, 0.0, "math"),
}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stock_computes_the_fused_op(case, autocast):
    op = case.replace("_plain", "")
    results = []
    names = [n for n in policy.CANDIDATES[op] if n != "stock"] + ["stock"]
    for name in names:
        args = CASES[case]()
        with ops.path("torch"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = policy.CANDIDATES[op][name](*args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,))]
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(loss, leaves)
        results.append(([o.detach() for o in outs], grads))
    so, sg = results[-1]
    tol = 2e-2 if autocast else 1e-5
    for fo, fg in results[:-1]:
        for a, b in zip(fo + list(fg), so + list(sg)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert rel_err(a.float(), b.float()) < tol
