"""Write the artifact folders' manifests: an export's (files and hashes, specs, versions, the
model's config) and a TensorRT engine folder's.

Reading and checking them is ``adadiff.artifacts`` (no torch), which the engines use.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adadiff.artifacts import (
    MANIFEST_FILE,
    TRT_MANIFEST,
    ComponentEntry,
    EngineManifest,
    ExportManifest,
    FileEntry,
    library_versions,
    spec_to_dict,
)
from adadiff.config import ModelConfig
from adadiff.imageio import write_bytes_atomic
from adadiff.specs import ModelSpec

# Label -> distribution name: what produced and what checked the files.
LIBRARIES = {
    "adadiff": "adadiff",
    "torch": "torch",
    "diffusers": "diffusers",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "polygraphy": "polygraphy",
    "onnx_graphsurgeon": "onnx-graphsurgeon",
    "numpy": "numpy",
}


def component_entry(
    folder: Path,
    spec: ModelSpec,
    files: list[str],
    *,
    precision: str,
    nodes: dict[str, int],
    seconds: dict[str, float],
    check: dict[str, Any],
    weights: str = "",
) -> ComponentEntry:
    return ComponentEntry(
        weights=weights,
        name=spec.name,
        files=tuple(FileEntry.of(folder, f) for f in files),
        precision=precision,
        spec=spec_to_dict(spec),
        nodes=dict(nodes),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        check=dict(check),
    )


def build_manifest(
    *,
    config: ModelConfig,
    source: str,
    precision: str,
    opset: int,
    exporter: str,
    components: dict[str, ComponentEntry],
    model_weights: str = "",
) -> ExportManifest:
    return ExportManifest(
        model=source,
        model_weights=model_weights,
        config=config.to_dict(),
        config_digest=config.digest(),
        precision=precision,
        opset=opset,
        exporter=exporter,
        libraries=library_versions(LIBRARIES),
        components=dict(components),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def save_export_manifest(manifest: ExportManifest, folder: Path) -> Path:
    """``folder/manifest.json``, written atomically."""
    return write_bytes_atomic(Path(folder) / MANIFEST_FILE, _json(manifest.to_dict()))


def save_engine_manifest(manifest: EngineManifest, folder: Path) -> Path:
    """``folder/manifest.json`` of a TensorRT engine folder (``ENGINES/tensorrt``), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(folder / TRT_MANIFEST, _json(manifest.to_dict()))
