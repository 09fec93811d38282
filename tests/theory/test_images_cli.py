"""Images (folder and bundled photographs), `mae-fast theory`, and the predictions for the sweep."""
import argparse
import json
import socket

import numpy as np
import pytest
from PIL import Image

from mae_fast.theory import folder_paths, image_matrix, images_second_moment, predicted_scales, sample_paths
from mae_fast.theory.cli import add_theory_parser, run_theory

RESULT_KEYS = {"mask_ratio", "patch_size", "mean_distance", "outside_patch_fraction", "decay_length"}


def _parser():
    parser = argparse.ArgumentParser(prog="mae-fast")
    add_theory_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv):
    args = _parser().parse_args(["theory", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A folder of a few smooth random images of different sizes and modes."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 56), (64, 48), (33, 33), (50, 80)]):
        noise = rng.standard_normal((h // 4 + 1, w // 4 + 1))
        small = Image.fromarray(((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8))
        im = small.resize((w, h), Image.Resampling.BICUBIC)
        (im.convert("RGB") if i % 2 else im).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


@pytest.fixture
def no_network(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://invalid.invalid:1")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_sample_photographs_load_without_network(no_network):
    pytest.importorskip("skimage", reason="the sample photographs ship with scikit-image")
    paths = sample_paths()
    assert len(paths) >= 8
    X = image_matrix(paths, 8, n_samples=64, color=True)
    assert X.shape == (64, 8 * 8 * 3)
    assert 0.0 <= X.min() and X.max() <= 1.0 and X.std() > 0.05  # real content, not blank


def test_folder_second_moment(image_dir):
    assert [p.name for p in folder_paths(image_dir)] == ["img0.jpg", "img1.png", "img2.jpg", "img3.png"]
    S = images_second_moment(image_dir, size=8, n_samples=300, seed=1)
    assert S.shape == (64, 64)
    assert np.allclose(S, S.T) and np.linalg.eigvalsh(S).min() > 0
    S2 = images_second_moment(image_dir, size=8, n_samples=300, seed=1)
    assert np.array_equal(S, S2)  # seeded
    assert images_second_moment(image_dir, size=4, color=True).shape == (48, 48)
    assert image_matrix(folder_paths(image_dir), 4, n_samples=2).shape == (2, 16)  # fewer samples than images


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        images_second_moment(tmp_path, size=8)
    with pytest.raises(ValueError, match="not a directory"):
        images_second_moment(tmp_path / "missing", size=8)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="cannot read .*broken.png"):
        images_second_moment(tmp_path, size=8)


def test_cli_table_json_and_plot(image_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "theory.json", tmp_path / "theory.png"
    rc = _run(["--images", str(image_dir), "--size", "8", "--rank", "4", "--patch-sizes", "2,4",
               "--mask-ratios", "0.5,0.75", "--samples", "400", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "data_mean_distance" in table and "data_outside_patch_fraction" in table and "Bernoulli" in table
    doc = json.loads(out_json.read_text())
    rows = doc["results"]
    assert {(r["mask_ratio"], r["patch_size"]) for r in rows} == {(m, p) for m in (0.0, 0.5, 0.75) for p in (2, 4)}
    for r in rows:
        assert RESULT_KEYS <= set(r)
        for prefix in ("", "data_"):
            assert 0.0 <= r[prefix + "mean_distance"] <= 8 * 2 ** 0.5
            assert 0.0 <= r[prefix + "outside_patch_fraction"] <= 1.0
            assert r[prefix + "decay_length"] is None or 0 < r[prefix + "decay_length"] <= 8
        assert 0.0 <= r["off_data_fraction"] < 1.0
    by = {(r["mask_ratio"], r["patch_size"]): r for r in rows}
    assert by[(0.0, 2)]["mean_distance"] == pytest.approx(by[(0.0, 2)]["baseline_mean_distance"])
    assert by[(0.75, 4)]["mean_distance"] > by[(0.0, 4)]["mean_distance"]
    assert doc["provenance"]["command"] and doc["config"]["center"] is True
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out_png) as im:
        im.verify()
    with Image.open(out_png) as im:
        assert im.width > 300 and im.height > 200


def test_cli_sample_colour(tmp_path, no_network):
    pytest.importorskip("skimage", reason="the sample photographs ship with scikit-image")
    out_json = tmp_path / "t.json"
    assert _run(["--sample", "--color", "--size", "4", "--rank", "3", "--patch-sizes", "2",
                 "--mask-ratios", "0.75", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert len(rows) == 2 and all(RESULT_KEYS <= set(r) for r in rows)


@pytest.mark.parametrize("argv,match", [
    (["--patch-sizes", "3"], "3 does not divide the image size 8"),
    (["--mask-ratios", "0.5,1.0"], r"in \[0, 1\), got 1.0"),
    (["--mask-ratios", "-0.1"], r"in \[0, 1\), got -0.1"),
    (["--rank", "0"], "--rank must be in"),
])
def test_cli_argument_errors(image_dir, argv, match):
    with pytest.raises(SystemExit, match=match):
        _run(["--images", str(image_dir), "--size", "8", *argv])


def test_cli_folder_errors(tmp_path):
    with pytest.raises(SystemExit, match="no image files"):
        _run(["--images", str(tmp_path), "--size", "8"])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(SystemExit, match="cannot read .*bad.jpg"):
        _run(["--images", str(tmp_path), "--size", "8"])


def test_cli_needs_a_source_and_dispatches_to_run_theory():
    with pytest.raises(SystemExit):
        _parser().parse_args(["theory"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["theory", "--sample", "--images", "x"])
    assert _parser().parse_args(["theory", "--sample"]).func is run_theory


def test_predicted_scales_for_the_sweep(image_dir):
    pts = [(0.0, 16), (0.75, 16), (0.75, 32), (0.75, 112), (0.9, 112), (0.5, 4)]
    rows = predicted_scales(pts, images=image_dir, image_size=224, size=14, rank=4, n_samples=400)
    assert [(r["mask_ratio"], r["patch_size"]) for r in rows] == pts
    # 14 x 14 patches at 224 px: round(14 / 14) = 1 px would be pixel-wise masking, so the theory patch is 2 px
    assert [(r["theory_size"], r["theory_patch_size"]) for r in rows[:4]] == [(28, 2), (28, 2), (14, 2), (14, 7)]
    assert [r["kept_patches"] for r in rows] == [196, 49, 12, 1, 0, 1568]
    for r in rows[:4]:
        assert r["flag"] is None and r["mean_distance_px"] > 0 and r["data_mean_distance_px"] > 0
    assert rows[1]["data_mean_distance_frac"] > rows[0]["data_mean_distance_frac"]
    assert rows[2]["mean_distance_px"] == pytest.approx(rows[2]["mean_distance"] * 224 / 14)
    # flagged, not predicted: 2 x 2 patches at m = 0.9 keep int(4 x 0.1) = 0; 56 x 56 patches need 112 px
    assert "keeps no patch" in rows[4]["flag"] and "112 px theory image" in rows[5]["flag"]
    for r in rows[4:]:
        assert r["mean_distance_px"] is None and r["data_mean_distance_px"] is None and r["mean_distance"] is None
    with pytest.raises(ValueError, match="does not divide"):
        predicted_scales([(0.5, 15)], images=image_dir, image_size=224)
    same = predicted_scales([(0.5, 2)], images=image_dir, size=8, rank=4, n_samples=300)
    assert same[0]["theory_size"] == 8 and same[0]["theory_patch_size"] == 2 and same[0]["flag"] is None


def test_cli_findings_table_json_and_plot(image_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "findings.json", tmp_path / "findings.png"
    assert _run(["--images", str(image_dir), "--findings", "--size", "8", "--rank", "4", "--patch-sizes", "2,4",
                 "--mask-ratios", "0.5", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "Theorem 1" in text and "Ising" in text and "1/f^2" in text and "dae_lt_mae" in text
    doc = json.loads(out_json.read_text())
    assert [r["mask_ratio"] for r in doc["optimum"]] == [0.25, 0.75]
    assert all(r["rel_gap"] <= 1e-9 and r["max_angle"] < 1e-3 for r in doc["optimum"])
    assert {r["coupling"] for r in doc["ising"]} == {0.3, 0.6}
    for rows in doc["jacobian"].values():
        assert [(r["model"], r["patch_size"]) for r in rows] == [("AE", None), ("DAE", None), ("MAE", 2), ("MAE", 4)]
    assert doc["config"]["dae_noise"] == 0.5
    with Image.open(out_png) as im:
        assert im.width > 600 and im.height > 200
    with pytest.raises(SystemExit, match="grayscale"):
        _run(["--images", str(image_dir), "--findings", "--color"])
