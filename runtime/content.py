"""The content schedule: each tile's uniform interval, chosen from its LR latent before sampling.

A small model's later steps add detail where the LR tile has texture and grain where it is flat,
so the number of steps a tile should get follows its content. ``latent_texture`` measures that
content on the encoded LR tile (what every backend already has, no extra network call):
the mean absolute difference between the latent and its [1, 2, 1] blur, over channels and
positions. ``ContentConfig`` (in the model's ``adadiff.json``) turns it into two uniform
intervals. Pure numpy, shared by every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adadiff.config import ContentConfig
from adadiff.errors import ShapeError
from adadiff.runtime.colorfix import low_band
from adadiff.runtime.policy import Category, Decision


def latent_texture(lr_latents: np.ndarray) -> np.ndarray:
    """[N] texture of [N, C, s, s] LR latents: mean |o - blur(o)| of each tile."""
    lr = np.asarray(lr_latents, dtype=np.float32)
    if lr.ndim != 4:
        raise ShapeError(f"LR latents must be [N, C, s, s], got shape {lr.shape}")
    channels_last = np.moveaxis(lr, 1, -1)
    return np.abs(channels_last - low_band(channels_last, 1)).mean(axis=(1, 2, 3))


def content_intervals(lr_latents: np.ndarray, config: ContentConfig) -> tuple[int, ...]:
    """Each tile's uniform interval: ``flat_interval`` below the threshold, else textured."""
    texture = latent_texture(lr_latents)
    return tuple(
        int(config.flat_interval if v < config.threshold else config.textured_interval)
        for v in texture
    )


@dataclass(frozen=True)
class ContentPolicy:
    """Tile k of the image jumps by ``intervals[k]`` at every step (no scores needed)."""

    intervals: tuple[int, ...]
    needs_scores: bool = False

    def __post_init__(self) -> None:
        if any(v < 1 for v in self.intervals):
            raise ValueError(f"intervals must be >= 1, got {self.intervals}")

    @classmethod
    def of(cls, lr_latents: np.ndarray, config: ContentConfig) -> ContentPolicy:
        return cls(content_intervals(lr_latents, config))

    def decide(self, tile: int, t: int, g_fr: float, g_nr: float) -> Decision:
        return Decision(Category.STABLE, self.intervals[tile])
