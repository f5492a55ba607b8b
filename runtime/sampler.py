"""The adaptive sampling loop: every round, all still-active tiles share one UNet call.

Each tile keeps its own timestep, noise, gains and best estimate (highest R_FR + R_NR among its
estimates at t < nr_start_t, what a saturated exit returns). A round batches the active
tiles (chunked by ``max_batch``) into UNet calls with a per-tile timestep vector, scores the clean
estimates with MMLE, turns scores into gains, asks the policy for each tile's next jump or exit,
applies the DDIM jumps and refreshes the PFJ-modulated conditioning for the next round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adadiff.config import DTSSConfig, Grouping, MetricConfig, NoiseScheduleConfig
from adadiff.errors import ConfigError, NumericsError
from adadiff.progress import Progress
from adadiff.runtime.policy import Category, StepPolicy, gains, quality
from adadiff.runtime.schedule import next_timestep, renoise, split_prediction
from adadiff.runtime.tiling import chunks

GROUPINGS = Grouping.values()


def check_grouping(grouping: str) -> None:
    """Refuse a grouping the pool does not know (callers check it before any work)."""
    if grouping not in GROUPINGS:
        raise ConfigError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


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
    owner: Any = None
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
    # Every UNet call the tiles took part in: {"size": B, "timesteps": [...]}; "size" counts
    # the whole call, "timesteps" only this result's tiles (other images may share the call).
    batches: list[dict]
    rounds: int
    categories: dict[str, int]

    @property
    def engine_calls(self) -> int:
        return len(self.batches)

    @property
    def unet_evaluations(self) -> int:
        return sum(self.steps_per_tile)


def _finished(tile: TileState) -> np.ndarray:
    if tile.result is None:
        raise ConfigError(f"tile {tile.index} has not finished denoising; run the pool to the end")
    return tile.result


@dataclass
class _Member:
    """One image (or any set of tiles) in a TilePool."""

    key: Any
    tiles: list[TileState]
    policy: StepPolicy
    batches: list[dict] = field(default_factory=list)
    rounds: int = 0
    categories: dict[str, int] = field(default_factory=dict)

    def result(self) -> SamplerResult:
        return SamplerResult(
            latents=np.stack([_finished(s) for s in self.tiles]),
            steps_per_tile=[s.steps for s in self.tiles],
            exits=[s.exit or "" for s in self.tiles],
            batches=self.batches,
            rounds=self.rounds,
            categories=self.categories,
        )


class TilePool:
    """Active tiles of any number of images, denoised together one round at a time.

    Every tile keeps its own timestep, noise (seeded by its image's seed and its index in that
    image), gains and policy, so an image's tiles take the same steps whichever images share
    the pool; only the batch neighbours, and with them float rounding, change. Images may join
    between rounds (``add``) and leave when their last tile exits (``round`` returns them).
    """

    def __init__(
        self,
        nets: DenoiseNets,
        *,
        noise: NoiseScheduleConfig,
        dtss: DTSSConfig,
        metrics: Sequence[MetricConfig],
        gain_dim: int,
        max_batch: int,
        grouping: str = "regroup",
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        check_grouping(grouping)
        self.nets = nets
        self.noise = noise
        self.dtss = dtss
        self.metrics = metrics
        self.gain_dim = gain_dim
        self.max_batch = max_batch
        self.grouping = grouping
        self.members: dict[Any, _Member] = {}
        # images whose UNet output or scores went non-finite: they leave the pool at once and
        # the others go on (they share calls with them); the caller takes them from here
        self.failed: dict[Any, NumericsError] = {}
        self.calls = 0
        self.evaluations = 0

    @property
    def active_tiles(self) -> int:
        return sum(1 for m in self.members.values() for s in m.tiles if s.exit is None)

    def add(self, key: Any, lr_latents: np.ndarray, policy: StepPolicy, *, seed: int) -> None:
        """Add an image's encoded tiles [N, C, s, s]; its first conditioning is PFJ(o, 0)."""
        if key in self.members:
            raise ValueError(f"{key!r} is already in the pool")
        zero_gain = np.zeros(self.gain_dim, dtype=np.float32)
        tiles = [
            TileState(
                index=k,
                t=self.dtss.t_start,
                z=tile_noise(seed, k, lr_latents.shape[1:]),
                lr=lr_latents[k],
                cond=lr_latents[k],
                gain=zero_gain,
                owner=key,
            )
            for k in range(lr_latents.shape[0])
        ]
        self.members[key] = _Member(key, tiles, policy)
        _modulate(tiles, self.nets, self.max_batch)

    def progress(self, key: Any) -> tuple[int, int]:
        """(timesteps done, timesteps in all) of one member's tiles."""
        tiles = self.members[key].tiles
        done = sum(self.dtss.t_start - (0 if s.exit else s.t) for s in tiles)
        return done, len(tiles) * self.dtss.t_start

    def round(self) -> list[tuple[Any, SamplerResult]]:
        """One UNet pass over every active tile; return the members that finished."""
        active = [s for m in self.members.values() for s in m.tiles if s.exit is None]
        for member in self.members.values():
            if any(s.exit is None for s in member.tiles):
                member.rounds += 1
        for group in _groups(active, self.max_batch, self.grouping):
            group = [s for s in group if s.owner in self.members]  # not failed this round
            if not group:
                continue
            sample = np.stack([np.concatenate([s.z, s.cond]) for s in group])
            t = np.array([s.t for s in group], dtype=np.float32)
            out = self.nets.denoise(sample, t)
            self.calls += 1
            self.evaluations += len(group)
            by_owner: dict[Any, list[int]] = {}
            for i, s in enumerate(group):
                by_owner.setdefault(s.owner, []).append(i)
            for owner, rows in by_owner.items():
                member = self.members[owner]
                member.batches.append({"size": len(group), "timesteps": [group[i].t for i in rows]})
            while group:
                bad = _advance(
                    group, out, self.nets, self.members, self.noise, self.dtss, self.metrics
                )
                if bad is None:
                    break
                # fail only the images whose rows went non-finite; advance the rest
                error, owners = bad
                for owner in owners:
                    self.failed[owner] = error
                    del self.members[owner]
                keep = [i for i, s in enumerate(group) if s.owner not in owners]
                group, out = [group[i] for i in keep], out[keep]
        active = [s for s in active if s.owner in self.members]
        still = [s for s in active if s.exit is None]
        if still and any(self.members[s.owner].policy.needs_scores for s in still):
            _modulate(
                [s for s in still if self.members[s.owner].policy.needs_scores],
                self.nets,
                self.max_batch,
            )
        finished = [
            key for key, m in self.members.items() if all(s.exit is not None for s in m.tiles)
        ]
        return [(key, self.members.pop(key).result()) for key in finished]


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
    """Denoise every tile of one image to t = 0 or an early exit.

    ``grouping`` says which tiles share a UNet call: ``regroup`` (every active tile, whatever its
    timestep: the point of the runtime), ``timestep`` (only tiles at the same timestep) or
    ``tile`` (one tile per call). Results agree up to float rounding (about 1e-6: the same
    tile meets other batch neighbours); only calls and speed differ.
    """
    pool = TilePool(
        nets,
        noise=noise,
        dtss=dtss,
        metrics=metrics,
        gain_dim=gain_dim,
        max_batch=max_batch,
        grouping=grouping,
    )
    pool.add(0, lr_latents, policy, seed=seed)
    n = lr_latents.shape[0]
    total = n * dtss.t_start
    if progress is not None:  # at 0 first: the stage's clock (and ETA) start with its work
        progress("tiles", 0, n)
        progress("denoise", 0, total)
    while True:
        finished = pool.round()
        if pool.failed:
            raise pool.failed[0]
        if finished:
            if progress is not None:
                progress("tiles", n, n)
                progress("denoise", total, total)
            return finished[0][1]
        if progress is not None:
            progress("tiles", sum(s.exit is not None for s in pool.members[0].tiles), n)
            progress("denoise", *pool.progress(0))


def _advance(
    group: list[TileState],
    out: np.ndarray,
    nets: DenoiseNets,
    members: dict[Any, _Member],
    noise: NoiseScheduleConfig,
    dtss: DTSSConfig,
    metrics: Sequence[MetricConfig],
) -> tuple[NumericsError, set[Any]] | None:
    """Score, decide and jump for one UNet call's tiles (each by its own image's policy).

    Non-finite UNet outputs or scores (they would spread to every later step and decode as
    black) change nothing and come back as the error and the images whose rows had them."""
    z = np.stack([s.z for s in group])
    t = np.array([s.t for s in group], dtype=np.int64)
    bad_rows = _non_finite_rows(out)
    if bad_rows:
        times = sorted({int(t[i]) for i in bad_rows})
        return NumericsError(
            f"the UNet returned NaN or infinite values at t = {times}; with --precision fp16 or "
            "bf16 try fp32, else check the model's weights"
        ), {group[i].owner for i in bad_rows}
    x0_exact, eps = split_prediction(z, out, t, noise)
    x0 = x0_exact.astype(np.float32)
    scored = [members[s.owner].policy.needs_scores for s in group]
    scores = None
    if any(scored):
        rows = [i for i, need in enumerate(scored) if need]
        lr = np.stack([group[i].lr for i in rows])
        some = nets.score(x0[rows], lr, t[rows].astype(np.float32))
        bad_scores = _non_finite_rows(some)
        if bad_scores:
            return NumericsError(
                "MMLE returned NaN or infinite scores; with --precision fp16 or bf16 try fp32, "
                "else check the model's weights"
            ), {group[rows[j]].owner for j in bad_scores}
        scores = {i: some[j] for j, i in enumerate(rows)}
    intervals = np.zeros(len(group), dtype=np.int64)
    for i, s in enumerate(group):
        member = members[s.owner]
        s.steps += 1
        g_fr = g_nr = 0.0
        if scores is not None and i in scores:
            r = quality(scores[i].tolist(), metrics)
            g_fr, g_nr = gains(r, s.quality, s.t, dtss)
            s.quality = r
            s.gain = _gain_vector((g_fr, g_nr), len(s.gain))
            # Only second-half estimates compete for "best": R_NR is not counted before
            # nr_start_t, and the FR scores (against the blurry bicubic-upscaled input) favour the
            # first, blurry estimates, so an early x0 would win and undo the detail added since.
            if s.t < dtss.nr_start_t and r[0] + r[1] > s.best_r:
                # a copy: a view would keep the whole call's batch alive until the image ends
                s.best_r, s.best_x0 = r[0] + r[1], x0[i].copy()
        decision = member.policy.decide(s.index, s.t, g_fr, g_nr)
        category = decision.category.value
        s.categories.append(category)
        member.categories[category] = member.categories.get(category, 0) + 1
        if decision.category is Category.SATURATED:
            s.exit, s.result = "saturated", s.best_x0 if s.best_x0 is not None else x0[i].copy()
        elif decision.interval is None:
            raise ConfigError(
                f"{type(member.policy).__name__} gave a {category} decision without a jump; "
                "only a saturated decision may end a tile"
            )
        elif decision.interval < 1:  # next_timestep(t, 0) is t: the tile would never move
            raise ConfigError(
                f"{type(member.policy).__name__} gave a {category} jump of "
                f"{decision.interval} timesteps; a jump must be at least 1"
            )
        else:
            intervals[i] = decision.interval
    moving = [i for i, s in enumerate(group) if s.exit is None]
    if not moving:
        return None
    t_next = np.array([next_timestep(t[i], intervals[i]) for i in moving], dtype=np.int64)
    z_next = renoise(x0_exact[moving], eps[moving], t_next, noise)
    for j, i in enumerate(moving):
        s = group[i]
        s.z, s.t = z_next[j].copy(), int(t_next[j])
        if s.t == 0:
            s.exit, s.result = "t0", s.z
    return None


def _non_finite_rows(values: np.ndarray) -> list[int]:
    return np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1)).tolist()


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
