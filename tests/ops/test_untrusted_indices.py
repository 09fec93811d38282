"""Index tensors the ops did not make themselves, on both CPU paths (the Triton kernels under the
interpreter, and the plain torch path): ids outside their range, repeated ids, ids_restore rows that are
no permutation, extreme values (-2**31, 2**40), int32 and int64, strided.

Unchecked (``check_indices=False`` / ``check=False``), every op gives the meaning of ``mae_fast/ops/_indices.py``:
an id outside [0, L) makes its output row NaN (no crash, no other sample's data) and feeds no gradient; a
repeated id gets the summed gradient, as torch.gather's. The oracle is that meaning in float64 by autograd.
Checked (the default for CPU tensors), the same ids are a ValueError naming the argument.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mae_fast import ops, reference
from mae_fast.testing import randn, random_ids

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EXTREME = {torch.int32: [-2**31, 2**31 - 1], torch.int64: [-2**31, 2**31, 2**40, -2**63]}


def draw_ids(data, N, K, L, dtype, *, valid_only=False):
    """ids [N, K] of ``dtype``: mostly in [0, L), often repeated; unless valid_only also just outside the range
    and the dtype's extremes; sometimes a strided view."""
    lo, hi = (0, L - 1) if valid_only else (-2, L + 1)
    values = st.integers(lo, hi) if valid_only else st.one_of(st.integers(lo, hi), st.sampled_from(EXTREME[dtype]))
    flat = data.draw(st.lists(values, min_size=N * K, max_size=N * K))
    ids = torch.tensor(flat, dtype=torch.int64).reshape(N, K).to(dtype)
    if data.draw(st.booleans()):  # strided: every other column of a wider tensor
        wide = torch.zeros(N, 2 * K, dtype=dtype)
        wide[:, ::2] = ids
        ids = wide[:, ::2]
    return ids


def valid_clamped(ids, L):
    idx = ids.long()
    valid = (idx >= 0) & (idx < L)
    return valid, idx.clamp(0, max(L - 1, 0))


def grads_of(fn, inputs, grad_out):
    """(out, grads of the float inputs) of fn on fresh leaves; None for inputs that are not float tensors."""
    leaves = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), grads


def assert_matches(fn, oracle, inputs, grad_out):
    """fn's output equals the fp32 rounding of the float64 oracle exactly (NaN where the oracle has NaN), its
    gradients are the oracle's within fp32 summation error, inputs are left alone and a rerun is bitwise equal."""
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    out, grads = grads_of(fn, inputs, grad_out)
    wide = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    exact, grads64 = grads_of(oracle, wide, grad_out.double())
    torch.testing.assert_close(out, exact.to(out.dtype), rtol=0, atol=0, equal_nan=True)
    for g, g64 in zip(grads, grads64):
        g64 = torch.zeros_like(g64) if g is None and g64 is not None else g64
        g = torch.zeros_like(g64) if g is None else g
        assert torch.isfinite(g).all(), "a gradient is not finite"
        tol = 1e-5 * (1 + g64.abs().max().item()) if g64.numel() else 0
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=tol)
    again, grads2 = grads_of(fn, inputs, grad_out)
    assert torch.equal(again.nan_to_num(7.0), out.nan_to_num(7.0)), "not deterministic"
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads, grads2)), "not deterministic"
    for t, b in zip(inputs, before):
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b), "an input was modified"


# ------------------------------------------------------------------------------------------ oracles
def gather_oracle(x, ids, pos=None, prefix=None):
    N, L, D = x.shape
    valid, idx = valid_clamped(ids, L)
    rows = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D))  # [N, K, D]
    if pos is not None:
        rows = rows + pos[0][idx]
    rows = torch.where(valid.unsqueeze(-1), rows, float("nan"))
    return rows if prefix is None else torch.cat([prefix.expand(N, -1, -1), rows], dim=1)


def patches_oracle(imgs, ids, p, u=1):
    L = (imgs.shape[2] // u if imgs.dim() == 5 else 1) * (imgs.shape[-2] // p) * (imgs.shape[-1] // p)
    valid, idx = valid_clamped(ids, L)
    return torch.where(valid.unsqueeze(-1), reference.visible_patches(imgs, idx, p, u), float("nan"))


def unshuffle_oracle(x, ids_restore, mask_token, pos=None, P=1):
    L = ids_restore.shape[1]
    valid, idx = valid_clamped(ids_restore, L)
    out = reference.decoder_input(x, idx, mask_token, pos, P)  # [N, P+L, D]
    tokens = torch.where(valid.unsqueeze(-1), out[:, P:], float("nan"))
    return torch.cat([out[:, :P], tokens], dim=1)


# ------------------------------------------------------------------------------------------ properties
@SETTINGS
@given(data=st.data(), N=st.integers(1, 3), L=st.integers(1, 9), D=st.integers(1, 6), P=st.integers(0, 2),
       dtype=st.sampled_from([torch.int32, torch.int64]), with_pos=st.booleans())
def test_gather_tokens_any_ids(each_path, data, N, L, D, P, dtype, with_pos):
    K = data.draw(st.integers(0, L))
    ids = draw_ids(data, N, K, L, dtype)
    x, pos, pre = randn(N, L, D), randn(1, L, D, seed=1) if with_pos else None, randn(1, P, D, seed=2) if P else None
    fn = lambda x, pos, pre: ops.gather_tokens(x, ids, pos, pre, check_indices=False)  # noqa: E731
    assert_matches(fn, lambda x, pos, pre: gather_oracle(x, ids, pos, pre), [x, pos, pre], randn(N, P + K, D, seed=3))


@SETTINGS
@given(data=st.data(), N=st.integers(1, 3), grid=st.sampled_from([(1, 4, 8, 4, 1), (2, 4, 4, 4, 1), (4, 4, 8, 4, 2)]),
       dtype=st.sampled_from([torch.int32, torch.int64]))
def test_gather_patches_any_ids(each_path, data, N, grid, dtype):
    T, H, W, p, u = grid  # T = 1: a 4-D image; else a video of T frames, tubelets of u
    L = (T // u) * (H // p) * (W // p)
    K = data.draw(st.integers(0, L))
    ids = draw_ids(data, N, K, L, dtype)
    imgs = randn(N, 2, H, W) if T == 1 else randn(N, 2, T, H, W)
    fn = lambda im: ops.gather_patches(im, ids, p, t_patch_size=u, check_indices=False)  # noqa: E731
    assert_matches(fn, lambda im: patches_oracle(im, ids, p, u), [imgs], randn(N, K, 2 * u * p * p, seed=3))


@SETTINGS
@given(data=st.data(), N=st.integers(1, 3), L=st.integers(1, 9), D=st.integers(1, 6), P=st.integers(0, 2),
       dtype=st.sampled_from([torch.int32, torch.int64]), with_pos=st.booleans(), perm=st.booleans())
def test_unshuffle_tokens_any_ids(each_path, data, N, L, D, P, dtype, with_pos, perm):
    K = data.draw(st.integers(0, L))
    if perm:  # a permutation with a few entries replaced: repeats, gaps, out of range
        ids = random_ids(N, L, K, dtype, seed=data.draw(st.integers(0, 99)))[1]
        for _ in range(data.draw(st.integers(0, 2))):
            ids[data.draw(st.integers(0, N - 1)), data.draw(st.integers(0, L - 1))] = \
                data.draw(st.one_of(st.integers(-2, L + 1), st.sampled_from(EXTREME[dtype])))
    else:
        ids = draw_ids(data, N, L, L, dtype)
    x, mt = randn(N, P + K, D), randn(1, 1, D, seed=1)
    pos = randn(1, P + L, D, seed=2) if with_pos else None
    fn = lambda x, mt, pos: ops.unshuffle_tokens(x, ids, mt, pos, P, check_indices=False)  # noqa: E731
    assert_matches(fn, lambda x, mt, pos: unshuffle_oracle(x, ids, mt, pos, P), [x, mt, pos],
                   randn(N, P + L, D, seed=3))


def loss_oracle(pred, imgs, ids, p, norm_pix=True, eps=1e-6):
    """The masked-only loss for any ids: rows of ids outside [0, L) have a NaN target."""
    target = reference.patchify(imgs, p)  # [N, L, D]
    valid, idx = valid_clamped(ids, target.shape[1])
    t = torch.gather(target, 1, idx.unsqueeze(-1).expand(-1, -1, target.shape[-1]))  # [N, M, D]
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps) ** 0.5
    t = torch.where(valid.unsqueeze(-1), t, float("nan"))
    return ((pred - t) ** 2).mean(-1).mean()


@SETTINGS
@given(data=st.data(), N=st.integers(1, 3), dtype=st.sampled_from([torch.int32, torch.int64]),
       norm_pix=st.booleans(), imgs_grad=st.booleans())
def test_norm_pix_loss_any_ids_masked(each_path, data, N, dtype, norm_pix, imgs_grad):
    p, L = 4, 6  # imgs [N, 2, 8, 12]: 2 x 3 patches of D = 32
    M = data.draw(st.integers(1, L))
    ids = draw_ids(data, N, M, L, dtype, valid_only=data.draw(st.booleans()))  # valid: often repeated
    pred, imgs = randn(N, M, 32), torch.rand(N, 2, 8, 12, generator=torch.Generator().manual_seed(5)) + 0.5
    valid, _ = valid_clamped(ids, L)
    x = pred.clone().requires_grad_(True)
    im = imgs.clone().requires_grad_(imgs_grad)
    loss = ops.norm_pix_loss(x, im, None, p, norm_pix, ids_masked=ids, check=False)
    wanted = [x, im] if imgs_grad else [x]
    grads = torch.autograd.grad(loss, wanted)
    assert torch.equal(imgs, im.detach())
    if not valid.all():  # a NaN target row: the loss says so, and that row's gradient too
        assert torch.isnan(loss)
        assert torch.isnan(grads[0][~valid]).all()
        return
    xo, io = pred.double().requires_grad_(True), imgs.double().requires_grad_(imgs_grad)
    ref = loss_oracle(xo, io, ids, p, norm_pix)
    ref_grads = torch.autograd.grad(ref, [xo, io] if imgs_grad else [xo])
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


# ---------------------------------------------------------------------------------------------- extreme ids
def test_huge_and_negative_ids_do_not_crash_or_leak(each_path):
    """Ids of 2**40 and -1: no crash, no read outside x (another sample's rows or garbage), NaN rows."""
    x = randn(2, 6, 4)
    for bad in (2**40, -1, 6):
        ids = torch.tensor([[0, bad, 5], [1, 2, 4]])
        out = ops.gather_tokens(x, ids, check_indices=False)
        assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, [0, 2]]).any()
        assert torch.equal(out[1], x[1, [1, 2, 4]])
        pm = ops.gather_patches(randn(2, 3, 8, 12), ids, 4, check_indices=False)
        assert torch.isnan(pm[0, 1]).all() and not torch.isnan(pm[1]).any()
        restore = torch.tensor([[0, 1, 2, 3, bad, 5], [5, 4, 3, 2, 1, 0]])
        dec = ops.unshuffle_tokens(randn(2, 1 + 3, 4), restore, torch.zeros(4), check_indices=False)
        assert torch.isnan(dec[0, 1 + 4]).all() and not torch.isnan(dec[1]).any()
        assert not torch.isnan(dec[0, [0, 1, 2, 3, 4, 6]]).any()


def test_repeated_ids_gradient_is_torch_gathers(each_path):
    """Duplicates (three of one id, across several samples) sum their gradients, as torch.gather's."""
    x = randn(3, 7, 5).requires_grad_(True)
    ids = torch.tensor([[2, 2, 2, 0], [6, 1, 6, 1], [0, 1, 2, 3]])
    g = randn(3, 4, 5, seed=1)
    (gx,) = torch.autograd.grad(ops.gather_tokens(x, ids, check_indices=False), x, g)
    (ref,) = torch.autograd.grad(torch.gather(x, 1, ids[..., None].expand(-1, -1, 5)), x, g)
    torch.testing.assert_close(gx, ref, rtol=1e-6, atol=1e-6)


def test_checked_ids_raise_naming_the_argument():
    """The default for CPU tensors (and check_indices=True anywhere): a ValueError naming the argument."""
    x, imgs = randn(2, 6, 4), randn(2, 3, 8, 12)
    bad, dup = torch.tensor([[0, 9, 5], [1, 2, 4]]), torch.tensor([[0, 0, 5], [1, 2, 4]])
    for ids, what in ((bad, "outside"), (dup, "distinct")):
        for kw in ({}, {"check_indices": True}):
            with pytest.raises(ValueError, match=f"ids_keep .*{what}"):
                ops.gather_tokens(x, ids, **kw)
            with pytest.raises(ValueError, match=f"ids_keep .*{what}"):
                ops.gather_patches(imgs, ids, 4, **kw)
    restore = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 1]])
    with pytest.raises(ValueError, match="ids_restore rows must be permutations"):
        ops.unshuffle_tokens(randn(2, 4, 4), restore, torch.zeros(4))
    with pytest.raises(ValueError, match=r"ids_restore has entries outside \[0, 6\)"):
        ops.unshuffle_tokens(randn(2, 4, 4), restore - 1, torch.zeros(4))
    pred = randn(2, 3, 48)
    with pytest.raises(ValueError, match=r"ids_masked has entries outside \[0, 6\)"):
        ops.norm_pix_loss(pred, imgs, None, 4, ids_masked=bad)
    with pytest.raises(ValueError, match="ids_masked rows must hold distinct"):
        ops.norm_pix_loss(pred, imgs, None, 4, ids_masked=dup)
    with pytest.raises(ValueError, match=r"ids_masked names M=7 patches but imgs has only L=6"):
        ops.norm_pix_loss(randn(2, 7, 48), imgs, None, 4, ids_masked=torch.zeros(2, 7, dtype=torch.long),
                          check=False)


def test_env_switch_turns_cpu_checks_off(monkeypatch):
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "0")
    out = ops.gather_tokens(randn(2, 6, 4), torch.tensor([[0, 9, 5], [1, 2, 4]]))
    assert torch.isnan(out[0, 1]).all()


def test_long_rows_through_the_ops(each_path):
    """Rows of a few hundred ids (several BLOCK_C tiles of the chain builder), values repeated up to five
    times and some out of range, beside a sample without repeats: gather_tokens and unshuffle_tokens match."""
    g = torch.Generator().manual_seed(7)
    N, L, K, D = 2, 200, 130, 2
    ids = torch.randint(-3, L // 5, (N, K), generator=g)
    ids[1] = torch.randperm(L, generator=g)[:K]
    assert_matches(lambda x: ops.gather_tokens(x, ids, check_indices=False), lambda x: gather_oracle(x, ids),
                   [randn(N, L, D)], randn(N, K, D, seed=1))
    restore = torch.randint(0, L, (N, L), generator=g)
    restore[1] = torch.randperm(L, generator=g)
    assert_matches(lambda x: ops.unshuffle_tokens(x, restore, torch.zeros(D), num_prefix=0, check_indices=False),
                   lambda x: unshuffle_oracle(x, restore, torch.zeros(D, dtype=torch.float64), None, 0),
                   [randn(N, K, D, seed=2)], randn(N, L, D, seed=3))


def test_inverse_map_of_long_rows(triton_path):
    """kernels/index_map.py on K > 1024 ids (several BLOCK_K chunks and BLOCK_C tiles) against its definition:
    code = the first k naming l (negative, -(k+1), when more follow; 2**31 - 1 for none), nxt = the next k."""
    from mae_fast.ops._indices import index_map
    g = torch.Generator().manual_seed(8)
    N, L, K = 3, 1500, 1200
    ids = torch.randint(-5, L // 4, (N, K), generator=g)
    ids[1] = torch.randperm(L, generator=g)[:K]  # no repeats: nxt is never written nor read
    ids[2, ::7] = 2**40
    code, nxt = index_map(ids, L)
    for n in range(N):
        where = {}
        for k, v in enumerate(ids[n].tolist()):
            if 0 <= v < L:
                where.setdefault(v, []).append(k)
        want = torch.full((L,), 2**31 - 1, dtype=torch.int32)
        for v, ks in where.items():
            want[v] = ks[0] if len(ks) == 1 else -(ks[0] + 1)
            if len(ks) > 1:
                assert nxt[n, ks].tolist() == ks[1:] + [-1]
        assert torch.equal(code[n], want), n


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gather_tokens", "gather_patches", "unshuffle_tokens", "norm_pix_loss"])
def test_gpu_any_ids(op):
    """On CUDA (where a bad read is a crash or a device-side assert): NaN rows, no error, torch.gather's
    gradients, at sizes with several programs per sample and chains across blocks; and the engine's ids
    give the same result as the torch path, bitwise."""
    g = torch.Generator().manual_seed(11)
    N, L, D = 16, 196, 768
    bad = torch.randint(-4, L + 4, (N, 147), generator=g)
    bad[0, 0], bad[1, 1] = 2**40, -2**40
    good, restore = random_ids(N, L, 147, seed=12)
    cuda = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    if op == "gather_tokens":
        x, pos = randn(N, L, D), randn(1, L, D, seed=1)
        for ids in (bad, good):
            (i,) = cuda(ids)
            fn = lambda x, pos: ops.gather_tokens(x, i, pos, check_indices=False)  # noqa: E731
            assert_matches(fn, lambda x, pos: gather_oracle(x, i, pos), cuda(x, pos), randn(N, 147, D, seed=2).cuda())
    elif op == "gather_patches":
        imgs = randn(N, 3, 224, 224)
        for ids in (bad, good):
            (i,) = cuda(ids)
            assert_matches(lambda im: ops.gather_patches(im, i, 16, check_indices=False),
                           lambda im: patches_oracle(im, i, 16), cuda(imgs), randn(N, 147, D, seed=3).cuda())
    elif op == "unshuffle_tokens":
        broken = restore.clone()
        broken[:4, :50] = broken[:4, 50:100]  # repeats and gaps
        broken[4, 7] = 2**40
        for ids in (broken, restore):
            (i,) = cuda(ids)
            x, mt, pos = cuda(randn(N, 1 + 49, 512), randn(1, 1, 512, seed=4), randn(1, 1 + L, 512, seed=5))
            fn = lambda x, mt, pos: ops.unshuffle_tokens(x, i, mt, pos, check_indices=False)  # noqa: E731
            assert_matches(fn, lambda x, mt, pos: unshuffle_oracle(x, i, mt, pos), [x, mt, pos],
                           randn(N, 1 + L, 512, seed=6).cuda())
    else:
        imgs = torch.rand(N, 3, 224, 224, generator=g).cuda()
        x = randn(N, 147, D, seed=7).cuda().requires_grad_(True)
        loss = ops.norm_pix_loss(x, imgs, None, 16, ids_masked=bad.cuda(), check=False)
        loss.backward()
        valid = ((bad >= 0) & (bad < L)).cuda()
        assert torch.isnan(loss) and torch.isnan(x.grad[~valid]).all() and torch.isfinite(x.grad[valid]).all()
