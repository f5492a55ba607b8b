"""The quality/compute front: is the adaptive schedule worth its decisions?

    python -m benchmarks.front --out runs/front [--model tiny] [--seeds 3] [--crops 16]
    adadiff bench front --out runs/front ...

On tile-sized crops of the hold-out photos (bicubic x4 degradation; never trained or tuned on;
``--photos validation`` for the photos choices are tuned on),
every schedule runs through the runtime's own sampler from the same noise, one crop per tile:

- uniform schedules (intervals 999 .. 5: 1 to 200 UNet evaluations per tile; a small model can
  be at its best with 1 to 3 steps);
- the fixed early exit (``--exit INTERVAL@T``): jumps of INTERVAL, every tile stops at its first
  step with t < T and returns that step's clean estimate (no MMLE);
- DTSS driven by MMLE, with the model's own calibration and with each ``--dtss NAME=FILE``
  (an ``adadiff.json`` or a JSON holding its ``dtss`` and ``mmle.metrics``);
- DTSS driven by the oracle (the real metrics of each decoded estimate, what MMLE is trained to
  predict: the upper bound of the regressor) on ``--oracle-seeds`` seeds.

Each output tile is colour-corrected as the Upscaler corrects its output and scored against the
HR crop: LPIPS, PSNR, SSIM, and BRISQUE (no reference). Intervals are 90% percentile intervals
from resampling crops (within each photo) and seeds together; differences between two schedules
are paired (same crops, same seeds). The JSON also holds the diagnostics: each adaptive run's
gains per timestep band against tau, how often each category fires, and whether the tiles that
gain from more steps (LPIPS at 20 against 200 steps) are the ones DTSS gives more steps.

A full front takes 30 to over 90 minutes on two cores. Each finished (schedule, seed) run is saved
under ``OUT/.runs``; run the same command again after an interruption and it resumes there
(runs made with other weights or crops are refused, not mixed in). The folder goes once
``front.json`` is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadiff.argtypes import DefaultsFormatter, non_negative, positive
from adadiff.config import ContentConfig, DTSSConfig, MetricConfig, ModelConfig
from adadiff.errors import AdadiffError, ConfigError
from adadiff.models.bundle import TorchModels, describe, load_models
from adadiff.presets import model_config
from adadiff.quality.brisque import brisque
from adadiff.quality.lpips import load_lpips
from adadiff.quality.metrics import psnr_capped, ssim
from adadiff.runtime.colorfix import color_fix
from adadiff.runtime.content import ContentPolicy, latent_texture
from adadiff.runtime.policy import (
    DTSSPolicy,
    FixedExitPolicy,
    RecordingPolicy,
    StepPolicy,
    UniformPolicy,
)
from adadiff.training.data import HOLDOUT, VALIDATION, find_photo
from adadiff.training.fingerprint import hash_tensors
from adadiff.training.labels import (
    OracleScorer,
    decode_latents,
    encode_latents,
    mmle_score,
    sample_with,
)
from adadiff.training.mmle import spearman
from adadiff.training.pairs import Batch, crops_per_photo, evaluation_photos
from benchmarks.machine import machine, weights_of
from benchmarks.paths import readme_arg
from benchmarks.report import check_readme, ci, read_saved, relative_link

log = logging.getLogger("adadiff")

HOLDOUT_PHOTOS = HOLDOUT
UNIFORM_INTERVALS = (999, 500, 333, 200, 100, 50, 20, 10, 5)
# Timestep bands of the gain diagnostics: (low, high], first band holds t = 0.
BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))
QUALITY_KEYS = ("lpips", "psnr", "ssim", "brisque")
START, END = "<!-- front:start -->", "<!-- front:end -->"


@dataclass(frozen=True)
class Method:
    """One schedule of the front: a label, how it decides, and what scores it."""

    label: str
    kind: str  # uniform | fixed-exit | content | mmle | oracle
    policy: Callable[[np.ndarray], StepPolicy]  # from the crops' LR latents (content reads them)
    metrics: tuple[MetricConfig, ...] = ()
    dtss: DTSSConfig | None = None
    seeds: int | None = None  # None: every seed
    interval: int | None = None  # uniform schedules: their interval
    spec: str = ""  # what the policy closure holds (a content rule, an exit), for the run store

    def key(self) -> str:
        """Everything that decides this method's runs: a saved run is reused only if it matches."""
        return repr((self.label, self.kind, self.interval, self.dtss, self.metrics, self.spec))


def holdout_crops(model: ModelConfig, photos: Sequence[str], crops: int, seed: int) -> Batch:
    """``crops`` tile-sized bicubic x4 crops of each photo, drawn as training crops are (random
    flip, rotation and mild colour jitter; nearly flat crops drawn again): the HR crop is the
    jittered one, so each pair is a true x4 pair (docs/adaptive.md says so too)."""
    return crops_per_photo(
        photos, crops, size=model.tile_size, scale=model.upscale, seed=seed, stream=901
    )


def load_dtss(path: Path, base: ModelConfig) -> tuple[DTSSConfig, tuple[MetricConfig, ...]]:
    """The DTSS numbers and metric weights of an ``adadiff.json`` (or a part of one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--dtss {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--dtss {path}: expected a JSON object (an adadiff.json or a part)")
    try:
        dtss = DTSSConfig(**data["dtss"]) if "dtss" in data else base.dtss
        metrics = base.mmle.metrics
        if "mmle" in data and "metrics" in data["mmle"]:
            metrics = tuple(MetricConfig(**m) for m in data["mmle"]["metrics"])
        # the model's own checks (t_start and nr_start_t against its noise schedule)
        replace(base, dtss=dtss, mmle=replace(base.mmle, metrics=metrics))
    except (ConfigError, TypeError) as exc:
        raise SystemExit(f"{path}: {exc}") from exc
    if [m.name for m in metrics] != [m.name for m in base.mmle.metrics]:
        raise SystemExit(f"{path}: its metrics must be the model's, in the same order")
    return dtss, metrics


# Policy factories for Method.policy, bound to their settings with functools.partial; the LR
# latents matter only to the content rule.
def uniform_policy(interval: int, _lr: np.ndarray) -> StepPolicy:
    return UniformPolicy(interval)


def exit_policy(interval: int, below: int, _lr: np.ndarray) -> StepPolicy:
    return FixedExitPolicy(interval, below)


def content_policy(rule: ContentConfig, lr: np.ndarray) -> StepPolicy:
    return ContentPolicy.of(lr, rule)


def dtss_policy(dtss: DTSSConfig, _lr: np.ndarray) -> StepPolicy:
    return DTSSPolicy(dtss)


def methods(args: argparse.Namespace, cfg: ModelConfig) -> list[Method]:
    out = [
        Method(
            f"uniform-{-(-cfg.dtss.t_start // k)}",
            "uniform",
            partial(uniform_policy, k),
            interval=k,
        )
        for k in args.uniform
    ]
    rules = [("model", cfg.content)] if cfg.content.threshold > 0 else []
    for name, rule in rules + list(args.content):
        out.append(
            Method(
                f"content-{name}",
                "content",
                partial(content_policy, rule),
                spec=repr(rule),
            )
        )
    for interval, below in args.exit:
        out.append(
            Method(
                f"exit-{interval}@{below}",
                "fixed-exit",
                partial(exit_policy, interval, below),
                spec=f"{interval}@{below}",
            )
        )
    calibrations = [("model", cfg.dtss, cfg.mmle.metrics)]
    calibrations += [(name, *load_dtss(path, cfg)) for name, path in args.dtss]
    for name, dtss, metrics in calibrations:
        out.append(Method(f"dtss-mmle-{name}", "mmle", partial(dtss_policy, dtss), metrics, dtss))
    if args.oracle_seeds:
        out.append(
            Method(
                "dtss-oracle-model",
                "oracle",
                partial(dtss_policy, cfg.dtss),
                cfg.mmle.metrics,
                cfg.dtss,
                seeds=args.oracle_seeds,
            )
        )
    return out


def check_labels(plan: Sequence[Method]) -> None:
    """Refuse two schedules of one label: their runs would be pooled as if they were seeds of
    one schedule (a uniform interval is labelled by its steps per tile, so 334 and 333 are
    both uniform-3 from t = 999)."""
    seen: dict[str, Method] = {}
    for method in plan:
        first = seen.setdefault(method.label, method)
        if first is method:
            continue
        if method.kind == "uniform":
            why = f"--uniform {first.interval} and {method.interval} take as many steps per tile"
        elif method.kind == "fixed-exit":
            why = f"--exit {method.spec} is given twice"
        else:  # content and mmle: NAME=...
            flag = "--content" if method.kind == "content" else "--dtss"
            why = f"{flag} names must differ, and 'model' is the model's own"
        raise ConfigError(f"two schedules are both labelled {method.label}: {why}; give each once")


class Scorer:
    """Decode, colour-correct like the Upscaler, and score tiles against their HR crops."""

    def __init__(self, models: TorchModels, crops: Batch) -> None:
        self.decoder = models.wrappers()["vae_decoder"]
        self.fix = models.config.color_fix
        self.crops = crops
        self.lpips = load_lpips()
        self._hr = self._tensor(crops.hr)

    @staticmethod
    def _tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0

    def images(self, latents: np.ndarray) -> np.ndarray:
        parts = [
            decode_latents(self.decoder, latents[i : i + 16]) for i in range(0, len(latents), 16)
        ]
        return color_fix(np.concatenate(parts), self.crops.up, self.fix)

    def __call__(
        self, images: np.ndarray, keys: Sequence[str] = QUALITY_KEYS
    ) -> dict[str, np.ndarray]:
        hr = self.crops.hr
        out: dict[str, np.ndarray] = {}
        if "lpips" in keys:
            with torch.inference_mode():
                out["lpips"] = self.lpips(self._tensor(images), self._hr).numpy().astype(np.float64)
        if "psnr" in keys:
            out["psnr"] = np.array([psnr_capped(a, b) for a, b in zip(images, hr, strict=True)])
        if "ssim" in keys:
            out["ssim"] = np.array([ssim(a, b) for a, b in zip(images, hr, strict=True)])
        if "brisque" in keys:
            out["brisque"] = np.array([brisque(a) for a in images])
        return out


def run_method(
    method: Method, models: TorchModels, crops: Batch, lr: np.ndarray, seed: int, max_batch: int
) -> dict[str, Any]:
    cfg = models.config
    dtss = method.dtss or cfg.dtss
    metrics = method.metrics or cfg.mmle.metrics
    policy = RecordingPolicy(method.policy(lr))
    if method.kind == "oracle":
        # the upper bound of what MMLE can do: the scores it learned, computed exactly
        score: Callable[..., np.ndarray] = OracleScorer(
            models,
            crops.up,
            lr,
            metrics,
            hr=crops.hr if cfg.mmle.reference == "hr" else None,
            reference=cfg.mmle.reference,
        )
    else:
        score = mmle_score(models)
    start = time.perf_counter()
    result = sample_with(
        models, lr, score, policy, seed=seed, max_batch=max_batch, dtss=dtss, metrics=metrics
    )
    return {
        "latents": result.latents,
        "steps": np.array(result.steps_per_tile),
        "exits": result.exits,
        "decisions": policy.rows,
        "seconds": time.perf_counter() - start,
    }


RUNS = ".runs"


def weights_digest(models: TorchModels) -> str:
    """SHA-256 of every weight the runs depend on (a changed checkpoint changes every run)."""
    h = hashlib.sha256(models.config.digest().encode())
    for name, module in (
        ("unet", models.unet),
        ("vae", models.vae),
        ("pfj", models.pfj),
        ("mmle", models.mmle),
    ):
        hash_tensors(h, ((f"{name}.{k}", v) for k, v in sorted(module.state_dict().items())))
    hash_tensors(h, [("", models.text_embedding)])  # unnamed, as runs saved so far were keyed
    return h.hexdigest()


def _changed(marker: Path, setting: dict[str, Any]) -> str:
    """What differs from the saved setting, as the options that gave it (the weights' digest
    would tell a reader nothing: they are 'other weights')."""
    try:
        saved = json.loads(marker.read_text())
    except ValueError:
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    parts = []
    for key, value in setting.items():
        if saved.get(key) == value:
            continue
        flag = f"--{key.replace('_', '-')}"
        if key == "weights" or key not in saved:  # a marker older than the key: not known
            parts.append("other weights" if key == "weights" else f"another {flag}")
        elif key == "photos":
            parts.append(f"--photos {','.join(saved[key])}")
        else:
            parts.append(f"{flag} {saved[key]}")
    return ", ".join(parts) or "other settings"


class RunStore:
    """Finished (method, seed) runs kept under ``OUT/.runs`` while the front is measured, so a
    front stopped part-way (a session's end, Ctrl-C) resumes where it stopped. A run is reused
    only under the same setting (weights, crops) and the same method definition."""

    def __init__(self, folder: Path, setting: dict[str, Any]) -> None:
        self.folder = folder
        marker = folder / "setting.json"
        text = json.dumps(setting, indent=1, sort_keys=True) + "\n"
        if marker.is_file() and marker.read_text() != text:
            raise ConfigError(
                f"{folder} holds runs of an earlier front measured with "
                f"{_changed(marker, setting)} (see {marker}); give those options to resume, "
                "delete that folder to start over, or pass another --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(text)

    def _path(self, method: Method, seed: int) -> Path:
        digest = hashlib.sha256(method.key().encode()).hexdigest()[:16]
        return self.folder / f"{digest}-seed{seed}.json"

    def load(self, method: Method, seed: int) -> dict[str, Any] | None:
        path = self._path(method, seed)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("method") != method.key():
            return None
        return record

    def save(self, method: Method, seed: int, record: dict[str, Any]) -> None:
        path = self._path(method, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"method": method.key(), "seed": seed, **record}))
        os.replace(tmp, path)  # a run is either saved whole or not at all

    def __len__(self) -> int:
        return len(list(self.folder.glob("*-seed*.json")))


def measure_run(
    method: Method,
    seed: int,
    models: TorchModels,
    crops: Batch,
    lr: np.ndarray,
    scorer: Scorer,
    max_batch: int,
    store: RunStore | None,
) -> tuple[dict[str, Any], bool]:
    """One (method, seed) run scored per tile, from the store when it holds it; True if reused."""
    if store is not None and (saved := store.load(method, seed)) is not None:
        return saved, True
    res = run_method(method, models, crops, lr, seed, max_batch)
    q = scorer(scorer.images(res["latents"]))
    record = {
        "quality": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in q.items()},
        "steps": [int(n) for n in res["steps"]],
        "decisions": [
            [int(tile), int(t), float(g_fr), float(g_nr), str(cat)]
            for tile, t, g_fr, g_nr, cat in res["decisions"]
        ],
        "seconds": float(res["seconds"]),
    }
    if store is not None:
        store.save(method, seed, record)
    return record, False


Interval = tuple[float, float | None, float | None]  # mean, low, high (None: unavailable)


def bootstrap_mean(
    values: np.ndarray, strata: np.ndarray, *, draws: int = 2000, seed: int = 0
) -> Interval:
    """Mean of [seeds, crops] values and its 90% interval: crops resampled within each stratum
    (photo) and seeds resampled, together. With one crop per photo the crops are resampled
    across photos; with one crop and one seed nothing can be, and the interval is unavailable
    (None, None), not a zero width that reads as exact."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, np.float64)
    n_seeds, n_crops = values.shape
    if n_seeds == 1 and n_crops == 1:
        return float(values.mean()), None, None
    if len(np.unique(strata)) == n_crops:  # one crop per photo: the photos are what varies
        strata = np.zeros(n_crops, dtype=int)
    # How often each seed and each crop is drawn, per resample: the resampled mean is then
    # seed_counts @ values @ crop_counts / (seeds * crops), one einsum for every draw.
    seed_counts = np.zeros((draws, n_seeds))
    picks = rng.integers(0, n_seeds, (draws, n_seeds))
    np.add.at(seed_counts, (np.arange(draws)[:, None], picks), 1.0)
    crop_counts = np.zeros((draws, n_crops))
    for g in np.unique(strata):
        members = np.flatnonzero(strata == g)
        chosen = members[rng.integers(0, len(members), (draws, len(members)))]
        np.add.at(crop_counts, (np.arange(draws)[:, None], chosen), 1.0)
    stats = np.einsum("ds,sc,dc->d", seed_counts, values, crop_counts) / (n_seeds * n_crops)
    low, high = np.percentile(stats, [5, 95])
    return float(values.mean()), float(low), float(high)


def gain_diagnostics(
    decisions: list[tuple[int, int, float, float, str]], dtss: DTSSConfig
) -> dict[str, Any]:
    """Quantiles of g_FR and g_NR per timestep band, the share of |g| >= tau, and categories."""
    if not decisions:
        return {}
    t = np.array([d[1] for d in decisions])
    g = {"g_fr": np.array([d[2] for d in decisions]), "g_nr": np.array([d[3] for d in decisions])}
    cats = [d[4] for d in decisions]
    bands = []
    for low, high in BANDS:
        rows = (t > low) & (t <= high) if low else (t >= 0) & (t <= high)
        entry: dict[str, Any] = {"t": [low, high], "steps": int(rows.sum())}
        for key, values in g.items():
            v = values[rows] if rows.any() else np.zeros(1)
            entry[key] = {
                "q05_q50_q95": [float(x) for x in np.percentile(v, [5, 50, 95])],
                "share_above_tau": float(np.mean(v >= dtss.tau)),
                "share_below_minus_tau": float(np.mean(v <= -dtss.tau)),
            }
        entry["categories"] = {
            c: int(sum(1 for i in np.flatnonzero(rows) if cats[i] == c))
            for c in ("growth", "stable", "saturated")
        }
        bands.append(entry)
    counts = {c: cats.count(c) for c in ("growth", "stable", "saturated")}
    return {
        "tau": dtss.tau,
        "steps": len(cats),
        "categories": counts,
        "growth_share": counts["growth"] / len(cats),
        "bands": bands,
    }


def summarize(
    rows: dict[str, dict[str, np.ndarray]],
    steps: dict[str, np.ndarray],
    strata: np.ndarray,
    photos: Sequence[str],
) -> dict[str, Any]:
    """Per method: mean steps per tile and each quality key, pooled and per photo, with
    intervals; and paired LPIPS differences against the best uniform schedule that costs no
    more and against every fixed exit."""
    out: dict[str, Any] = {}
    for label, q in rows.items():
        entry: dict[str, Any] = {"steps_per_tile": float(steps[label].mean())}
        for key in QUALITY_KEYS:
            entry[key] = bootstrap_mean(q[key], strata)
            entry[f"{key}_per_photo"] = {
                name: bootstrap_mean(q[key][:, strata == k], strata[strata == k])
                for k, name in enumerate(photos)
            }
        out[label] = entry
    uniform = [m for m in out if m.startswith("uniform-")]
    for label, entry in out.items():
        if label in uniform:
            continue
        n = rows[label]["lpips"].shape[0]
        cheaper = [u for u in uniform if out[u]["steps_per_tile"] <= entry["steps_per_tile"]]
        if cheaper:
            best = min(cheaper, key=lambda u: out[u]["lpips"][0])
            diff = rows[label]["lpips"] - rows[best]["lpips"][:n]
            entry["vs_best_uniform"] = {"method": best, "lpips_diff": bootstrap_mean(diff, strata)}
        entry["vs_fixed_exit"] = {
            e: bootstrap_mean(rows[label]["lpips"] - rows[e]["lpips"][:n], strata)
            for e in out
            if e.startswith("exit-") and e != label
        }
        entry["vs_content"] = {
            e: bootstrap_mean(rows[label]["lpips"] - rows[e]["lpips"][:n], strata)
            for e in out
            if e.startswith("content-") and e != label
        }
    reference = "uniform-200" if "uniform-200" in out else None
    if reference:
        ref = out[reference]["lpips"][0]
        for entry in out.values():
            entry["reaches_uniform_200_lpips"] = entry["lpips"][0] <= ref
            entry["steps_vs_uniform_200"] = (
                entry["steps_per_tile"] / out[reference]["steps_per_tile"]
            )
    return out


def gain_from_steps(
    rows: dict[str, dict[str, np.ndarray]], steps: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Per tile (and seed): LPIPS at 20 steps minus LPIPS at 200 steps (positive: more steps
    help), and its Spearman rho with each adaptive schedule's steps per tile."""
    if "uniform-20" not in rows or "uniform-200" not in rows:
        return {}
    gain = (rows["uniform-20"]["lpips"] - rows["uniform-200"]["lpips"]).ravel()
    out: dict[str, Any] = {
        "mean": float(gain.mean()),
        "share_positive": float(np.mean(gain > 0)),
        "q05_q50_q95": [float(x) for x in np.percentile(gain, [5, 50, 95])],
        "spearman_with_steps": {},
    }
    for label, s in steps.items():
        if label.startswith(("dtss-",)) and s.size == gain.size:
            rho = spearman(s.ravel().astype(np.float64), gain)
            # None (JSON null), not NaN: every tile got the same steps, so there is no ranking
            out["spearman_with_steps"][label] = None if np.isnan(rho) else rho
    return out


def per_tile_best_uniform(
    rows: dict[str, dict[str, np.ndarray]], steps: dict[str, np.ndarray], strata: np.ndarray
) -> dict[str, Any]:
    """Each tile (and seed) given the uniform schedule with its lowest LPIPS to HR: the most
    any per-tile choice of step count could reach (it needs the HR crop), its mean steps, and
    how often each schedule is the tile's best. The headroom an adaptive schedule has."""
    uniform = sorted(
        (m for m in rows if m.startswith("uniform-")), key=lambda m: float(steps[m].mean())
    )
    if len(uniform) < 2:
        return {}
    n = min(rows[m]["lpips"].shape[0] for m in uniform)
    lp = np.stack([rows[m]["lpips"][:n] for m in uniform])  # [schedule, seed, tile]
    st = np.stack([steps[m][:n].astype(np.float64) for m in uniform])
    pick = lp.argmin(axis=0)
    best = np.take_along_axis(lp, pick[None], axis=0)[0]
    cost = np.take_along_axis(st, pick[None], axis=0)[0]
    return {
        "lpips": bootstrap_mean(best, strata),
        "steps_per_tile": float(cost.mean()),
        "share_best": {m: float(np.mean(pick == k)) for k, m in enumerate(uniform)},
    }


def fit_content(
    rows: dict[str, dict[str, np.ndarray]],
    steps: dict[str, np.ndarray],
    intervals: dict[str, int],
    texture: np.ndarray,
    strata: np.ndarray,
) -> dict[str, Any]:
    """The best content rule on these crops, from the uniform runs already made: every pair of
    uniform schedules (fewer steps for flat tiles) and thresholds at the tiles' texture deciles.
    In-sample: fit it on the validation photos and report it on others."""
    labels = [m for m in intervals if m in rows]
    best: dict[str, Any] = {}
    for flat in labels:
        for textured in labels:
            if steps[flat].mean() >= steps[textured].mean():
                continue
            n = min(rows[flat]["lpips"].shape[0], rows[textured]["lpips"].shape[0])
            for threshold in np.unique(np.quantile(texture, np.linspace(0.1, 0.9, 9))):
                is_flat = (texture < threshold)[None, :]
                lp = np.where(is_flat, rows[flat]["lpips"][:n], rows[textured]["lpips"][:n])
                cost = np.where(is_flat, steps[flat][:n], steps[textured][:n])
                value = float(lp.mean())
                if not best or value < best["lpips"][0]:
                    best = {
                        "threshold": float(threshold),
                        "flat_interval": intervals[flat],
                        "textured_interval": intervals[textured],
                        "flat_share": float(is_flat.mean()),
                        "lpips": bootstrap_mean(lp, strata),
                        "steps_per_tile": float(cost.mean()),
                    }
    return best


def below_zero(diff: Sequence[float | None]) -> bool:
    """A paired difference's whole 90% interval below zero; an unavailable or zero-width one
    (nothing was resampled) says nothing about the half-width, so it is no evidence."""
    _, low, high = diff
    return low is not None and high is not None and low < high < 0


def targets(
    methods: dict[str, Any], diagnostics: dict[str, Any], gain: dict[str, Any]
) -> dict[str, dict[str, bool]]:
    """The adaptive issue's lines for each DTSS run, met or missed. "By more than the interval's
    half-width" is read on the paired difference: its whole 90% interval below zero."""
    out: dict[str, dict[str, bool]] = {}
    u200 = methods.get("uniform-200")
    for label, e in methods.items():
        if not label.startswith("dtss-mmle"):
            continue
        # a line whose rival did not run (a shorter --uniform list) is left out, not missed
        lines: dict[str, bool] = {}
        vs = e.get("vs_best_uniform")
        if vs:
            lines["LPIPS below the best uniform at no more steps"] = below_zero(vs["lpips_diff"])
        exits = e.get("vs_fixed_exit", {})
        if exits:
            lines["LPIPS below every fixed exit"] = all(below_zero(d) for d in exits.values())
        if u200 is not None:
            lines["uniform-200's LPIPS with at most 1/2.7 of its steps"] = (
                e["lpips"][0] <= u200["lpips"][0]
                and e["steps_per_tile"] * 2.7 <= u200["steps_per_tile"]
            )
        contents = e.get("vs_content", {})
        if contents:
            lines["LPIPS below every content rule"] = all(below_zero(d) for d in contents.values())
        d = diagnostics.get(label)
        if d:
            lines["growth in >= 5% of steps"] = d["growth_share"] >= 0.05
        rhos = gain.get("spearman_with_steps", {})
        if label in rhos:
            rho = rhos[label]
            lines["steps rank with the gain from more steps (rho >= 0.4)"] = (
                rho is not None and rho >= 0.4
            )
        out[label] = lines
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    models = load_models(args.model)
    cfg = models.config
    crops = holdout_crops(cfg, args.photos, args.crops, args.crop_seed)
    lr = encode_latents(models, crops.up, args.max_batch)
    scorer = Scorer(models, crops)
    plan = methods(args, cfg)
    strata = crops.photo
    rows: dict[str, dict[str, list[np.ndarray]]] = {}
    steps: dict[str, list[np.ndarray]] = {}
    diagnostics: dict[str, Any] = {}
    decisions: dict[str, list] = {}
    seconds: dict[str, float] = {}
    bicubic = scorer(crops.up)
    store = None
    if args.out is not None:
        setting = {
            "weights": weights_digest(models),
            "photos": list(args.photos),
            "crops": args.crops,
            "crop_seed": args.crop_seed,
            "max_batch": args.max_batch,
        }
        store = RunStore(args.out / RUNS, setting)
        if len(store):
            print(f"resuming: {len(store)} finished runs in {store.folder} are reused", flush=True)
    total = sum(m.seeds or args.seeds for m in plan)
    done = 0
    start = time.perf_counter()
    for method in plan:
        for seed in range(method.seeds or args.seeds):
            res, reused = measure_run(
                method, seed, models, crops, lr, scorer, args.max_batch, store
            )
            q = {k: np.asarray(v) for k, v in res["quality"].items()}
            for key, values in q.items():
                rows.setdefault(method.label, {}).setdefault(key, []).append(values)
            steps.setdefault(method.label, []).append(np.asarray(res["steps"]))
            decisions.setdefault(method.label, []).extend(tuple(row) for row in res["decisions"])
            seconds[method.label] = seconds.get(method.label, 0.0) + res["seconds"]
            done += 1
            elapsed = time.perf_counter() - start
            print(
                f"[{done}/{total}] {method.label} seed {seed}: "
                f"{np.mean(res['steps']):.1f} steps/tile, "
                f"LPIPS {q['lpips'].mean():.4f} ({'saved run' if reused else f'{elapsed:.0f}s'})",
                flush=True,
            )
        if method.dtss is not None:  # the MMLE- and oracle-driven methods
            diagnostics[method.label] = gain_diagnostics(decisions[method.label], method.dtss)
    arrays = {m: {k: np.stack(v) for k, v in q.items()} for m, q in rows.items()}
    step_arrays = {m: np.stack(v) for m, v in steps.items()}
    summary = summarize(arrays, step_arrays, strata, args.photos)
    result = {
        "argv": sys.argv[1:],
        "model": describe(models),
        "weights": weights_of(args.model),
        "photos": list(args.photos),
        "crops_per_photo": args.crops,
        "tile": cfg.tile_size,
        "seeds": args.seeds,
        "degradation": "bicubic x4",
        "bicubic": {k: bootstrap_mean(v[None, :], strata) for k, v in bicubic.items()},
        "methods": summary,
        "gain_from_steps": gain_from_steps(arrays, step_arrays),
        "per_tile_best_uniform": per_tile_best_uniform(arrays, step_arrays, strata),
        "content_fit": fit_content(
            arrays,
            step_arrays,
            {m.label: m.interval for m in plan if m.interval is not None},
            latent_texture(lr),
            strata,
        ),
        "diagnostics": diagnostics,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "per_tile": {
            m: {"steps": step_arrays[m].tolist(), "lpips": arrays[m]["lpips"].round(5).tolist()}
            for m in arrays
        },
        "photo_of_tile": strata.tolist(),
        "machine": machine(),
    }
    result["targets"] = targets(summary, diagnostics, result["gain_from_steps"])
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ms = result["methods"]
    uni = sorted((m for m in ms if m.startswith("uniform-")), key=lambda m: ms[m]["steps_per_tile"])
    x = [ms[m]["steps_per_tile"] for m in uni]
    y = [ms[m]["lpips"][0] for m in uni]
    err = [[_err(ms[m]["lpips"])[0] for m in uni], [_err(ms[m]["lpips"])[1] for m in uni]]
    ax.errorbar(x, y, yerr=err, marker="o", color="0.4", label="uniform", capsize=3)
    markers = {"fixed-exit": "s", "content": "^", "mmle": "D", "oracle": "*"}
    for m, e in ms.items():
        if m in uni:
            continue
        kind = (
            "fixed-exit"
            if m.startswith("exit-")
            else "content"
            if m.startswith("content-")
            else "oracle"
            if "oracle" in m
            else "mmle"
        )
        ax.errorbar(
            [e["steps_per_tile"]],
            [e["lpips"][0]],
            yerr=[[_err(e["lpips"])[0]], [_err(e["lpips"])[1]]],
            marker=markers[kind],
            linestyle="none",
            capsize=3,
            label=m,
        )
    ax.axhline(result["bicubic"]["lpips"][0], color="0.7", linestyle=":", label="bicubic")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per tile (mean)")
    ax.set_ylabel("LPIPS to HR (lower is better)")
    name = Path(str(result["model"].get("source", ""))).name
    ax.set_title(f"{name}: quality/compute front on {_photo_set(result['photos'])} crops")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _err(v: Sequence[float | None]) -> tuple[float, float]:
    """An error bar's lengths below and above the mean; none for an unavailable interval."""
    mean, low, high = v
    if mean is None or low is None or high is None:
        return 0.0, 0.0
    return mean - low, high - mean


def _band(band: tuple[int, int]) -> str:
    low, high = band
    return f"t <= {high}" if low == 0 else f"t > {low}" if high >= 1000 else f"{low} < t <= {high}"


def _resampled(result: dict[str, Any]) -> str:
    what = [
        "crops" if result["crops_per_photo"] > 1 else "photos" if len(result["photos"]) > 1 else "",
        "seeds" if result["seeds"] > 1 else "",
    ]
    if not any(what):
        return "No intervals (one crop on one seed: nothing to resample)"
    return f"90% intervals from resampling {' and '.join(w for w in what if w)}"


def _photo_set(names: Sequence[str]) -> str:
    if set(names) == set(HOLDOUT):
        return "hold-out"
    return "validation" if set(names) == set(VALIDATION) else "named"


def _fewer_seeds(result: dict[str, Any]) -> dict[str, int]:
    """Methods run on fewer seeds than the header says (the oracle), with their count: their
    means are over those seeds only, their paired diffs against the same seeds of the other."""
    runs = {m: len(v["lpips"]) for m, v in result.get("per_tile", {}).items()}
    return {m: n for m, n in runs.items() if n < result["seeds"]}


def render(result: dict[str, Any], json_path: Path, readme: Path) -> str:
    """Markdown for README's front section, every figure from the JSON."""
    ms = result["methods"]
    rel = Path(relative_link(json_path.resolve(), readme.resolve()))
    lines = [
        f"Generated from [`{rel}`]({rel}) by `python -m benchmarks.front --render {rel}"
        f"{readme_arg(readme, required=True)}`; do not edit by hand.",
        "",
        f"{len(result['photos'])} {_photo_set(result['photos'])} photos "
        f"({', '.join(result['photos'])}), "
        f"{result['crops_per_photo']} crops of {result['tile']} px each, {result['degradation']}, "
        f"{result['seeds']} seeds; every schedule from the same noise. {_resampled(result)}; "
        "the diff columns are paired (same crops and seeds).",
        "",
        "| schedule | steps/tile | LPIPS | PSNR dB | SSIM | BRISQUE "
        "| LPIPS - best uniform at no more steps |",
        "|---|---|---|---|---|---|---|",
    ]
    b = result["bicubic"]
    lines.append(
        f"| bicubic | 0 | {ci(b['lpips'])} | {b['psnr'][0]:.2f} | {b['ssim'][0]:.3f} | "
        f"{b['brisque'][0]:.1f} | |"
    )
    fewer = _fewer_seeds(result)
    for m, e in sorted(ms.items(), key=lambda kv: kv[1]["steps_per_tile"]):
        vs = e.get("vs_best_uniform")
        diff = f"{ci(vs['lpips_diff'])} vs {vs['method']}" if vs else ""
        name = f"{m} ({fewer[m]} seed{'s' * (fewer[m] > 1)}; diff on those)" if m in fewer else m
        lines.append(
            f"| {name} | {e['steps_per_tile']:.1f} | {ci(e['lpips'])} | {e['psnr'][0]:.2f} | "
            f"{e['ssim'][0]:.3f} | {e['brisque'][0]:.1f} | {diff} |"
        )
    lines += ["", "Per photo, LPIPS:", ""]
    photos = result["photos"]
    lines.append("| schedule | " + " | ".join(photos) + " |")
    lines.append("|---|" + "---|" * len(photos))
    for m, e in sorted(ms.items(), key=lambda kv: kv[1]["steps_per_tile"]):
        lines.append(
            f"| {m} | " + " | ".join(f"{e['lpips_per_photo'][p][0]:.3f}" for p in photos) + " |"
        )
    diag = result.get("diagnostics", {})
    if diag:
        lines += [
            "",
            "DTSS categories and gains (share of steps with g >= tau, per timestep band: "
            + ", ".join(_band(b) for b in BANDS)
            + "):",
            "",
        ]
        lines.append(
            "| run | growth | stable | saturated | g_FR >= tau by band | g_NR >= tau by band |"
        )
        lines.append("|---|---|---|---|---|---|")
        for m, d in diag.items():
            c, n = d["categories"], max(d["steps"], 1)
            fr = ", ".join(f"{x['g_fr']['share_above_tau']:.2f}" for x in d["bands"])
            nr = ", ".join(f"{x['g_nr']['share_above_tau']:.2f}" for x in d["bands"])
            lines.append(
                f"| {m} | {c['growth'] / n:.1%} | {c['stable'] / n:.1%} | {c['saturated'] / n:.1%}"
                f" | {fr} | {nr} |"
            )
    g = result.get("gain_from_steps")
    if g:
        rho = ", ".join(
            f"{k} {v:.2f}" if v is not None else f"{k} none (every tile got the same steps)"
            for k, v in g["spearman_with_steps"].items()
        )
        lines += [
            "",
            f"Gain from more steps per tile (LPIPS at 20 minus at 200 steps): mean "
            f"{g['mean']:.4f}, positive for {g['share_positive']:.0%} of tiles; Spearman with "
            f"the steps each DTSS run gave the tile: {rho}.",
        ]
    best = result.get("per_tile_best_uniform")
    if best:
        shares = ", ".join(f"{m} {v:.0%}" for m, v in best["share_best"].items() if v >= 0.005)
        lines += [
            "",
            "Each tile given its best uniform schedule, chosen with the HR crop in hand (the "
            f"most a per-tile step count could reach): LPIPS {ci(best['lpips'])} at "
            f"{best['steps_per_tile']:.1f} steps per tile; the tiles' best: {shares}.",
        ]
    fit = result.get("content_fit")
    if fit:
        lines += [
            "",
            "The best content rule on these same crops (in-sample, so an upper bound; a rule "
            "to ship is fitted on tuning photos and scored here): "
            f"latent texture below {fit['threshold']:.4f} "
            f"({fit['flat_share']:.0%} of tiles) jumps by {fit['flat_interval']}, the rest by "
            f"{fit['textured_interval']}: LPIPS {ci(fit['lpips'])} at "
            f"{fit['steps_per_tile']:.1f} steps per tile.",
        ]
    marks = result.get("targets", {})
    if marks:
        lines += ["", "The adaptive schedule's targets (paired 90% intervals):", ""]
        for label, checks in marks.items():
            said = "; ".join(f"{k}: {'met' if v else 'missed'}" for k, v in checks.items())
            lines.append(f"- {label}: {said}.")
    plot_name = result.get("plot")
    if plot_name:
        lines += ["", f"![front]({rel.parent / plot_name})"]
    return "\n".join(lines)


def write_readme(result: dict[str, Any], json_path: Path, readme: Path) -> None:
    from benchmarks.report import update_readme

    update_readme(readme, render(result, json_path, readme), start=START, end=END)
    print(f"updated {readme}")


def _content(text: str) -> tuple[str, ContentConfig]:
    name, _, rule = text.partition("=")
    parts = rule.split(":")
    try:
        if not name or len(parts) != 3:
            raise ValueError(text)
        return name, ContentConfig(
            threshold=float(parts[0]),
            flat_interval=int(parts[1]),
            textured_interval=int(parts[2]),
        )
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(
            f"expected NAME=THRESHOLD:FLAT_INTERVAL:TEXTURED_INTERVAL, got {text!r} ({exc})"
        ) from exc


def _pair(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, Path(path)


def _exit(text: str) -> tuple[int, int]:
    interval, _, below = text.partition("@")
    try:
        pair = int(interval), int(below)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected INTERVAL@T (e.g. 20@400), got {text!r}"
        ) from None
    if pair[0] < 1 or pair[1] < 0:
        raise argparse.ArgumentTypeError(f"expected INTERVAL >= 1 and T >= 0, got {text!r}")
    return pair


def interval_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected intervals >= 1, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adadiff bench front",
        description="quality against UNet evaluations per tile on hold-out crops",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (front.json and front.png); required unless --render is given",
    )
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--photos",
        type=evaluation_photos,
        default=HOLDOUT_PHOTOS,
        help="holdout (to report), validation (to tune on), or names separated by commas",
    )
    p.add_argument("--crops", type=positive, default=16, help="crops per photo, one tile each")
    p.add_argument("--crop-seed", type=non_negative, default=0)
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument(
        "--uniform",
        type=interval_list,
        default=UNIFORM_INTERVALS,
        help="uniform intervals (999 -> 1 step, 200 -> 5 steps, 5 -> 200 steps)",
    )
    p.add_argument(
        "--exit",
        type=_exit,
        action="append",
        default=None,
        help="fixed early exits INTERVAL@T (default 20@400 and 100@400)",
    )
    p.add_argument(
        "--dtss",
        type=_pair,
        action="append",
        default=[],
        help="more DTSS calibrations NAME=adadiff.json",
    )
    p.add_argument(
        "--content",
        type=_content,
        action="append",
        default=[],
        help="content rules NAME=THRESHOLD:FLAT_INTERVAL:TEXTURED_INTERVAL (the model's own "
        "runs too when its adadiff.json sets one)",
    )
    p.add_argument("--oracle-seeds", type=non_negative, default=1, help="0 skips the oracle runs")
    p.add_argument("--max-batch", type=positive, default=16)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--readme", type=Path, help="rewrite this README's front section")
    p.add_argument("--render", type=Path, help="only render a saved front.json into --readme")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.render:
        if not args.readme:
            raise SystemExit("--render needs --readme")
        try:
            check_readme(args.readme, start=START, end=END)  # before the plot is redrawn
            result = read_saved(
                args.render, "front.json", ("methods", "bicubic", "photos", "seeds")
            )
            if result.get("plot"):
                plot(result, args.render.parent / result["plot"])
            write_readme(result, args.render, args.readme)
        except AdadiffError as exc:
            print(f"adadiff bench front: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.out is None:
        raise SystemExit("--out is required unless --render is given")
    if args.exit is None:
        args.exit = [(20, 400), (100, 400)]
    if args.oracle_seeds > args.seeds:
        raise SystemExit(
            f"--oracle-seeds {args.oracle_seeds} is more than --seeds {args.seeds}: the oracle "
            "runs are paired with the first seeds of the others"
        )
    logging.basicConfig(level=logging.WARNING)
    try:
        # everything a typo can break, before the folder is made and the runs start
        base = model_config(args.model)
        for name in args.photos:
            find_photo(name)
        check_labels(methods(args, base))  # reads each --dtss file too
        if args.readme:
            check_readme(args.readme, start=START, end=END)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {args.out}: cannot make this folder ({exc})") from None
        result = run(args)
    except AdadiffError as exc:
        print(f"adadiff bench front: error: {exc}", file=sys.stderr)
        return 2
    path = args.out / "front.json"
    try:  # without matplotlib the runs are still saved, in front.json without a plot
        result["plot"] = plot(result, args.out / "front.png").name
    except ImportError as exc:
        print(
            f"no front.png ({exc}): pip install matplotlib, or pip install -e '.[bench]'; "
            "front.json holds every figure",
            file=sys.stderr,
        )
    path.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(args.out / RUNS, ignore_errors=True)  # the front is whole: nothing to resume
    print(f"wrote {path}")
    if args.readme:
        write_readme(result, path, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
