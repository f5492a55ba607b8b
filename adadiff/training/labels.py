"""Stage 3: MMLE labels from trajectories of the frozen model, scored by the oracle.

Each shard runs ``trajectories`` training crops (one tile each) through the runtime's own
sampler (``sample_tiles``: PFJ conditioning, gains, DDIM jumps), with the oracle as the score
function: at every UNet call the clean estimate x0 is decoded and scored against the LR input
(the FR reference is the LR crop upscaled by bicubic, as at inference). Each call is recorded.

Half of the trajectories (``random_fraction``) jump by a random DTSS tier at every step instead
of following the oracle-driven policy, so that labels cover every timestep and not only the
states an oracle-driven run visits before it exits.

Crops pick their photo with equal odds per photo by default (``weighting``): the regressor has
to rank content it has not seen, so photo variety matters more than pixel count.

Shard ``shard-NNNNN.npz``: x0 f32[n, C, s, s], lr f32[n, C, s, s] (the unmodulated LR latent),
t f32[n], scores f64[n, M] (raw, in ``metrics`` order), traj i64[n] (trajectory within the
shard), call i64[n] (its UNet call index), random bool[n] (random-tier trajectory), photo
i64[n] (index into photos), photos str[P] (the photo names; empty when the caller passed bare
images), weighting (str), metrics str[M], unet_step and seconds (scalars). Shard k is seeded
by (seed, k) alone and written atomically, so an interrupted run resumes at the first missing
shard and produces the same files.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadiff.config import DTSSConfig, MetricConfig, ModelConfig
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.models.bundle import TorchModels
from adadiff.runtime.policy import Category, Decision, DTSSPolicy
from adadiff.runtime.sampler import DenoiseNets, sample_tiles
from adadiff.training.data import PhotoWeighting, check_weighting
from adadiff.training.loop import Progress, numpy_rng, stop_on_signals
from adadiff.training.pairs import Batch, PairStream, load_images, photo_names

log = logging.getLogger("adadiff.training")

STAGE = "labels"
KEYS = ("x0", "lr", "t", "scores", "traj", "call")


@dataclass(frozen=True, kw_only=True)
class LabelOptions:
    shards: int
    trajectories: int = 16  # tiles per shard
    max_batch: int = 8
    random_fraction: float = 0.5
    realesrgan_prob: float = 0.0
    weighting: PhotoWeighting = "photo"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shards < 1 or self.trajectories < 1 or self.max_batch < 1:
            raise ConfigError(f"shards, trajectories and max_batch must be >= 1, got {self}")
        check_weighting(self.weighting)
        if not 0 <= self.random_fraction <= 1:
            raise ConfigError(f"random_fraction must be in [0, 1], got {self.random_fraction}")


@dataclass(frozen=True)
class MixedPolicy:
    """Oracle-driven DTSS for most tiles, a random tier per step for the tiles in ``random``."""

    config: DTSSConfig
    random: frozenset[int]
    seed: int
    needs_scores: bool = True

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        if tile not in self.random:
            return DTSSPolicy(self.config).decide(tile, t, g_fr, g_nr)
        rng = numpy_rng(self.seed, tile, t)
        return Decision(Category.STABLE, int(rng.choice(self.config.tiers)))


class OracleScorer:
    """The sampler's score function: decode, score with the oracle, record every call."""

    def __init__(
        self,
        models: TorchModels,
        references: np.ndarray,
        lr_latents: np.ndarray,
        metrics: Sequence[MetricConfig],
        cache_dir: str | Path | None = None,
    ) -> None:
        self.decoder = models.wrappers()["vae_decoder"]
        self.references = references  # [N, H, W, 3] in [0, 1], the bicubic-upscaled LR crops
        self.metrics = tuple(metrics)
        self.cache_dir = cache_dir
        # The sampler hands each tile's own LR latent back; its bytes identify the tile.
        self._tile = {lat.tobytes(): k for k, lat in enumerate(lr_latents)}
        self._calls: dict[int, int] = {}
        self.records: dict[str, list[Any]] = {k: [] for k in KEYS}

    def decode(self, x0: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            images = self.decoder(torch.from_numpy(np.ascontiguousarray(x0)))
        return np.clip((images.numpy().transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)

    def __call__(self, x0: np.ndarray, lr: np.ndarray, t: np.ndarray) -> np.ndarray:
        from adadiff.quality.oracle import score_images

        images = self.decode(x0)
        scores = np.empty((len(x0), len(self.metrics)), dtype=np.float64)
        for i, image in enumerate(images):
            k = self._tile[lr[i].tobytes()]
            scores[i] = score_images(
                image, self.references[k], self.metrics, cache_dir=self.cache_dir
            )
            call = self._calls.get(k, 0)
            self._calls[k] = call + 1
            for key, value in zip(
                KEYS, (x0[i], lr[i], float(t[i]), scores[i], k, call), strict=True
            ):
                self.records[key].append(value)
        return scores.astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        dtypes = (np.float32, np.float32, np.float32, np.float64, np.int64, np.int64)
        return {
            key: np.asarray(self.records[key], dtype=dtype)
            for key, dtype in zip(KEYS, dtypes, strict=True)
        }


def encode_latents(models: TorchModels, images: np.ndarray, max_batch: int) -> np.ndarray:
    """[N, H, W, 3] in [0, 1] -> scaled latents, through the runtime's encoder wrapper."""
    encoder = models.wrappers()["vae_encoder"]
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0
    with torch.inference_mode():
        parts = [encoder(pixels[i : i + max_batch]) for i in range(0, len(pixels), max_batch)]
    return torch.cat(parts).numpy()


def denoise_nets(models: TorchModels, score: Callable) -> DenoiseNets:
    """The sampler's nets from the torch wrappers, with ``score`` as the MMLE stand-in."""
    wrappers = models.wrappers()

    def call(name: str) -> Callable:
        module = wrappers[name]

        def run(*arrays: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).numpy()

        return run

    return DenoiseNets(call("unet"), score, call("pfj"))


def run_trajectories(
    models: TorchModels,
    batch: Batch,
    *,
    seed: int,
    random_fraction: float = 0.0,
    max_batch: int = 8,
    cache_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """One trajectory per crop of ``batch``; every UNet call recorded with its oracle scores.

    ``random_fraction`` 0 gives purely oracle-driven DTSS runs (what evaluation compares with).
    """
    cfg = models.config
    lr_latents = encode_latents(models, batch.up, max_batch)
    n = len(lr_latents)
    pick = numpy_rng(seed, 7).permutation(n)[: round(random_fraction * n)]
    policy = MixedPolicy(cfg.dtss, frozenset(int(k) for k in pick), seed)
    scorer = OracleScorer(models, batch.up, lr_latents, cfg.mmle.metrics, cache_dir)
    sample_tiles(
        lr_latents,
        denoise_nets(models, scorer),
        policy,
        noise=cfg.noise,
        dtss=cfg.dtss,
        metrics=cfg.mmle.metrics,
        gain_dim=cfg.pfj.gain_dim,
        seed=seed,
        max_batch=max_batch,
    )
    out = scorer.arrays()
    out["random"] = np.isin(np.arange(n), pick)[out["traj"]]
    out["photo"] = batch.photo[out["traj"]]
    return out


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_shard(
    models: TorchModels,
    images: list[np.ndarray],
    index: int,
    opts: LabelOptions,
    cache_dir: str | Path | None = None,
    names: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    cfg = models.config
    stream = PairStream(
        images,
        numpy_rng(opts.seed, 100, index),
        size=cfg.tile_size,
        scale=cfg.upscale,
        realesrgan_prob=opts.realesrgan_prob,
        weighting=opts.weighting,
    )
    arrays = run_trajectories(
        models,
        stream.batch(opts.trajectories),
        seed=opts.seed * 100_003 + index,
        random_fraction=opts.random_fraction,
        max_batch=opts.max_batch,
        cache_dir=cache_dir,
    )
    arrays["metrics"] = np.array([m.name for m in cfg.mmle.metrics])
    arrays["photos"] = np.array(list(names), dtype=str)
    arrays["weighting"] = np.array(opts.weighting)
    return arrays


@dataclass
class LabelResult:
    folder: Path
    shards: list[Path]
    made: int
    samples: int
    elapsed_s: float
    stopped: bool


def make_labels(
    cfg: ModelConfig,
    workdir: str | Path,
    opts: LabelOptions,
    *,
    models: TorchModels | None = None,
    images: list[np.ndarray] | None = None,
    names: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> LabelResult:
    """Write shards 0 .. shards-1 into ``workdir/labels``, skipping those already there.

    ``images`` defaults to the training photos; ``names`` (one per image) go into the shards.
    """
    from adadiff.training.assemble import frozen_models, unet_checkpoint

    if images is None:
        names, images = photo_names("train"), load_images("train")
    if names and len(names) != len(images):
        raise ConfigError(f"got {len(names)} photo names for {len(images)} images")
    workdir = Path(workdir)
    folder = workdir / STAGE
    folder.mkdir(parents=True, exist_ok=True)
    unet_step = -1
    if models is None:
        models = frozen_models(cfg, workdir, with_mmle=False)
        unet_step = int(unet_checkpoint(workdir)["step"])
    made, samples, elapsed, stopped = 0, 0, 0.0, False
    with stop_on_signals() as stop:
        for index in range(opts.shards):
            path = shard_path(folder, index)
            if path.is_file():
                continue
            if stop.requested:
                stopped = True
                break
            start = time.perf_counter()
            arrays = make_shard(models, images, index, opts, cache_dir, names)
            arrays["unet_step"] = np.array(unet_step)
            took = time.perf_counter() - start
            arrays["seconds"] = np.array(took)
            _write_npz(path, arrays)
            made, samples, elapsed = made + 1, samples + len(arrays["t"]), elapsed + took
            log.info(
                "labels shard %d/%d: %d samples in %.1f s (%.1f samples/s)",
                index + 1,
                opts.shards,
                len(arrays["t"]),
                took,
                len(arrays["t"]) / took,
            )
            if progress is not None:
                progress(STAGE, index + 1, opts.shards)
    shards = [shard_path(folder, i) for i in range(opts.shards) if shard_path(folder, i).is_file()]
    return LabelResult(folder, shards, made, samples, elapsed, stopped)


def load_shards(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Concatenate shards; ``traj`` becomes unique across them, ``shard`` is added, and
    ``photo_name`` gives each row's photo ("" for shards that do not name their photos)."""
    if not paths:
        raise ModelFolderError("no label shards found; run `adadiff train labels` first")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*KEYS, "shard", "photo_name")}
    metrics = None
    offset = 0
    for i, path in enumerate(paths):
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in (*KEYS, "metrics")}
                named = "photo" in npz.files and "photos" in npz.files and npz["photos"].size
                data["photo_name"] = (
                    npz["photos"][npz["photo"]].astype(str)
                    if named
                    else np.full(len(data["t"]), "", dtype=str)
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ModelFolderError(f"{path} is not a label shard ({exc}); delete it") from exc
        names = tuple(str(m) for m in data["metrics"])
        if metrics is not None and names != metrics:
            raise ModelFolderError(f"{path} has metrics {names}, other shards {metrics}")
        metrics = names
        for key in KEYS:
            parts[key].append(data[key] + offset if key == "traj" else data[key])
        parts["shard"].append(np.full(len(data["t"]), i, dtype=np.int64))
        parts["photo_name"].append(data["photo_name"])
        offset += int(data["traj"].max()) + 1 if len(data["traj"]) else 0
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["metrics"] = np.array(metrics)
    return out
