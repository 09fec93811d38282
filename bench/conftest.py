"""pytest-benchmark set-up for bench/test_microbench.py: sizes per device, one copy-bandwidth measurement,
and a results file in the schema of `mae-fast bench` (provenance + a ``results`` list).

Options: --mae-json PATH (write the results there), --mae-no-compile (skip the torch.compile rows: compiling
takes minutes on a small CPU), --mae-rep-ms MS (timed milliseconds per row, default 200 on CUDA, 50 on CPU).
"""
import sys

import pytest
import torch

from mae_fast import benchutil

_RESULTS = []


def pytest_addoption(parser):
    g = parser.getgroup("mae_fast microbenchmarks")
    g.addoption("--mae-json", default=None, help="write the results (provenance + results list) to this JSON file")
    g.addoption("--mae-no-compile", action="store_true", help="skip the reference+compile rows")
    g.addoption("--mae-rep-ms", type=float, default=None, help="timed milliseconds per row")


class Env:
    """Device, dtype and sizes: the issue's sizes on CUDA (ViT-B/16 at 224 px, batch 256, 75% masking,
    bf16), tiny ones on a CPU (fp32)."""

    def __init__(self, config):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if cuda else torch.float32
        self.N, self.img, self.p, self.C = (256, 224, 16, 3) if cuda else (4, 32, 8, 3)
        self.D, self.Dd = (768, 512) if cuda else (64, 32)
        self.ratio = 0.75
        self.L = (self.img // self.p) ** 2
        self.K = int(self.L * (1 - self.ratio))
        self.compile = not config.getoption("--mae-no-compile")
        self.rep_ms = config.getoption("--mae-rep-ms") or (200.0 if cuda else 50.0)
        self._copy_bw = None

    @property
    def copy_bw(self) -> float:
        if self._copy_bw is None:
            self._copy_bw = benchutil.copy_bandwidth(self.device)
        return self._copy_bw

    def config(self) -> dict:
        return {"N": self.N, "img_size": self.img, "patch_size": self.p, "in_chans": self.C, "D": self.D,
                "decoder_D": self.Dd, "mask_ratio": self.ratio, "L": self.L, "K": self.K,
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "copy_bandwidth_bytes_per_s": self._copy_bw}


@pytest.fixture(scope="session")
def env(request):
    return Env(request.config)


@pytest.fixture(scope="session")
def record():
    return _RESULTS.append


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--mae-json", default=None)
    if not path or not _RESULTS:
        return
    env = Env(session.config)
    doc = benchutil.provenance(["pytest", *sys.argv[1:]], env.device)
    doc["config"] = _RESULTS[0].pop("_config", env.config())
    for r in _RESULTS:
        r.pop("_config", None)
    doc["notes"] = {
        "timing": "benchutil.time_fn: CUDA events (GPU) or perf_counter (CPU), median/p20/p80 after warm-up",
        "bytes": "nominal: every input read once and every output written once (fwd); + grad_out read and the "
                 "input gradients written (fwd+bwd); frac_copy = bytes / time / copy bandwidth",
        "compile": "torch.compile(reference function), default mode",
    }
    doc["results"] = _RESULTS
    benchutil.write_json(path, doc)
