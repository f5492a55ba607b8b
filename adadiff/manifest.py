"""``manifest.json`` of an exported ONNX folder: what was exported, from which model, and how.

Export writes it; the ONNX Runtime backend reads and checks it. Nothing here imports torch or
onnxruntime: a manifest is plain JSON plus file hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from adadiff.config import ModelConfig, Precision
from adadiff.errors import ConfigError, EngineMismatchError, ModelFolderError
from adadiff.imageio import write_bytes_atomic
from adadiff.specs import ModelSpec, component_specs

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "adadiff-onnx"
MANIFEST_VERSION = 1
PRECISIONS = (Precision.FP32.value, Precision.FP16.value)  # what an export holds
_CHUNK = 8 << 20

REEXPORT = "re-export with `adadiff export --model MODEL -o {folder}`"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fp:
        while block := fp.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


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


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a component, relative to the export folder."""

    path: str
    size: int
    sha256: str

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
                    "spec": c.spec,
                }
                for name, c in self.components.items()
            },
            "config": self.config,
        }

    def save(self, folder: Path) -> Path:
        blob = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        return write_bytes_atomic(Path(folder) / MANIFEST_FILE, blob)

    @classmethod
    def load(cls, folder: str | Path) -> ExportManifest:
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise ModelFolderError(
                f"engines folder {folder} does not exist; create it with "
                f"`adadiff export --model MODEL -o {folder}`"
            )
        if not path.is_file():
            raise ModelFolderError(
                f"{folder} has no {MANIFEST_FILE}, so it is not an adadiff ONNX export; "
                f"create one with `adadiff export --model MODEL -o {folder}`"
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
        if data.get("version") != MANIFEST_VERSION:
            raise EngineMismatchError(
                f"{path} has manifest version {data.get('version')}, this adadiff reads version "
                f"{MANIFEST_VERSION}; {_fix(folder)}"
            )
        try:
            return cls(**data)
        except (TypeError, ConfigError) as exc:
            raise ModelFolderError(f"{path} is damaged ({exc}); {_fix(folder)}") from exc

    # -- checks -------------------------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        """The exported model's config, after checking it still hashes to the recorded digest."""
        cfg = ModelConfig.from_dict(self.config)
        if cfg.digest() != self.config_digest:
            raise EngineMismatchError(
                f"the config in {MANIFEST_FILE} hashes to {cfg.digest()}, the manifest records "
                f"{self.config_digest}: the manifest was edited or written by another adadiff "
                "version; re-export the model"
            )
        return cfg

    def check_model(self, config: ModelConfig, model: str) -> None:
        """Refuse a model whose config is not the one these files were exported from."""
        if config.digest() != self.config_digest:
            raise EngineMismatchError(
                f"--model {model} (config {config.name!r}, digest {config.digest()}) is not the "
                f"model these ONNX files were exported from ({self.model}, digest "
                f"{self.config_digest}); give that model with --model (or none, from Python), "
                f"or export this one with `adadiff export --model {model} -o FOLDER`"
            )

    def check_specs(self, folder: Path) -> None:
        """Exported I/O must still match what this adadiff's specs expect."""
        specs = component_specs(self.model_config())
        for name, entry in self.components.items():
            if name not in specs:
                raise EngineMismatchError(
                    f"{folder}/{MANIFEST_FILE} lists unknown component {name!r}; "
                    f"expected some of {sorted(specs)}; {_fix(folder)}"
                )
            if entry.spec != spec_to_dict(specs[name]):
                raise EngineMismatchError(
                    f"{name} in {folder} was exported with inputs/outputs {entry.spec['inputs']} "
                    f"-> {entry.spec['outputs']}, this adadiff expects "
                    f"{spec_to_dict(specs[name])['inputs']}; {_fix(folder)}"
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
                f"{_fix(folder)}"
            )

    def entry(self, component: str, folder: Path | str = "the engines folder") -> ComponentEntry:
        try:
            return self.components[component]
        except KeyError:
            raise ModelFolderError(
                f"{folder} holds {sorted(self.components)} but not {component!r}; export it with "
                f"`adadiff export --model MODEL -o {folder} --components {component}`"
            ) from None


def _fix(folder: Path) -> str:
    return REEXPORT.format(folder=folder)


def library_versions(names: Mapping[str, str]) -> dict[str, str]:
    """Installed versions of the given distributions (import name -> distribution name)."""
    found: dict[str, str] = {}
    for label, dist in names.items():
        try:
            found[label] = version(dist)
        except PackageNotFoundError:
            continue
    return found
