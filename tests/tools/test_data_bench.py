"""`mae-fast bench --data DIR`: the loaders' images/s beside the training step's, and which bounds training."""
import json

import numpy as np
import pytest
from PIL import Image

from mae_fast.data import default_workers
from mae_fast.tools import cli

TINY = ["--img-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--no-progress", "--device", "cpu"]


def test_bench_data_on_a_tiny_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (30 + k, 40, 3), dtype=np.uint8)).save(tmp_path / f"{k}.jpg")
    (tmp_path / "broken.jpg").write_text("not an image")
    out = tmp_path / "doc.json"
    assert cli.main(["bench", "--data", str(tmp_path), *TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    loaders = doc["loaders"]
    assert [(r["loader"], r["note"]) for r in loaders] == [("cpu", "default workers"), ("cpu", "a worker per core")]
    assert loaders[0]["workers"] == default_workers() and all(r["images_per_s"] > 0 for r in loaders)
    assert all(r["skipped_files"] == 1 for r in loaders)  # the broken file, replaced
    assert doc["step"]["variant"] == "mae_fast+graph" and doc["step"]["images_per_s"] > 0
    chosen = loaders[0]["images_per_s"]
    assert doc["bound"] == ("loader" if chosen < doc["step"]["images_per_s"] else "step")
    assert "training step (mae_fast+graph)" in text and f"the {'loader' if doc['bound'] == 'loader' else 'training step'} " \
        "bounds training" in text
    assert doc["config"]["num_images"] == 7 and doc["config"]["img_size"] == 32


@pytest.mark.parametrize("argv,msg", [
    (["--data", "/nonexistent/folder"], "mae-fast bench: --data: /nonexistent/folder is not a folder"),
])
def test_bench_data_errors(argv, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv, *TINY])
    assert e.value.code == msg
