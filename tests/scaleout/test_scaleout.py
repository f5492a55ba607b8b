"""Cross-image regrouping (ImageStream), folder planning, the worker, and upscale-many on Ray."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adadiff.cli import main
from adadiff.errors import ConfigError, OutputPathError, WorkerStoppedError
from adadiff.presets import SHIPPED
from adadiff.runtime.stream import ImageStream, StreamItem, upscale_many
from adadiff.runtime.upscaler import Upscaler
from adadiff.scaleout.plan import ImageTask, JobSettings, is_done, job_stamp, make_plan


@pytest.fixture(scope="module")
def upscaler() -> Upscaler:
    return Upscaler.from_pretrained("tiny", max_batch=8)


def _crops() -> dict[str, np.ndarray]:
    """Small real photos: 1-tile ones and a 2-tile one (40x24 in -> 160x96 out)."""
    from skimage import data

    out = {}
    for name, (h, w) in (("astronaut", (24, 24)), ("coffee", (24, 24)), ("chelsea", (24, 40))):
        out[name] = getattr(data, name)()[80 : 80 + h, 90 : 90 + w]
    out["camera"] = np.repeat(data.camera()[200:224, 200:224, None], 3, axis=2)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("many") / "in"
    src.mkdir()
    for name, pixels in _crops().items():
        Image.fromarray(pixels).save(src / f"{name}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    (src / "notes.txt").write_text("not an image")
    return src


# -- ImageStream: tiles of several images in one call -------------------------------------------


def test_pooled_images_match_solo_runs(upscaler):
    images = {k: v.astype(np.float32) / 255.0 for k, v in _crops().items()}
    solo = {k: upscaler.upscale(v, seed=3) for k, v in images.items()}
    items = [StreamItem(k, v, seed=3) for k, v in images.items()]
    pooled = {r.key: r for r in upscale_many(upscaler, items)}
    assert set(pooled) == set(images)
    for key, (image, report) in solo.items():
        got = pooled[key]
        assert got.error is None
        assert got.report.steps_per_tile == report.steps_per_tile
        assert got.report.exits == report.exits
        # Same steps; only float rounding differs (the tile has other batch neighbours).
        assert np.abs(got.image - image).max() < 1e-4
    shared = [b["size"] for r in pooled.values() for b in r.report.batches]
    assert max(shared) > max(b["size"] for _, rep in solo.values() for b in rep.batches)


def test_cross_image_fills_batches_and_image_by_image_does_not(upscaler):
    images = [
        StreamItem(k, v.astype(np.float32) / 255.0, seed=0)
        for k, v in _crops().items()
        if v.shape[:2] == (24, 24)
    ]
    cross = ImageStream(upscaler)
    assert len(list(cross.run(images))) == len(images)
    one = ImageStream(upscaler, cross_image=False)
    assert len(list(one.run(images))) == len(images)
    # One-tile images: alone, every call has one tile; pooled, calls hold several images.
    assert one.stats.mean_batch == pytest.approx(1.0)
    assert cross.stats.mean_batch > 2.0
    assert cross.stats.unet_evaluations == one.stats.unet_evaluations
    assert cross.stats.unet_calls < one.stats.unet_calls


def test_a_refused_image_does_not_stop_the_others(upscaler):
    good = _crops()["coffee"].astype(np.float32) / 255.0
    bad = np.full((8, 8, 3), np.nan, dtype=np.float32)
    items = [StreamItem("bad", bad), StreamItem("good", good), StreamItem("worse", "text")]
    results = {r.key: r for r in upscale_many(upscaler, items)}
    assert results["good"].error is None and results["good"].image.shape == (96, 96, 3)
    assert "NaN" in str(results["bad"].error)
    assert "expected a PIL.Image or a numpy array" in str(results["worse"].error)


def test_stream_reports_each_images_progress(upscaler):
    heard: dict[str, list[tuple[str, int, int]]] = {}
    stream = ImageStream(
        upscaler, progress=lambda key, *event: heard.setdefault(key, []).append(event)
    )
    crops = _crops()
    items = [StreamItem(k, crops[k].astype(np.float32) / 255.0) for k in ("coffee", "chelsea")]
    assert len(list(stream.run(items))) == 2
    for key, tiles in (("coffee", 1), ("chelsea", 2)):
        events = heard[key]
        stages = [stage for stage, _, _ in events]
        assert stages[0] == "encode" and stages[-1] == "decode"
        assert stages == sorted(stages, key=["encode", "denoise", "decode"].index)
        assert events[-1][1] == events[-1][2]  # decoded in full
        denoise = [(done, total) for stage, done, total in events if stage == "denoise"]
        assert denoise[0][0] == 0 and len(denoise) > 1
        assert [d for d, _ in denoise] == sorted(d for d, _ in denoise)
        assert {t for _, t in denoise} == {tiles * upscaler.config.dtss.t_start}
        assert denoise[-1][0] == denoise[-1][1]  # denoised in full, as upscale reports it

    def fails_at_the_end(key: str, stage: str, done: int, total: int) -> None:
        if stage == "denoise" and done == total:
            raise RuntimeError("the progress bar broke")

    # a callback that raises fails its image, which still comes back
    stream = ImageStream(upscaler, progress=fails_at_the_end)
    results = list(stream.run(items))
    assert sorted(r.key for r in results) == ["chelsea", "coffee"]
    assert all("progress bar broke" in str(r.error) for r in results)


def test_a_stream_left_early_drops_its_images_in_flight(upscaler):
    crop = _crops()["coffee"].astype(np.float32) / 255.0
    stream = ImageStream(upscaler)
    # "bad" is refused at admission, so its result comes while "a" is in flight
    for result in stream.run([StreamItem("a", crop), StreamItem("bad", None)]):
        assert result.key == "bad"
        break
    assert stream.idle and stream.pool.active_tiles == 0
    # a duplicate key fails that item alone; the image admitted before it and the next one run
    results = list(stream.run([StreamItem("b", crop)] * 2 + [StreamItem("d", crop)]))
    assert [r.key for r in results if r.error is None] == ["b", "d"]
    [refused] = [r for r in results if r.error is not None]
    assert refused.key == "b" and "already in the stream" in str(refused.error)
    assert stream.idle
    assert [r.key for r in stream.run([StreamItem("c", crop)])] == ["c"]


def test_a_stream_runs_one_run_at_a_time(upscaler):
    crop = _crops()["coffee"].astype(np.float32) / 255.0
    stream = ImageStream(upscaler)
    first = stream.run([StreamItem("a", crop), StreamItem("bad", None)])
    assert next(first).key == "bad"  # "a" is in flight
    with pytest.raises(RuntimeError, match="already running"):
        list(stream.run([StreamItem("c", crop)]))
    assert [r.key for r in first] == ["a"]
    assert [r.key for r in stream.run([StreamItem("c", crop)])] == ["c"]


def test_a_stream_on_a_closed_upscaler_says_so():
    closing = Upscaler.from_pretrained("tiny", max_batch=8, threads=1)
    stream = ImageStream(closing)
    crop = _crops()["coffee"].astype(np.float32) / 255.0
    assert stream.add(StreamItem("a", crop)) is None
    closing.close()
    with pytest.raises(ConfigError, match="Upscaler was closed"):
        stream.step()
    results = list(stream.run([StreamItem("b", crop)]))
    assert sorted(r.key for r in results) == ["a", "b"]
    assert all("Upscaler was closed" in str(r.error) for r in results)


@pytest.mark.parametrize("target", [0, -1])
def test_stream_target_tiles_is_checked(upscaler, target):
    with pytest.raises(ValueError, match="target_tiles must be >= 1"):
        ImageStream(upscaler, target_tiles=target)
    assert ImageStream(upscaler).target_tiles == upscaler.max_batch


# -- planning and resume (no Ray) ---------------------------------------------------------------


def test_plan_names_outputs_and_ignores_other_files(folder, tmp_path):
    plan = make_plan(folder, tmp_path / "out", JobSettings())
    names = [t.output.name for t in plan.todo]
    assert names == [
        "astronaut.png", "broken.png", "camera.png", "chelsea.png", "coffee.png"
    ]  # fmt: skip
    assert plan.todo[0].report.name == "astronaut.png.json"
    assert [p.name for p in plan.ignored] == ["notes.txt"]
    assert plan.done == []
    # a subfolder (not searched) and a link to nothing are listed as left out, not lost
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nested / "sub" / "deep.png")
    (nested / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (nested / "album.png").mkdir()  # a folder is not an image, whatever its name
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nested / ".hidden.png")  # left out
    plan = make_plan(nested, tmp_path / "out2", JobSettings())
    assert plan.todo == [] and [p.name for p in plan.ignored] == ["album.png", "gone.png", "sub"]


def test_upscale_many_picks_every_format_upscale_reads(tmp_path, capsys):
    from adadiff.cli import main
    from adadiff.imageio import INPUT_FORMATS, load_image

    assert {".gif", ".bmp"} <= set(INPUT_FORMATS)  # upscale-many skipped cat.gif as not an image
    src = tmp_path / "in"
    src.mkdir()
    for suffix in INPUT_FORMATS:
        Image.new("RGB", (4, 4), (200, 30, 30)).save(src / f"cat{suffix.replace('.', '_')}{suffix}")
        load_image(src / f"cat{suffix.replace('.', '_')}{suffix}")  # what upscale reads
    plan = make_plan(src, tmp_path / "out", JobSettings(output_format="same"))
    assert plan.ignored == [] and len(plan.todo) == len(INPUT_FORMATS)
    written = {t.source.suffix: t.output.suffix for t in plan.todo}
    assert written[".gif"] == written[".bmp"] == ".png"  # read, but not a format adadiff writes
    assert written[".webp"] == ".webp"
    assert "GIF or BMP image" in _help(main, "upscale", capsys)


def _help(main, command, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_plan_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        make_plan(folder, folder, JobSettings())
    with pytest.raises(ConfigError, match="not a folder"):
        make_plan(tmp_path / "missing", tmp_path / "out", JobSettings())
    clash = tmp_path / "clash"
    clash.mkdir()
    for suffix in (".png", ".jpg"):
        Image.new("RGB", (4, 4)).save(clash / f"same{suffix}")
    with pytest.raises(ConfigError, match="--output-format same"):
        make_plan(clash, tmp_path / "out", JobSettings())
    plan = make_plan(clash, tmp_path / "out", JobSettings(output_format="same"))
    assert sorted(t.output.name for t in plan.todo) == ["same.jpg", "same.png"]
    Image.new("RGB", (4, 4)).save(clash / "IMG_0001.JPG", format="JPEG")
    plan = make_plan(clash, tmp_path / "out", JobSettings(output_format="same"))
    assert sorted(t.output.name for t in plan.todo) == ["IMG_0001.JPG", "same.jpg", "same.png"]
    Image.new("RGB", (4, 4)).save(clash / "same.PNG", format="PNG")  # same name, by case only
    with pytest.raises(ConfigError, match=r"same\.PNG and same\.png, one file where names ignore"):
        make_plan(clash, tmp_path / "out", JobSettings(output_format="same"))
    with pytest.raises(ConfigError, match="uniform"):
        JobSettings(schedule="adaptive", interval=5)
    with pytest.raises(ConfigError, match="output format must be one of"):
        JobSettings(output_format="jpg")
    not_a_folder = tmp_path / "out.txt"
    not_a_folder.write_text("a file")
    with pytest.raises(OutputPathError, match="exists and is not a folder"):
        make_plan(folder, not_a_folder, JobSettings())


def test_done_means_same_settings_and_same_input(folder, tmp_path, monkeypatch):
    from adadiff.scaleout import plan as plan_module

    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings(seed=1)
    task = make_plan(folder, out, settings).todo[0]
    assert not is_done(task, settings)
    task.output.write_bytes(b"image")
    task.report.write_text(json.dumps({"job": job_stamp(task, settings)}))
    assert is_done(task, settings)
    assert is_done(task, JobSettings(seed=1, max_batch=3))  # batch size only changes rounding
    assert is_done(task, JobSettings(seed=1, device="cuda"))  # so does the device
    assert is_done(task, JobSettings(seed=1, max_pixels=10**6))  # a refusal, not the pixels
    assert not is_done(task, JobSettings(seed=2))
    assert not is_done(task, JobSettings(seed=1, schedule="uniform"))
    # the stamp holds the digest of the bytes the worker upscaled, when the job knows it
    assert job_stamp(task, settings, "0" * 64)["input_sha256"] == "0" * 64
    stamp = job_stamp(task, settings)
    task.output.unlink()  # a report whose image is gone is not done
    assert not is_done(task, settings)
    task.output.write_bytes(b"image")
    for job in ([], {"settings": ["seed", 1]}):  # reports of another shape: not done, no crash
        task.report.write_text(json.dumps({"job": job}))
        assert not is_done(task, settings)
    task.report.write_text(json.dumps(["not", "a", "report"]))
    assert not is_done(task, settings)
    task.report.write_text("{not json")
    assert not is_done(task, settings)
    task.report.write_text(json.dumps({"job": stamp}))
    monkeypatch.setattr(plan_module, "__version__", "0.0.0")  # another adadiff made it
    assert not is_done(task, settings)


def test_a_rerun_says_which_earlier_outputs_it_makes_again_and_why(folder, tmp_path):
    """Another --seed (a typo, say) replaces every output: the job says so before it starts."""
    from adadiff.scaleout.job import outdated_line

    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings(seed=1)
    tasks = make_plan(folder, out, settings).todo
    assert make_plan(folder, out, settings).outdated == {}  # nothing there yet
    for task in tasks:
        task.output.write_bytes(b"image")
        task.report.write_text(json.dumps({"job": job_stamp(task, settings)}))
    assert make_plan(folder, out, settings).outdated == {}  # all up to date
    plan = make_plan(folder, out, JobSettings(seed=2, tile=64))
    why = "made with seed 1 (now 2), tile the model's default (now 64)"
    assert plan.outdated == dict.fromkeys(tasks, why)
    stamp = job_stamp(tasks[0], settings) | {"input_sha256": "0" * 64}
    tasks[0].report.write_text(json.dumps({"job": stamp}))
    plan = make_plan(folder, out, settings)
    assert plan.outdated == {tasks[0]: "made from another version of its input"}
    other_model = job_stamp(tasks[1], settings)
    other_model["settings"]["model_id"] = "0" * 16
    tasks[1].report.write_text(json.dumps({"job": other_model}))
    why_model = make_plan(folder, out, settings).outdated[tasks[1]]
    assert why_model == "made with other model or export files"
    # a setting the earlier job recorded and this one has not (another adadiff version's) counts
    extra = job_stamp(tasks[1], settings)
    extra["settings"]["denoise"] = 0.5
    tasks[1].report.write_text(json.dumps({"job": extra}))
    why_extra = make_plan(folder, out, settings).outdated[tasks[1]]
    assert why_extra == "made with denoise 0.5 (now the model's default)"
    tasks[1].report.write_text(json.dumps({"job": other_model}))
    line = outdated_line(dict.fromkeys(tasks, why) | plan.outdated)
    assert line.startswith(f"{len(tasks)} earlier outputs made again: 1 made from another")
    assert f"; {len(tasks) - 1} {why} ({tasks[1].output.name}, " in line
    many = {
        ImageTask(Path(f"{i}.png"), out / f"{i}.png", out / f"{i}.png.json"): why for i in range(6)
    }
    assert (
        outdated_line(many)
        == f"6 earlier outputs made again: 6 {why} (0.png, 1.png, 2.png, 3.png, ...)"
    )


def test_an_input_that_cannot_be_read_beside_its_earlier_output_does_not_stop_the_plan(
    folder, tmp_path, monkeypatch
):
    """Planning hashes an input that has an output; one it may not read (chmod 000, which root
    passes, hence the stand-in) is todo, and fails alone when the job reads it to send it."""
    from adadiff.scaleout import plan as plan_module

    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings()
    tasks = make_plan(folder, out, settings).todo
    for task in tasks:
        task.output.write_bytes(b"image")
        task.report.write_text(json.dumps({"job": job_stamp(task, settings)}))
    real = plan_module.sha256_file

    def denied(path):
        if Path(path) == tasks[0].source:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(plan_module, "sha256_file", denied)
    plan = make_plan(folder, out, settings)
    assert plan.todo == [tasks[0]] and plan.done == tasks[1:]
    assert plan.outdated == {}  # not said to be another version of the input


def test_an_input_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch, capsys):
    """chmod 000 on INPUT_DIR (root lists it anyway, hence the stand-in): no traceback."""
    src = tmp_path / "in"
    src.mkdir()
    real = Path.iterdir

    def denied(self):
        if self == src:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert main(["upscale-many", str(src), str(tmp_path / "out")]) == 2
    assert f"cannot list the input folder {src} (Permission denied)" in capsys.readouterr().err


def test_a_report_name_past_the_file_system_limit_is_not_done_and_no_crash(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    long = src / f"{'L' * 247}.png"  # 251 bytes: the output fits, its .png.json report does not
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(long)
    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings()
    task = make_plan(src, out, settings).todo[0]
    task.output.write_bytes(b"image")  # an output left without its report by an older run
    assert len(task.report.name.encode()) > 255
    assert not is_done(task, settings)  # it used to raise ENAMETOOLONG and stop every rerun
    assert make_plan(src, out, settings).todo == [task]


def test_a_model_retrained_in_place_is_not_taken_for_the_old_one(folder, tmp_path):
    from adadiff.scaleout.plan import model_identity

    model = tmp_path / "model"
    shutil.copytree(SHIPPED / "tiny", model)
    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings(model=str(model))
    task = make_plan(folder, out, settings).todo[0]
    task.output.write_bytes(b"image")
    task.report.write_text(json.dumps({"job": job_stamp(task, settings)}))
    assert is_done(task, settings)
    pfj = model / "pfj.safetensors"
    pfj.write_bytes(pfj.read_bytes()[:-1] + b"\x00")  # "retrained": same name, other weights
    model_identity.cache_clear()
    assert not is_done(task, settings)


def test_an_export_re_made_in_place_is_not_taken_for_the_old_one(tmp_path, monkeypatch):
    """--engines counts the export's recorded files by digest, not by name."""
    from types import SimpleNamespace

    from adadiff.scaleout import plan as plan_module

    def export(sha256: str) -> SimpleNamespace:
        files = [SimpleNamespace(path="unet.plan", sha256=sha256)]
        return SimpleNamespace(config_digest="c", components={"unet": SimpleNamespace(files=files)})

    identities = []
    for sha256 in ("a" * 64, "b" * 64):
        manifest = export(sha256)
        monkeypatch.setattr(plan_module.ExportManifest, "load", lambda path, m=manifest: m)
        plan_module.model_identity.cache_clear()
        identities.append(plan_module.model_identity(None, str(tmp_path / "engines")))
    plan_module.model_identity.cache_clear()
    assert identities[0] != identities[1]


def _job_settings_seen(monkeypatch) -> list[JobSettings]:
    """The settings each upscale-many call hands to the job, which is not run."""
    import adadiff.cli as cli
    from adadiff.scaleout.job import JobResult

    seen: list[JobSettings] = []

    def fake_job(input_dir, output_dir, settings, cluster, **kwargs):
        seen.append(settings)
        return JobResult([], 0.0)

    monkeypatch.setattr(cli, "run_job", fake_job)
    return seen


def test_naming_the_models_own_tiling_resumes_the_job(folder, tmp_path, monkeypatch):
    """--tile 128 --overlap 16 on tiny is the job without them: its outputs are not redone."""
    seen = _job_settings_seen(monkeypatch)
    argv = ["upscale-many", str(folder), str(tmp_path / "out"), "-q"]
    for extra in ([], ["--tile", "128", "--overlap", "16"], ["--tile", "64"], ["--overlap", "32"]):
        assert main([*argv, *extra]) == 0
    plain, spelled, other_tile, other_overlap = (s.result_key() for s in seen)
    assert spelled == plain
    assert other_tile != plain and other_overlap != plain


def test_a_job_begun_here_resumes_on_a_ray_cluster(folder, tmp_path, monkeypatch, capsys):
    """With --ray-address the nodes load the model, but a preset's defaults are known here: the
    stamp fills them in as a local job does, or no output of one is reused by the other."""
    seen = _job_settings_seen(monkeypatch)
    argv = ["upscale-many", str(folder), str(tmp_path / "out"), "-q"]
    assert main(argv) == 0
    assert main([*argv, "--ray-address", "auto"]) == 0
    here, cluster = (s.result_key() for s in seen)
    assert cluster == here and here["schedule"] == "uniform"
    # and --interval on a model whose default schedule is not uniform is refused at once
    remote = [*argv, "--ray-address", "auto", "--model", "sd21-base", "--interval", "5"]
    assert main(remote) == 2
    assert "add --schedule uniform" in capsys.readouterr().err


# -- the worker, without Ray --------------------------------------------------------------------


def test_worker_turns_bytes_into_the_cli_output(folder, tmp_path, capsys):
    from adadiff.scaleout.worker import UpscaleWorker

    worker = UpscaleWorker({"model": "tiny", "seed": 5}, threads=1)
    try:
        source = folder / "chelsea.png"
        reply = worker.upscale({"name": source.name, "data": source.read_bytes(), "suffix": ".png"})
        broken = worker.upscale({"name": "broken.png", "data": b"\x89PNG..", "suffix": ".png"})
        wide = io.BytesIO()
        Image.fromarray(np.zeros((2, 4100, 3), np.uint8)).save(wide, format="PNG")
        too_wide = worker.upscale({"name": "wide.png", "data": wide.getvalue(), "suffix": ".webp"})
    finally:
        worker.close()
    assert too_wide["status"] == "failed" and "WEBP holds at most 16383" in too_wide["error"]
    assert reply["status"] == "done" and reply["pid"] == os.getpid()
    assert reply["report"]["tiles"] == 2
    assert broken["status"] == "failed" and "broken.png" in broken["error"]
    cli_out = tmp_path / "cli.png"
    assert main(["upscale", str(source), "-o", str(cli_out), "--seed", "5", "-q"]) == 0
    _assert_same_image(cli_out.read_bytes(), reply["image"])


def test_worker_says_where_its_images_are_while_it_upscales(folder):
    """The driver's progress lines come from here, asked while the engine thread is busy."""
    from adadiff.scaleout.worker import UpscaleWorker

    worker = UpscaleWorker({"model": "tiny"}, threads=1)
    real_step, seen = worker.stream.step, []

    def step():
        seen.append(worker.progress())
        return real_step()

    worker.stream.step = step
    source = folder / "chelsea.png"
    try:
        reply = worker.upscale({"name": source.name, "data": source.read_bytes(), "suffix": ".png"})
        assert reply["status"] == "done"
        assert worker.progress() == []  # nothing in flight any more
    finally:
        worker.close()
    first, last = seen[0], seen[-1]
    assert [e["name"] for e in first] == ["chelsea.png"]
    assert first[0]["stage"] == "denoise" and first[0]["done"] == 0 and first[0]["total"] > 0
    assert 0 < last[0]["done"] < last[0]["total"] and last[0]["seconds"] >= 0


def test_progress_line_names_the_images_under_way_first():
    from adadiff.scaleout.job import progress_line

    def entry(stage: str, done: int = 0, total: int = 1, seconds: float = 0.0) -> dict:
        return {"stage": stage, "done": done, "total": total, "seconds": seconds}

    working = [
        ("a.jpg", 65.0, entry("denoise", 400, 1000, 60.0)),
        ("b.jpg", 65.0, {"stage": "queued"}),
        ("c.jpg", 12.0, entry("encode", 1, 10)),
        ("d.jpg", 3.0, None),
    ]
    assert progress_line(2, 9, working) == (
        "[2/9 done] working: a.jpg denoising 40% (1m05s, ETA 1m30s), c.jpg encoding 10% (12s), "
        "d.jpg (sent 3s ago, no answer from its worker); 1 queued"
    )
    many = [(f"{i}.png", 1.0, entry("save")) for i in range(6)]
    line = progress_line(0, 6, many)
    assert line.endswith("3.png saving (1s); 2 more") and "4.png" not in line
    assert progress_line(0, 4, many[:4]).endswith("3.png saving (1s)")  # all four shown
    finishing = [("e.jpg", 5.0, entry("denoise", 10, 10, 4.0))]  # no ETA once it is through
    assert progress_line(0, 1, finishing) == "[0/1 done] working: e.jpg denoising 100% (5s)"


def test_a_failed_round_fails_its_images_and_the_worker_goes_on(folder):
    from adadiff.scaleout import worker as worker_module

    limit = worker_module.MAX_FAILED_ROUNDS
    worker = worker_module.UpscaleWorker({"model": "tiny", "seed": 5}, threads=1)
    real_step, calls = worker.stream.step, []

    def step(fail_first: int):
        def run():
            calls.append(1)
            if len(calls) <= fail_first:
                raise MemoryError("one oversized batch")
            return real_step()

        return run

    source = folder / "chelsea.png"
    task = {"name": source.name, "data": source.read_bytes(), "suffix": ".png"}
    try:
        worker.stream.step = step(limit - 1)
        for _ in range(limit - 1):
            with pytest.raises(MemoryError):
                worker.upscale(task)
        assert worker.upscale(task)["status"] == "done"  # the stream took new images again
        calls.clear()
        worker.stream.step = step(10**6)  # a lost device: every round fails
        for _ in range(limit):
            with pytest.raises(MemoryError):
                worker.upscale(task)
        with pytest.raises(WorkerStoppedError, match="engine thread stopped"):
            worker.upscale(task)
    finally:
        worker.close()


@pytest.mark.parametrize("where", ["decode_image_bytes", "_encode"])
def test_an_image_that_raises_fails_alone_and_the_worker_goes_on(folder, monkeypatch, where):
    """An error other than adadiff's while one image was read or saved (out of memory, a
    decoder's bug) stopped the engine thread and left that image's call waiting forever: the
    job hung with "1 queued", and the images beside it failed with its error."""
    import threading

    from adadiff.scaleout import worker as worker_module

    real = getattr(worker_module, where)

    def raising(*args, **kwargs):
        if threading.current_thread().name == "adadiff-engine" and not raised:
            raised.append(1)
            raise MemoryError("out of memory on this image")
        return real(*args, **kwargs)

    raised: list[int] = []
    monkeypatch.setattr(worker_module, where, raising)
    worker = worker_module.UpscaleWorker({"model": "tiny"}, threads=1)
    source = folder / "coffee.png"
    task = {"name": source.name, "data": source.read_bytes(), "suffix": ".png"}
    replies: list[object] = []

    def call() -> None:
        try:
            replies.append(worker.upscale(task))
        except Exception as exc:
            replies.append(exc)

    try:
        for _ in range(2):  # the first raises, the next is upscaled
            thread = threading.Thread(target=call, daemon=True)
            thread.start()
            thread.join(timeout=60)
            assert not thread.is_alive(), "the image's call never returned"
    finally:
        worker.close()
    assert isinstance(replies[0], MemoryError)
    assert isinstance(replies[1], dict) and replies[1]["status"] == "done"


def _pixels(data: bytes) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _assert_same_image(a: bytes, b: bytes) -> None:
    """Identical up to float rounding: at most one 8-bit level, in at most 0.1% of values."""
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape == pb.shape
    diff = np.abs(pa - pb)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.001 * diff.size


def test_console_script_starts_its_own_local_ray(folder, tmp_path):
    """The README's command: no --ray-address, so the CLI starts (and stops) a local Ray."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("ray", reason="ray is not installed (pip install 'adadiff[ray]')")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(folder / "coffee.png", src / "coffee.png")
    exe = Path(sys.executable).with_name("adadiff")
    cmd = [str(exe), "upscale-many", str(src), str(tmp_path / "out"), "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 upscaled, 0 already done, 0 failed" in done.stdout
    assert "[1/1] coffee.png: done" in done.stderr
    assert "starting a local Ray instance" in done.stderr
    assert "1 worker ready in" in done.stderr
    assert "Token authentication" not in done.stderr  # Ray's notice, nothing for the user to do
    with Image.open(tmp_path / "out" / "coffee.png") as img:
        assert img.size == (96, 96)


# -- upscale-many on a local Ray cluster with 2 CPUs ---------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'adadiff[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_upscale_many_on_ray(ray_cluster, folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["upscale-many", str(folder), str(out), "--workers", "2", "--seed", "7"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "broken.png: failed" in err and "[5/5]" in err
    job = json.loads((out / "adadiff-job.json").read_text())
    assert (job["done"], job["failed"], job["skipped"]) == (4, 1, 0)
    failed = [r for r in job["records"] if r["status"] == "failed"]
    assert [Path(r["input"]).name for r in failed] == ["broken.png"]
    assert failed[0]["error"].startswith("broken.png is not an image")
    assert job["ignored"] == [str(folder / "notes.txt")]
    assert len({w["pid"] for w in job["workers"]}) == 2
    calls = sum(w["unet_calls"] for w in job["workers"])
    evals = sum(w["unet_evaluations"] for w in job["workers"])
    assert job["mean_batch"] == pytest.approx(evals / calls, abs=1e-3) and calls > 0
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        report = json.loads((out / f"{name}.png.json").read_text())
        single = tmp_path / f"{name}-single.png"
        single_report = tmp_path / f"{name}-single.json"
        args = [str(folder / f"{name}.png"), "-o", str(single), "--report", str(single_report)]
        assert main(["upscale", *args, "--seed", "7", "-q"]) == 0
        _assert_same_image((out / f"{name}.png").read_bytes(), single.read_bytes())
        alone = json.loads(single_report.read_text())
        assert report["steps_per_tile"] == alone["steps_per_tile"]
        assert report["job"]["settings"]["seed"] == 7
    assert main(["upscale", str(folder / "broken.png"), "-o", str(tmp_path / "b.png")]) == 2

    # A rerun skips the finished images (and retries the broken one), also when it spells out
    # the model and its default schedule.
    assert main([*argv, "-q"]) == 0
    job = json.loads((out / "adadiff-job.json").read_text())
    assert (job["done"], job["failed"], job["skipped"]) == (0, 1, 4)
    assert main([*argv, "-q", "--strict"]) == 1  # an image failed: a script can tell
    spelled = [*argv, "--model", "adadiff/weights/tiny", "--schedule", "uniform", "-q"]
    assert main(spelled) == 0
    job = json.loads((out / "adadiff-job.json").read_text())
    assert (job["done"], job["failed"], job["skipped"]) == (0, 1, 4)
    # Another interval is another result.
    assert main([*argv, "--interval", "100", "-q"]) == 0
    job = json.loads((out / "adadiff-job.json").read_text())
    assert (job["done"], job["skipped"]) == (4, 0)


def test_upscale_many_says_where_its_images_are(ray_cluster, folder, tmp_path):
    """A large image runs for minutes: lines say how far each image in flight has come."""
    from adadiff.scaleout.job import ClusterOptions, run_job

    lines: list[str] = []
    result = run_job(
        folder,
        tmp_path / "out",
        JobSettings(),
        ClusterOptions(workers=1, queue=2),
        on_status=lines.append,
        progress_every=0.05,
    )
    assert result.count("done") == 4
    assert lines[0].startswith("starting 1 worker (1 CPU and 1 thread each)")
    assert lines[1].startswith("1 worker ready in") and lines[1].endswith("upscaling 5 images")
    working = [line for line in lines[2:] if line.startswith("[")]
    assert working and all(" done] working: " in line for line in working)
    assert any(re.search(r"\w+\.png denoising \d+%", line) for line in working), working


def test_a_killed_worker_loses_no_image(ray_cluster, folder, tmp_path):
    from adadiff.scaleout.job import ClusterOptions, run_job

    killed: list[int] = []

    def kill_first_worker(record, done, total):
        if record.status == "done" and not killed:
            killed.append(record.worker_pid)
            os.kill(record.worker_pid, signal.SIGKILL)

    # Image by image with two in flight: when the worker's first image comes back, its second is
    # still running or queued there, so the kill loses work that has to run again. One worker:
    # that work waits for Ray to restart it.
    result = run_job(
        folder,
        tmp_path / "out",
        JobSettings(seed=2),
        ClusterOptions(workers=1, queue=2, cross_image=False),
        on_record=kill_first_worker,
    )
    assert killed
    assert result.count("done") == 4 and result.count("failed") == 1
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        assert (tmp_path / "out" / f"{name}.png").is_file()
    first = {w["pid"] for w in result.started}
    assert killed[0] in first and killed[0] not in {w["pid"] for w in result.workers}
    # The restarted worker (a new process) finished images too.
    done_by = {r.worker_pid for r in result.records if r.status == "done"}
    assert done_by - first


def test_a_worker_whose_engine_stopped_hands_its_images_to_the_others(
    ray_cluster, tmp_path, monkeypatch
):
    """A lost device stops one worker's engine after 3 failed rounds: the images it was sent
    next (and never tried) go to the healthy worker instead of failing there one by one."""
    from adadiff.scaleout import job, worker

    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 90, 120)).save(src / f"img{i}.png")
    flag = tmp_path / "broken"

    class HalfBroken(worker.UpscaleWorker):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            try:  # the first worker to start loses its device
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return

            def lost():
                raise RuntimeError("device lost")

            self.stream.step = lost

    monkeypatch.setattr(job, "UpscaleWorker", HalfBroken)
    cluster = job.ClusterOptions(workers=2, queue=1)
    result = job.run_job(src, tmp_path / "out", JobSettings(), cluster)
    failed = [r.error for r in result.records if r.status == "failed"]
    assert failed == ["device lost"] * worker.MAX_FAILED_ROUNDS
    assert result.count("done") == 8 - worker.MAX_FAILED_ROUNDS


def test_too_many_workers_is_a_clear_error(ray_cluster, folder, tmp_path):
    from adadiff.scaleout.job import ClusterOptions, run_job

    with pytest.raises(ConfigError, match="lower --workers"):
        run_job(folder, tmp_path / "out", JobSettings(), ClusterOptions(workers=3))


def test_no_more_workers_start_than_there_are_images(ray_cluster, folder, tmp_path):
    """Each worker loads the model: the cluster's 2 CPUs for one image start one worker."""
    from adadiff.scaleout.job import ClusterOptions, run_job

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "astronaut.png", one)
    lines: list[str] = []
    result = run_job(one, tmp_path / "out", JobSettings(), ClusterOptions(), on_status=lines.append)
    assert result.count("done") == 1
    assert len(result.started) == 1
    assert any(line.startswith("starting 1 worker (") and "one per image" in line for line in lines)


def test_only_a_local_ray_started_by_the_job_drops_the_token_auth_notice():
    """Ray logs it when it starts a local instance with token authentication on (its default);
    authentication stays on, and what a remote cluster logs is left alone."""
    import logging

    from adadiff.scaleout import job

    logger = logging.getLogger(job._TOKEN_AUTH_LOGGER)
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            logger.warning("Token authentication is enabled for this Ray cluster. Set ...")
            logger.warning("Token authentication is disabled for this Ray cluster. Anyone ...")

    listeners = job._Listeners(None, None, 10.0)
    logger.addHandler(handler)
    try:
        assert job._connect(FakeRay(), job.ClusterOptions(), listeners)
        assert [m.split(".")[0] for m in heard] == [
            "Token authentication is disabled for this Ray cluster"
        ]
        heard.clear()
        assert job._connect(
            FakeRay(), job.ClusterOptions(ray_address="ray://head:10001"), listeners
        )
        assert len(heard) == 2
    finally:
        logger.removeHandler(handler)
    assert not logger.filters


def test_without_ray_address_the_job_starts_its_own_ray_even_after_a_ray_start(monkeypatch):
    """Plain ray.init() joins the cluster /tmp/ray/ray_current_cluster names (the last `ray
    start --head` here) and hangs for minutes when it is gone; RAY_ADDRESS is still followed."""
    from adadiff.scaleout import job

    addresses: list[str | None] = []

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, address: str | None = None, **kwargs) -> None:
            addresses.append(address)

    lines: list[str] = []
    listeners = job._Listeners(None, lines.append, 10.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job._connect(FakeRay(), job.ClusterOptions(), listeners)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert job._connect(FakeRay(), job.ClusterOptions(), listeners)
    assert job._connect(FakeRay(), job.ClusterOptions(ray_address="auto"), listeners)
    assert addresses == ["local", "head:6379", "auto"]
    assert lines[1] == "connecting to the Ray cluster at head:6379 (RAY_ADDRESS)"


def _alive(pid: int) -> bool:
    """A process that runs (a zombie has ended); Linux, where the tests run."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(signal.SIGTERM)])
def test_a_local_ray_interrupted_while_it_starts_leaves_no_process(stop):
    """Ctrl-C or SIGTERM (ray.init's own handler turns it into SystemExit(15)) while a local Ray
    started: the raylet's agents outlived ray.shutdown and ran on after the job, and SIGTERM ended
    the job with status 15 and no word. Here a raylet that starts an agent, then the signal."""
    import subprocess
    import sys

    from adadiff.scaleout import job

    agent = "import time; time.sleep(120)"
    raylet = (
        f"import subprocess, sys, time; a = subprocess.Popen([sys.executable, '-c', {agent!r}]); "
        "print(a.pid, flush=True); time.sleep(120)"
    )
    other = subprocess.Popen([sys.executable, "-c", agent])  # the caller's own: not Ray's
    started: list[int] = []

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            proc = subprocess.Popen([sys.executable, "-c", raylet], stdout=subprocess.PIPE)
            self.raylet = proc
            started.extend([proc.pid, int(proc.stdout.readline())])
            raise stop

        def shutdown(self) -> None:  # as ray.shutdown: the raylet goes, its agent stays
            self.raylet.kill()
            self.raylet.wait()

    listeners = job._Listeners(None, None, 10.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            job._connect(FakeRay(), job.ClusterOptions(), listeners)
        assert len(started) == 2
        assert not any(_alive(pid) for pid in started)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        for pid in started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_local_ray_that_does_not_come_up_is_one_line_naming_a_file_size_limit(
    monkeypatch,
):
    """ray.init raises a bare Exception when its node times out, as it does under ulimit -f
    (the raylet dies making its object store file): one line, and the limit named."""
    import resource

    from adadiff.scaleout import job

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            raise Exception("The current node timed out during startup.")

    listeners = job._Listeners(None, None, 10.0)
    with pytest.raises(ConfigError, match=r"could not start .* timed out during startup") as err:
        job._connect(FakeRay(), job.ClusterOptions(), listeners)
    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY
    assert ("ulimit -f" in str(err.value)) != unlimited
    monkeypatch.setattr(resource, "getrlimit", lambda which: (51200, resource.RLIM_INFINITY))
    with pytest.raises(ConfigError, match=r"limits files to 51200 bytes \(ulimit -f\)"):
        job._connect(FakeRay(), job.ClusterOptions(), listeners)


def test_a_local_ray_under_a_read_only_home_says_how_to_give_its_token(monkeypatch):
    """Ray (2.60) saves a token in ~/.ray/auth_token before a local instance starts: a read-only
    $HOME failed with a bare PermissionError naming the folder. RAY_AUTH_TOKEN skips the file."""
    import resource

    from adadiff.scaleout import job

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            raise PermissionError(13, "Permission denied", "/home/me/.ray")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    listeners = job._Listeners(None, None, 10.0)
    with pytest.raises(ConfigError) as err:
        job._connect(FakeRay(), job.ClusterOptions(), listeners)
    message = str(err.value)
    assert "Permission denied: '/home/me/.ray'" in message and "RAY_AUTH_TOKEN" in message
    assert "\n" not in message


def test_a_local_ray_without_a_home_folder_says_how_to_give_its_token(monkeypatch):
    """$HOME unset and no passwd entry (docker run --user N): Ray's Path.home() raised, and the
    error was "Could not determine home directory." alone."""
    import resource

    from adadiff.scaleout import job

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    listeners = job._Listeners(None, None, 10.0)
    with pytest.raises(ConfigError, match=r"home directory; .*set \$HOME.*RAY_AUTH_TOKEN"):
        job._connect(FakeRay(), job.ClusterOptions(), listeners)


def test_a_cluster_that_wants_a_token_says_so(monkeypatch):
    """A cluster with token authentication refuses a process without RAY_AUTH_MODE=token; Ray
    said why only in the cause it chains: the error was "Failed to connect to Ray cluster"."""
    from adadiff.scaleout import job

    class FakeRay:  # as ray.init (2.60) raises it
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs) -> None:
            try:
                raise RuntimeError(
                    "Failed to connect to GCS. Last connection error: ... RPC error: "
                    "InvalidAuthToken: Authentication token is missing or incorrect."
                )
            except RuntimeError as exc:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.2:6379") from exc

    listeners = job._Listeners(None, None, 10.0)
    cluster = job.ClusterOptions(ray_address="10.0.0.2:6379")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"at 10\.0\.0\.2:6379; .*set RAY_AUTH_MODE=token"):
        job._connect(FakeRay(), cluster, listeners)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match=r"refused the token here \(RAY_AUTH_TOKEN"):
        job._connect(FakeRay(), cluster, listeners)


def test_ray_address_where_nothing_answers_fails_fast(folder, tmp_path, capsys, monkeypatch):
    """ray.init retries an address nobody listens on for minutes, printing only its own
    warnings; the job says so in one line before it calls Ray."""
    import socket

    from adadiff.scaleout import job

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def no_ray() -> None:
        raise AssertionError("Ray was imported for an address nobody answers at")

    monkeypatch.setattr(job, "import_ray", no_ray)
    out = tmp_path / "out"
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        args = ["upscale-many", str(folder), str(out), "--ray-address", address]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"nothing answers at 127.0.0.1:{port}" in err
        assert "Traceback" not in err
    job.check_reachable("auto")  # left to Ray
    job.check_reachable("::1")  # IPv6 without brackets: no port can be told apart; Ray's to say
    job.check_reachable(":1")  # no host: Ray's to say


def _answering(reply: bytes):
    """A one-connection server on localhost that reads the client's first bytes and sends
    ``reply``; returns its port."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(64)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def test_ray_address_where_something_else_answers_fails_fast(folder, tmp_path, capsys, monkeypatch):
    """A web server or another port of the head node passed a bare connect, and ray.init then
    retried it for minutes; a gRPC server (Ray's GCS, its client server) still passes."""
    from adadiff.scaleout import job

    def no_ray() -> None:
        raise AssertionError("Ray was imported for an address where Ray does not answer")

    monkeypatch.setattr(job, "import_ray", no_ray)
    port = _answering(b"HTTP/1.0 400 Bad request\r\n\r\n")
    address = f"127.0.0.1:{port}"
    args = ["upscale-many", str(folder), str(tmp_path / "out"), "--ray-address", address]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"something answers at 127.0.0.1:{port}, but not Ray" in err
    assert "leave out --ray-address" in err
    # Ray's own variable is checked the same way.
    port = _answering(b"")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["upscale-many", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"RAY_ADDRESS 127.0.0.1:{port}: something answers" in err
    assert "unset RAY_ADDRESS" in err
    # an HTTP/2 server's first frame, SETTINGS (type 4), is what gRPC answers
    job.check_reachable(f"127.0.0.1:{_answering(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))}")


def test_missing_model_or_engines_fail_before_ray_starts(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["upscale-many", str(folder), str(out), "--model", str(tmp_path / "nope")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    args = ["upscale-many", str(folder), str(out), "--backend", "onnxruntime"]
    assert main([*args, "--engines", str(tmp_path / "none")]) == 2
    assert "run adadiff export first" in capsys.readouterr().err
    from adadiff.scaleout.job import check_local_paths

    for model in ("tiny", "preset:tiny", str(SHIPPED / "tiny")):  # a preset has no folder here
        check_local_paths(JobSettings(model=model))


def test_a_refused_job_leaves_no_empty_output_folder(ray_cluster, folder, tmp_path):
    from adadiff.scaleout.job import ClusterOptions, run_job

    out = tmp_path / "new-out"
    with pytest.raises(ConfigError, match="lower --workers"):
        run_job(folder, out, JobSettings(), ClusterOptions(workers=8))
    assert not out.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(ConfigError, match="lower --workers"):
        run_job(folder, kept, JobSettings(), ClusterOptions(workers=8))
    assert kept.is_dir()  # a folder the user made stays


def test_a_refused_job_keeps_a_new_output_folder_that_holds_files(folder, tmp_path, monkeypatch):
    """Only an empty folder the job made goes: a refusal that came after a file was written
    keeps the folder, and the user hears of the refusal (not of a folder that is not empty)."""
    from adadiff.scaleout import job

    def refused(plan, output_dir, *args):
        (output_dir / "coffee.png").write_bytes(b"image")
        raise ConfigError("refused after an output was written")

    monkeypatch.setattr(job, "_run_planned", refused)
    out = tmp_path / "new-out"
    with pytest.raises(ConfigError, match="refused after an output"):
        job.run_job(folder, out, JobSettings(), job.ClusterOptions())
    assert (out / "coffee.png").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "--workers must be at least 1"),
        ({"cpus_per_worker": 0.0}, "--cpus-per-worker must be > 0"),
        ({"gpus_per_worker": -1.0}, "--gpus-per-worker must be >= 0"),
        # from Python (the command line refuses NaN itself): NaN passed both comparisons
        ({"cpus_per_worker": float("nan")}, "--cpus-per-worker must be > 0"),
        ({"gpus_per_worker": float("nan")}, "--gpus-per-worker must be >= 0"),
        ({"queue": 0}, "--queue must be at least 1"),
        ({"threads": 0}, "--threads must be at least 1"),
    ],
)
def test_cluster_options_refuse_what_no_worker_can_run(options, message):
    from adadiff.scaleout.job import ClusterOptions

    with pytest.raises(ConfigError, match=message):
        ClusterOptions(**options)


def test_a_negative_progress_interval_is_refused():
    from adadiff.scaleout.job import _Listeners

    with pytest.raises(ValueError, match="progress_every must be >= 0 seconds, got -1"):
        _Listeners(None, None, -1.0)
    assert _Listeners(None, print, 0.0).wait_seconds() == 0.0


def test_a_worker_gets_its_whole_cpus_as_threads():
    from adadiff.scaleout.job import ClusterOptions, worker_threads

    ClusterOptions(workers=1, cpus_per_worker=0.5, gpus_per_worker=0.0, queue=1, threads=1)
    assert [worker_threads(cpus) for cpus in (0.5, 1.0, 1.5, 2.0)] == [1, 1, 1, 2]


def test_a_job_with_nothing_to_upscale_ends_cleanly(tmp_path):
    """No image to send (an empty folder, or every output up to date): no Ray, a job report."""
    empty = tmp_path / "in"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["upscale-many", str(empty), str(out)]) == 0
    assert json.loads((out / "adadiff-job.json").read_text())["images"] == 0


def test_a_later_job_removes_what_a_killed_one_left_half_written(tmp_path):
    """A SIGKILL between writing a temporary file and renaming it leaves a hidden file for
    good. A later job removes those named as adadiff names them and untouched for an hour (a
    younger one may be another job's write under way, into the same folder), and no others."""
    import time

    from adadiff import imageio
    from adadiff.scaleout.job import STALE_TEMP_SECONDS, ClusterOptions, run_job

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()

    def temp(name: str) -> Path:
        fd, path = imageio._open_temp(out / name)
        os.close(fd)
        return path

    stale = [temp("coffee.png"), temp("coffee.png.json"), temp("adadiff-job.json")]
    live = temp("chelsea.png")
    kept = [out / ".notes.0123456789ab.txt", out / "photo.0123456789ab.tmp.png", out / ".keep"]
    for path in kept:
        path.write_text("the user's")
    folder = out / ".album.0123456789ab.tmp.png"
    folder.mkdir()
    hour_ago = time.time() - STALE_TEMP_SECONDS - 60
    for path in [*stale, *kept, folder]:
        os.utime(path, (hour_ago, hour_ago))
    lines: list[str] = []
    run_job(src, out, JobSettings(), ClusterOptions(), on_status=lines.append)
    assert not any(path.exists() for path in stale)
    assert live.exists() and folder.is_dir() and all(path.exists() for path in kept)
    assert lines[0].startswith(f"removed 3 temporary files left in {out.resolve()}")


def test_an_output_that_cannot_be_written_fails_that_image_alone(folder, tmp_path):
    from adadiff.scaleout.job import _Dispatcher

    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings()
    task = make_plan(folder, out, settings).todo[0]
    dispatcher = object.__new__(_Dispatcher)  # _write needs only the settings and digests
    dispatcher.settings, dispatcher.digests = settings, {}
    task.output.mkdir()  # a folder where the image should go: the write fails
    reply = {"status": "done", "image": b"png", "report": {"unet_evaluations": 5, "tiles": 1}}
    record = dispatcher._write(task, reply)
    assert record.status == "failed" and "cannot write" in (record.error or "")
    assert not task.report.exists()
    task.output.rmdir()
    task.report.mkdir()  # now the report cannot be written: its image does not stay without it
    record = dispatcher._write(task, reply)
    assert record.status == "failed" and not task.output.exists()


def test_an_output_past_the_file_size_limit_fails_that_image_and_the_job_goes_on(tmp_path):
    """EFBIG is about the one file (ulimit -f, FAT32's 4 GiB): a smaller image still fits, so
    the job is not stopped as it is for a full disk."""
    from helpers import run_with_file_size_limit

    src = tmp_path / "in"
    src.mkdir()
    for name in ("big", "small"):
        Image.new("RGB", (4, 4)).save(src / f"{name}.png")
    body = """
import json
from pathlib import Path
from adadiff.scaleout.job import _Dispatcher
from adadiff.scaleout.plan import JobSettings, make_plan
root = Path(sys.argv[1])
(root / "out").mkdir()
settings = JobSettings()
big, small = make_plan(root / "in", root / "out", settings).todo
dispatcher = object.__new__(_Dispatcher)
dispatcher.settings, dispatcher.digests, dispatcher.stopped = settings, {}, None
report = {"unet_evaluations": 5, "tiles": 1}
# limited
records = [
    dispatcher._write(task, {"status": "done", "image": image, "report": report})
    for task, image in ((big, b"x" * 100_000), (small, b"png"))
]
print(json.dumps([[r.status, r.error] for r in records] + [dispatcher.stopped]))
"""
    *records, stopped = json.loads(run_with_file_size_limit(body, tmp_path, 50_000))
    assert records[0][0] == "failed" and "File too large" in records[0][1]
    assert records[1] == ["done", None]
    assert stopped is None
    assert (tmp_path / "out" / "small.png.json").is_file()
    assert not (tmp_path / "out" / "big.png").exists()


def test_a_link_in_the_output_folder_is_replaced_not_written_through(folder, tmp_path):
    """OUTPUT_DIR/NAME.png as a link to the input (or a cp -rs copy of an earlier output folder):
    writing through it replaced the input itself with its upscale."""
    from adadiff.scaleout.job import _Dispatcher

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(folder / "coffee.png", src / "coffee.png")
    original = (src / "coffee.png").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "coffee.png").symlink_to(src / "coffee.png")
    (out / "coffee.png.json").symlink_to(src / "coffee.png")
    settings = JobSettings()
    task = make_plan(src, out, settings).todo[0]
    dispatcher = object.__new__(_Dispatcher)  # _write needs only the settings and digests
    dispatcher.settings, dispatcher.digests = settings, {}
    reply = {"status": "done", "image": b"upscaled", "report": {"unet_evaluations": 5, "tiles": 1}}
    assert dispatcher._write(task, reply).status == "done"
    assert (src / "coffee.png").read_bytes() == original
    assert not task.output.is_symlink() and task.output.read_bytes() == b"upscaled"
    assert not task.report.is_symlink() and json.loads(task.report.read_text())["tiles"] == 1


def test_a_stop_between_image_and_report_leaves_no_old_report(folder, tmp_path, monkeypatch):
    """The image is replaced before its report: if the report write fails (or the job is killed
    there), the old report must be gone, or a rerun takes the new image for the old one."""
    from adadiff.scaleout import job
    from adadiff.scaleout.job import _Dispatcher

    out = tmp_path / "out"
    out.mkdir()
    settings = JobSettings()
    task = make_plan(folder, out, settings).todo[0]
    task.output.write_bytes(b"old image")
    task.report.write_text('{"job": "old stamp"}')
    real = job.write_bytes_atomic

    def killed_after_the_image(path, data, **kwargs):
        if path == task.report:
            raise KeyboardInterrupt  # stands for a SIGKILL: no clean-up runs
        real(path, data, **kwargs)

    monkeypatch.setattr(job, "write_bytes_atomic", killed_after_the_image)
    dispatcher = object.__new__(_Dispatcher)
    dispatcher.settings, dispatcher.digests = settings, {}
    reply = {"status": "done", "image": b"new image", "report": {"unet_evaluations": 5}}
    with pytest.raises(KeyboardInterrupt):
        dispatcher._write(task, reply)
    assert task.output.read_bytes() == b"new image"
    assert not task.report.exists()
    assert not is_done(task, settings)


def test_an_output_folder_that_refuses_files_fails_before_ray_starts(
    folder, tmp_path, monkeypatch, capsys
):
    from adadiff import imageio
    from adadiff.scaleout import job

    def no_ray():
        raise AssertionError("Ray started for a job whose output folder refuses files")

    def refuse(target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(job, "import_ray", no_ray)
    monkeypatch.setattr(imageio, "_open_temp", refuse)
    assert main(["upscale-many", str(folder), str(tmp_path / "out")]) == 2
    assert "OUTPUT_DIR: cannot write in" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["upscale-many", str(folder), str(blocker / "out")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_sigterm_stops_upscale_many_like_ctrl_c(folder, tmp_path):
    """kill, timeout and batch schedulers send SIGTERM; ray.init's own handler aborted with a
    stack dump and left the local Ray running."""
    import subprocess
    import sys
    import time

    pytest.importorskip("ray", reason="ray is not installed (pip install 'adadiff[ray]')")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        shutil.copy(folder / "coffee.png", src / f"coffee{i}.png")
    exe = Path(sys.executable).with_name("adadiff")
    cmd = [str(exe), "upscale-many", str(src), str(tmp_path / "out"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    deadline = time.monotonic() + 300
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        err += line
        if "[1/8]" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=120)
    err += rest
    assert "[1/8]" in err, err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert "adadiff: interrupted" in err
    assert "SIGTERM received" not in err


def test_a_full_output_disk_stops_the_job_instead_of_upscaling_the_rest(
    ray_cluster, folder, tmp_path, capsys, monkeypatch
):
    """Every image after the first ENOSPC would be upscaled in full and then fail to write."""
    from adadiff.errors import OutputPathError
    from adadiff.scaleout import job

    real = job.write_bytes_atomic

    def full(path, data, **kwargs):
        if Path(path).suffix == ".png":  # the job report still fits
            raise OutputPathError(f"{path}: cannot write") from OSError(28, "No space left")
        real(path, data, **kwargs)

    monkeypatch.setattr(job, "write_bytes_atomic", full)
    out = tmp_path / "out"
    argv = ["upscale-many", str(folder), str(out), "--workers", "1", "--queue", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the job stopped early: the output folder takes no more files (No space left)" in err
    report = json.loads((out / "adadiff-job.json").read_text())
    errors = [r.get("error") or "" for r in report["records"]]
    assert report["done"] == 0
    assert sum(e.startswith("not started: the output folder") for e in errors) >= 2


def test_a_stopped_job_starts_no_image_again_when_a_worker_dies(folder, tmp_path):
    """After a full disk stopped the job, a lost worker's images and the queue stay unsent."""
    from adadiff.scaleout.job import _Dispatcher

    out = tmp_path / "out"
    out.mkdir()
    tasks = make_plan(folder, out, JobSettings()).todo
    dispatcher = object.__new__(_Dispatcher)
    dispatcher.pending = list(reversed(tasks))
    dispatcher.queue = 2
    dispatcher.stopped = "the output folder takes no more files (No space left on device)"
    sent = []
    dispatcher._send = lambda index, in_flight: sent.append(dispatcher.pending.pop())
    dispatcher._refill({0, 1}, {})
    assert sent == [] and len(dispatcher.pending) == len(tasks)
    record = dispatcher._not_started(tasks[0])
    assert record.status == "failed" and record.error.startswith("not started: the output")
    # an image whose worker died fails as not started instead of going back to be sent
    dispatcher.attempts, dispatcher.suspects, dispatcher.waking = {}, set(), {}
    record = dispatcher._gone(tasks[0], RuntimeError("worker died"), 0, {0, 1}, died=True)
    assert record is not None and record.error.startswith("not started: the output")
    assert len(dispatcher.pending) == len(tasks)


def test_a_suspect_waits_for_a_worker_with_nothing_in_flight(folder, tmp_path):
    from adadiff.scaleout.job import _Dispatcher

    tasks = make_plan(folder, tmp_path / "out", JobSettings()).todo[:3]
    dispatcher = object.__new__(_Dispatcher)
    dispatcher.pending = [tasks[2], tasks[1]]  # tasks[1], next, was in flight when a worker died
    dispatcher.suspects = {tasks[1].source}
    dispatcher.queue, dispatcher.stopped, dispatcher.waking = 3, None, {}

    def send(index: int, flight: dict) -> None:
        flight[object()] = (dispatcher.pending.pop(), index, 0.0)

    dispatcher._send = send
    in_flight = {object(): (tasks[0], 0, 0.0)}  # the one worker has another image under way
    dispatcher._refill({0}, in_flight)
    assert len(in_flight) == 1 and dispatcher.pending == [tasks[2], tasks[1]]


def test_workers_are_checked_against_the_clusters_cpus_and_gpus():
    """Ray would wait forever for a worker the cluster has no room for."""
    from adadiff.scaleout.job import ClusterOptions, _Dispatcher

    dispatcher = object.__new__(_Dispatcher)
    dispatcher.ray = type("Ray", (), {"cluster_resources": lambda: {"CPU": 2.0}})
    for options, count in (({"workers": 2}, 2), ({}, 2), ({"cpus_per_worker": 0.5}, 4)):
        dispatcher.cluster = ClusterOptions(**options)
        assert dispatcher._worker_count() == count
    dispatcher.cluster = ClusterOptions(workers=3)
    with pytest.raises(ConfigError, match="3 workers need 3 CPU in all but the Ray cluster has 2"):
        dispatcher._worker_count()
    dispatcher.cluster = ClusterOptions(gpus_per_worker=1.0)
    with pytest.raises(ConfigError, match="has 2 CPU and 0 GPU, too few for one worker"):
        dispatcher._worker_count()


def test_an_images_error_is_the_last_line_of_its_workers_traceback():
    from adadiff.scaleout.job import _cause

    traceback = 'Traceback (most recent call last):\n  File "w.py", line 1\nValueError: bad pixels'
    assert _cause(RuntimeError(traceback)) == "ValueError: bad pixels"
    assert _cause(RuntimeError("x" * 600)) == "x" * 500
    assert _cause(RuntimeError()) == "RuntimeError"


def test_a_lost_image_goes_again_until_its_last_try_or_its_last_worker(folder, tmp_path):
    from adadiff.scaleout.job import MAX_ATTEMPTS, _Dispatcher

    task = make_plan(folder, tmp_path / "out", JobSettings()).todo[0]
    dispatcher = object.__new__(_Dispatcher)
    dispatcher.attempts = {}
    for _ in range(MAX_ATTEMPTS - 1):
        assert dispatcher._lost(task, RuntimeError("worker died"), {0}) is None
    record = dispatcher._lost(task, RuntimeError("worker died"), {0})
    assert record is not None and record.status == "failed"
    assert record.error == f"its worker died or stopped {MAX_ATTEMPTS} times: worker died"
    dispatcher.attempts = {}
    record = dispatcher._lost(task, RuntimeError("worker died"), set())
    assert record is not None and record.error == "no worker left: worker died"


def test_an_image_in_flight_when_its_worker_died_goes_again_alone(folder, tmp_path):
    """One image that kills its worker (out of memory) was resent by Ray with every image beside
    it until the worker's restarts ran out; then all of them, and every image not yet sent,
    failed with "no worker left". Now each goes again alone, once the worker is back."""
    from adadiff.scaleout.job import _Dispatcher

    out = tmp_path / "out"
    out.mkdir()
    tasks = make_plan(folder, out, JobSettings()).todo[:4]
    pings: list[int] = []

    class Actor:
        def __init__(self, index: int) -> None:
            self.info = type("Info", (), {"remote": lambda _: pings.append(index) or index})()

    class Unavailable(Exception):
        pass

    dispatcher = object.__new__(_Dispatcher)
    dispatcher.actors = [Actor(0), Actor(1)]
    dispatcher.pending = list(reversed(tasks[2:]))  # the first two were in flight
    dispatcher.queue = 3
    dispatcher.stopped = None
    dispatcher.attempts, dispatcher.suspects, dispatcher.waking = {}, set(), {}
    in_flight: dict = {}

    def send(index: int, flight: dict) -> None:
        task = dispatcher.pending.pop()
        flight[object()] = (task, index, 0.0)

    dispatcher._send = send
    alive = {0, 1}
    # worker 0 died with two images in flight; Ray restarts it
    died = [tasks[0], tasks[1]]
    for task in died:
        assert dispatcher._gone(task, Unavailable(), 0, alive, died=True, restarting=True) is None
    assert alive == {0, 1} and pings == [0]  # asked once whether it is back
    dispatcher._refill(alive, in_flight)
    # worker 1, idle, takes one suspect and nothing else; worker 0, restarting, nothing
    assert [(t.source, i) for t, i, _ in in_flight.values()] == [(died[1].source, 1)]
    dispatcher.waking.clear()  # worker 0 is back
    dispatcher._refill(alive, in_flight)
    assert [(t.source, i) for t, i, _ in in_flight.values()][1:] == [(died[0].source, 0)]
    assert len(dispatcher.pending) == 2
    in_flight.clear()  # both done: the others go out, several to a worker
    dispatcher._refill(alive, in_flight)
    assert not dispatcher.pending and len(in_flight) == 2


def test_a_preset_has_one_identity_however_it_is_spelled():
    from adadiff.scaleout.plan import model_identity

    model_identity.cache_clear()
    assert model_identity("sd21-base", None) == model_identity("preset:sd21-base", None)
    assert model_identity("tiny", None) == model_identity("preset:tiny", None)
    assert Upscaler.from_pretrained("preset:tiny").model_name == "tiny"


def test_an_interrupted_job_writes_its_own_report(folder, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) mid-job: adadiff-job.json must describe this job, not an earlier one
    whose settings and outputs it has partly replaced."""
    from adadiff.scaleout import job

    out = tmp_path / "out"
    out.mkdir()
    (out / "adadiff-job.json").write_text('{"settings": {"seed": 0}, "done": 5}\n')

    class Interrupted:
        def __init__(self, ray, settings, cluster, todo, output_dir, listeners):
            self.todo, self.actors, self.info, self.stopped = todo, [], [], None

        def run(self, records, total):
            task = self.todo[0]
            records.append(job.ImageRecord(str(task.source), str(task.output), "done"))
            raise KeyboardInterrupt

    monkeypatch.setattr(job, "import_ray", lambda: type("Ray", (), {"shutdown": lambda: None}))
    monkeypatch.setattr(job, "_connect", lambda ray, cluster, listeners: True)
    monkeypatch.setattr(job, "_Dispatcher", Interrupted)
    assert main(["upscale-many", str(folder), str(out), "--seed", "7", "-q"]) == 130
    report = json.loads((out / "adadiff-job.json").read_text())
    assert report["settings"]["seed"] == 7 and report["stopped"] == "interrupted"
    todo = make_plan(folder, out, JobSettings(seed=7)).todo
    assert (report["images"], report["done"], report["failed"]) == (len(todo), 1, len(todo) - 1)
    assert all(r["error"] == job.INTERRUPTED for r in report["records"][1:])
