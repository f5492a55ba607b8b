"""Synthetic training images from the dead-leaves model, made by adadiff from a seed.

Fourteen photos are too few for a UNet much wider than the shipped one: it learns them and fails
on unseen content. Dead-leaves images are occluding shapes whose sizes follow a power law, so
their statistics look the same at every scale, as those of natural images roughly do; they give
edges of every orientation, contrast and size, and T-junctions where shapes overlap. Each shape
here also carries one of a few textures (a grating, filtered noise, a shading ramp), since flat
shapes alone teach nothing about texture. Images are drawn at twice the size and averaged down,
so edges are anti-aliased as a camera's would be; some get a slight blur (depth of field).

Nothing here is a photo: these images add content variety, not realism. A training stage mixes
``n`` of them with the photos (each counts as one more photo under photo weighting).
"""

from __future__ import annotations

import numpy as np

from adadiff.errors import ConfigError
from adadiff.training.degrade import anisotropic_kernel, filter2d
from adadiff.training.synthetic import beside_photos, seeded_set

NAME_PREFIX = "deadleaves-"
SOURCE = "made by adadiff (adadiff.training.deadleaves, dead-leaves model, seeded)"


def _radii(rng: np.random.Generator, n: int, rmin: float, rmax: float) -> np.ndarray:
    # p(r) ~ r^-3 on [rmin, rmax]: the scale-invariant choice
    u = rng.random(n)
    return (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5


def _colour(rng: np.random.Generator) -> np.ndarray:
    grey = rng.random()
    hue = rng.random(3)
    saturation = rng.beta(1.2, 3.0)  # mostly muted, now and then vivid
    return np.clip(grey + saturation * (hue - hue.mean()), 0.0, 1.0)


def _texture(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: float
) -> np.ndarray | None:
    """A luminance pattern in [-1, 1] over the shape's box, or None for a flat shape."""
    kind = rng.choice(4, p=[0.35, 0.25, 0.2, 0.2])
    if kind == 0:
        return None
    if kind == 1:  # grating: stripes, fabric, bricks seen from afar
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, max(4.0, size / 2))
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
        return np.sign(wave) * np.abs(wave) ** rng.uniform(0.3, 1.0)
    if kind == 2:  # shading ramp across the shape
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (xx * np.cos(angle) + yy * np.sin(angle)) / max(size, 1.0)
        return np.clip(ramp - ramp.mean(), -1, 1)
    # filtered noise: grain, foliage, gravel
    noise: np.ndarray = rng.standard_normal(yy.shape)
    cell = int(rng.integers(1, 5))
    if cell > 1:
        small = noise[::cell, ::cell]
        noise = np.kron(small, np.ones((cell, cell)))[: yy.shape[0], : yy.shape[1]]
    return np.clip(noise / 2.0, -1, 1)


def dead_leaves(
    rng: np.random.Generator,
    size: int = 512,
    *,
    rmin: float = 3.0,
    rmax: float | None = None,
    coverage: float = 4.0,
    supersample: int = 2,
) -> np.ndarray:
    """One ``size`` x ``size`` RGB image, float32 in [0, 1]."""
    if size < 16 or supersample < 1:
        raise ConfigError(f"size must be >= 16 and supersample >= 1, got {size}, {supersample}")
    big = size * supersample
    r_hi = (rmax if rmax is not None else size / 3) * supersample
    r_lo = rmin * supersample
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = _colour(rng)
    # painter's order in random order, enough shapes to cover each pixel ``coverage`` times on
    # average (mean area of a shape: pi E[r^2] under the r^-3 law), so little background is left
    mean_r2 = 2 * r_lo**2 * np.log(r_hi / r_lo) / (1 - (r_lo / r_hi) ** 2)
    count = int(coverage * big * big / (np.pi * mean_r2))
    for r in _radii(rng, count, r_lo, r_hi):
        cy, cx = rng.uniform(-r, big + r, 2)
        aspect = rng.uniform(1.0, 2.5)
        angle = rng.uniform(0, np.pi)
        a, b = r * np.sqrt(aspect), r / np.sqrt(aspect)
        rectangle = rng.random() < 0.2  # now and then: straight edges and corners
        shape = shape_mask(cy, cx, a, b, angle, rectangle, big)
        if shape is None:
            continue
        (y0, y1, x0, x1), yy, xx, mask = shape
        colour = _colour(rng).astype(np.float32)
        patch = np.broadcast_to(colour, (*mask.shape, 3)).copy()
        texture = _texture(rng, yy, xx, r)
        if texture is not None:
            amplitude = rng.uniform(0.05, 0.3)
            patch = patch + amplitude * texture[..., None].astype(np.float32)
        canvas[y0:y1, x0:x1][mask] = patch[mask]
    image = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    if rng.random() < 0.4:
        sigma = rng.uniform(0.3, 1.2)
        size = 2 * int(np.ceil(3 * sigma)) + 1
        image = filter2d(image, anisotropic_kernel(size, sigma, sigma, 0.0))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def shape_mask(
    cy: float, cx: float, a: float, b: float, angle: float, rectangle: bool, big: int
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, np.ndarray] | None:
    """One leaf on a ``big``-pixel canvas: its box (y0, y1, x0, x1), the box's pixel
    coordinates and the mask of the ellipse (or rectangle) with half-axes a >= b, rotated by
    ``angle``; None when nothing of it is on the canvas."""
    # an ellipse fits in a box of half-side a; a rotated rectangle's corners reach hypot(a, b)
    h = float(np.hypot(a, b)) if rectangle else a
    y0, y1 = int(max(cy - h, 0)), int(min(cy + h + 1, big))
    x0, x1 = int(max(cx - h, 0)), int(min(cx + h + 1, big))
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    inside = (np.abs(u) <= a) & (np.abs(v) <= b) if rectangle else (u / a) ** 2 + (v / b) ** 2 <= 1
    if not inside.any():
        return None
    return (y0, y1, x0, x1), yy, xx, inside


def dead_leaves_set(n: int, seed: int = 0, size: int = 512) -> tuple[list[str], list[np.ndarray]]:
    """``n`` images and their names; image k depends on (seed, k) only."""
    return seeded_set(
        dead_leaves, n, seed=seed, salt=7919, prefix=NAME_PREFIX, what="dead-leaves", size=size
    )


def with_dead_leaves(
    names: list[str], images: list[np.ndarray], n: int, *, seed: int, stage: str
) -> tuple[list[str], list[np.ndarray]]:
    """The photos (and their names) followed by ``n`` dead-leaves images of ``seed``; what a
    training stage's ``--deadleaves`` adds."""
    return beside_photos(
        names, images, dead_leaves_set(n, seed=seed), stage=stage, what="dead-leaves"
    )
