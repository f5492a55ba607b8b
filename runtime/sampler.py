"""The adaptive sampling loop: every round, all still-active tiles share one UNet call.

Each tile keeps its own timestep, noise, gains and best estimate. A round batches the active
tiles (chunked by ``max_batch``) into UNet calls with a per-tile timestep vector, scores the clean
estimates with MMLE, turns scores into gains, asks the policy for each tile's next jump or exit,
applies the DDIM jumps and refreshes the PFJ-modulated conditioning for the next round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from adadiff.config import DTSSConfig, MetricConfig, NoiseScheduleConfig
from adadiff.runtime.policy import Category, StepPolicy, gains, quality
from adadiff.runtime.schedule import next_timestep, renoise, split_prediction
from adadiff.runtime.tiling import chunks

Progress = Callable[[str, int, int], None]
GROUPINGS = ("regroup", "timestep", "tile")


class DenoiseNets:
    """What the loop needs from the networks; engines.base facades satisfy it."""

    def __init__(self, denoise: Callable, score: Callable, modulate: Callable) -> None:
        self.denoise = denoise  # (sample [B, 2C, s, s], timestep [B]) -> model output [B, C, s, s]
        self.score = score  # (x0, lr_latent, timestep) -> scores [B, M]
        self.modulate = modulate  # (lr_latent, gain [B, G]) -> modulated lr_latent


def tile_noise(seed: int, tile: int, shape: tuple[int, ...]) -> np.ndarray:
    """Tile k's starting noise depends on (seed, k) only: batching never changes results."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tile])))
    return rng.standard_normal(shape, dtype=np.float32)


@dataclass
class TileState:
    index: int
    t: int
    z: np.ndarray
    lr: np.ndarray
    cond: np.ndarray
    gain: np.ndarray
    quality: tuple[float, float] | None = None
    best_r: float = -np.inf
    best_x0: np.ndarray | None = None
    steps: int = 0
    exit: str | None = None
    result: np.ndarray | None = None
    categories: list[str] = field(default_factory=list)


@dataclass
class SamplerResult:
    latents: np.ndarray  # [N, C, s, s]
    steps_per_tile: list[int]
    exits: list[str]
    batches: list[dict]  # every UNet call: {"size": B, "timesteps": [...]}
    rounds: int
    categories: dict[str, int]

    @property
    def engine_calls(self) -> int:
        return len(self.batches)

    @property
    def unet_evaluations(self) -> int:
        return sum(self.steps_per_tile)


def sample_tiles(
    lr_latents: np.ndarray,
    nets: DenoiseNets,
    policy: StepPolicy,
    *,
    noise: NoiseScheduleConfig,
    dtss: DTSSConfig,
    metrics: Sequence[MetricConfig],
    gain_dim: int,
    seed: int,
    max_batch: int,
    grouping: str = "regroup",
    progress: Progress | None = None,
) -> SamplerResult:
    """Denoise every tile to t = 0 or an early exit.

    ``grouping`` says which tiles share a UNet call: ``regroup`` (every active tile, whatever its
    timestep: the point of the runtime), ``timestep`` (only tiles at the same timestep) or
    ``tile`` (one tile per call). Results agree up to float rounding (about 1e-6: the same
    tile meets other batch neighbours); only calls and speed differ.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    n = lr_latents.shape[0]
    zero_gain = np.zeros(gain_dim, dtype=np.float32)
    tiles = [
        TileState(
            index=k,
            t=dtss.t_start,
            z=tile_noise(seed, k, lr_latents.shape[1:]),
            lr=lr_latents[k],
            cond=lr_latents[k],
            gain=zero_gain,
        )
        for k in range(n)
    ]
    # Gains are zero before the first score, so the first conditioning is PFJ(o, 0).
    _modulate(tiles, nets, max_batch)
    batches: list[dict] = []
    categories: dict[str, int] = {}
    rounds = 0
    total_work = n * dtss.t_start
    active = list(tiles)
    while active:
        rounds += 1
        for group in _groups(active, max_batch, grouping):
            sample = np.stack([np.concatenate([s.z, s.cond]) for s in group])
            t = np.array([s.t for s in group], dtype=np.float32)
            out = nets.denoise(sample, t)
            batches.append({"size": len(group), "timesteps": [s.t for s in group]})
            _advance(group, out, nets, policy, noise, dtss, metrics, categories)
        active = [s for s in tiles if s.exit is None]
        if policy.needs_scores:
            _modulate(active, nets, max_batch)
        if progress is not None:
            done = sum(dtss.t_start - (0 if s.exit else s.t) for s in tiles)
            progress("denoise", done, total_work)
    return SamplerResult(
        latents=np.stack([s.result for s in tiles]),
        steps_per_tile=[s.steps for s in tiles],
        exits=[s.exit or "" for s in tiles],
        batches=batches,
        rounds=rounds,
        categories=categories,
    )


def _advance(
    group: list[TileState],
    out: np.ndarray,
    nets: DenoiseNets,
    policy: StepPolicy,
    noise: NoiseScheduleConfig,
    dtss: DTSSConfig,
    metrics: Sequence[MetricConfig],
    categories: dict[str, int],
) -> None:
    """Score, decide and jump for one UNet call's tiles."""
    z = np.stack([s.z for s in group])
    t = np.array([s.t for s in group], dtype=np.int64)
    x0_exact, eps = split_prediction(z, out, t, noise)
    x0 = x0_exact.astype(np.float32)
    scores = None
    if policy.needs_scores:
        lr = np.stack([s.lr for s in group])
        scores = nets.score(x0, lr, t.astype(np.float32))
    intervals = np.zeros(len(group), dtype=np.int64)
    for i, s in enumerate(group):
        s.steps += 1
        g_fr = g_nr = 0.0
        if scores is not None:
            r = quality(scores[i].tolist(), metrics)
            g_fr, g_nr = gains(r, s.quality, s.t, dtss)
            s.quality = r
            s.gain = _gain_vector((g_fr, g_nr), len(s.gain))
            if r[0] + r[1] > s.best_r:
                s.best_r, s.best_x0 = r[0] + r[1], x0[i]
        decision = policy.decide(s.index, s.t, g_fr, g_nr)
        s.categories.append(decision.category.value)
        categories[decision.category.value] = categories.get(decision.category.value, 0) + 1
        if decision.category is Category.SATURATED:
            s.exit, s.result = "saturated", s.best_x0 if s.best_x0 is not None else x0[i]
        else:
            intervals[i] = decision.interval
    moving = [i for i, s in enumerate(group) if s.exit is None]
    if not moving:
        return
    t_next = np.array([next_timestep(t[i], intervals[i]) for i in moving], dtype=np.int64)
    z_next = renoise(x0_exact[moving], eps[moving], t_next, noise)
    for j, i in enumerate(moving):
        s = group[i]
        s.z, s.t = z_next[j], int(t_next[j])
        if s.t == 0:
            s.exit, s.result = "t0", s.z


def _groups(active: list[TileState], max_batch: int, grouping: str) -> list[list[TileState]]:
    if grouping == "tile":
        return [[s] for s in active]
    if grouping == "timestep":
        by_t: dict[int, list[TileState]] = {}
        for s in active:
            by_t.setdefault(s.t, []).append(s)
        return [g for same in by_t.values() for g in chunks(same, max_batch)]
    return list(chunks(active, max_batch))


def _gain_vector(values: tuple[float, float], dim: int) -> np.ndarray:
    gain = np.zeros(dim, dtype=np.float32)
    gain[: min(dim, 2)] = values[:dim]
    return gain


def _modulate(tiles: list[TileState], nets: DenoiseNets, max_batch: int) -> None:
    for group in chunks(tiles, max_batch):
        lr = np.stack([s.lr for s in group])
        gain = np.stack([s.gain for s in group])
        cond = nets.modulate(lr, gain)
        for s, c in zip(group, cond, strict=True):
            s.cond = c
