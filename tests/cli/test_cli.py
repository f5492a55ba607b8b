from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
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
    # the map of this run's own tiles, steps and exits over its own output
    from adadiff.stepmap import render_step_map

    want = render_step_map(
        np.asarray(Image.open(out)), data["boxes"], data["steps_per_tile"], data["exits"]
    )
    np.testing.assert_array_equal(np.asarray(Image.open(step_map)), np.asarray(want))
    assert "UNet evaluations" in stdout
    assert small_png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.png",
        "out.png",
        "report.json",
        "steps.png",
    ]


def test_without_schedule_the_model_default_runs(tmp_path, small_png, capsys):
    """Without --schedule the model folder's adadiff.json decides: the shipped tiny's default,
    and a copy of it whose default is another uniform interval."""
    import shutil

    from adadiff.config import ModelConfig
    from adadiff.models.bundle import load_models
    from runtime.schedule import uniform_timesteps

    shipped = load_models("tiny")
    out, report = tmp_path / "out.png", tmp_path / "r.json"
    code, _, err = _run(["upscale", small_png, "-o", out, "--report", report, "-q"], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["schedule"] == shipped.config.default_schedule

    folder = tmp_path / "model"
    shutil.copytree(shipped.source, folder)
    cfg = ModelConfig.load(folder)
    interval = 250 if cfg.uniform_interval != 250 else 100
    replace(cfg, default_schedule="uniform", uniform_interval=interval).save(folder)
    args = ["upscale", small_png, "-o", out, "--model", folder, "--report", report, "-q"]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["schedule"] == "uniform"
    assert data["steps_per_tile"] == [len(uniform_timesteps(999, interval))] * data["tiles"]
    # --interval goes with the default when the default is uniform
    code, _, err = _run([*args, "--interval", "100"], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["steps_per_tile"][0] == len(uniform_timesteps(999, 100))


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


def test_upscale_refuses_a_seed_of_2_to_the_32_before_any_work(tmp_path, small_png, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["upscale", str(small_png), "-o", str(tmp_path / "o.png"), "--seed", str(2**32)])
    assert stop.value.code == 2
    assert "argument --seed: expected a seed below 2**32" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["train", "vae", "--model", "tiny", "--steps", "1"],
        ["export", "--model", "sd21-base", "-o", "OUT"],
        ["convert-sd21", "SRC", "-o", "OUT"],
    ],
)
def test_init_and_training_seeds_torch_cannot_take_are_refused_at_parse(tmp_path, capsys, command):
    # torch.manual_seed overflows past 2**64 ('Overflow when unpacking long long' after the
    # model or the photos had loaded); the seed is bounded as upscale's is
    argv = [str(tmp_path / a) if a in ("OUT", "SRC") else a for a in command]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--seed", str(10**20)])
    assert stop.value.code == 2
    assert "argument --seed: expected a seed below 2**32" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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


def test_a_run_that_cannot_write_one_output_changes_none(tmp_path, small_png, capsys, monkeypatch):
    """The image, report and step map of one run land together or not at all: a full disk at
    the step map left the new image and report beside the old step map."""
    from adadiff import file_upscale

    files = [tmp_path / "out.png", tmp_path / "out.json", tmp_path / "map.png"]
    args = ["upscale", small_png, "-o", files[0], "--report", files[1], "--step-map", files[2]]
    assert _run([*args, "-q", "--seed", "0"], capsys)[0] == 0
    before = [f.read_bytes() for f in files]
    real = file_upscale.step_map_writer

    def full_disk(*a, **kw):
        real(*a, **kw)

        def write(fp):
            fp.write(b"half a step map")
            raise OSError(28, "No space left on device")

        return write

    monkeypatch.setattr(file_upscale, "step_map_writer", full_disk)
    code, _, err = _run([*args, "-q", "--seed", "7"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot write the step map" in err and "No space left on device" in err
    assert "no output file was changed" in err
    assert [f.read_bytes() for f in files] == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_demo_rerun_removes_the_earlier_results_before_it_writes(tmp_path):
    """Stopped after its new input and bicubic, a rerun must not leave the earlier photo's
    upscale beside them."""
    from adadiff import demo

    out = tmp_path / "demo"
    out.mkdir()
    for name in ("upscaled.png", "report.json", "steps.png", "notes.txt"):
        (out / name).write_text("an earlier demo")
    demo.prepare(out, "chelsea", 40)
    assert sorted(p.name for p in out.iterdir()) == ["bicubic.png", "input.png", "notes.txt"]


def test_a_demo_folder_under_the_home_folder_is_made_there(tmp_path, monkeypatch):
    """A quoted "-o ~/demo" made a folder "~" in the working folder, and the image writer,
    which expands "~", then failed to write into the missing $HOME/demo."""
    from adadiff import demo

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert demo.prepare(Path("~/demo"), "chelsea", 40) == home / "demo" / "input.png"
    assert sorted(p.name for p in (home / "demo").iterdir()) == ["bicubic.png", "input.png"]
    assert not (tmp_path / "~").exists()


def test_demo_writes_every_output_and_refuses_bad_arguments(tmp_path, capsys):
    from adadiff import demo

    out = tmp_path / "demo"
    code, stdout, err = _run(["demo", "-o", out, "--size", "40", "-q"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bicubic.png", "input.png", "report.json", "steps.png", "upscaled.png"]
    lr = np.asarray(Image.open(out / "input.png"))
    assert max(lr.shape[:2]) == 40
    for name in ("bicubic.png", "upscaled.png"):
        assert np.asarray(Image.open(out / name)).shape[:2] == (lr.shape[0] * 4, lr.shape[1] * 4)
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"] >= 1 and len(report["steps_per_tile"]) == report["tiles"]
    from adadiff.cli import model_folder

    assert f": {demo.default_photo(model_folder('tiny'))} (" in stdout  # says which photo

    code, _, err = _run(["demo", "-o", tmp_path / "x", "--photo", "nope"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--photo nope" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    code, _, err = _run(["demo", "-o", blocker, "--size", "40"], capsys)
    assert code == 2 and "is a file" in err and err.count("\n") == 1
    assert blocker.read_text() == "keep"
    code, _, err = _run(["demo", "-o", blocker / "sub", "--size", "40"], capsys)
    assert code == 2 and "cannot make the demo's output folder" in err and err.count("\n") == 1
    # an input over --max-pixels is refused before it (and its 4x bicubic) is made
    code, _, err = _run(["demo", "-o", tmp_path / "big", "--size", "5000"], capsys)
    assert code == 2 and "--size 5000 makes a 5000x5000 px input" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "big").exists()
    # nor is a photo enlarged into the "low-resolution" input
    code, _, err = _run(
        ["demo", "-o", tmp_path / "up", "--photo", "chelsea", "--size", "600"], capsys
    )
    assert code == 2 and "above the chelsea photo's own long side (451x300 px)" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "up").exists()


def test_demo_on_an_export_alone_speaks_of_the_exported_model(tmp_path, onnx_dir, capsys):
    """--engines without --model runs the export's model: the demo must not describe tiny's
    training (the export here is of a random-init folder with no training record)."""
    pytest.importorskip("onnxruntime")
    from adadiff.artifacts import ExportManifest

    assert Path(ExportManifest.load(onnx_dir).model).is_absolute()
    out = tmp_path / "demo"
    args = ["demo", "-o", out, "--size", "40", "-q", "--backend", "onnxruntime"]
    code, stdout, err = _run([*args, "--engines", onnx_dir], capsys)
    assert code == 0, err
    assert "whether it saw this photo is unknown" in stdout


def test_every_option_with_a_default_shows_it_in_its_help():
    """argparse formats only options with help text; one without hides its default."""
    import argparse

    from adadiff.cli import build_parser, show_defaults

    hidden, shown = [], 0

    def walk(parser, prefix):
        nonlocal shown
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
            elif (
                action.option_strings
                and action.default not in (None, argparse.SUPPRESS)
                and action.default is not False
            ):
                # the line --help prints for it, as the parser's own formatter writes it
                text = parser._get_formatter()._expand_help(action) if action.help else ""
                if "default" not in text:
                    hidden.append(f"{' '.join(prefix)} {action.option_strings[-1]}: {text!r}")
                shown += 1

    walk(show_defaults(build_parser()), [])  # as run() gives it to every command
    assert hidden == [] and shown > 50


@pytest.mark.parametrize(
    "command",
    [
        ["upscale", "in.png", "-o", "o.png"],
        ["upscale-many", "in", "out"],
        ["demo"],
        ["export", "-o", "x"],
        ["build", "runs/x"],
        ["train", "unet"],
        ["calibrate", "m"],
        ["setup-metrics"],
    ],
    ids=lambda c: c[0],
)
def test_verbose_goes_before_or_after_the_command(command):
    from adadiff.cli import build_parser, verbose_everywhere

    parser = verbose_everywhere(build_parser())
    assert parser.parse_args(["-v", *command]).verbose is True
    assert parser.parse_args([*command, "-v"]).verbose is True
    assert parser.parse_args([*command, "--verbose"]).verbose is True
    assert parser.parse_args(command).verbose is False
    if command[0] in ("upscale", "export", "build"):  # their own -q is still theirs
        args = parser.parse_args([*command, "-q", "-v"])
        assert args.quiet is True and args.verbose is True


def test_verbose_after_the_command_reaches_the_run(tmp_path, small_png, capsys):
    argv = ["upscale", small_png, "-o", tmp_path / "o.png", "-v", "--tile", "130"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "unrecognized arguments" not in err and "--tile 130" in err


def test_a_demo_into_a_read_only_folder_is_one_error(tmp_path, monkeypatch, capsys):
    """On a read-only file system unlinking even an absent file fails (EROFS): the demo said
    so with a traceback."""
    import errno

    out = tmp_path / "demo"
    out.mkdir()

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    code, _, err = _run(["demo", "-o", out, "--size", "40", "-q"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot remove an earlier demo's output (Read-only file system)" in err
    assert not list(out.iterdir())


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("positive", "0", "expected a number >= 1, got 0"),
        ("positive", "2.5", "expected a whole number, got '2.5'"),
        ("non_negative", "-1", "expected a number >= 0, got -1"),
        ("positive_list", "200,,50", "expected numbers separated by commas, got '200,,50'"),
        ("positive_list", "200,0", "expected a number >= 1, got 0"),
        ("noise_seed", "-1", "expected a number >= 0, got -1"),
        ("fraction", "1.01", r"expected a number in \[0, 1\], got 1.01"),
        ("fraction", "-0.01", r"expected a number in \[0, 1\], got -0.01"),
        ("fraction", "half", "expected a number, got 'half'"),
        ("positive_float", "nan", "expected a finite number, got 'nan'"),
        ("positive_float", "inf", "expected a finite number, got 'inf'"),
        ("positive_float", "0", "expected a number > 0, got 0"),
        ("non_negative_float", "-0.5", "expected a number >= 0, got -0.5"),
        ("non_negative_float", "-inf", "expected a finite number"),
    ],
)
def test_argument_types_refuse_with_one_clear_line(kind, text, message):
    import argparse

    from adadiff import argtypes

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        getattr(argtypes, kind)(text)


def test_argument_types_take_the_ends_of_their_ranges():
    from adadiff import argtypes

    assert argtypes.positive("1") == 1 and argtypes.non_negative("0") == 0
    assert argtypes.positive_list(" 200, 100,50") == (200, 100, 50)
    assert argtypes.noise_seed(str(2**32 - 1)) == 2**32 - 1
    assert argtypes.fraction("0") == 0.0 and argtypes.fraction("1") == 1.0
    assert argtypes.positive_float("1e-9") == 1e-9 and argtypes.non_negative_float("0") == 0.0


def test_report_and_step_map_paths_are_checked_before_any_work(tmp_path, small_png, monkeypatch):
    from adadiff.errors import ConfigError, OutputPathError
    from adadiff.file_upscale import FileOutputs, check_outputs

    out = tmp_path / "out.png"

    def check(report=None, step_map=None):
        return check_outputs(small_png, FileOutputs(out, report, step_map))

    with pytest.raises(OutputPathError, match=r"the folder for the report .* does not exist"):
        check(report=tmp_path / "no" / "r.json")
    with pytest.raises(OutputPathError, match=r"the step map path .* is a folder"):
        check(step_map=tmp_path)
    for path in (small_png, out):
        with pytest.raises(ConfigError, match="would overwrite the input or output image"):
            check(report=path)
    with pytest.raises(ConfigError, match=r"the step map must be a \.png file"):
        check(step_map=tmp_path / "map.jpg")
    with pytest.raises(ConfigError, match="the report and the step map need different paths"):
        check(report=tmp_path / "both.png", step_map=tmp_path / "both.png")
    assert check(step_map=tmp_path / "map.PNG").step_map == tmp_path / "map.PNG"

    import adadiff.imageio as imageio

    real = imageio._open_temp

    def refuse_reports(target):
        if target.suffix == ".json":
            raise PermissionError(13, "Permission denied")
        return real(target)

    monkeypatch.setattr(imageio, "_open_temp", refuse_reports)
    with pytest.raises(OutputPathError, match=r"the report .*r\.json: cannot write in"):
        check(report=tmp_path / "r.json")


def test_an_input_too_large_for_the_limit_or_the_format_is_refused_on_reading(tmp_path):
    from adadiff.errors import InputImageError, OutputPathError
    from adadiff.file_upscale import FileOutputs, read_input

    wide = tmp_path / "wide.png"
    Image.new("RGB", (4100, 2)).save(wide)
    with pytest.raises(OutputPathError, match="16400x8 px and WEBP holds at most 16383"):
        read_input(wide, FileOutputs(tmp_path / "o.webp"), None, 4)
    with pytest.raises(InputImageError, match="--max-pixels 8200"):
        read_input(wide, FileOutputs(tmp_path / "o.png"), 8199, 4)
    assert read_input(wide, FileOutputs(tmp_path / "o.png"), None, 4)[1].width == 4100


def test_input_notes_say_only_what_applies(tmp_path):
    from adadiff.file_upscale import input_notes
    from adadiff.imageio import LoadedImage

    rgb = np.zeros((2, 2, 3), np.float32)
    plain = LoadedImage(rgb, None, 8, False, "RGB")
    assert input_notes(plain, tmp_path / "o.jpg") == []
    opaque = replace(plain, alpha=np.ones((2, 2), np.float32))
    assert input_notes(opaque, tmp_path / "o.jpg") == []
    notes = input_notes(
        replace(
            plain,
            alpha=np.array([[1.0, 0.5], [1.0, 1.0]], np.float32),
            frames=3,
            float_scale=255.0,
            exif=b"x" * 70000,
        ),
        tmp_path / "o.jpg",
    )
    assert len(notes) == 4
    assert notes[0].startswith("the input has 3 frames") and "0..255 (black to white)" in notes[1]
    assert "flattened onto white" in notes[2] and "EXIF (68 KB)" in notes[3]


def test_upscale_loaded_writes_what_the_input_was(tmp_path, monkeypatch):
    """What upscale_file writes for a loaded input, checked with a stand-in upscaler: a 16-bit
    gray input asks for 16-bit levels and is written as 16-bit gray with its EXIF and ICC
    profile, the report names the input by its absolute path, and an input with alpha is
    written with it."""
    from types import SimpleNamespace

    from adadiff.errors import ConfigError
    from adadiff.file_upscale import FileOutputs, UpscaleOptions, summary, upscale_loaded
    from adadiff.imageio import LoadedImage, bicubic_upscale

    calls = []

    class Upscaler:
        config = SimpleNamespace(upscale=4)

        def upscale(self, rgb, *, dtype, **kwargs):
            calls.append(dtype)
            up = bicubic_upscale(rgb, 4)
            levels = np.round(up * np.iinfo(dtype).max).astype(dtype)
            report = SimpleNamespace(to_dict=lambda: {"tiles": 1, "steps_per_tile": [3]})
            return levels, report

    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    rgb = np.full((3, 4, 3), 1000 / 65535, np.float32)
    alpha = np.ones((3, 4), np.float32)
    profile = bytes(16) + b"GRAY" + bytes(108)  # a gray ICC profile's header, as far as read
    image = LoadedImage(rgb, None, 16, True, "I;16", icc_profile=profile, exif=exif.tobytes())
    monkeypatch.chdir(tmp_path)
    Image.new("L", (4, 3)).save("in.png")
    out, report = tmp_path / "o.png", tmp_path / "r.json"
    data = upscale_loaded(
        Upscaler(), image, Path("in.png"), FileOutputs(out, report), UpscaleOptions()
    )
    assert calls == [np.uint16]
    with Image.open(out) as written:
        assert written.mode in ("I;16", "I") and np.asarray(written).max() == 1000
        assert written.getexif()[0x010F] == "Camera maker"
        assert written.info["icc_profile"] == profile
    saved = json.loads(report.read_text())
    assert saved == data and saved["bit_depth"] == 16 and saved["alpha"] is False
    assert saved["input"] == str(tmp_path / "in.png")
    times = {"output_size": [16, 12], "unet_evaluations": 3, "engine_calls": 1}
    line = summary({**data, **times, "seconds": {"total": 1.0}})
    assert line.startswith(f"{out}: 16x12, 1 tile, 3 UNet")

    with_alpha = replace(image, alpha=alpha * 0.5, bit_depth=8, grayscale=False)
    upscale_loaded(Upscaler(), with_alpha, Path("in.png"), FileOutputs(out), UpscaleOptions())
    with Image.open(out) as written:
        assert written.mode == "RGBA" and np.asarray(written)[..., 3].max() == 128
    with pytest.raises(ConfigError, match="an interval applies to the uniform schedule only"):
        adaptive = UpscaleOptions(schedule="adaptive", interval=100)
        upscale_loaded(None, image, Path("in.png"), FileOutputs(out), adaptive)


def test_help_shows_a_default_only_where_it_tells_something():
    import argparse

    from adadiff.argtypes import DefaultsFormatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=DefaultsFormatter)
    parser.add_argument("src", nargs="?", default="in.png", help="the input")
    parser.add_argument("--steps", type=int, default=20, help="steps per tile")
    parser.add_argument("--fast", action="store_true", help="skip the checks")
    parser.add_argument("--model", default=None, help="a model folder")
    parser.add_argument("--tile", default=128, help="tile size (default: the model's)")
    text = " ".join(parser.format_help().split())
    assert "steps per tile (default: 20)" in text
    assert "the input (default" not in text and "skip the checks (default" not in text
    assert "a model folder (default" not in text and "the model's) (default" not in text
