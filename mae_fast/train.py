"""TrainStep: one MAE training step (forward, backward, optimizer step) in one call; on CUDA, one CUDA graph.

An MAE step has static shapes: the masking keeps exactly K tokens of every sample, so forward, backward
and optimizer step run the same kernels on tensors of the same shapes at every step. :class:`TrainStep`
captures that step once as a CUDA graph and replays it::

    step = mae_fast.TrainStep(model, optimizer, mask_ratio=0.75, amp="bf16")
    for imgs in loader:
        loss = step(imgs)      # a 0-dim device tensor; no host sync
    loss = step(imgs, noise)   # or with each sample's mask noise [N, L] (the official noise semantics)

How a call runs on CUDA with ``cuda_graph=True``:

1. The batch (and the mask noise, when given) is copied into a static input buffer (one per batch shape).
2. The first ``warmup`` calls are ordinary eager steps on a side stream: they initialise the optimizer
   state, compile the Triton kernels and let ``attn_backend="auto"`` measure its shapes, none of which may
   happen while a graph captures. They are real training steps.
3. The next call captures forward + backward + (gradient clipping) + optimizer step, with gradients set
   to None first, so that backward allocates them inside the graph: they are static buffers, written
   (not accumulated) by every replay. It then replays the graph once; every later call only replays it.
   The capture is thread-local: other threads may use CUDA meanwhile (a DataLoader's pin-memory thread).
4. The masking engine and torch's random ops take their Philox seed and offset from the CUDA generator,
   which advances them at every replay exactly as an eager step would: each replay draws new masks, the
   same ones an eager loop draws with the same seed.
5. The optimizer must be capturable (``torch.optim.AdamW(params, fused=True, capturable=True)``). For
   Adam and AdamW each param group's ``lr`` becomes a 0-dim device tensor, which the graph reads at every
   replay: a scheduler (which fills that tensor in place) or a plain ``group["lr"] = value`` takes effect
   at the next call without a re-capture.

Before every replay the call checks what the graph has baked in: the batch shape and dtype, the model's
parameters and buffers (which ones each module holds, their storage, requires_grad), every module's
train/eval mode, the optimizer's param groups, state dict object and hyperparameters (other than a
tensor lr), the global attention backend, and the step's own mask_ratio, amp and grad_clip. When one of
them changed, the graph is dropped and the step re-captured after one eager step (a warning says so the
first time, with what changed). A batch of another size re-captures too: use ``drop_last=True`` to keep
every step a replay. Not seen: changes that bypass nn.Module's attribute assignment (``del
module.weight``, writing ``module._parameters``) and global torch settings; call
:meth:`TrainStep.reset` after those.

Elsewhere (CPU, or ``cuda_graph=False``) the same call runs the same step eagerly: the results equal a
hand-written loop's (``zero_grad(set_to_none=True)``, forward, backward, clip, ``optimizer.step()``,
``scheduler.step()``) bit for bit.

Gradient accumulation (``accum_iter=K``): a call takes K micro-batches as one batch, ``imgs`` [K * n, ...]
(and ``noise`` [K * n, ...]), and runs forward and backward on each n-sample piece in order, with its loss
divided by K, before the one optimizer step: the gradients of the mean loss over the K * n samples, with
the activation memory of n. Every call still starts from no gradients. Under DistributedDataParallel
the first K - 1 backwards run under ``no_sync()``: only the last one all-reduces.

Not supported with the graph: a DistributedDataParallel or DataParallel model (an error: use
``cuda_graph=False``; see :meth:`TrainStep._check_capturable` for why), an optimizer without
``capturable=True`` (an error). Not supported at all: fp16 autocast (it needs a GradScaler: an error on
every device; use bf16).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from .nn import get_attn_backend
from .ops._checks import check_int, check_number, check_ratio

__all__ = ["TrainLoss", "TrainStep"]

_AMP = {"bf16": torch.bfloat16, "fp32": None, None: None}
_REGISTRATIONS = [0]  # parameters, buffers and submodules assigned anywhere in the process (see _count)
_COUNTING = [False]


def _count(module, name, value):
    _REGISTRATIONS[0] += 1  # returns None: the registration itself is unchanged


def _count_registrations() -> None:
    """Count nn.Module registrations (torch's global registration hooks, added once per process), so
    that a replay walks the module tree only when something was assigned since the last walk."""
    if not _COUNTING[0]:
        from torch.nn.modules import module as m

        m.register_module_parameter_registration_hook(_count)
        m.register_module_buffer_registration_hook(_count)
        m.register_module_module_registration_hook(_count)
        _COUNTING[0] = True


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class TrainLoss(nn.Module):
    """The module to wrap in DistributedDataParallel for :class:`TrainStep`: its forward is the MAE's
    ``forward_train`` (the loss alone, the decoder head on the removed tokens only), where DDP around the
    MAE itself would run the official ``forward`` (the head on every token; the same loss, more work)::

        ddp = DistributedDataParallel(TrainLoss(model), device_ids=[device.index])
        step = TrainStep(ddp, optimizer, cuda_graph=False)

    A model without ``forward_train`` is called through its ``forward`` (its first output is the loss)."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        fn = getattr(self.mae, "forward_train", None)
        if not callable(fn):
            fn = self.mae
        return fn(imgs, mask_ratio) if noise is None else fn(imgs, mask_ratio, noise)


def _train_forward(model: nn.Module) -> Callable:
    """The function a step differentiates: ``forward_train(imgs, mask_ratio)`` (the loss only) when the
    model has one, else ``model(imgs, mask_ratio)``. A DDP or torch.compile wrapper is always called
    through its forward (its attribute access would reach the unwrapped model's methods)."""
    wrapped = _is_ddp(model) or hasattr(model, "_orig_mod")
    if not wrapped and callable(getattr(model, "forward_train", None)):
        return model.forward_train
    return model


def _loss_of(out) -> torch.Tensor:
    loss = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        what = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {list(loss.shape)}"
        raise TypeError(f"TrainStep: the model must return the loss (a 0-dim float tensor) or (loss, ...) from "
                        f"forward_train(imgs, mask_ratio) or forward(imgs, mask_ratio); got {what}")
    if loss.grad_fn is None:
        raise RuntimeError("TrainStep: the loss does not require grad (no trainable parameter reached it, or "
                           "the model ran under torch.no_grad)")
    return loss


def _freeze(value):
    """A comparable snapshot of a hyperparameter: tensors by identity (filled in place, they stay the
    same graph input), containers element by element, anything else by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@contextlib.contextmanager
def _quiet_uncaptured_step():
    """torch warns when a capturable optimizer steps outside a capture; warm-up steps do that on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*without .*graph capture")
        yield


class TrainStep:
    """One MAE training step per call: forward, backward, optional gradient clipping, optimizer step,
    optional scheduler step. On CUDA (``cuda_graph=True``) the whole step is one CUDA graph replay.

    Args:
        model: an MAE with the official interface: ``forward_train(imgs, mask_ratio) -> loss`` (the fast
            model, a model after :func:`mae_fast.patch_model`) or ``forward(imgs, mask_ratio) -> (loss, ...)``
            (the reference, the official code). All its parameters on one device.
        optimizer: a ``torch.optim.Optimizer`` over (some of) the model's parameters. With the graph it
            must be capturable: ``torch.optim.AdamW(params, fused=True, capturable=True)``.
        mask_ratio: the fraction of tokens removed, in [0, 1).
        amp: ``"bf16"`` (torch.autocast to bfloat16, on CPU too) or None / ``"fp32"`` (no autocast).
        cuda_graph: capture and replay on CUDA (ignored elsewhere: CPU steps are eager).
        grad_clip: clip the gradients' total L2 norm to this value (``torch.nn.utils.clip_grad_norm_``
            over the model's parameters, inside the graph, without a host sync); None: no clipping.
        scheduler: stepped once after every optimizer step (a per-iteration schedule), e.g. a
            ``torch.optim.lr_scheduler.LambdaLR``. Step a per-epoch scheduler yourself and leave this None.
        warmup: eager steps before the first capture (each a real training step; at least 1).
        accum_iter: micro-batches per optimizer step (gradient accumulation; see the module docstring).

    A call takes a batch ``imgs`` (on any device; copied to the model's) and, optionally, each sample's
    mask noise ``noise`` [N, L] ([N, L / frames] for tube masking; passed to the model as its third
    argument, ``forward_train(imgs, mask_ratio, noise)``), and returns the loss as a new 0-dim tensor on
    the model's device, detached: with ``accum_iter`` > 1 the mean of the micro-batches' losses. Under
    DistributedDataParallel it is this process's loss (its samples' mean), not averaged over the
    processes. After a call ``p.grad`` holds that step's gradients and :attr:`grad_norm` (with
    ``grad_clip``) their total norm before clipping.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mask_ratio: float = 0.75,
                 amp: Optional[str] = "bf16", cuda_graph: bool = True, grad_clip: Optional[float] = None,
                 scheduler=None, *, warmup: int = 3, accum_iter: int = 1):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        mask_ratio = check_ratio("mask_ratio", mask_ratio)  # a float, numpy scalar or 0-d tensor, as the model
        if amp == "fp16":
            raise ValueError("amp='fp16' needs loss scaling (a GradScaler), which TrainStep does not do; use "
                             "amp='bf16' (same speed on recent GPUs, no scaling needed) or amp=None")
        if amp not in _AMP:
            raise ValueError(f"amp must be 'bf16', 'fp32' or None, got {amp!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if grad_clip is not None:
            grad_clip = check_number("grad_clip", grad_clip)
            if not (0 < grad_clip < math.inf):
                raise ValueError(f"grad_clip must be > 0 and finite (or None), got {grad_clip}")
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError("scheduler: ReduceLROnPlateau steps on a metric; call its step(metric) yourself "
                                 "and leave scheduler=None")
            if not callable(getattr(scheduler, "step", None)):
                raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
            if getattr(scheduler, "optimizer", optimizer) is not optimizer:
                raise ValueError("scheduler belongs to another optimizer than the one given")
        warmup = check_int("warmup", warmup, 1)
        accum_iter = check_int("accum_iter", accum_iter, 1)

        params = list(model.parameters())
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError("model must have its parameters on exactly one device, got "
                             f"{sorted(map(str, devices)) or 'no parameters'}")
        owned = {id(p) for p in params}
        if not any(id(p) in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer holds none of the model's parameters")

        self.model = model
        self.optimizer = optimizer
        self.mask_ratio = float(mask_ratio)
        self.amp = None if amp == "fp32" else amp
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.scheduler = scheduler
        self.warmup = warmup
        self.accum_iter = accum_iter
        self.device = devices.pop()
        self.cuda_graph = cuda_graph
        #: True when calls are CUDA graph replays (a CUDA model and cuda_graph=True)
        self.graphed = cuda_graph and self.device.type == "cuda"
        #: how many times the step was captured (1 after the first capture; more after re-captures)
        self.captures = 0
        self.grad_norm: Optional[torch.Tensor] = None
        self._forward = _train_forward(model)
        if self.graphed:
            self._init_graph()

    @property
    def captured(self) -> bool:
        """True while a captured graph is held (the next call with the same batch shape replays it)."""
        return self.graphed and self._graph is not None

    # ------------------------------------------------------------------------------------ the step
    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AMP[self.amp])

    def _backward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor], scale: int) -> torch.Tensor:
        """Forward and backward of one (micro-)batch, its loss divided by ``scale``; the loss, detached."""
        with self._autocast():
            args = (imgs, self.mask_ratio) if noise is None else (imgs, self.mask_ratio, noise)
            loss = _loss_of(self._forward(*args))
        (loss if scale == 1 else loss / scale).backward()
        return loss.detach()

    def _step(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """Eager (or, under capture, recorded): (loss detached, grad norm or None)."""
        self.model.zero_grad(set_to_none=True)  # every step starts from no gradients; under capture
        self.optimizer.zero_grad(set_to_none=True)  # this makes backward allocate them in the graph
        K = self.accum_iter
        if K == 1:
            loss = self._backward(imgs, noise, 1)
        else:
            pieces = zip(imgs.chunk(K), noise.chunk(K) if noise is not None else [None] * K)
            losses = []
            for k, (x, z) in enumerate(pieces):  # DDP: only the last backward all-reduces
                hold = self.model.no_sync() if _is_ddp(self.model) and k < K - 1 else contextlib.nullcontext()
                with hold:
                    losses.append(self._backward(x, z, K))
            loss = torch.stack(losses).mean()
        norm = None
        if self.grad_clip is not None:  # no host sync: error_if_nonfinite must stay False
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, error_if_nonfinite=False)
        self.optimizer.step()
        return loss.detach(), norm

    def __call__(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if not imgs.is_floating_point():
            raise ValueError(f"imgs must be a floating-point tensor, got {str(imgs.dtype).replace('torch.', '')}")
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
            if imgs.dim() == 0 or noise.dim() == 0 or noise.shape[0] != imgs.shape[0]:
                raise ValueError(f"noise must have one row per image of imgs {list(imgs.shape)}, got noise of shape "
                                 f"{list(noise.shape)}")
        if self.accum_iter > 1 and (imgs.dim() == 0 or imgs.shape[0] % self.accum_iter):
            raise ValueError(f"imgs: a batch of shape {list(imgs.shape)} does not split into accum_iter="
                             f"{self.accum_iter} micro-batches of equal size")
        if self.graphed:
            loss = self._graphed_call(imgs, noise)
        else:
            noise = None if noise is None else noise.to(self.device, non_blocking=True)
            loss, self.grad_norm = self._step(imgs.to(self.device, non_blocking=True), noise)
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    # ------------------------------------------------------------------------------------ CUDA graph
    def _init_graph(self) -> None:
        self._check_capturable()
        _count_registrations()
        self._stream = torch.cuda.Stream(self.device)
        self._lrs = self._install_lr_tensors()
        self._warned = False
        self._reset_graph()
        self._static: Optional[torch.Tensor] = None
        self._static_noise: Optional[torch.Tensor] = None
        self._key: Optional[tuple] = None
        self._warm_left = self.warmup

    def _check_capturable(self) -> None:
        """ValueError for what the graph cannot hold. A DistributedDataParallel model: capturing its step
        means capturing DDP's gradient all-reduce too. PyTorch documents that whole-network capture (NCCL
        2.9.6 or later, NCCL's async error handling off, DDP constructed on the capture's side stream, at
        least 11 eager DDP iterations before the capture), but it has not been verified with mae_fast on
        several GPUs, so DDP steps run eagerly (``cuda_graph=False``)."""
        if _is_ddp(self.model):
            raise ValueError("TrainStep: a DistributedDataParallel model is not captured as a CUDA graph: the graph "
                             "would have to hold DDP's gradient all-reduce, which PyTorch documents for NCCL >= "
                             "2.9.6 with set-up of its own (async error handling off, DDP built on the capture "
                             "stream, 11 eager iterations first) and which has not been verified with mae_fast on "
                             "several GPUs; pass cuda_graph=False to run DDP steps eagerly (one launch per kernel, "
                             "no graph replay)")
        if isinstance(self.model, nn.DataParallel):
            raise ValueError("TrainStep: a DataParallel model (one process, several GPUs) cannot be captured; pass "
                             "cuda_graph=False, or use one GPU per process")
        if not all(g.get("capturable", False) for g in self.optimizer.param_groups):
            raise ValueError(f"TrainStep: the optimizer ({type(self.optimizer).__name__}) is not capturable, so "
                             "its step cannot be part of a CUDA graph. Build it with capturable=True, e.g. "
                             "torch.optim.AdamW(model.parameters(), lr=..., fused=True, capturable=True), or "
                             "pass cuda_graph=False to run the step eagerly")
        off = {str(p.device) for g in self.optimizer.param_groups for p in g["params"] if p.device != self.device}
        if off:
            raise ValueError(f"TrainStep: the optimizer has parameters on {sorted(off)}, the model is on {self.device}")

    def _install_lr_tensors(self) -> list:
        """Adam/AdamW read a tensor lr at every replay: one 0-dim fp32 tensor on the device per param
        group (a tensor lr already there is kept). Other optimizers keep their lr; a change re-captures."""
        if not isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return [None] * len(self.optimizer.param_groups)
        lrs = []
        for g in self.optimizer.param_groups:
            lr = g["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == self.device and lr.dim() == 0
                    and lr.dtype == torch.float32):
                lr = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
                g["lr"] = lr
            lrs.append(lr)
        return lrs

    def _sync_lr(self) -> None:
        """Put each group's current lr into the tensor the graph reads (a scheduler that fills it in place
        needs nothing; ``group["lr"] = value`` is copied in) and put that tensor back in the group."""
        if len(self._lrs) != len(self.optimizer.param_groups):
            return  # param groups were added: the fingerprint differs and the step re-captures
        for g, lr in zip(self.optimizer.param_groups, self._lrs):
            if lr is None or g["lr"] is lr:
                continue
            value = g["lr"]
            if isinstance(value, torch.Tensor):
                lr.copy_(value.reshape(()), non_blocking=True)
            else:
                lr.fill_(float(value))
            g["lr"] = lr

    def _watch_lists(self) -> tuple:
        """(modules, parameters, parameters and buffers) of the model, taken once per capture: the
        fingerprint walks these flat lists (walking the module tree every call costs milliseconds)."""
        modules = list(self.model.modules())
        params = list(self.model.parameters())
        tensors = params + list(self.model.buffers())
        return modules, params, tensors

    def _fingerprint(self, structure: bool) -> dict:
        """What the graph has baked in, by part. The module structure (which parameters, buffers and
        submodules each module holds) only with ``structure``: walking it costs ~0.5 ms for ViT-B here."""
        modules, params, tensors = self._watched
        opt = self.optimizer
        hyper = tuple(opt.defaults)
        parts = {}
        if structure:
            parts["modules, parameters or buffers assigned"] = tuple(
                (tuple(m._parameters), tuple(map(id, m._parameters.values())),
                 tuple(m._buffers), tuple(map(id, m._buffers.values())), tuple(map(id, m._modules.values())))
                for m in modules)
        return {
            **parts,
            "parameter or buffer storage (.data) replaced": tuple(t.data_ptr() for t in tensors),
            "requires_grad": tuple(p.requires_grad for p in params),
            "train/eval mode": tuple(m.training for m in modules),
            "optimizer param groups": tuple((id(g), tuple(map(id, g["params"]))) for g in opt.param_groups),
            "optimizer hyperparameters": tuple(tuple(_freeze(g.get(k)) for k in hyper) for g in opt.param_groups),
            "optimizer state (load_state_dict)": (id(opt.state), len(opt.state)),
            "attention backend": get_attn_backend(),
            "TrainStep settings (mask_ratio, amp, grad_clip, accum_iter)": (self.mask_ratio, self.amp, self.grad_clip,
                                                                            self.accum_iter),
        }

    def _reset_graph(self) -> None:
        self._graph = None
        self._captured: Optional[dict] = None
        self._static_loss = None
        self._static_norm = None
        self._static_grads: list = []

    def reset(self) -> None:
        """Drop the captured graph: the next call runs one eager step, the one after captures again.
        Needed only after a change the call cannot see (see the module docstring for what it checks)."""
        if self.graphed:
            self._reset_graph()
            self._key = None

    def _what_changed(self, key: tuple) -> list:
        if key != self._key:
            return [f"the batch (shape, dtype; the noise's after them) changed from {self._key} to {key}"]
        walk = _REGISTRATIONS[0] != self._registrations
        now = self._fingerprint(structure=walk)
        changed = [part for part, value in now.items() if value != self._captured[part]]
        if walk and not changed:
            self._registrations = _REGISTRATIONS[0]  # registrations elsewhere: no need to walk again
        return changed

    def _graphed_call(self, imgs: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        key = (tuple(imgs.shape), imgs.dtype) + (() if noise is None else (tuple(noise.shape), noise.dtype))
        self._sync_lr()
        if self._graph is not None:
            changed = self._what_changed(key)
            if changed:
                if not self._warned:
                    warnings.warn(f"TrainStep: re-capturing the CUDA graph ({'; '.join(changed)}): this call runs "
                                  "eagerly, the next one captures again. Further re-captures are counted in "
                                  "TrainStep.captures without a warning.", stacklevel=3)
                    self._warned = True
                self._reset_graph()
                self._warm_left = 1  # an eager step first: new optimizer state must not be created in a capture
        if self._key != key:  # new static input buffers (outside the graph's memory pool)
            self._static = torch.empty(imgs.shape, dtype=imgs.dtype, device=self.device)
            self._static_noise = (None if noise is None
                                  else torch.empty(noise.shape, dtype=noise.dtype, device=self.device))
            self._key = key
            self._warm_left = self.warmup if self.captures == 0 else 1
        self._static.copy_(imgs, non_blocking=True)
        if noise is not None:
            self._static_noise.copy_(noise, non_blocking=True)
        if self._graph is None and self._warm_left > 0:
            self._warm_left -= 1
            return self._side_stream_step()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        for p, grad in self._static_grads:  # the user may have set them to None (zero_grad) in between
            if p.grad is not grad:
                p.grad = grad
        if self._static_norm is not None:
            self.grad_norm = self._static_norm.clone()
        return self._static_loss.clone()

    def _side_stream_step(self) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream), _quiet_uncaptured_step():
            loss, self.grad_norm = self._step(self._static, self._static_noise)
        main.wait_stream(self._stream)
        return loss

    def _capture(self) -> None:
        self._lrs = self._install_lr_tensors()  # param groups may have been added or replaced since
        graph = torch.cuda.CUDAGraph()
        try:
            # thread-local capture: other threads' CUDA calls stay legal meanwhile (a DataLoader's pin-memory
            # thread copies the next batch while the step is captured); this thread's own are still checked
            with _quiet_uncaptured_step(), torch.cuda.graph(graph, stream=self._stream,
                                                            capture_error_mode="thread_local"):
                loss, norm = self._step(self._static, self._static_noise)
        except Exception as e:
            self._reset_graph()
            raise RuntimeError(
                "TrainStep: capturing the training step as a CUDA graph failed. Usual causes: a host sync in "
                "the model (.item(), bool(tensor), printing a tensor, MAE_FAST_CHECK_INDICES=1), a CPU tensor "
                "used on the GPU, or shapes that change inside the step. cuda_graph=False runs the same step "
                f"eagerly. The error: {type(e).__name__}: {e}") from e
        self._graph, self._static_loss, self._static_norm = graph, loss, norm
        self._static_grads = [(p, p.grad) for p in self.model.parameters() if p.grad is not None]
        self._remember_capture()
        self.captures += 1

    def _remember_capture(self) -> None:
        """Record what the graph has baked in (compared by :meth:`_what_changed` before each replay)."""
        self._watched = self._watch_lists()
        self._registrations = _REGISTRATIONS[0]
        self._captured = self._fingerprint(structure=True)
