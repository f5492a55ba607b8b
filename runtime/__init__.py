"""Host-side runtime: schedules, the DTSS policy, tiling, the sampler loop and the Upscaler.

Pure parts (schedule, policy, tiling) need only numpy. ``Upscaler`` and ``ImageStream`` are
imported lazily so that ``import adadiff.runtime`` stays light.
"""

from __future__ import annotations

from typing import Any

from adadiff.runtime.content import ContentPolicy, latent_texture
from adadiff.runtime.policy import Category, Decision, DTSSPolicy, UniformPolicy, dtss_decide
from adadiff.runtime.schedule import alphas_cumprod, ddim_jump, uniform_timesteps
from adadiff.runtime.tiling import TileGrid, gaussian_weights

__all__ = [
    "Category",
    "ContentPolicy",
    "DTSSPolicy",
    "Decision",
    "ImageStream",
    "StreamItem",
    "TileGrid",
    "UniformPolicy",
    "Upscaler",
    "alphas_cumprod",
    "ddim_jump",
    "dtss_decide",
    "gaussian_weights",
    "latent_texture",
    "uniform_timesteps",
]


def __getattr__(name: str) -> Any:
    if name == "Upscaler":
        from adadiff.runtime.upscaler import Upscaler

        return Upscaler
    if name in ("ImageStream", "StreamItem"):
        from adadiff.runtime import stream

        return getattr(stream, name)
    raise AttributeError(name)
