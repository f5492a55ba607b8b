"""Section 1: the adaptive schedule against uniform ones on real photos.

Per photo and schedule: UNet evaluations, engine calls, FLOPs per component (counted per call
shape, times the recorded calls), wall time (median of N) and, against the reference schedule
(uniform-200, as StableSR), PSNR and SSIM of the output. Same seed everywhere, so the schedules
start from the same noise.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from benchmarks.flops import report_flops
from benchmarks.suites import Context, Progress, ScheduleSpec
from benchmarks.timing import measure

COMPONENT_ORDER = ("unet", "mmle", "pfj", "vae_encoder", "vae_decoder")


def expected_steps(spec: ScheduleSpec, ctx: Context) -> float:
    """A rough UNet evaluations per tile, only to weight progress estimates."""
    dtss = ctx.upscaler().config.dtss
    interval = spec.interval if spec.schedule == "uniform" else dtss.tiers[2]
    return math.ceil(dtss.t_start / (interval or ctx.upscaler().config.uniform_interval))


def run(ctx: Context) -> dict[str, Any]:
    suite, settings = ctx.suite, ctx.settings
    up = ctx.upscaler()
    counter = ctx.flop_counter()
    images = {name: ctx.image(name, suite.photo_size) for name in suite.photos}
    work = {
        (name, spec.label): _tiles(ctx, img) * expected_steps(spec, ctx) * suite.repeats
        for name, img in images.items()
        for spec in suite.schedules
    }
    progress = Progress("schedules", sum(work.values()))
    rows: list[dict[str, Any]] = []
    for name, img in images.items():
        outputs: dict[str, np.ndarray] = {}
        photo_rows: dict[str, dict[str, Any]] = {}
        for spec in suite.schedules:
            timing, (out, rep) = measure(
                partial(
                    up.upscale,
                    img,
                    schedule=spec.schedule,
                    interval=spec.interval,
                    seed=settings.seed,
                ),
                repeats=suite.repeats,
                warmup=0,
                device=settings.device,
            )
            outputs[spec.label] = out
            row = _row(name, img, spec, rep, timing.to_dict(), report_flops(counter, rep))
            photo_rows[spec.label] = row
            rows.append(row)
            progress.step(
                f"{name} {spec.label}: {rep.unet_evaluations} evaluations, {timing.median:.2f}s",
                work[(name, spec.label)],
            )
        ref = outputs[suite.reference]
        for label, row in photo_rows.items():
            row["quality_vs_reference"] = (
                None if label == suite.reference else image_difference(outputs[label], ref)
            )
    result = {
        "reference": suite.reference,
        "photos": {
            name: {"long_side": suite.photo_size, "size": [img.shape[1], img.shape[0]]}
            for name, img in images.items()
        },
        "schedules": [
            {"label": s.label, "schedule": s.schedule, "interval": s.interval}
            for s in suite.schedules
        ],
        "flops_per_tile": counter.table(),
        "flops_linear_in_batch": counter.linear_in_batch("unet"),
        "flops_method": "torch.utils.flop_counter.FlopCounterMode on the torch export wrappers",
        "rows": rows,
    }
    result["totals"] = totals(result)
    return result


def _tiles(ctx: Context, img: np.ndarray) -> int:
    from benchmarks.suites import tiles_of

    return tiles_of(ctx.upscaler().config, img.shape[1], img.shape[0])


def _row(
    photo: str,
    img: np.ndarray,
    spec: ScheduleSpec,
    rep: Any,
    seconds: dict[str, Any],
    flops: dict[str, int],
) -> dict[str, Any]:
    steps = rep.steps_per_tile
    return {
        "photo": photo,
        "label": spec.label,
        "schedule": spec.schedule,
        "interval": spec.interval,
        "input_size": [img.shape[1], img.shape[0]],
        "tiles": rep.tiles,
        "unet_evaluations": rep.unet_evaluations,
        "engine_calls": rep.engine_calls,
        "rounds": rep.rounds,
        "mean_batch": round(rep.mean_batch, 3),
        "steps_per_tile": {
            "min": int(min(steps)),
            "mean": round(float(np.mean(steps)), 2),
            "max": int(max(steps)),
        },
        "early_exits": sum(e == "saturated" for e in rep.exits),
        "categories": rep.categories,
        "flops": flops,
        "seconds": seconds,
        "stages": rep.seconds,
        "components": rep.components,
    }


def image_difference(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = peak_signal_noise_ratio(reference, image, data_range=1.0)
    ssim = structural_similarity(reference, image, data_range=1.0, channel_axis=2)
    return {"psnr": round(float(psnr), 3), "ssim": round(float(ssim), 4)}


def totals(section: dict[str, Any]) -> dict[str, Any]:
    """Per schedule, summed over photos (time: sum of the per-photo medians), and every
    schedule's ratio to the reference: all from the rows, so a reader can redo them."""
    by_label: dict[str, dict[str, Any]] = {}
    for row in section["rows"]:
        t = by_label.setdefault(
            row["label"],
            {"unet_evaluations": 0, "engine_calls": 0, "tiles": 0, "seconds": 0.0, "flops": {}},
        )
        t["unet_evaluations"] += row["unet_evaluations"]
        t["engine_calls"] += row["engine_calls"]
        t["tiles"] += row["tiles"]
        t["seconds"] += row["seconds"]["median"]
        for comp, value in row["flops"].items():
            t["flops"][comp] = t["flops"].get(comp, 0) + value
        q = row.get("quality_vs_reference")
        if q:
            t.setdefault("_quality", []).append(q)
    ref = by_label[section["reference"]]
    for label, t in by_label.items():
        t["seconds"] = round(t["seconds"], 4)
        quality = t.pop("_quality", None)
        if quality:
            t["psnr_mean"] = round(float(np.mean([q["psnr"] for q in quality])), 3)
            t["ssim_mean"] = round(float(np.mean([q["ssim"] for q in quality])), 4)
        flops = t["flops"]
        t["scoring_flops_share"] = _ratio(
            flops.get("mmle", 0) + flops.get("pfj", 0), flops["total"]
        )
        if label != section["reference"]:
            t["vs_reference"] = {
                "unet_evaluations": _ratio(t["unet_evaluations"], ref["unet_evaluations"]),
                "flops": _ratio(flops["total"], ref["flops"]["total"]),
                "unet_flops": _ratio(flops.get("unet", 0), ref["flops"].get("unet", 0)),
                "seconds": _ratio(t["seconds"], ref["seconds"]),
            }
    return by_label


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None
