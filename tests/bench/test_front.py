"""The front benchmark's statistics and README rendering, on made-up per-tile figures."""

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

from benchmarks.front import (  # noqa: E402
    END,
    START,
    _content,
    bootstrap_mean,
    fit_content,
    gain_from_steps,
    per_tile_best_uniform,
    render,
    summarize,
    targets,
    write_readme,
)


def made_up(rng: np.random.Generator) -> tuple[dict, dict, np.ndarray]:
    seeds, tiles = 2, 12
    strata = np.arange(tiles) % 3
    base = rng.uniform(0.2, 0.4, tiles)
    rows, steps = {}, {}
    for label, shift, n in (
        ("uniform-5", 0.00, 5),
        ("uniform-20", 0.01, 20),
        ("uniform-200", 0.03, 200),
        ("exit-20@400", -0.01, 31),
        ("dtss-mmle-x", -0.02, 25),
    ):
        lp = base[None, :] + shift + rng.normal(0, 0.001, (seeds, tiles))
        rows[label] = {k: lp * (1 if k == "lpips" else 10) for k in ("lpips", "psnr", "ssim")}
        rows[label]["brisque"] = lp * 100
        steps[label] = np.full((seeds, tiles), n)
    steps["dtss-mmle-x"] = np.tile(np.arange(tiles) + 20, (seeds, 1))
    return rows, steps, strata


def test_summary_compares_with_the_best_uniform_at_no_more_steps_and_the_fixed_exit():
    rows, steps, strata = made_up(np.random.default_rng(0))
    out = summarize(rows, steps, strata, ["a", "b", "c"])
    d = out["dtss-mmle-x"]
    # uniform-5 and uniform-20 cost no more than 25.5 steps; uniform-5 is the better of them
    assert d["vs_best_uniform"]["method"] == "uniform-5"
    mean, low, high = d["vs_best_uniform"]["lpips_diff"]
    assert mean == pytest.approx(-0.02, abs=1e-3) and low < mean < high < 0
    assert d["vs_fixed_exit"]["exit-20@400"][0] == pytest.approx(-0.01, abs=1e-3)
    assert d["reaches_uniform_200_lpips"] and d["steps_vs_uniform_200"] < 0.2
    assert set(d["lpips_per_photo"]) == {"a", "b", "c"}
    assert "vs_best_uniform" not in out["uniform-5"]


def test_bootstrap_interval_covers_the_mean_and_widens_with_spread():
    rng = np.random.default_rng(1)
    strata = np.arange(30) % 3
    tight = bootstrap_mean(rng.normal(1, 0.01, (3, 30)), strata)
    wide = bootstrap_mean(rng.normal(1, 0.5, (3, 30)), strata)
    assert tight[1] < tight[0] < tight[2]
    assert (wide[2] - wide[1]) > 10 * (tight[2] - tight[1])


def test_gain_from_steps_ranks_against_the_steps_dtss_gave():
    rows, steps, _ = made_up(np.random.default_rng(2))
    # make the tiles that gain most from 200 steps the ones DTSS gave the most steps
    gain = np.arange(12) / 100.0
    rows["uniform-200"]["lpips"] = rows["uniform-20"]["lpips"] - gain[None, :]
    g = gain_from_steps(rows, steps)
    assert g["spearman_with_steps"]["dtss-mmle-x"] == pytest.approx(1.0, abs=1e-3)
    assert g["share_positive"] == pytest.approx(11 / 12)
    # every tile given the same steps: no ranking, written as JSON null (not a bare NaN) and
    # the target missed
    steps["dtss-mmle-x"] = np.full_like(steps["dtss-mmle-x"], 7)
    g = gain_from_steps(rows, steps)
    assert g["spearman_with_steps"]["dtss-mmle-x"] is None
    json.loads(json.dumps(g), parse_constant=pytest.fail)
    methods = summarize(rows, steps, np.arange(12) % 3, ["a", "b", "c"])
    marks = targets(methods, {}, g)["dtss-mmle-x"]
    assert marks["steps rank with the gain from more steps (rho >= 0.4)"] is False


def test_per_tile_best_uniform_takes_each_tiles_best_schedule():
    rows, steps, strata = made_up(np.random.default_rng(4))
    # tiles 0-5 are best at 200 steps, the rest at 5 steps
    rows["uniform-200"]["lpips"][:, :6] = rows["uniform-5"]["lpips"][:, :6] - 0.05
    best = per_tile_best_uniform(rows, steps, strata)
    expected = np.minimum(rows["uniform-5"]["lpips"], rows["uniform-200"]["lpips"])
    assert best["lpips"][0] == pytest.approx(expected.mean())
    assert best["steps_per_tile"] == pytest.approx((200 + 5) / 2)
    assert best["share_best"] == {"uniform-5": 0.5, "uniform-20": 0.0, "uniform-200": 0.5}
    assert per_tile_best_uniform({"uniform-5": rows["uniform-5"]}, steps, strata) == {}


def test_content_fit_finds_the_rule_that_splits_flat_from_textured_tiles():
    rows, steps, strata = made_up(np.random.default_rng(5))
    texture = np.linspace(0.0, 1.0, 12)
    # flat tiles (texture < 0.5) are best at 5 steps, textured ones at 200
    rows["uniform-200"]["lpips"][:, 6:] = rows["uniform-5"]["lpips"][:, 6:] - 0.05
    intervals = {"uniform-5": 200, "uniform-20": 50, "uniform-200": 5}
    fit = fit_content(rows, steps, intervals, texture, strata)
    assert (fit["flat_interval"], fit["textured_interval"]) == (200, 5)
    assert fit["flat_share"] == pytest.approx(0.5)
    assert 5 / 11 < fit["threshold"] <= 6 / 11
    expected = np.where(texture < 0.5, rows["uniform-5"]["lpips"], rows["uniform-200"]["lpips"])
    assert fit["lpips"][0] == pytest.approx(expected.mean())
    assert fit["steps_per_tile"] == pytest.approx(102.5)


def test_content_rules_parse_from_the_command_line():
    import argparse

    name, rule = _content("half=0.19:999:100")
    assert name == "half" and rule.threshold == 0.19
    assert (rule.flat_interval, rule.textured_interval) == (999, 100)
    for bad in ("half=0.19:999", "=0.1:1:2", "x=-1:999:100", "x=a:b:c"):
        with pytest.raises(argparse.ArgumentTypeError, match="THRESHOLD"):
            _content(bad)


def test_render_writes_every_method_from_the_json(tmp_path):
    rows, steps, strata = made_up(np.random.default_rng(3))
    result = {
        "photos": ["a", "b", "c"],
        "crops_per_photo": 4,
        "tile": 128,
        "seeds": 2,
        "degradation": "bicubic x4",
        "bicubic": {k: [0.4, 0.39, 0.41] for k in ("lpips", "psnr", "ssim", "brisque")},
        "methods": summarize(rows, steps, strata, ["a", "b", "c"]),
        "gain_from_steps": gain_from_steps(rows, steps),
        "per_tile_best_uniform": per_tile_best_uniform(rows, steps, strata),
        "content_fit": fit_content(
            rows, steps, {"uniform-5": 200, "uniform-200": 5}, np.arange(12.0), strata
        ),
        "diagnostics": {},
        "plot": "front.png",
    }
    path = tmp_path / "bench" / "front.json"
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nSTALE FIGURES\n{END}\n")
    write_readme(json.loads(path.read_text()), path, readme)
    text = readme.read_text()
    assert "STALE FIGURES" not in text
    for label in rows:
        assert f"| {label} |" in text
    assert "](bench/front.json)" in text and "](bench/front.png)" in text
    assert "Each tile given its best uniform schedule" in text and "uniform-5 " in text
    assert "The best content rule on these same crops (in-sample" in text
    assert render(result, path, readme).splitlines()[0].startswith("Generated from")
    assert "--readme README.md`" in render(result, path, readme)
    # the command names the README it rendered into, from that README's folder
    other = tmp_path / "docs" / "FRONT.md"
    head = render(result, path, other).splitlines()[0]
    assert "--render ../bench/front.json --readme FRONT.md`" in head
    # a method run on fewer seeds than the header's (the oracle) says so on its row
    result["per_tile"] = {m: {"lpips": [[0.2] * 12] * (1 if m == "uniform-5" else 2)} for m in rows}
    text = render(result, path, readme)
    assert "| uniform-5 (1 seed; diff on those) |" in text and "| uniform-200 |" in text
    result["gain_from_steps"]["spearman_with_steps"]["dtss-mmle-x"] = None
    assert "dtss-mmle-x none (every tile got the same steps)" in render(result, path, readme)


def test_targets_read_the_paired_intervals():
    rows, steps, strata = made_up(np.random.default_rng(4))
    methods = summarize(rows, steps, strata, ["a", "b", "c"])
    diag = {"dtss-mmle-x": {"growth_share": 0.02}}
    marks = targets(methods, diag, {"spearman_with_steps": {"dtss-mmle-x": 0.5}})["dtss-mmle-x"]
    assert marks["LPIPS below the best uniform at no more steps"]
    assert marks["LPIPS below every fixed exit"]
    assert marks["uniform-200's LPIPS with at most 1/2.7 of its steps"]
    assert not marks["growth in >= 5% of steps"]
    assert marks["steps rank with the gain from more steps (rho >= 0.4)"]
    # the same run, 0.015 worse instead of 0.02 better than uniform-5: both comparisons missed
    rows["dtss-mmle-x"] = {
        k: v + 0.035 * (v / rows["dtss-mmle-x"]["lpips"]) for k, v in rows["dtss-mmle-x"].items()
    }
    worse = targets(summarize(rows, steps, strata, ["a", "b", "c"]), diag, {})["dtss-mmle-x"]
    assert not worse["LPIPS below the best uniform at no more steps"]
    assert not worse["LPIPS below every fixed exit"]
    assert "LPIPS below every content rule" not in worse  # no content rule ran


def test_a_target_whose_rival_did_not_run_is_left_out_not_missed():
    rows, steps, strata = made_up(np.random.default_rng(4))
    for label in ("uniform-5", "uniform-200"):  # a front run with --uniform 50 only
        del rows[label], steps[label]
    steps["dtss-mmle-x"] = np.full_like(steps["dtss-mmle-x"], 4)  # cheaper than uniform-20
    methods = summarize(rows, steps, strata, ["a", "b", "c"])
    marks = targets(methods, {}, {})["dtss-mmle-x"]
    assert "LPIPS below the best uniform at no more steps" not in marks
    assert "uniform-200's LPIPS with at most 1/2.7 of its steps" not in marks
    assert marks["LPIPS below every fixed exit"]


def test_adaptive_is_compared_with_the_content_rules_too():
    rows, steps, strata = made_up(np.random.default_rng(6))
    rows["content-half"] = {k: v - 0.03 for k, v in rows["uniform-5"].items()}
    steps["content-half"] = steps["uniform-5"]
    methods = summarize(rows, steps, strata, ["a", "b", "c"])
    # dtss-mmle-x is 0.02 below uniform-5, so 0.01 above the content rule
    assert methods["dtss-mmle-x"]["vs_content"]["content-half"][0] == pytest.approx(0.01, abs=2e-3)
    assert methods["content-half"]["vs_best_uniform"]["method"] == "uniform-5"
    marks = targets(methods, {}, {})["dtss-mmle-x"]
    assert not marks["LPIPS below every content rule"]


def test_a_dtss_json_is_checked_against_the_models_noise_schedule(tmp_path, tiny_config):
    from benchmarks.front import load_dtss

    path = tmp_path / "cal.json"
    good = {"dtss": {**tiny_config.to_dict()["dtss"], "tau": 0.004}}
    path.write_text(json.dumps(good))
    dtss, metrics = load_dtss(path, tiny_config)
    assert dtss.tau == 0.004 and metrics == tiny_config.mmle.metrics
    for bad in ({"t_start": 1000}, {"nr_start_t": -5}, {"no_such_key": 1}):
        path.write_text(json.dumps({"dtss": {**good["dtss"], **bad}}))
        with pytest.raises(SystemExit, match=str(path)):
            load_dtss(path, tiny_config)


def test_the_command_line_refuses_mistakes_before_any_run(tmp_path, monkeypatch, capsys):
    from benchmarks import front

    def no_run(_args):
        raise AssertionError("the front ran with arguments it should have refused")

    monkeypatch.setattr(front, "run", no_run)
    out = tmp_path / "front"
    quick = ["--out", str(out), "--crops", "1", "--seeds", "1", "--oracle-seeds", "0"]
    assert front.main([*quick, "--photos", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read it"):
        front.main([*quick, "--dtss", f"x={tmp_path / 'missing.json'}"])
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    assert front.main([*quick, "--readme", str(plain)]) == 2
    assert "front:start" in capsys.readouterr().err
    for flag, value, said in (
        ("--crops", "0", "expected a number >= 1"),
        ("--uniform", "0", "expected intervals >= 1"),
        ("--threads", "0", "expected a number >= 1"),
        ("--exit", "0@400", "expected INTERVAL >= 1"),
    ):
        with pytest.raises(SystemExit) as stop:
            front.main([*quick, flag, value])
        assert stop.value.code == 2
        assert f"argument {flag}: {said}" in capsys.readouterr().err
    assert not out.exists()


def test_a_front_without_matplotlib_still_writes_its_json(tmp_path, monkeypatch, capsys):
    """The plot comes after every run: a missing matplotlib must not lose them."""
    import json

    from benchmarks import front

    def no_matplotlib(*_args, **_kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(front, "run", lambda args: {"methods": {}})
    monkeypatch.setattr(front, "plot", no_matplotlib)
    out = tmp_path / "front"
    argv = ["--out", str(out), "--crops", "1", "--seeds", "1", "--oracle-seeds", "0"]
    assert front.main(argv) == 0
    assert json.loads((out / "front.json").read_text()) == {"methods": {}}
    assert "no front.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options",
    [
        ["--uniform", "999,334,333"],  # 334 and 333 are both 3 steps from t = 999
        ["--exit", "20@400", "--exit", "20@400"],
        ["--content", "m=0.1:5:10", "--content", "m=0.2:5:10"],
    ],
)
def test_two_schedules_of_one_label_are_refused_before_any_run(
    tmp_path, monkeypatch, capsys, options
):
    """Runs are grouped by label: two schedules of one label would be pooled as two seeds."""
    from benchmarks import front

    def no_run(_args):
        raise AssertionError("the front ran")

    monkeypatch.setattr(front, "run", no_run)
    out = tmp_path / "front"
    argv = ["--out", str(out), "--crops", "1", "--seeds", "1", "--oracle-seeds", "0", *options]
    assert front.main(argv) == 2
    assert "both labelled" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("photos", [",", "astronaut,chelsea,astronaut"])
def test_photos_named_twice_or_none_are_refused_by_the_parser(photos, capsys):
    """No photo would crash after the folder is made; one named twice would be two strata of
    one name, its per-photo column showing the second twice."""
    from benchmarks.front import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["--photos", photos])
    assert "--photos" in capsys.readouterr().err


def test_render_refuses_a_missing_readme_before_redrawing_the_plot(tmp_path, capsys):
    from benchmarks.front import main

    saved = tmp_path / "front.json"
    reference = ROOT / "benchmarks" / "reference" / "front-cpu"
    saved.write_text((reference / "front.json").read_text())
    missing = tmp_path / "nowhere" / "README.md"
    assert main(["--render", str(saved), "--readme", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adadiff bench front: error: --readme") and str(missing) in err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.json"]  # no plot drawn


def test_one_crop_per_photo_resamples_the_photos_and_one_crop_alone_has_no_interval():
    one_seed = np.array([[0.2, 0.3, 0.4]])  # [seed, crop]: one crop of each of three photos
    mean, low, high = bootstrap_mean(one_seed, np.arange(3))
    assert low < mean < high  # it was a zero width: each photo's one crop drawn every time
    seeds = bootstrap_mean(np.array([[0.2], [0.3], [0.4]]), np.zeros(1, dtype=int))
    assert seeds[1] < seeds[0] < seeds[2]  # one crop, three seeds: the seeds vary
    assert bootstrap_mean(np.array([[0.3]]), np.zeros(1, dtype=int)) == (0.3, None, None)


def test_a_difference_with_no_interval_meets_no_target(tmp_path):
    # --crops 1 --seeds 1 on one photo: the paired differences cannot be resampled, and their
    # zero-width intervals read as "below zero by more than the half-width"
    lpips = {"uniform-5": 0.30, "exit-20@400": 0.25, "dtss-mmle-x": 0.20}
    cost = {"uniform-5": 5, "exit-20@400": 31, "dtss-mmle-x": 25}
    rows = {
        m: {k: np.array([[v]]) for k in ("lpips", "psnr", "ssim", "brisque")}
        for m, v in lpips.items()
    }
    steps = {m: np.array([[n]]) for m, n in cost.items()}
    methods = summarize(rows, steps, np.zeros(1, dtype=int), ["a"])
    assert methods["dtss-mmle-x"]["vs_best_uniform"]["lpips_diff"][0] == pytest.approx(-0.1)
    marks = targets(methods, {}, {})["dtss-mmle-x"]
    assert marks["LPIPS below the best uniform at no more steps"] is False
    assert marks["LPIPS below every fixed exit"] is False
    result = {
        "photos": ["a"],
        "crops_per_photo": 1,
        "tile": 128,
        "seeds": 1,
        "degradation": "bicubic x4",
        "bicubic": {k: [0.4, None, None] for k in ("lpips", "psnr", "ssim", "brisque")},
        "methods": methods,
        "targets": {"dtss-mmle-x": marks},
    }
    path = tmp_path / "front.json"
    path.write_text(json.dumps(result, allow_nan=False))  # an unavailable interval is null
    text = render(json.loads(path.read_text()), path, tmp_path / "README.md")
    assert "| dtss-mmle-x | 25.0 | 0.200 (interval unavailable) |" in text
    assert "-0.100 (interval unavailable) vs uniform-5" in text
    assert "(0.200 to 0.200)" not in text
    assert "No intervals (one crop on one seed: nothing to resample)" in text
    pytest.importorskip("matplotlib")
    from benchmarks.front import plot

    result["model"] = {"source": "tiny"}
    assert plot(result, tmp_path / "front.png").is_file()  # no error bar where no interval


def test_the_interval_is_90_percent_and_a_zero_width_one_is_no_evidence():
    from benchmarks.front import below_zero

    # 400 standardised crops of one photo: the resampled mean has std 0.05, so the 90%
    # interval's half-width is 1.645 * 0.05 (a 95% one would be 1.96 * 0.05)
    v = np.random.default_rng(7).normal(size=400)
    v = (v - v.mean()) / v.std()
    _, low, high = bootstrap_mean(v[None, :], np.zeros(400, dtype=int))
    assert 0.075 < (high - low) / 2 < 0.09
    assert below_zero((-0.1, -0.2, -0.05))
    assert not below_zero((-0.1, -0.2, 0.01))  # straddles zero
    assert not below_zero((-0.1, -0.1, -0.1))  # zero width: nothing was resampled
    assert not below_zero((-0.1, None, None))


def test_summary_compares_a_method_with_others_not_itself_and_per_photo_on_its_own_crops():
    rows, steps, strata = made_up(np.random.default_rng(8))
    rows["content-half"] = {k: v - 0.03 for k, v in rows["uniform-5"].items()}
    steps["content-half"] = steps["uniform-5"]
    out = summarize(rows, steps, strata, ["a", "b", "c"])
    assert "exit-20@400" not in out["exit-20@400"]["vs_fixed_exit"]
    assert "content-half" not in out["content-half"]["vs_content"]
    # uniform-200 reaches its own LPIPS
    assert out["uniform-200"]["reaches_uniform_200_lpips"]
    assert out["uniform-200"]["steps_vs_uniform_200"] == 1.0
    per_photo = out["dtss-mmle-x"]["lpips_per_photo"]
    for k, name in enumerate(["a", "b", "c"]):
        assert per_photo[name][0] == pytest.approx(
            rows["dtss-mmle-x"]["lpips"][:, strata == k].mean()
        )


def test_gain_and_headroom_need_their_runs_and_skip_a_run_on_fewer_seeds():
    rows, steps, strata = made_up(np.random.default_rng(9))
    # the oracle runs on fewer seeds (--oracle-seeds 1): no per-tile pairing with the gain
    rows["dtss-oracle-model"] = {k: v[:1] for k, v in rows["dtss-mmle-x"].items()}
    steps["dtss-oracle-model"] = steps["dtss-mmle-x"][:1]
    assert set(gain_from_steps(rows, steps)["spearman_with_steps"]) == {"dtss-mmle-x"}
    for missing in ("uniform-20", "uniform-200"):  # a shorter --uniform list
        assert gain_from_steps({k: v for k, v in rows.items() if k != missing}, steps) == {}
    # a uniform run on fewer seeds: the oracle takes the seeds every schedule has
    rows["uniform-20"] = {k: v[:1] for k, v in rows["uniform-20"].items()}
    best = per_tile_best_uniform(rows, steps, strata)
    assert best["lpips"][0] <= rows["uniform-5"]["lpips"][:1].mean()


def test_each_target_line_has_its_bound():
    rows, steps, strata = made_up(np.random.default_rng(4))
    rows["exit-5@400"] = {k: v - 0.05 for k, v in rows["dtss-mmle-x"].items()}
    steps["exit-5@400"] = steps["uniform-5"]
    rows["content-half"] = {k: v + 0.05 for k, v in rows["dtss-mmle-x"].items()}
    rows["content-worse"] = {k: v - 0.05 for k, v in rows["dtss-mmle-x"].items()}
    for c in ("content-half", "content-worse"):
        steps[c] = steps["uniform-5"]
    # the oracle is the upper bound of the regressor, not a schedule the targets are for
    rows["dtss-oracle-model"], steps["dtss-oracle-model"] = rows["dtss-mmle-x"], steps["uniform-5"]
    methods = summarize(rows, steps, strata, ["a", "b", "c"])
    line = "uniform-200's LPIPS with at most 1/2.7 of its steps"

    def marks(growth: float = 0.05, rho: float = 0.4, **dtss: float) -> dict[str, bool]:
        m = {**methods, "dtss-mmle-x": {**methods["dtss-mmle-x"], **dtss}}
        diag = {"dtss-mmle-x": {"growth_share": growth}}
        gain = {"spearman_with_steps": {"dtss-mmle-x": rho}}
        out = targets(m, diag, gain)
        assert set(out) == {"dtss-mmle-x"}
        return out["dtss-mmle-x"]

    at_bounds = marks()
    assert at_bounds["growth in >= 5% of steps"]
    assert at_bounds["steps rank with the gain from more steps (rho >= 0.4)"]
    assert not marks(rho=0.35)["steps rank with the gain from more steps (rho >= 0.4)"]
    assert not marks(growth=0.2 * 0.2)["growth in >= 5% of steps"]
    assert marks(growth=0.3)["growth in >= 5% of steps"]
    # one exit (or content rule) beaten is not every one
    assert not at_bounds["LPIPS below every fixed exit"]
    assert not at_bounds["LPIPS below every content rule"]
    assert marks(steps_per_tile=74.0)[line]  # 74 * 2.7 = 199.8
    assert not marks(steps_per_tile=80.0)[line]  # uniform-200's LPIPS, too many steps
