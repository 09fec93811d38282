"""Tests of the masking engine (csrc/ + mae_fast/ops/masking.py).

CPU: Philox known answers, the documented key stream (re-derived in Python), invariants
(hypothesis), exact noise parity with the reference, tube structure, determinism, uniformity
(chi-square at fixed seeds), torch.compile, bad inputs. GPU (``gpu`` marker): CPU == CUDA for
the same seed and offset, noise parity on CUDA, one launch, CUDA graph capture and replay.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_fast import _C, reference
from mae_fast.ops import Masking, random_masking
from mae_fast.ops.random_masking import _random_masking_seeded, masking_reference, num_kept

scipy_stats = pytest.importorskip("scipy.stats")


# ---------------------------------------------------------------- helpers
def check_invariants(m: Masking, N, L, K, device="cpu"):
    ids_keep, ids_restore, mask = m
    assert ids_keep.shape == (N, K) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (N, L) and ids_restore.dtype == torch.int64
    assert mask.shape == (N, L) and mask.dtype == torch.float32
    for t in m:
        assert t.device.type == torch.device(device).type
    ids_keep, ids_restore, mask = (t.cpu() for t in m)
    ar = torch.arange(L).expand(N, L)
    assert torch.equal(ids_restore.sort(1).values, ar), "ids_restore is not a permutation"
    kept = ids_restore < K  # [N, L]
    assert torch.equal(mask, (~kept).float())
    # kept exactly when ids_restore < K, and then ids_keep[ids_restore[l]] == l
    if K:
        back = torch.gather(ids_keep, 1, ids_restore.clamp(max=K - 1))  # [N, L]
        assert torch.equal(back[kept], ar[kept])
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - K)))


def assert_same(a: Masking, b: Masking):
    for name, x, y in zip(Masking._fields, a, b):
        assert torch.equal(x.cpu(), y.cpu()), f"{name} differs"


M32 = 0xFFFFFFFF


def philox_py(ctr, key):
    """Philox4x32-10 in plain Python (independent of csrc/philox.h)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def masks_from_python_keys(N, L, ratio, seed, offset, frames=1):
    """The documented random-mode key stream, sorted in Python, through the tube layout."""
    Ls = L // frames
    bits = (Ls - 1).bit_length()
    low = (1 << bits) - 1
    keys = torch.empty(N, Ls, dtype=torch.float64)
    block = offset // 4
    rows = []
    for n in range(N):
        row = []
        for s in range(Ls):
            sub = n * Ls + s
            w = philox_py((block & M32, block >> 32, sub & M32, sub >> 32), (seed & M32, seed >> 32))
            k = ((w[0] << 32) | w[1]) & ~low | s
            row.append(k)
        rows.append(row)
    # rank by the 64-bit keys (exact ints), then use the tube oracle on the ranks
    for n, row in enumerate(rows):
        order = sorted(range(Ls), key=lambda s: row[s])
        for r, s in enumerate(order):
            keys[n, s] = r
    return masking_reference(keys, L, ratio, frames)


def ref_masking(noise, ratio):
    """The reference MAE random_masking (unstable argsort) as a Masking."""
    N, L = noise.shape
    x = torch.zeros(N, L, 1, device=noise.device)
    _, mask, ids_restore, ids_keep = reference.random_masking(x, ratio, noise=noise)
    return Masking(ids_keep, ids_restore, mask)


# ---------------------------------------------------------------- Philox
@pytest.mark.parametrize(
    "ctr,key,expected",
    [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([M32] * 4, [M32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    # Random123's published known-answer vectors for Philox4x32-10
    assert list(_C._philox4x32_10(ctr, key)) == expected
    assert list(philox_py(ctr, key)) == expected


@pytest.mark.parametrize("N,L,ratio,frames,seed,offset", [
    (3, 50, 0.75, 1, 0, 0), (2, 7, 0.5, 1, 2**40 + 5, 8), (2, 24, 0.6, 4, 123, 4 * 2**33), (1, 1, 0.0, 1, 9, 0)])
def test_key_stream_matches_documentation(N, L, ratio, frames, seed, offset):
    got = _random_masking_seeded(N, L, ratio, seed=seed, offset=offset, frames=frames)
    assert_same(got, masks_from_python_keys(N, L, ratio, seed, offset, frames))


# ---------------------------------------------------------------- invariants
@settings(max_examples=60, deadline=None)
@given(
    N=st.integers(0, 5),
    Ls=st.integers(1, 70),
    frames=st.integers(1, 4),
    ratio=st.floats(0.0, 0.99),
    use_noise=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_invariants(N, Ls, frames, ratio, use_noise, seed):
    L = Ls * frames
    Ks = int(Ls * (1 - ratio))  # 0 keeps nothing: the encoder then sees the cls token alone
    K = frames * Ks
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(N, Ls, generator=g) if use_noise else None
    m = random_masking(N, L, ratio, frames=frames, generator=g, noise=noise)
    check_invariants(m, N, L, K)
    assert K == num_kept(L, ratio, frames)
    # ids_keep then ids_masked is the shuffle that ids_restore undoes, so every removed token is listed once
    ids_shuffle = torch.cat([m.ids_keep, m.ids_masked], dim=1)  # [N, L]
    assert torch.equal(m.ids_restore.gather(1, ids_shuffle), torch.arange(L).expand(N, L))
    assert bool((m.mask.gather(1, m.ids_masked) == 1).all())
    if frames == 1:
        assert K == reference.num_kept(L, ratio)
    if use_noise:
        assert_same(m, masking_reference(noise, L, ratio, frames))


# ---------------------------------------------------------------- noise parity
@pytest.mark.parametrize("N,L,ratio", [(3, 50, 0.75), (8, 196, 0.75), (2, 1568, 0.9), (5, 17, 0.3), (1, 1, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_parity_with_reference(N, L, ratio, dtype):
    g = torch.Generator().manual_seed(N * 1000 + L)
    noise = torch.randperm(N * L, generator=g).view(N, L).to(dtype) / (N * L)  # distinct values
    m = random_masking(N, L, ratio, noise=noise)
    assert_same(m, ref_masking(noise, ratio))
    K = m.ids_keep.shape[1]
    assert torch.equal(m.ids_masked, torch.argsort(noise, dim=1)[:, K:])  # the official ids_shuffle[:, K:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_noise_ties_are_stable(dtype):
    # bf16 rounding of uniform noise gives many ties: ties go to the lower token index
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(6, 300, generator=g).to(dtype)
    noise[0, :] = 0.5
    noise[1, ::2] = -0.0
    noise[1, 1::2] = 0.0  # -0.0 == +0.0, as in torch.sort
    m = random_masking(6, 300, 0.6, noise=noise)
    assert_same(m, masking_reference(noise, 300, 0.6))
    order = torch.argsort(noise.double(), dim=1, stable=True)
    assert torch.equal(m.ids_keep, order[:, : m.ids_keep.shape[1]])
    assert torch.equal(m.ids_keep[0], torch.arange(120))


def test_noise_non_contiguous_and_not_modified():
    base = torch.rand(40, 6)
    noise = base.t()  # [6, 40] non-contiguous
    before = noise.clone()
    assert_same(random_masking(6, 40, 0.5, noise=noise), ref_masking(noise.contiguous(), 0.5))
    assert torch.equal(noise, before)


# ---------------------------------------------------------------- tube masking
@pytest.mark.parametrize("N,T,Ls,ratio", [(3, 8, 196, 0.9), (2, 4, 50, 0.75), (4, 2, 9, 0.5)])
def test_tube_structure(N, T, Ls, ratio):
    L = T * Ls
    Ks = int(Ls * (1 - ratio))
    m = random_masking(N, L, ratio, frames=T, generator=torch.Generator().manual_seed(1))
    check_invariants(m, N, L, T * Ks)
    mask = m.mask.view(N, T, Ls)
    assert torch.equal(mask, mask[:, :1].expand(N, T, Ls)), "one spatial mask repeated over frames"
    keep = m.ids_keep.view(N, T, Ks)
    frame = torch.arange(T).view(1, T, 1)
    assert torch.equal(keep // Ls, frame.expand(N, T, Ks)), "ids_keep is frame-major"
    assert torch.equal(keep % Ls, (keep % Ls)[:, :1].expand(N, T, Ks)), "same spatial order in every frame"
    # given spatial noise, equals the documented oracle and, per frame, the image-mode masks
    noise = torch.rand(N, Ls)
    mt = random_masking(N, L, ratio, frames=T, noise=noise)
    assert_same(mt, masking_reference(noise, L, ratio, T))
    m1 = random_masking(N, Ls, ratio, noise=noise)
    assert torch.equal(mt.ids_keep[:, :Ks], m1.ids_keep)
    assert torch.equal(mt.mask[:, :Ls], m1.mask)


# ---------------------------------------------------------------- randomness
def test_manual_seed_reproduces_and_calls_differ():
    torch.manual_seed(0)
    a = random_masking(16, 196, 0.75)
    b = random_masking(16, 196, 0.75)
    torch.manual_seed(0)
    a2 = random_masking(16, 196, 0.75)
    b2 = random_masking(16, 196, 0.75)
    assert_same(a, a2)
    assert_same(b, b2)
    assert not torch.equal(a.ids_keep, b.ids_keep)
    # samples within a batch differ too
    assert len({tuple(r.tolist()) for r in a.ids_keep}) == 16


def test_generator_argument():
    a = random_masking(4, 50, 0.5, generator=torch.Generator().manual_seed(7))
    b = random_masking(4, 50, 0.5, generator=torch.Generator().manual_seed(7))
    c = random_masking(4, 50, 0.5, generator=torch.Generator().manual_seed(8))
    assert_same(a, b)
    assert not torch.equal(a.ids_keep, c.ids_keep)
    # the default generator is untouched by an explicit one
    torch.manual_seed(3)
    x = torch.rand(3)
    torch.manual_seed(3)
    random_masking(4, 50, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3), x)


def test_seeded_offsets_differ():
    a = _random_masking_seeded(4, 196, 0.75, seed=5, offset=0)
    b = _random_masking_seeded(4, 196, 0.75, seed=5, offset=4)
    c = _random_masking_seeded(4, 196, 0.75, seed=6, offset=0)
    assert_same(a, _random_masking_seeded(4, 196, 0.75, seed=5, offset=0))
    assert not torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.ids_keep, c.ids_keep)


def test_uniform_removal_per_position():
    # each position removed with probability (L - K) / L: chi-square on kept counts
    N, L, ratio = 20000, 50, 0.75
    m = random_masking(N, L, ratio, generator=torch.Generator().manual_seed(1234))
    K = m.ids_keep.shape[1]
    kept = (1 - m.mask).sum(0).double()  # [L]
    expected = torch.full((L,), N * K / L, dtype=torch.float64)
    p = scipy_stats.chisquare(kept.numpy(), expected.numpy()).pvalue
    assert p > 1e-3, f"kept counts not uniform over positions: p={p}"
    # and a position's rank among the kept ones (ids_keep order) is uniform too
    first = torch.bincount(m.ids_keep[:, 0], minlength=L).double()
    p = scipy_stats.chisquare(first.numpy(), torch.full((L,), N / L).numpy()).pvalue
    assert p > 1e-3, f"first kept token not uniform: p={p}"


def test_uniform_over_subsets():
    # all K-subsets equally likely (L=6, K=2: 15 subsets), tube mode included
    N, L, ratio = 30000, 6, 0.6
    for frames in (1, 2):
        m = random_masking(N, L * frames, ratio, frames=frames, generator=torch.Generator().manual_seed(99))
        spatial_keep = (m.ids_keep[:, : int(L * (1 - ratio))] % L).sort(1).values
        subsets = {s: i for i, s in enumerate(itertools.combinations(range(L), 2))}
        idx = torch.tensor([subsets[tuple(r)] for r in spatial_keep.tolist()])
        counts = torch.bincount(idx, minlength=len(subsets)).double()
        p = scipy_stats.chisquare(counts.numpy()).pvalue
        assert p > 1e-3, f"K-subsets not equally likely (frames={frames}): p={p}"


# ---------------------------------------------------------------- torch.compile
def test_compile_fullgraph():
    def f(x, noise):
        m = random_masking(x.shape[0], x.shape[1], 0.75)
        m2 = random_masking(x.shape[0], x.shape[1], 0.75)
        mn = random_masking(x.shape[0], x.shape[1], 0.75, noise=noise)
        x_masked = torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # [N, K, D]
        return x_masked, m, m2, mn

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x = torch.randn(4, 16, 3)
    noise = torch.rand(4, 16)
    torch.manual_seed(0)
    out = compiled(x, noise)
    torch.manual_seed(0)
    eager = f(x, noise)
    assert out[0].shape == (4, 4, 3)
    check_invariants(out[1], 4, 16, 4)
    assert not torch.equal(out[1].ids_keep, out[2].ids_keep), "two calls must not be merged"
    assert_same(out[3], eager[3])
    assert_same(out[1], eager[1])  # same seed: same masks compiled or not


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,name", [
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(mask_ratio=float("nan")), "mask_ratio"),
    (dict(mask_ratio=torch.tensor(1.0)), "mask_ratio"),
    (dict(num_tokens=0), "num_tokens"),
    (dict(batch_size=-1), "batch_size"),
    (dict(device="foo"), "device"),
    (dict(device="mps"), "device"),
    (dict(num_tokens=50, frames=3), "frames"),
    (dict(frames=0), "frames"),
    (dict(noise=torch.rand(4, 49)), "noise"),
    (dict(noise=torch.rand(4, 50, 1)), "noise"),
    (dict(noise=torch.randint(0, 9, (4, 50))), "noise"),
    (dict(noise=torch.rand(4, 50), frames=2), "noise"),
    (dict(noise=torch.rand(4, 50), device="meta"), "noise"),
    (dict(noise=torch.tensor([[float("nan")] * 50] * 4)), "noise"),
    (dict(noise=torch.tensor([[float("inf")] * 50] * 4)), "noise"),
    (dict(generator=torch.Generator(), device="meta"), "generator"),  # a generator of the wrong device
])
def test_bad_inputs(kwargs, name):
    args = dict(batch_size=4, num_tokens=50, mask_ratio=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        random_masking(args.pop("batch_size"), args.pop("num_tokens"), args.pop("mask_ratio"), **args)


def test_bad_types():
    with pytest.raises(TypeError, match="batch_size"):
        random_masking(4.0, 50, 0.5)
    with pytest.raises(TypeError, match="generator"):
        random_masking(4, 50, 0.5, generator=3)
    with pytest.raises(TypeError, match="noise"):
        random_masking(4, 50, 0.5, noise=[0.1] * 50)


def test_raw_ops_validate():
    d = torch.empty(0)
    with pytest.raises(ValueError, match="spatial_keep"):
        torch.ops.mae_fast.random_masking(d, 2, 10, -1, 1, None)
    with pytest.raises(ValueError, match="spatial_keep"):
        torch.ops.mae_fast.random_masking_seeded(d, 2, 10, 11, 1, 0, 0)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.mae_fast.random_masking_seeded(d, 2, 10, 3, 1, 0, 2)
    with pytest.raises(ValueError, match="noise"):
        torch.ops.mae_fast.masking_from_noise(torch.tensor([[0.1, float("nan")]]), 1, 1)
    with pytest.raises(ValueError, match="noise"):
        torch.ops.mae_fast.masking_from_noise(torch.ones(2, 3, dtype=torch.int32), 1, 1)


@pytest.mark.parametrize("N,L,ratio,frames", [(4, 9, 0.9, 1), (3, 16, 0.9, 4), (2, 1, 0.5, 1), (0, 50, 0.75, 1),
                                              (0, 12, 0.9, 3)])
def test_keeps_nothing_or_no_sample_like_the_reference(N, L, ratio, frames):
    """K = 0 (a 3x3 grid at ratio 0.9: the official encoder then sees the cls token alone) and N = 0 run, as
    the reference's random_masking does, with the same masks from the same noise."""
    g = torch.Generator().manual_seed(L)
    noise = torch.rand(N, L // frames, generator=g)
    m = random_masking(N, L, ratio, noise=noise, frames=frames)
    K = num_kept(L, ratio, frames)
    check_invariants(m, N, L, K)
    assert_same(m, masking_reference(noise, L, ratio, frames))
    if frames == 1:
        assert_same(m, ref_masking(noise, ratio))
    check_invariants(random_masking(N, L, ratio, frames=frames), N, L, K)
    check_invariants(_random_masking_seeded(N, L, ratio, seed=5, frames=frames), N, L, K)


def test_mask_ratio_and_sizes_of_other_number_types():
    """numpy scalars and 0-d tensors are numbers (the official model takes them); bools, arrays and strings
    are not."""
    np = pytest.importorskip("numpy")
    noise = torch.rand(3, 20, generator=torch.Generator().manual_seed(1))
    want = random_masking(3, 20, 0.75, noise=noise)
    for ratio in (np.float32(0.75), np.float64(0.75), torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64)):
        assert_same(random_masking(np.int64(3), 20, ratio, noise=noise), want)
    assert random_masking(2, 10, np.int64(0)).ids_keep.shape == (2, 10)
    for bad in (True, torch.tensor([0.5]), np.array([0.5]), "0.5", 0.5j, None):
        with pytest.raises(TypeError, match="mask_ratio must be a real number"):
            random_masking(2, 10, bad)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        random_masking(np.float32(2.0), 10, 0.5)


def test_device_arguments():
    """Devices the engine cannot use are a ValueError naming device; the CPU's index is no difference."""
    m = random_masking(2, 10, 0.5, device=torch.device("cpu", 0), generator=torch.Generator())
    assert m.ids_keep.device == torch.device("cpu")
    m = random_masking(2, 10, 0.5, device="cpu:0", noise=torch.rand(2, 10))
    assert m.mask.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device is cuda but CUDA is not available"):
            random_masking(2, 10, 0.5, device="cuda")
    with pytest.raises(ValueError, match="device must be a CPU or CUDA device"):
        random_masking(2, 10, 0.5, device="foo")
    with pytest.raises(TypeError, match="device must be a torch.device or a str"):
        random_masking(2, 10, 0.5, device=1.5)


def test_large_cpu_sizes_from_the_issue():
    m = random_masking(256, 196, 0.75)
    check_invariants(m, 256, 196, 49)
    m = random_masking(32, 1568, 0.9, frames=8)
    check_invariants(m, 32, 1568, 8 * 19)


# ---------------------------------------------------------------- GPU
GPU_CASES = [(3, 50, 0.75, 1), (256, 196, 0.75, 1), (32, 1568, 0.9, 8), (4, 1568, 0.75, 1), (2, 1, 0.0, 1),
             (3, 5000, 0.5, 1), (2, 16384, 0.75, 1), (2, 20000, 0.75, 2), (1024, 196, 0.75, 1),
             (4, 9, 0.9, 1), (3, 16, 0.9, 4), (0, 50, 0.75, 1)]  # K = 0, K = 0 with tubes, no sample


@pytest.mark.gpu
@pytest.mark.parametrize("N,L,ratio,frames", GPU_CASES)
@pytest.mark.parametrize("smem", [None, "0"])
def test_cpu_equals_cuda_same_seed_offset(N, L, ratio, frames, smem, monkeypatch):
    if smem is not None:  # force the global-memory scratch path
        monkeypatch.setenv("MAE_FAST_MASKING_SMEM_BYTES", smem)
    for seed, offset in [(0, 0), (2**40 + 3, 4 * 12345)]:
        c = _random_masking_seeded(N, L, ratio, seed=seed, offset=offset, frames=frames)
        g = _random_masking_seeded(N, L, ratio, seed=seed, offset=offset, frames=frames, device="cuda")
        check_invariants(g, N, L, c.ids_keep.shape[1], device="cuda")
        assert_same(c, g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,L,ratio,frames", [(3, 50, 0.75, 1), (256, 196, 0.75, 1), (32, 1568, 0.9, 8),
                                              (2, 20000, 0.6, 1)])
def test_noise_parity_cuda(N, L, ratio, frames, dtype):
    noise = torch.rand(N, L // frames, device="cuda").to(dtype)
    got = random_masking(N, L, ratio, frames=frames, noise=noise)
    assert got.ids_keep.device.type == "cuda"
    assert_same(got, masking_reference(noise.cpu(), L, ratio, frames))
    assert_same(got, random_masking(N, L, ratio, frames=frames, noise=noise.cpu()))
    if frames == 1 and dtype in (torch.float32, torch.float64):
        distinct = (noise.double().sort(1).values.diff(dim=1) != 0).all()
        if distinct:
            assert_same(got, ref_masking(noise, ratio))


@pytest.mark.gpu
def test_cuda_random_uses_generator_philox_state():
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.cuda.manual_seed(42)
    off = gen.get_offset()
    a = random_masking(8, 196, 0.75, device="cuda")
    assert gen.get_offset() == off + 4
    assert_same(a, _random_masking_seeded(8, 196, 0.75, seed=42, offset=off))
    b = random_masking(8, 196, 0.75, device="cuda")
    assert not torch.equal(a.ids_keep, b.ids_keep)
    torch.cuda.manual_seed(42)
    assert_same(a, random_masking(8, 196, 0.75, device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(5)
    c = random_masking(8, 196, 0.75, generator=g)
    assert c.mask.device.type == "cuda"
    assert_same(c, _random_masking_seeded(8, 196, 0.75, seed=5, offset=0))
    with pytest.raises(ValueError, match="generator"):
        random_masking(8, 196, 0.75, device="cpu", generator=g)
    with pytest.raises(ValueError, match="noise"):
        random_masking(8, 196, 0.75, device="cuda", noise=torch.rand(8, 196))
    with pytest.raises(ValueError, match="noise"):
        random_masking(2, 4, 0.5, noise=torch.tensor([[0.1, float("nan"), 0.2, 0.3]] * 2, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("noise", [False, True])
def test_one_launch(noise):
    from torch.profiler import ProfilerActivity, profile

    nz = torch.rand(256, 196, device="cuda") if noise else None
    random_masking(256, 196, 0.75, device="cuda", noise=nz)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.ops.mae_fast.masking_from_noise(nz, 49, 1) if noise else \
            torch.ops.mae_fast.random_masking(torch.empty(0, device="cuda"), 256, 196, 49, 1, None)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = [e.name for e in kernels]
    assert len(kernels) == 1, names
    assert "masking_kernel" in names[0]


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.cuda.manual_seed(7)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            random_masking(64, 196, 0.75, device="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = random_masking(64, 196, 0.75, device="cuda")
    outs, offsets = [], []
    for _ in range(3):
        offsets.append(gen.get_offset())
        graph.replay()
        torch.cuda.synchronize()
        outs.append(Masking(*(t.clone() for t in static)))
    assert not torch.equal(outs[0].ids_keep, outs[1].ids_keep), "replays must draw fresh masks"
    assert not torch.equal(outs[1].ids_keep, outs[2].ids_keep)
    seed = gen.initial_seed()
    for out, off in zip(outs, offsets):
        check_invariants(out, 64, 196, 49, device="cuda")
        gen.set_offset(off)
        assert_same(out, random_masking(64, 196, 0.75, device="cuda"))  # eager, same philox state
        assert_same(out, _random_masking_seeded(64, 196, 0.75, seed=seed, offset=off))  # CPU, same state


@pytest.mark.gpu
def test_compile_fullgraph_cuda():
    @torch.compile(fullgraph=True)
    def f(x):
        m = random_masking(x.shape[0], x.shape[1], 0.75, device=x.device)
        return torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2])), m.mask

    x = torch.randn(8, 196, 32, device="cuda")
    y, mask = f(x)
    assert y.shape == (8, 49, 32) and mask.sum().item() == 8 * 147

