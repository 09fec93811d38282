"""Per-op microbenchmarks (pytest-benchmark): mae_fast ops vs the reference's eager code vs torch.compile of it.

Ops: random_masking, gather_tokens, gather_patches, unshuffle_tokens, norm_pix_loss, each forward
("fwd", with autograd recording where inputs need gradients, as in training) and forward + backward
("fwd+bwd", torch.autograd.grad with a fixed random output gradient). Masking has no backward.

    GPU:  python -m pytest bench/test_microbench.py --mae-json bench/results/microbench_h200.json
    CPU:  python -m pytest bench/test_microbench.py --mae-no-compile
(run without TRITON_INTERPRET: on a CPU the ops take their torch path). Benchmarks are not tests: nothing
here asserts a speed; each row only checks that the three implementations agree before timing them.
"""
import pytest
import torch

from mae_fast import benchutil, ops, reference

IMPLS = ["mae_fast", "reference", "reference+compile"]
_COMPILED = {}


# ----------------------------------------------------------------------------- reference (eager) code
def ref_masking(N, L, K, device):
    noise = torch.rand(N, L, device=device)  # [N, L]
    ids_shuffle = torch.argsort(noise, dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    ids_keep = ids_shuffle[:, :K]  # [N, K]
    mask = torch.ones(N, L, device=device)
    mask[:, :K] = 0
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)  # [N, L]


def ref_gather_tokens(x, ids_keep, pos, cls):
    D = x.shape[-1]
    xg = torch.gather(x + pos[:, 1:], 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    prefix = (cls + pos[:, :1]).expand(x.shape[0], -1, -1)  # [N, 1, D]
    return torch.cat([prefix, xg], dim=1)  # [N, 1+K, D]


def fast_gather_tokens(x, ids_keep, pos, cls):
    return ops.gather_tokens(x, ids_keep, pos_embed=pos[:, 1:], prefix=cls + pos[:, :1])


def ref_gather_patches(imgs, ids_keep, p):
    N, C, H, W = imgs.shape
    x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [N, h, w, C, p, p]
    x = x.reshape(N, (H // p) * (W // p), C * p * p)  # [N, L, C*p*p]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))  # [N, K, C*p*p]


def ref_unshuffle(x, ids_restore, mask_token, pos):
    N, T, D = x.shape
    mask_tokens = mask_token.repeat(N, ids_restore.shape[1] + 1 - T, 1)  # [N, L-K, D]
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, D]
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))  # [N, L, D]
    return torch.cat([x[:, :1], x_], dim=1) + pos  # [N, 1+L, D]


def fast_unshuffle(x, ids_restore, mask_token, pos):
    return ops.unshuffle_tokens(x, ids_restore, mask_token, pos_embed=pos, num_prefix=1)


def ref_loss(pred, imgs, mask, p):
    return reference.patch_loss(imgs, pred, mask, p, norm_pix_loss=True)


def fast_loss(pred, imgs, mask, p):
    return ops.norm_pix_loss(pred, imgs, mask, p, norm_pix=True)


# ----------------------------------------------------------------------------- cases
def _case(op, env):
    """(fast fn, reference fn, args, indices of args that need gradients)."""
    dev, dt, N, L, K = env.device, env.dtype, env.N, env.L, env.K
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(dev, dt)
        return t.requires_grad_(grad)

    m = ops.random_masking(N, L, env.ratio, device=dev)
    if op == "random_masking":
        return (lambda: ops.random_masking(N, L, env.ratio, device=dev)), (lambda: ref_masking(N, L, K, dev)), (), []
    if op == "gather_tokens":
        args = (rnd(N, L, env.D, grad=True), m.ids_keep, rnd(1, 1 + L, env.D), rnd(1, 1, env.D, grad=True))
        return fast_gather_tokens, ref_gather_tokens, args, [0, 3]
    if op == "gather_patches":
        args = (rnd(N, env.C, env.img, env.img, grad=True), m.ids_keep, env.p)
        return ops.gather_patches, ref_gather_patches, args, [0]
    if op == "unshuffle_tokens":
        args = (rnd(N, 1 + K, env.Dd, grad=True), m.ids_restore, rnd(1, 1, env.Dd, grad=True), rnd(1, 1 + L, env.Dd))
        return fast_unshuffle, ref_unshuffle, args, [0, 2]
    if op == "norm_pix_loss":
        args = (rnd(N, L, env.p * env.p * env.C, grad=True), rnd(N, env.C, env.img, env.img), m.mask, env.p)
        return fast_loss, ref_loss, args, [0]
    raise ValueError(op)


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _outs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["random_masking", "gather_tokens", "gather_patches", "unshuffle_tokens", "norm_pix_loss"])
def test_op(benchmark, env, record, op, impl, pass_):
    if op == "random_masking" and pass_ == "fwd+bwd":
        pytest.skip("masking has no backward")
    if impl == "reference+compile" and not env.compile:
        pytest.skip("--mae-no-compile")
    fast, ref, args, grad_idx = _case(op, env)
    if impl == "mae_fast":
        fn = fast
    elif impl == "reference":
        fn = ref
    else:
        fn = _COMPILED.setdefault(op, torch.compile(ref))

    out = _outs(fn(*args))
    if op != "random_masking":  # the three agree (value check, not a test of the op: tests/ops does that)
        expect = _outs(ref(*args))
        tol = 3e-2 if env.dtype == torch.float32 else 1e-1  # the reference loss computes in bf16, ours in fp32
        torch.testing.assert_close(out[0].float(), expect[0].float(), atol=tol, rtol=tol)
    inputs = [args[i] for i in grad_idx]
    grad_out = [torch.randn_like(o) for o in out if o.requires_grad] if inputs else []

    if pass_ == "fwd":
        def run():
            return fn(*args)
    else:
        def run():
            o = _outs(fn(*args))
            return torch.autograd.grad([x for x in o if x.requires_grad], inputs, grad_out)

    t = benchutil.time_fn(run, warmup_ms=env.rep_ms / 4, rep_ms=env.rep_ms, device=env.device)
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)

    def synced():
        run()
        sync()

    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    nbytes = _nbytes(args) + _nbytes(out)
    if pass_ == "fwd+bwd":
        nbytes += _nbytes(grad_out) + _nbytes(inputs)
    row = {
        "op": op, "impl": impl, "pass": pass_, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"],
        "p80_ms": t["p80_ms"], "bytes": nbytes, "GB_per_s": nbytes / (t["median_ms"] * 1e-3) / 1e9,
        "frac_copy": nbytes / (t["median_ms"] * 1e-3) / env.copy_bw,
    }
    benchmark.extra_info.update(row)
    if not _COMPILED.get("_config_recorded"):
        row["_config"] = env.config()
        _COMPILED["_config_recorded"] = True
    record(row)
