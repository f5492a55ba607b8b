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
images), weighting (str), metrics str[M], unet_step, drawn_by (the model, with its UNet and
decoder steps) and seconds (scalars); a folder holds one model's shards. Shard k is seeded by
(seed, k) alone and written atomically, so an interrupted run resumes at the first missing shard
and produces the same files.

The FR scores carry two errors (``adadiff.training.mmle``): the one the latents show, and the
VAE's reconstruction error of the LR input, which MMLE learns to estimate from the LR latent.
Both are recorded as MSE and, when the config scores LPIPS, as LPIPS. Each row has latent_err
f32[n] (log10 MSE between decode(x0) and decode(LR latent)) and latent_lpips f32[n] (LPIPS of
the same pair), and each shard holds, for its trajectories' crops and ``recon_crops`` more (one
encode and decode each), recon_lr f32[R, C, s, s], recon_err f32[R] (log10 MSE of
decode(encode(input)) against the input), recon_lpips f32[R] (LPIPS of that pair) and
recon_photo i64[R]. A shard made before these were recorded gets them on the next run: its
crops are re-drawn from its seed and must reproduce its stored LR latents.

Every call is also scored against its HR crop, known only at training time (scores_hr
f64[n, F], the config's F full-reference metrics in ``hr_metrics`` order; the same corrected
image): the input-referenced score falls both when a step adds real detail and when it adds
grain, the HR-referenced one only for grain, so these say which steps paid.

With a colour fix in the config (``color_fix``), every decoded image is corrected against its
reference before it is scored or compared, as the runtime's output is; each shard records the
fix (``color_fix``, e.g. ``wavelet:5``) and a run with another config refuses to reuse it, as
MMLE's trainer refuses to learn from it. A tile whose input is gray (three equal channels, as a
gray photo is read) is scored gray, as the runtime returns a gray input (``gray_output``
"luma"; shards made before scored its faint colour).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadiff.config import DTSSConfig, MetricConfig, MetricKind, ModelConfig
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.imageio import gray_output, has_gray_channels
from adadiff.models.bundle import TorchModels
from adadiff.progress import Progress
from adadiff.quality.lpips import load_lpips
from adadiff.quality.oracle import score_images
from adadiff.runtime.colorfix import band, color_fix, swap_band
from adadiff.runtime.policy import Category, Decision, DTSSPolicy, StepPolicy
from adadiff.runtime.sampler import DenoiseNets, SamplerResult, sample_tiles
from adadiff.training.assemble import frozen_models, unet_checkpoint
from adadiff.training.checkpoint import stage_lock
from adadiff.training.data import PhotoWeighting, check_weighting
from adadiff.training.loop import check_writable, numpy_rng, option_flag, stop_on_signals
from adadiff.training.pairs import (
    Batch,
    PairStream,
    load_images,
    photo_names,
    photos_a_crop_fits,
)

log = logging.getLogger("adadiff.training")

STAGE = "labels"
KEYS = ("x0", "lr", "t", "scores", "traj", "call")
# What np.load raises for a shard cut short or damaged (an empty file is an EOFError, a
# truncated or corrupted zip a BadZipFile) or one that is not an npz at all.
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)
RECON_KEYS = ("recon_lr", "recon_err", "recon_photo")
# Pixel errors between two decoded images: log10 MSE always, LPIPS when the config scores it.
LPIPS_NAME = "lpips"


ERROR_KEYS = ("latent_err", *RECON_KEYS)
LPIPS_KEYS = ("latent_lpips", "recon_lpips")
# How a shard scores the estimates of a tile whose input is gray (``has_gray_channels``): as the
# runtime returns them, gray (``imageio.gray_output``). Shards without the field scored them in
# colour ("rgb"), which scores other images than the runtime outputs.
GRAY_OUTPUT = "luma"


def as_output(images: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] estimates as the runtime returns them: gray where ``gray`` [N] says the
    tile's input was."""
    if not gray.any():
        return images
    out = images.copy()
    out[gray] = gray_output(images[gray])
    return out


def error_keys(metrics: Sequence[MetricConfig]) -> tuple[str, ...]:
    """The error arrays a shard needs for ``metrics``: per row, then per reconstruction crop."""
    return (*ERROR_KEYS, *LPIPS_KEYS) if lpips_scored(metrics) else ERROR_KEYS


def lpips_scored(metrics: Sequence[MetricConfig]) -> bool:
    return any(m.name == LPIPS_NAME and m.kind is MetricKind.FULL_REFERENCE for m in metrics)


class PixelErrors:
    """Errors between batches of decoded images: ``err`` (log10 MSE) and, with LPIPS, ``lpips``."""

    def __init__(self, metrics: Sequence[MetricConfig], cache_dir: str | Path | None = None):
        self.lpips = load_lpips(cache_dir) if lpips_scored(metrics) else None

    def __call__(self, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        """[N, H, W, 3] pairs in [0, 1] -> {"err": f32[N], "lpips": f32[N]}."""
        out = {"err": np.array([_log10_mse(x, y) for x, y in zip(a, b, strict=True)], np.float32)}
        if self.lpips is not None:

            def signed(v: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))) * 2.0 - 1.0

            with torch.inference_mode():
                out["lpips"] = self.lpips(signed(a), signed(b)).numpy().astype(np.float32)
        return out


@dataclass(frozen=True, kw_only=True)
class LabelOptions:
    shards: int
    trajectories: int = 16  # tiles per shard
    max_batch: int = 8
    random_fraction: float = 0.5
    realesrgan_prob: float = 0.0
    weighting: PhotoWeighting = "photo"
    recon_crops: int = 128  # crops per shard with only their reconstruction error recorded
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shards < 1 or self.trajectories < 1 or self.max_batch < 1:
            raise ConfigError(f"shards, trajectories and max_batch must be >= 1, got {self}")
        if self.recon_crops < 0:
            raise ConfigError(f"recon_crops must be >= 0, got {self.recon_crops}")
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
        *,
        hr: np.ndarray | None = None,
        reference: str = "input",
    ) -> None:
        if reference == "hr" and hr is None:
            raise ConfigError("an oracle that scores against the HR crop needs the HR crops")
        self.decoder = models.wrappers()["vae_decoder"]
        self.color_fix = models.config.color_fix
        self.references = references  # [N, H, W, 3] in [0, 1], the bicubic-upscaled LR crops
        self._gray = has_gray_channels(references)
        self.metrics = tuple(metrics)
        self.cache_dir = cache_dir
        # The HR crops, known at training time only: the same estimate scored against the truth
        # says whether a step gained real quality, where the input-referenced score cannot tell
        # added detail from added grain. Full-reference metrics only; NR scores are the same.
        self.hr = hr
        self.hr_metrics = tuple(m for m in self.metrics if m.kind is MetricKind.FULL_REFERENCE)
        self.hr_scores: list[np.ndarray] = []
        # What the policy sees (``__call__``'s return) with ``reference`` "hr": the HR scores in
        # the full-reference columns, as an MMLE of ``mmle.reference`` "hr" predicts them; the
        # recorded ``scores`` stay against the input either way.
        self.reference = reference
        self._fr_columns = [
            i for i, m in enumerate(self.metrics) if m.kind is MetricKind.FULL_REFERENCE
        ]
        # The sampler hands each tile's own LR latent back; its bytes identify the tile.
        self._tile = {lat.tobytes(): k for k, lat in enumerate(lr_latents)}
        if len(self._tile) != len(lr_latents):
            raise ConfigError(
                "two crops encode to the same LR latent (a flat or repeated crop?), so the oracle "
                "cannot tell which HR crop scores them; draw the crops again with another seed"
            )
        self._lr_latents = lr_latents
        self._lr_decoded: dict[int, np.ndarray] = {}
        # per tile: the colour-fix bands of its input and of its decoded LR latent
        self._bands: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
        self._calls: dict[int, int] = {}
        self.records: dict[str, list[Any]] = {k: [] for k in KEYS}
        self.errors = PixelErrors(self.metrics, cache_dir)
        self.latent: dict[str, list[np.ndarray]] = {}

    def decode(self, x0: np.ndarray) -> np.ndarray:
        return decode_latents(self.decoder, x0)

    def __call__(self, x0: np.ndarray, lr: np.ndarray, t: np.ndarray) -> np.ndarray:
        tiles = [self._tile[row.tobytes()] for row in lr]
        decoded = self.decode(x0)
        scores = np.empty((len(x0), len(self.metrics)), dtype=np.float64)
        seen = scores.copy()
        for k in tiles:
            if k not in self._lr_decoded:
                lr_image = self.decode(self._lr_latents[k : k + 1])[0]
                self._lr_decoded[k] = lr_image
                # a tile's references are fixed, so their bands are computed once
                self._bands[k] = (
                    band(self.references[k], self.color_fix),
                    band(lr_image, self.color_fix),
                )
        lr_decoded = np.stack([self._lr_decoded[k] for k in tiles])
        decoded_band = band(decoded, self.color_fix)

        def corrected(which: int) -> np.ndarray:
            # every tile has a band, or none has (no colour fix)
            bands = [b for k in tiles if (b := self._bands[k][which]) is not None]
            return swap_band(decoded, decoded_band, np.stack(bands) if bands else None)

        gray = self._gray[tiles]
        images = as_output(corrected(0), gray)
        # The latents' share of the error: the estimate corrected against the decoded LR latent,
        # as the oracle corrects it against the input.
        errors = self.errors(as_output(corrected(1), gray), as_output(lr_decoded, gray))
        for key, values in errors.items():
            self.latent.setdefault(key, []).append(values)
        for i, (image, k) in enumerate(zip(images, tiles, strict=True)):
            scores[i] = score_images(
                image, self.references[k], self.metrics, cache_dir=self.cache_dir
            )
            seen[i] = scores[i]
            if self.hr is not None:
                truth = score_images(image, self.hr[k], self.hr_metrics, cache_dir=self.cache_dir)
                self.hr_scores.append(truth)
                if self.reference == "hr":
                    seen[i, self._fr_columns] = truth
            call = self._calls.get(k, 0)
            self._calls[k] = call + 1
            for key, value in zip(
                KEYS, (x0[i], lr[i], float(t[i]), scores[i], k, call), strict=True
            ):
                self.records[key].append(value)
        return seen.astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        dtypes = (np.float32, np.float32, np.float32, np.float64, np.int64, np.int64)
        out = {
            key: np.asarray(self.records[key], dtype=dtype)
            for key, dtype in zip(KEYS, dtypes, strict=True)
        }
        for key, values in self.latent.items():
            out[f"latent_{key}"] = np.concatenate(values)
        if self.hr is not None:
            out["scores_hr"] = np.asarray(self.hr_scores, dtype=np.float64).reshape(
                -1, len(self.hr_metrics)
            )
            out["hr_metrics"] = np.array([m.name for m in self.hr_metrics], dtype=str)
        return out


def _log10_mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.log10(max(float(np.mean((a - b) ** 2)), 1e-12)))


def encode_latents(models: TorchModels, images: np.ndarray, max_batch: int) -> np.ndarray:
    """[N, H, W, 3] in [0, 1] -> scaled latents, through the runtime's encoder wrapper."""
    encoder = models.wrappers()["vae_encoder"]
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0
    with torch.inference_mode():
        parts = [encoder(pixels[i : i + max_batch]) for i in range(0, len(pixels), max_batch)]
    return torch.cat(parts).numpy()


def decode_latents(decoder: torch.nn.Module, latents: np.ndarray) -> np.ndarray:
    """Scaled latents -> [N, H, W, 3] in [0, 1], through the runtime's decoder wrapper."""
    with torch.inference_mode():
        images = decoder(torch.from_numpy(np.ascontiguousarray(latents)))
    return np.clip((images.numpy().transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)


def _batched_errors(
    errors: PixelErrors, pairs: Callable[[slice], tuple[np.ndarray, np.ndarray]], n: int, step: int
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, step):
        for key, values in errors(*pairs(slice(i, i + step))).items():
            parts.setdefault(key, []).append(values)
    return {key: np.concatenate(v) for key, v in parts.items()}


def reconstruction_errors(
    models: TorchModels, images: np.ndarray, max_batch: int, errors: PixelErrors
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(latents, errors of decode(encode(image)) against the image) for [N, H, W, 3] inputs."""
    latents = encode_latents(models, images, max_batch)
    decoder = models.wrappers()["vae_decoder"]
    fix = models.config.color_fix
    return latents, _batched_errors(
        errors,
        lambda rows: (
            as_output(
                color_fix(decode_latents(decoder, latents[rows]), images[rows], fix),
                has_gray_channels(images[rows]),
            ),
            images[rows],
        ),
        len(latents),
        max_batch,
    )


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


def mmle_score(models: TorchModels) -> Callable[..., np.ndarray]:
    """The sampler's score function from the model's own MMLE (the torch wrapper)."""
    mmle = models.wrappers()["mmle"]

    def score(x0: np.ndarray, lr: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return mmle(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x0, lr, t))).numpy()

    return score


def sample_with(
    models: TorchModels,
    lr_latents: np.ndarray,
    score: Callable,
    policy: StepPolicy,
    *,
    seed: int,
    max_batch: int,
    dtss: DTSSConfig | None = None,
    metrics: Sequence[MetricConfig] | None = None,
    progress: Progress | None = None,
) -> SamplerResult:
    """``sample_tiles`` on the torch wrappers with ``score`` as MMLE; the model's DTSS numbers
    and metric weights unless others are given."""
    cfg = models.config
    return sample_tiles(
        lr_latents,
        denoise_nets(models, score),
        policy,
        noise=cfg.noise,
        dtss=dtss or cfg.dtss,
        metrics=metrics or cfg.mmle.metrics,
        gain_dim=cfg.pfj.gain_dim,
        seed=seed,
        max_batch=max_batch,
        progress=progress,
    )


def run_trajectories(
    models: TorchModels,
    batch: Batch,
    *,
    seed: int,
    random_fraction: float = 0.0,
    max_batch: int = 8,
    cache_dir: str | Path | None = None,
    score_hr: bool = False,
    reference: str = "input",
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """One trajectory per crop of ``batch``; every UNet call recorded with its oracle scores,
    and with ``score_hr`` its full-reference scores against the HR crop too (``scores_hr``).

    ``random_fraction`` 0 gives purely oracle-driven DTSS runs (what evaluation compares with);
    ``reference`` "hr" drives them by the scores against the HR crop (``OracleScorer``).
    """
    cfg = models.config
    lr_latents = encode_latents(models, batch.up, max_batch)
    n = len(lr_latents)
    pick = numpy_rng(seed, 7).permutation(n)[: round(random_fraction * n)]
    policy = MixedPolicy(cfg.dtss, frozenset(int(k) for k in pick), seed)
    hr = batch.hr if score_hr or reference == "hr" else None
    scorer = OracleScorer(
        models, batch.up, lr_latents, cfg.mmle.metrics, cache_dir, hr=hr, reference=reference
    )
    sample_with(
        models, lr_latents, scorer, policy, seed=seed, max_batch=max_batch, progress=progress
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
            payload: dict[str, Any] = dict(arrays)
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_stream(
    models: TorchModels, images: list[np.ndarray], opts: LabelOptions, *key: int
) -> PairStream:
    cfg = models.config
    return PairStream(
        images,
        numpy_rng(opts.seed, *key),
        size=cfg.tile_size,
        scale=cfg.upscale,
        realesrgan_prob=opts.realesrgan_prob,
        weighting=opts.weighting,
    )


def recon_fields(
    models: TorchModels,
    images: list[np.ndarray],
    index: int,
    opts: LabelOptions,
    trajectory_crops: Batch,
    errors: PixelErrors,
) -> dict[str, np.ndarray]:
    """The shard's ``recon_*`` arrays: its trajectories' crops, then ``recon_crops`` more."""
    up, photo = trajectory_crops.up, trajectory_crops.photo
    if opts.recon_crops:
        extra = _shard_stream(models, images, opts, 101, index).batch(opts.recon_crops)
        up, photo = np.concatenate([up, extra.up]), np.concatenate([photo, extra.photo])
    latents, err = reconstruction_errors(models, up, opts.max_batch, errors)
    out = {f"recon_{key}": values for key, values in err.items()}
    return {**out, "recon_lr": latents, "recon_photo": photo.astype(np.int64)}


def make_shard(
    models: TorchModels,
    images: list[np.ndarray],
    index: int,
    opts: LabelOptions,
    cache_dir: str | Path | None = None,
    names: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    cfg = models.config
    batch = _shard_stream(models, images, opts, 100, index).batch(opts.trajectories)
    arrays = run_trajectories(
        models,
        batch,
        seed=opts.seed * 100_003 + index,
        random_fraction=opts.random_fraction,
        max_batch=opts.max_batch,
        cache_dir=cache_dir,
        score_hr=True,
    )
    errors = PixelErrors(cfg.mmle.metrics, cache_dir)
    arrays.update(recon_fields(models, images, index, opts, batch, errors))
    arrays["metrics"] = np.array([m.name for m in cfg.mmle.metrics])
    arrays["color_fix"] = np.array(color_fix_tag(cfg))
    arrays["gray_output"] = np.array(GRAY_OUTPUT)
    arrays["photos"] = np.array(list(names), dtype=str)
    arrays["weighting"] = np.array(opts.weighting)
    return arrays


def latent_errors(
    models: TorchModels,
    x0: np.ndarray,
    lr: np.ndarray,
    traj: np.ndarray,
    max_batch: int,
    errors: PixelErrors,
    gray: np.ndarray,
) -> dict[str, np.ndarray]:
    """Errors between decode(x0) and decode(lr) per row (``latent_err``, ``latent_lpips``), gray
    where ``gray`` [n] says the row's input was; the rows of one trajectory share their LR
    latent, decoded once."""
    decoder = models.wrappers()["vae_decoder"]
    fix = models.config.color_fix
    trajs, first = np.unique(traj, return_index=True)
    lr_images, which = decode_latents(decoder, lr[first]), np.searchsorted(trajs, traj)
    err = _batched_errors(
        errors,
        lambda rows: (
            as_output(
                color_fix(decode_latents(decoder, x0[rows]), lr_images[which[rows]], fix),
                gray[rows],
            ),
            as_output(lr_images[which[rows]], gray[rows]),
        ),
        len(x0),
        max_batch,
    )
    return {f"latent_{key}": values for key, values in err.items()}


def add_error_fields(
    models: TorchModels,
    images: list[np.ndarray],
    path: Path,
    index: int,
    opts: LabelOptions,
    names: Sequence[str] = (),
    cache_dir: str | Path | None = None,
) -> None:
    """Give a shard made before its error arrays (``error_keys``) were recorded those arrays;
    the reconstruction errors, and which inputs were gray, come from re-drawn crops."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    needed = [k for k in error_keys(models.config.mmle.metrics) if k not in arrays]
    errors = PixelErrors(models.config.mmle.metrics, cache_dir)
    stored = [str(n) for n in arrays.get("photos", ())]
    if stored and names and stored != list(names):
        raise ModelFolderError(
            f"{path} was made from the photos {stored}, this run has {list(names)}; "
            "delete the shard to remake it"
        )
    if "weighting" in arrays:
        opts = replace(opts, weighting=check_weighting(str(arrays["weighting"])))
    crops = int(arrays["traj"].max()) + 1 if len(arrays["traj"]) else 0
    if "recon_lr" in arrays:
        # the crops it was made with, whatever --recon-crops says now
        opts = replace(opts, recon_crops=len(arrays["recon_lr"]) - crops)
    batch = _shard_stream(models, images, opts, 100, index).batch(crops)
    redrawn = ModelFolderError(
        f"{path}: re-drawing its crops does not give its stored LR latents (made with "
        "another seed, --realesrgan-prob, model or photos?); delete it to remake it"
    )
    if any(k.startswith("latent_") for k in needed):
        drawn = encode_latents(models, batch.up, opts.max_batch)
        if not np.allclose(drawn[arrays["traj"]], arrays["lr"], atol=1e-3):
            raise redrawn
        gray = has_gray_channels(batch.up)[arrays["traj"]]
        fresh = latent_errors(
            models,
            arrays["x0"],
            arrays["lr"],
            arrays["traj"],
            max(opts.max_batch, 32),
            errors,
            gray,
        )
        # Recorded values stay as they are; a fresh decode only fills the gaps.
        arrays.update({k: v for k, v in fresh.items() if k in needed})
    if not any(k.startswith("recon_") for k in needed):
        _write_npz(path, arrays)
        return
    fields = recon_fields(models, images, index, opts, batch, errors)
    stored_lr = arrays.get("recon_lr", fields["recon_lr"])
    if not (
        np.allclose(fields["recon_lr"][arrays["traj"]], arrays["lr"], atol=1e-3)
        and np.allclose(fields["recon_lr"], stored_lr, atol=1e-3)
    ):
        raise redrawn
    arrays.update({k: v for k, v in fields.items() if k in needed})
    _write_npz(path, arrays)


@dataclass
class LabelResult:
    folder: Path
    shards: list[Path]
    made: int
    samples: int
    elapsed_s: float
    stopped: bool
    upgraded: int = 0  # old shards given their missing error arrays


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
    if images is None:
        names, images = photo_names("train"), load_images("train")
    if names and len(names) != len(images):
        raise ConfigError(f"got {len(names)} photo names for {len(images)} images")
    names, images = photos_a_crop_fits(list(names), images, cfg.tile_size, stage=STAGE)
    workdir = Path(workdir)
    folder = workdir / STAGE
    check_writable(folder)
    with stage_lock(folder):
        return _make_labels(cfg, workdir, opts, models, images, names, cache_dir, progress)


def _make_labels(
    cfg: ModelConfig,
    workdir: Path,
    opts: LabelOptions,
    models: TorchModels | None,
    images: list[np.ndarray],
    names: Sequence[str],
    cache_dir: str | Path | None,
    progress: Progress | None,
) -> LabelResult:
    folder = workdir / STAGE
    unet_step = -1
    if models is None:
        models = frozen_models(cfg, workdir, with_mmle=False)
        unet_step = int(unet_checkpoint(workdir)["step"])
    made, samples, elapsed, stopped, upgraded = 0, 0, 0.0, False, 0
    with stop_on_signals("finishing the shard being made (it is written whole)") as stop:
        for index in range(opts.shards):
            path = shard_path(folder, index)
            if stop.requested:
                stopped = True
                break
            if path.is_file():
                meta = _shard_meta(path)  # one read of the shard's small fields
                _check_color_fix(path, meta, cfg)
                _check_gray_output(path, meta)
                _check_tile(path, meta, cfg)
                _check_metrics(path, meta, cfg)
                _check_drawn_by(path, meta, models.source, unet_step)
                _check_recipe(path, meta, opts, names)
                if not all(k in meta["files"] for k in error_keys(cfg.mmle.metrics)):
                    add_error_fields(models, images, path, index, opts, names, cache_dir)
                    upgraded += 1
                    log.info("labels shard %d/%d: error fields added", index + 1, opts.shards)
                continue
            start = time.perf_counter()
            arrays = make_shard(models, images, index, opts, cache_dir, names)
            arrays["unet_step"] = np.array(unet_step)
            arrays["drawn_by"] = np.array(models.source)
            arrays["recipe"] = np.array(json.dumps(shard_recipe(opts), sort_keys=True))
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
    return LabelResult(folder, shards, made, samples, elapsed, stopped, upgraded)


def color_fix_tag(cfg: ModelConfig) -> str:
    """How a shard's decoded images were corrected before scoring, e.g. ``wavelet:5``."""
    fix = cfg.color_fix
    return "none" if fix.kind == "none" else f"{fix.kind}:{fix.levels}"


def _shard_meta(path: Path) -> dict[str, Any]:
    """What the checks of an existing shard read: its small fields and the names it holds."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            return {
                "files": files,
                # shards from before each of these existed lack it
                "color_fix": str(npz["color_fix"]) if "color_fix" in files else "none",
                "gray_output": str(npz["gray_output"]) if "gray_output" in files else "rgb",
                "drawn_by": str(npz["drawn_by"]) if "drawn_by" in files else None,
                "unet_step": int(npz["unet_step"]) if "unet_step" in files else -1,
                "recipe": json.loads(str(npz["recipe"])) if "recipe" in files else None,
                "photos": [str(n) for n in npz["photos"]] if "photos" in files else [],
                "latent_tile": int(npz["x0"].shape[-1]) if "x0" in files else -1,
                "metrics": [str(m) for m in npz["metrics"]] if "metrics" in files else None,
            }
    except UNREADABLE as exc:
        raise ModelFolderError(f"{path} is not a label shard ({exc}); delete it") from exc


def _check_color_fix(path: Path, meta: dict[str, Any], cfg: ModelConfig) -> None:
    if meta["color_fix"] != color_fix_tag(cfg):
        raise ModelFolderError(
            f"{path} was scored with colour fix {meta['color_fix']}, the config asks for "
            f"{color_fix_tag(cfg)}; move the labels folder away to make labels for this config"
        )


def _check_gray_output(path: Path, meta: dict[str, Any]) -> None:
    if meta["gray_output"] != GRAY_OUTPUT:
        raise ModelFolderError(
            f"{path} scored the estimates of gray inputs in colour, where the runtime returns "
            "them gray; move the labels folder away to make labels that score what it returns"
        )


def _check_tile(path: Path, meta: dict[str, Any], cfg: ModelConfig) -> None:
    """A labels folder holds one tile size: MMLE stacks the shards' latents."""
    if meta["latent_tile"] not in (-1, cfg.latent_tile):
        raise ModelFolderError(
            f"{path} holds {meta['latent_tile'] * cfg.vae_scale_factor} px tiles, the config's "
            f"tile_size is {cfg.tile_size}; run with the tile size it was made with, or move the "
            "labels folder aside to make labels of this size"
        )


def _check_metrics(path: Path, meta: dict[str, Any], cfg: ModelConfig) -> None:
    """A labels folder holds one metric list: MMLE learns one score column per metric."""
    now = [m.name for m in cfg.mmle.metrics]
    if meta["metrics"] is not None and meta["metrics"] != now:
        raise ModelFolderError(
            f"{path} holds scores for the metrics {meta['metrics']}, the config lists {now}; run "
            "with the metrics it was made with, or move the labels folder aside to make labels "
            "for these"
        )


def _check_drawn_by(path: Path, meta: dict[str, Any], source: str, unet_step: int) -> None:
    """A labels folder holds one model's trajectories: refuse to extend it with another's."""
    stored, step = meta["drawn_by"], meta["unet_step"]
    if stored is not None and stored != source:
        other = f"drawn by {stored}; this run's model is {source}"
    elif stored is None and step >= 0 and unet_step >= 0 and step != unet_step:
        # shards from before ``drawn_by`` existed say only their UNet step
        other = f"drawn by the UNet at step {step}; the workdir's is at step {unet_step}"
    else:
        return
    raise ModelFolderError(
        f"{path} was {other}; move the labels folder aside (or delete it) to draw labels from "
        "this model, so that MMLE does not learn from two models at once"
    )


def shard_recipe(opts: LabelOptions) -> dict[str, Any]:
    """The options that decide a shard's content (not --shards, nor --max-batch: batching
    never changes results)."""
    return {k: v for k, v in asdict(opts).items() if k not in ("shards", "max_batch")}


def _check_recipe(
    path: Path, meta: dict[str, Any], opts: LabelOptions, names: Sequence[str]
) -> None:
    """A labels folder holds one recipe: refuse to extend it with other options or photos."""
    stored, photos = meta["recipe"], meta["photos"]
    differ = []
    if stored is not None:  # shards from before the recipe was recorded cannot be checked
        now = shard_recipe(opts)
        differ = [
            f"{option_flag(k)} {stored[k]} there, {now[k]} now"
            for k in now
            if k in stored and stored[k] != now[k]
        ]
    if photos and names and photos != list(names):
        differ.append(f"photos {photos} there, {list(names)} now")
    if differ:
        raise ModelFolderError(
            f"{path} was made with other options ({'; '.join(differ)}); run with the options "
            "it was made with, or move the labels folder aside to start new labels"
        )


def _photo_names(npz: Any, key: str, n: int) -> np.ndarray:
    """The photo name of each of ``n`` rows from a shard's ``key`` indices; "" if unnamed."""
    if key in npz.files and "photos" in npz.files and npz["photos"].size:
        return npz["photos"][npz[key]].astype(str)
    return np.full(n, "", dtype=str)


def labels_origin(paths: Sequence[Path]) -> tuple[str, ...]:
    """What drew the shards: each distinct ``drawn_by`` (or, for shards from before it was
    recorded, the UNet step), sorted."""
    origins = set()
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "drawn_by" in npz.files:
                    origins.add(str(npz["drawn_by"]))
                elif "unet_step" in npz.files:
                    origins.add(f"the UNet at step {int(npz['unet_step'])}")
        except UNREADABLE as exc:
            raise ModelFolderError(f"{path} is not a label shard ({exc}); delete it") from exc
    return tuple(sorted(origins))


def load_shards(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Concatenate shards; ``traj`` becomes unique across them, ``shard`` is added, and
    ``photo_name`` gives each row's photo ("" for shards that do not name their photos).

    The error arrays (``latent_err``, ``latent_lpips``, ``recon_lr``, ``recon_err``,
    ``recon_lpips``, and ``recon_photo_name`` from ``recon_photo``) are there only when every
    shard has them (``adadiff train labels`` adds them to older shards); so are ``scores_hr``
    and its ``hr_metrics`` (shards made before they were recorded lack them)."""
    if not paths:
        raise ModelFolderError("no label shards found; run `adadiff train labels` first")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*KEYS, "shard", "photo_name")}
    optional: dict[str, list[np.ndarray]] = {}
    metrics = hr_metrics = fix = gray = None
    offset = 0
    for i, path in enumerate(paths):
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in (*KEYS, "metrics")}
                if "hr_metrics" in npz.files:
                    data["hr_metrics"] = npz["hr_metrics"]
                # shards from before the fix was recorded were scored without one
                data["color_fix"] = npz["color_fix"] if "color_fix" in npz.files else "none"
                data["gray_output"] = (
                    npz["gray_output"] if "gray_output" in npz.files else np.array("rgb")
                )
                data["photo_name"] = _photo_names(npz, "photo", len(data["t"]))
                for key in _OPTIONAL_KEYS:
                    if key == "recon_photo" and key in npz.files:
                        n = len(npz["recon_photo"])
                        optional.setdefault(key, []).append(_photo_names(npz, key, n))
                    elif key in npz.files:
                        optional.setdefault(key, []).append(npz[key])
        except (*UNREADABLE, KeyError) as exc:
            raise ModelFolderError(f"{path} is not a label shard ({exc}); delete it") from exc
        shape = data["x0"].shape[1:]
        if i and shape != parts["x0"][0].shape[1:]:
            raise ModelFolderError(
                f"{path} holds latents of shape {shape}, {paths[0]} of "
                f"{parts['x0'][0].shape[1:]} (another tile size); move the shards of one size "
                "out of the folder"
            )
        names = tuple(str(m) for m in data["metrics"])
        if metrics is not None and names != metrics:
            raise ModelFolderError(
                f"{path} has metrics {names}, other shards {metrics}; move the shards of one "
                "metric list out of the folder"
            )
        metrics = names
        if fix is not None and str(data["color_fix"]) != fix:
            raise ModelFolderError(
                f"{path} was scored with colour fix {data['color_fix']}, other shards with {fix}; "
                "move the shards of one fix out of the folder"
            )
        fix = str(data["color_fix"])
        if gray is not None and str(data["gray_output"]) != gray:
            raise ModelFolderError(
                f"{path} scored gray inputs' estimates as {data['gray_output']}, other shards as "
                f"{gray}; move the shards of one kind out of the folder"
            )
        gray = str(data["gray_output"])
        if "hr_metrics" in data:
            hr_names = tuple(str(m) for m in data["hr_metrics"])
            if hr_metrics is not None and hr_names != hr_metrics:
                raise ModelFolderError(f"{path} has HR metrics {hr_names}, others {hr_metrics}")
            hr_metrics = hr_names
        for key in KEYS:
            parts[key].append(data[key] + offset if key == "traj" else data[key])
        parts["shard"].append(np.full(len(data["t"]), i, dtype=np.int64))
        parts["photo_name"].append(data["photo_name"])
        offset += int(data["traj"].max()) + 1 if len(data["traj"]) else 0
    out = {k: np.concatenate(v) for k, v in parts.items()}
    complete = {k: v for k, v in optional.items() if len(v) == len(paths)}
    if not all(k in complete for k in RECON_KEYS):
        complete = {k: v for k, v in complete.items() if not k.startswith("recon_")}
    for key, values in complete.items():
        out["recon_photo_name" if key == "recon_photo" else key] = np.concatenate(values)
    out["metrics"] = np.array(metrics)
    out["color_fix"] = np.array(fix)
    out["gray_output"] = np.array(gray)
    if "scores_hr" in out:
        out["hr_metrics"] = np.array(hr_metrics)
    return out


_OPTIONAL_KEYS = (*ERROR_KEYS, *LPIPS_KEYS, "scores_hr")
