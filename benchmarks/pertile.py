"""Can a tile's LR input tell how many denoising steps it needs? Per-tile step counts, measured.

On tile crops of tuning photos (never the hold-out ones), degraded two ways (bicubic x4, and
blur + bicubic x4 + JPEG 60), every uniform schedule runs from the same noise on several seeds
and each tile is scored by LPIPS to its HR crop. The report gives:

- each uniform schedule, every photo weighted equally;
- the room: each tile given its best schedule, chosen with the HR crop on the same seed, and
  chosen on seed 0 then scored on the other seeds (what remains once the luck of one noise
  draw is taken out);
- rules that choose from the LR tile alone, each fitted on the other photos and scored on the
  left-out one (leave-one-photo-out): the content rule (one texture threshold, two schedules)
  and a ridge regression from LR-latent features to every schedule's LPIPS, with a price per
  step. A rule pays only where it beats the best uniform schedule at no more steps.

    python -m benchmarks.pertile --model tiny --photos train+validation --out runs/pertile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadiff.argtypes import positive
from adadiff.errors import AdadiffError, ConfigError
from adadiff.imageio import bicubic_upscale
from adadiff.models.bundle import TorchModels, describe, load_models
from adadiff.presets import model_config
from adadiff.runtime.colorfix import low_band
from adadiff.runtime.content import latent_texture
from adadiff.training.data import HOLDOUT, find_photo
from adadiff.training.degrade import blur_jpeg_x4
from adadiff.training.labels import encode_latents
from adadiff.training.pairs import Batch, evaluation_photos, photo_names
from benchmarks.front import (
    Method,
    Scorer,
    fit_content,
    holdout_crops,
    interval_list,
    run_method,
    uniform_policy,
)
from benchmarks.machine import machine, weights_of
from benchmarks.paths import check_out_folder

INTERVALS = (999, 500, 333, 200, 100, 50)
DEGRADATIONS = ("bicubic", "realworld")
PRICES = (0.0, 0.001, 0.002, 0.004)  # LPIPS per UNet step a ridge rule trades for fewer steps
CROP_SEED = 7  # not the front's crops


def steps_of(interval: int, t_start: int) -> int:
    """UNet evaluations per tile of a uniform schedule from the model's ``dtss.t_start``."""
    return -(-t_start // interval)


def check_intervals(intervals: Sequence[int], t_start: int) -> None:
    """Refuse two intervals of one step count: the report keys schedules by their steps, so
    one would be dropped (334 and 333 are both 3 steps from t = 999)."""
    by_steps: dict[int, int] = {}
    for k in intervals:
        first = by_steps.setdefault(steps_of(k, t_start), k)
        if first != k or list(intervals).count(k) > 1:
            raise ConfigError(
                f"--intervals {first} and {k} both take {steps_of(k, t_start)} steps per tile "
                f"from t = {t_start}; give each step count once"
            )


def degraded(base: Batch, degradation: str) -> Batch:
    if degradation == "bicubic":
        return base
    lr = np.stack([blur_jpeg_x4(h) for h in base.hr])
    up = np.stack([bicubic_upscale(x, 4) for x in lr])
    return Batch(hr=base.hr, lr=lr, up=up, photo=base.photo)


def collect(
    models: TorchModels,
    crops: Batch,
    intervals: Sequence[int],
    seeds: int,
    max_batch: int,
    progress: Callable[[str], None] = print,
) -> tuple[np.ndarray, np.ndarray]:
    """LPIPS to HR of every tile under every uniform schedule: [schedule, seed, tile], and the
    crops' LR latents."""
    lr = encode_latents(models, crops.up, max_batch)
    scorer = Scorer(models, crops)
    out = np.zeros((len(intervals), seeds, len(crops.hr)))
    for i, k in enumerate(intervals):
        label = f"uniform-{steps_of(k, models.config.dtss.t_start)}"
        method = Method(label, "uniform", partial(uniform_policy, k))
        for s in range(seeds):
            res = run_method(method, models, crops, lr, s, max_batch)
            out[i, s] = scorer(scorer.images(res["latents"]), keys=("lpips",))["lpips"]
        progress(f"{method.label}: LPIPS {out[i].mean():.4f}")
    return out, lr


def features(lr_latents: np.ndarray) -> np.ndarray:
    """[N, 3 + 2C]: log texture of the LR latent at three scales (the finest is
    ``latent_texture``), and each channel's mean and standard deviation."""
    x = np.moveaxis(np.asarray(lr_latents, dtype=np.float32), 1, -1)
    bands = [latent_texture(lr_latents)]
    for level in (1, 2):
        bands.append(np.abs(low_band(x, level) - low_band(x, level + 1)).mean(axis=(1, 2, 3)))
    logs = [np.log(b + 1e-4)[:, None] for b in bands]
    return np.concatenate([*logs, x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def pooled(values: np.ndarray, photo: np.ndarray) -> float:
    """Mean of [..., tile] values with every photo weighted equally."""
    return float(np.mean([values[..., photo == p].mean() for p in np.unique(photo)]))


def room(lpips: np.ndarray, photo: np.ndarray, steps: np.ndarray) -> dict[str, Any]:
    """Each tile's best schedule chosen with the HR crop: on the same seed, and (with two or more
    seeds) chosen on seed 0 and scored on the others."""
    pick = lpips.argmin(axis=0)  # [seed, tile]
    out: dict[str, Any] = {
        "same_seed": {
            "lpips": pooled(lpips.min(axis=0), photo),
            "steps": pooled(steps[pick], photo),
        }
    }
    if lpips.shape[1] > 1:
        first = pick[0]
        other = lpips[first, 1:, np.arange(lpips.shape[2])]  # [tile, seed - 1]
        out["other_seeds"] = {"lpips": pooled(other.T, photo), "steps": pooled(steps[first], photo)}
    return out


def ridge(
    x: np.ndarray, y: np.ndarray, strength: float = 10.0
) -> Callable[[np.ndarray], np.ndarray]:
    """Ridge regression on standardised features (intercept not penalised)."""
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8

    def design(v: np.ndarray) -> np.ndarray:
        return np.c_[np.ones(len(v)), (v - mean) / scale]

    z = design(x)
    penalty = strength * np.eye(z.shape[1])
    penalty[0, 0] = 0.0
    weights = np.linalg.solve(z.T @ z + penalty, z.T @ y)
    return lambda v: design(v) @ weights


def ridge_rule_lopo(
    lpips: np.ndarray, x: np.ndarray, steps: np.ndarray, photo: np.ndarray, price: float
) -> np.ndarray:
    """Each sample's schedule (index) from a ridge regression of every schedule's LPIPS (minus
    the tile's mean) on its features, fitted without the sample's photo; the schedule with the
    lowest predicted LPIPS + price x steps. ``lpips`` is [sample, schedule]."""
    pick = np.zeros(len(lpips), dtype=int)
    for p in np.unique(photo):
        train, test = photo != p, photo == p
        target = lpips[train] - lpips[train].mean(axis=1, keepdims=True)
        predict = ridge(x[train], target)
        pick[test] = (predict(x[test]) + price * steps[None, :]).argmin(axis=1)
    return pick


def threshold_rule_lopo(
    lpips: np.ndarray,
    texture: np.ndarray,
    intervals: Sequence[int],
    photo: np.ndarray,
    *,
    t_start: int,
) -> np.ndarray:
    """The front's content rule (``fit_content``), fitted without each photo and applied to it.
    ``lpips`` is [schedule, seed, tile]; returns the chosen schedule index per tile."""
    labels = [f"u{k}" for k in intervals]
    steps = {
        lab: np.full(lpips.shape[1:], steps_of(k, t_start))
        for lab, k in zip(labels, intervals, strict=True)
    }
    pick = np.zeros(lpips.shape[2], dtype=int)
    for p in np.unique(photo):
        train, test = photo != p, photo == p
        rows = {lab: {"lpips": lpips[i][:, train]} for i, lab in enumerate(labels)}
        rule = fit_content(
            rows,
            {lab: s[:, train] for lab, s in steps.items()},
            dict(zip(labels, intervals, strict=True)),
            texture[train],
            photo[train],
        )
        flat = list(intervals).index(rule["flat_interval"])
        textured = list(intervals).index(rule["textured_interval"])
        pick[test] = np.where(texture[test] < rule["threshold"], flat, textured)
    return pick


def analyse(data: dict[str, Any], intervals: Sequence[int], *, t_start: int) -> dict[str, Any]:
    """The report's figures from ``collect``'s arrays of each degradation. Each rule is fitted
    once on both degradations together, as a deployed rule serving any input would be."""
    steps = np.array([steps_of(k, t_start) for k in intervals], dtype=np.float64)
    photo = data["photo"]
    lp = np.concatenate([data[name]["lpips"] for name in DEGRADATIONS], axis=2)
    lat = np.concatenate([data[name]["latents"] for name in DEGRADATIONS])
    tile_photo = np.tile(photo, len(DEGRADATIONS))
    tile_deg = np.repeat(np.arange(len(DEGRADATIONS)), len(photo))
    content = threshold_rule_lopo(lp, latent_texture(lat), intervals, tile_photo, t_start=t_start)
    content_lp = lp[content, :, np.arange(len(content))].T  # [seed, tile]
    seeds = lp.shape[1]
    samples = np.concatenate([lp[:, s].T for s in range(seeds)])  # [seed x tile, schedule]
    x = np.tile(features(lat), (seeds, 1))
    sample_photo, sample_deg = np.tile(tile_photo, seeds), np.tile(tile_deg, seeds)
    ridge_picks = {p: ridge_rule_lopo(samples, x, steps, sample_photo, p) for p in PRICES}
    report: dict[str, Any] = {"degradations": {}}
    for d, name in enumerate(DEGRADATIONS):
        m = tile_deg == d
        own = data[name]["lpips"]
        uniform = {int(n): pooled(own[i], photo) for i, n in enumerate(steps)}
        best = min(uniform.items(), key=lambda kv: kv[1])
        r: dict[str, Any] = {
            "uniform": uniform,
            "best_uniform": {"steps": best[0], "lpips": best[1]},
            "room": room(own, photo, steps),
            "content_rule_lopo": {
                "lpips": pooled(content_lp[:, m], photo),
                "steps": pooled(steps[content[m]], photo),
            },
            "ridge_rule_lopo": {},
        }
        sm = sample_deg == d
        for price, pick in ridge_picks.items():
            chosen = samples[np.arange(len(samples)), pick]
            r["ridge_rule_lopo"][str(price)] = {
                "lpips": pooled(chosen[sm], sample_photo[sm]),
                "steps": pooled(steps[pick][sm], sample_photo[sm]),
            }
        report["degradations"][name] = r
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']['source']} on {len(report['photos'])} tuning photos "
        f"({report['crops_per_photo']} crops each, {report['seeds']} seeds): LPIPS to HR "
        "(steps per tile), every photo weighted equally",
        "",
        "| | " + " | ".join(DEGRADATIONS) + " |",
        "|---|" + "---|" * len(DEGRADATIONS),
    ]
    degs = [report["degradations"][d] for d in DEGRADATIONS]
    for steps in degs[0]["uniform"]:
        lines.append(
            f"| uniform-{steps} | " + " | ".join(f"{r['uniform'][steps]:.4f}" for r in degs) + " |"
        )

    def row(label: str, cells: list[dict[str, float]]) -> None:
        lines.append(
            f"| {label} | "
            + " | ".join(f"{c['lpips']:.4f} ({c['steps']:.1f})" for c in cells)
            + " |"
        )

    row("best schedule per tile, chosen with HR", [r["room"]["same_seed"] for r in degs])
    if "other_seeds" in degs[0]["room"]:
        row(
            "  chosen with HR on seed 0, scored on the others",
            [r["room"]["other_seeds"] for r in degs],
        )
    row("content rule, fitted on the other photos", [r["content_rule_lopo"] for r in degs])
    for price in degs[0]["ridge_rule_lopo"]:
        row(
            f"ridge rule on LR features, price {price}/step, other photos",
            [r["ridge_rule_lopo"][price] for r in degs],
        )
    return "\n".join(lines)


def _progress(degradation: str, start: float, text: str) -> None:
    print(f"{degradation} {text} ({time.perf_counter() - start:.0f}s)", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    models = load_models(args.model)
    base = holdout_crops(models.config, args.photos, args.crops, CROP_SEED)
    data: dict[str, Any] = {"photo": base.photo}
    start = time.perf_counter()
    for name in DEGRADATIONS:
        lp, lat = collect(
            models,
            degraded(base, name),
            args.intervals,
            args.seeds,
            args.max_batch,
            partial(_progress, name, start),
        )
        data[name] = {"lpips": lp, "latents": lat}
    report = analyse(data, args.intervals, t_start=models.config.dtss.t_start)
    report.update(
        {
            "argv": sys.argv[1:],
            "model": describe(models),
            "weights": weights_of(args.model),
            "photos": list(args.photos),
            "crops_per_photo": args.crops,
            "seeds": args.seeds,
            "intervals": list(args.intervals),
            "per_tile_lpips": {d: data[d]["lpips"].round(5).tolist() for d in DEGRADATIONS},
            "photo_of_tile": base.photo.tolist(),
            "seconds": round(time.perf_counter() - start, 1),
            "machine": machine(),
        }
    )
    return report


def tuning_photos(text: str) -> tuple[str, ...]:
    names = (
        tuple(photo_names(text))
        if text in ("train", "train+validation")
        else evaluation_photos(text)
    )
    held = [n for n in names if n in HOLDOUT]
    if held:  # argparse turns these into one usage line and exit code 2
        raise argparse.ArgumentTypeError(
            f"{', '.join(held)}: hold-out photos; rules are fitted here, so tune on train, "
            "validation or train+validation and report on the hold-out photos with "
            "benchmarks.front"
        )
    if len(names) < 2:
        raise argparse.ArgumentTypeError("leave-one-photo-out fits need at least two photos")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pertile", description=__doc__)
    p.add_argument("--model", default="tiny", help="preset or model folder (default: tiny)")
    p.add_argument(
        "--photos",
        type=tuning_photos,
        default="train+validation",
        help="train, validation, train+validation or names separated by commas; never hold-out "
        "photos (default: train+validation)",
    )
    p.add_argument("--crops", type=positive, default=16, help="tile crops per photo (default: 16)")
    p.add_argument("--seeds", type=positive, default=2, help="noise seeds (default: 2)")
    p.add_argument(
        "--intervals",
        type=interval_list,
        default=INTERVALS,
        help="uniform intervals, comma-separated (default: 999,500,333,200,100,50)",
    )
    p.add_argument("--max-batch", type=positive, default=32)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--out", type=Path, required=True, help="folder for pertile.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:  # a typo fails now, in one line, not in a traceback during or after the runs
        check_out_folder(args.out)
        for name in args.photos:
            find_photo(name)
        check_intervals(args.intervals, model_config(args.model).dtss.t_start)
        report = run(args)
    except AdadiffError as exc:
        print(f"python -m benchmarks.pertile: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pertile.json"
    path.write_text(json.dumps(report, indent=1))
    print(render(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
