"""Synthetic training images of smooth shading, made by adadiff from a seed.

The training photos have texture almost everywhere, and the crop sampler rejects nearly flat
crops, so a UNet rarely sees a smooth surface whose brightness changes slowly. Given one, the
shipped `tiny` invents texture (an orange-peel crosshatch and hard-edged patches on lit
ellipsoids; docs/training.md, "Smooth synthetic shading"). These images are that case: lit
ellipsoids (Lambertian, some with a highlight) in skin and other colours over a smooth
background, edges anti-aliased, with at most a trace of sensor noise, so that "smooth in the LR
input" can teach "smooth in the output". A 1200-step fine-tune on six of them improved such
scenes and left the faces' patches as they were; the shipped weights did not train on them.

Nothing here is a photo. A training stage mixes ``n`` of them with the photos (each counts as
one more photo under photo weighting), as it does dead-leaves images.
"""

from __future__ import annotations

import colorsys

import numpy as np

from adadiff.training.synthetic import beside_photos, seeded_set

NAME_PREFIX = "shading-"
SOURCE = "made by adadiff (adadiff.training.shading, lit ellipsoids, seeded)"


def _albedo(rng: np.random.Generator) -> np.ndarray:
    """A skin tone (light to dark) half the time, else a colour of moderate saturation."""
    if rng.random() < 0.5:
        hue = rng.uniform(0.02, 0.09)
        sat = rng.uniform(0.25, 0.6)
        val = rng.uniform(0.3, 0.95)
    else:
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.05, 0.7), rng.uniform(0.2, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A smooth field: a base colour, a linear ramp and a few broad colour bumps."""
    out = _albedo(rng)[None, None, :] * np.ones((*yy.shape, 1), np.float32)
    ramp = rng.uniform(-0.25, 0.25, 2)
    out = out + (ramp[0] * (yy - 0.5) + ramp[1] * (xx - 0.5))[..., None]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, 1, 2)
        sigma = rng.uniform(0.15, 0.5)
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))
        out = out + bump[..., None] * rng.uniform(-0.2, 0.2, 3).astype(np.float32)
    return out


def shaded_scene(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """One image [size, size, 3] in [0, 1]: 2 to 8 lit ellipsoids, back to front."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    img = _background(rng, yy, xx)
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.3), 1.0], np.float32)
    light /= np.linalg.norm(light)
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    ambient = rng.uniform(0.15, 0.45)
    for _ in range(int(rng.integers(2, 9))):
        cy, cx = rng.uniform(0.05, 0.95, 2)
        ry, rx = np.exp(rng.uniform(np.log(0.04), np.log(0.35), 2))
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        du, dv = xx - cx, yy - cy
        u = (c * du + s * dv) / rx
        v = (-s * du + c * dv) / ry
        r = np.sqrt(u * u + v * v)
        # coverage ramps over about one pixel at the rim: anti-aliased as a camera's edge
        cover = np.clip((1.0 - r) * min(rx, ry) * size, 0.0, 1.0)
        if not cover.any():
            continue
        w = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
        # the surface normal of the ellipsoid, rotated back to image axes
        nu, nv = u / rx, v / ry
        nx, ny, nz = c * nu - s * nv, s * nu + c * nv, w / min(rx, ry)
        norm = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-8
        nx, ny, nz = nx / norm, ny / norm, nz / norm
        lambert = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, 1.0)
        shade = (ambient + (1 - ambient) * lambert)[..., None] * _albedo(rng)
        if rng.random() < 0.4:
            spec = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0.0, 1.0)
            shade = shade + (rng.uniform(0.05, 0.3) * spec ** rng.uniform(8, 40))[..., None]
        img = img * (1 - cover[..., None]) + shade * cover[..., None]
    img = img + rng.normal(0.0, rng.uniform(0.0, 0.003), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def shading_set(n: int, seed: int = 0, size: int = 512) -> tuple[list[str], list[np.ndarray]]:
    """``n`` images and their names; image k depends on (seed, k) only."""
    return seeded_set(
        shaded_scene, n, seed=seed, salt=6151, prefix=NAME_PREFIX, what="shading", size=size
    )


def with_shading(
    names: list[str], images: list[np.ndarray], n: int, *, seed: int, stage: str
) -> tuple[list[str], list[np.ndarray]]:
    """The photos (and their names) followed by ``n`` shading images of ``seed``; what a
    training stage's ``--shading`` adds."""
    return beside_photos(names, images, shading_set(n, seed=seed), stage=stage, what="shading")
