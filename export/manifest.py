"""Build the manifest of an export: files and hashes, specs, versions, the model's config.

Reading and checking manifests is ``adadiff.manifest`` (no torch), which the engines use.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adadiff.config import ModelConfig
from adadiff.manifest import (
    ComponentEntry,
    ExportManifest,
    FileEntry,
    library_versions,
    spec_to_dict,
)
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
) -> ComponentEntry:
    return ComponentEntry(
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
) -> ExportManifest:
    return ExportManifest(
        model=source,
        config=config.to_dict(),
        config_digest=config.digest(),
        precision=precision,
        opset=opset,
        exporter=exporter,
        libraries=library_versions(LIBRARIES),
        components=dict(components),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
