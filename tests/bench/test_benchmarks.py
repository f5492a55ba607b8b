"""Smoke test of the benchmark machinery on a minimal configuration (torch only, one photo).

The model is tiny with very long DTSS jumps, so every schedule runs a handful of UNet calls.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adadiff.config import DTSSConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    # benchmarks/ is a folder of scripts run from the repository root, not an installed package.
    sys.path.insert(0, str(ROOT))


def smoke_suite():
    from benchmarks.suites import ScheduleSpec, Suite

    return Suite(
        name="smoke",
        sections=("schedules", "regrouping", "backends", "scaling"),
        repeats=1,
        photos=("astronaut",),
        photo_size=32,
        schedules=(
            ScheduleSpec(label="adaptive", schedule="adaptive"),
            ScheduleSpec(label="uniform-4", schedule="uniform", interval=250),
            ScheduleSpec(label="uniform-10", schedule="uniform", interval=100),
        ),
        reference="uniform-10",
        regroup_photo="astronaut",
        regroup_size=40,  # 4 tiles, so the three groupings make different calls
        batches=(1, 2),
        scaling_sizes=(16,),
        scaling_interval=250,
        fullsize_size=32,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_models):
    pytest.importorskip("matplotlib")
    pytest.importorskip("skimage")
    import torch

    from benchmarks.__main__ import run_suite
    from benchmarks.suites import Settings

    folder = tmp_path_factory.mktemp("fast-tiny")
    config = replace(tiny_models.config, dtss=DTSSConfig(tiers=(100, 200, 250, 250)))
    replace(tiny_models, config=config).save(folder)
    suite = smoke_suite()
    # One thread: the test stays fast even while other jobs load the cores.
    settings = Settings(backends=("torch",), model=str(folder), max_batch=16, threads=1)
    out = tmp_path_factory.mktemp("bench-out")
    threads = torch.get_num_threads()
    try:
        result = run_suite(suite, settings, out)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_results_json_has_every_section_and_the_machine(smoke_run):
    out, _ = smoke_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["suite"] == "smoke"
    for key in ("settings", "machine", "summary", "schedules", "regrouping", "backends", "scaling"):
        assert key in saved, key
    for section in ("schedules", "regrouping", "backends", "scaling"):
        assert "error" not in saved[section], saved[section].get("traceback")
    m = saved["machine"]
    assert m["cores"] >= 1 and m["cpu"] and "torch" in m["libraries"]
    assert saved["settings"]["backends"] == ["torch"]
    row = saved["scaling"]["rows"][0]
    assert row["tiles"] == 1 and row["memory"]["peak_rss_mb"] > 0


def test_ratios_are_computed_from_the_recorded_rows(smoke_run):
    _, result = smoke_run
    sched = result["schedules"]
    rows = sched["rows"]

    def total(label: str, get) -> float:
        return sum(get(r) for r in rows if r["label"] == label)

    summary = result["summary"]["schedules"]
    assert summary["reference"] == "uniform-10"
    for key, get in (
        ("unet_evaluations", lambda r: r["unet_evaluations"]),
        ("flops", lambda r: r["flops"]["total"]),
        ("seconds", lambda r: r["seconds"]["median"]),
    ):
        want = total("adaptive", get) / total("uniform-10", get)
        assert summary["adaptive"][key] == pytest.approx(want, abs=1e-3), key
    # FLOPs are the per-call counts times the recorded calls.
    per_tile = sched["flops_per_tile"]
    for r in rows:
        assert r["flops"]["unet"] == r["unet_evaluations"] * per_tile["unet"]
    uniform = next(r for r in rows if r["label"] == "uniform-4")
    assert uniform["unet_evaluations"] == 4 * uniform["tiles"]
    assert uniform["quality_vs_reference"]["ssim"] <= 1.0

    reg = {r["grouping"]: r for r in result["regrouping"]["rows"]}
    assert reg["tile"]["mean_batch"] == 1.0
    assert reg["regroup"]["engine_calls"] < reg["tile"]["engine_calls"]
    assert reg["tile"]["max_abs_difference_to_regroup"] < 1e-4  # float sums differ by batch
    tile_over_regroup = reg["tile"]["seconds"]["median"] / reg["regroup"]["seconds"]["median"]
    assert result["summary"]["regrouping"]["tile/regroup"] == pytest.approx(
        tile_over_regroup, abs=1e-3
    )

    run = result["backends"]["variants"]["torch"]["upscale"]["runs"][0]
    assert run["host_share"] == pytest.approx(1 - run["engine_seconds"] / run["wall"], abs=1e-3)
    assert result["summary"]["host_share"]["torch"] == pytest.approx(run["host_share"])
    lat = result["backends"]["variants"]["torch"]["latency"]
    assert set(lat) == {"unet", "mmle", "pfj", "vae_encoder", "vae_decoder"}
    assert set(lat["unet"]) == {"1", "2"}


def test_plots_are_png(smoke_run):
    out, result = smoke_run
    assert set(result["plots"]) == {
        f"{s}.png" for s in ("schedules", "regrouping", "backends", "scaling")
    }
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_readme_section_replaces_only_the_marked_block(smoke_run, tmp_path):
    from benchmarks import report

    out, _ = smoke_run
    readme = tmp_path / "README.md"
    before = "# title\n\n## Performance\n\n"
    after = "\n\n## Next section\n\nkept as is\n"
    readme.write_text(f"{before}{report.START}\nold text\n{report.END}{after}")
    assert report.main([str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before + report.START + "\n")
    assert text.endswith(report.END + after)
    assert "old text" not in text
    body = text[text.index(report.START) : text.index(report.END)]
    assert "adaptive / uniform-10" in body and "cores" in body and "schedules.png" in body

    unmarked = tmp_path / "PLAIN.md"
    unmarked.write_text("# no markers\n")
    assert report.main([str(out / "results.json"), "--readme", str(unmarked)]) == 2
    assert unmarked.read_text() == "# no markers\n"
    with pytest.raises(report.MarkerError, match="before"):
        report.replace_section(f"{report.END}\n{report.START}\n", "x")


def test_a_readme_takes_the_section_only_between_one_pair_of_markers(tmp_path):
    from adadiff.errors import ConfigError
    from benchmarks import report

    start, end = report.START, report.END
    assert report.replace_section(f"a\n{start}\nold\n{end}\nb\n", "new\n") == (
        f"a\n{start}\nnew\n{end}\nb\n"
    )
    with pytest.raises(report.MarkerError, match="found 2 and 1"):
        report.replace_section(f"{start}\n{start}\n{end}\n", "x")
    unmarked = tmp_path / "README.md"
    unmarked.write_text("# no markers\n")
    with pytest.raises(report.MarkerError, match="found 0 and 0"):
        report.check_readme(unmarked)
    saved = tmp_path / "other.json"
    saved.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a saved run"):
        report.read_saved(saved, "results.json")
    saved.write_text("{}")
    with pytest.raises(ConfigError, match="it has no suite, settings"):
        report.read_saved(saved, "results.json", ("suite", "settings"))


def test_the_headline_writes_shares_as_percentages():
    from benchmarks import report

    rows = report._headline({"host_share": {"torch": 0.25, "onnxruntime": None}})
    assert "| host overhead share of an adaptive upscale (torch) | 25% |" in rows
    assert "| host overhead share of an adaptive upscale (onnxruntime) | n/a |" in rows


def test_fit_and_user_errors(suite_main, monkeypatch, capsys):
    from benchmarks.scaling import fit

    rows = [
        {"tiles": 10, "seconds": {"median": 1.0}},
        {"tiles": 40, "seconds": {"median": 4.0}},
    ]
    result = fit(rows)
    assert result["loglog_slope"] == pytest.approx(1.0)
    assert result["per_tile_growth"] == pytest.approx(1.0)
    assert np.isclose(result["seconds_per_tile"][0], 0.1)
    assert suite_main.main(["quick", "--backend", "torch,nope"]) == 2
    assert "--backend torch,nope: choose some of torch" in capsys.readouterr().err
    assert suite_main.main(["quick", "--precision", "fp16"]) == 2
    assert "fp16 runs on CUDA only" in capsys.readouterr().err
    import torch

    # a GPU this machine lacks is refused before any run (none here, also on a CUDA machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert suite_main.main(["quick", "--device", "cuda", "--out", "/nonexistent/x"]) == 2
    assert "error: --device cuda: " in capsys.readouterr().err


def test_the_suite_checks_the_device_of_its_first_backend_only(monkeypatch, tmp_path):
    """A later backend without the GPU fails as its own variant; it must not stop the rest."""
    import benchmarks.__main__ as suite_main

    checked = []

    def ran(*_args, **_kw):
        return {"summary": {}, "failed": [], "plots": [], "seconds": {"total": 0.0}}

    monkeypatch.setattr(suite_main, "check_device", lambda *a: checked.append(a))
    monkeypatch.setattr(suite_main, "run_suite", ran)
    args = ["quick", "--device", "cuda", "--backend", "torch,onnxruntime", "--out", str(tmp_path)]
    assert suite_main.main(args) == 0
    assert checked == [("torch", "cuda")]
    # a --model that cannot load is refused before any section runs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "adadiff.json").write_text("{}")
    assert suite_main.main(["quick", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_result_paths_are_relative_in_the_section(smoke_run, tmp_path):
    from benchmarks.report import render

    out, result = smoke_run
    readme = Path(tmp_path) / "README.md"
    text = render(result, out / "results.json", readme)
    assert str(out) not in text  # the JSON's folder, not the README's
    rel = os.path.relpath(out / "results.json", readme.parent)
    assert f"({rel})" in text


def test_a_failed_run_leaves_the_folder_results_as_they_were(smoke_run, tmp_path, monkeypatch):
    from benchmarks import schedules
    from benchmarks.__main__ import FAILED_RESULTS, failed_sections, run_suite
    from benchmarks.suites import Settings

    out, result = smoke_run
    folder = tmp_path / "ref"
    shutil.copytree(out, folder)
    before = (folder / "results.json").read_bytes()

    def broken(_ctx):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(schedules, "run", broken)
    suite = replace(smoke_suite(), sections=("schedules",))
    model = result["settings"]["model"]
    failed = run_suite(suite, Settings(backends=("torch",), model=model, threads=1), folder)
    assert failed["failed"] == ["schedules"]
    assert (folder / "results.json").read_bytes() == before
    assert json.loads((folder / FAILED_RESULTS).read_text())["failed"] == ["schedules"]
    # a backends section whose every variant failed has failed too
    variants = {"variants": {"torch": {"error": "x"}, "onnxruntime": {"error": "y"}}}
    assert failed_sections({"backends": variants}, ("backends",)) == ["backends"]
    variants["variants"]["torch"] = {"latency": {}}
    assert failed_sections({"backends": variants}, ("backends",)) == []


def test_a_section_whose_every_part_failed_has_failed(smoke_run, tmp_path, monkeypatch):
    from benchmarks import scaling
    from benchmarks.__main__ import FAILED_RESULTS, failed_sections, run_suite
    from benchmarks.suites import Settings

    out, result = smoke_run
    folder = tmp_path / "ref"
    shutil.copytree(out, folder)
    before = (folder / "results.json").read_bytes()

    def killed(_ctx, **job):  # what run_isolated raises when its child is killed
        raise RuntimeError(f"size {job['size']} failed (exit -9): Killed")

    monkeypatch.setattr(scaling, "run_isolated", killed)
    suite = replace(smoke_suite(), sections=("scaling",))
    model = result["settings"]["model"]
    # every size's error was recorded in its row, the section passed and replaced the figures
    failed = run_suite(suite, Settings(backends=("torch",), model=model, threads=1), folder)
    assert failed["failed"] == ["scaling"]
    assert (folder / "results.json").read_bytes() == before
    assert (folder / FAILED_RESULTS).is_file()
    ok, error = {"size": 16, "tiles": 1}, {"size": 32, "error": "Killed"}
    assert failed_sections({"scaling": {"rows": [ok, error]}}, ("scaling",)) == []
    both = {"unet_latency": {"error": "x"}, "adaptive": {"error": "y"}}
    assert failed_sections({"fullsize": both}, ("fullsize",)) == ["fullsize"]
    both["adaptive"] = {"tiles": 4}
    assert failed_sections({"fullsize": both}, ("fullsize",)) == []


def test_the_suite_records_the_name_of_the_gpu_it_ran_on(tmp_path, monkeypatch):
    import benchmarks.__main__ as suite_main
    from benchmarks import machine as machine_module
    from benchmarks import schedules
    from benchmarks.suites import Settings

    class NoModels:
        variants = ()

        def close(self) -> None:
            pass

    asked = []

    def machine(device: str = "cuda:0") -> dict:
        asked.append(device)
        return {"gpu": f"the GPU of {device}"}

    monkeypatch.setattr(suite_main.Context, "create", lambda *_a, **_k: NoModels())
    monkeypatch.setattr(machine_module, "machine", machine)
    monkeypatch.setattr(machine_module, "weights_of", lambda _model: None)
    monkeypatch.setattr(schedules, "run", lambda _ctx: {})
    suite = replace(smoke_suite(), sections=("schedules",))
    settings = Settings(device="cuda:1", backends=("torch",), threads=1)
    result = suite_main.run_suite(suite, settings, tmp_path)
    assert asked == ["cuda:1"] and result["machine"]["gpu"] == "the GPU of cuda:1"


def test_scaleout_folder_and_readme_block(tmp_path):
    from benchmarks.scaleout import SIZES, make_folder, write_readme

    sizes = make_folder(tmp_path / "in", 5)
    files = sorted((tmp_path / "in").iterdir())
    assert len(files) == 5 and sizes[:4] == [(w, h) for h, w in SIZES]
    from PIL import Image

    with Image.open(files[3]) as img:
        assert img.size == sizes[3]
    run = {
        "workers": 1,
        "cross_image": True,
        "images_per_hour_steady": 100.0,
        "images_per_hour_whole_job": 80.0,
        "startup_seconds": 3.0,
        "mean_batch": 4.5,
        "unet_calls": 10,
    }
    data = {
        "command": "python -m benchmarks.scaleout",
        "machine": {"cpu": "x", "cores": 2},
        "input_sizes": sizes,
        "runs": [run, {**run, "cross_image": False, "mean_batch": 1.5}],
        "summary": {
            "cross_vs_image_by_image_mean_batch": 3.0,
            "cross_vs_image_by_image_throughput": 1.25,
            "speedup_by_workers": {"1": 1.0},
        },
    }
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- scaleout:start -->\nOLD-BODY\n<!-- scaleout:end -->\nb\n")
    write_readme(data, tmp_path / "r.json", readme)
    text = readme.read_text()
    assert "OLD-BODY" not in text and text.startswith("a\n") and text.endswith("b\n")
    assert "| 1 | image by image | 100 | 80 | 3.0 | 1.50 | 10 |" in text
    assert "3.00x the mean batch, 1.25x the throughput" in text
    assert "one CPU and one torch thread per worker" in text and "(r.json)" in text
    # the text follows the run's settings, and links the JSON from the README's folder
    write_readme({**data, "cpus_per_worker": 2.0, "model": "mine"}, tmp_path / "r.json", readme)
    text = readme.read_text()
    assert "2 CPUs and 2 torch threads per worker" in text and "`mine` model" in text


def test_scaleout_starts_a_ray_of_its_own(tmp_path, monkeypatch):
    """Plain ray.init() joined the cluster of the last `ray start` on the machine, and waited
    minutes on one that was gone: the benchmark measures a local instance of its own."""
    import types

    from benchmarks import scaleout

    asked: list[dict] = []

    class Started(Exception):
        pass

    def init(**kwargs) -> None:
        asked.append(kwargs)
        raise Started

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(init=init))
    monkeypatch.setattr(sys, "argv", ["scaleout", "--out", str(tmp_path / "s.json")])
    with pytest.raises(Started):
        scaleout.main()
    assert asked and asked[0].get("address") == "local"


def test_memory_and_load_runs_render_from_their_json(smoke_run, tmp_path):
    from benchmarks.report import render

    out, result = smoke_run
    machine = result["machine"]
    row = {
        "size": 2048,
        "input_size": [2048, 2048],
        "output_size": [8192, 8192],
        "tiles": 5329,
        "seconds": {"median": 612.5},
        "seconds_per_tile": 0.115,
        "memory": {"peak_rss_mb": 2345.6},
    }
    memory = {
        "argv": ["quick", "--sections", "scaling"],
        "machine": machine,
        "scaling": {
            "schedule": "uniform, interval 200",
            "rows": [row, {"size": 4096, "error": "x"}],
        },
    }
    load = {
        "argv": ["benchmarks", "load", "--repeats", "1"],
        "machine": machine,
        "idle_upscale_s": 10.0,
        "loaded_upscale_s": 21.0,
        "busy_processes": 2,
        "ratio": 2.1,
        "target_ratio": 2.5,
        "loadavg_before": [0.5, 0.4, 0.3],
    }
    readme = Path(tmp_path) / "README.md"
    text = render(
        result,
        out / "results.json",
        readme,
        memory=(memory, tmp_path / "m.json"),
        load=(load, tmp_path / "l.json"),
    )
    assert "| 2048x2048 | 8192x8192 | 5329 | 612.5 | 0.115 | 2346 |" in text
    assert "| 4096 | failed |" in text
    assert "10.0 s alone and 21.0 s with 2 busy processes" in text and "2.10x" in text
    assert "(m.json)" in text and "(l.json)" in text
    # the command it names regenerates this section, extra runs included
    assert "--memory m.json --load l.json`; do not edit by hand" in text
    # "one per CPU" only when the busy processes were one per core
    one = {**load, "busy_processes": 1, "machine": {**load.get("machine", {}), "cores": 2}}
    text = render(result, out / "results.json", readme, load=(one, tmp_path / "l.json"))
    assert "with 1 busy process spinning, " in text


def test_report_refuses_a_json_it_does_not_render(tmp_path, capsys):
    from benchmarks.report import main

    front = tmp_path / "front.json"
    front.write_text(json.dumps({"methods": {}}))
    assert main([str(front), "--print"]) == 2
    assert "benchmarks.front --render" in capsys.readouterr().err
    listed = tmp_path / "list.json"  # JSON, but not an object
    listed.write_text("[1]")
    assert main([str(listed), "--print"]) == 2
    assert "is not a suite's results.json" in capsys.readouterr().err


def test_scaling_plot_shows_both_gpu_memory_figures(tmp_path, monkeypatch):
    """A GPU run's rows carry torch's allocator peak and the device's own use; both are drawn."""
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    drawn: list[str] = []
    real = plots._save

    def keep_labels(fig, path):
        drawn.extend(line.get_label() for ax in fig.axes for line in ax.get_lines())
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep_labels)
    rows = [
        {
            "size": s,
            "tiles": t,
            "seconds": {"median": 0.1 * t},
            "memory": {
                "peak_rss_mb": 900.0 + t,
                "cuda_peak_allocated_mb": 300.0 + t,
                "cuda_device_used_after_mb": 2000.0 + t,
            },
        }
        for s, t in ((256, 4), (512, 16))
    ]
    data = {"rows": rows, "schedule": "uniform"}
    assert plots.scaling(data, tmp_path / "scaling.png", "test")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == PNG_MAGIC
    assert {"CUDA peak, torch allocator", "CUDA device used after (all allocations)"} <= set(drawn)


def test_cuda_timing_waits_on_and_records_on_the_device_it_was_given(monkeypatch):
    """No GPU here: torch.cuda stands in, so what is checked is which device the calls name."""
    import contextlib

    import torch

    from benchmarks import timing

    seen: dict[str, list] = {"sync": [], "device": []}

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.at = 0.0

        def record(self) -> None:
            seen["device"].append(entered[-1] if entered else None)

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other) -> float:
            return 2.0

    entered: list = []

    @contextlib.contextmanager
    def device(dev):
        entered.append(str(dev))
        yield
        entered.pop()

    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: seen["sync"].append(dev))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    result, value = timing.measure(lambda: 7, repeats=2, warmup=1, device="cuda:1")
    assert value == 7 and result.seconds == [0.002, 0.002]
    assert seen["sync"] == ["cuda:1"] and seen["device"] == ["cuda:1"] * 4


def test_the_load_benchmark_compares_medians_of_idle_and_busy_runs(monkeypatch):
    """benchmarks.load: the median upscale time with the cores kept busy over the median idle
    one, against the 2.5x target, and the busy processes live only around the loaded runs."""
    from benchmarks import load

    busy = {"on": False}
    times = {False: iter([9.0, 2.2, 1.8, 2.0]), True: iter([5.0, 7.0, 6.0])}  # warm-up first

    class FakeSpinners:
        def __init__(self, count):
            assert count == 2

        def __enter__(self):
            busy["on"] = True

        def __exit__(self, *exc):
            busy["on"] = False

    def fake_demo(work, extra):
        assert extra == ["--size", "64"]
        return {"upscale_s": next(times[busy["on"]]), "command_s": 0.0}

    monkeypatch.setattr(load, "Spinners", FakeSpinners)
    monkeypatch.setattr(load, "run_demo", fake_demo)
    result = load.measure(3, 2, ["--size", "64"])
    assert (result["idle_upscale_s"], result["loaded_upscale_s"]) == (2.0, 6.0)
    assert result["ratio"] == 3.0 and result["meets_target"] is False
    assert len(result["runs"]["idle"]) == len(result["runs"]["loaded"]) == 3


def test_the_load_benchmark_refuses_an_unwritable_out_before_any_run(tmp_path, monkeypatch):
    from benchmarks import load

    def no_runs(*_args):
        raise AssertionError("the runs started before --out was checked")

    monkeypatch.setattr(load, "measure", no_runs)
    plain = tmp_path / "a-file"
    plain.write_text("")
    for out in (plain / "load.json", tmp_path):
        with pytest.raises(SystemExit) as stop:
            load.main(["--out", str(out), "--repeats", "1"])
        assert stop.value.code == 2


def test_adadiff_bench_becomes_the_benchmark_process(monkeypatch):
    """On POSIX ``adadiff bench`` execs the benchmark, so a SIGTERM to it stops the benchmark
    instead of orphaning a child that runs on."""
    import os

    import adadiff.cli as cli

    seen = []

    def fake_execv(path, argv):
        seen.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    if os.name != "posix":
        pytest.skip("exec is only used on POSIX systems")
    with pytest.raises(SystemExit):
        cli.main(["bench", "quick", "--help"])
    assert seen and seen[0][1][1:4] == ["-m", "benchmarks", "quick"]
    # -v before "bench" is adadiff's; the rest goes to the benchmark as given
    with pytest.raises(SystemExit):
        cli.main(["-v", "bench", "quick", "-v"])
    assert seen[1][1][1:] == ["-m", "benchmarks", "quick", "-v"]


@pytest.fixture
def suite_main(monkeypatch):
    """benchmarks.__main__ whose run_suite fails the test: the arguments must be refused first."""
    import benchmarks.__main__ as suite_main

    def no_runs(*_args, **_kw):
        raise AssertionError("the suite ran with arguments it should have refused")

    monkeypatch.setattr(suite_main, "run_suite", no_runs)
    return suite_main


def test_the_suite_refuses_a_file_as_out_or_work_before_any_run(
    suite_main, monkeypatch, tmp_path, capsys
):
    monkeypatch.chdir(tmp_path)  # the default --out, bench-quick, lands here
    plain = tmp_path / "a-file"
    plain.write_text("")
    for flag, value in (("--out", plain), ("--work", plain), ("--out", plain / "sub")):
        assert suite_main.main(["quick", flag, str(value)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}" in err and "give a" in err and "Traceback" not in err


def test_the_suite_refuses_counts_below_one(suite_main, capsys):
    for flag in ("--threads", "--repeats", "--max-batch"):
        with pytest.raises(SystemExit) as stop:
            suite_main.main(["quick", flag, "-1"])
        assert stop.value.code == 2
        assert f"argument {flag}: expected a number >= 1" in capsys.readouterr().err


def test_the_suite_refuses_a_seed_no_upscale_takes_before_any_run(suite_main, capsys):
    for value, reason in (
        ("-1", "expected a number >= 0"),
        (str(2**32), "expected a seed below 2**32"),
    ):
        with pytest.raises(SystemExit) as stop:
            suite_main.main(["quick", "--seed", value])
        assert stop.value.code == 2
        assert f"argument --seed: {reason}" in capsys.readouterr().err


def test_the_suite_refuses_an_empty_sections_list(suite_main, tmp_path, capsys):
    for value in ("", ",", " , "):
        assert suite_main.main(["quick", "--sections", value, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "--sections" in err and "names no section" in err and "schedules" in err
    assert list(tmp_path.iterdir()) == []


def test_the_suite_checks_sizes_before_any_run(suite_main, tmp_path, capsys):
    for value, why in (
        ("abc", "a whole number, got 'abc'"),
        ("0", "a number >= 1, got 0"),
        ("128,-5", "a number >= 1, got -5"),
        ("128,,256", "numbers separated by commas, got '128,,256'"),
        ("1.5", "a whole number, got '1.5'"),
    ):
        with pytest.raises(SystemExit) as stop:
            suite_main.main(["quick", "--sizes", value, "--out", str(tmp_path)])
        assert stop.value.code == 2
        assert f"argument --sizes: expected {why}" in capsys.readouterr().err


def test_the_suite_checks_engines_before_any_run(suite_main, tmp_path, capsys):
    missing = tmp_path / "no-export"
    out = tmp_path / "out"
    assert suite_main.main(["quick", "--engines", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"engines folder {missing} does not exist" in err and "adadiff export" in err
    assert not out.exists()


def test_load_spinners_stop_without_their_parent_and_when_interrupted(monkeypatch):
    """A busy loop outlives nothing: it ends once its parent is gone (a SIGKILL skips every
    cleanup), and an interrupt while the spinners start stops those already started."""
    import subprocess
    import sys

    from benchmarks import load

    # pid 1 is never this test's process: the loop sees that its parent is not that pid
    done = subprocess.run([sys.executable, "-c", load.SPIN, "1"], timeout=30)
    assert done.returncode == 0

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    real_sleep, calls = load.time.sleep, []

    def interrupted(seconds):  # the first sleep is the spinners' start; later ones are waits
        calls.append(seconds)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(load.subprocess, "Popen", popen)
    monkeypatch.setattr(load.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt), load.Spinners(2):
        pass
    assert len(started) == 2
    for proc in started:
        assert proc.wait(timeout=30) is not None


@pytest.mark.parametrize("name", ["front", "quality"])
def test_render_refuses_a_missing_broken_or_other_json_in_one_line(name, tmp_path, capsys):
    import importlib

    bench = importlib.import_module(f"benchmarks.{name}")
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.START}\n{bench.END}\n")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    other = tmp_path / "other.json"  # the other benchmark's JSON, or a suite's
    other.write_text(json.dumps({"settings": {}, "main": []}))
    for saved, why in (
        (tmp_path / "missing.json", "No such file"),
        (broken, "is not JSON"),
        (other, f"is not a saved {name}.json"),
    ):
        assert bench.main(["--render", str(saved), "--readme", str(readme)]) == 2
        err = capsys.readouterr().err
        assert why in err and f"give the {name}.json that a run wrote" in err
    assert readme.read_text() == f"{bench.START}\n{bench.END}\n"


def test_fullsize_onnx_refuses_bad_options_before_the_export(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from benchmarks import fullsize_onnx

    def never(*args, **kwargs):
        raise AssertionError("the sd21-base UNet was built for a run that cannot finish")

    monkeypatch.setattr(fullsize_onnx, "build_random", never)
    out = tmp_path / "runs" / "fullsize_onnx.json"

    def main(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["fullsize_onnx", *args])  # as the suite runs it
        return fullsize_onnx.main()

    for bad in (["--repeats", "0"], ["--batches", "1", "0"], ["--threads", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(*bad, "--out", str(out))
        assert exit_info.value.code == 2
        assert "expected a number >=" in capsys.readouterr().err
    assert main("--out", str(tmp_path)) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main("--work", str(tmp_path / "file"), "--out", str(out)) == 2
    assert "--work" in capsys.readouterr().err and not out.exists()


def test_tiny_e2e_refuses_bad_options_before_any_run(monkeypatch, tmp_path, capsys):
    """A folder as --out, a count below one or a backend that cannot open fail at the start
    in one line; before, the folder failed in a traceback after every run."""
    from benchmarks import tiny_e2e

    def no_runs(*_args, **_kw):
        raise AssertionError("tiny_e2e loaded the model before checking its options")

    out = tmp_path / "e2e.json"
    with monkeypatch.context() as m:
        m.setattr(tiny_e2e.Upscaler, "from_pretrained", no_runs)
        m.setattr(sys, "argv", ["tiny_e2e", "--out", str(tmp_path)])
        assert tiny_e2e.main() == 2
        err = capsys.readouterr().err
        assert f"--out {tmp_path} is a folder" in err and "Traceback" not in err
        for flag in ("--repeats", "--sizes", "--max-batch"):
            m.setattr(sys, "argv", ["tiny_e2e", flag, "0", "--out", str(out)])
            with pytest.raises(SystemExit) as stop:
                tiny_e2e.main()
            assert stop.value.code == 2
            assert f"argument {flag}: expected a number >= 1" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["tiny_e2e", "--backend", "tensorrt", "--out", str(out)])
    assert tiny_e2e.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--engines" in err and "Traceback" not in err
    assert not out.exists()


def test_flop_counts_include_attention_on_the_cpu():
    """Attention's two matmuls, 2 * (2 * L * L * D) FLOPs per head, counted by hand: torch's
    FlopCounterMode counted the CPU's fused attention kernel as 0."""
    from types import SimpleNamespace

    import torch

    from benchmarks.flops import FlopCounter

    class Attend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q) * self.scale

    heads, length, dim = 2, 16, 8
    spec = SimpleNamespace(
        input_names=("q",),
        sample_inputs=lambda b: {"q": np.ones((b, heads, length, dim), np.float32)},
    )
    counter = FlopCounter.__new__(FlopCounter)
    counter.specs = {"attend": spec}
    counter._wrappers = {"attend": Attend()}
    counter._cache = {}
    assert counter.per_call("attend", 3) == 3 * heads * 2 * (2 * length * length * dim)
