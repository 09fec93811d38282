"""`make triton-check`: compile every Triton kernel of kernels/ for sm_90 (PTX and cubin), as launched.

Each op runs once (forward and backward, fp32 and bf16, with and without its optional inputs) through
Triton's interpreter on the CPU (in a subprocess), and so does one training step of the ViT-B/16 and
ViT-L/16 fast models at batch 256 on fake tensors (the launch configurations of a real run), and so do the
attention kernels at the MAE shapes and the MLP's GEMMs at the ViT-B/16 and ViT-L/16 shapes. Every launch is
recorded with the specialisation Triton's launcher gives it: argument types, constexprs (ints equal to 1
among them), num_warps and num_stages, and which arguments it marks divisible by 16 (16-byte aligned tensors,
integers that are multiples of 16: the hints that let loads vectorise). Each distinct launch signature is then
compiled for an H100/H200 (GPUTarget cuda 90) by Triton's own compiler, without a GPU: ptxas reports its
registers, spills and shared memory, and the PTX gives the count of vector (.v2/.v4) global loads among all.
So the kernels are type-checked by the real compiler on machines without a GPU (the interpreter accepts some
code the compiler rejects), and a kernel that spills registers or loads contiguous data one element at a time
shows up here. Exit status 1 if any kernel fails to compile.

    python scripts/triton_check.py [--verbose] [--kernels NAME,...]
"""
import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}


def workload():
    """Every op, forward and backward, in the dtypes and variants the library launches."""
    from mae_fast import ops
    from mae_fast.testing import randn, random_ids

    for dt in (torch.float32, torch.bfloat16):
        N, L, K, D = 2, 16, 5, 24
        ids_keep, ids_restore = random_ids(N, L, K)
        x = randn(N, L, D, dtype=dt).requires_grad_(True)
        for pos, pre in ((None, None), (randn(1, L, D).requires_grad_(True), randn(1, 1, D).requires_grad_(True))):
            ops.gather_tokens(x, ids_keep, pos, pre).sum().backward()
        y = randn(N, 1 + K, D, dtype=dt).requires_grad_(True)
        mt = randn(1, 1, D).requires_grad_(True)
        for pos in (None, randn(1, 1 + L, D).requires_grad_(True)):
            ops.unshuffle_tokens(y, ids_restore, mt, pos, out_dtype=torch.float32).sum().backward()
        for imgs, u in ((randn(N, 3, 16, 16, dtype=dt), 1), (randn(N, 3, 4, 8, 8, dtype=dt), 2)):
            ops.gather_patches(imgs.requires_grad_(True), random_ids(N, 8, 4)[0], 4, t_patch_size=u).sum().backward()
        imgs = randn(N, 3, 16, 16)
        mask = torch.ones(N, L)
        for pred_dt in (dt, torch.float16):
            pred = randn(N, L, 48, dtype=pred_dt).requires_grad_(True)
            (ops.norm_pix_loss(pred, imgs, mask, 4) * 2).backward()
            pm = randn(N, L - K, 48, dtype=pred_dt).requires_grad_(True)
            ops.norm_pix_loss(pm, imgs, None, 4, ids_masked=ids_restore[:, K:] % L).backward()
        s = randn(N, L, D)
        for branch in (None, randn(N, L, D, dtype=dt)):
            w, b = randn(D).requires_grad_(True), randn(D).requires_grad_(True)
            xx = s.clone().requires_grad_(True)
            br = branch.requires_grad_(True) if branch is not None else None
            yy, ss = ops.add_layer_norm(xx, w, b, 1e-6, branch=br, branch_bias=randn(D) if br is not None else None,
                                        out_dtype=dt)
            (yy.float().sum() + ss.sum()).backward()
        for approximate in ("none", "tanh"):
            ops.bias_gelu(randn(N, L, 4 * D, dtype=dt).requires_grad_(True), randn(4 * D).requires_grad_(True),
                          approximate).sum().backward()
        ops.residual_add(s.clone().requires_grad_(True), randn(N, L, D, dtype=dt).requires_grad_(True),
                         randn(D).requires_grad_(True)).sum().backward()
        for bias in (randn(3 * D).requires_grad_(True), None):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
                out = ops.self_attention(s.clone().requires_grad_(True), randn(3 * D, D).requires_grad_(True),
                                         bias, 3, backend="math")
            out.float().sum().backward()
        for bias in (randn(3 * D).requires_grad_(True), None):  # the attention kernels on the packed qkv
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
                out = ops.self_attention(s.clone().requires_grad_(True), randn(3 * D, D).requires_grad_(True),
                                         bias, 3, backend="mae_fast")
            out.float().sum().backward()
        for n, hd in ((1, 32), (50, 64), (70, 32), (65, 80), (33, 72), (40, 128)):  # whole and blocked tiles
            ops.qkv_attention(randn(1, n, 3 * 2 * hd, dtype=dt).requires_grad_(True), 2).float().sum().backward()
        resized_crop_batch(5, 8, [(9, 13), (4, 3)], dt)


def resized_crop_batch(seed: int, size: int, shapes, dtype, fake: bool = False) -> None:
    """One ops.resized_crop launch: images of ``shapes`` (H, W) with their RandomResizedCrop boxes and flips
    (``fake``: the pixels a fake tensor, so only the launch is recorded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mae_fast import data, ops

    drawn = [data.crop_and_flip(seed, k, W, H) for k, (H, W) in enumerate(shapes)]
    sizes = [3 * H * W for H, W in shapes]
    offsets = torch.tensor([sum(sizes[:k]) for k in range(len(sizes))], dtype=torch.int64)
    meta = (offsets, torch.tensor(shapes, dtype=torch.int64), torch.tensor([b for b, _ in drawn]),
            torch.tensor([f for _, f in drawn]))
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        pixels = (torch.empty((sum(sizes),), dtype=torch.uint8) if fake else
                  torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
        ops.resized_crop(pixels, *meta, size, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, dtype=dtype)


def attention_steps():
    """The attention kernels at the MAE shapes, batch 256, bf16, forward and backward with the qkv bias
    gradient, on fake tensors: ViT-B/L/H encoders at mask ratio 0.75 (1 + 49 and 1 + 64 tokens, head dims 64
    and 80), the decoder (1 + 196 tokens, head dim 32), ViT-B without masking (197 tokens, head dim 64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mae_fast.ops.qkv_attention import attention_backward, attention_forward, heads, split_heads

    for H, N, hd in ((12, 50, 64), (16, 50, 64), (16, 65, 80), (16, 197, 32), (12, 197, 64)):
        with FakeTensorMode(allow_non_fake_inputs=True):
            qkv = torch.empty(256, N, 3 * H * hd, dtype=torch.bfloat16)
            o, lse = attention_forward(*split_heads(qkv, H), hd ** -0.5)
            attention_backward(heads(o, H), *split_heads(qkv, H), heads(o, H), lse, hd ** -0.5, True)


def _divisible_by_16(value) -> bool:
    """Whether Triton's launcher hints this argument divisible by 16 (fake tensors: by their storage offset;
    the allocator aligns storages)."""
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(value, torch.Tensor):
        if is_fake(value):
            return value.storage_offset() * value.element_size() % 16 == 0
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def signature(kernel, args, kwargs):
    """(signature, constexprs, num_warps, num_stages, indices of the arguments hinted divisible by 16) of one
    launch."""
    import inspect

    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {n: kwargs[n] for n in names if n in kwargs}
    sig = {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int) and value == 1:  # Triton's launcher specialises it as a constant
            sig[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {name} of type {type(value).__name__}")
    for name in constexprs:
        sig[name] = "constexpr"
    aligned = [i for i, (name, value) in enumerate(zip(names, args))
               if name not in constexprs and _divisible_by_16(value)]
    return sig, constexprs, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3), aligned


def global_loads(ptx: str):
    """(vector, all) counts of the global loads in the PTX: ``ld.global`` instructions, vector ones
    (``.v2``/``.v4``) among them. Scalar loads where the data is contiguous mean a pointer or stride the
    compiler could not prove aligned or unit."""
    loads = re.findall(r"\bld\.global(?:\.[a-z0-9]+)*", ptx)
    return sum(1 for op in loads if ".v2" in op or ".v4" in op), len(loads)


def resources(ptx: str, ptxas: str):
    """(registers, spill bytes, shared bytes) from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", out)) else -1
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    smem = int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", out)) else 0
    return regs, spills, smem


def model_steps():
    """One training step of the fast ViT-B/16 and ViT-L/16 MAEs at batch 256 under bf16 autocast, on fake
    tensors (shapes only): the launch configurations of a real run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mae_fast import models

    for dt in (torch.float32, torch.bfloat16):  # the data batch of such a step: 256 images to 224 px
        resized_crop_batch(0, 224, [(375, 500)] * 256, dt, fake=True)
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16"):
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = models.create_model(name, norm_pix_loss=True, attn_backend="math")
            imgs = torch.randn(256, 3, 224, 224)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.forward_train(imgs, 0.75)
            loss.backward()


def _mlp_step(R, D, dtype, autocast, bias=True, approximate="none"):
    """ops.mlp forward and backward on fake tensors (the GPU's launch configurations, without running)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mae_fast import ops

    with FakeTensorMode(allow_non_fake_inputs=True):
        w_dtype = torch.float32 if autocast else dtype
        x = torch.randn(R, D, dtype=w_dtype).requires_grad_(True)
        w1, w2 = torch.randn(4 * D, D, dtype=w_dtype), torch.randn(D, 4 * D, dtype=w_dtype)
        b1, b2 = (torch.randn(4 * D, dtype=w_dtype), torch.randn(D, dtype=w_dtype)) if bias else (None, None)
        params = [t.requires_grad_(True) for t in (w1, b1, w2, b2) if t is not None]
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = ops.mlp(x, w1, b1, w2, b2, approximate)
        torch.autograd.grad(out.float().sum(), [x, *params])


def mlp_steps():
    """The MLP's GEMMs as a ViT-B/16 and ViT-L/16 step at batch 256 launches them under bf16 autocast (encoder
    rows 256 x 50, decoder rows 256 x 197 at width 512), and in the other dtypes and variants at ViT-B/16's
    encoder size (tanh GELU, fp16 without biases, fp32)."""
    for R, D in ((256 * 50, 768), (256 * 50, 1024), (256 * 197, 512)):
        _mlp_step(R, D, torch.bfloat16, True)
    _mlp_step(256 * 50, 768, torch.bfloat16, True, approximate="tanh")
    _mlp_step(256 * 50, 768, torch.float16, False, bias=False)
    _mlp_step(256 * 50, 768, torch.float32, False)


def mlp_odd_shapes():
    """The MLP's GEMMs at a width that is no multiple of 16 (unaligned rows: no vectorised loads) and no
    multiple of the K step, with fewer rows than a tile: compiled, their spills not counted (no ViT has
    such a width)."""
    _mlp_step(50, 72, torch.bfloat16, True)
    _mlp_step(50, 72, torch.float32, False, approximate="tanh")


def record() -> None:
    """Print the launch signatures of the workloads as JSON lines ("real": from the full-size model step)."""
    from mae_fast.ops._triton import observe_launches

    seen = set()
    # (spills counted, launches run, workload): fake-tensor workloads are recorded, not run
    for real, execute, run in ((False, True, workload), (False, False, mlp_odd_shapes), (True, False, model_steps),
                               (True, False, mlp_steps), (True, False, attention_steps)):
        with observe_launches(run=execute) as launches:
            run()
        for kernel, _grid, largs, lkwargs in launches:
            sig, constexprs, warps, stages, aligned = signature(kernel, largs, lkwargs)
            line = json.dumps({"module": kernel.fn.__module__, "name": kernel.fn.__name__, "signature": sig,
                               "constexprs": constexprs, "num_warps": warps, "num_stages": stages,
                               "aligned": aligned, "real": real}, sort_keys=True)
            if line not in seen:
                seen.add(line)
                print(line)


def compile_one(launch: dict) -> tuple:
    """(kernel name, registers, spill bytes, shared bytes, (vector, all) global loads, status) of one launch
    signature compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    try:
        attrs = {(i,): [["tt.divisibility", 16]] for i in launch["aligned"]}
        compiled = triton.compile(ASTSource(fn, launch["signature"], launch["constexprs"], attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
        regs, spills, smem = resources(compiled.asm["ptx"], get_ptxas(90).path)  # the ptxas Triton uses for sm_90
        vec, loads = global_loads(compiled.asm["ptx"])
        return launch["name"], regs, spills if launch["real"] else 0, smem, (vec, loads), "ok"
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        return launch["name"], -1, 0, 0, (0, 0), f"FAILED: {type(e).__name__}: {str(e).strip()[:400]}"


def compile_all(lines, verbose: bool) -> int:
    """Compile every launch signature, one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
        rows = list(pool.map(compile_one, lines))
    failed = sum(1 for row in rows if row[-1] != "ok")
    if verbose:
        for row, launch in zip(rows, lines):
            print(row, launch["constexprs"], launch["num_warps"])
    by_kernel = {}
    for name, regs, spills, smem, (vec, loads), status in rows:
        k = by_kernel.setdefault(name, [0, 0, 0, 0, 0, 0, "ok"])
        k[0] += 1
        k[1], k[2], k[3] = max(k[1], regs), max(k[2], spills), max(k[3], smem)
        k[4], k[5] = k[4] + vec, k[5] + loads
        if status != "ok":
            k[6] = status
    print(f"triton-check: {len(rows)} launch signatures of {len(by_kernel)} kernels compiled for sm_90 "
          f"in {time.perf_counter() - t0:.0f} s (max registers / shared bytes per kernel; spill bytes at the "
          f"configurations of a ViT-B/16 and ViT-L/16 step, batch 256; global loads in the PTX: vector (.v2/.v4) "
          f"of all, summed over the variants)")
    for name, (n, regs, spills, smem, vec, loads, status) in sorted(by_kernel.items()):
        print(f"  {name:28s} {n:3d} variants  regs {regs:4d}  spills {spills:5d}  smem {smem:6d}  "
              f"vector loads {vec:4d}/{loads:<4d}  {status}")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="one line per compiled launch signature")
    ap.add_argument("--kernels", help="comma-separated kernel names: compile only these (all are recorded)")
    ap.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # the interpreter subprocess
    args = ap.parse_args(argv)
    if args.record:
        record()
        return 0
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--record"], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-5000:])
        return 1
    os.environ.pop("TRITON_INTERPRET", None)
    launches = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if args.kernels:
        launches = [x for x in launches if x["name"] in args.kernels.split(",")]
    return compile_all(launches, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
