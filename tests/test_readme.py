"""Every ```python block of README.md runs as pasted: each in a fresh namespace (a block may not lean on names
from an earlier one), all in one child process (cheap: one torch import), on the CPU at the sizes the README
shows. About 20 s on a 2-core CPU."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = r"""
import json, sys, traceback
sys.path[0] = sys.argv[2]  # imports resolve as in a python started in the repository root ('' first on sys.path)
blocks = json.load(open(sys.argv[1]))
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, f"README.md, the python block at line {line}", "exec"), {"__name__": "__readme__"})
    except Exception:
        traceback.print_exc()
        sys.exit(10 + i)
"""


def python_blocks(text: str):
    """(line number, code) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return out


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks(open(os.path.join(ROOT, "README.md")).read())
    assert len(blocks) >= 5  # the reference, HF, ops, layers and TrainStep examples at least
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(blocks))
    # as a user runs them: pasted into a python started in the repository root (its folder first on sys.path, so
    # the checkout's top-level names meet the installed packages; the files the blocks write go to tmp_path),
    # CUDA hidden, and the ops on the plain torch path CPU tensors take (not through Triton's interpreter, under
    # which make test runs the rest of the suite)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", RUNNER, str(path), ROOT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def test_python_blocks_are_found():
    text = "intro\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n")]
