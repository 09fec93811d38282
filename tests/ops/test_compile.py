"""torch.compile(fullgraph=True) of every op, forward and backward, against eager: on a CPU in a subprocess
without TRITON_INTERPRET (the interpreter does not trace; the plain torch path is compiled), and on a GPU
with the Triton kernels visible to Inductor."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mae_fast import ops
from mae_fast.testing import randn, random_ids


def _token_ops(x, ids_keep, ids_restore, pos, pre, mt, dpos, imgs, vid):
    y = ops.gather_tokens(x, ids_keep, pos, pre)  # [N, 1+K, D]
    z = ops.unshuffle_tokens(y * 2, ids_restore, mt, dpos)  # [N, 1+L, D]
    w = ops.gather_patches(imgs, ids_keep, 4)  # [N, K, C*p*p]
    v = ops.gather_patches(vid, ids_keep, 4, t_patch_size=2)  # [N, K, C*u*p*p]
    return z.square().sum() + w.sin().sum() + v.cos().sum()


def _loss_forms():
    """(fn, args) for both loss forms, images and video."""
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 16, 24)
    mask = (torch.rand(2, 6) < 0.7).float()
    mask[:, 0] = 1
    ids = torch.tensor([[0, 2, 5], [1, 3, 4]])
    vid = torch.rand(2, 3, 4, 8, 12)  # u = 2, p = 4: L = 2 * 2 * 3 = 12 tubelets, D = 96
    vmask = (torch.rand(2, 12) < 0.7).float()
    vmask[:, 0] = 1
    vids = torch.tensor([[0, 7, 11], [2, 3, 9]])
    return [
        (lambda pred, imgs, mask: ops.norm_pix_loss(pred, imgs, mask, 8), (torch.randn(2, 6, 192), imgs, mask)),
        (lambda pm, imgs, ids: ops.norm_pix_loss(pm, imgs, None, 8, ids_masked=ids), (torch.randn(2, 3, 192), imgs, ids)),
        (lambda pred, vid, mask: ops.norm_pix_loss(pred, vid, mask, 4, t_patch_size=2), (torch.randn(2, 12, 96), vid, vmask)),
        (lambda pm, vid, ids: ops.norm_pix_loss(pm, vid, None, 4, norm_pix=False, ids_masked=ids, t_patch_size=2),
         (torch.randn(2, 3, 96), vid, vids)),
    ]


def check(device: str, backend: str = "inductor") -> None:
    """Compiled == eager for the token ops (all gradients) and for the loss (grad_output 1 and 3)."""
    N, L, K, D = 3, 16, 5, 24
    ids_keep, ids_restore = random_ids(N, L, K)
    inputs = [randn(N, L, D), ids_keep, ids_restore, randn(1, L, D, seed=1), randn(1, 1, D, seed=2),
              randn(1, 1, D, seed=3), randn(1, 1 + L, D, seed=4), randn(N, 2, 16, 16, seed=5),
              randn(N, 2, 4, 8, 16, seed=6)]  # video: T' * h * w = 2 * 2 * 4 = L tubelets
    inputs = [t.to(device) for t in inputs]
    results = []
    for f in (_token_ops, torch.compile(_token_ops, fullgraph=True, backend=backend)):
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        loss = f(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves if t.is_floating_point()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for fn, args in _loss_forms():
        args = [a.to(device) for a in args]
        pred = args[0].requires_grad_(True)
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        for go in (1.0, 3.0):
            eager = fn(*args)
            (eager * go).backward()
            g_eager, pred.grad = pred.grad.clone(), None
            comp = compiled(*args)
            (comp * go).backward()
            g_comp, pred.grad = pred.grad.clone(), None
            assert torch.allclose(eager, comp, rtol=1e-5), (eager, comp)  # fp32: another summation order
            assert (g_eager - g_comp).abs().max() <= 1e-5 * g_eager.abs().max()


def test_compile_fullgraph_cpu_subprocess():
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_compile
        test_compile.check("cpu")
        print("COMPILE_OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert "COMPILE_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.gpu
def test_compile_fullgraph_cuda():
    check("cuda")
