"""Host cost of the two ways an op's autograd can call its kernels (the measurement behind the ops' policy).

"function": a torch.autograd.Function whose forward and backward call the implementation directly (what
mae_fast's ops do eagerly); "registered": the same implementation as a registered op with
torch.library.register_autograd, called through the dispatcher (what they do while torch.compile traces
or a TorchDispatchMode is on). Both run gather_tokens' plain torch path on a tiny input, forward +
backward, so the difference is the dispatch and autograd machinery alone.

    python bench/bench_dispatch.py [--json PATH]
"""
import _harness
import torch

from mae_fast.ops.gather_tokens import gather_tokens_backward_torch, gather_tokens_torch


@torch.library.custom_op("mae_fast_bench::gather", mutates_args=())
def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return gather_tokens_torch(x, ids, None, None)


@torch.library.custom_op("mae_fast_bench::gather_backward", mutates_args=())
def _gather_backward(grad: torch.Tensor, ids: torch.Tensor, L: int) -> torch.Tensor:
    return gather_tokens_backward_torch(grad, ids, L, 0, True, False, False)[0]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.L = inputs[0].shape[1]


torch.library.register_autograd("mae_fast_bench::gather", lambda ctx, g: (_gather_backward(g, ctx.saved_tensors[0], ctx.L), None),
                                setup_context=_setup)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids):
        _setup(ctx, (x, ids), None)
        return gather_tokens_torch(x, ids, None, None)

    @staticmethod
    def backward(ctx, g):
        return gather_tokens_backward_torch(g, ctx.saved_tensors[0], ctx.L, 0, True, False, False)[0], None


def main(argv=None):
    args = _harness.parse(_harness.parser(__doc__), argv)
    args.no_graphs = True
    b = _harness.Bench("dispatch", args)
    b.graphs = False
    x = b.randn(4, 16, 64, grad=True, dtype=torch.float32)
    ids = torch.stack([torch.randperm(16, generator=b.gen)[:4] for _ in range(4)]).to(b.device)
    cases = [("function", lambda: _Function.apply(x, ids).sum().backward()),
             ("registered", lambda: _gather(x, ids).sum().backward()),
             (_harness.BASELINE, lambda: torch.gather(x, 1, ids[:, :, None].expand(-1, -1, 64)).sum().backward())]
    for name, fn in cases:
        t = b.time(fn)
        b.add("gather_tokens", "N=4 L=16 K=4 D=64", "fwd+bwd", name, t, us=t[1]["median_ms"] * 1e3)
    return b.finish(["impl", "us", "eager_speedup_vs_eager"])


if __name__ == "__main__":
    main()
