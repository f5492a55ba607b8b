"""``adadiff export``: a model folder or preset -> one checked ONNX file per component.

Files are written to a staging folder inside the output folder and moved into place only when
every component has exported, cleaned and passed its check; ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adadiff.artifacts import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    PRECISIONS,
    ComponentEntry,
    ExportManifest,
    spec_to_dict,
)
from adadiff.artifacts import weights_digest as folder_digest
from adadiff.config import CONFIG_FILE
from adadiff.errors import AdadiffError, ConfigError, OutputPathError
from adadiff.export.cleanup import EXTERNAL_DATA_THRESHOLD, clean, load_weights, save
from adadiff.export.fp16 import convert_to_fp16
from adadiff.export.manifest import build_manifest, component_entry, save_export_manifest
from adadiff.export.onnx_export import DEFAULT_EXPORTER, DEFAULT_OPSET, check_exporter, export_raw
from adadiff.export.verify import check_against_torch
from adadiff.locks import folder_lock
from adadiff.models.bundle import TorchModels, load_models
from adadiff.progress import Progress
from adadiff.specs import COMPONENTS, HALF_COMPONENTS, ModelSpec, component_specs

log = logging.getLogger("adadiff.export")


# As in the torch backend: the SD VAE overflows in fp16, so an fp16 export keeps it fp32.
STAGING_PREFIX = ".export-"
# Held while an export writes its folder; named like the staging folders so that a folder
# holding only these counts as empty.
LOCK_FILE = f"{STAGING_PREFIX}lock"


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    components: tuple[str, ...] = COMPONENTS
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    exporter: str = DEFAULT_EXPORTER
    fold: bool = True
    # ONNX Runtime against torch on sample inputs at these batch sizes; () skips the check.
    check_batches: tuple[int, ...] = (1, 3)
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "check_batches", tuple(int(b) for b in self.check_batches))
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise ConfigError(
                f"components {list(self.components)} are not all known; choose some of "
                f"{', '.join(COMPONENTS)}"
            )
        if len(set(self.components)) != len(self.components):
            raise ConfigError(f"components are listed twice: {list(self.components)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_exporter(self.exporter, self.opset)
        if any(b < 1 for b in self.check_batches):
            raise ConfigError(f"check batch sizes must be >= 1, got {self.check_batches}")


def export_onnx(
    model: str | Path | TorchModels,
    output: str | Path,
    options: ExportOptions | None = None,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> ExportManifest:
    """Export ``model`` (preset name, model folder or loaded TorchModels) into ``output``."""
    options = options or ExportOptions()
    out = Path(output).expanduser()
    _check_output(out)
    models = model if isinstance(model, TorchModels) else load_models(model, seed=seed)
    try:
        out.mkdir(parents=True, exist_ok=True)  # as upscale-many's OUTPUT_DIR: parents included
    except OSError as exc:
        raise OutputPathError(
            f"cannot create the output folder {out} ({exc.strerror or exc}); pick another"
        ) from exc
    lock = out / LOCK_FILE

    def busy(holder: str) -> OutputPathError:
        return OutputPathError(
            f"{out} is being exported into by {holder}; wait for it or stop it, then run again"
        )

    def unwritable(exc: OSError) -> OutputPathError:
        if lock.is_dir():
            fix = f"remove the folder {lock}"
        else:  # the lock file stays after an export: in a shared folder it is the last user's
            fix = f"make {lock if lock.exists() else out} writable"
        return OutputPathError(
            f"cannot write {lock} ({exc.strerror or exc}); {fix}, or pick another output folder"
        )

    with folder_lock(lock, busy, unwritable=unwritable):
        _remove_leftovers(out)
        return _export_locked(models, out, options, progress)


def _export_locked(
    models: TorchModels, out: Path, options: ExportOptions, progress: Progress | None
) -> ExportManifest:
    config = models.config
    specs = component_specs(config)
    wrappers = models.wrappers()
    weights = {name: weights_digest(wrappers[name]) for name in COMPONENTS}
    kept, redo, stale_files = _earlier_export(out, config.digest(), options, weights, specs)
    if redo:
        log.warning(
            "%s in %s %s; exporting %s again so that the folder holds one whole export",
            ", ".join(redo),
            out,
            "; ".join(sorted(set(redo.values()))),
            "them" if len(redo) > 1 else "it",
        )
    names = options.components + tuple(n for n in COMPONENTS if n in redo)
    steps = _Steps(len(names) * (4 + bool(options.check_batches)), progress)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        staged = [
            _export_one(wrappers[name], specs[name], staging, options, steps) for name in names
        ]
        entries = dict(kept)
        for item in staged:
            for f in item.files:
                os.replace(staging / "final" / f, out / f)
            if len(item.files) == 1:  # now inline: drop the data file of an earlier export
                (out / f"{item.files[0]}.data").unlink(missing_ok=True)
            entries[item.name] = component_entry(
                out,
                specs[item.name],
                item.files,
                precision=item.precision,
                nodes=item.nodes,
                seconds=item.seconds,
                check=item.check,
                weights=weights[item.name],
            )
        written = {f for item in staged for f in item.files}
        for path in stale_files:
            if path not in written:
                (out / path).unlink(missing_ok=True)
        source = Path(models.source)
        is_folder = (source / CONFIG_FILE).is_file()
        manifest = build_manifest(
            config=config,
            # absolute, so a later run from another working directory finds the folder
            source=str(source.resolve()) if is_folder else models.source,
            model_weights=folder_digest(source) if is_folder else "",
            precision=options.precision,
            opset=options.opset,
            exporter=options.exporter,
            components={n: entries[n] for n in COMPONENTS if n in entries},
        )
        save_export_manifest(manifest, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@dataclass
class _Staged:
    """One component written to the staging folder, waiting to be moved into place."""

    name: str
    files: list[str]
    precision: str
    nodes: dict[str, int]
    seconds: dict[str, float]
    check: dict[str, Any]


class _Steps:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress
        self.tick(0)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress("export", self.done, self.total)


def _export_one(
    module: nn.Module, spec: ModelSpec, staging: Path, options: ExportOptions, steps: _Steps
) -> _Staged:
    name = spec.name
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    raw = export_raw(
        module,
        spec,
        staging / "raw" / name / f"{name}.onnx",
        exporter=options.exporter,
        opset=options.opset,
    )
    seconds["export"] = time.perf_counter() - start
    steps.tick()

    cleaned = clean(raw, spec, fold=options.fold)
    seconds["cleanup"] = cleaned.seconds
    nodes = {"exported": cleaned.nodes_before, "cleaned": cleaned.nodes_after}
    log.info("%s: %d -> %d nodes after clean-up", name, cleaned.nodes_before, cleaned.nodes_after)
    steps.tick()

    t0 = time.perf_counter()
    model = cleaned.model
    half = component_precision(name, options.precision) == "fp16"
    if half:
        load_weights(model, raw.parent)
        t1 = time.perf_counter()
        report = convert_to_fp16(model)
        nodes["fp16"] = len(model.graph.node)
        nodes["fp16_casts"] = report.casts
        nodes["fp32_kept"] = report.fp32_nodes
        if report.clipped_weights:
            log.warning("%s: %d weights exceeded the fp16 range", name, report.clipped_weights)
        seconds["fp16"] = time.perf_counter() - t1
    steps.tick()

    final = staging / "final"
    final.mkdir(exist_ok=True)
    files = save(
        model,
        final / f"{name}.onnx",
        source_dir=raw.parent,
        threshold=options.external_data_threshold,
    )
    del model
    shutil.rmtree(raw.parent, ignore_errors=True)
    seconds["write"] = time.perf_counter() - t0 - seconds.get("fp16", 0.0)
    steps.tick()

    check: dict[str, Any] = {}
    if options.check_batches:
        t0 = time.perf_counter()
        check = _check(final / files[0], module, spec, options, half)
        seconds["check"] = time.perf_counter() - t0
        steps.tick()
    precision = "fp16" if half else "fp32"
    return _Staged(name, files, precision, nodes, seconds, check)


def _check(
    path: Path, module: nn.Module, spec: ModelSpec, options: ExportOptions, half: bool
) -> dict[str, Any]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed; %s was exported without a parity check", path)
        return {}
    tol = spec.fp16_tolerance if half else spec.fp32_tolerance
    return check_against_torch(path, module, spec, batches=options.check_batches, tolerance=tol)


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, shapes and bytes), without copying them."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _is_adadiff_manifest(path: Path) -> bool:
    """Whether ``path`` is an adadiff export manifest of any version (damaged or not)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file; give a folder for the ONNX files")
    # refused now, not with a traceback when the files are moved in after the whole export
    blocked = sorted(n for n in (*_component_file_names(), MANIFEST_FILE) if (out / n).is_dir())
    if blocked:
        raise OutputPathError(
            f"{out / blocked[0]} is a folder where the export writes a file; move it away or "
            "pick another output folder"
        )
    manifest = out / MANIFEST_FILE
    # The lock file stays in every folder an export wrote: a manifest damaged there is adadiff's
    # own (its load error says to export again), not a file of the user's to protect.
    ours = (out / LOCK_FILE).is_file()
    if manifest.is_file() and not ours and not _is_adadiff_manifest(manifest):
        raise OutputPathError(
            f"{out} holds a {MANIFEST_FILE} that is not an adadiff export's; choose a new or "
            "empty folder so nothing of yours is overwritten"
        )
    if out.is_dir() and not (out / MANIFEST_FILE).is_file():
        others = [p.name for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)]
        # an export stopped while moving its files in (Ctrl-C) leaves them without a manifest
        if ours:
            others = [name for name in others if name not in _component_file_names()]
        if others:
            raise OutputPathError(
                f"{out} is not empty ({', '.join(sorted(others)[:3])}, ...) and holds no adadiff "
                "export; choose a new or empty folder so nothing of yours is overwritten"
            )
    # lexists: a link to nothing is in the way as much as a file is
    above = next(p for p in out.absolute().parents if os.path.lexists(p))
    if not above.is_dir():
        raise OutputPathError(
            f"{out} cannot be created: {above} is not a folder; pick another output folder"
        )


def _component_file_names() -> set[str]:
    """Every name an export writes a component's file under (``save`` names them so)."""
    return {f"{name}.onnx{data}" for name in COMPONENTS for data in ("", ".data")}


def _remove_leftovers(out: Path) -> None:
    """Staging folders of exports killed before their clean-up (SIGKILL, out of memory); only
    called under the folder's lock, so none of them belongs to a running export."""
    for path in out.glob(f"{STAGING_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an interrupted export", path)


def component_precision(name: str, precision: str) -> str:
    return "fp16" if precision == "fp16" and name in HALF_COMPONENTS else "fp32"


def _files_match(manifest: ExportManifest, out: Path, name: str) -> bool:
    try:
        manifest.verify_files(out, [name])
    except AdadiffError:
        return False
    return True


def _earlier_export(
    out: Path,
    digest: str,
    options: ExportOptions,
    weights: dict[str, str],
    specs: dict[str, ModelSpec],
) -> tuple[dict[str, ComponentEntry], dict[str, str], list[str]]:
    """Of an earlier export into ``out``: the components this one does not redo but would write
    alike (same config, weights, opset, exporter, spec and precision of that component, so an
    fp32 VAE serves an fp16 export); the others this one does not redo, each with why it differs
    (they are exported again: a folder holds one export, and a folder missing one would not run);
    and the files of every earlier component that is not kept, removed once the new files are in
    place. An entry without a weights digest (older manifests) cannot show it is alike."""
    if not (out / MANIFEST_FILE).is_file():
        # the files of an export stopped before its manifest (_check_output let only those in)
        return {}, {}, sorted(n for n in _component_file_names() if (out / n).is_file())
    try:
        old = ExportManifest.load(out)
    except AdadiffError as exc:
        log.warning("ignoring the unreadable %s in %s: %s", MANIFEST_FILE, out, exc)
        return {}, {}, []
    if old.config_digest != digest:
        other = "were exported from another model configuration"
    elif (old.opset, old.exporter) != (options.opset, options.exporter):
        other = f"were exported with opset {old.opset} by the {old.exporter} exporter"
    else:
        other = ""
    kept: dict[str, ComponentEntry] = {}
    redo: dict[str, str] = {}
    stale: list[str] = []
    for name, entry in old.components.items():
        if name not in options.components:
            want = component_precision(name, options.precision)
            if other:
                redo[name] = other
            elif entry.weights == "":
                redo[name] = "were exported without a record of their weights (an older export)"
            elif entry.weights != weights.get(name):
                redo[name] = "were exported from other weights"
            elif name not in specs or entry.spec != spec_to_dict(specs[name]):
                # the runtime refuses a file of another spec (an older adadiff's export)
                redo[name] = "were exported for other inputs, outputs or tolerances"
            elif entry.precision != want:
                redo[name] = f"are {entry.precision} exports (this one is {options.precision})"
            elif not _files_match(old, out, name):
                redo[name] = "changed since the manifest was written (an export stopped mid-way?)"
            else:
                kept[name] = entry
                continue
        stale.extend(f.path for f in entry.files)
    return kept, redo, stale
