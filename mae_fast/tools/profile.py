"""`mae-fast profile`: one training step of mae_fast and of the reference under torch.profiler.

Where the time goes, by category: masking, gather, patch_embed, attention, gemm (every other matrix
multiply), norm, unshuffle, loss, optimizer, other (elementwise ops, copies, launches). Each profiled op's
self time (device time on a GPU, host time on a CPU) goes to exactly one category, so the categories add
up to the step. How an op is assigned, first rule that applies:

1. under the optimizer step (torch's ``Optimizer.step`` range) -> optimizer;
2. a mae_fast op (``mae_fast::*``, its generated backward, or the loss's eager autograd Function) -> by its
   name (masking, gather, unshuffle, loss);
3. inside a marked part of the model -> that part: ``patch_embed`` (the module, or its
   ``forward_visible``), ``masking`` and ``loss`` (the model's ``random_masking``/``_masking`` and
   ``forward_loss`` methods, when it has them), ``unshuffle`` (from the
   output of ``decoder_embed`` to the first decoder block). Backward ops inherit the part of the forward
   op they differentiate (matched through autograd sequence numbers). A gather inside ``masking`` counts as
   gather;
4. by op name: attention kernels, GEMMs, layer norms, gathers/index ops, sorts/random numbers (masking);
5. anything else -> other.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from . import bench, report, runner, variants
from .progress import bar as progress_bar

CATEGORIES = ["masking", "gather", "patch_embed", "attention", "gemm", "norm", "unshuffle", "loss", "optimizer", "other"]
_SCOPE = "mae::"

_NAME_RULES = [
    ("attention", re.compile(r"scaled_dot_product|flash_attention|efficient_attention|_cudnn_attention|attention_backward|attention_forward|flash_attn|softmax", re.I)),
    ("gemm", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$|gemm|cutlass|sm90_xmma|cublas", re.I)),
    ("norm", re.compile(r"layer_norm", re.I)),
    ("gather", re.compile(r"^aten::(gather|scatter|scatter_add_?|index|index_select|index_add_?|take_along_dim|_index_put_impl_|index_put_?)$", re.I)),
    ("masking", re.compile(r"^aten::(sort|argsort|rand|uniform_|randperm)$", re.I)),
    ("patch_embed", re.compile(r"convolution", re.I)),
]
_FAST_OPS = [("masking", "masking"), ("gather", "gather"), ("unshuffle", "unshuffle"), ("normpixloss", "loss"),
             ("loss", "loss"), ("layer_norm", "norm"), ("pack_qkv", "attention")]


# --------------------------------------------------------------------------- marking the model's parts
class _Scopes:
    """Hooks and method wrappers that open ``mae::<part>`` profiler ranges during the forward."""

    def __init__(self, model: torch.nn.Module):
        self.handles = []
        self.patched = []
        self.open: Dict[str, object] = {}
        m = getattr(model, "_orig_mod", model)
        m = getattr(m, "module", m)
        m = getattr(m, "model", m)  # variants.AllPatchLoss
        if hasattr(m, "patch_embed"):
            self._module_range(m.patch_embed, "patch_embed")
        if hasattr(m, "decoder_embed") and hasattr(m, "decoder_blocks") and len(m.decoder_blocks):
            self.handles.append(m.decoder_embed.register_forward_hook(lambda *a: self._enter("unshuffle")))
            self.handles.append(m.decoder_blocks[0].register_forward_pre_hook(lambda *a: self._exit("unshuffle")))
        # methods that run a part without going through a submodule's __call__ (hooks would miss them)
        targets = [(m, "random_masking", "masking"), (m, "_masking", "masking"), (m, "forward_loss", "loss")]
        if hasattr(m, "patch_embed"):
            targets.append((m.patch_embed, "forward_visible", "patch_embed"))
        for obj, meth, part in targets:
            if callable(getattr(obj, meth, None)):
                self._method_range(obj, meth, part)

    def _enter(self, part: str) -> None:
        if part not in self.open:
            rf = record_function(_SCOPE + part)
            rf.__enter__()
            self.open[part] = rf

    def _exit(self, part: str) -> None:
        rf = self.open.pop(part, None)
        if rf is not None:
            rf.__exit__(None, None, None)

    def _module_range(self, mod, part: str) -> None:
        self.handles.append(mod.register_forward_pre_hook(lambda *a: self._enter(part)))
        self.handles.append(mod.register_forward_hook(lambda *a: self._exit(part)))

    def _method_range(self, obj, name: str, part: str) -> None:
        orig = getattr(obj, name)

        def wrapped(*args, **kwargs):
            with record_function(_SCOPE + part):
                return orig(*args, **kwargs)

        setattr(obj, name, wrapped)  # instance attribute shadows the method
        self.patched.append((obj, name))

    def close(self) -> None:
        for part in list(self.open):
            self._exit(part)
        for h in self.handles:
            h.remove()
        for obj, name in self.patched:
            delattr(obj, name)


# --------------------------------------------------------------------------- classification
def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _scope_of(e) -> Optional[str]:
    for a in _ancestors(e):
        if a.name.startswith(_SCOPE):
            return a.name[len(_SCOPE):]
    return None


def classify_events(events, device_time: bool) -> Dict[str, float]:
    """Self time (microseconds) per category over profiler ``events`` (FunctionEvents)."""
    # forward op sequence number -> the part of the model it ran in (for its backward)
    seq_scope: Dict[int, str] = {}
    for e in events:
        if getattr(e, "sequence_nr", -1) >= 0 and not e.name.startswith("autograd::"):
            s = _scope_of(e) or (e.name if e.name.startswith(_SCOPE) else None)
            if s and e.sequence_nr not in seq_scope:
                seq_scope[e.sequence_nr] = s
    totals = {c: 0.0 for c in CATEGORIES}
    for e in events:
        t = e.self_device_time_total if device_time else e.self_cpu_time_total
        if t <= 0 or e.name.startswith(_SCOPE):
            if e.name.startswith(_SCOPE) and t > 0 and not device_time:
                totals[e.name[len(_SCOPE):]] += t  # host time of the range itself (tiny)
            continue
        totals[categorize(e, seq_scope)] += t
    return totals


def categorize(e, seq_scope: Dict[int, str]) -> str:
    anc = list(_ancestors(e))
    if any(a.name.startswith("Optimizer.step") or a.name.startswith("Optimizer.zero_grad") for a in anc) \
            or e.name.startswith("Optimizer."):
        return "optimizer"
    for a in [e] + anc:
        name = a.name.lower()
        if "mae_fast" in name or "normpixloss" in name:  # mae_fast::op, its backward, its eager autograd.Function
            for key, cat in _FAST_OPS:
                if key in name:
                    return cat
    scope = _scope_of(e)
    if scope is None:
        for a in anc:
            if a.name.startswith("autograd::engine::evaluate_function") and a.sequence_nr in seq_scope:
                scope = seq_scope[a.sequence_nr]
                break
    by_name = None
    for cat, rx in _NAME_RULES:
        if rx.search(e.name):
            by_name = cat
            break
    if scope == "masking" and by_name == "gather":
        return "gather"
    if scope in CATEGORIES:
        return scope
    return by_name or "other"


# --------------------------------------------------------------------------- the run
def profile_variant(name: str, cfg: bench.BenchConfig, trace_path: Optional[str] = None, top: int = 15,
                    bar=None) -> dict:
    """Warm up ``cfg.warmup`` steps, then profile one training step of variant ``name`` (``bar``: a progress
    bar to advance by one per step)."""
    device = cfg.resolved_device()
    dims = cfg.dims()
    imgs = runner.images(cfg, dims, device, 0)  # images, or clips [N, C, T, H, W] for video
    r = runner.Runner(name, cfg, device, imgs, distributed=False)
    r.warm_up(cfg.warmup, bar)  # a +graph variant: until captured, so that the profiled step is a replay
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    scopes = _Scopes(r.model)
    try:
        with profile(activities=activities) as prof:
            r.step()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        scopes.close()
    if bar is not None:
        bar.set_description(f"profile, {name} reading the profile")
    events = prof.events()
    totals = classify_events(events, device_time=cuda)
    step_us = sum(totals.values())
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda a: -(a.self_device_time_total if cuda else a.self_cpu_time_total))
    top_ops = []
    for a in avgs[:top]:
        t = a.self_device_time_total if cuda else a.self_cpu_time_total
        if t <= 0:
            break
        top_ops.append({"op": a.key, "calls": a.count, "self_ms": t / 1e3, "fraction": t / step_us if step_us else 0.0})
    if trace_path:
        _export_trace(prof, trace_path)
    if bar is not None:
        bar.update(1)
    return {
        "variant": name,
        "time_kind": "device (CUDA kernels)" if cuda else "host (CPU)",
        "step_ms": step_us / 1e3,
        "categories": {c: {"ms": totals[c] / 1e3, "fraction": totals[c] / step_us if step_us else 0.0} for c in CATEGORIES},
        "top_ops": top_ops,
        "sorted_by": sort_key,
        "trace": trace_path,
    }


def _export_trace(prof, path: str) -> None:
    """Chrome trace (chrome://tracing, ui.perfetto.dev); gzipped when ``path`` ends with .gz (they open it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not path.endswith(".gz"):
        prof.export_chrome_trace(path)
        return
    tmp = path[: -len(".gz")] + ".tmp.json"
    try:
        prof.export_chrome_trace(tmp)
        with open(tmp, "rb") as fin, gzip.open(path, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(cfg: bench.BenchConfig, trace_dir: Optional[str] = None, argv: Optional[List[str]] = None,
        top: int = 15, progress: bool = True) -> dict:
    bench.check_video(cfg.num_frames, cfg.t_patch_size, cfg.tube_masking)
    names, skipped = variants.resolve_variants(cfg)
    results = []
    with progress_bar(len(names) * (cfg.warmup + 1), "profile", enabled=progress) as bar:
        for name in names:
            bar.set_description(f"profile, {name} build, warm-up, profiled step")
            trace = os.path.join(trace_dir, f"trace_{name.replace('+', '_')}.json.gz") if trace_dir else None
            results.append(profile_variant(name, cfg, trace, top, bar))
    device = cfg.resolved_device()
    doc = report.provenance(argv, device)
    dims = cfg.dims()
    doc["config"] = dict(model=cfg.model, batch_size=cfg.batch_size, mask_ratio=cfg.mask_ratio, img_size=dims.img_h,
                         patch_size=dims.patch_size, num_frames=dims.num_frames, t_patch_size=dims.t_patch_size,
                         tube_masking=dims.tube_masking, video=dims.video,
                         input_shape=list(dims.input_shape(cfg.batch_size)), dtype=cfg.resolved_dtype(),
                         device=str(device), warmup=cfg.warmup, variants=names)
    if device.type == "cpu":
        doc["config"]["threads"] = torch.get_num_threads()
    doc["notes"] = {"categories": "self time of every op in one step, each op in one category (see mae_fast/tools/profile.py)"}
    if skipped:
        doc["skipped_variants"] = skipped
    doc["results"] = results
    return doc


def format_results(doc: dict) -> str:
    res = doc["results"]
    c = doc["config"]
    lines = [f"profile: {c['model']}  {report.describe_input(c)}  {report.batch_words(c)}  mask ratio "
             f"{c['mask_ratio']}  {c['dtype']}  {report.on_words(doc)}  (one step; {res[0]['time_kind'] if res else ''} time)"]
    rows = []
    for cat in CATEGORIES + ["total"]:
        row = {"category": cat}
        for r in res:
            if cat == "total":
                row[r["variant"] + " ms"] = r["step_ms"]
                row[r["variant"] + " %"] = 100.0
            else:
                row[r["variant"] + " ms"] = r["categories"][cat]["ms"]
                row[r["variant"] + " %"] = 100 * r["categories"][cat]["fraction"]
        rows.append(row)
    cols = ["category"] + [r["variant"] + s for r in res for s in (" ms", " %")]
    lines.append(report.format_table(rows, cols))
    for r in res:
        lines.append(f"\ntop ops, {r['variant']} (self time):")
        lines.append(report.format_table([dict(o, op=o["op"][:60], pct=100 * o["fraction"]) for o in r["top_ops"]],
                                            ["op", "calls", "self_ms", "pct"]))
        if r["trace"]:
            lines.append(f"Chrome trace: {r['trace']}")
    for v, why in doc.get("skipped_variants", {}).items():
        lines.append(f"skipped {v}: {why}")
    return "\n".join(lines)
