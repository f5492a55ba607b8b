"""Quality of the tiny model on the hold-out photos, and its MMLE regressor against the oracle.

    python -m benchmarks.evaluate_tiny --out runs/eval_tiny.json [--model tiny] [--threads 1]

1. Super-resolution: every hold-out photo (astronaut, chelsea, coffee, gravel) is cut to a
   multiple of 4, degraded by bicubic x4 (``adadiff.training.degrade.bicubic_x4``) and
   upscaled back by bicubic interpolation, by the model with the adaptive schedule, and with
   uniform schedules (interval 200 = 5 steps, the shipped default; interval 20 = 50 steps;
   interval 5 = 200 steps). PSNR, SSIM and LPIPS against the original, BRISQUE of the output,
   UNet evaluations (tiles x steps). Adaptive is judged against the best uniform schedule that
   takes no more UNet evaluations, not only against uniform-200.
2. MMLE vs oracle: oracle-driven DTSS trajectories on tile-sized hold-out crops (144 by
   default, each photo equally likely: by pixel count, coffee would be most of them); at every UNet
   call the oracle's scores of the decoded x0 (colour-corrected first when the model's config
   asks for it, as its output is) and MMLE's prediction from the latents. Spearman's
   rho per metric over all calls, with a 90% interval from resampling whole trajectories (with
   36 trajectories that interval was about 0.2 wide); and per step, whether the DTSS category
   computed from MMLE's gains equals the one from the oracle's gains on the same states
   (teacher-forced). Separately, regressor-driven runs from the same crops are compared call by
   call with the oracle-driven ones (free-running: they part ways after the first different
   jump).
3. The issue's targets, each marked met or missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadiff.argtypes import non_negative, positive
from adadiff.config import MetricKind
from adadiff.engines.torch import TorchBackend
from adadiff.errors import AdadiffError
from adadiff.imageio import bicubic_upscale
from adadiff.models.bundle import TorchModels, describe, load_models
from adadiff.progress import LogProgress
from adadiff.quality.brisque import brisque
from adadiff.quality.lpips import lpips
from adadiff.quality.metrics import psnr_capped, ssim
from adadiff.runtime.policy import DTSSPolicy, RecordingPolicy, dtss_decide, gains, quality
from adadiff.runtime.upscaler import Report, Upscaler
from adadiff.training.data import PhotoWeighting, holdout_photos, load_photo
from adadiff.training.degrade import bicubic_x4
from adadiff.training.labels import encode_latents, mmle_score, run_trajectories, sample_with
from adadiff.training.loop import numpy_rng
from adadiff.training.mmle import referenced, spearman
from adadiff.training.pairs import PairStream
from benchmarks.machine import machine
from benchmarks.paths import check_out_file, check_out_folder

log = logging.getLogger("adadiff")

# (name, schedule, interval)
METHODS: tuple[tuple[str, str, int | None], ...] = (
    ("tiny-adaptive", "adaptive", None),
    ("tiny-uniform-5", "uniform", 200),
    ("tiny-uniform-50", "uniform", 20),
    ("tiny-uniform-200", "uniform", 5),
)
UNIFORM = frozenset(name for name, schedule, _ in METHODS if schedule == "uniform")


def quality_row(sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    return {
        "psnr": psnr_capped(sr, hr),
        "ssim": ssim(sr, hr),
        "lpips": lpips(sr, hr),
        "brisque": brisque(sr),
    }


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def super_resolution(
    models: TorchModels,
    *,
    max_side: int | None,
    max_batch: int,
    images_dir: Path | None,
) -> list[dict[str, Any]]:
    upscaler = Upscaler(models.config, TorchBackend(models), max_batch=max_batch)
    rows = []
    for photo in holdout_photos():
        hr = load_photo(photo)
        if max_side:
            hr = hr[:max_side, :max_side]
        hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
        lr = bicubic_x4(hr)
        outputs: dict[str, tuple[np.ndarray, Report | None, float]] = {
            "bicubic": (bicubic_upscale(lr, 4), None, 0.0)
        }
        for name, schedule, interval in METHODS:
            start = time.perf_counter()
            sr, made = upscaler.upscale(lr, schedule=schedule, interval=interval, seed=0)
            outputs[name] = (sr, made, time.perf_counter() - start)
        for name, (sr, report, seconds) in outputs.items():
            row: dict[str, Any] = {"photo": photo.name, "method": name, "size": list(hr.shape[:2])}
            row.update(quality_row(sr, hr))
            if report is not None:
                row.update(
                    unet_evaluations=report.unet_evaluations,
                    tiles=report.tiles,
                    mean_steps=report.unet_evaluations / report.tiles,
                    categories=report.categories,
                    exits={e: report.exits.count(e) for e in set(report.exits)},
                    seconds=round(seconds, 2),
                )
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("categories", "exits")}))
            if images_dir is not None:
                save_png(images_dir / f"{photo.name}_{name}.png", sr)
        if images_dir is not None:
            save_png(images_dir / f"{photo.name}_hr.png", hr)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    methods: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        summary = {
            k: float(np.mean([r[k] for r in mine])) for k in ("psnr", "ssim", "lpips", "brisque")
        }
        if "unet_evaluations" in mine[0]:
            summary["unet_evaluations"] = int(sum(r["unet_evaluations"] for r in mine))
        methods[name] = summary
    return methods


def categories_from(scores: np.ndarray, t: np.ndarray, models: TorchModels) -> list[str]:
    """DTSS categories along one trajectory's calls, from its scores (as the sampler does)."""
    cfg = models.config
    out, previous = [], None
    for s, step_t in zip(scores, t, strict=True):
        r = quality(s.tolist(), cfg.mmle.metrics)
        g_fr, g_nr = gains(r, previous, int(step_t), cfg.dtss)
        previous = r
        out.append(dtss_decide(int(step_t), g_fr, g_nr, cfg.dtss).category.value)
    return out


def regressor_runs(
    models: TorchModels, up: np.ndarray, seed: int, max_batch: int
) -> tuple[list[int], dict[int, list[str]]]:
    """Regressor-driven DTSS runs of the same crops: steps and categories per tile."""
    cfg = models.config
    policy = RecordingPolicy(DTSSPolicy(cfg.dtss))
    lr = encode_latents(models, up, max_batch)
    result = sample_with(models, lr, mmle_score(models), policy, seed=seed, max_batch=max_batch)
    return result.steps_per_tile, policy.categories()


def trajectory_resamples(
    traj: np.ndarray, strata: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """Row indices of ``resamples`` draws of whole trajectories with replacement, each stratum
    (photo) keeping its count. With one trajectory per photo the trajectories are drawn across
    photos; a single trajectory has nothing to draw, and there are no draws (its interval is
    unavailable, not a zero width that reads as exact).

    Rows of one trajectory share a tile, so the tiles, not the rows, are the samples: with a
    few dozen tiles the pooled rho moves by about a tenth from one draw of tiles to the next."""
    rng = np.random.default_rng(seed)
    ids = np.unique(traj)
    if len(ids) == 1:
        return []
    rows = {int(k): np.flatnonzero(traj == k) for k in ids}
    stratum = np.array([strata[rows[int(k)][0]] for k in ids])
    groups = [ids[stratum == g] for g in np.unique(stratum)]
    if all(len(g) == 1 for g in groups):  # the photos are what varies
        groups = [ids]
    draws = []
    for _ in range(resamples):
        picked = np.concatenate([rng.choice(g, len(g)) for g in groups])
        draws.append(np.concatenate([rows[int(k)] for k in picked]))
    return draws


def worst_rho(rho: dict[str, float], names: Sequence[str]) -> float:
    """The lowest rho of ``names``; NaN if any is NaN (MMLE constant on that metric: no ranking
    at all), where min() would skip it or not depending on the order."""
    return float(np.min([rho[n] for n in names]))


def nan_to_null(value: Any) -> Any:
    """``value`` with every NaN float as None: a rho with nothing to rank (one trajectory, or
    MMLE constant on a metric) is JSON null, which strict JSON readers take, not a bare NaN."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_null(v) for v in value]
    return value


def trajectory_bootstrap(
    pred: np.ndarray, truth: np.ndarray, draws: list[np.ndarray], *, level: float = 0.9
) -> tuple[float | None, float | None]:
    """Percentile interval of the pooled Spearman's rho over ``draws`` (from
    ``trajectory_resamples``; one set of draws serves every metric); (None, None) without
    draws."""
    if not draws:
        return None, None
    rhos = [spearman(pred[r], truth[r]) for r in draws]
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(rhos, [tail, 100 - tail])
    return float(low), float(high)


def mmle_vs_oracle(
    models: TorchModels,
    *,
    crops: int,
    seed: int,
    max_batch: int,
    weighting: PhotoWeighting = "photo",
) -> dict[str, Any]:
    cfg = models.config
    images = [load_photo(p) for p in holdout_photos()]
    stream = PairStream(
        images, numpy_rng(seed, 900), size=cfg.tile_size, scale=cfg.upscale, weighting=weighting
    )
    batch = stream.batch(crops)
    start = time.perf_counter()
    print(f"MMLE vs oracle: {crops} oracle-driven trajectories", flush=True)
    rec = run_trajectories(
        models,
        batch,
        seed=seed,
        random_fraction=0.0,
        max_batch=max_batch,
        reference=cfg.mmle.reference,
        progress=LogProgress(sys.stdout, every=30.0),  # minutes: say how far it is
    )
    # what MMLE learned to predict: the FR scores against the HR crop for mmle.reference "hr"
    rec = referenced(rec, cfg)
    oracle_seconds = time.perf_counter() - start
    mmle = models.wrappers()["mmle"]
    with torch.inference_mode():
        pred = torch.cat([
            mmle(*(torch.from_numpy(rec[k][i : i + 64]) for k in ("x0", "lr", "t")))
            for i in range(0, len(rec["t"]), 64)
        ]).numpy().astype(np.float64)  # fmt: skip
    names = [m.name for m in cfg.mmle.metrics]
    rho = {n: spearman(pred[:, j], rec["scores"][:, j]) for j, n in enumerate(names)}
    trajs = np.unique(rec["traj"])
    # The pooled rho mixes two questions: does MMLE order one tile's steps (what the gains
    # use), and does it order different tiles (their level)? Both, for the note.
    within = {
        n: float(
            np.nanmedian(
                [
                    spearman(pred[rec["traj"] == k, j], rec["scores"][rec["traj"] == k, j])
                    for k in trajs
                ]
            )
        )
        for j, n in enumerate(names)
    }
    between = {
        n: spearman(
            np.array([pred[rec["traj"] == k, j].mean() for k in trajs]),
            np.array([rec["scores"][rec["traj"] == k, j].mean() for k in trajs]),
        )
        for j, n in enumerate(names)
    }
    fr = [m.name for m in cfg.mmle.metrics if m.kind is MetricKind.FULL_REFERENCE]
    draws = trajectory_resamples(rec["traj"], rec["photo"])
    interval = {
        n: trajectory_bootstrap(pred[:, j], rec["scores"][:, j], draws) for j, n in enumerate(names)
    }

    agree = total = agree_scored = total_scored = 0
    oracle_cats: dict[int, list[str]] = {}
    for traj in np.unique(rec["traj"]):
        rows = np.flatnonzero(rec["traj"] == traj)
        rows = rows[np.argsort(rec["call"][rows])]
        t = rec["t"][rows]
        a = categories_from(rec["scores"][rows], t, models)
        b = categories_from(pred[rows], t, models)
        oracle_cats[int(traj)] = a
        same = [x == y for x, y in zip(a, b, strict=True)]
        agree, total = agree + sum(same), total + len(same)
        agree_scored, total_scored = agree_scored + sum(same[1:]), total_scored + len(same) - 1

    free_steps, tile_cats = regressor_runs(models, batch.up, seed, max_batch)
    free_agree = free_total = 0
    for k, cats in oracle_cats.items():
        mine = tile_cats.get(k, [])
        n = min(len(cats), len(mine))
        free_agree += sum(x == y for x, y in zip(cats[:n], mine[:n], strict=True))
        free_total += n
    oracle_steps = np.bincount(rec["traj"]).tolist()
    return {
        "trajectories": len(np.unique(rec["traj"])),
        "crop_weighting": weighting,
        "calls": len(rec["t"]),
        "oracle_seconds": round(oracle_seconds, 1),
        "spearman": rho,
        "spearman_fr_min": worst_rho(rho, fr),
        "spearman_bootstrap_90": interval,
        "spearman_within_trajectory_median": within,
        "spearman_between_trajectory_means": between,
        "photos": [holdout_photos()[int(i)].name for i in batch.photo],
        "category_agreement": agree / max(total, 1),
        "category_agreement_after_first_call": agree_scored / max(total_scored, 1),
        "free_running_agreement": free_agree / max(free_total, 1),
        "steps_oracle_driven": oracle_steps,
        "steps_regressor_driven": free_steps,
        "oracle_categories": dict(Counter(c for cats in oracle_cats.values() for c in cats)),
        # the trivial baseline of the agreement: always answer the oracle's most frequent category
        "majority_category_share": max(
            Counter(c for cats in oracle_cats.values() for c in cats).values(), default=0
        )
        / max(total, 1),
        "regressor_categories": dict(Counter(c for cats in tile_cats.values() for c in cats)),
    }


def best_uniform_within(
    methods: dict[str, dict[str, float]], evaluations: float
) -> tuple[str, dict[str, float]] | None:
    """The uniform row with the lowest LPIPS among those taking at most ``evaluations`` UNet
    evaluations (None if every uniform row costs more)."""
    cheap = [
        (name, m)
        for name, m in methods.items()
        if name in UNIFORM and m["unet_evaluations"] <= evaluations
    ]
    return min(cheap, key=lambda item: item[1]["lpips"]) if cheap else None


def targets(methods: dict[str, dict[str, float]], mmle: dict[str, Any] | None) -> dict[str, bool]:
    ada, bic, u200 = (methods[k] for k in ("tiny-adaptive", "bicubic", "tiny-uniform-200"))
    rival = best_uniform_within(methods, ada["unet_evaluations"])
    out = {
        "adaptive beats bicubic on LPIPS": ada["lpips"] < bic["lpips"],
        "adaptive beats bicubic on BRISQUE": ada["brisque"] < bic["brisque"],
        "adaptive within 2 dB PSNR of bicubic": ada["psnr"] >= bic["psnr"] - 2.0,
        "adaptive <= 1/2.7 of uniform-200 UNet evaluations": ada["unet_evaluations"] * 2.7
        <= u200["unet_evaluations"],
        "adaptive LPIPS at most 0.01 worse than uniform-200": ada["lpips"] <= u200["lpips"] + 0.01,
        "adaptive PSNR at most 0.3 dB below uniform-200": ada["psnr"] >= u200["psnr"] - 0.3,
        # the strongest simple alternative of the same cost, not the most expensive one
        "adaptive LPIPS below the best uniform at no more evaluations": rival is None
        or ada["lpips"] < rival[1]["lpips"],
    }
    if mmle:
        out["MMLE Spearman >= 0.8 on FR scores"] = mmle["spearman_fr_min"] >= 0.8
        out["same category in >= 85% of steps"] = mmle["category_agreement"] >= 0.85
        out["same category beats always-the-most-frequent by >= 5 points"] = (
            mmle["category_agreement"] >= mmle["majority_category_share"] + 0.05
        )
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.evaluate_tiny",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--model", default="tiny", help="preset (shipped weights) or model folder")
    p.add_argument("--out", type=Path, default=Path("runs/eval_tiny.json"))
    p.add_argument("--images", type=Path, help="also write every output as PNG here")
    p.add_argument("--max-side", type=positive, help="crop the photos to at most this many px")
    p.add_argument("--max-batch", type=positive, default=8)
    p.add_argument(
        "--crops",
        type=positive,
        default=144,
        help="hold-out trajectories for MMLE (4 to 5 s each on 2 CPU cores)",
    )
    p.add_argument(
        "--crop-weighting",
        choices=("photo", "area"),
        default="photo",
        help="pick hold-out photos equally often (photo) or by pixel count (area)",
    )
    p.add_argument("--skip-mmle", action="store_true")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--threads", type=positive, help="torch threads (1 is faster on a busy machine)")
    return p


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """What the evaluation writes to --out, all but its argv."""
    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_models(args.model)
    if "random init" in models.source:
        log.warning("%s has no trained weights: figures describe a random model", args.model)
    start = time.perf_counter()
    rows = super_resolution(
        models, max_side=args.max_side, max_batch=args.max_batch, images_dir=args.images
    )
    sr_seconds = time.perf_counter() - start
    methods = summarize(rows)
    mmle = None
    if not args.skip_mmle:
        mmle = mmle_vs_oracle(
            models,
            crops=args.crops,
            seed=args.seed,
            max_batch=args.max_batch,
            weighting=args.crop_weighting,
        )
        print(json.dumps({k: mmle[k] for k in ("spearman", "category_agreement")}))
        for name, (low, high) in mmle["spearman_bootstrap_90"].items():
            spread = (
                "interval unavailable (one trajectory: nothing to resample)"
                if low is None or high is None
                else f"90% interval over resampled trajectories {low:.3f}-{high:.3f}"
            )
            print(f"Spearman {name} {mmle['spearman'][name]:.3f}, {spread}")
    rival = best_uniform_within(methods, methods["tiny-adaptive"]["unet_evaluations"])
    summary: dict[str, Any] = {
        "methods": methods,
        "best_uniform_at_no_more_evaluations": rival[0] if rival else None,
        "mmle": mmle or {},
        "targets": targets(methods, mmle),
        "adaptive_vs_uniform200_evaluations": methods["tiny-adaptive"]["unet_evaluations"]
        / max(methods["tiny-uniform-200"]["unet_evaluations"], 1),
    }
    for name, ok in summary["targets"].items():
        print(f"{'met   ' if ok else 'MISSED'} {name}")
    return {
        "machine": machine(),
        "model": describe(models),
        "degradation": "bicubic x4 (antialiased, a = -0.5), float",
        "max_side": args.max_side,  # None: whole photos
        "rows": rows,
        "summary": summary,
        "seconds": {
            "super_resolution": round(sr_seconds, 1),
            "total": round(time.perf_counter() - start, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:  # the paths first: a refused --out after the runs would lose their minutes of work
        check_out_file(args.out)
        if args.images is not None:
            check_out_folder(args.images, "--images")
        result = evaluate(args)
    except AdadiffError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    result["argv"] = list(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(nan_to_null(result), indent=2, allow_nan=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
