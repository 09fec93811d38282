"""attn_backend="auto": measured per shape, correct-only, cached, RNG-neutral, compile-safe."""
import importlib

import pytest
import torch

A = importlib.import_module("mae_fast.nn.attn_backends")


@pytest.fixture(autouse=True)
def _fresh_cache():
    A.clear_attn_autotune()
    A.set_attn_autotune(None)
    yield
    A.clear_attn_autotune()
    A.set_attn_autotune(None)


def _qkv(shape=(2, 3, 50, 24), dtype=torch.float32, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def test_auto_measures_each_shape_once_and_matches_math():
    q, k, v = _qkv()
    out = A.attention(q, k, v)
    res = A.attn_autotune_results()
    assert len(res) == 1
    (key, entry), = res.items()
    assert "B=2|H=3|Nq=50|Nk=50|hd=24" in key and "fwd+bwd" in key and key.endswith("deterministic=False")
    assert set(entry["times_ms"]) == {"flash", "math"} and all(t > 0 for t in entry["times_ms"].values())
    assert entry["backend"] == min(entry["times_ms"], key=entry["times_ms"].get)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    exact = torch.softmax(q64 @ k64.transpose(-1, -2) / 24 ** 0.5, dim=-1) @ v64
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)

    def no_more_tuning(*a, **kw):
        raise AssertionError("tuned the same shape twice")

    A.tune, saved = no_more_tuning, A.tune
    try:
        A.attention(*_qkv(seed=1))  # same shape: cached
        with torch.no_grad():  # forward-only is its own key
            with pytest.raises(AssertionError, match="tuned the same shape twice"):
                A.attention(*_qkv(grad=False))
    finally:
        A.tune = saved


def test_auto_picks_the_fastest_correct_backend(monkeypatch):
    """A backend that is fastest but wrong is rejected, one that raises is unavailable."""
    last = {}
    real_run = A._run

    def fake_run(name, q, k, v, dropout_p, scale):
        last["name"] = name
        if name == "broken":  # fast and wrong
            return q * 0 + 1
        if name == "nan":  # fast and not finite
            return q * float("nan")
        if name == "missing":
            raise RuntimeError("no kernel for this shape")
        return real_run(name, q, k, v, dropout_p, scale)

    def fake_ms(fn, device, warmup, reps):
        fn()
        return {"broken": 0.1, "nan": 0.1, "flash": 2.0, "math": 1.0}[last["name"]]

    monkeypatch.setattr(A, "_run", fake_run)
    monkeypatch.setattr(A.timing, "median_ms", fake_ms)
    monkeypatch.setattr(A, "candidates", lambda device: ["broken", "nan", "missing", "flash", "math"])
    A.attention(*_qkv())
    (entry,) = A.attn_autotune_results().values()
    assert entry["backend"] == "math"
    assert entry["times_ms"] == {"flash": 2.0, "math": 1.0}
    assert entry["rejected"]["broken"].startswith("incorrect: relative error")
    assert entry["rejected"]["nan"].startswith("incorrect: relative error nan")
    assert entry["rejected"]["missing"] == "unavailable: RuntimeError: no kernel for this shape"
    with pytest.raises(RuntimeError, match="no attention backend runs this shape correctly"):
        A.tune(*_qkv(), names=["broken", "missing"])


def test_auto_leaves_the_global_rng_and_autocast_alone():
    state = torch.get_rng_state()
    q, k, v = _qkv((2, 2, 17, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        A.attention(q, k, v, dropout_p=0.1)  # tuning happens here (with dropout: its own key)
    (key,) = A.attn_autotune_results()
    assert "dropout=True" in key and "float32" in key  # tuned on the inputs' dtype, autocast off
    after = torch.get_rng_state()
    # the only RNG draws are the real call's dropout: replay it from the saved state
    torch.set_rng_state(state)
    A.attention(q, k, v, dropout_p=0.1)
    assert torch.equal(torch.get_rng_state(), after)


def test_autotune_off_uses_the_fixed_rule(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("measured although autotuning is off")

    monkeypatch.setattr(A, "tune", boom)
    A.set_attn_autotune(False)
    A.attention(*_qkv())
    A.set_attn_autotune(None)
    monkeypatch.setenv("MAE_FAST_ATTN_AUTOTUNE", "0")
    A.attention(*_qkv())
    assert A.attn_autotune_results() == {}
    assert A.auto_backend(torch.empty(1, 1, 4, 8)) is None  # CPU rule: SDPA's own choice


def test_compile_bakes_in_the_cached_choice_and_never_measures(monkeypatch):
    q, k, v = _qkv()

    def f(q, k, v):
        return A.attention(q, k, v) * 2

    eager = f(q, k, v)
    (key,) = A.attn_autotune_results()
    A._TUNED[key]["backend"] = "math"  # whatever was measured, the compiled graph must use the cache

    def boom(*a, **kw):
        raise AssertionError("measured while tracing")

    monkeypatch.setattr(A, "tune", boom)
    used = []
    real_run = A._run
    monkeypatch.setattr(A, "_run", lambda name, *a: (used.append(name), real_run(name, *a))[1])
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert used and set(used) == {"math"}
    # an untuned shape under compile: the fixed rule, nothing measured
    used.clear()
    q2, k2, v2 = _qkv((1, 2, 9, 8))
    torch.compile(f, fullgraph=True, backend="aot_eager")(q2, k2, v2).sum().backward()
    assert set(used) == {A.SDPA_DEFAULT} and len(A.attn_autotune_results()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,hd", [(64, 12, 50, 64), (64, 16, 197, 32), (64, 16, 65, 80)])
def test_cuda_auto_measures_the_mae_shapes(B, H, N, hd):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, hd, device="cuda", generator=g).bfloat16().requires_grad_(True) for _ in range(3))
    out = A.attention(q, k, v)
    (entry,) = A.attn_autotune_results().values()
    assert entry["backend"] in A.candidates(q.device) and "flash" in entry["times_ms"], entry
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    exact = torch.softmax(q64 @ k64.transpose(-1, -2) / hd ** 0.5, dim=-1) @ v64
    assert (out.double() - exact).norm() / exact.norm() < 2e-2


def test_auto_measures_in_the_callers_memory_layout(monkeypatch):
    """q, k, v as views into one qkv buffer (as in Attention): the timed inputs have the same strides."""
    B, N, H, hd = 6, 17, 3, 8  # B above the correctness slice (4): full-batch calls are the timed ones
    qkv = torch.randn(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd], strided views
    q, k, v = qkv.unbind(0)
    seen = []
    real_run = A._run

    def spy(name, q_, k_, v_, dropout_p, scale):
        seen.append((q_.shape[0], q_.stride()))
        return real_run(name, q_, k_, v_, dropout_p, scale)

    monkeypatch.setattr(A, "_run", spy)
    A.attention(q, k, v)
    (key,) = A.attn_autotune_results()
    assert "strides=" + ",".join(map(str, q.stride())) in key
    timed = [s for b, s in seen if b == B]
    assert timed and all(s == q.stride() for s in timed)


def test_public_names_and_a_model_step():
    """The README's calls: mae_fast.nn exports the autotune controls; a model step records both attention shapes."""
    import mae_fast.nn as mnn
    import mae_fast.models as M

    assert mnn.attn_autotune_results is A.attn_autotune_results and mnn.set_attn_autotune is A.set_attn_autotune
    torch.manual_seed(0)
    m = M.mae_vit_tiny_patch8()
    m.forward_train(torch.randn(2, 3, 64, 64), 0.75).backward()
    keys = list(mnn.attn_autotune_results())
    assert len(keys) == 2 and any("Nq=17|" in k and "hd=64|" in k for k in keys)  # encoder: 1 + 16 tokens
    assert any("Nq=65|" in k and "hd=32|" in k for k in keys)  # decoder: 1 + 64 tokens
    mnn.clear_attn_autotune()
    assert mnn.attn_autotune_results() == {}
