"""The main job: upscale a real photo that ships with scikit-image, with every output a user wants.

Writes ``input.png`` (the low-resolution photo), ``bicubic.png`` (plain 4x bicubic, to compare),
``upscaled.png``, ``report.json`` and ``steps.png`` (steps per tile over the image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from adadiff import imageio
from adadiff.errors import (
    BackendUnavailableError,
    ConfigError,
    InputImageError,
    OutputPathError,
)
from adadiff.provenance import read_record

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle_left")


def trained_on(folder: Path | None) -> set[str] | None:
    """The photos some training stage of a model folder used (its ``training.json``, else its
    card's photo table); None when the folder records neither."""
    record = read_record(folder)
    return None if record is None else {name for name, by in record.photos.items() if by}


def role(name: str, folder: Path | None = None, *, untrained: bool = False) -> str:
    """What a model's training did with a demo photo, for the user to know, from the model
    folder's record (``training.json`` or its card); ``untrained``: a preset's random init."""
    if untrained:
        return "the model has random weights: it never trained"
    record = read_record(folder)
    if record is None:
        return "the model records no training, so whether it saw this photo is unknown"
    stages = record.stages_of(name)
    if not stages:
        return "this model never trained on it"
    # "unet (reused)": the UNet started from weights that trained on it (--init-from)
    if any(stage.split(" ")[0] == "unet" for stage in stages):
        return "a photo this model was trained on"
    return f"its UNet never saw it; these stages trained on it: {', '.join(stages)}"


def default_photo(folder: Path | None = None) -> str:
    """The first demo photo the model never trained on (astronaut, a face, for a model that kept
    it out), so that what a new user sees first is not a photo the model learned."""
    seen = trained_on(folder) or set()
    return next((name for name in PHOTOS if name not in seen), PHOTOS[0])


def check_photo(name: str) -> None:
    """Refuse a photo name the demo does not know (before anything is written)."""
    if name not in PHOTOS:
        raise ConfigError(f"--photo {name} is not a demo photo; choose one of {', '.join(PHOTOS)}")


def _original(name: str) -> Image.Image:
    try:
        from skimage import data
    except ImportError:
        raise BackendUnavailableError(
            'the demo photos come from scikit-image: pip install "adadiff[demo]"'
        ) from None
    check_photo(name)
    rgb = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    return Image.fromarray(np.ascontiguousarray(rgb[..., :3]))


def _resized(img: Image.Image, long_side: int) -> tuple[int, int]:
    scale = long_side / max(img.size)
    return max(1, round(img.width * scale)), max(1, round(img.height * scale))


def photo(name: str, long_side: int) -> np.ndarray:
    """A scikit-image sample photo, downscaled (antialiased) so its long side is ``long_side``."""
    img = _original(name)
    return np.asarray(img.resize(_resized(img, long_side), Image.Resampling.LANCZOS))


def prepare(out_dir: Path, name: str, long_side: int, max_pixels: int | None = None) -> Path:
    """Write the low-resolution input photo and return its path; ``InputImageError`` first if
    it would have more than ``max_pixels`` pixels (before it and its 4x bicubic are made)."""
    # as every image path is read: "-o ~/demo" made a folder named "~" here, then wrote in $HOME
    out_dir = out_dir.expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir} is a file; give a folder for the demo outputs")
    original = _original(name)
    width, height = _resized(original, long_side)
    if max_pixels is not None and width * height > max_pixels:
        raise InputImageError(
            f"--size {long_side} makes a {width}x{height} px input, over the limit of "
            f"{max_pixels:,} input pixels; use a smaller --size (the {name} photo is "
            f"{original.width}x{original.height} px) or raise --max-pixels"
        )
    if long_side > max(original.size):
        # enlarging would make the "low-resolution" input an upscale already
        raise InputImageError(
            f"--size {long_side} is above the {name} photo's own long side "
            f"({original.width}x{original.height} px); the demo only shrinks its photos: use "
            f"--size {max(original.size)} or less"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(
            f"{out_dir}: cannot make the demo's output folder ({exc.strerror or exc})"
        ) from exc
    # an earlier demo's results go first: a run stopped mid-way must not leave them beside
    # another photo's input and bicubic
    for stale in ("upscaled.png", "report.json", "steps.png"):
        try:
            (out_dir / stale).unlink(missing_ok=True)
        except OSError as exc:  # a read-only folder (EROFS even when the file is absent)
            raise OutputPathError(
                f"{out_dir / stale}: cannot remove an earlier demo's output "
                f"({exc.strerror or exc}); make the folder writable or give another -o folder"
            ) from exc
    lr = np.asarray(original.resize((width, height), Image.Resampling.LANCZOS))
    path = out_dir / "input.png"
    imageio.save_image(path, lr.astype(np.float32) / 255.0)
    up = imageio.bicubic_upscale(lr.astype(np.float32) / 255.0, 4)
    imageio.save_image(out_dir / "bicubic.png", up)
    return path
