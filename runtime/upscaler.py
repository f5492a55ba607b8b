"""The public entry point: image in, 4x image and a report out, on any backend."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adadiff.config import SCHEDULES, SEED_LIMIT, ModelConfig, RunSettings
from adadiff.engines import factory
from adadiff.engines.base import Backend, CallLog, Components
from adadiff.errors import ConfigError
from adadiff.imageio import bicubic_rows, gray_output, to_rgb_and_gray
from adadiff.presets import PRESET_PREFIX, PRESETS
from adadiff.progress import Progress
from adadiff.runtime.colorfix import color_fix_rows
from adadiff.runtime.content import ContentPolicy
from adadiff.runtime.policy import DTSSPolicy, StepPolicy, UniformPolicy
from adadiff.runtime.sampler import DenoiseNets, SamplerResult, check_grouping, sample_tiles
from adadiff.runtime.tiling import TileGrid, decode_rows, merge_tiles

log = logging.getLogger("adadiff")


@dataclass
class Report:
    schedule: str
    interval: int | None
    seed: int
    model: str
    backend: dict[str, Any]
    input_size: tuple[int, int]  # (width, height)
    output_size: tuple[int, int]
    tile_size: int
    tile_overlap: int
    grid: tuple[int, int]  # (rows, cols)
    tiles: int
    max_batch: int
    unet_evaluations: int
    engine_calls: int
    rounds: int
    steps_per_tile: list[int]
    exits: list[str]
    categories: dict[str, int]
    batches: list[dict]
    # tile boxes (y0, x0, y1, x1) in output pixels of the padded canvas: an image smaller than
    # a tile, or one whose last tile is padded, has boxes past output_size (clip to draw them)
    boxes: list[tuple[int, int, int, int]]
    seconds: dict[str, float] = field(default_factory=dict)
    components: dict[str, dict[str, float]] = field(default_factory=dict)
    color_fix: str = "none"  # the output's colour correction (ModelConfig.color_fix)
    # ModelConfig.digest: which numbers (DTSS, calibration, noise, ...) the run used, so two
    # reports of one model name tell a calibrated folder from its source
    config_digest: str = ""
    # the adaptive schedule's numbers: ModelConfig.dtss and the MMLE metrics with their weights
    dtss: dict[str, Any] | None = None

    @property
    def mean_batch(self) -> float:
        """Mean tiles per UNet call, counting other images' tiles in shared calls."""
        if not self.batches:
            return 0.0
        return sum(b["size"] for b in self.batches) / len(self.batches)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_batch"] = round(self.mean_batch, 3)
        return data


@dataclass
class PreparedImage:
    """An encoded image waiting for (or in) denoising; ``Upscaler.finish`` completes it."""

    like: Any  # the input, so the output comes back in the same type
    rgb: np.ndarray  # the input as float32 RGB, read once: the colour fix's reference
    gray: bool  # a gray input comes back gray (in RGB)
    size: tuple[int, int]  # (width, height)
    grid: TileGrid
    lr_latents: np.ndarray
    policy: StepPolicy
    schedule: str
    interval: int | None
    seed: int
    start: float
    seconds: dict[str, float]


class Upscaler:
    """Load once, upscale many images. Not thread-safe: one Upscaler per worker."""

    def __init__(
        self,
        config: ModelConfig,
        backend: Backend,
        *,
        max_batch: int = 8,
        model_name: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        # Engines with batch profiles (TensorRT, ONNX Runtime's TensorRT provider) take batches
        # up to their largest profile only: refuse a larger --max-batch before encoding starts.
        limit = getattr(backend, "max_batch", None)
        if limit is not None and max_batch > limit:
            raise ConfigError(
                f"--max-batch {max_batch} is larger than the {backend.name} engines take (batch "
                f"1 to {limit}); use --max-batch {limit}, or rebuild the engines for "
                f"{max_batch} (`adadiff build ENGINES --max-batch {max_batch}`)"
            )
        self.config = config
        self.backend = backend
        self.max_batch = max_batch
        self.model_name = model_name or config.name
        self.log = CallLog()
        self.components = Components(backend, self.log)
        self.closed = False

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        backend: str = "torch",
        device: str = "cpu",
        precision: str = "fp32",
        engines: str | Path | None = None,
        max_batch: int = 8,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        seed: int = 0,
        threads: int | None = None,
    ) -> Upscaler:
        """``model`` is a preset (``tiny``, ``sd21-base``) or a model folder. None means
        ``tiny`` for torch and the exported model for onnxruntime and tensorrt. ``threads`` is
        the CPU thread count (default: ``OMP_NUM_THREADS`` if set, else every CPU this process
        may use; torch's idle threads wait passively when torch was not imported before, see
        ``adadiff.threads``)."""
        settings = RunSettings(
            model=model,
            backend=backend,
            device=device,
            precision=precision,
            engines=engines,
            seed=seed,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            max_batch=max_batch,
            threads=threads,
        )
        return cls.open(settings)

    @classmethod
    def open(cls, settings: RunSettings) -> Upscaler:
        """``from_pretrained`` with its settings in one object."""
        config, be = factory.make_backend(settings)
        raw = str(settings.model or config.name)
        bare = raw.removeprefix(PRESET_PREFIX)
        # reports name the preset as "tiny" however it was asked for (tiny or preset:tiny)
        name = bare if raw.startswith(PRESET_PREFIX) and bare in PRESETS else raw
        try:
            return cls(config, be, max_batch=settings.max_batch, model_name=name)
        except BaseException:
            be.close()  # a refused setting must not leave engines and GPU memory behind
            raise

    def schedule_of(self, schedule: str | None, interval: int | None) -> str:
        """The schedule a run takes: the one asked for, else the model's default (its
        ``default_schedule``, the best of its quality/compute front)."""
        chosen = schedule or self.config.default_schedule
        if chosen not in SCHEDULES:  # first: the interval check below would blame the interval
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {chosen!r}")
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1
        ):
            raise ConfigError(f"interval must be a whole number >= 1, got {interval!r}")
        start = self.config.dtss.t_start
        if interval is not None and interval > start:
            raise ConfigError(
                f"interval {interval} is over {start}, the timestep every tile starts from: a "
                f"larger jump still takes 1 step; use an interval from 1 to {start}"
            )
        if interval is not None and chosen != "uniform":
            why = "" if schedule else f" (the model's default schedule is {chosen})"
            raise ConfigError(
                f"an interval applies to the uniform schedule only{why}; drop it or ask for "
                "schedule uniform"
            )
        if chosen == "content":
            self.config.require_content_rule(self.model_name)
        return chosen

    def policy(
        self, schedule: str | None, interval: int | None, lr_latents: np.ndarray | None = None
    ) -> StepPolicy:
        """The step policy of a schedule; ``content`` needs the image's encoded LR tiles."""
        schedule = self.schedule_of(schedule, interval)
        if schedule == "adaptive":
            return DTSSPolicy(self.config.dtss)
        if schedule == "uniform":
            return UniformPolicy(self.config.uniform_interval if interval is None else interval)
        if schedule == "content":
            if lr_latents is None:
                raise ValueError("the content schedule is chosen from the encoded LR tiles")
            return ContentPolicy.of(lr_latents, self.config.content)
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")

    def upscale(
        self,
        image: Any,
        *,
        schedule: str | None = None,
        interval: int | None = None,
        seed: int = 0,
        policy: StepPolicy | None = None,
        grouping: str = "regroup",
        progress: Progress | None = None,
        dtype: Any = None,
    ) -> tuple[Any, Report]:
        """Upscale ``image`` 4x. A PIL image comes back as a PIL image, upright (its EXIF
        orientation applied, as ``adadiff upscale`` does for a file); an array as float32
        [H, W, 3] in [0, 1]. ``dtype`` (``np.float32``, ``np.uint8`` or ``np.uint16``) asks
        for an array of that type instead (integers as 0..255 or 0..65535 levels): uint8 holds
        a large output in a quarter of float32's memory. ``policy`` overrides ``schedule`` (for
        experiments and tests). ``progress(stage, done, total)`` hears ``encode`` (tiles),
        ``denoise`` (timesteps travelled by all tiles together, a measure of the work done
        rather than a count of steps: adaptive tiles jump by varying intervals and exit early),
        ``tiles`` (tiles finished denoising; ``(0, N)`` before the first step) and
        ``decode`` (latent tiles)."""
        _output_dtype(image, dtype)  # a bad dtype is refused now, not after the denoising
        check_grouping(grouping)  # and a bad grouping before the encoding
        job = self.prepare(
            image, schedule=schedule, interval=interval, seed=seed, policy=policy, progress=progress
        )
        t0 = time.perf_counter()
        result = sample_tiles(
            job.lr_latents,
            self.nets(),
            job.policy,
            seed=seed,
            grouping=grouping,
            progress=progress,
            **self.sampler_options(),
        )
        job.seconds["denoise"] = time.perf_counter() - t0
        return self.finish(job, result, progress=progress, dtype=dtype)

    def nets(self) -> DenoiseNets:
        c = self.components
        return DenoiseNets(c.unet.denoise, c.mmle.score, c.pfj.modulate)

    def sampler_options(self) -> dict[str, Any]:
        """The model's keywords for ``sample_tiles`` and ``TilePool``."""
        cfg = self.config
        return {
            "noise": cfg.noise,
            "dtss": cfg.dtss,
            "metrics": cfg.mmle.metrics,
            "gain_dim": cfg.pfj.gain_dim,
            "max_batch": self.max_batch,
        }

    def prepare(
        self,
        image: Any,
        *,
        schedule: str | None = None,
        interval: int | None = None,
        seed: int = 0,
        policy: StepPolicy | None = None,
        reset_log: bool = True,
        progress: Progress | None = None,
    ) -> PreparedImage:
        """Tile and encode an image: the part of ``upscale`` before denoising.

        ``reset_log=False`` keeps the component call log running (several images in flight);
        ``progress`` hears ``("encode", tiles encoded, tiles)`` after every batch."""
        self.check_open()
        if (
            isinstance(seed, bool)
            or not isinstance(seed, numbers.Integral)
            or not 0 <= seed < SEED_LIMIT
        ):
            raise ConfigError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
        seed = int(seed)  # a numpy integer would not go into the report's JSON
        self.components.open_all()
        rgb, gray = to_rgb_and_gray(image)
        step_policy: StepPolicy | None = policy
        if policy is None:
            schedule_name = self.schedule_of(schedule, interval)
            if interval is not None:
                interval = int(interval)  # as the seed: a numpy integer fails the report's JSON
            if schedule_name != "content":  # that one waits for the encoded tiles
                step_policy = self.policy(schedule_name, interval)
        else:
            schedule_name = type(policy).__name__
        cfg = self.config
        if reset_log:
            self.log = self.components.new_log()
        start = time.perf_counter()
        h, w = rgb.shape[:2]
        grid = TileGrid(
            height=h * cfg.upscale,
            width=w * cfg.upscale,
            tile=cfg.tile_size,
            overlap=cfg.tile_overlap,
            multiple=cfg.vae_scale_factor,
        )
        lr_latents = self._encode(rgb, grid, progress)
        if step_policy is None:
            step_policy = self.policy(schedule_name, interval, lr_latents)
        return PreparedImage(
            like=image,
            rgb=rgb,
            gray=gray,
            size=(w, h),
            grid=grid,
            lr_latents=lr_latents,
            policy=step_policy,
            schedule=schedule_name,
            interval=interval,
            seed=seed,
            start=start,
            seconds={"encode": time.perf_counter() - start},
        )

    def _encode(
        self, rgb: np.ndarray, grid: TileGrid, progress: Progress | None = None
    ) -> np.ndarray:
        """VAE-encode every tile, one row of tiles at a time: the bicubic upscale is computed
        band by band (``bicubic_rows``), never held whole."""
        factor = self.config.upscale
        encoder = self.components.vae_encoder
        latents: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        total = len(grid)

        def flush() -> None:
            latents.append(encoder.encode(np.stack(pending) * 2.0 - 1.0))
            pending.clear()
            if progress:
                progress("encode", sum(len(x) for x in latents), total)

        if progress:  # at 0 first: the stage's clock (and ETA) start with its work
            progress("encode", 0, total)
        for y in grid.ys:
            strip = grid.padded_rows(lambda a, b: bicubic_rows(rgb, factor, a, b), y, y + grid.tile)
            for x in grid.xs:
                pending.append(strip[:, x : x + grid.tile].transpose(2, 0, 1))
                if len(pending) == self.max_batch:
                    flush()
        if pending:
            flush()
        return np.concatenate(latents)

    def finish(
        self,
        job: PreparedImage,
        result: SamplerResult,
        *,
        progress: Progress | None = None,
        dtype: Any = None,
    ) -> tuple[Any, Report]:
        """Merge and decode denoised tiles: the part of ``upscale`` after denoising;
        ``progress`` hears ``("decode", latent tiles decoded, latent tiles)``. ``dtype``: see
        ``upscale``."""
        cfg = self.config
        t0 = time.perf_counter()
        f = cfg.vae_scale_factor
        latent = merge_tiles(result.latents, job.grid.scaled(f))
        bands = decode_rows(
            latent,
            self.components.vae_decoder.decode,
            tile=cfg.latent_tile,
            overlap=cfg.tile_overlap // f,
            factor=f,
            max_batch=self.max_batch,
            progress=progress,
        )
        height, width = job.grid.height, job.grid.width
        pixels = _to_unit_rows(bands, height, width)
        if cfg.color_fix.kind != "none":
            # the input (as read at prepare: the caller may reuse its buffer meanwhile) rather
            # than its upscale held through denoising: memory stays low
            pixels = color_fix_rows(
                pixels, lambda a, b: bicubic_rows(job.rgb, cfg.upscale, a, b), cfg.color_fix, height
            )
        out_dtype = _output_dtype(job.like, dtype)
        out = np.empty((height, width, 3), dtype=out_dtype)
        for first, rows in pixels:
            if job.gray:  # the model adds faint colour; a gray photo stays gray
                rows = gray_output(rows)
            out[first : first + len(rows)] = _quantize(rows, out_dtype)
        seconds = dict(job.seconds)
        seconds["decode"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - job.start
        report = self._report(
            job.schedule, job.interval, job.seed, job.size, job.grid, result, seconds
        )
        w, h = job.size
        log.info(
            "upscaled %dx%d in %.2fs: %d tiles, %d UNet evaluations in %d calls",
            w,
            h,
            seconds["total"],
            len(job.grid),
            report.unet_evaluations,
            report.engine_calls,
        )
        if dtype is None and not isinstance(job.like, np.ndarray):
            return Image.fromarray(out), report
        return out, report

    def _report(
        self,
        schedule: str,
        interval: int | None,
        seed: int,
        size: tuple[int, int],
        grid: TileGrid,
        result: SamplerResult,
        seconds: dict[str, float],
    ) -> Report:
        w, h = size
        cfg = self.config
        return Report(
            schedule=schedule,
            interval=(cfg.uniform_interval if interval is None else interval)
            if schedule == "uniform"
            else None,
            seed=seed,
            model=self.model_name,
            backend=self.backend.describe(),
            input_size=(w, h),
            output_size=(w * cfg.upscale, h * cfg.upscale),
            tile_size=cfg.tile_size,
            tile_overlap=cfg.tile_overlap,
            grid=(grid.rows, grid.cols),
            tiles=len(grid),
            max_batch=self.max_batch,
            unet_evaluations=result.unet_evaluations,
            engine_calls=result.engine_calls,
            rounds=result.rounds,
            steps_per_tile=result.steps_per_tile,
            exits=result.exits,
            categories=result.categories,
            batches=result.batches,
            boxes=grid.boxes(),
            seconds={k: round(v, 4) for k, v in seconds.items()},
            components=self.log.as_dict(),
            color_fix=cfg.color_fix.kind,
            config_digest=cfg.digest(),
            dtss=_dtss_numbers(cfg) if schedule == "adaptive" else None,
        )

    def check_open(self) -> None:
        """``ConfigError`` once closed: its engines are gone, and a call into them would fail
        with no word of why."""
        if self.closed:
            raise ConfigError("this Upscaler was closed; open a new one (Upscaler.from_pretrained)")

    def close(self) -> None:
        self.closed = True
        self.components.close()
        self.backend.close()


def _dtss_numbers(cfg: ModelConfig) -> dict[str, Any]:
    data = cfg.to_dict()
    return {**data["dtss"], "metrics": data["mmle"]["metrics"]}


def _output_dtype(like: Any, dtype: Any) -> Any:
    if dtype is None:
        return np.float32 if isinstance(like, np.ndarray) else np.uint8
    chosen = np.dtype(dtype)
    if chosen not in (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ConfigError(f"dtype must be float32, uint8 or uint16, got {chosen}")
    return chosen.type


def _to_unit_rows(
    bands: Iterator[tuple[int, np.ndarray]], height: int, width: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Decoded [3, n, W'] bands in [-1, 1], cropped to the image, as [n, W, 3] in [0, 1]."""
    for first, rows in bands:
        if first >= height:
            break
        kept = rows[:, : height - first, :width].transpose(1, 2, 0)
        yield first, np.clip((kept + 1.0) / 2.0, 0.0, 1.0)


def _quantize(rows: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is np.float32:
        return rows
    maximum = np.iinfo(dtype).max
    return np.round(rows * float(maximum)).astype(dtype)
