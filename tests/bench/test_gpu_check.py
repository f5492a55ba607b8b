"""benchmarks/gpu_check.py: the dry run on the CPU, its pure parts, and the README section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    # benchmarks/ is a folder of scripts run from the repository root, not an installed package.
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check, gpu_report, report  # noqa: E402


def test_dry_run_imports_and_plans_on_cpu(tmp_path, capsys):
    real = tmp_path / gpu_check.OUTPUT
    real.write_text(json.dumps({"kind": "gpu_check", "dry_run": False, "parity": {}}))
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    # a dry run never replaces a real run's figures
    assert json.loads(real.read_text())["dry_run"] is False
    data = json.loads((tmp_path / gpu_check.DRY_OUTPUT).read_text())
    assert data["kind"] == "gpu_check" and data["dry_run"] is True
    assert {"parity", "unet_latency", "tiny_e2e"} <= set(data["planned"])
    assert data["plan"]["precisions"] == ["fp32", "fp16", "bf16"]
    assert data["plan"]["unet_batches"] == [1, 4, 8, 16]
    if not gpu_check.installed("tensorrt"):
        assert data["skipped"]["tensorrt"] == "tensorrt is not installed"
    assert "machine" in data


def test_a_dry_run_reaches_the_readme_only_when_asked(tmp_path, capsys):
    from benchmarks.__main__ import main as bench_main

    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    dry = str(tmp_path / gpu_check.DRY_OUTPUT)
    readme = tmp_path / "README.md"
    figures = f"# x\n{gpu_report.START}\nthe H200 figures\n{gpu_report.END}\n"
    readme.write_text(figures)
    # a dry run has no figures: it replaced a real run's in the README
    for main in (report.main, lambda argv: bench_main(["report", *argv])):
        assert main([dry, "--readme", str(readme)]) == 2
        assert readme.read_text() == figures
        assert "--allow-dry-run" in capsys.readouterr().err
    assert report.main([dry, "--readme", str(readme), "--print"]) == 0  # writes nothing
    assert "dry run" in capsys.readouterr().out and readme.read_text() == figures
    assert bench_main(["report", dry, "--readme", str(readme), "--allow-dry-run"]) == 0
    assert "dry run" in readme.read_text() and "H200" not in readme.read_text()


def test_unknown_part_and_no_cuda_exit_2(tmp_path, capsys, monkeypatch):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--parts", "nope"]) == 2
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a CUDA machine
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    # a device torch cannot name is refused in a dry run too
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--device", "gpu"]) == 2
    assert "--device gpu" in capsys.readouterr().err
    # a run of some parts does not replace a folder's figures of others
    (tmp_path / gpu_check.OUTPUT).write_text(json.dumps({"dry_run": False, "tensorrt": {}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "parity"]) == 2
    assert "holds the parts tensorrt" in capsys.readouterr().err


def test_first_divergence_reports_the_distance_from_tau():
    a = [(0, 999, 0.1, 0.1, "growth"), (0, 989, 0.0051, 0.0, "stable"), (1, 999, 0, 0, "stable")]
    b = [(0, 999, 0.1, 0.1, "growth"), (0, 989, 0.0049, 0.0, "growth"), (1, 999, 0, 0, "stable")]
    (d,) = gpu_check.first_divergence(a, b, tau=5e-3)
    assert d["tile"] == 0 and d["t"] == 989 and d["categories"] == ["stable", "growth"]
    assert d["distance_from_tau"] == pytest.approx([1e-4, 1e-4])


def test_gpu_section_renders_every_part(tmp_path):
    result = {
        "kind": "gpu_check",
        "dry_run": False,
        "machine": {"cpu": "cpu", "cores": 16, "gpu": "NVIDIA H200", "libraries": {}},
        "parity": {
            "components": {"fp16": {"unet": {"max_abs": 0.01, "within_tolerance": False}}},
            "end_to_end": {
                "fp16": {
                    "same_steps": False,
                    "steps_gpu": [12],
                    "steps_reference": [13],
                    "psnr_vs_cpu_db": 41.5,
                    "divergences": [
                        {
                            "tile": 0,
                            "t": 500,
                            "categories": ["stable", "growth"],
                            "distance_from_tau": [2e-5, 3e-5],
                        }
                    ],
                }
            },
            "peak_mib": 100.0,
        },
        "unet_latency": {
            "rows": [
                {
                    "precision": "bf16",
                    "batch": 16,
                    "ms": 80.0,
                    "ms_per_tile": 5.0,
                    "tflops": 350.2,
                    "peak_mib": 9000.0,
                }
            ]
        },
        "tiny_e2e": {
            "regroup": {"seconds": 1.0, "engine_calls": 10, "unet_evaluations": 40, "tiles": 4},
            "tile": {"seconds": 3.0, "engine_calls": 40, "unet_evaluations": 40, "tiles": 4},
            "speedup": 3.0,
            "peak_mib": 50.0,
        },
        "shipped_photo": {
            "photo": "coffee, 128 px",
            "cpu_threads": 16,
            "rows": [
                {
                    "device": "cpu",
                    "precision": "fp32",
                    "schedule": "uniform",
                    "tiles": 25,
                    "seconds_per_tile": 0.05,
                    "unet_evaluations": 125,
                    "peak_mib": None,
                },
                {
                    "device": "gpu",
                    "precision": "fp16",
                    "schedule": "uniform",
                    "tiles": 25,
                    "seconds_per_tile": 0.002,
                    "unet_evaluations": 125,
                    "peak_mib": 300.5,
                    "psnr_vs_cpu_db": 48.1,
                    "same_steps": True,
                },
            ],
        },
        "tensorrt": {"skipped": "tensorrt is not installed"},
        "onnxruntime": {"error": "RuntimeError: boom"},
    }
    text = gpu_report.render(result, tmp_path / "g.json", tmp_path / "README.md")
    assert "| fp16 | 1.00e-02* |" in text
    assert "tile 0 at t=500 took growth instead of stable, gains 2.0e-05 from a threshold" in text
    assert "| bf16 | 16 | 80.0 | 5.0 | 350.2 | 9000.0 |" in text
    assert "(3.0x)" in text and "tensorrt: skipped" in text
    assert "| cpu | fp32 | uniform | 0.0500 | 125 | reference |  |  |" in text
    assert "| gpu | fp16 | uniform | 0.0020 | 125 | 48.1 | yes | 300.5 |" in text
    assert "Parts that failed in this run: onnxruntime" in text
    assert "by `python -m benchmarks report g.json`;" in text  # README.md: the default
    other = gpu_report.render(result, tmp_path / "g.json", tmp_path / "GPU.md")
    assert "by `python -m benchmarks report g.json --readme GPU.md`;" in other


@pytest.mark.slow
def test_parity_and_tiny_parts_run_on_the_cpu():
    """The parts' code (not their figures) on the CPU, so a GPU run does not meet a typo.
    Several tiny upscales: kept out of CI (pytest -m slow) for the time it takes."""
    plan = gpu_check.Plan(device="cpu", precisions=("fp32",), photo_size=24, e2e_max_batch=4)
    parity = gpu_check.part_parity(plan)
    rows = parity["components"]["fp32"]
    assert set(rows) == {"unet", "vae_encoder", "vae_decoder", "pfj", "mmle"}
    assert all(r["within_tolerance"] for r in rows.values())
    e2e = parity["end_to_end"]["fp32"]
    assert e2e["same_steps"] and e2e["divergences"] == [] and parity["peak_mib"] is None
    tiny = gpu_check.part_tiny_e2e(plan)
    assert tiny["regroup"]["unet_evaluations"] == tiny["tile"]["unet_evaluations"] > 0
    assert tiny["regroup"]["engine_calls"] <= tiny["tile"]["engine_calls"]
    small = gpu_check.Plan(device="cpu", precisions=("fp32",), shipped_size=32)
    shipped = gpu_check.part_shipped_photo(small)
    ref, again = shipped["rows"][0], shipped["rows"][2]  # default schedule: cpu, then "gpu"
    assert ref["schedule"] == again["schedule"] and "psnr_vs_cpu_db" not in ref
    assert again["same_steps"] and again["psnr_vs_cpu_db"] == 120.0


def test_an_out_that_cannot_be_a_folder_is_refused_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert gpu_check.main(["--out", str(out), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and len(err.splitlines()) == 1
    assert a_file.read_text() == "x"


def test_device_must_be_a_cuda_device_this_machine_has(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ran: list[str] = []
    monkeypatch.setattr(gpu_check, "run", lambda plan, out, dry_run: ran.append(plan.device) or {})
    # the CPU is the reference, not the device under check: its figures would read as the GPU's
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--dry-run"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cuda:1"]) == 2
    assert "torch sees 1 CUDA device(s)" in capsys.readouterr().err
    assert ran == []
    # the plan holds the parsed name: " cuda:0" was no GPU to the parts (no sync, no peak memory)
    assert gpu_check.main(["--out", str(tmp_path), "--device", " cuda:0"]) == 0
    assert ran == ["cuda:0"] and gpu_check._on_gpu(ran[0])


def test_a_missing_scikit_image_is_refused_before_the_parts_that_need_it(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if not installed
    out = tmp_path / "out"
    # the dry run promises what a real run can do; parity, tiny_e2e and shipped_photo need photos
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 2
    assert "scikit-image" in capsys.readouterr().err and not out.exists()
    assert gpu_check.main(["--out", str(out), "--dry-run", "--parts", "unet_latency"]) == 0


def test_the_machine_line_names_the_gpu_under_check(tmp_path, monkeypatch):
    import torch

    names = ["NVIDIA H200", "NVIDIA T4"]  # a machine with two different GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: names[index])
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--device", "cuda:1"]) == 0
    data = json.loads((tmp_path / gpu_check.DRY_OUTPUT).read_text())
    assert data["machine"]["gpu"] == "NVIDIA T4"


@pytest.mark.parametrize("parts", ["", ","])
def test_parts_that_name_no_part_are_refused(tmp_path, capsys, parts):
    # "" ran every part and "," none, and wrote a gpu_check.json either way
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--dry-run", "--parts", parts]) == 2
    assert "names no part" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_missing_diffusers_is_refused_not_planned(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    out = tmp_path / "out"
    # every part builds its models with diffusers, tiny's included: only unet_latency was skipped
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 2
    assert "diffusers" in capsys.readouterr().err and not out.exists()


def test_a_run_with_a_failed_part_leaves_the_folders_figures_alone(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a broken GPU, on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA Broken")

    def broken(plan: gpu_check.Plan) -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_check.PARTS, "parity", broken)
    good = {"kind": "gpu_check", "dry_run": False, "parity": {"components": {}}}
    real = tmp_path / gpu_check.OUTPUT
    real.write_text(json.dumps(good))
    # the rerun of the part the folder holds failed: its figures were replaced by the error
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "parity"]) == 1
    assert json.loads(real.read_text()) == good
    failed = json.loads((tmp_path / gpu_check.FAILED_OUTPUT).read_text())
    assert "illegal memory access" in failed["parity"]["error"]
    err = capsys.readouterr().err
    assert f"the run is in {tmp_path / gpu_check.FAILED_OUTPUT}" in err
    assert f"{real} was left as it was" in err
    # a run that passes replaces the figures and clears the failed run's file
    monkeypatch.setitem(gpu_check.PARTS, "parity", lambda plan: {"components": {"fp32": {}}})
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "parity"]) == 0
    assert json.loads(real.read_text())["parity"] == {"components": {"fp32": {}}}
    assert not (tmp_path / gpu_check.FAILED_OUTPUT).exists()


def test_a_part_skipped_here_does_not_replace_its_figures_from_another_machine(
    tmp_path, capsys, monkeypatch
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    installed = gpu_check.installed
    monkeypatch.setattr(gpu_check, "installed", lambda name: name != "tensorrt" and installed(name))
    ran: list[str] = []
    monkeypatch.setattr(gpu_check, "run", lambda plan, out, dry_run: ran.append("run") or {})
    real = tmp_path / gpu_check.OUTPUT
    # TensorRT parity from a machine that has it; this one has not, and wrote "skipped" over it
    figures = {"components": {"unet": {"max_abs": 1e-5, "within_10x_fp32_tolerance": True}}}
    real.write_text(json.dumps({"kind": "gpu_check", "dry_run": False, "tensorrt": figures}))
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "tensorrt"]) == 2
    assert "holds the parts tensorrt (tensorrt is not installed)" in capsys.readouterr().err
    assert ran == [] and json.loads(real.read_text())["tensorrt"] == figures
    # a part that was skipped there too loses nothing
    skipped = {"skipped": "tensorrt is not installed"}
    real.write_text(json.dumps({"kind": "gpu_check", "dry_run": False, "tensorrt": skipped}))
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "tensorrt"]) == 0
    assert ran == ["run"]


def test_onnxruntime_without_its_cuda_provider_is_skipped_before_the_run(
    tmp_path, capsys, monkeypatch
):
    ort = pytest.importorskip("onnxruntime")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    # the CPU-only package: the part said "skipped" after the run, over the folder's figures
    real = tmp_path / gpu_check.OUTPUT
    figures = {"components": {"unet": {"max_abs": 1e-5, "within_10x_fp32_tolerance": True}}}
    real.write_text(json.dumps({"kind": "gpu_check", "dry_run": False, "onnxruntime": figures}))
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "onnxruntime"]) == 2
    assert "onnxruntime (onnxruntime" in capsys.readouterr().err
    assert json.loads(real.read_text())["onnxruntime"] == figures
    assert gpu_check.main(["--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    dry = json.loads((tmp_path / "dry" / gpu_check.DRY_OUTPUT).read_text())
    assert "has no CUDA provider" in dry["skipped"]["onnxruntime"]
    assert "onnxruntime" not in dry["planned"]
