"""The tools' tests run the path a CPU user's commands take: no Triton interpreter, so the ops take their
plain torch path and the blocks their stock modules. They test the commands, not the kernels (tests/ops,
tests/nn and tests/models run those under the interpreter), which the interpreter would only slow down."""
import pytest


@pytest.fixture(autouse=True)
def _plain_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
