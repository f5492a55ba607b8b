"""Seeded batches of (LR, bicubic-upscaled LR, HR) crops, as the trainers and label runs need them.

The conditioning image is exactly what the runtime encodes: the LR image upscaled with
``adadiff.imageio.bicubic_upscale`` (the Upscaler's own resize), in [0, 1].
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adadiff.errors import ConfigError
from adadiff.imageio import bicubic_upscale
from adadiff.training.data import (
    CropConfig,
    DegradationMode,
    PhotoWeighting,
    find_photo,
    holdout_photos,
    load_photo,
    pair,
    sample_indexed_crops,
    training_photos,
    validation_photos,
)
from adadiff.training.degrade import strength_config
from adadiff.training.loop import numpy_rng

log = logging.getLogger("adadiff.training")

# "train+validation": the final fit of a recipe chosen on the validation photos (hold-out stays out)
PHOTO_SETS = ("train", "validation", "holdout", "train+validation")


def photo_names(which: str = "train") -> list[str]:
    """Names of the training, validation or hold-out photos, in order."""
    if which == "train":
        photos = training_photos()
    elif which == "train+validation":
        photos = (*training_photos(), *validation_photos())
    elif which == "validation":
        photos = validation_photos()
    elif which == "holdout":
        photos = holdout_photos()
    else:
        raise ConfigError(f"photo set must be one of {PHOTO_SETS}, got {which!r}")
    if not photos:
        raise ConfigError("no training photos are installed; install scikit-image")
    return [p.name for p in photos]


TRAINING_SETS = ("train", "train+validation")


def check_training_set(which: str) -> str:
    """A photo set a training stage may draw from: never the hold-out photos."""
    if which not in TRAINING_SETS:
        raise ConfigError(
            f"a training stage draws from {' or '.join(TRAINING_SETS)}, got {which!r}; the "
            "hold-out photos are for reporting only"
        )
    return which


def merged_photos(before: list[str], now: list[str]) -> list[str]:
    """The photos of earlier phases of a resumed run, then this run's new ones."""
    return [*before, *(name for name in now if name not in before)]


def evaluation_photos(text: str) -> tuple[str, ...]:
    """What an evaluation's ``--photos`` names: ``holdout`` or ``validation`` (the sets), or
    photo names separated by commas."""
    if text in ("holdout", "validation"):
        return tuple(photo_names(text))
    names = tuple(name for name in text.split(",") if name)
    if not names:  # argparse turns these into one usage line and exit code 2
        raise argparse.ArgumentTypeError(
            f"expected holdout, validation or photo names separated by commas, got {text!r}"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # each photo is a stratum of the intervals and a column of the per-photo table
        raise argparse.ArgumentTypeError(f"{', '.join(twice)}: named twice; give each photo once")
    return names


def load_images(which: str = "train") -> list[np.ndarray]:
    """The photos ``photo_names(which)`` names, float32 RGB in [0, 1]."""
    return [load_photo(name) for name in photo_names(which)]


def photos_a_crop_fits(
    names: list[str], images: list[np.ndarray], size: int, *, stage: str
) -> tuple[list[str], list[np.ndarray]]:
    """The images (and their names; ``names`` may be empty) at least ``size`` px on both sides.
    The crop sampler never draws the others, so a stage leaves them out of the photos it records
    for the model card, and says so."""
    small = [i for i, image in enumerate(images) if min(image.shape[:2]) < size]
    if not small:
        return names, images
    listed = ", ".join(
        f"{names[i] if names else f'image {i}'} ({images[i].shape[0]}x{images[i].shape[1]})"
        for i in small
    )
    log.warning(
        "%s: %s smaller than the %d px crops: never drawn, not trained on (smaller crops, or a "
        "smaller tile size, would use them)",
        stage,
        listed,
        size,
    )
    keep = [i for i in range(len(images)) if i not in small]
    return ([names[i] for i in keep] if names else names), [images[i] for i in keep]


def warn_scale_caps(
    names: list[str], images: list[np.ndarray], size: int, min_scale: float, *, stage: str
) -> None:
    """Say which images are too small for a ``size`` crop at ``min_scale`` (one covering
    size / min_scale px of its photo). ``scaled_crop`` caps such a crop at the photo's shorter
    side, so every draw below the smallest scale the photo holds lands on that scale."""
    side = round(size / min_scale)
    small = [i for i, image in enumerate(images) if min(image.shape[:2]) < side]
    if not small:
        return
    listed = ", ".join(
        f"{names[i] if names else f'image {i}'} ({images[i].shape[0]}x{images[i].shape[1]}: "
        f"scale {size / min(images[i].shape[:2]):.2f} at the smallest)"
        for i in small
    )
    log.warning(
        "%s: %s shorter than the %d px a %d px crop at --min-scale %g covers: the draws of a "
        "smaller scale than each reaches are taken at that scale",
        stage,
        listed,
        side,
        size,
        min_scale,
    )


@dataclass
class Batch:
    hr: np.ndarray  # [B, H, W, 3] in [0, 1]
    lr: np.ndarray  # [B, H/s, W/s, 3]
    up: np.ndarray  # [B, H, W, 3]: lr bicubic-upscaled, what the runtime encodes
    photo: np.ndarray  # [B] int: each crop's index into the stream's images


class PairStream:
    """Endless seeded stream of augmented crops and their degraded pairs.

    ``realesrgan_prob`` is the chance that a crop gets Real-ESRGAN's second-order degradation
    (at ``strength``: "full" is Real-ESRGAN's published settings, "mild" a gentler pipeline)
    instead of plain bicubic x4; ``weighting`` picks photos by area or equally (``CropConfig``).
    All randomness comes from ``rng``; restoring its state restores the stream.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        rng: np.random.Generator,
        *,
        size: int,
        scale: int = 4,
        realesrgan_prob: float = 0.0,
        weighting: PhotoWeighting = "area",
        min_scale: float = 1.0,
        strength: str = "full",
    ) -> None:
        self.degradation = strength_config(strength)
        if not 0 <= realesrgan_prob <= 1:
            raise ConfigError(f"realesrgan_prob must be in [0, 1], got {realesrgan_prob}")
        if scale != 4:
            raise ConfigError(f"the degradation pipeline is x4 only, got upscale {scale}")
        self.rng = rng
        self.scale = scale
        self.realesrgan_prob = realesrgan_prob
        self._crops = sample_indexed_crops(
            images, rng, CropConfig(size=size, weighting=weighting, min_scale=min_scale)
        )

    def hr(self, n: int) -> np.ndarray:
        return np.stack([next(self._crops)[1] for _ in range(n)])

    def batch(self, n: int) -> Batch:
        hr, lr, photo = [], [], []
        for _ in range(n):
            index, crop = next(self._crops)
            photo.append(index)
            mode: DegradationMode = (
                "realesrgan" if self.rng.random() < self.realesrgan_prob else "bicubic"
            )
            low, _ = pair(crop, self.rng, mode, self.degradation)
            hr.append(crop)
            lr.append(low)
        up = [bicubic_upscale(low, self.scale) for low in lr]
        return Batch(
            hr=np.stack(hr), lr=np.stack(lr), up=np.stack(up), photo=np.array(photo, np.int64)
        )


def crops_per_photo(
    names: Sequence[str], per_photo: int, *, size: int, scale: int = 4, seed: int, stream: int
) -> Batch:
    """``per_photo`` bicubic x``scale`` crops of ``size`` px from each named photo, in order;
    ``photo`` indexes ``names``. Seeded by (seed, stream, photo index): a photo's crops depend on
    its place in ``names`` (the same list gives the same crops), not on the other photos. The
    crops are drawn as training crops are, with flips, rotations and mild colour jitter."""
    parts = []
    for k, name in enumerate(names):
        rng = numpy_rng(seed, stream, k)
        batch = PairStream([load_photo(find_photo(name))], rng, size=size, scale=scale).batch(
            per_photo
        )
        batch.photo[:] = k
        parts.append(batch)
    return Batch(
        hr=np.concatenate([b.hr for b in parts]),
        lr=np.concatenate([b.lr for b in parts]),
        up=np.concatenate([b.up for b in parts]),
        photo=np.concatenate([b.photo for b in parts]),
    )


def to_tensor(images: np.ndarray):  # -> torch.Tensor
    """[B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1], as the VAE encoder takes it."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0
