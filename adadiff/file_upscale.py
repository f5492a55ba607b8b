"""Upscale one image file (shared by the CLI and the demo): read, upscale, write the image, the
report and the step map."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adadiff import __version__, imageio
from adadiff.errors import ConfigError, OutputPathError
from adadiff.progress import Progress
from adadiff.stepmap import step_map_writer


@dataclass(frozen=True, kw_only=True)
class UpscaleOptions:
    schedule: str | None = None  # None: the model's default
    interval: int | None = None
    seed: int = 0
    max_pixels: int | None = None


@dataclass(frozen=True)
class FileOutputs:
    image: Path
    report: Path | None = None
    step_map: Path | None = None


def check_outputs(input_path: Path, outputs: FileOutputs) -> FileOutputs:
    """Validate every output path before any work is done; return them resolved."""
    image = imageio.check_output_path(input_path, outputs.image)
    source = Path(input_path).expanduser().resolve()
    extras: dict[str, Path | None] = {}
    for what, path in (("report", outputs.report), ("step map", outputs.step_map)):
        if path is None:
            extras[what] = None
            continue
        resolved = path.expanduser().resolve()
        if not resolved.parent.is_dir():
            raise OutputPathError(f"the folder for the {what} {path} does not exist; create it")
        if resolved.is_dir():
            raise OutputPathError(f"the {what} path {path} is a folder; give a file name")
        if resolved in (image, source):
            raise ConfigError(f"the {what} path {path} would overwrite the input or output image")
        imageio.check_writable(resolved, f"the {what} {path}")
        extras[what] = resolved
    if extras["step map"] is not None and extras["step map"].suffix.lower() != ".png":
        raise ConfigError(f"the step map must be a .png file, got {outputs.step_map}")
    if extras["report"] is not None and extras["report"] == extras["step map"]:
        raise ConfigError("the report and the step map need different paths")
    return FileOutputs(image, extras["report"], extras["step map"])


def read_input(
    input_path: Path, outputs: FileOutputs, max_pixels: int | None, factor: int
) -> tuple[FileOutputs, Any]:
    """The checked outputs and the loaded input (``imageio.LoadedImage``), or one-line errors:
    every output path, the input, and whether the output's format can hold the upscale; all
    before any model runs."""
    outputs = check_outputs(input_path, outputs)
    image = imageio.load_image(input_path, max_pixels=max_pixels or imageio.DEFAULT_MAX_PIXELS)
    imageio.check_output_size(outputs.image, image.width * factor, image.height * factor)
    return outputs, image


def input_notes(image: Any, output: Path) -> list[str]:
    """What to tell the user about how the input was read or will be written: an animation's
    other frames, a float image's scale, transparency or an EXIF a JPEG cannot hold."""
    notes = []
    frames = getattr(image, "frames", 1)
    if frames > 1:
        notes.append(
            f"the input has {frames} frames (an animation or a multi-page file); only the first "
            "is upscaled"
        )
    scale = getattr(image, "float_scale", 1.0)
    if scale != 1.0:
        notes.append(
            f"the input's float values go above 1, so they were read as 0..{scale:g} (black to "
            "white)"
        )
    alpha = getattr(image, "alpha", None)
    if alpha is not None and imageio.format_for_path(output) == "JPEG" and float(alpha.min()) < 1:
        notes.append(
            "the input has transparency, which JPEG cannot hold: it is flattened onto white; "
            "write .png, .webp or .tif to keep it"
        )
    exif = getattr(image, "exif", None)
    if not imageio.exif_fits(output, exif):
        notes.append(
            f"the input's EXIF ({len(exif or b'') / 1024:.0f} KB) is more than a JPEG can hold "
            f"({imageio.JPEG_MAX_EXIF / 1024:.0f} KB): the output is written without it; write "
            ".png or .webp to keep it"
        )
    return notes


def upscale_file(
    upscaler: Any,
    input_path: Path,
    outputs: FileOutputs,
    options: UpscaleOptions,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Check the outputs, read the image, upscale it and write everything; return the report."""
    outputs, image = read_input(input_path, outputs, options.max_pixels, upscaler.config.upscale)
    return upscale_loaded(upscaler, image, input_path, outputs, options, progress=progress)


def upscale_loaded(
    upscaler: Any,
    image: Any,
    input_path: Path,
    outputs: FileOutputs,
    options: UpscaleOptions,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Upscale an already loaded image (``imageio.LoadedImage``); every file is written
    atomically. ``outputs`` must have passed ``check_outputs``."""
    if options.interval is not None and options.schedule not in (None, "uniform"):
        raise ConfigError("an interval applies to the uniform schedule only")
    # Integer levels at the bit depth the file gets: a quarter (half) of float32's memory.
    rgb, report = upscaler.upscale(
        image.rgb,
        schedule=options.schedule,
        interval=options.interval,
        seed=options.seed,
        progress=progress,
        dtype=np.uint16 if image.bit_depth == 16 else np.uint8,
    )
    record = output_record(image, rgb, report, upscaler.config.upscale)
    written = Path(outputs.image).expanduser().resolve()
    # both paths absolute, so a report read elsewhere still names its files
    source = Path(input_path).expanduser().resolve()
    data = {"input": str(source), "output": str(written), **record["report"]}
    # all or nothing: a run that cannot write one file (a full disk, an encoder's limit) leaves
    # an earlier run's image, report and step map as they were, not a mix of the two runs
    files = [
        (
            outputs.image,
            imageio.image_writer(
                outputs.image,
                record["rgb"],
                record["alpha"],
                bit_depth=record["bit_depth"],
                grayscale=record["grayscale"],
                icc_profile=record["icc_profile"],
                exif=record["exif"],
            ),
            "image",
        )
    ]
    if outputs.report is not None:
        report_bytes = (json.dumps(data, indent=2) + "\n").encode()
        files.append((outputs.report, imageio.bytes_writer(report_bytes), "report"))
    if outputs.step_map is not None:
        writer = step_map_writer(
            outputs.step_map, rgb, report.boxes, report.steps_per_tile, report.exits
        )
        files.append((outputs.step_map, writer, "step map"))
    imageio.write_files_atomic(files)
    return data


def output_record(image: Any, rgb: Any, report: Any, factor: int) -> dict[str, Any]:
    """What gets written for an upscaled ``imageio.LoadedImage``: the pixels, the alpha plane
    upscaled alongside, the bit depth and colour kind to write with, and the report dict."""
    alpha = None if image.alpha is None else imageio.upscale_alpha(image.alpha, factor)
    data = report.to_dict()
    data.update(
        input_mode=image.source_mode,
        bit_depth=image.bit_depth,
        alpha=image.alpha is not None,
        input_frames=getattr(image, "frames", 1),
        version=__version__,
    )
    return {
        "rgb": rgb,
        "alpha": alpha,
        "bit_depth": image.bit_depth,
        "grayscale": image.grayscale,
        "icc_profile": getattr(image, "icc_profile", None),
        "exif": getattr(image, "exif", None),
        "report": data,
    }


def summary(data: dict[str, Any]) -> str:
    steps = data["steps_per_tile"]
    w, h = data["output_size"]
    tiles = f"{data['tiles']} tile" + ("" if data["tiles"] == 1 else "s")
    return (
        f"{data['output']}: {w}x{h}, {tiles}, {data['unet_evaluations']} UNet "
        f"evaluations in {data['engine_calls']} calls (steps per tile {min(steps)}..{max(steps)}),"
        f" {data['seconds']['total']:.1f}s"
    )
