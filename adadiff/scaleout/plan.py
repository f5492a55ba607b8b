"""What a folder job has to do: inputs, output names, settings, and what a rerun can skip.

Pure file-system logic with no Ray in it, so the driver, the tests and a dry run share it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adadiff import __version__
from adadiff.artifacts import ExportManifest, sha256_file, weights_digest
from adadiff.config import CONFIG_FILE, RunSettings
from adadiff.errors import AdadiffError, ConfigError, OutputPathError
from adadiff.imageio import INPUT_FORMATS, OUTPUT_FORMATS
from adadiff.presets import SHIPPED, preset_name

JOB_REPORT = "adadiff-job.json"
OUTPUT_CHOICES = ("png", "same")


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """Everything a worker needs to build its Upscaler and run an image."""

    model: str | None = None
    backend: str = "torch"
    engines: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    schedule: str | None = None  # None: the model's default schedule
    interval: int | None = None
    seed: int = 0
    max_batch: int = 8
    tile: int | None = None
    overlap: int | None = None
    max_pixels: int | None = None
    output_format: str = "png"

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_CHOICES:
            raise ConfigError(
                f"output format must be one of {OUTPUT_CHOICES}, got {self.output_format!r}"
            )
        if self.interval is not None and self.schedule not in (None, "uniform"):
            raise ConfigError("--interval applies to --schedule uniform only")

    def run_settings(self, threads: int | None = None) -> RunSettings:
        """How a worker opens the model; ``threads`` is the worker's own CPU share."""
        return RunSettings(
            model=self.model,
            backend=self.backend,
            device=self.device,
            precision=self.precision,
            engines=self.engines,
            # self.seed is the images' noise seed; a random-init model keeps seed 0 everywhere
            tile_size=self.tile,
            tile_overlap=self.overlap,
            max_batch=self.max_batch,
            threads=threads,
        )

    def result_key(self) -> dict[str, Any]:
        """The settings an output depends on. Batch size and device change only float
        rounding, so a rerun with another --max-batch or --workers still skips finished work."""
        data = asdict(self)
        # model_id digests the model's and the export's files, so the names they were given by
        # (tiny, adadiff/weights/tiny, an absolute path) do not count.
        for loose in ("max_batch", "device", "max_pixels", "model", "engines"):
            data.pop(loose)
        data["version"] = __version__
        data["model_id"] = model_identity(self.model, self.engines)
        return data


@functools.lru_cache(maxsize=8)
def model_identity(model: str | None, engines: str | None) -> str:
    """A digest of what the outputs come from, beyond the names on the command line: the
    export's recorded files (``--engines``) and the model folder's config and weight files, so
    that a folder retrained or re-exported in place is not taken for the one that made earlier
    outputs. Computed once per job (hashing sd21-base's weights takes seconds)."""
    digest = hashlib.sha256()
    if engines is not None:
        try:
            manifest = ExportManifest.load(Path(engines).expanduser())
        except AdadiffError:
            return ""  # the job refuses this folder when it opens it
        digest.update(manifest.config_digest.encode())
        for name, entry in sorted(manifest.components.items()):
            for f in entry.files:
                digest.update(f"{name}:{f.path}:{f.sha256};".encode())
        if model is None:  # the exported model itself
            return digest.hexdigest()[:16]
    name = model or "tiny"
    bare = preset_name(name)
    folder = SHIPPED / bare if bare is not None else Path(name).expanduser()
    config = folder / CONFIG_FILE
    if not config.is_file():
        # a preset's seeded random init, however it was spelled (tiny or preset:tiny)
        digest.update(f"built-in {bare or name}".encode())
        return digest.hexdigest()[:16]
    digest.update(weights_digest(folder).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ImageTask:
    source: Path
    output: Path
    report: Path

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(frozen=True)
class Plan:
    todo: list[ImageTask]
    done: list[ImageTask]  # output and report exist and match: skipped
    ignored: list[Path]  # files that are not images by name
    # todo whose earlier output and report exist but were made otherwise: why, by task
    outdated: dict[ImageTask, str] = field(default_factory=dict)


def list_inputs(input_dir: Path) -> tuple[list[Path], list[Path]]:
    """(images, ignored): the folder's files by suffix, sorted; ignored also holds subfolders
    (not searched) and links to nothing; hidden entries are left out."""
    if not input_dir.is_dir():
        raise ConfigError(f"{input_dir} is not a folder; give the folder that holds the images")
    images: list[Path] = []
    ignored: list[Path] = []
    try:
        entries = sorted(input_dir.iterdir())
    except OSError as exc:
        raise ConfigError(
            f"cannot list the input folder {input_dir} ({exc.strerror or exc}); give a folder "
            "this user may read"
        ) from exc
    for path in entries:
        if path.name.startswith("."):
            continue
        if not path.is_file():
            ignored.append(path)
            continue
        (images if path.suffix.lower() in INPUT_FORMATS else ignored).append(path)
    return images, ignored


def output_for(source: Path, output_dir: Path, output_format: str) -> ImageTask:
    same = output_format == "same" and source.suffix.lower() in OUTPUT_FORMATS
    suffix = source.suffix if same else ".png"  # as written (IMG_0001.JPG stays .JPG)
    output = output_dir / f"{source.stem}{suffix}"
    return ImageTask(source, output, output_dir / f"{output.name}.json")


def make_plan(input_dir: Path, output_dir: Path, settings: JobSettings) -> Plan:
    """List the inputs, name their outputs and split them into work to do and work done."""
    input_dir = input_dir.expanduser().resolve()
    output_dir = output_dir.expanduser().resolve()
    if input_dir == output_dir:
        raise ConfigError("INPUT_DIR and OUTPUT_DIR must differ, or outputs would become inputs")
    images, ignored = list_inputs(input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"{output_dir} exists and is not a folder")
    tasks = [output_for(p, output_dir, settings.output_format) for p in images]
    # by name without case: macOS and Windows keep IMG.JPG and IMG.jpg in one file
    clashes: dict[str, list[ImageTask]] = {}
    for task in tasks:
        clashes.setdefault(task.output.name.lower(), []).append(task)
    clashing = [group for group in clashes.values() if len(group) > 1]
    if clashing:
        group = clashing[0]
        names = ", ".join(t.name for t in group)
        outs = sorted({t.output.name for t in group})
        where = (
            outs[0]
            if len(outs) == 1
            else f"{' and '.join(outs)}, one file where names ignore case (macOS, Windows)"
        )
        fix = (
            "rename the inputs"
            if settings.output_format == "same"
            else ("use --output-format same or rename the inputs")
        )
        raise ConfigError(f"{names} would all be written to {where}; {fix}")
    todo: list[ImageTask] = []
    done: list[ImageTask] = []
    outdated: dict[ImageTask, str] = {}
    for task in tasks:
        finished, why = earlier_output(task, settings)
        if finished:
            done.append(task)
            continue
        todo.append(task)
        if why is not None:
            outdated[task] = why
    return Plan(todo, done, ignored, outdated)


def job_stamp(
    task: ImageTask, settings: JobSettings, input_sha256: str | None = None
) -> dict[str, Any]:
    """What a per-image report records so that a rerun can tell whether it is still valid.
    ``input_sha256``: the digest of the bytes that were upscaled, when already known."""
    digest = input_sha256 or sha256_file(task.source)
    return {"settings": settings.result_key(), "input_sha256": digest}


def earlier_stamp(task: ImageTask) -> Any:
    """The job stamp of the output an earlier job left, or None where there is none."""
    try:  # a name past the file system's limit raises here (ENAMETOOLONG): none
        if not (task.output.is_file() and task.report.is_file()):
            return None
        return json.loads(task.report.read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def is_done(task: ImageTask, settings: JobSettings) -> bool:
    return earlier_output(task, settings)[0]


def earlier_output(task: ImageTask, settings: JobSettings) -> tuple[bool, str | None]:
    """(done, why): whether the output an earlier job left is this job's, with its report read
    and the input hashed once; else how it was made otherwise ("made with seed 1 (now 2)",
    "made from another version of its input"), or None where no stamped output is there."""
    stamp = earlier_stamp(task)
    if not isinstance(stamp, dict) or not isinstance(stamp.get("settings"), dict):
        return False, None
    old, new = stamp["settings"], settings.result_key()
    changed = [
        f"{key} {_shown(old.get(key))} (now {_shown(new.get(key))})"
        for key in sorted((set(old) | set(new)) - {"model_id"})
        if old.get(key) != new.get(key)
    ]
    if old.get("model_id") != new.get("model_id"):
        changed.append("other model or export files")
    if changed:
        return False, "made with " + ", ".join(changed)
    try:
        current = job_stamp(task, settings)
    except OSError:  # an input that cannot be read fails alone when the job sends it
        return False, None
    if stamp == current:
        return True, None
    return False, "made from another version of its input"


def _shown(value: Any) -> str:
    return "the model's default" if value is None else str(value)
