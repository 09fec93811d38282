"""The one harness of the per-op benchmarks: flags, timing, result rows, table and JSON.

Each ``bench/bench_<op>.py`` times ``mae_fast.ops.<op>`` beside the reference's eager ops
(``mae_fast.reference``) and ``torch.compile`` of them, with the timing of ``mae-fast bench``
(``mae_fast.timing``). On CUDA every call is timed twice: ``median_ms`` is the device time (the
call captured in a CUDA graph and replayed: these ops take tens of microseconds, less than the host
time of a Python call) and ``eager_ms`` the plain calls (what an uncaptured training loop sees). Bytes
are what an op must read and write once; ``frac_copy`` is bytes / median_ms over the copy bandwidth
measured in the same run (read + write). ``speedup_vs_eager``: the "reference eager" row's time over
this row's, same op, case and direction.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mae_fast import timing
from mae_fast.tools import ceilings, report

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINE = "reference eager"


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every per-op script takes (scripts add their own sizes)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small sizes and short timing (a CPU check)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 (fp32 with --small)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-graphs", action="store_true", help="CUDA: time plain calls only (no graph replay)")
    ap.add_argument("--rep-ms", type=float, default=300.0, help="timed milliseconds per row")
    ap.add_argument("--json", default=None, help="write the results with their provenance to this path")
    return ap


def token_bench(name: str, doc: str, argv=None):
    """(Bench, args, N, L, K) of a token op's script: its flags with the token sizes (N samples of L tokens,
    widths D, the mask ratio; --small shrinks them), K the kept tokens."""
    from mae_fast import reference

    ap = parser(doc)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=196, help="L")
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--ratio", type=float, default=0.75)
    args = parse(ap, argv)
    if args.small:
        args.n, args.tokens, args.dims = min(args.n, 4), min(args.tokens, 64), [64, 40]
    b = Bench(name, args)
    N, L = args.n, args.tokens
    K = reference.num_kept(L, args.ratio)
    b.config.update(N=N, L=L, K=K, dims=args.dims)
    return b, args, N, L, K


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.small:
        args.dtype = args.dtype or "fp32"
        args.rep_ms = min(args.rep_ms, 50.0)
    args.dtype = args.dtype or "bf16"
    args.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    return args


class Bench:
    """Rows of one benchmark run; ``finish`` prints the table and writes the JSON."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[args.dtype]
        self.graphs = self.device.type == "cuda" and not args.no_graphs
        self.copy_bw = ceilings.copy_bandwidth(self.device)
        self.gen = torch.Generator().manual_seed(0)
        self.rows: List[dict] = []
        self.config: Dict = {"dtype": args.dtype, "copy_bandwidth_GBps": self.copy_bw / 1e9,
                             "cpu_threads": torch.get_num_threads(),
                             "timing": "cuda graph replay (device time); eager_ms: plain calls" if self.graphs
                             else "plain calls"}
        # timing a retained backward graph repeatedly needs compiled backwards that keep their saved buffers
        torch._functorch.config.donated_buffer = False

    # -- inputs
    def randn(self, *shape, grad: bool = False, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=dtype or self.dtype)
        return t.requires_grad_(grad)

    def impls(self, fast: Callable, ref: Callable) -> List[tuple]:
        """[("mae_fast", fast), ("reference eager", ref), ("reference compile", compiled ref)]."""
        out = [("mae_fast", fast), (BASELINE, ref)]
        if not self.args.no_compile:
            out.append(("reference compile", torch.compile(ref)))
        return out

    # -- timing
    def _graph_time(self, call: Callable, stream) -> dict:
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            call()
        return timing.time_fn(graph.replay, rep_ms=self.args.rep_ms, device=self.device)

    def time(self, call: Callable, stream=None) -> tuple:
        """(device timing or None, eager timing) of ``call()``."""
        eager = timing.time_fn(call, rep_ms=self.args.rep_ms, device=self.device)
        return (self._graph_time(call, stream) if self.graphs else None), eager

    def add(self, op: str, case: str, direction: str, impl: str, timed: tuple, nbytes: float = 0, **extra) -> dict:
        device_t, eager_t = timed
        t = device_t or eager_t
        row = {"op": op, "case": case, "dir": direction, "impl": impl, "median_ms": t["median_ms"],
               "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"], "eager_ms": eager_t["median_ms"], "bytes": nbytes,
               **extra}
        if nbytes:
            row["GB/s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
            row["frac_copy"] = nbytes / (t["median_ms"] * 1e-3) / self.copy_bw
        self.rows.append(row)
        print(f"  {op} {case} {direction:8s} {impl:18s} {row['median_ms']:.4f} ms (eager {row['eager_ms']:.4f})",
              file=sys.stderr)
        return row

    def forward_backward(self, op: str, case: str, impls: Sequence[tuple], inputs: list, grad_idx: Sequence[int],
                         fwd_bytes: float, bwd_bytes: float) -> None:
        """Rows "fwd" (fn(*inputs) with autograd recording, as in training) and "bwd" (torch.autograd.grad of
        a retained graph with respect to inputs[grad_idx]) for every implementation."""
        grad_wrt = [inputs[i] for i in grad_idx]
        for impl, fn in impls:
            stream = torch.cuda.Stream() if self.graphs else None
            with torch.cuda.stream(stream) if self.graphs else contextlib.nullcontext():
                out = fn(*inputs)
                g = torch.randn_like(out)
                self.add(op, case, "fwd", impl, self.time(lambda: fn(*inputs), stream), fwd_bytes)
                self.add(op, case, "bwd", impl,
                         self.time(lambda: torch.autograd.grad(out, grad_wrt, g, retain_graph=True), stream),
                         bwd_bytes)

    # -- output
    def finish(self, columns: Optional[List[str]] = None) -> dict:
        for r in self.rows:
            base = next((b for b in self.rows if (b["op"], b["case"], b["dir"], b["impl"])
                         == (r["op"], r["case"], r["dir"], BASELINE)), None)
            if base is not None:
                r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
                r["eager_speedup_vs_eager"] = base["eager_ms"] / r["eager_ms"]
        doc = {"benchmark": self.name, "provenance": report.provenance(self.args.argv, self.device),
               "config": self.config, "rows": self.rows}
        if self.args.json:
            report.write_json(self.args.json, doc)
            print(f"results written to {self.args.json}")
        columns = columns or ["op", "case", "dir", "impl", "median_ms", "eager_ms", "GB/s", "frac_copy",
                              "speedup_vs_eager", "eager_speedup_vs_eager"]
        print(f"{self.name} on {doc['provenance']['device']}, {self.args.dtype}; copy bandwidth "
              f"{self.copy_bw / 1e9:.1f} GB/s; {self.config['timing']}; {torch.get_num_threads()} threads")
        print(report.format_table(self.rows, columns))
        return doc
