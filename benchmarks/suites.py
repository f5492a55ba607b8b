"""What each suite measures (``quick``, ``full``) and the shared context the sections run in.

The context opens every backend variant once, exports the model to ONNX once, counts FLOPs once
per shape and prints one progress line per run with an estimate of the time left.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.config import RunSettings
from adadiff.errors import ConfigError

SECTIONS = ("schedules", "regrouping", "backends", "scaling", "fullsize")
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    label: str
    schedule: str  # "adaptive" or "uniform"
    interval: int | None = None


@dataclass(frozen=True, kw_only=True)
class Suite:
    name: str
    sections: tuple[str, ...]
    repeats: int
    photos: tuple[str, ...]  # scikit-image photos (adadiff.demo.PHOTOS)
    photo_size: int  # long side of the low-resolution input, pixels
    schedules: tuple[ScheduleSpec, ...]
    reference: str  # label of the schedule every other one is compared with
    regroup_photo: str
    regroup_size: int
    batches: tuple[int, ...]  # per-component latency
    scaling_sizes: tuple[int, ...]  # square inputs, pixels
    scaling_interval: int  # uniform schedule: the same work per tile at every size
    scaling_repeats: int = 1  # one run per size: the large ones last long enough to time once
    fullsize_size: int  # long side of the sd21-base adaptive run (full only)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        labels = [s.label for s in self.schedules]
        if self.reference not in labels:
            raise ConfigError(f"reference schedule {self.reference!r} is not one of {labels}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")


STANDARD_SCHEDULES = (
    ScheduleSpec(label="adaptive", schedule="adaptive"),
    ScheduleSpec(label="uniform-50", schedule="uniform", interval=20),
    ScheduleSpec(label="uniform-200", schedule="uniform", interval=5),
)

# Sized for the tiny model on 2 CPU cores, about 7-9 minutes there: 64 px photos are 6-9 tiles
# of 128 px (at 4x), a 256x256 input is 81 tiles (about 40 s at 50 steps).
QUICK = Suite(
    name="quick",
    sections=("schedules", "regrouping", "backends", "scaling"),
    repeats=3,
    photos=("astronaut", "chelsea", "coffee"),
    photo_size=64,
    schedules=STANDARD_SCHEDULES,
    reference="uniform-200",
    regroup_photo="astronaut",
    regroup_size=64,
    batches=(1, 2, 4, 8, 16),
    scaling_sizes=(128, 192, 256),
    scaling_interval=20,
    fullsize_size=32,
)

FULL = replace(
    QUICK,
    name="full",
    sections=SECTIONS,
    repeats=5,
    photos=("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"),
    photo_size=96,
    regroup_size=96,
    scaling_sizes=(128, 256, 512, 768, 1024, 1536),
)

SUITES = {"quick": QUICK, "full": FULL}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where and with what the suite runs (the command line)."""

    device: str = "cpu"
    backends: tuple[str, ...] = ("torch", "onnxruntime")
    model: str = "tiny"
    precision: str = "fp32"
    max_batch: int = 16
    threads: int | None = None  # torch and ONNX Runtime intra-op threads; None: their defaults
    seed: int = 0
    engines: Path | None = None  # an existing ONNX export of the model, to skip exporting
    keep_work: bool = False

    def __post_init__(self) -> None:
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        unknown = [b for b in self.backends if b not in BACKEND_NAMES]
        if unknown or not self.backends or len(set(self.backends)) != len(self.backends):
            raise ConfigError(
                f"--backend {','.join(self.backends)}: choose some of {', '.join(BACKEND_NAMES)}, "
                "each once"
            )
        if self.precision not in ("fp32", "fp16"):
            raise ConfigError(f"--precision must be fp32 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("fp16 runs on CUDA only; use --precision fp32 with --device cpu")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "backends": list(self.backends),
            "model": self.model,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "threads": self.threads,
            "seed": self.seed,
            "engines": None if self.engines is None else str(self.engines),
        }


@dataclass(frozen=True)
class Variant:
    """One backend at one precision, e.g. ``torch-fp16`` or ``onnxruntime``."""

    label: str
    backend: str
    precision: str


def variants(settings: Settings) -> list[Variant]:
    """The primary variant (first backend, --precision) first, then the others to compare.

    On CUDA torch and TensorRT run at fp32 and fp16; ONNX Runtime runs the fp32 export.
    """
    gpu = settings.device != "cpu"
    found: list[Variant] = []
    for name in settings.backends:
        precisions: tuple[str, ...] = (
            ("fp32", "fp16") if gpu and name != "onnxruntime" else ("fp32",)
        )
        if name == settings.backends[0]:
            precisions = (settings.precision, *(p for p in precisions if p != settings.precision))
        for p in precisions:
            label = f"{name}-{p}" if gpu else name
            found.append(Variant(label, name, p))
    return found


class Progress:
    """One line per finished unit of work, with elapsed time and a linear estimate of the rest.

    Units are weighted by their expected UNet evaluations, so a 200-step run counts four times
    a 50-step one.
    """

    def __init__(self, section: str, total_work: float, stream: Any = None) -> None:
        self.section = section
        self.total = max(total_work, 1e-9)
        self.done = 0.0
        self.start = time.perf_counter()
        self.stream = stream or sys.stdout

    def step(self, what: str, work: float) -> None:
        self.done += work
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        pct = 100.0 * self.done / self.total
        print(
            f"[{self.section}] {what}: {pct:3.0f}% after {elapsed:.0f}s, about {left:.0f}s left",
            file=self.stream,
            flush=True,
        )


@dataclass
class Context:
    suite: Suite
    settings: Settings
    work: Path
    _upscalers: dict[str, Any] = field(default_factory=dict)
    _exports: dict[str, Path] = field(default_factory=dict)
    own_work: bool = True  # a scratch folder made here is removed on close
    _counter: Any = None

    @classmethod
    def create(cls, suite: Suite, settings: Settings, work: Path | None = None) -> Context:
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        path = Path(work) if work else Path(tempfile.mkdtemp(prefix="adadiff-bench-"))
        path.mkdir(parents=True, exist_ok=True)
        return cls(suite=suite, settings=settings, work=path, own_work=work is None)

    @property
    def variants(self) -> list[Variant]:
        return variants(self.settings)

    @property
    def primary(self) -> Variant:
        return self.variants[0]

    def upscaler(self, variant: Variant | None = None) -> Any:
        """The Upscaler of ``variant`` (default: the primary one), opened and warmed up once."""
        from adadiff import Upscaler

        v = variant or self.primary
        if v.label not in self._upscalers:
            s = self.settings
            if v.backend == "tensorrt":
                check_tensorrt(s.device)
            engines = None
            if v.backend in ("onnxruntime", "tensorrt"):
                engines = self.export_dir(v.precision)
                if v.backend == "tensorrt":
                    self.build_tensorrt(engines)
            config, backend = open_backend(
                RunSettings(
                    model=s.model,
                    backend=v.backend,
                    device=s.device,
                    precision=v.precision,
                    engines=engines,
                    seed=s.seed,
                    max_batch=16,  # make_backend's profile default, not the suite's --max-batch
                    threads=s.threads,
                )
            )
            up = Upscaler(config, backend, max_batch=s.max_batch, model_name=s.model)
            warm_up(up)
            self._upscalers[v.label] = up
        return self._upscalers[v.label]

    def export_dir(self, precision: str) -> Path:
        """An ONNX export of the model at ``precision``: --engines when it matches, else one
        made here once (without the parity check, which the export tests own)."""
        if precision in self._exports:
            return self._exports[precision]
        given = self.settings.engines
        if given is not None:
            from adadiff.artifacts import ExportManifest

            if ExportManifest.load(given).precision == precision:
                self._exports[precision] = given
                return given
        from adadiff.export import ExportOptions, export_onnx

        out = self.work / f"onnx-{precision}"
        start = time.perf_counter()
        print(f"exporting {self.settings.model} to ONNX ({precision}) in {out}", flush=True)
        export_onnx(
            self.settings.model,
            out,
            ExportOptions(precision=precision, check_batches=()),
            seed=self.settings.seed,
        )
        print(f"exported in {time.perf_counter() - start:.0f}s", flush=True)
        self._exports[precision] = out
        return out

    def build_tensorrt(self, export_dir: Path) -> None:
        from adadiff.artifacts import BatchProfile
        from adadiff.export.tensorrt_build import BuildOptions, build_engines

        top = max(16, self.settings.max_batch, *self.suite.batches)
        build_engines(export_dir, BuildOptions(profiles=(BatchProfile(1, 8, top),)))

    def flop_counter(self) -> Any:
        from benchmarks.flops import FlopCounter, torch_models_of

        if self._counter is None:
            backend = self.upscaler().backend
            models = torch_models_of(backend, self.settings.model, self.settings.seed)
            self._counter = FlopCounter(models)
        return self._counter

    def image(self, name: str, long_side: int) -> np.ndarray:
        from adadiff.demo import photo

        return photo(name, long_side).astype(np.float32) / 255.0

    def close(self) -> None:
        for up in self._upscalers.values():
            up.close()
        self._upscalers.clear()
        if self.own_work and not self.settings.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def open_backend(settings: RunSettings) -> tuple[Any, Any]:
    """make_backend, except that --threads caps ONNX Runtime's intra-op threads only, so torch
    and ONNX Runtime are compared on the same number of cores (the suites set torch's)."""
    from adadiff.engines.factory import make_backend

    if settings.backend == "onnxruntime" and settings.threads:
        return make_backend(settings)
    return make_backend(replace(settings, threads=None))


def warm_up(upscaler: Any) -> None:
    """Open every component and run it once at batch 1, so no timed run pays for loading."""
    from adadiff.specs import COMPONENTS

    for name in COMPONENTS:
        facade = upscaler.components.get(name)
        facade.run(**facade.spec.sample_inputs(1))


def check_tensorrt(device: str) -> None:
    """Fail before exporting anything when TensorRT cannot run here."""
    from adadiff.artifacts import import_tensorrt
    from adadiff.cuda import CudaDevice
    from adadiff.errors import BackendUnavailableError

    if device == "cpu":
        raise BackendUnavailableError("TensorRT runs on CUDA only; pass --device cuda")
    import_tensorrt()
    CudaDevice(device)


def tiles_of(config: Any, width: int, height: int) -> int:
    from adadiff.runtime.tiling import TileGrid

    grid = TileGrid(
        height=height * config.upscale,
        width=width * config.upscale,
        tile=config.tile_size,
        overlap=config.tile_overlap,
        multiple=config.vae_scale_factor,
    )
    return len(grid)


def child_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI runs torch (adadiff.threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env
