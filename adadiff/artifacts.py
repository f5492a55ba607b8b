"""The records of adadiff's artifact folders, read and checked: an ONNX export's
``manifest.json`` (what was exported, from which model, and how) and a TensorRT engine folder's
``tensorrt/manifest.json`` (batch profiles, cache keys: one GPU architecture and one TensorRT
version per engine). Backends read them here and refuse a mismatch with the command that fixes
it; ``adadiff.export.manifest`` writes them. Nothing here imports torch, onnxruntime or
tensorrt: a manifest is plain JSON plus file hashes, so all of it is tested without a GPU.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from adadiff.config import CONFIG_FILE, ModelConfig, Precision
from adadiff.errors import (
    BackendUnavailableError,
    ConfigError,
    EngineMismatchError,
    ModelFolderError,
    shell_arg,
)
from adadiff.specs import COMPONENTS, ModelSpec, component_specs

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "adadiff-onnx"
MANIFEST_VERSION = 1
PRECISIONS = (Precision.FP32.value, Precision.FP16.value)  # what an export holds
_CHUNK = 8 << 20

REEXPORT = "re-export with `adadiff export --model MODEL -o {folder}{precision}`"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fp:
        while block := fp.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _manifest_shape_problem(data: dict[str, Any]) -> str:
    """What is missing or of the wrong type in a manifest's JSON (edited by hand, cut short),
    so that it reads as damaged rather than failing later with a traceback; "" if fine."""
    if not isinstance(data.get("config"), dict):
        return "'config' must be the model's adadiff.json"
    components = data.get("components")
    if not isinstance(components, dict):
        return "'components' must map component names to entries"
    for name, entry in components.items():
        if not isinstance(entry, dict):
            return f"component {name!r} must be an entry"
        spec = entry.get("spec")
        if not isinstance(spec, dict) or not {"inputs", "outputs"} <= set(spec):
            return f"component {name!r} has no 'spec' with inputs and outputs"
        files = entry.get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            return f"component {name!r} must list its files"
    return ""


# The weight files a model folder is loaded from (models.bundle writes and reads these).
WEIGHT_FILES = (
    "mmle.safetensors",
    "pfj.safetensors",
    "text_embedding.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def weights_digest(folder: Path) -> str:
    """A digest of a model folder's config and weight files (names and contents): what tells
    one set of weights from another where the config alone does not (a retrained folder).
    Only the files the loader reads count, so a backup copy kept inside the folder does not."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        path = folder / name
        if path.is_file():
            digest.update(f"{name}:{sha256_file(path)};".encode())
    return digest.hexdigest()[:16]


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The parts of a spec an exported file depends on, as plain JSON."""

    def tensors(ts: Iterable) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]

    return {
        "inputs": tensors(spec.inputs),
        "outputs": tensors(spec.outputs),
        "fp32_tolerance": {"atol": spec.fp32_tolerance.atol, "rtol": spec.fp32_tolerance.rtol},
        "fp16_tolerance": {"atol": spec.fp16_tolerance.atol, "rtol": spec.fp16_tolerance.rtol},
    }


def _check_file_name(name: str, what: str) -> None:
    """A manifest names files inside its own folder only: a path that leads elsewhere (absolute,
    ``..``, a sub-folder) would be read, or deleted as stale, outside it."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{what} manifest names the file {name!r}; expected a plain file name")


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a component, relative to the export folder."""

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        _check_file_name(self.path, "export")

    @classmethod
    def of(cls, folder: Path, relative: str) -> FileEntry:
        path = Path(folder) / relative
        return cls(path=relative, size=path.stat().st_size, sha256=sha256_file(path))


@dataclass(frozen=True, kw_only=True)
class ComponentEntry:
    """One exported component: its ONNX file (first in ``files``) and any external data."""

    name: str
    files: tuple[FileEntry, ...]
    precision: str  # the VAE stays fp32 inside an fp16 export
    spec: dict[str, Any]
    nodes: dict[str, int] = field(default_factory=dict)  # node counts: exported, cleaned, final
    seconds: dict[str, float] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)  # ONNX Runtime against torch at export
    # sha256 of the exported module's weights, so that a later partial export into the same
    # folder keeps this component only if it came from the same weights ("" in older manifests)
    weights: str = ""

    def __post_init__(self) -> None:
        files = tuple(f if isinstance(f, FileEntry) else FileEntry(**f) for f in self.files)
        object.__setattr__(self, "files", files)
        if not files:
            raise ConfigError(f"manifest entry {self.name!r} lists no files")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"manifest entry {self.name!r} has precision {self.precision!r}; "
                f"expected one of {PRECISIONS}"
            )

    @property
    def onnx_file(self) -> str:
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, kw_only=True)
class ExportManifest:
    model: str  # where the weights came from (a folder, or a preset with its init seed)
    config: dict[str, Any]  # ModelConfig.to_dict(): an export folder needs no model folder
    config_digest: str
    precision: str
    opset: int
    exporter: str
    libraries: dict[str, str]
    components: dict[str, ComponentEntry]
    created: str = ""
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    # weights_digest of the model folder exported ("" for a random init, or older manifests):
    # a folder retrained in place keeps its config, so the config digest alone cannot tell
    model_weights: str = ""

    def __post_init__(self) -> None:
        comps = {
            name: c if isinstance(c, ComponentEntry) else ComponentEntry(**c)
            for name, c in self.components.items()
        }
        object.__setattr__(self, "components", comps)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    # -- reading and writing ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "model": self.model,
            "model_weights": self.model_weights,
            "config_digest": self.config_digest,
            "precision": self.precision,
            "opset": self.opset,
            "exporter": self.exporter,
            "libraries": dict(self.libraries),
            "components": {
                name: {
                    "name": c.name,
                    "precision": c.precision,
                    "files": [vars(f) for f in c.files],
                    "nodes": dict(c.nodes),
                    "seconds": dict(c.seconds),
                    "check": dict(c.check),
                    "weights": c.weights,
                    "spec": c.spec,
                }
                for name, c in self.components.items()
            },
            "config": self.config,
        }

    @classmethod
    def load(cls, folder: str | Path) -> ExportManifest:
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if folder.is_file():
            raise ModelFolderError(
                f"{folder} is a file; --engines takes the export's folder (the one holding "
                f"{MANIFEST_FILE}), e.g. {folder.parent}"
            )
        if not folder.is_dir():
            raise ModelFolderError(
                f"engines folder {folder} does not exist; create it with "
                f"`adadiff export --model MODEL -o {shell_arg(folder)}`"
            )
        if not path.is_file():
            raise ModelFolderError(
                f"{folder} has no {MANIFEST_FILE}, so it is not an adadiff ONNX export; "
                f"create one with `adadiff export --model MODEL -o {shell_arg(folder)}`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFolderError(f"{path} is not valid JSON ({exc}); {_fix(folder)}") from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ModelFolderError(
                f"{path} is not an adadiff ONNX manifest (format "
                f"{data.get('format') if isinstance(data, dict) else None!r}, expected "
                f"{MANIFEST_FORMAT!r}); {_fix(folder)}"
            )
        precision = str(data.get("precision"))  # for the re-export command only
        if data.get("version") != MANIFEST_VERSION:
            raise EngineMismatchError(
                f"{path} has manifest version {data.get('version')}, this adadiff reads version "
                f"{MANIFEST_VERSION}; {_fix(folder, precision)}"
            )
        problem = _manifest_shape_problem(data)
        if problem:
            raise ModelFolderError(f"{path} is damaged ({problem}); {_fix(folder, precision)}")
        try:
            return cls(**data)
        except (TypeError, ConfigError) as exc:
            raise ModelFolderError(f"{path} is damaged ({exc}); {_fix(folder, precision)}") from exc

    # -- checks -------------------------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        """The exported model's config, after checking it still hashes to the recorded digest."""
        try:
            cfg = ModelConfig.from_dict(self.config)
        except ConfigError as exc:
            raise EngineMismatchError(
                f"the model config in the export's {MANIFEST_FILE} is not a valid adadiff.json "
                f"({exc}): the manifest was edited or damaged; re-export the model"
            ) from exc
        if cfg.digest() != self.config_digest:
            raise EngineMismatchError(
                f"the config in {MANIFEST_FILE} hashes to {cfg.digest()}, the manifest records "
                f"{self.config_digest}: the manifest was edited or written by another adadiff "
                "version; re-export the model"
            )
        return cfg

    def check_model(self, config: ModelConfig, model: str, folder: Path | None = None) -> None:
        """Refuse a model whose config, or whose weights (``folder``: the model folder, None for
        a random init), are not the ones these files were exported from."""
        # the folder the export was made from: its config was edited since (a calibration)
        same = folder is not None and Path(folder).resolve() == Path(self.model).resolve()
        if config.digest() != self.config_digest and same:
            raise EngineMismatchError(
                f"--model {model} is the folder these ONNX files were exported from, but its "
                f"{CONFIG_FILE} was changed since (digest {config.digest()}, then "
                f"{self.config_digest}; adadiff calibrate changes it): export it again with "
                f"`adadiff export --model {shell_arg(model)} -o FOLDER`, or drop --model to run "
                "the export with the config it recorded"
            )
        if config.digest() != self.config_digest:
            raise EngineMismatchError(
                f"--model {model} (config {config.name!r}, digest {config.digest()}) is not the "
                f"model these ONNX files were exported from ({self.model}, digest "
                f"{self.config_digest}); give that model with --model (or none, from Python), "
                f"or export this one with `adadiff export --model {shell_arg(model)} -o FOLDER`"
            )
        if folder is not None and self.model_weights:
            own = weights_digest(folder)
            if own != self.model_weights:
                # "retrained" only of the folder the export was made from: another folder of the
                # same config (a preset's shipped weights, a copy) was not changed
                why = (
                    "it was retrained or edited since; export it again"
                    if same
                    else "it is another model of the same config; export it"
                )
                raise EngineMismatchError(
                    f"--model {model} has other weights (digest {own}) than the ones these ONNX "
                    f"files were exported from ({self.model}, digest {self.model_weights}): {why} "
                    f"with `adadiff export --model "
                    f"{shell_arg(model)} -o FOLDER`, or drop --model to run the export as it is"
                )

    def check_specs(self, folder: Path) -> None:
        """Exported I/O must still match what this adadiff's specs expect."""
        specs = component_specs(self.model_config())
        for name, entry in self.components.items():
            if name not in specs:
                raise EngineMismatchError(
                    f"{folder}/{MANIFEST_FILE} lists unknown component {name!r}; "
                    f"expected some of {sorted(specs)}; {_fix(folder, self.precision)}"
                )
            want = spec_to_dict(specs[name])
            if entry.spec != want:
                # name only the parts that differ: the whole spec of both reads as the same text
                # when a tolerance or an output is what changed
                differ = "; ".join(
                    f"{key} {entry.spec.get(key)}, this adadiff expects {want[key]}"
                    for key in want
                    if entry.spec.get(key) != want[key]
                )
                raise EngineMismatchError(
                    f"{name} in {folder} was exported with {differ}; {_fix(folder, self.precision)}"
                )

    def verify_files(self, folder: Path, components: Iterable[str] | None = None) -> None:
        """Every listed file must exist with its recorded size and sha256."""
        folder = Path(folder)
        problems: list[str] = []
        for name in self.components if components is None else components:
            for f in self.entry(name, folder).files:
                path = folder / f.path
                if not path.is_file():
                    problems.append(f"{f.path} is missing")
                elif path.stat().st_size != f.size:
                    problems.append(f"{f.path} has {path.stat().st_size} bytes, expected {f.size}")
                elif sha256_file(path) != f.sha256:
                    problems.append(f"{f.path} changed since export (sha256 differs)")
        if problems:
            raise EngineMismatchError(
                f"{folder} does not match its {MANIFEST_FILE}: {'; '.join(problems)}; "
                f"{_fix(folder, self.precision)}"
            )

    def entry(self, component: str, folder: Path | str = "the engines folder") -> ComponentEntry:
        try:
            return self.components[component]
        except KeyError:
            # name every missing component: one export run, not one per component
            missing = [c for c in COMPONENTS if c not in self.components] or [component]
            which = ",".join(missing if component in missing else [component])
            raise ModelFolderError(
                f"{folder} holds {sorted(self.components)} but not {component!r}; export "
                f"{'them' if ',' in which else 'it'} with `adadiff export --model MODEL -o "
                f"{shell_arg(folder)} --components {which}"
                f"{' --precision fp16' if self.precision == 'fp16' else ''}`"
            ) from None


def _fix(folder: Path, precision: str = Precision.FP32.value) -> str:
    """The command that exports ``folder`` again; at its precision, since an fp16 export
    redone at the default fp32 is refused by the ``--precision fp16`` it was made for."""
    half = precision == Precision.FP16.value
    return REEXPORT.format(folder=shell_arg(folder), precision=" --precision fp16" if half else "")


def library_versions(names: Mapping[str, str]) -> dict[str, str]:
    """Installed versions of the given distributions (import name -> distribution name)."""
    found: dict[str, str] = {}
    for label, dist in names.items():
        try:
            found[label] = version(dist)
        except PackageNotFoundError:
            continue
    return found


# --------------------------------------------------------------------------------------------
# TensorRT engine folders
# --------------------------------------------------------------------------------------------

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
        _check_file_name(self.file, "engine")
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

    @classmethod
    def load(cls, folder: Path) -> EngineManifest:
        path = Path(folder) / TRT_MANIFEST
        if not path.is_file():
            raise ModelFolderError(
                f"{path} is missing: no TensorRT engines were built here; run "
                f"`adadiff build {shell_arg(Path(folder).parent)}` on this machine"
            )
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("it is not a JSON object")
            for key in ("engines", "device"):
                if not isinstance(data.get(key), dict):
                    raise ValueError(f"{key!r} must be a JSON object")
            if not all(isinstance(e, dict) for e in data["engines"].values()):
                raise ValueError("each engine must be a JSON object")
            if data.get("format") != TRT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {TRT_FORMAT!r}")
            if data.get("version") != TRT_VERSION:
                raise ValueError(f"version {data.get('version')}, expected {TRT_VERSION}")
            return cls(**data)
        except (ValueError, TypeError, ConfigError) as exc:
            raise ModelFolderError(
                f"{path} is not a readable engine manifest ({exc}); rebuild with "
                f"`adadiff build {shell_arg(Path(folder).parent)}`"
            ) from exc

    def check_runtime(self, tensorrt: str, device: DeviceInfo, export_dir: Path) -> list[str]:
        """Refuse engines built for another TensorRT or GPU; return warnings worth logging."""
        rebuild = f"rebuild them here with `adadiff build {shell_arg(export_dir)}`"
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
                f"`adadiff build {shell_arg(export_dir)} --components {component}`"
            )
        if entry.onnx_sha256 != onnx_sha256:
            raise EngineMismatchError(
                f"the {component} engine was built from another ONNX file (sha256 "
                f"{entry.onnx_sha256[:12]}..., the export now has {onnx_sha256[:12]}...); "
                f"rebuild with `adadiff build {shell_arg(export_dir)} --components {component}`"
            )
        return entry

    def check_export(self, component: str, files: Sequence[Any], export_dir: Path) -> EngineEntry:
        """The engine of ``component``, after checking its exported files (``FileEntry``s) are the
        ones it was built from. A file whose size and mtime match the build's stamp is not hashed
        again; any other is hashed and compared with the export manifest."""
        entry = self.check_onnx(component, export_digest(files), export_dir)
        where = shell_arg(export_dir)
        for f in files:
            path = Path(export_dir) / f.path
            if not path.is_file():
                raise EngineMismatchError(
                    f"{path} is missing; re-export with `adadiff export ... -o {where}` and "
                    f"rebuild with `adadiff build {where}`"
                )
            st = path.stat()
            if entry.stamps.get(f.path) == [st.st_size, st.st_mtime_ns]:
                continue
            if st.st_size != f.size or sha256_file(path) != f.sha256:
                raise EngineMismatchError(
                    f"{path} changed since export (size or sha256 differs from its manifest); "
                    f"re-export with `adadiff export ... -o {where}` and rebuild with "
                    f"`adadiff build {where} --components {component}`"
                )
        return entry
