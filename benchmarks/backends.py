"""Section 3: every backend variant, per component and batch size, and in a whole upscale.

Latency is the engine call alone (name -> array in and out, as the runtime sees it), median of N
after one warm-up call per shape. Host overhead is the share of an adaptive upscale's wall time
spent outside engine calls: tiling, the sampler's numpy work, MMLE gains, policy, merge.
"""

from __future__ import annotations

import traceback
from functools import partial
from typing import Any

from benchmarks.suites import Context, Progress, Variant
from benchmarks.timing import Stopwatch, measure, median

COMPONENTS = ("unet", "mmle", "pfj", "vae_encoder", "vae_decoder")


def run(ctx: Context) -> dict[str, Any]:
    suite = ctx.suite
    found = ctx.variants
    progress = Progress("backends", len(found) * (len(COMPONENTS) + 1))
    results: dict[str, Any] = {}
    for variant in found:
        try:
            results[variant.label] = _one(ctx, variant, progress)
        except Exception as exc:  # one failing backend must not hide the others' figures
            results[variant.label] = {
                "backend": variant.backend,
                "precision": variant.precision,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=3),
            }
            print(f"[backends] {variant.label} failed: {exc}", flush=True)
    return {
        "batches": list(suite.batches),
        "photo": suite.regroup_photo,
        "long_side": suite.regroup_size,
        "variants": results,
        "comparison": compare(results),
    }


def _one(ctx: Context, variant: Variant, progress: Progress) -> dict[str, Any]:
    suite, settings = ctx.suite, ctx.settings
    up = ctx.upscaler(variant)
    latency: dict[str, dict[str, Any]] = {}
    for name in COMPONENTS:
        engine = up.components.get(name).engine
        spec = engine.spec
        per_batch: dict[str, Any] = {}
        for batch in suite.batches:
            feeds = spec.sample_inputs(batch, seed=batch)
            timing, _ = measure(
                partial(engine, feeds),
                repeats=max(suite.repeats, 3),
                warmup=1,
                device=settings.device,
            )
            row = timing.to_dict()
            row["per_item"] = round(timing.median / batch, 6)
            per_batch[str(batch)] = row
        latency[name] = per_batch
        progress.step(f"{variant.label} {name}", 1)
    img = ctx.image(suite.regroup_photo, suite.regroup_size)
    runs = []
    for _ in range(suite.repeats):
        with Stopwatch(settings.device) as watch:
            _, rep = up.upscale(img, schedule="adaptive", seed=settings.seed)
        engine_seconds = sum(c["seconds"] for c in rep.components.values())
        runs.append(
            {
                "wall": round(watch.seconds, 4),
                "engine_seconds": round(engine_seconds, 4),
                "host_share": round(1.0 - engine_seconds / watch.seconds, 4),
                "components": rep.components,
            }
        )
    progress.step(f"{variant.label} upscale", 1)
    return {
        "backend": variant.backend,
        "precision": variant.precision,
        "describe": _plain(up.backend.describe()),
        "latency": latency,
        "upscale": {
            "unet_evaluations": rep.unet_evaluations,
            "engine_calls": rep.engine_calls,
            "wall_median": round(median([r["wall"] for r in runs]), 4),
            "host_share_median": round(median([r["host_share"] for r in runs]), 4),
            "runs": runs,
        },
    }


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Every variant against the first one that ran: per-component latency ratios per batch
    and the whole-upscale wall time ratio (below 1: faster than the baseline)."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    if len(ok) < 2:
        return {}
    base_label, base = next(iter(ok.items()))
    out: dict[str, Any] = {"baseline": base_label}
    for label, v in ok.items():
        if label == base_label:
            continue
        comps = {}
        for name, per_batch in v["latency"].items():
            comps[name] = {
                b: round(row["median"] / base["latency"][name][b]["median"], 4)
                for b, row in per_batch.items()
                if base["latency"][name].get(b, {}).get("median")
            }
        out[f"{label}/{base_label}"] = {
            "latency": comps,
            "upscale_wall": round(v["upscale"]["wall_median"] / base["upscale"]["wall_median"], 4),
        }
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
