"""TensorRT engine folders: batch profiles, cache keys and the engine manifest.

An engine belongs to one GPU architecture and one TensorRT version. ``adadiff build`` writes
``ENGINES/tensorrt/manifest.json`` beside the engines, keyed on the ONNX file's sha256, the
TensorRT version, the compute capability, the batch profiles and the precision; loading checks
every one of them and refuses a mismatch with the command that rebuilds. Nothing here imports
tensorrt, so all of it is tested on machines without a GPU.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adadiff import manifest
from adadiff.errors import (
    BackendUnavailableError,
    ConfigError,
    EngineMismatchError,
    ModelFolderError,
)
from adadiff.imageio import write_bytes_atomic
from adadiff.specs import ModelSpec

TRT_DIR = "tensorrt"
TRT_MANIFEST = "manifest.json"
TRT_FORMAT = "adadiff-tensorrt"
TRT_VERSION = 1
TIMING_CACHE = "timing.cache"

INSTALL_HINT = (
    'pip install "adadiff[gpu-cu12]" (or "adadiff[gpu-cu13]": the CUDA major of your torch build) '
    "on a machine with an NVIDIA driver; the TensorRT wheels are on PyPI (see README, GPU)"
)


@dataclass(frozen=True, order=True)
class BatchProfile:
    """One TensorRT optimisation profile over the tile batch: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"a batch profile needs 1 <= min <= opt <= max, got {self}")

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def parse_profiles(text: str) -> tuple[BatchProfile, ...]:
    """``"1:4:8,9:12:16"`` -> profiles, sorted, non-overlapping."""
    profiles = []
    for part in text.split(","):
        pieces = part.strip().split(":")
        try:
            numbers = [int(p) for p in pieces]
        except ValueError:
            numbers = []
        if len(numbers) != 3:
            raise ConfigError(
                f"cannot read batch profile {part.strip()!r}; write MIN:OPT:MAX, several separated "
                "by commas, e.g. 1:4:8,9:12:16"
            )
        profiles.append(BatchProfile(*numbers))
    return check_profiles(profiles)


def check_profiles(profiles: Sequence[BatchProfile]) -> tuple[BatchProfile, ...]:
    """Sorted profiles that cover every batch from 1 to the largest max, without gaps or overlap:
    the runtime sends any batch in that range (the last chunk of a round may be a single tile)."""
    ordered = tuple(sorted(profiles))
    if not ordered:
        raise ConfigError("at least one batch profile is needed")
    for a, b in itertools.pairwise(ordered):
        if b.min <= a.max:
            raise ConfigError(f"batch profiles {a} and {b} overlap; give disjoint batch ranges")
        if b.min != a.max + 1:
            raise ConfigError(
                f"batch profiles {a} and {b} leave batches {a.max + 1} to {b.min - 1} uncovered; "
                f"start the second at {a.max + 1} (e.g. {a},{a.max + 1}:{b.opt}:{b.max})"
            )
    if ordered[0].min != 1:
        raise ConfigError(
            f"the first batch profile {ordered[0]} starts at {ordered[0].min}, but a round can "
            f"end with a single tile; start it at 1 (e.g. 1:{ordered[0].opt}:{ordered[0].max})"
        )
    return ordered


def profile_for(profiles: Sequence[BatchProfile], batch: int) -> int:
    """Index of the profile that serves ``batch``; the runtime chunks above the largest max."""
    for i, p in enumerate(profiles):
        if p.covers(batch):
            return i
    ranges = ", ".join(str(p) for p in profiles)
    raise EngineMismatchError(
        f"batch {batch} is outside every engine profile ({ranges}); use --max-batch "
        f"{max(p.max for p in profiles)} or rebuild with `adadiff build --profiles ...`"
    )


def profile_shapes(
    spec: ModelSpec, profile: BatchProfile
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) shape for one profile, from the component's spec."""
    return spec.profile(profile.min, profile.opt, profile.max)


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.9", "9.0"


def import_tensorrt() -> Any:
    """tensorrt, or one line saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(f"TensorRT is not installed; {INSTALL_HINT}") from None
    return trt


def export_digest(files: Sequence[Any]) -> str:
    """One sha256 over every file of an exported component (the .onnx and its external data),
    from the hashes recorded at export: retrained weights in ``unet.onnx.data`` change it."""
    blob = json.dumps(sorted((f.path, f.sha256) for f in files)).encode()
    return hashlib.sha256(blob).hexdigest()


def file_stamps(folder: Path, files: Sequence[Any]) -> dict[str, list[int]]:
    """path -> [size, mtime_ns] of each exported file, read without hashing."""
    stamps = {}
    for f in files:
        st = (Path(folder) / f.path).stat()
        stamps[f.path] = [st.st_size, st.st_mtime_ns]
    return stamps


def engine_key(
    *,
    onnx_sha256: str,
    tensorrt: str,
    gpu: str,
    compute_capability: str,
    profiles: Sequence[BatchProfile],
    precision: str,
    tf32: bool = False,
) -> str:
    """The cache key of an engine: any change in these inputs needs a new build.

    ``onnx_sha256`` is ``export_digest`` of all the component's files; ``gpu`` is the device name
    (timings are tuned for one card even where the architecture matches)."""
    blob = json.dumps(
        {
            "onnx": onnx_sha256,
            "tensorrt": tensorrt,
            "gpu": gpu,
            "cc": compute_capability,
            "profiles": [str(p) for p in profiles],
            "precision": precision,
            "tf32": tf32,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class EngineEntry:
    component: str
    file: str
    key: str
    onnx_sha256: str
    precision: str
    profiles: tuple[BatchProfile, ...]
    size: int = 0
    build_seconds: float = 0.0
    tf32: bool = False
    # path -> [size, mtime_ns] of the exported files when the engine was built: a start-up
    # compares these instead of hashing a 1.7 GB UNet again (``check_files``).
    stamps: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        profiles = tuple(
            p if isinstance(p, BatchProfile) else BatchProfile(*p) for p in self.profiles
        )
        object.__setattr__(self, "profiles", check_profiles(profiles))

    @property
    def max_batch(self) -> int:
        return max(p.max for p in self.profiles)


@dataclass(frozen=True, kw_only=True)
class EngineManifest:
    tensorrt: str
    device: DeviceInfo
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    config_digest: str = ""
    format: str = TRT_FORMAT
    version: int = TRT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.device, Mapping):
            object.__setattr__(self, "device", DeviceInfo(**self.device))
        engines = {
            k: v if isinstance(v, EngineEntry) else EngineEntry(**v)
            for k, v in self.engines.items()
        }
        object.__setattr__(self, "engines", engines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry in data["engines"].values():
            entry["profiles"] = [[p["min"], p["opt"], p["max"]] for p in entry["profiles"]]
        return data

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        blob = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        return write_bytes_atomic(folder / TRT_MANIFEST, blob)

    @classmethod
    def load(cls, folder: Path) -> EngineManifest:
        path = Path(folder) / TRT_MANIFEST
        if not path.is_file():
            raise ModelFolderError(
                f"{path} is missing: no TensorRT engines were built here; run "
                f"`adadiff build {Path(folder).parent}` on this machine"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != TRT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {TRT_FORMAT!r}")
            if data.get("version") != TRT_VERSION:
                raise ValueError(f"version {data.get('version')}, expected {TRT_VERSION}")
            return cls(**data)
        except (ValueError, TypeError, ConfigError) as exc:
            raise ModelFolderError(
                f"{path} is not a readable engine manifest ({exc}); rebuild with "
                f"`adadiff build {Path(folder).parent}`"
            ) from exc

    def check_runtime(self, tensorrt: str, device: DeviceInfo, export_dir: Path) -> list[str]:
        """Refuse engines built for another TensorRT or GPU; return warnings worth logging."""
        rebuild = f"rebuild them here with `adadiff build {export_dir}`"
        if tensorrt != self.tensorrt:
            raise EngineMismatchError(
                f"the engines in {export_dir / TRT_DIR} were built with TensorRT {self.tensorrt}, "
                f"this machine has TensorRT {tensorrt}; engines only load in the version that "
                f"built them: {rebuild}"
            )
        if device.compute_capability != self.device.compute_capability:
            raise EngineMismatchError(
                f"the engines in {export_dir / TRT_DIR} were built for {self.device.name} "
                f"(compute capability {self.device.compute_capability}), this GPU is "
                f"{device.name} (compute capability {device.compute_capability}); {rebuild}"
            )
        if device.name != self.device.name:
            return [
                f"engines were built on {self.device.name} and run on {device.name} (same "
                "compute capability): they load, but timings were tuned for the other card"
            ]
        return []

    def check_onnx(self, component: str, onnx_sha256: str, export_dir: Path) -> EngineEntry:
        entry = self.engines.get(component)
        if entry is None:
            raise ModelFolderError(
                f"no TensorRT engine for {component} in {export_dir / TRT_DIR}; build it with "
                f"`adadiff build {export_dir} --components {component}`"
            )
        if entry.onnx_sha256 != onnx_sha256:
            raise EngineMismatchError(
                f"the {component} engine was built from another ONNX file (sha256 "
                f"{entry.onnx_sha256[:12]}..., the export now has {onnx_sha256[:12]}...); "
                f"rebuild with `adadiff build {export_dir} --components {component}`"
            )
        return entry

    def check_export(self, component: str, files: Sequence[Any], export_dir: Path) -> EngineEntry:
        """The engine of ``component``, after checking its exported files (``FileEntry``s) are the
        ones it was built from. A file whose size and mtime match the build's stamp is not hashed
        again; any other is hashed and compared with the export manifest."""
        entry = self.check_onnx(component, export_digest(files), export_dir)
        for f in files:
            path = Path(export_dir) / f.path
            if not path.is_file():
                raise EngineMismatchError(
                    f"{path} is missing; re-export with `adadiff export ... -o {export_dir}` and "
                    f"rebuild with `adadiff build {export_dir}`"
                )
            st = path.stat()
            if entry.stamps.get(f.path) == [st.st_size, st.st_mtime_ns]:
                continue
            if st.st_size != f.size or manifest.sha256_file(path) != f.sha256:
                raise EngineMismatchError(
                    f"{path} changed since export (size or sha256 differs from its manifest); "
                    f"re-export with `adadiff export ... -o {export_dir}` and rebuild with "
                    f"`adadiff build {export_dir} --components {component}`"
                )
        return entry
