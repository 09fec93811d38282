"""Compile every Triton kernel variant the ops launch to sm_90 machine code, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) executes Python, not the compiler: a
construct it accepts may still fail to compile for a GPU. This script runs each op (forward and backward,
the variants the flags select) on small CPU tensors under the interpreter in a child process, records
every launch's argument types and constexpr values, then compiles each distinct variant with Triton's
own compiler for ``GPUTarget("cuda", 90, 32)`` (to a cubin, with the ptxas Triton ships). Exit status 1
if any fails. About a minute on two CPU cores.

    python scripts/triton_check.py
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record() -> list:
    """(child, under the interpreter) run the ops and return [(module, kernel, {arg: type or value})]."""
    import importlib
    import inspect
    import pkgutil

    import torch

    import mae_fast.kernels as package
    from mae_fast import ops
    from mae_fast.testing import randn, random_ids

    seen, hooks = {}, []

    def describe(v):
        if isinstance(v, torch.Tensor):
            return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                          torch.int64: "i64"}[v.dtype]
        if isinstance(v, bool):
            return ["bool", v]
        if isinstance(v, int):
            return ["int", v]
        if isinstance(v, float):
            return ["float", v]
        return ["other", repr(v)]

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"mae_fast.kernels.{info.name}")
        for name, k in vars(module).items():
            if hasattr(k, "add_pre_run_hook") and not isinstance(k, type):
                def hook(*args, _k=k, _mod=module.__name__, _name=name, **kwargs):
                    bound = inspect.getcallargs(_k.fn, *args, **kwargs)
                    sig = {a: describe(v) for a, v in bound.items()}
                    seen[json.dumps([_mod, _name, sig], sort_keys=True)] = (_mod, _name, sig)
                k.add_pre_run_hook(hook)
                hooks.append((k, hook))

    N, L, K, D = 3, 12, 5, 40
    ids, restore = random_ids(N, L, K)
    with ops.path("triton"):
        for pos, pre in ((True, True), (False, False)):
            x = randn(N, L, D).requires_grad_(True)
            p = randn(1, L, D).requires_grad_(pos)
            f = randn(1, 1, D).requires_grad_(pre)
            ops.gather_tokens(x, ids.int(), p if pos else None, f if pre else None).sum().backward()
            y = randn(N, 1 + K, D).requires_grad_(True)
            ops.unshuffle_tokens(y, restore, torch.zeros(D, requires_grad=True), randn(1, 1 + L, D) if pos else None
                                 ).sum().backward()
        for dtype in (torch.float32, torch.bfloat16):
            ops.gather_patches(randn(N, 2, 12, 16, dtype=dtype).requires_grad_(True), ids, 4).sum().backward()
            ops.gather_patches(randn(N, 2, 4, 8, 12, dtype=dtype).requires_grad_(True), ids, 4,
                               t_patch_size=2).sum().backward()
        imgs = torch.rand(N, 3, 16, 24)
        mask = torch.ones(N, 6)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for norm_pix in (True, False):
                pred = randn(N, 6, 192, dtype=dtype).requires_grad_(True)
                (ops.norm_pix_loss(pred, imgs, mask, 8, norm_pix) * 2).backward()
                pm = randn(N, 3, 192, dtype=dtype).requires_grad_(True)
                ops.norm_pix_loss(pm, imgs, None, 8, norm_pix, ids_masked=random_ids(N, 6, 3)[0]).backward()
                with torch.no_grad():
                    ops.norm_pix_loss(pred, imgs, mask, 8, norm_pix)
    for k, hook in hooks:
        k.pre_run_hooks.remove(hook)
    return list(seen.values())


def compile_all(variants: list) -> int:
    """(parent, no interpreter) compile each variant for sm_90; return the number of failures."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for mod, name, sig in variants:
        fn = getattr(importlib.import_module(mod), name)
        constexpr = {p.name for p in fn.params if p.is_constexpr}
        signature, constants = {}, {}
        for arg, d in sig.items():
            if arg in constexpr:
                signature[arg], constants[arg] = "constexpr", d[1] if isinstance(d, list) else d
            elif isinstance(d, str):
                signature[arg] = d
            elif d[0] == "int":
                signature[arg] = "i64" if not -2**31 <= d[1] < 2**31 else "i32"
            elif d[0] == "float":
                signature[arg] = "fp32"
            else:
                signature[arg] = "i1"
        label = f"{name}({', '.join(f'{k}={v}' for k, v in constants.items())})"
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=target)
            assert compiled.asm.get("cubin"), "no cubin"
            print(f"triton-check: {label}: ok")
        except Exception as err:  # report every failure, then fail
            failed += 1
            print(f"triton-check: {label}: FAILED\n{err}")
    return failed


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--record":
        sys.path.insert(0, ROOT)
        print(json.dumps(record()))
        sys.exit(0)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run([sys.executable, __file__, "--record"], env=env, capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"triton-check: recording the launches failed:\n{child.stderr[-4000:]}")
    variants = json.loads(child.stdout.strip().splitlines()[-1])
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    failures = compile_all(variants)
    print(f"triton-check: {len(variants) - failures} of {len(variants)} kernel variants compiled for sm_90")
    sys.exit(1 if failures else 0)
