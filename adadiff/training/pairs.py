"""Seeded batches of (LR, bicubic-upscaled LR, HR) crops, as the trainers and label runs need them.

The conditioning image is exactly what the runtime encodes: the LR image upscaled with
``adadiff.imageio.bicubic_upscale`` (the Upscaler's own resize), in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adadiff.errors import ConfigError
from adadiff.imageio import bicubic_upscale
from adadiff.training.data import (
    CropConfig,
    holdout_photos,
    load_photo,
    pair,
    sample_crops,
    training_photos,
)

PHOTO_SETS = ("train", "holdout")


def load_images(which: str = "train") -> list[np.ndarray]:
    """The training photos (hold-out excluded) or the hold-out photos, float32 RGB in [0, 1]."""
    if which == "train":
        photos = training_photos()
    elif which == "holdout":
        photos = holdout_photos()
    else:
        raise ConfigError(f"photo set must be one of {PHOTO_SETS}, got {which!r}")
    if not photos:
        raise ConfigError("no training photos are installed; install scikit-image")
    return [load_photo(p) for p in photos]


@dataclass
class Batch:
    hr: np.ndarray  # [B, H, W, 3] in [0, 1]
    lr: np.ndarray  # [B, H/s, W/s, 3]
    up: np.ndarray  # [B, H, W, 3]: lr bicubic-upscaled, what the runtime encodes


class PairStream:
    """Endless seeded stream of augmented crops and their degraded pairs.

    ``realesrgan_prob`` is the chance that a crop gets Real-ESRGAN's second-order degradation
    instead of plain bicubic x4. All randomness comes from ``rng``; restoring its state restores
    the stream.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        rng: np.random.Generator,
        *,
        size: int,
        scale: int = 4,
        realesrgan_prob: float = 0.0,
    ) -> None:
        if not 0 <= realesrgan_prob <= 1:
            raise ConfigError(f"realesrgan_prob must be in [0, 1], got {realesrgan_prob}")
        if scale != 4:
            raise ConfigError(f"the degradation pipeline is x4 only, got upscale {scale}")
        self.rng = rng
        self.scale = scale
        self.realesrgan_prob = realesrgan_prob
        self._crops = sample_crops(images, rng, CropConfig(size=size))

    def hr(self, n: int) -> np.ndarray:
        return np.stack([next(self._crops) for _ in range(n)])

    def batch(self, n: int) -> Batch:
        hr, lr = [], []
        for _ in range(n):
            crop = next(self._crops)
            mode = "realesrgan" if self.rng.random() < self.realesrgan_prob else "bicubic"
            low, _ = pair(crop, self.rng, mode)
            hr.append(crop)
            lr.append(low)
        up = [bicubic_upscale(low, self.scale) for low in lr]
        return Batch(hr=np.stack(hr), lr=np.stack(lr), up=np.stack(up))


def to_tensor(images: np.ndarray):  # -> torch.Tensor
    """[B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1], as the VAE encoder takes it."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0
