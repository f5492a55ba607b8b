"""Seeded sets of synthetic training images, and adding them beside a stage's photos."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from adadiff.errors import ConfigError

log = logging.getLogger("adadiff.training")

Draw = Callable[[np.random.Generator, int], np.ndarray]


def seeded_set(
    draw: Draw, n: int, *, seed: int, salt: int, prefix: str, what: str, size: int = 512
) -> tuple[list[str], list[np.ndarray]]:
    """``n`` images of ``draw`` and their names ``prefix0``, ...; image k depends on (seed, salt,
    k) only, so asking for more leaves the first ones as they were."""
    if n < 0:
        raise ConfigError(f"the number of {what} images must be >= 0, got {n}")
    images = [draw(np.random.default_rng([seed, salt, k]), size) for k in range(n)]
    return [f"{prefix}{k}" for k in range(n)], images


def beside_photos(
    names: list[str],
    images: list[np.ndarray],
    synthetic: tuple[list[str], list[np.ndarray]],
    *,
    stage: str,
    what: str,
) -> tuple[list[str], list[np.ndarray]]:
    """The photos (and their names) followed by the synthetic ones. Also beside a caller's own
    images: an option is never ignored."""
    if not synthetic[0]:
        return names, images
    log.info("%s: %d %s images beside the photos", stage, len(synthetic[0]), what)
    return [*names, *synthetic[0]], [*images, *synthetic[1]]
