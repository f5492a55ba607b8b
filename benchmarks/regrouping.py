"""Section 2: one adaptive upscale executed three ways.

``regroup`` puts every active tile in one call per round whatever its timestep, ``timestep``
only tiles at the same timestep, ``tile`` one tile per call. Results are identical (checked);
calls, batch sizes and time are not.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from benchmarks.suites import Context, Progress
from benchmarks.timing import measure

GROUPINGS = ("regroup", "timestep", "tile")


def run(ctx: Context) -> dict[str, Any]:
    suite, settings = ctx.suite, ctx.settings
    up = ctx.upscaler()
    img = ctx.image(suite.regroup_photo, suite.regroup_size)
    # Tile by tile runs about three times longer than regrouped on 2 CPU cores.
    weights = {"regroup": 1.0, "timestep": 2.0, "tile": 3.0}
    progress = Progress("regrouping", sum(weights.values()) * suite.repeats)
    rows: list[dict[str, Any]] = []
    first: np.ndarray | None = None
    for grouping in GROUPINGS:
        timing, (out, rep) = measure(
            partial(up.upscale, img, schedule="adaptive", seed=settings.seed, grouping=grouping),
            repeats=suite.repeats,
            warmup=0,
            device=settings.device,
        )
        first = out if first is None else first
        wall = timing.median
        unet_seconds = rep.components.get("unet", {}).get("seconds", 0.0)
        rows.append(
            {
                "grouping": grouping,
                "tiles": rep.tiles,
                "unet_evaluations": rep.unet_evaluations,
                "engine_calls": rep.engine_calls,
                "mean_batch": round(rep.mean_batch, 3),
                "seconds": timing.to_dict(),
                "seconds_per_evaluation": round(wall / rep.unet_evaluations, 6),
                "unet_seconds": round(unet_seconds, 4),
                "unet_seconds_per_evaluation": round(unet_seconds / rep.unet_evaluations, 6),
                "max_abs_difference_to_regroup": float(np.max(np.abs(out - first))),
                "components": rep.components,
            }
        )
        progress.step(
            f"{grouping}: {rep.engine_calls} calls, mean batch {rep.mean_batch:.2f}, {wall:.2f}s",
            weights[grouping] * suite.repeats,
        )
    return {
        "photo": suite.regroup_photo,
        "long_side": suite.regroup_size,
        "input_size": [img.shape[1], img.shape[0]],
        "max_batch": settings.max_batch,
        "rows": rows,
        "speedup": speedups(rows),
    }


def speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Wall time of each grouping over the regrouped one's (how much regrouping saves)."""
    by = {r["grouping"]: r["seconds"]["median"] for r in rows}
    base = by.get("regroup")
    if not base:
        return {}
    return {f"{g}/regroup": round(s / base, 4) for g, s in by.items() if g != "regroup"}
