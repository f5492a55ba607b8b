"""Calibrate a model's DTSS numbers so that its gains mean real quality (``adadiff calibrate``).

The paper fixes the metric weights and tau and warns they may not carry over between models and
data. On a model whose late steps add grain, the no-reference scores rise with that grain and the
full-reference scores (against the blurry bicubic input) fall with any detail, so the paper's
numbers make DTSS jump by 15 or 20 to t = 0 and never exit where quality peaks.

Calibration asks the question DTSS stands for directly. On tuning crops (the validation photos
by default; the hold-out photos stay out, so the front can report them), every tile runs a
trajectory of jumps of ``interval`` with MMLE scoring each clean estimate, and each estimate is
also decoded, colour-corrected like the output and scored against its HR crop with LPIPS, which
only training can know. Then:

1. weights: a ridge regression, within trajectories (tile means removed), of -LPIPS to HR on
   MMLE's scores over the steps with t < ``nr_start_t`` (where exits happen). R = sum w_c M_c
   then estimates how much better than its neighbours an estimate is, in LPIPS units, so a gain
   of tau means a change of tau in LPIPS for every model;
2. exit rule ``exit_on = "total"``: the saturated exit looks at the gain of R_FR + R_NR (the
   estimate of quality as a whole) instead of R_NR alone, and returns the best estimate by R;
3. tau and ``nr_start_t``: the pair whose exits, replayed on the recorded trajectories, give the
   lowest mean LPIPS to HR, cheapest first among near-equals, optionally within a step budget.

The fit is scored by leaving each tuning photo out in turn, so the figures in the report are
for photos the metric weights were not fitted on (the model itself may have trained on them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from adadiff.config import DTSSConfig, MetricConfig
from adadiff.errors import ConfigError
from adadiff.imageio import has_gray_channels
from adadiff.models.bundle import TorchModels
from adadiff.quality.lpips import load_lpips
from adadiff.runtime.colorfix import color_fix
from adadiff.runtime.policy import Category, Decision
from adadiff.runtime.schedule import uniform_timesteps
from adadiff.training.labels import (
    as_output,
    decode_latents,
    encode_latents,
    mmle_score,
    sample_with,
)
from adadiff.training.pairs import Batch

Progress = Callable[[int, int], None]

# tau candidates in LPIPS units, and where the second half may start
TAUS: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 1e-2, 1.5e-2)
NR_STARTS: tuple[int, ...] = (500, 600, 700, 800, 900)
RIDGE = 1e-3


@dataclass(frozen=True)
class Trajectories:
    """Jumps of one interval for K tiles: the same timesteps ``t`` [S] for every tile."""

    t: np.ndarray  # [S] descending
    scores: np.ndarray  # [K, S, M] MMLE's raw scores
    lpips: np.ndarray  # [K, S] LPIPS of each decoded, colour-corrected estimate to the HR crop
    photo: np.ndarray  # [K] photo index, for leave-one-photo-out

    def __post_init__(self) -> None:
        k, s = self.lpips.shape
        if self.scores.shape[:2] != (k, s) or self.t.shape != (s,) or self.photo.shape != (k,):
            raise ConfigError(
                f"trajectory arrays disagree: t {self.t.shape}, scores {self.scores.shape}, "
                f"lpips {self.lpips.shape}, photo {self.photo.shape}"
            )
        if np.any(np.diff(self.t) >= 0):
            raise ConfigError("trajectory timesteps must be strictly descending")


def fit_weights(scores: np.ndarray, lpips: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Signed weights w [M]: ridge regression of -LPIPS on the scores over the steps ``rows``
    (bool [S]), each tile's mean removed, so only changes along a trajectory count."""
    x = scores[:, rows, :].astype(np.float64)
    y = -lpips[:, rows].astype(np.float64)
    x = (x - x.mean(axis=1, keepdims=True)).reshape(-1, x.shape[-1])
    y = (y - y.mean(axis=1, keepdims=True)).ravel()
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale
    a = xs.T @ xs + RIDGE * len(y) * np.eye(xs.shape[1])
    return np.linalg.solve(a, xs.T @ y) / scale


def replay_exits(
    r: np.ndarray, t: np.ndarray, tau: float, nr_start_t: int
) -> tuple[np.ndarray, np.ndarray]:
    """For R [K, S] along recorded trajectories: the step each tile's estimate comes from and
    the steps it took, under DTSS's exit with ``exit_on = "total"``.

    A tile exits at its first second-half step whose gain tanh(R_i - R_{i-1}) <= -tau and returns
    its best second-half estimate by R; a tile that never exits runs to the end and returns what
    the sampler returns then, the latent at t = 0, which the last recorded estimate stands for."""
    k, s = r.shape
    chosen = np.empty(k, np.int64)
    steps = np.empty(k, np.int64)
    late = t < nr_start_t
    for i in range(k):
        best, stop = -1, s - 1
        for j in range(s):
            if not late[j]:
                continue
            if best < 0 or r[i, j] > r[i, best]:
                best = j
            if j > 0 and math.tanh(r[i, j] - r[i, j - 1]) <= -tau:
                stop = j
                break
        exited = stop < s - 1 or (
            s > 1 and late[s - 1] and math.tanh(r[i, s - 1] - r[i, s - 2]) <= -tau
        )
        chosen[i] = best if exited and best >= 0 else s - 1
        steps[i] = stop + 1
    return chosen, steps


def fewest_steps(timesteps: Sequence[int], starts: Sequence[int] = NR_STARTS) -> int | None:
    """The fewest steps per tile any replay of ``calibrate`` can take on ``timesteps``
    (every tile exiting at its earliest: at the first step below a second-half start, and not
    before the second step); None where no start leaves the two second-half steps a fit needs."""
    t = np.asarray(timesteps)
    earliest = [max(int(np.argmax(t < s)), 1) + 1 for s in starts if np.sum(t < s) >= 2]
    return min(earliest) if earliest else None


@dataclass(frozen=True)
class Choice:
    tau: float
    nr_start_t: int
    lpips: float  # mean LPIPS to HR of the replayed exits (held-out photos)
    steps: float  # mean steps per tile


def calibrate(
    traj: Trajectories,
    metrics: Sequence[MetricConfig],
    base: DTSSConfig,
    *,
    budget: float | None = None,
    taus: Sequence[float] = TAUS,
    starts: Sequence[int] = NR_STARTS,
    tolerance: float = 1e-3,
) -> tuple[tuple[MetricConfig, ...], DTSSConfig, dict]:
    """New metric weights and DTSS numbers, and a report of how they were chosen.

    Every (tau, nr_start_t) is replayed with weights fitted without the replayed tile's photo;
    the winner has the lowest LPIPS within ``tolerance`` of the best, fewest steps first, and
    at most ``budget`` steps per tile when a budget is given. The weights written are then
    fitted on every tuning photo."""
    photos = np.unique(traj.photo)
    if len(photos) < 2:
        raise ConfigError("calibration needs crops from at least two photos (leave-one-out)")
    candidates: list[Choice] = []
    for start in starts:
        rows = traj.t < start
        if rows.sum() < 2:
            continue
        r = np.empty(traj.lpips.shape)
        for p in photos:
            held = traj.photo == p
            w = fit_weights(traj.scores[~held], traj.lpips[~held], rows)
            r[held] = traj.scores[held] @ w
        for tau in taus:
            chosen, steps = replay_exits(r, traj.t, tau, start)
            lp = float(traj.lpips[np.arange(len(chosen)), chosen].mean())
            candidates.append(Choice(tau, start, lp, float(steps.mean())))
    if not candidates:
        raise ConfigError(f"no second-half steps below {max(starts)} in the trajectories")
    fits = [c for c in candidates if budget is None or c.steps <= budget]
    if not fits:
        cheapest = min(c.steps for c in candidates)
        raise ConfigError(
            f"no calibration fits a budget of {budget} steps per tile; the cheapest takes "
            f"{cheapest:.1f}: raise --budget or use a larger --interval"
        )
    best = min(c.lpips for c in fits)
    pick = min((c for c in fits if c.lpips <= best + tolerance), key=lambda c: (c.steps, c.lpips))
    weights = fit_weights(traj.scores, traj.lpips, traj.t < pick.nr_start_t)
    new_metrics = tuple(
        MetricConfig(name=m.name, kind=m.kind, weight=float(w))
        for m, w in zip(metrics, weights, strict=True)
    )
    dtss = replace(base, tau=pick.tau, nr_start_t=pick.nr_start_t, exit_on="total")
    fixed = int(np.flatnonzero(traj.t < 400)[0]) if np.any(traj.t < 400) else len(traj.t) - 1
    report = {
        "choice": pick.__dict__,
        "candidates": [c.__dict__ for c in candidates],
        "tiles": int(traj.lpips.shape[0]),
        "reference": {
            "last_estimate": float(traj.lpips[:, -1].mean()),
            "fixed_exit_t<400": float(traj.lpips[:, fixed].mean()),
            "best_second_half_estimate": float(
                traj.lpips[:, traj.t < pick.nr_start_t].min(axis=1).mean()
            ),
            "steps_to_end": len(traj.t),
        },
    }
    return new_metrics, dtss, report


class _Always:
    """Jumps of one interval to t = 0, with MMLE scoring every estimate (so PFJ sees gains)."""

    needs_scores = True

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        return Decision(Category.STABLE, self.interval)


def record(
    models: TorchModels,
    crops: Batch,
    *,
    seeds: int = 1,
    interval: int = 20,
    max_batch: int = 16,
    progress: Progress | None = None,
) -> Trajectories:
    """Trajectories of every crop (one tile each) and seed: MMLE's scores and the LPIPS to HR of
    each estimate, decoded, colour-corrected against the crop's bicubic input and gray for a
    gray input, as the runtime returns it."""
    cfg = models.config
    lr = encode_latents(models, crops.up, max_batch)
    tile_of = {lat.tobytes(): k for k, lat in enumerate(lr)}
    if len(tile_of) != len(lr):
        raise ConfigError(
            "two tuning crops encode to the same latent (a flat or repeated crop?); the "
            "recording tells tiles apart by their latents: use other --photos or --crop-seed"
        )
    decoder, mmle = models.wrappers()["vae_decoder"], mmle_score(models)
    lp = load_lpips()
    hr = _signed(crops.hr)
    t_all = uniform_timesteps(cfg.dtss.t_start, interval)
    n, s = len(lr), len(t_all)
    scores = np.zeros((seeds, n, s, cfg.mmle.num_scores), np.float32)
    lpips = np.zeros((seeds, n, s), np.float32)
    step_of = {t: j for j, t in enumerate(t_all)}
    scored = [0]  # estimates scored so far, of seeds * n * s
    for seed in range(seeds):

        def score(x0: np.ndarray, lr_: np.ndarray, t: np.ndarray, seed: int = seed) -> np.ndarray:
            out = mmle(x0, lr_, t)
            tiles = [tile_of[row.tobytes()] for row in lr_]
            up = crops.up[tiles]
            images = as_output(
                color_fix(decode_latents(decoder, x0), up, cfg.color_fix), has_gray_channels(up)
            )
            with torch.inference_mode():
                dist = lp(_signed(images), hr[tiles]).numpy()
            for i, k in enumerate(tiles):
                j = step_of[int(t[i])]
                scores[seed, k, j], lpips[seed, k, j] = out[i], dist[i]
            scored[0] += len(tiles)
            if progress is not None:
                progress(scored[0], seeds * n * s)
            return out

        sample_with(models, lr, score, _Always(interval), seed=seed, max_batch=max_batch)
    return Trajectories(
        t=np.array(t_all, np.int64),
        scores=scores.reshape(seeds * n, s, -1),
        lpips=lpips.reshape(seeds * n, s),
        photo=np.tile(crops.photo, seeds),
    )


def _signed(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0
