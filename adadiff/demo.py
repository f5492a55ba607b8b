"""The main job: upscale a real photo that ships with scikit-image, with every output a user wants.

Writes ``input.png`` (the low-resolution photo), ``bicubic.png`` (plain 4x bicubic, to compare),
``upscaled.png``, ``report.json`` and ``steps.png`` (steps per tile over the image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from adadiff import imageio
from adadiff.errors import BackendUnavailableError, ConfigError, OutputPathError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle_left")


def trained_on(folder: Path | None) -> set[str] | None:
    """The photos a model folder's card lists in its data table (``| name | source | licence |
    stages |`` rows, as ``adadiff train ship`` writes them); None without a card."""
    card = folder / "MODEL_CARD.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    names, in_table = set(), False
    for line in card.read_text().splitlines():
        if line.startswith("| photo | source |"):
            in_table = True
        elif in_table and line.startswith("| ") and not line.startswith("|---"):
            names.add(line.split("|")[1].strip())
        elif in_table and not line.startswith("|"):
            break
    return names


def role(name: str, folder: Path | None = None) -> str:
    """What a model's training did with a demo photo, for the user to know: from the model
    folder's card when it has one, else from the project's photo split."""
    from adadiff.training.data import HOLDOUT, VALIDATION  # scipy and PIL: only when asked

    seen = trained_on(folder)
    if seen is not None:
        if name in seen:
            return "a photo this model was trained on"
        return "this model never trained on it"
    if name in HOLDOUT:
        return "a hold-out photo: the model never saw it"
    if name in VALIDATION:
        return "a validation photo: never trained on"
    return "a training photo: the model learned from it"


def check_photo(name: str) -> None:
    """Refuse a photo name the demo does not know (before anything is written)."""
    if name not in PHOTOS:
        raise ConfigError(f"--photo {name} is not a demo photo; choose one of {', '.join(PHOTOS)}")


def photo(name: str, long_side: int) -> np.ndarray:
    """A scikit-image sample photo, downscaled (antialiased) so its long side is ``long_side``."""
    try:
        from skimage import data
    except ImportError:
        raise BackendUnavailableError(
            'the demo photos come from scikit-image: pip install "adadiff[demo]"'
        ) from None
    check_photo(name)
    rgb = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    scale = long_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS))


def prepare(out_dir: Path, name: str, long_side: int) -> Path:
    """Write the low-resolution input photo and return its path."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir} is a file; give a folder for the demo outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    lr = photo(name, long_side)
    path = out_dir / "input.png"
    imageio.save_image(path, lr.astype(np.float32) / 255.0)
    up = imageio.bicubic_upscale(lr.astype(np.float32) / 255.0, 4)
    imageio.save_image(out_dir / "bicubic.png", up)
    return path
