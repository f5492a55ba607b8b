from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adadiff.cli import main


@pytest.fixture()
def small_png(tmp_path, photo) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray((photo[:24, :32] * 255).astype(np.uint8)).save(path)
    return path


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_upscale_writes_image_report_and_step_map(tmp_path, small_png, capsys):
    before = small_png.read_bytes()
    out = tmp_path / "out.png"
    report = tmp_path / "report.json"
    step_map = tmp_path / "steps.png"
    code, stdout, err = _run(
        [
            "upscale",
            small_png,
            "-o",
            out,
            "--schedule",
            "adaptive",
            "--report",
            report,
            "--step-map",
            step_map,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert Image.open(out).size == (128, 96)
    data = json.loads(report.read_text())
    for key in (
        "schedule",
        "tiles",
        "unet_evaluations",
        "engine_calls",
        "batches",
        "steps_per_tile",
        "exits",
        "seconds",
    ):
        assert key in data
    assert data["schedule"] == "adaptive"
    assert data["unet_evaluations"] == sum(data["steps_per_tile"])
    assert all(set(b) >= {"size", "timesteps"} for b in data["batches"])
    assert set(data["seconds"]) >= {"encode", "denoise", "decode", "total"}
    assert Image.open(step_map).format == "PNG"
    assert "UNet evaluations" in stdout
    assert small_png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.png",
        "out.png",
        "report.json",
        "steps.png",
    ]


def test_without_schedule_the_model_default_runs(tmp_path, small_png, capsys):
    """tiny's adadiff.json names the best of its quality/compute front: 5 uniform steps."""
    from adadiff.models.bundle import load_models

    cfg = load_models("tiny").config
    out, report = tmp_path / "out.png", tmp_path / "r.json"
    code, _, err = _run(["upscale", small_png, "-o", out, "--report", report, "-q"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert (cfg.default_schedule, cfg.uniform_interval) == ("uniform", 200)
    assert data["schedule"] == "uniform"
    assert data["steps_per_tile"] == [5] * data["tiles"]
    # --interval goes with the default when the default is uniform
    code, _, err = _run(
        ["upscale", small_png, "-o", out, "--report", report, "--interval", "100", "-q"], capsys
    )
    assert code == 0, err
    assert json.loads(report.read_text())["steps_per_tile"][0] == 10


def test_uniform_with_options(tmp_path, small_png, capsys):
    out = tmp_path / "out.jpg"
    report = tmp_path / "r.json"
    code, _, err = _run(
        [
            "upscale",
            small_png,
            "-o",
            out,
            "--schedule",
            "uniform",
            "--interval",
            "100",
            "--max-batch",
            "2",
            "--tile",
            "64",
            "--overlap",
            "16",
            "--report",
            report,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["steps_per_tile"] == [10] * data["tiles"]
    assert data["tile_size"] == 64 and data["max_batch"] == 2
    assert max(b["size"] for b in data["batches"]) == 2


def test_rgba_keeps_alpha(tmp_path, photo, capsys):
    src = tmp_path / "a.png"
    rgba = np.dstack([(photo[:16, :16] * 255).astype(np.uint8), np.full((16, 16), 128, np.uint8)])
    Image.fromarray(rgba).save(src)
    out = tmp_path / "o.png"
    code, _, err = _run(
        ["upscale", src, "-o", out, "--schedule", "uniform", "--interval", "250", "-q"], capsys
    )
    assert code == 0, err
    img = Image.open(out)
    assert img.mode == "RGBA" and img.size == (64, 64)
    assert abs(int(np.asarray(img)[..., 3].mean()) - 128) <= 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.png", "does not exist|not found|missing"),
        (lambda d: _write(d / "empty.png", b""), "empty"),
        (lambda d: _write(d / "text.png", b"hello"), "not an image|cannot"),
        (lambda d: d, "folder|directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make, match):
    src = make(tmp_path)
    code, _, err = _run(["upscale", src, "-o", tmp_path / "o.png", "-q"], capsys)
    assert code == 2
    assert err.startswith("adadiff: error:") and err.count("\n") == 1
    import re

    assert re.search(match, err, re.I)
    assert not (tmp_path / "o.png").exists()


def test_output_errors(tmp_path, small_png, capsys):
    code, _, err = _run(["upscale", small_png, "-o", small_png], capsys)
    assert code == 2 and "input" in err
    code, _, err = _run(["upscale", small_png, "-o", tmp_path / "nope" / "o.png"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _run(
        ["upscale", small_png, "-o", tmp_path / "o.png", "--max-pixels", "100"], capsys
    )
    assert code == 2 and "--max-pixels" in err
    code, _, err = _run(
        ["upscale", small_png, "-o", tmp_path / "o.png", "--model", tmp_path], capsys
    )
    assert code == 2 and "adadiff.json" in err
    assert not (tmp_path / "o.png").exists()


def test_console_script_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("adadiff")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "adadiff.cli"]
    proc = subprocess.run(
        [*cmd, "upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("adadiff: error:")


@pytest.mark.parametrize("device", ["gpu", "cuda:one", "cpu:1"])
def test_bad_device_exits_2_before_any_model_loads(
    tmp_path, small_png, capsys, monkeypatch, device
):
    import adadiff.models.bundle as bundle

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before --device was checked")

    monkeypatch.setattr(bundle, "load_models", no_load)
    code, _, err = _run(
        ["upscale", small_png, "-o", tmp_path / "o.png", "--device", device], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--device {device} " in err and "cuda[:N]" in err
    assert not (tmp_path / "o.png").exists()
