"""The tiny model's evaluation script: the interval it puts around MMLE's Spearman."""

from __future__ import annotations

import numpy as np
import pytest

from adadiff.training.mmle import spearman


def _trajectories(count: int, calls: int, noise: float, seed: int = 0):
    """Rows of ``count`` trajectories in three photos: a per-tile level plus a per-call trend,
    and a prediction that gets both with Gaussian noise."""
    rng = np.random.default_rng(seed)
    traj = np.repeat(np.arange(count), calls)
    photo = traj % 3
    truth = rng.normal(size=count)[traj] + np.tile(np.linspace(0, 1, calls), count)
    pred = truth + noise * rng.normal(size=truth.shape)
    return pred, truth, traj, photo


def _interval(pred, truth, traj, photo, resamples: int, seed: int = 0) -> tuple[float, float]:
    from benchmarks.evaluate_tiny import trajectory_bootstrap, trajectory_resamples

    draws = trajectory_resamples(traj, photo, resamples=resamples, seed=seed)
    return trajectory_bootstrap(pred, truth, draws)


def test_bootstrap_of_exact_predictions_is_one() -> None:
    _, truth, traj, photo = _trajectories(12, 5, 0.0)
    assert _interval(truth, truth, traj, photo, resamples=50) == pytest.approx((1, 1))


def test_bootstrap_keeps_each_photos_count() -> None:
    from benchmarks.evaluate_tiny import trajectory_resamples

    traj = np.repeat(np.arange(6), 2)
    photo = np.array([0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2])  # photos of 1, 3 and 2 trajectories
    draws = trajectory_resamples(traj, photo, resamples=50)
    assert len(draws) == 50
    for rows in draws:
        assert np.bincount(photo[rows], minlength=3).tolist() == [2, 6, 4]


def test_one_trajectory_per_photo_resamples_the_photos_and_one_alone_has_no_interval() -> None:
    # --crops 3 on three photos: every resample drew the same three, a zero-width interval
    pred, truth, traj, photo = _trajectories(3, 8, 1.0)
    low, high = _interval(pred, truth, traj, photo, resamples=200)
    assert low < spearman(pred, truth) < high
    one = traj == 0  # --crops 1: nothing to resample
    assert _interval(pred[one], truth[one], traj[one], photo[one], resamples=50) == (None, None)


def test_bootstrap_brackets_the_estimate_and_narrows_with_more_trajectories() -> None:
    widths = []
    for count in (12, 240):
        pred, truth, traj, photo = _trajectories(count, 6, 0.8, seed=count)
        low, high = _interval(pred, truth, traj, photo, resamples=300, seed=1)
        assert low < spearman(pred, truth) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_model_card_reports_the_interval_and_says_when_none_was_recorded() -> None:
    from adadiff.training.ship import _eval_section

    mmle = {
        "trajectories": 144,
        "crop_weighting": "photo",
        "spearman": {"psnr": 0.81, "lpips": 0.79},
        "category_agreement": 0.95,
        "spearman_bootstrap_90": {"psnr": [0.74, 0.86], "lpips": [0.7, 0.85]},
    }
    text = "\n".join(_eval_section({"summary": {"mmle": mmle}}))
    assert "on 144 trajectories" in text and "psnr 0.810, lpips 0.790" in text
    assert "resampled: psnr 0.740-0.860, lpips 0.700-0.850." in text
    assert "steps." in text and "most frequent" not in text
    mmle["spearman_bootstrap_90"] = {"psnr": [None, None], "lpips": [None, None]}
    text = "\n".join(_eval_section({"summary": {"mmle": mmle}}))
    assert "resampled: psnr unavailable, lpips unavailable." in text
    del mmle["spearman_bootstrap_90"]
    assert "resampled" not in "\n".join(_eval_section({"summary": {"mmle": mmle}}))
    mmle["majority_category_share"] = 0.975
    text = "\n".join(_eval_section({"summary": {"mmle": mmle}}))
    assert "in 95.0% of steps (always the oracle's most frequent category: 97.5%)." in text


def test_a_rho_with_nothing_to_rank_is_json_null_and_the_card_says_none() -> None:
    import json

    from adadiff.training.ship import _eval_section
    from benchmarks.evaluate_tiny import nan_to_null

    # --crops 1: one trajectory, so its mean against the others' is NaN, and a constant score
    one = np.arange(5.0)
    between = spearman(np.array([one.mean()]), np.array([one.mean()]))
    assert np.isnan(between)
    mmle = {
        "spearman": {"psnr": 0.8, "niqe": float("nan")},
        "spearman_within_trajectory_median": {"psnr": 0.9, "niqe": float("nan")},
        "spearman_between_trajectory_means": {"psnr": between, "niqe": between},
        "spearman_bootstrap_90": {"psnr": (None, None)},
    }
    safe = nan_to_null({"summary": {"mmle": mmle}, "n": 3})
    text = json.dumps(safe, allow_nan=False)  # raises on a NaN left anywhere
    assert json.loads(text)["summary"]["mmle"]["spearman"] == {"psnr": 0.8, "niqe": None}
    assert safe["n"] == 3 and safe["summary"]["mmle"]["spearman_bootstrap_90"]["psnr"] == [
        None,
        None,
    ]
    card = "\n".join(_eval_section(json.loads(text)))
    assert "Spearman psnr 0.800, niqe none" in card
    assert "psnr 0.900, niqe none; between trajectories (their mean scores): psnr none" in card


def _methods(adaptive: tuple[float, int], uniform: dict[int, tuple[float, int]]):
    row = {"psnr": 25.0, "ssim": 0.7, "brisque": 30.0}
    methods = {"bicubic": {**row, "lpips": 0.4, "brisque": 60.0}}
    methods["tiny-adaptive"] = {**row, "lpips": adaptive[0], "unet_evaluations": adaptive[1]}
    for steps, (lp, evaluations) in uniform.items():
        methods[f"tiny-uniform-{steps}"] = {**row, "lpips": lp, "unet_evaluations": evaluations}
    return methods


def test_adaptive_is_judged_against_the_best_uniform_it_can_afford() -> None:
    from benchmarks.evaluate_tiny import best_uniform_within, targets

    key = "adaptive LPIPS below the best uniform at no more evaluations"
    # uniform-5 is cheaper and better: adaptive misses, though it beats uniform-200
    methods = _methods((0.26, 5000), {5: (0.20, 400), 50: (0.27, 4300), 200: (0.28, 17000)})
    assert best_uniform_within(methods, 5000)[0] == "tiny-uniform-5"
    assert targets(methods, None)[key] is False
    assert targets(methods, None)["adaptive LPIPS at most 0.01 worse than uniform-200"]
    # a better uniform that costs more than adaptive does not count against it
    methods = _methods((0.26, 3000), {5: (0.27, 400), 50: (0.20, 4300), 200: (0.28, 17000)})
    assert best_uniform_within(methods, 3000)[0] == "tiny-uniform-5"
    assert targets(methods, None)[key] is True
    # adaptive cheaper than every uniform row: nothing to compare with at its cost
    methods = _methods((0.3, 100), {5: (0.2, 400)})
    assert best_uniform_within(methods, 100) is None


def test_model_card_names_the_uniform_schedule_adaptive_is_judged_against() -> None:
    from adadiff.training.ship import _eval_section

    methods = _methods((0.26, 5000), {5: (0.20, 400)})
    summary = {"methods": methods, "best_uniform_at_no_more_evaluations": "tiny-uniform-5"}
    text = "\n".join(_eval_section({"summary": summary}))
    assert "| tiny-uniform-5 | 25.00 | 0.7000 | 0.2000 | 30.00 | 400 |" in text
    assert "no more UNet evaluations than adaptive: tiny-uniform-5." in text
    summary["best_uniform_at_no_more_evaluations"] = None
    assert "takes more UNet evaluations" in "\n".join(_eval_section({"summary": summary}))
    del summary["best_uniform_at_no_more_evaluations"]
    assert "no more UNet evaluations" not in "\n".join(_eval_section({"summary": summary}))


def test_the_command_line_refuses_a_bad_model_or_out_before_any_work(tmp_path, capsys) -> None:
    from benchmarks import evaluate_tiny

    assert evaluate_tiny.main(["--model", str(tmp_path), "--out", str(tmp_path / "e.json")]) == 2
    assert "adadiff.json is missing" in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, monkeypatch, capsys
) -> None:
    from benchmarks import evaluate_tiny

    def no_work(_model):
        raise AssertionError("the evaluation started before --out was checked")

    monkeypatch.setattr(evaluate_tiny, "load_models", no_work)
    plain = tmp_path / "a-file"
    plain.write_text("")
    for out, why in ((plain / "eval.json", "is a file"), (tmp_path, "is a folder")):
        assert evaluate_tiny.main(["--out", str(out)]) == 2
        assert why in capsys.readouterr().err


def test_a_metric_mmle_cannot_rank_fails_the_spearman_target_in_any_order() -> None:
    from benchmarks.evaluate_tiny import targets, worst_rho

    truth = np.arange(10.0)
    rho = {"psnr": spearman(truth, truth), "lpips": spearman(np.full(10, 0.3), truth)}
    for names in (["psnr", "lpips"], ["lpips", "psnr"]):
        worst = worst_rho(rho, names)
        assert np.isnan(worst)
        mmle = {"spearman_fr_min": worst, "category_agreement": 1.0, "majority_category_share": 0.5}
        methods = _methods((0.2, 100), {5: (0.3, 400), 200: (0.3, 17000)})
        assert targets(methods, mmle)["MMLE Spearman >= 0.8 on FR scores"] is False
