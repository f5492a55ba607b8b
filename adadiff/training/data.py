"""Training photos from PyPI packages, a fixed hold-out set, and a seeded crop sampler.

Sources (found on disk through the installed packages; none is imported or downloaded):

- scikit-image ``skimage/data``: the photos of natural content. Left out: synthetic images
  (chessboards, phantom, logo, horse silhouette, colour wheel ``color.png``), documents (page,
  text), images that are already degraded (clock_motion) or tiny (microaneurysms), and cell
  micrographs in gray. Gray photos (textures, cameraman, moon) are kept as RGB with equal
  channels: SR meets gray content too and textures are what it most needs to learn.
- scikit-learn ``datasets/images`` (china, flower), matplotlib ``sample_data/grace_hopper.jpg``
  and PyWavelets ``data/aero.npz``: used when those packages are installed (optional).

``HOLDOUT`` names photos that training never sees; evaluation reports on them. ``VALIDATION``
names photos that training never sees either, on which choices are tuned. Both come from
scikit-image only, so they are the same wherever the package is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from adadiff.errors import ConfigError, InputImageError, ShapeError
from adadiff.imageio import LUMA_601, to_rgb_array
from adadiff.training.degrade import (
    REALESRGAN,
    DegradationConfig,
    bicubic_x4,
    degrade,
    resize,
)

# name -> file in skimage/data
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}

# name -> (package, path inside the package)
OPTIONAL_PHOTOS: dict[str, tuple[str, str]] = {
    "sklearn_china": ("sklearn", "datasets/images/china.jpg"),
    "sklearn_flower": ("sklearn", "datasets/images/flower.jpg"),
    "mpl_grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "pywt_aero": ("pywt", "data/aero.npz"),
}

# A portrait (a face, a flat studio background), a cat (fur, whiskers), a table-top still life
# (smooth gradients, specular highlights) and a gray texture: the kinds of content a user looks
# at first; the motorcycle stereo pair stays together in training.
HOLDOUT: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "gravel")
# Photos that choices are tuned on (checkpoints, calibration, schedules); training never sees
# them either, so a choice made on them is not fitted to the hold-out photos that report it.
VALIDATION: tuple[str, ...] = ("grass", "rocket")

DegradationMode = Literal["realesrgan", "bicubic"]
# How crops pick their photo: in proportion to its area, or every photo equally often.
PhotoWeighting = Literal["area", "photo"]
PHOTO_WEIGHTINGS: tuple[str, ...] = ("area", "photo")


def check_min_scale(value: float) -> float:
    """``value`` if it is a valid scale augmentation bound (CropConfig.min_scale), else
    ``ConfigError``; the training stages check their options with it before loading photos."""
    if not 0 < value <= 1:
        raise ConfigError(f"min_scale must be in (0, 1], got {value}")
    return value


def check_weighting(value: str) -> PhotoWeighting:
    if value == "area":
        return "area"
    if value == "photo":
        return "photo"
    raise ConfigError(f"photo weighting must be one of {PHOTO_WEIGHTINGS}, got {value!r}")


@dataclass(frozen=True)
class Photo:
    name: str
    package: str
    path: Path


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def available_photos() -> tuple[Photo, ...]:
    """Every known photo present on this machine, scikit-image ones first, in a fixed order."""
    photos: list[Photo] = []
    skimage_dir = _package_dir("skimage")
    if skimage_dir is not None:
        for name, filename in SKIMAGE_PHOTOS.items():
            path = skimage_dir / "data" / filename
            if path.is_file():
                photos.append(Photo(name, "scikit-image", path))
    for name, (package, relative) in OPTIONAL_PHOTOS.items():
        root = _package_dir(package)
        if root is not None and (root / relative).is_file():
            photos.append(Photo(name, package, root / relative))
    return tuple(photos)


def _missing_optional(present: Sequence[Photo]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(package, photo names) of the optional photos this machine lacks."""
    have = {p.name for p in present}
    missing: dict[str, list[str]] = {}
    for name, (package, _) in OPTIONAL_PHOTOS.items():
        if name not in have:
            missing.setdefault(package, []).append(name)
    return tuple((p, tuple(n)) for p, n in sorted(missing.items()))


@functools.cache
def _warn_missing(missing: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """Once per process: training (and NIQE's model) uses fewer photos than on a machine with
    every optional package, so a run here is not the same run as there."""
    listed = "; ".join(f"{', '.join(names)} (package {package})" for package, names in missing)
    logging.getLogger("adadiff.training").warning(
        "photos not available here: %s; training and NIQE's model use the others (install "
        "the training extras, pip install 'adadiff[train]', for the full set)",
        listed,
    )


def training_photos() -> tuple[Photo, ...]:
    """Available photos minus ``HOLDOUT`` and ``VALIDATION``."""
    present = available_photos()
    missing = _missing_optional(present)
    if missing:
        _warn_missing(missing)
    return tuple(p for p in present if p.name not in (*HOLDOUT, *VALIDATION))


def _named_set(names: tuple[str, ...], what: str) -> tuple[Photo, ...]:
    found = {p.name: p for p in available_photos() if p.name in names}
    missing = [name for name in names if name not in found]
    if missing:
        raise InputImageError(
            f"{what} photos {missing} not found; install scikit-image (pip install "
            "scikit-image), which ships them"
        )
    return tuple(found[name] for name in names)


def holdout_photos() -> tuple[Photo, ...]:
    """The hold-out photos; ``InputImageError`` if scikit-image is missing."""
    return _named_set(HOLDOUT, "hold-out")


def validation_photos() -> tuple[Photo, ...]:
    """The validation photos; ``InputImageError`` if scikit-image is missing."""
    return _named_set(VALIDATION, "validation")


def find_photo(name: str) -> Photo:
    for photo in available_photos():
        if photo.name == name:
            return photo
    known = sorted([*SKIMAGE_PHOTOS, *OPTIONAL_PHOTOS])
    raise InputImageError(
        f"no photo named {name!r} is installed here; known names are {known} (scikit-image "
        "ships most of them)"
    )


def load_photo(photo: Photo | str) -> np.ndarray:
    """A photo as float32 RGB [H, W, 3] in [0, 1] (gray photos get three equal channels)."""
    photo = find_photo(photo) if isinstance(photo, str) else photo
    if photo.path.suffix == ".npz":
        with np.load(photo.path, allow_pickle=False) as npz:
            values = npz[npz.files[0]]
        if values.dtype != np.uint8:  # some PyWavelets releases store 0..255 gray as floats
            values = np.clip(np.asarray(values, dtype=np.float32) / 255.0, 0.0, 1.0)
        return to_rgb_array(values)
    with Image.open(photo.path) as image:
        return to_rgb_array(image)


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CropConfig:
    """HR crop sampling; jitter values are the largest relative change (0.1 = +-10 %).

    ``weighting`` "area" draws every pixel equally often, so one large photo can dominate
    (retina is a third of the default training pixels); "photo" draws every photo equally often.
    """

    size: int = 256
    weighting: PhotoWeighting = "area"
    flips: bool = True
    rotations: bool = True
    brightness: float = 0.08
    contrast: float = 0.08
    saturation: float = 0.1
    min_std: float = 0.02  # reject nearly flat crops (black sky, fundus border) ...
    max_tries: int = 20  # ... but give up rejecting after this many draws
    # Scale augmentation: each crop covers size / s px of its photo, s uniform in
    # [min_scale, 1], downscaled (antialiased) to size; 1.0 keeps the photo's own scale. A few
    # photos then give textures at many scales instead of one.
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 4 or self.size % 4:
            raise ConfigError(f"crop size must be a positive multiple of 4, got {self.size}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} jitter must be in [0, 1), got {getattr(self, name)}")
        if self.max_tries < 1:
            raise ConfigError(f"max_tries must be >= 1, got {self.max_tries}")
        check_min_scale(self.min_scale)
        check_weighting(self.weighting)


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ShapeError(f"cannot crop {size}x{size} from an image of {height}x{width}")
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top : top + size, left : left + size]


def scaled_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, min_scale: float
) -> np.ndarray:
    """A ``size`` crop of ``image`` seen at a random scale in [min_scale, 1] (see CropConfig)."""
    if min_scale >= 1:
        return random_crop(image, size, rng)
    scale = float(rng.uniform(min_scale, 1.0))
    side = min(round(size / scale), *image.shape[:2])
    region = random_crop(image, side, rng)
    if side == size:
        return region
    small = resize(region, (size, size), "bicubic", antialias=True, cubic_a=-0.5)
    return np.clip(small, 0.0, 1.0).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ LUMA_601


def augment(crop: np.ndarray, rng: np.random.Generator, config: CropConfig) -> np.ndarray:
    """Random flip / rot90 and mild brightness, contrast and saturation jitter, clipped."""
    out = crop
    if config.flips and rng.random() < 0.5:
        out = out[:, ::-1]
    if config.rotations:
        out = np.rot90(out, k=int(rng.integers(0, 4)))
    out = out.astype(np.float32, copy=True)
    brightness = 1.0 + rng.uniform(-config.brightness, config.brightness)
    contrast = 1.0 + rng.uniform(-config.contrast, config.contrast)
    saturation = 1.0 + rng.uniform(-config.saturation, config.saturation)
    out *= np.float32(brightness)
    mean = np.float32(_luma(out).mean())
    out = mean + np.float32(contrast) * (out - mean)
    gray = _luma(out)[:, :, None]
    out = gray + np.float32(saturation) * (out - gray)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def sample_crops(
    images: Sequence[np.ndarray], rng: np.random.Generator, config: CropConfig = CropConfig()
) -> Iterator[np.ndarray]:
    """Endless seeded stream of augmented HR crops (photos weighted by ``config.weighting``)."""
    for _, crop in sample_indexed_crops(images, rng, config):
        yield crop


def sample_indexed_crops(
    images: Sequence[np.ndarray], rng: np.random.Generator, config: CropConfig = CropConfig()
) -> Iterator[tuple[int, np.ndarray]]:
    """Like ``sample_crops``, with each crop's index into ``images``."""
    usable = [i for i, im in enumerate(images) if min(im.shape[:2]) >= config.size]
    if not usable:
        raise ShapeError(f"no image is at least {config.size} px on both sides")
    if config.weighting == "area":
        sizes = np.array([images[i].shape[0] * images[i].shape[1] for i in usable], float)
    else:
        sizes = np.ones(len(usable))
    weights = sizes / sizes.sum()
    while True:
        index = usable[int(rng.choice(len(usable), p=weights))]
        image = images[index]
        crop = scaled_crop(image, config.size, rng, config.min_scale)
        for _ in range(config.max_tries - 1):
            if float(_luma(crop).std()) >= config.min_std:
                break
            crop = scaled_crop(image, config.size, rng, config.min_scale)
        yield index, augment(crop, rng, config)


def pair(
    hr: np.ndarray,
    rng: np.random.Generator,
    mode: DegradationMode = "realesrgan",
    config: DegradationConfig = REALESRGAN,
) -> tuple[np.ndarray, np.ndarray]:
    """(lr, hr) for an HR crop: second-order degradation (``config``) or plain bicubic x4."""
    if mode == "realesrgan":
        return degrade(hr, rng, config), hr
    if mode == "bicubic":
        return bicubic_x4(hr), hr
    raise ConfigError(f"degradation mode must be 'realesrgan' or 'bicubic', got {mode!r}")
