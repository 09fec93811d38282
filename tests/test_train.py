"""mae_fast.TrainStep: one training step per call, a CUDA graph replay on CUDA.

CPU tests (the CI path): TrainStep's eager step equals a hand-written loop bit for bit (losses, parameters,
optimizer state) for the fast model, a patched reference and the reference; schedulers and gradient
clipping; bad uses; and the pieces of the CUDA path that run on a CPU (the device lr tensors, the change
detection). The ops run on their plain torch path here (their Triton kernels under the interpreter are
tested in tests/ops and would make each step ~100x slower). Whole file: ~10 s on the 2-core CPU.

GPU tests (marked ``gpu``): replays equal eager steps, new masks at every replay, flat memory, no host
sync per step, schedulers and clipping inside the graph, re-captures.
"""
import contextlib
import importlib
import warnings

import numpy as np

import pytest
import torch
import torch.nn as nn

import mae_fast
from mae_fast import models, ops
from mae_fast import nn as mnn
from mae_fast import reference as R
from mae_fast.train import TrainStep, _count_registrations

CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
           decoder_num_heads=2)
OPT = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)


@pytest.fixture(autouse=True)
def _plain_path():
    with ops.path("torch"), mnn.attn_backend("math"):
        yield


def _model(kind: str, seed: int = 0, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "fast":
        model = models.MaskedAutoencoderViT(norm_pix_loss=True, **CFG)
    else:
        model = R.MaskedAutoencoderViT(norm_layer=R._LN, norm_pix_loss=True, **CFG)
        if kind == "patched":
            mae_fast.patch_model(model)
    return model.to(device)


def _batches(n: int, batch: int = 4, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g).to(device) for _ in range(n)]


def _hand_loss(model, imgs, ratio=0.75):
    if hasattr(model, "forward_train"):
        return model.forward_train(imgs, ratio)
    return model(imgs, ratio)[0]


def _hand_loop(model, opt, batches, amp=None, clip=None, scheduler=None):
    """The loop TrainStep replaces, written out."""
    losses, norms = [], []
    for imgs in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = _hand_loss(model, imgs)
        loss.backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
    return torch.stack(losses), norms


def _assert_same_state(m1, o1, m2, o2):
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert s1.keys() == s2.keys() and s1
    for k in s1:
        for name in s1[k]:
            assert torch.equal(s1[k][name], s2[k][name]), (k, name)


# ---------------------------------------------------------------------------------------------- CPU: eager
@pytest.mark.parametrize("kind,amp", [("fast", None), ("patched", None), ("reference", None), ("fast", "bf16")])
def test_matches_hand_written_loop(kind, amp):
    """20 steps: the same losses, final parameters and optimizer state as the loop, bit for bit (same seed:
    same initial weights and the same masks, which both draw from torch's generator)."""
    batches = _batches(20)
    m1 = _model(kind)
    o1 = torch.optim.AdamW(m1.parameters(), **OPT)
    step = TrainStep(m1, o1, mask_ratio=0.75, amp=amp)  # cuda_graph=True: on a CPU the same step, eagerly
    assert not step.graphed and not step.captured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU path says nothing
        l1 = torch.stack([step(x) for x in batches])
    m2 = _model(kind)
    o2 = torch.optim.AdamW(m2.parameters(), **OPT)
    l2, _ = _hand_loop(m2, o2, batches, amp=amp)
    assert torch.equal(l1, l2)
    assert len(set(l1.tolist())) == 20  # new masks (and weights) at every step
    _assert_same_state(m1, o1, m2, o2)


def test_loss_is_a_new_detached_tensor():
    m = _model("fast")
    step = TrainStep(m, torch.optim.AdamW(m.parameters(), **OPT), amp=None)
    x = _batches(1)[0]
    a, b = step(x), step(x)
    assert a is not b and a.dim() == 0 and not a.requires_grad and a.device == x.device
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)  # this step's gradients
    assert step.grad_norm is None


def test_scheduler_takes_effect():
    """TrainStep steps the scheduler after every optimizer step, as the loop does; the schedule changes the
    result (against a constant lr), and the optimizer ends at the scheduled lr."""
    batches = _batches(8)

    def run(with_scheduler: bool, by_hand: bool):
        m = _model("fast")
        o = torch.optim.AdamW(m.parameters(), **OPT)
        sched = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) if with_scheduler else None
        if by_hand:
            losses = _hand_loop(m, o, batches, scheduler=sched)[0]
        else:
            step = TrainStep(m, o, amp=None, scheduler=sched)
            losses = torch.stack([step(x) for x in batches])
        return m, o, losses

    m1, o1, l1 = run(True, by_hand=False)
    m2, o2, l2 = run(True, by_hand=True)
    m3, o3, l3 = run(False, by_hand=False)
    assert torch.equal(l1, l2)
    _assert_same_state(m1, o1, m2, o2)
    assert o1.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.3 ** 4)
    assert torch.equal(l1[:3], l3[:3]) and not torch.equal(l1[3:], l3[3:])  # lr differs from the 3rd step on


def test_grad_clip_matches_torch():
    """grad_clip clips as torch.nn.utils.clip_grad_norm_ over the model's parameters; grad_norm is its
    return value (the norm before clipping). With a small max norm every step clips."""
    batches = _batches(6)
    m1 = _model("fast")
    o1 = torch.optim.AdamW(m1.parameters(), **OPT)
    step = TrainStep(m1, o1, amp=None, grad_clip=0.05)
    l1, n1 = [], []
    for x in batches:
        l1.append(step(x))
        n1.append(step.grad_norm)
    m2 = _model("fast")
    o2 = torch.optim.AdamW(m2.parameters(), **OPT)
    l2, n2 = _hand_loop(m2, o2, batches, clip=0.05)
    assert torch.equal(torch.stack(l1), l2) and torch.equal(torch.stack(n1), torch.stack(n2))
    _assert_same_state(m1, o1, m2, o2)
    assert min(n2) > 0.05  # it did clip
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m1.parameters() if p.grad is not None]))
    assert float(total) == pytest.approx(0.05, rel=1e-4)  # the last step's gradients, clipped
    m3 = _model("fast")
    o3 = torch.optim.AdamW(m3.parameters(), **OPT)
    l3, _ = _hand_loop(m3, o3, batches)
    assert torch.equal(l2[0], l3[0]) and not torch.equal(l2[1:], l3[1:])


def test_ddp_eager():
    """A DDP model (one gloo process) runs eagerly through DDP's forward, as the loop does; with the graph
    requested on CUDA it is an error (checked here directly: the check needs no GPU)."""
    import torch.distributed as dist

    class Loss(nn.Module):  # what DDP's forward runs: forward_train
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, imgs, ratio):
            return self.m.forward_train(imgs, ratio)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        batches = _batches(3)
        d1 = nn.parallel.DistributedDataParallel(Loss(_model("fast")))
        o1 = torch.optim.AdamW(d1.parameters(), **OPT)
        step = TrainStep(d1, o1, amp=None)
        l1 = torch.stack([step(x) for x in batches])
        d2 = nn.parallel.DistributedDataParallel(Loss(_model("fast")))
        o2 = torch.optim.AdamW(d2.parameters(), **OPT)
        l2 = []
        for x in batches:
            o2.zero_grad(set_to_none=True)
            loss = d2(x, 0.75)
            loss.backward()
            o2.step()
            l2.append(loss.detach())
        assert torch.equal(l1, torch.stack(l2))
        _assert_same_state(d1, o1, d2, o2)
        with pytest.raises(ValueError, match="DistributedDataParallel.*cuda_graph=False"):
            step._check_capturable()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- CPU: bad uses
class _ReturnsPred(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, imgs, ratio):
        return imgs * self.w[:, None, None]


def _bad(**kw):
    real = _model("fast")
    model = kw.pop("model", real)
    opt = kw.pop("optimizer", None) or torch.optim.AdamW(real.parameters(), **OPT)
    return TrainStep(model, opt, **kw)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(model=object()), TypeError, "model must be a torch.nn.Module"),
    (dict(optimizer=object()), TypeError, "optimizer must be a torch.optim.Optimizer"),
    (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)), ValueError, "none of the model's"),
    (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=True), TypeError, "mask_ratio"),
    (dict(amp="fp16"), ValueError, "GradScaler"),
    (dict(amp="int8"), ValueError, "amp must be"),
    (dict(cuda_graph="yes"), TypeError, "cuda_graph"),
    (dict(grad_clip=0), ValueError, "grad_clip"),
    (dict(grad_clip=float("inf")), ValueError, "grad_clip"),
    (dict(scheduler=object()), TypeError, "step"),
    (dict(warmup=0), ValueError, "warmup"),
])
def test_bad_arguments(kw, err, msg):
    with pytest.raises(err, match=msg):
        _bad(**kw)


def test_bad_schedulers():
    m = _model("fast")
    o = torch.optim.AdamW(m.parameters(), **OPT)
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        TrainStep(m, o, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    other = torch.optim.AdamW(m.parameters(), **OPT)
    with pytest.raises(ValueError, match="another optimizer"):
        TrainStep(m, o, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_bad_calls():
    step = _bad(amp=None)
    with pytest.raises(TypeError, match="imgs must be a torch.Tensor"):
        step([1, 2])
    with pytest.raises(ValueError, match="floating-point"):
        step(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    m = _ReturnsPred()
    with pytest.raises(TypeError, match=r"must return the loss .* tensor of shape \[2, 3, 4, 4\]"):
        TrainStep(m, torch.optim.AdamW(m.parameters()), amp=None)(torch.ones(2, 3, 4, 4))
    frozen = _model("fast")
    frozen.requires_grad_(False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        TrainStep(frozen, torch.optim.AdamW(frozen.parameters()), amp=None)(_batches(1)[0])


def test_non_capturable_optimizer_is_an_error():
    """The graph needs a capturable optimizer (the check runs on CUDA; called directly here)."""
    m = _model("fast")
    step = TrainStep(m, torch.optim.AdamW(m.parameters(), fused=True), amp=None)
    with pytest.raises(ValueError, match="not capturable.*fused=True, capturable=True.*cuda_graph=False"):
        step._check_capturable()
    TrainStep(m, torch.optim.AdamW(m.parameters(), capturable=True), amp=None)._check_capturable()  # accepted


# ---------------------------------------------------------------------------------------------- CPU: CUDA pieces
def test_lr_tensor_follows_scheduler_and_assignment():
    """On CUDA each Adam group's lr becomes a device tensor the graph reads: a torch scheduler fills it in
    place, a plain ``group["lr"] = value`` is copied into it before the next replay."""
    m = _model("fast")
    o = torch.optim.AdamW([{"params": list(m.blocks.parameters())}, {"params": list(m.decoder_blocks.parameters()),
                                                                        "lr": 5e-4}], lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    step = TrainStep(m, o, amp=None)
    step._lrs = step._install_lr_tensors()
    t0, t1 = step._lrs
    assert o.param_groups[0]["lr"] is t0 and t0.dim() == 0 and t0.dtype == torch.float32  # what fused AdamW reads
    assert float(t0) == pytest.approx(1e-3) and float(t1) == pytest.approx(5e-4)
    o.step()
    sched.step()
    step._sync_lr()
    assert o.param_groups[0]["lr"] is t0 and float(t0) == pytest.approx(5e-4) and float(t1) == pytest.approx(2.5e-4)
    o.param_groups[1]["lr"] = 1e-5  # the official MAE's per-iteration schedule assigns floats
    step._sync_lr()
    assert o.param_groups[1]["lr"] is t1 and float(t1) == pytest.approx(1e-5)
    assert step._install_lr_tensors() == [t0, t1]  # kept at a re-capture
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)  # no tensor lr there: the value is fingerprinted instead
    assert TrainStep(m, sgd, amp=None)._install_lr_tensors() == [None] and sgd.param_groups[0]["lr"] == 0.1


def test_change_detection():
    """What a captured graph has baked in is compared before every replay; each change is named, undoing
    it makes the graph valid again, and registrations elsewhere in the process are not a change."""
    _count_registrations()
    m = _model("fast")
    o = torch.optim.AdamW(m.parameters(), **OPT)
    step = TrainStep(m, o, amp=None)
    key = ((4, 3, 32, 32), torch.float32)
    step._key = key
    step._remember_capture()
    assert step._what_changed(key) == []
    assert "batch" in step._what_changed(((2, 3, 32, 32), torch.float32))[0]
    nn.Linear(2, 2)  # registrations elsewhere: one walk of the module tree, then none
    assert step._what_changed(key) == [] and step._registrations == mae_fast.train._REGISTRATIONS[0]

    def changed_by(change, undo=None):
        change()
        out = step._what_changed(key)
        if undo is not None:
            undo()
            assert step._what_changed(key) == []
        return out

    w = m.blocks[0].norm1.weight
    assert changed_by(lambda: w.requires_grad_(False), lambda: w.requires_grad_(True)) == ["requires_grad"]
    assert changed_by(m.eval, m.train) == ["train/eval mode"]
    assert changed_by(lambda: mnn.set_attn_backend("flash"), lambda: mnn.set_attn_backend("math")) == \
        ["attention backend"]
    assert changed_by(lambda: o.param_groups[0].update(weight_decay=0.1),
                      lambda: o.param_groups[0].update(weight_decay=0.05)) == ["optimizer hyperparameters"]
    old = w.data
    assert changed_by(lambda: setattr(w, "data", old.clone()), lambda: setattr(w, "data", old)) == \
        ["parameter or buffer storage (.data) replaced"]
    assert changed_by(lambda: setattr(m.blocks[0].norm1, "weight", nn.Parameter(old.clone())),
                      lambda: setattr(m.blocks[0].norm1, "weight", w)) == ["modules, parameters or buffers assigned"]
    settings = ["TrainStep settings (mask_ratio, amp, grad_clip, accum_iter)"]
    assert changed_by(lambda: setattr(step, "mask_ratio", 0.5), lambda: setattr(step, "mask_ratio", 0.75)) == settings
    assert changed_by(lambda: setattr(step, "accum_iter", 2), lambda: setattr(step, "accum_iter", 1)) == settings
    assert changed_by(lambda: o.load_state_dict(o.state_dict())) == \
        ["optimizer param groups", "optimizer state (load_state_dict)"]


class _FakeCuda:
    """CPU stand-ins for torch.cuda's streams and graphs: the capture runs the step once for real, a replay
    only counts. Enough to run TrainStep's graph path (warm-up, capture, replays, re-captures) on a CPU;
    what a real replay computes is checked by the gpu tests."""

    class Stream:
        def __init__(self, device=None):
            self.waits = 0

        def wait_stream(self, other):
            self.waits += 1

    class CUDAGraph:
        replays = 0

        def replay(self):
            type(self).replays += 1

    def __init__(self, monkeypatch):
        self.side = None
        main = self.Stream()
        monkeypatch.setattr(torch.cuda, "Stream", self._stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", self._graph)
        monkeypatch.setattr(importlib.import_module("torch.optim.adam"), "_get_capturable_supported_devices",
                            lambda *a, **k: ["cpu"])  # capturable AdamW on CPU tensors (CUDA-only otherwise)
        self.captures = []
        self.CUDAGraph.replays = 0

    def _stream(self, device=None):
        self.side = self.Stream(device)
        return self.side

    @contextlib.contextmanager
    def _graph(self, graph, stream=None, capture_error_mode="global"):
        assert stream is self.side  # captured on the warm-up stream
        # other threads (a pinned DataLoader's) may call CUDA while the step is captured: only thread-local
        # capture allows it
        assert capture_error_mode == "thread_local"
        self.captures.append(graph)
        yield


def test_graph_path_control_flow_on_fakes(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    m = _model("fast")
    o = torch.optim.AdamW(m.parameters(), capturable=True, **OPT)
    step = TrainStep(m, o, amp=None, warmup=2)
    step.graphed = True  # what a CUDA model gets
    step._init_graph()
    assert torch.is_tensor(o.param_groups[0]["lr"])
    x = _batches(1)[0]
    l1, l2 = step(x), step(x)  # the warm-up steps, on the side stream
    assert not step.captured and fake.side.waits == 2 and fake.captures == []
    l3 = step(x)  # captured (the step runs once here, for real) and replayed
    assert step.captured and step.captures == 1 and len(fake.captures) == 1 and fake.CUDAGraph.replays == 1
    grads = {p: p.grad for p in m.parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    o.zero_grad()  # between replays: the static gradients come back after the next replay
    l4 = step(x)
    assert fake.CUDAGraph.replays == 2 and torch.equal(l4, l3) and l4 is not l3  # a copy of the static loss
    assert all(p.grad is g for p, g in grads.items())
    m2 = _model("fast")  # the same three steps by hand (the capture ran the third)
    o2 = torch.optim.AdamW(m2.parameters(), **OPT)
    torch.testing.assert_close(torch.stack([l1, l2, l3]), _hand_loop(m2, o2, [x] * 3)[0], rtol=1e-5, atol=1e-6)
    m.eval()  # a change: warned once, this call eager, the next one captures again
    with pytest.warns(UserWarning, match=r"re-capturing the CUDA graph \(train/eval mode\)"):
        step(x)
    assert not step.captured and step.captures == 1
    step(x)
    assert step.captured and step.captures == 2 and fake.CUDAGraph.replays == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        step(x[:2])
        assert not step.captured
        step(x[:2])
    assert step.captured and step.captures == 3
    step.reset()
    step(x[:2])
    assert not step.captured and step.captures == 3


# ------------------------------------------------------------------------------------- CPU: noise, accumulation
def _noises(n: int, batch: int = 4, L: int = 16, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, L, generator=g) for _ in range(n)]


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_noise_makes_the_masks(kind):
    """With noise, the step passes it to the model (the masks come from it, not from torch's generator):
    the losses and weights equal a loop calling the model with that noise, whatever the global seed."""
    batches, noises = _batches(4), _noises(4)
    m1 = _model(kind)
    o1 = torch.optim.AdamW(m1.parameters(), **OPT)
    step = TrainStep(m1, o1, amp=None)
    torch.manual_seed(11)
    l1 = torch.stack([step(x, z) for x, z in zip(batches, noises)])
    m2 = _model(kind)
    o2 = torch.optim.AdamW(m2.parameters(), **OPT)
    torch.manual_seed(12)  # another global seed: no effect with noise given
    l2 = []
    for x, z in zip(batches, noises):
        o2.zero_grad(set_to_none=True)
        loss = m2.forward_train(x, 0.75, z) if kind == "fast" else m2(x, 0.75, z)[0]
        loss.backward()
        o2.step()
        l2.append(loss.detach())
    assert torch.equal(l1, torch.stack(l2))
    _assert_same_state(m1, o1, m2, o2)


def test_accumulation_equals_the_large_batch():
    """accum_iter=2 on batches of 8: bit for bit the hand-written accumulation (each half's loss / 2, one
    optimizer step), and the large-batch step to fp32 rounding (the same mean loss and gradients)."""
    batches, noises = _batches(3, batch=8), _noises(3, batch=8)
    runs = []
    for accum in (2, 1):
        m = _model("fast")
        o = torch.optim.AdamW(m.parameters(), **OPT)
        step = TrainStep(m, o, amp=None, accum_iter=accum)
        losses = [step(batches[0], noises[0])]
        grads = [p.grad.clone() for p in m.parameters() if p.requires_grad]  # the first step's, same weights
        losses += [step(x, z) for x, z in zip(batches[1:], noises[1:])]
        runs.append((torch.stack(losses), grads, m, o))
    (la, ga, ma, oa), (lb, gb, _, _) = runs
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    m = _model("fast")
    o = torch.optim.AdamW(m.parameters(), **OPT)
    hand = []
    for x, z in zip(batches, noises):
        o.zero_grad(set_to_none=True)
        parts = [m.forward_train(x[k:k + 4], 0.75, z[k:k + 4]) for k in (0, 4)]
        for part in parts:
            (part / 2).backward()
        o.step()
        hand.append(torch.stack([p.detach() for p in parts]).mean())
    assert torch.equal(la, torch.stack(hand))
    _assert_same_state(ma, oa, m, o)


def test_accumulation_under_ddp_and_bad_calls():
    """Under DDP (one gloo process) the accumulated step equals the plain one (no_sync on the first
    micro-batches); noise and accum_iter are checked."""
    import torch.distributed as dist

    from mae_fast.train import TrainLoss

    batches, noises = _batches(2, batch=8), _noises(2, batch=8)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        d = nn.parallel.DistributedDataParallel(TrainLoss(_model("fast")))
        o1 = torch.optim.AdamW(d.parameters(), **OPT)
        step = TrainStep(d, o1, amp=None, accum_iter=2)
        l1 = torch.stack([step(x, z) for x, z in zip(batches, noises)])
    finally:
        dist.destroy_process_group()
    m = _model("fast")
    o2 = torch.optim.AdamW(m.parameters(), **OPT)
    plain = TrainStep(m, o2, amp=None, accum_iter=2)
    assert torch.equal(l1, torch.stack([plain(x, z) for x, z in zip(batches, noises)]))
    _assert_same_state(d.module.mae, o1, m, o2)
    with pytest.raises(ValueError, match="accum_iter must be >= 1"):
        TrainStep(m, o2, accum_iter=0)
    with pytest.raises(ValueError, match=r"imgs: a batch of shape \[6, 3, 32, 32\] does not split into accum_iter=4"):
        TrainStep(m, o2, amp=None, accum_iter=4)(_batches(1, batch=6)[0])
    with pytest.raises(TypeError, match="noise must be a torch.Tensor or None"):
        plain(batches[0], [0.5] * 8)
    with pytest.raises(ValueError, match=r"noise must have one row per image of imgs \[8, 3, 32, 32\]"):
        plain(batches[0], noises[0][:4])


def test_graph_path_with_noise_and_accumulation_on_fakes(monkeypatch):
    """The graph path keeps a static noise buffer beside the images' and captures the K micro-batches as
    one step; a call without noise (or with another shape) is another input key: re-captured."""
    fake = _FakeCuda(monkeypatch)
    m = _model("fast")
    o = torch.optim.AdamW(m.parameters(), capturable=True, **OPT)
    step = TrainStep(m, o, amp=None, warmup=1, accum_iter=2)
    step.graphed = True
    step._init_graph()
    x, z = _batches(1, batch=8)[0], _noises(1, batch=8)[0]
    l1, l2 = step(x, z), step(x, z)  # warm-up, then capture (the step runs once) and replay
    assert step.captured and step.captures == 1 and fake.CUDAGraph.replays == 1
    assert torch.equal(step._static_noise, z)
    z2 = _noises(1, batch=8, seed=5)[0]
    step(x, z2)  # a replay: the new noise is in the buffer the graph reads
    assert fake.CUDAGraph.replays == 2 and torch.equal(step._static_noise, z2) and step.captures == 1
    m2 = _model("fast")
    o2 = torch.optim.AdamW(m2.parameters(), **OPT)
    hand = TrainStep(m2, o2, amp=None, accum_iter=2)
    torch.testing.assert_close(torch.stack([l1, l2]), torch.stack([hand(x, z), hand(x, z)]), rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="the noise's after them"):
        step(x)  # no noise now: another key, an eager step, then a capture
    assert not step.captured and step._static_noise is None
    step(x)
    assert step.captured and step.captures == 2


# ---------------------------------------------------------------------------------------------- GPU
def _cuda_pair(kind="fast", amp=None, **kw):
    """(graphed TrainStep, eager TrainStep) on identical models and capturable fused AdamW optimizers."""
    steps, opt = [], {**OPT, **kw.pop("opt", {})}
    for graph in (True, False):
        m = _model(kind, device="cuda")
        o = torch.optim.AdamW(m.parameters(), fused=True, capturable=True, **opt)
        steps.append(TrainStep(m, o, amp=amp, cuda_graph=graph, warmup=2, **kw))
    return steps


def _run(step, batches, seed=123):
    torch.manual_seed(seed)  # the masks: the same CUDA generator state for both runs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True")
        return torch.stack([step(x) for x in batches])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fast", "patched", "reference"])
def test_gpu_replays_equal_eager(kind, monkeypatch):
    """fp32 with deterministic kernels (math attention, deterministic cuDNN for the reference's conv): the
    replayed steps equal eager steps from the same seed, loss by loss, and the weights did train."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    with ops.path("auto"), sdpa_kernel([SDPBackend.MATH]):
        graphed, eager = _cuda_pair(kind)
        start = [p.detach().clone() for p in graphed.model.parameters()]
        batches = _batches(12, device="cuda")
        lg, le = _run(graphed, batches), _run(eager, batches)
    assert graphed.graphed and graphed.captured and graphed.captures == 1 and not eager.graphed
    torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
    for a, b, s in zip(graphed.model.parameters(), eager.model.parameters(), start):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max(float((a - s).abs().max()) for a, s in zip(graphed.model.parameters(), start)) > 1e-3
    assert all(p.grad is not None for p in graphed.model.parameters() if p.requires_grad)  # the static grads


@pytest.mark.gpu
def test_gpu_bf16_autotuned_replays_close_to_eager():
    """bf16 autocast, the Triton kernels and attn_backend="auto" (measured in the warm-up, before the
    capture): replays stay close to eager steps (the backends chosen may use atomics: not bitwise)."""
    with ops.path("auto"), mnn.attn_backend("auto"):
        mnn.clear_attn_autotune()
        graphed, eager = _cuda_pair("fast", "bf16")
        batches = _batches(12, device="cuda")
        lg = _run(graphed, batches)
        assert mnn.attn_autotune_results()  # measured in the warm-up steps: the capture never measures
        le = _run(eager, batches)
    assert graphed.captures == 1
    torch.testing.assert_close(lg, le, rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
def test_gpu_new_masks_at_every_replay():
    """lr 0 and one fixed batch: only the masks change the loss. Every replay gives a new loss, the same
    sequence as eager steps from the same seed (the same masks)."""
    with ops.path("auto"):
        graphed, eager = _cuda_pair(opt=dict(lr=0.0, weight_decay=0.0))
        batches = _batches(1, device="cuda") * 10
        lg, le = _run(graphed, batches), _run(eager, batches)
    assert len(set(lg.tolist())) == 10
    torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)


def _side_table_entries() -> int:
    """Entries in torch's table of Triton kernels seen by its traceable wrapper (an eager launch adds none)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table as table

    return len(table.id_to_kernel) + len(table.constant_args)


@pytest.mark.gpu
def test_gpu_memory_flat_and_no_sync():
    """100 replays allocate nothing that stays, make no host sync, and (like eager steps after the first) keep
    nothing in torch's kernel side table."""
    with ops.path("auto"):
        step, eager = _cuda_pair(amp="bf16", grad_clip=1.0)
        x = _batches(1, device="cuda")[0]
        _run(eager, [x] * 2)  # Triton compiles, auto measures
        entries = _side_table_entries()
        _run(eager, [x] * 10)
        assert _side_table_entries() == entries, "eager steps left entries in torch's kernel side table"
        _run(step, [x] * 4)  # 2 warm-up steps, the capture, a replay
        loss = step(x)
        torch.cuda.synchronize()
        entries = _side_table_entries()
        before, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(100):
                loss = step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.isfinite(loss)
        assert torch.cuda.memory_allocated() == before and torch.cuda.max_memory_allocated() == peak
        assert _side_table_entries() == entries


@pytest.mark.gpu
def test_gpu_scheduler_and_clipping_in_the_graph():
    """A LambdaLR stepped by TrainStep, a float lr assigned by the loop, and clipping, all inside the graph."""
    with ops.path("auto"):
        steps = _cuda_pair(grad_clip=0.05)
        for s in steps:
            s.scheduler = torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda i: 1.0 / (1 + i))
        batches = _batches(10, device="cuda")
        out = []
        for s in steps:
            torch.manual_seed(5)
            losses, norms = [], []
            for i, x in enumerate(batches):
                if i == 7:
                    s.optimizer.param_groups[0]["lr"] = 2e-4
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*capturable=True")
                    losses.append(s(x))
                norms.append(s.grad_norm)
            out.append((torch.stack(losses), torch.stack(norms)))
    (lg, ng), (le, ne) = out
    assert steps[0].captures == 1  # neither the schedule nor the assignment re-captured
    torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ng, ne, rtol=1e-5, atol=1e-6)
    assert float(ne.min()) > 0.05
    for a, b in zip(steps[0].model.parameters(), steps[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_recaptures():
    """A new batch size, requires_grad toggled, train/eval mode: re-captured (one warning), same results as
    eager steps."""
    with ops.path("auto"):
        graphed, eager = _cuda_pair()
        sizes = [4] * 4 + [2] * 3 + [4] * 3
        batches = [b[:n] for b, n in zip(_batches(len(sizes), device="cuda"), sizes)]
        with pytest.warns(UserWarning, match="re-capturing the CUDA graph .*batch"):
            lg = _run(graphed, batches)
        le = _run(eager, batches)
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
        assert graphed.captures == 3  # 4, then 2, then 4 again
        for s in (graphed, eager):
            s.model.decoder_pred.weight.requires_grad_(False)
        more = _batches(3, device="cuda", seed=9)
        lg, le = _run(graphed, more, seed=7), _run(eager, more, seed=7)
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
        assert graphed.captures == 4
        assert graphed.model.decoder_pred.weight.grad is None


@pytest.mark.gpu
def test_gpu_replays_with_noise_and_accumulation_equal_eager():
    """Mask noise as a static input and two micro-batches in one graph: the replays equal eager steps, and
    the masks follow the noise (not the CUDA generator: another seed gives the same losses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with ops.path("auto"), sdpa_kernel([SDPBackend.MATH]):
        graphed, eager = _cuda_pair(accum_iter=2)
        batches = _batches(8, batch=8, device="cuda")
        noises = [z.cuda() for z in _noises(8, batch=8)]
        out = []
        for s, seed in ((graphed, 1), (eager, 2)):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True")
                out.append(torch.stack([s(x, z) for x, z in zip(batches, noises)]))
    assert graphed.captured and graphed.captures == 1
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ number arguments
@pytest.mark.parametrize("value", [0.75, np.float32(0.75), np.float64(0.75), torch.tensor(0.75)],
                         ids=lambda v: type(v).__name__)
def test_train_step_takes_the_model_s_mask_ratio_forms(value):
    model = models.mae_vit_tiny_patch8(img_size=16)
    model(torch.rand(2, 3, 16, 16), value)  # the model takes it
    step = TrainStep(model, torch.optim.AdamW(model.parameters()), value, amp=None)
    assert step.mask_ratio == 0.75 and type(step.mask_ratio) is float
    step(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(mask_ratio=1.0), ValueError, r"mask_ratio must be in \[0, 1\)"),
    (dict(mask_ratio="0.75"), TypeError, "mask_ratio must be a real number"),
    (dict(grad_clip=np.float32(1.0)), None, None),
    (dict(grad_clip=torch.tensor(1.0)), None, None),
    (dict(grad_clip=0.0), ValueError, "grad_clip must be > 0"),
    (dict(grad_clip="1"), TypeError, "grad_clip must be a real number"),
    (dict(warmup=np.int64(2)), None, None),
    (dict(warmup=0), ValueError, "warmup must be >= 1"),
    (dict(warmup=1.5), TypeError, "warmup must be an int"),
])
def test_train_step_numbers(kwargs, err, msg):
    model = models.mae_vit_tiny_patch8(img_size=16)
    opt = torch.optim.AdamW(model.parameters())
    if err is None:
        TrainStep(model, opt, amp=None, **kwargs)
    else:
        with pytest.raises(err, match=msg):
            TrainStep(model, opt, amp=None, **kwargs)
