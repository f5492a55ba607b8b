"""The per-tile step-count benchmark's statistics, on made-up per-tile figures, and one small
run of the real model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    # benchmarks/ is a folder of scripts run from the repository root, not an installed package.
    sys.path.insert(0, str(ROOT))

from benchmarks.pertile import (  # noqa: E402
    analyse,
    features,
    main,
    pooled,
    ridge_rule_lopo,
    room,
    threshold_rule_lopo,
    tuning_photos,
)

INTERVALS = (999, 200, 50)  # 1, 5 and 20 steps
STEPS = np.array([1.0, 5.0, 20.0])


def textured_tiles_want_steps(rng: np.random.Generator, tiles: int = 24, seeds: int = 2):
    """Tiles whose texture decides their best schedule: flat ones are best at 1 step, textured
    ones at 20; plus noise per seed."""
    photo = np.arange(tiles) % 4
    texture = rng.uniform(0.0, 1.0, tiles)
    flat = texture < 0.5
    lp = np.empty((3, seeds, tiles))
    for i, cost in enumerate((0, 1, 2)):
        best = np.where(flat, 0, 2)
        lp[i] = 0.3 + 0.02 * np.abs(cost - best)[None, :] + rng.normal(0, 0.001, (seeds, tiles))
    return lp, texture, photo


def test_pooled_weights_every_photo_equally():
    values = np.array([1.0, 1.0, 1.0, 4.0])
    photo = np.array([0, 0, 0, 1])
    assert pooled(values, photo) == pytest.approx(2.5)


def test_room_on_the_same_seed_and_across_seeds():
    lp = np.array(
        [
            [[0.1, 0.5], [0.5, 0.5]],  # schedule 0: seed 0, seed 1
            [[0.2, 0.2], [0.2, 0.2]],  # schedule 1
        ]
    )
    r = room(lp, np.array([0, 1]), np.array([1.0, 5.0]))
    # same seed: tile 0 takes 0.1 then 0.2; tile 1 0.2 on both
    assert r["same_seed"]["lpips"] == pytest.approx((0.15 + 0.2) / 2)
    # chosen on seed 0 (tile 0 -> schedule 0, tile 1 -> schedule 1) and scored on seed 1
    assert r["other_seeds"]["lpips"] == pytest.approx((0.5 + 0.2) / 2)
    assert r["other_seeds"]["steps"] == pytest.approx(3.0)


def test_rules_fitted_on_other_photos_find_a_split_the_texture_shows():
    lp, texture, photo = textured_tiles_want_steps(np.random.default_rng(0))
    want = np.where(texture < 0.5, 0, 2)
    pick = threshold_rule_lopo(lp, texture, INTERVALS, photo, t_start=999)
    assert np.mean(pick == want) > 0.9
    samples = lp[:, 0].T
    x = np.c_[texture, np.random.default_rng(1).normal(size=len(texture))]
    pick = ridge_rule_lopo(samples, x, STEPS, photo, price=0.0)
    assert np.mean(pick == want) > 0.8


def test_a_rule_gains_nothing_where_the_texture_says_nothing():
    rng = np.random.default_rng(2)
    lp, _texture, photo = textured_tiles_want_steps(rng)
    unrelated = rng.uniform(0.0, 1.0, lp.shape[2])
    pick = threshold_rule_lopo(lp, unrelated, INTERVALS, photo, t_start=999)
    chosen = lp[pick, 0, np.arange(len(pick))]
    best = lp[:, 0].min(axis=0)
    assert chosen.mean() > best.mean() + 0.005


def test_features_are_finite_and_one_row_per_tile():
    lat = np.random.default_rng(3).normal(size=(5, 4, 16, 16)).astype(np.float32)
    f = features(lat)
    assert f.shape == (5, 3 + 8) and np.isfinite(f).all()
    flat = features(np.zeros((1, 4, 16, 16), np.float32))
    assert flat[0, 0] < f[:, 0].min()


def _both_degradations(seed: int) -> dict:
    """Synthetic per-tile LPIPS and latents, the same for both degradations."""
    rng = np.random.default_rng(seed)
    lp, _texture, photo = textured_tiles_want_steps(rng)
    lat = rng.normal(size=(lp.shape[2], 4, 16, 16)).astype(np.float32)
    data: dict = {"photo": photo}
    for name in ("bicubic", "realworld"):
        data[name] = {"lpips": lp, "latents": lat}
    return data


def test_analyse_reports_every_degradation():
    data = _both_degradations(4)
    report = analyse(data, INTERVALS, t_start=999)
    for name in ("bicubic", "realworld"):
        r = report["degradations"][name]
        assert set(r["uniform"]) == {1, 5, 20}
        assert r["room"]["same_seed"]["lpips"] < r["best_uniform"]["lpips"]
        assert set(r["ridge_rule_lopo"]) == {"0.0", "0.001", "0.002", "0.004"}


def test_hold_out_photos_are_refused(tmp_path, capsys):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="chelsea: hold-out"):
        tuning_photos("grass,chelsea")
    with pytest.raises(argparse.ArgumentTypeError, match="two photos"):
        tuning_photos("grass")
    # on the command line: one usage line and exit code 2, as for every other bad argument
    with pytest.raises(SystemExit) as stop:
        main(["--photos", "grass,chelsea", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "argument --photos: chelsea: hold-out photos" in capsys.readouterr().err


def test_a_small_run_of_the_shipped_model(tmp_path, metric_cache, capsys):
    pytest.importorskip("skimage")
    argv = ["--photos", "grass,rocket", "--crops", "2", "--seeds", "2"]
    argv += ["--intervals", "999,200", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "pertile.json").read_text())
    for name in ("bicubic", "realworld"):
        r = report["degradations"][name]
        assert 0.0 < r["uniform"]["1"] < 1.0 and 0.0 < r["uniform"]["5"] < 1.0
        assert r["room"]["same_seed"]["lpips"] <= min(r["uniform"].values()) + 1e-9
    assert "chosen with HR" in capsys.readouterr().out


def test_the_command_line_refuses_mistakes_before_any_run(tmp_path, monkeypatch, capsys):
    import benchmarks.pertile as pertile

    def no_run(_args):
        raise AssertionError("the runs started before the arguments were checked")

    monkeypatch.setattr(pertile, "run", no_run)
    out = ["--out", str(tmp_path / "o"), "--photos", "a,b"]  # names looked up only in main
    for flag, value in (("--threads", "0"), ("--crops", "0"), ("--seeds", "0")):
        with pytest.raises(SystemExit) as stop:
            main([*out, flag, value])
        assert stop.value.code == 2
        assert f"argument {flag}: expected a number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([*out, "--intervals", "999,0"])
    assert stop.value.code == 2
    assert main([*out, "--photos", "nosuch,grass"]) == 2
    assert "no photo named 'nosuch'" in capsys.readouterr().err
    ok = ["--out", str(tmp_path / "o"), "--photos", "grass,rocket"]
    assert main([*ok, "--intervals", "999,334,333"]) == 2  # both 3 steps from t = 999
    assert "334 and 333 both take 3 steps" in capsys.readouterr().err
    plain = tmp_path / "a-file"
    plain.write_text("")
    assert main(["--out", str(plain), "--photos", "a,b"]) == 2
    assert f"--out {plain} is a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_steps_are_counted_from_the_models_t_start():
    """A model whose DTSS starts at t = 899 takes 9 jumps of 100, as the sampler counts them."""
    data = _both_degradations(5)
    report = analyse(data, (999, 200, 100), t_start=899)
    assert set(report["degradations"]["bicubic"]["uniform"]) == {1, 5, 9}
