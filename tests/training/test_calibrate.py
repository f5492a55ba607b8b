from __future__ import annotations

import math

import numpy as np
import pytest

from adadiff.config import DEFAULT_METRICS, DTSSConfig
from adadiff.errors import ConfigError
from adadiff.runtime.policy import Category, dtss_decide, gains, quality
from adadiff.training.calibrate import (
    NR_STARTS,
    Trajectories,
    calibrate,
    fit_weights,
    replay_exits,
)

T = np.arange(999, 0, -20)  # 50 steps, like jumps of 20


def synthetic(k: int = 24, seed: int = 0) -> Trajectories:
    """Each tile's LPIPS falls to a minimum at its own timestep, then rises (grain); MMLE's
    second score tracks LPIPS plus noise, the others are noise or a trend shared by all."""
    rng = np.random.default_rng(seed)
    best_t = rng.uniform(50, 450, k)
    lpips = 0.3 + 1e-6 * (T[None, :] - best_t[:, None]) ** 2 + rng.normal(0, 0.002, (k, len(T)))
    scores = rng.normal(0, 1, (k, len(T), 6))
    scores[:, :, 1] = lpips + rng.normal(0, 0.001, lpips.shape)  # lpips-like: lower is better
    scores[:, :, 4] = 30 + 0.01 * T[None, :]  # a shared trend carries no within-tile signal
    return Trajectories(t=T, scores=scores, lpips=lpips, photo=np.arange(k) % 3)


def test_fit_weights_finds_the_score_that_tracks_quality():
    traj = synthetic()
    w = fit_weights(traj.scores, traj.lpips, traj.t < 500)
    assert w[1] < 0  # higher LPIPS-like score = worse
    assert abs(w[1]) * traj.scores[:, :, 1].std() > 10 * max(
        abs(w[c]) * traj.scores[:, :, c].std() for c in (0, 2, 3, 5)
    )


def test_replay_exits_after_the_peak_and_returns_the_best_estimate():
    r = -np.array([[5, 4, 3, 2, 1, 2, 3, 4.0]])  # peak at step 4
    t = np.array([800, 700, 600, 450, 350, 250, 150, 50])
    chosen, steps = replay_exits(r, t, tau=0.5, nr_start_t=500)
    assert chosen.tolist() == [4]
    assert steps.tolist() == [6]  # the step that saw the fall is taken, then the tile exits
    # a tau larger than any fall never exits: every step runs and, as in the sampler, the tile
    # ends with its last estimate (the best one is kept only by a saturated exit)
    chosen, steps = replay_exits(r, t, tau=5.0, nr_start_t=500)
    assert (chosen.tolist(), steps.tolist()) == ([7], [8])
    # a fall at the very last step is still an exit: the best estimate comes back
    r3 = -np.array([[5, 4, 3, 2, 1, 0.5, 0.4, 3.0]])
    assert replay_exits(r3, t, tau=0.5, nr_start_t=500)[0].tolist() == [6]
    # before the second half nothing competes, even a better first-half estimate
    r2 = np.array([[9.0, 1, 1, 2, 3, 2, 1, 0]])  # falls by 1 after step 4: exits at step 5
    assert replay_exits(r2, t, tau=0.5, nr_start_t=500)[0].tolist() == [4]


def test_replay_matches_the_real_policy_with_calibrated_weights():
    """The replay and the sampler's DTSS agree on when a tile exits."""
    traj = synthetic(k=6)
    metrics, dtss, _ = calibrate(traj, DEFAULT_METRICS, DTSSConfig())
    w = np.array([m.weight for m in metrics])
    r = traj.scores @ w
    _, steps = replay_exits(r, traj.t, dtss.tau, dtss.nr_start_t)
    for k in range(len(r)):
        previous, n = None, 0
        for j, t in enumerate(traj.t):
            n += 1
            q = quality(traj.scores[k, j].tolist(), metrics)
            g_fr, g_nr = gains(q, previous, int(t), dtss)
            previous = q
            if dtss_decide(int(t), g_fr, g_nr, dtss).category is Category.SATURATED:
                break
        assert n == steps[k]


def test_calibrate_beats_the_fixed_exit_on_tiles_with_their_own_peak():
    traj = synthetic(k=36)
    metrics, dtss, report = calibrate(traj, DEFAULT_METRICS, DTSSConfig())
    assert dtss.exit_on == "total"
    assert [m.name for m in metrics] == [m.name for m in DEFAULT_METRICS]
    choice, ref = report["choice"], report["reference"]
    assert choice["lpips"] < ref["fixed_exit_t<400"] - 0.005
    assert choice["lpips"] < ref["last_estimate"]
    assert choice["steps"] < len(T)


def test_calibrate_budget_and_photo_checks():
    traj = synthetic()
    _, _, report = calibrate(traj, DEFAULT_METRICS, DTSSConfig(), budget=40)
    assert report["choice"]["steps"] <= 40
    with pytest.raises(ConfigError, match="budget"):
        calibrate(traj, DEFAULT_METRICS, DTSSConfig(), budget=2)
    one = Trajectories(t=traj.t, scores=traj.scores, lpips=traj.lpips, photo=traj.photo * 0)
    with pytest.raises(ConfigError, match="two photos"):
        calibrate(one, DEFAULT_METRICS, DTSSConfig())
    with pytest.raises(ConfigError, match="descending"):
        Trajectories(t=traj.t[::-1], scores=traj.scores, lpips=traj.lpips, photo=traj.photo)


def test_fit_weights_sees_only_changes_along_a_trajectory():
    """Each tile's mean is removed, so a per-tile offset of every score changes nothing; a score
    that never moves gets no weight instead of a division by its zero spread."""
    traj = synthetic()
    rows = traj.t < 500
    w = fit_weights(traj.scores, traj.lpips, rows)
    offset = np.random.default_rng(1).normal(0, 50, (len(traj.lpips), 1, traj.scores.shape[-1]))
    shifted = fit_weights(traj.scores + offset, traj.lpips, rows)
    np.testing.assert_allclose(shifted, w, rtol=1e-6, atol=1e-12)
    flat = traj.scores.copy()
    flat[:, :, 3] = 7.0
    w_flat = fit_weights(flat, traj.lpips, rows)
    assert np.all(np.isfinite(w_flat)) and w_flat[3] == 0.0


def test_replay_exits_at_the_policys_edges():
    """The replay words the exit as DTSS does: the second half is t < nr_start_t, a fall of
    exactly tau exits (g <= -tau), and of two equal estimates the first is kept (the sampler's
    best_r only moves on a strictly higher R)."""
    t = np.array([800, 600, 500, 400, 300, 200])
    # t = 500 is not yet the second half: its high R never competes
    r = np.array([[0.0, 0.0, 9.0, 1.0, 1.0, 1.0]])
    chosen, steps = replay_exits(r, t, tau=0.5, nr_start_t=500)
    assert (chosen.tolist(), steps.tolist()) == ([3], [4])
    t = np.array([800, 400, 300, 200, 100])
    tau = math.tanh(0.5)
    r = np.array([[0.0, 1.0, 2.0, 1.5, 3.0]])  # falls by exactly atanh(tau) at step 3
    assert dtss_decide(200, 0.0, math.tanh(-0.5), DTSSConfig(tau=tau)).category is (
        Category.SATURATED
    )
    chosen, steps = replay_exits(r, t, tau=tau, nr_start_t=500)
    assert (chosen.tolist(), steps.tolist()) == ([2], [4])
    tie = np.array([[0.0, 2.0, 2.0, 1.0, 1.0]])
    assert replay_exits(tie, t, tau=0.5, nr_start_t=500)[0].tolist() == [1]


def test_calibrate_picks_the_cheapest_near_best_pair_and_reports_its_references(monkeypatch):
    from adadiff.training import calibrate as calibrate_module

    traj = synthetic()
    sizes: list[int] = []
    real_fit = calibrate_module.fit_weights

    def fit_spy(scores: np.ndarray, lpips: np.ndarray, rows: np.ndarray) -> np.ndarray:
        sizes.append(len(scores))
        return real_fit(scores, lpips, rows)

    monkeypatch.setattr(calibrate_module, "fit_weights", fit_spy)
    metrics, dtss, report = calibrate(traj, DEFAULT_METRICS, DTSSConfig())
    # every replay's weights leave one photo's 8 tiles out; the written ones see all 24
    assert sizes[-1] == 24 and set(sizes[:-1]) == {16}
    # the written weights are fitted on the chosen second half (here not the widest start)
    assert dtss.nr_start_t != max(NR_STARTS)
    np.testing.assert_allclose(
        [m.weight for m in metrics], real_fit(traj.scores, traj.lpips, traj.t < dtss.nr_start_t)
    )
    ref = report["reference"]
    assert ref["last_estimate"] == pytest.approx(traj.lpips[:, -1].mean())
    assert ref["fixed_exit_t<400"] == pytest.approx(traj.lpips[:, traj.t == 399].mean())
    candidates = report["candidates"]
    best = min(c["lpips"] for c in candidates)
    cheapest = min(c["steps"] for c in candidates)
    exact = calibrate(traj, DEFAULT_METRICS, DTSSConfig(), tolerance=0.0)[2]["choice"]
    assert exact["lpips"] == best
    # every pair within a wide tolerance: the fewest steps win, not the lowest LPIPS
    loose = calibrate(traj, DEFAULT_METRICS, DTSSConfig(), tolerance=1.0)[2]["choice"]
    assert loose["steps"] == cheapest and loose["lpips"] > best
    # a budget of exactly the cheapest pair's steps admits it
    fits = calibrate(traj, DEFAULT_METRICS, DTSSConfig(), budget=cheapest)[2]["choice"]
    assert fits["steps"] == cheapest
    # a start that leaves one second-half step cannot fit weights and is not a candidate
    report = calibrate(traj, DEFAULT_METRICS, DTSSConfig(), starts=(30, 500))[2]
    assert {c["nr_start_t"] for c in report["candidates"]} == {500}
    with pytest.raises(ConfigError, match="descending"):
        Trajectories(t=np.array([900, 900]), scores=traj.scores[:, :2], lpips=traj.lpips[:, :2],
                     photo=traj.photo)  # fmt: skip


@pytest.fixture
def no_recording(monkeypatch):
    """calibrate's recording stubbed out: a command the test expects refused that is not stops
    at once ("stop: recorded", exit 2) instead of recording for minutes and then rewriting the
    model folder, the session's shared tiny_dir among them."""
    from adadiff.training import calibrate as calibrate_module

    def stop(*args: object, **kwargs: object) -> None:
        raise ConfigError("stop: recorded")

    monkeypatch.setattr(calibrate_module, "record", stop)


def test_calibrate_command_records_fits_and_writes_the_config(
    tmp_path, tiny_dir, metric_cache, capsys
):
    """End to end on the seeded random tiny: 4 tuning tiles, jumps of 200 (5 steps)."""
    import json
    import shutil

    from adadiff.cli import main
    from adadiff.config import ModelConfig

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    before = ModelConfig.load(folder)
    args = ["calibrate", str(folder), "--crops", "2"]  # the validation photos by default
    assert main([*args, "--interval", "200", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "tau " in out and "weights: psnr" in out
    # 4 tiles x 5 steps: the recording's last progress line counts every estimate
    assert "recorded 100% of the estimates (20/20" in captured.err
    note = "the calibrated DTSS runs with --schedule adaptive"
    assert (note in out) == (before.default_schedule != "adaptive")
    after = ModelConfig.load(folder)
    assert after.dtss.exit_on == "total" and before.dtss.exit_on == "nr"
    assert [m.name for m in after.mmle.metrics] == [m.name for m in before.mmle.metrics]
    assert after.unet == before.unet and after.tile_size == before.tile_size
    report = json.loads((folder / "calibration.json").read_text())
    assert report["tiles"] == 4 and report["photos"] == ["grass", "rocket"]
    assert report["before"]["dtss"]["exit_on"] == "nr"
    # the config holds what the report says was chosen, and the fitted weights, as printed
    choice = report["choice"]
    assert (after.dtss.tau, after.dtss.nr_start_t) == (choice["tau"], choice["nr_start_t"])
    printed = out.split("weights: ", 1)[1].splitlines()[0]
    assert printed == ", ".join(f"{m.name} {m.weight:+.4g}" for m in after.mmle.metrics)
    assert [m.weight for m in after.mmle.metrics] != [m.weight for m in before.mmle.metrics]


def test_calibrate_command_refuses_hold_out_photos_and_bare_presets(
    tmp_path, tiny_dir, no_recording, capsys
):
    from adadiff.cli import main

    assert main(["calibrate", str(tiny_dir), "--photos", "chelsea,astronaut"]) == 2
    assert "hold-out" in capsys.readouterr().err
    # the set's name too: refused as the hold-out photos, not as fewer than two photos
    assert main(["calibrate", str(tiny_dir), "--photos", "holdout"]) == 2
    err = capsys.readouterr().err
    assert "hold-out photos ['astronaut', 'chelsea', 'coffee', 'gravel']" in err, err
    assert "tune on the validation photos (the default)" in err, err
    assert main(["calibrate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no adadiff.json" in err
    # the built-in model's own folder, wherever adadiff is installed, not a path relative to
    # a checkout that the working directory may not be
    from adadiff.presets import SHIPPED

    assert f"copy it: cp -r {SHIPPED / 'tiny'} DIR" in err
    # refused before anything is recorded
    assert main(["calibrate", str(tiny_dir), "--photos", "grass, grass"]) == 2
    assert "two different photos" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(tiny_dir), "--budget", "0"])
    assert "--budget" in capsys.readouterr().err
    assert main(["calibrate", str(tiny_dir), "--interval", "1000"]) == 2
    assert "use a smaller --interval" in capsys.readouterr().err
    # numpy's seeds are never negative: a one-line error, not its traceback after the load
    with pytest.raises(SystemExit):
        main(["calibrate", str(tiny_dir), "--crop-seed", "-1"])
    assert "--crop-seed: expected a number >= 0, got -1" in capsys.readouterr().err


def test_calibration_is_written_whole_or_not_at_all_on_a_full_disk(tmp_path):
    """calibrate rewrites a model folder's adadiff.json and calibration.json: a disk that fills
    after the config was written must not leave a new config beside a cut (or an older) report."""
    from pathlib import Path

    from helpers import run_with_file_size_limit

    from adadiff.config import ModelConfig

    folder = tmp_path / "model"
    folder.mkdir()
    ModelConfig.load(Path(__file__).parents[2] / "adadiff" / "weights" / "tiny").save(folder)
    (folder / "calibration.json").write_text('{"old": true}\n')
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    body = (
        "from dataclasses import replace\n"
        "from pathlib import Path\n"
        "from adadiff.config import ModelConfig\n"
        "from adadiff.errors import OutputPathError\n"
        "from adadiff.training.cli import write_calibration\n"
        "folder = Path(sys.argv[1])\n"
        "cfg = ModelConfig.load(folder)\n"
        "new = replace(cfg, dtss=replace(cfg.dtss, tau=0.004))\n"
        "report = {'rows': ['x' * 100] * 200}\n"  # larger than the limit, the config is not
        "# limited\n"
        "try:\n"
        "    write_calibration(folder, new, report)\n"
        "except OutputPathError as exc:\n"
        "    print('refused:', exc)\n"
    )
    limit = len(before["adadiff.json"]) + 512
    stdout = run_with_file_size_limit(body, folder, limit)
    assert stdout.startswith("refused:") and "calibration report" in stdout
    assert "no output file was changed" in stdout
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_calibrate_photos_take_set_names(tiny_dir, no_recording, capsys):
    """--photos validation means the validation photos, as for the benchmarks and training;
    the run is refused later (its --interval), after the names were read as the set."""
    from adadiff.cli import main

    assert main(["calibrate", str(tiny_dir), "--photos", "validation", "--interval", "1000"]) == 2
    err = capsys.readouterr().err
    assert "use a smaller --interval" in err and "two different photos" not in err


def test_recording_progress_is_a_line_every_interval_and_one_at_the_end(capsys):
    from adadiff.training.cli import recording_progress

    now = [0.0]
    show = recording_progress(every=10.0, clock=lambda: now[0])
    for t, done in ((1.0, 10), (5.0, 20), (11.0, 30), (12.0, 40), (13.0, 100)):
        now[0] = t
        show(done, 100)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "recorded 30% of the estimates (30/100, 11s, ETA 26s)",
        "recorded 100% of the estimates (100/100, 13s)",
    ]


def test_calibrating_a_linked_copy_never_rewrites_the_original(tmp_path):
    """A copy made of links (cp -rs) shares the original's files: the calibrated config and
    report replace the links in the copy, and the original model stays as it was."""
    from dataclasses import replace
    from pathlib import Path

    from adadiff.config import ModelConfig
    from adadiff.training.cli import write_calibration

    original = tmp_path / "original"
    original.mkdir()
    ModelConfig.load(Path(__file__).parents[2] / "adadiff" / "weights" / "tiny").save(original)
    (original / "calibration.json").write_text('{"old": true}\n')
    before = {p.name: p.read_bytes() for p in original.iterdir()}
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in original.iterdir():
        (copy / p.name).symlink_to(p)
    cfg = ModelConfig.load(copy)
    write_calibration(copy, replace(cfg, dtss=replace(cfg.dtss, tau=0.004)), {"new": True})
    assert {p.name: p.read_bytes() for p in original.iterdir()} == before
    assert not (copy / "adadiff.json").is_symlink()
    assert ModelConfig.load(copy).dtss.tau == 0.004
    assert (copy / "calibration.json").read_text() == '{\n "new": true\n}\n'


def test_calibrate_refuses_a_folder_it_cannot_write_before_recording(
    tmp_path, tiny_dir, monkeypatch, capsys
):
    """The calibration is written after minutes of recording: a read-only folder (a stand-in,
    as root writes anyway) fails at once, and --dry-run, which writes nothing, still runs."""
    import shutil
    from pathlib import Path

    from adadiff import imageio
    from adadiff.cli import main
    from adadiff.training import calibrate as calibrate_module

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    real_open_temp = imageio._open_temp

    def read_only(target: Path) -> tuple[int, Path]:
        if target.parent == folder:
            raise OSError(30, "Read-only file system", str(target))
        return real_open_temp(target)

    recorded: list[bool] = []

    def no_recording(*args: object, **kwargs: object) -> None:
        recorded.append(True)
        raise ConfigError("stop: recorded")

    monkeypatch.setattr(imageio, "_open_temp", read_only)
    monkeypatch.setattr(calibrate_module, "record", no_recording)
    args = ["calibrate", str(folder), "--crops", "1", "--interval", "200"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write in {folder} (Read-only file system)" in err
    assert "--dry-run" in err and not recorded
    assert main([*args, "--dry-run"]) == 2
    assert "stop: recorded" in capsys.readouterr().err and recorded


def test_fewest_steps_is_what_a_replay_that_always_exits_takes():
    from adadiff.training.calibrate import NR_STARTS, fewest_steps

    falling = -np.arange(len(T), dtype=np.float64)[None, :]  # R falls at every step: exit asap
    taken = [int(replay_exits(falling, T, 1e-3, s)[1][0]) for s in NR_STARTS]
    assert fewest_steps(T) == min(taken) == 6  # jumps of 20: t = 899 is the 6th step
    assert fewest_steps([999, 499]) is None  # one second-half step: nothing to fit
    assert fewest_steps([400, 300, 200]) == 2  # a tile never exits on its first step


def test_calibrate_budget_help_says_it_bounds_the_replay(capsys):
    """The budget is checked on the replay's fixed jumps; the sampler's tiers took 34 steps per
    tile on the very tuning tiles whose replay fitted a budget of 30 (tiny, 6 crops)."""
    from adadiff.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--budget BUDGET most UNet evaluations per tile on average in the replay" in text
    assert "a real run jumps by the model's tiers and may take more" in text


def test_calibrate_refuses_a_budget_below_any_exit_before_recording(
    tmp_path, tiny_dir, no_recording, capsys
):
    """--budget 5 with jumps of 20: no tile can exit before its 6th step, so no replay fits;
    that is said at once, not after minutes of recording."""
    from adadiff.cli import main

    args = ["calibrate", str(tiny_dir), "--crops", "1", "--dry-run"]
    assert main([*args, "--budget", "5.5"]) == 2
    err = capsys.readouterr().err
    assert "no calibration fits a budget of 5.5 steps per tile" in err
    assert "exits after 6 steps at the earliest" in err and "stop: recorded" not in err
    assert main([*args, "--budget", "6"]) == 2
    assert "stop: recorded" in capsys.readouterr().err


def test_calibrate_refuses_the_built_in_model_folder(no_recording, capsys):
    """The shipped tiny rewritten in place would change every --model tiny run; the copy that
    the missing-folder message asks for is the way. (record is stubbed: on a build without the
    check the run stops before anything is written.)"""
    from adadiff.cli import main
    from adadiff.presets import SHIPPED

    shipped = SHIPPED / "tiny"
    before = (shipped / "adadiff.json").read_bytes()
    args = ["calibrate", str(shipped), "--crops", "1", "--interval", "200"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is the built-in model 'tiny'" in err and "calibrate the copy" in err
    assert "stop: recorded" not in err
    assert main([*args, "--dry-run"]) == 2  # writes nothing, so it may look
    assert "stop: recorded" in capsys.readouterr().err
    assert (shipped / "adadiff.json").read_bytes() == before
    assert not (shipped / "calibration.json").exists()


def test_the_recorded_lpips_is_of_the_image_the_runtime_returns(cfg, images, monkeypatch):
    # the runtime returns a gray input gray; the recording measured the estimate's faint colour
    import torch

    from adadiff.models.bundle import build_random
    from adadiff.training import calibrate as calibrate_module
    from adadiff.training.pairs import PairStream

    seen: list[np.ndarray] = []

    def fake_lpips():
        def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            seen.append(a.numpy())
            return torch.zeros(len(a))

        return distance

    monkeypatch.setattr(calibrate_module, "load_lpips", fake_lpips)
    models = build_random(cfg, seed=0)
    for image, gray in ((images[1], True), (images[0], False)):
        crops = PairStream([image], np.random.default_rng(0), size=cfg.tile_size, scale=4).batch(1)
        seen.clear()
        calibrate_module.record(models, crops, interval=500)
        spread = max(float(np.ptp(a, axis=1).max()) for a in seen)  # [N, 3, H, W], channels
        assert (spread < 1e-6) is gray
        # LPIPS takes images in [-1, 1]
        assert all(a.min() >= -1.0 and a.max() <= 1.0 for a in seen)
