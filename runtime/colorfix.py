"""Wavelet colour correction: a decoded image's detail on the input's low frequencies.

A latent autoencoder decodes a tile with a colour offset that depends on the whole tile (its
normalisation layers see tile-wide statistics), so the output's colour drifts from the input's
by an amount neither the latents nor MMLE can know. The bicubic-upscaled LR input holds the
right low frequencies; the decoded image holds the detail the diffusion added. ``color_fix``
keeps the image minus its low band and adds the reference's low band.

Pure numpy on [..., H, W, C] arrays, so every backend and the oracle share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from adadiff.config import ColorFixConfig
from adadiff.errors import ShapeError

_TAPS = (0.25, 0.5, 0.25)


def _blur_axis(x: np.ndarray, axis: int, step: int) -> np.ndarray:
    """[1, 2, 1] / 4 along ``axis`` with taps ``step`` apart, edges replicated."""
    axis %= x.ndim
    width = [(0, 0)] * x.ndim
    width[axis] = (step, step)
    padded = np.pad(x, width, mode="edge")
    n = x.shape[axis]

    def tap(start: int) -> np.ndarray:
        return padded[(slice(None),) * axis + (slice(start, start + n),)]

    return _TAPS[0] * tap(0) + _TAPS[1] * tap(step) + _TAPS[2] * tap(2 * step)


def low_band(image: np.ndarray, levels: int) -> np.ndarray:
    """What ``levels`` 3x3 blurs with dilations 1, 2, 4, ... leave of [..., H, W, C]."""
    out = np.asarray(image, dtype=np.float32)
    for level in range(levels):
        step = 2**level
        out = _blur_axis(_blur_axis(out, -3, step), -2, step)
    return out


def band(image: np.ndarray, config: ColorFixConfig) -> np.ndarray | None:
    """The part of [..., H, W, C] that the correction swaps: its low band, or None for ``none``.

    A reference's band can be computed once and reused for every image corrected against it."""
    return None if config.kind == "none" else low_band(image, config.levels)


def swap_band(
    image: np.ndarray, image_band: np.ndarray | None, reference_band: np.ndarray | None
) -> np.ndarray:
    """``image`` with its band replaced by the reference's, clipped to [0, 1] (bands from
    ``band``; unchanged when the config corrects nothing)."""
    if image_band is None or reference_band is None:
        return image
    if image.shape != reference_band.shape:
        raise ShapeError(
            f"colour correction needs an image and a reference of one shape [..., H, W, C], got "
            f"{image.shape} and {reference_band.shape}"
        )
    return np.clip(image - image_band + reference_band, 0.0, 1.0).astype(np.float32)


def color_fix(image: np.ndarray, reference: np.ndarray, config: ColorFixConfig) -> np.ndarray:
    """The configured correction of [..., H, W, 3] images in [0, 1] against the bicubic input."""
    return swap_band(image, band(image, config), band(reference, config))


def reach(config: ColorFixConfig) -> int:
    """How many rows away a pixel's correction looks: the blurs' dilations summed."""
    return 0 if config.kind == "none" else 2**config.levels - 1


def color_fix_rows(
    bands: Iterable[tuple[int, np.ndarray]],
    reference_rows: Callable[[int, int], np.ndarray],
    config: ColorFixConfig,
    height: int,
    *,
    min_rows: int = 256,
) -> Iterator[tuple[int, np.ndarray]]:
    """``color_fix`` of an image that arrives in bands of rows (first row, [n, W, 3]), top to
    bottom, against a reference given by ``reference_rows(a, b)``; yields corrected bands.

    Each band is corrected inside a window ``reach`` rows larger on each side, so the result
    equals correcting the whole image at once while only a few hundred rows are held."""
    margin = reach(config)
    if margin == 0:
        yield from bands
        return
    held: list[np.ndarray] = []
    start = 0  # the row that held[0] starts at
    emitted = 0  # rows [0, emitted) are out
    available = 0
    for first, rows in bands:
        if first != available:
            raise ValueError(f"bands must follow each other: expected row {available}, got {first}")
        held.append(rows)
        available = first + len(rows)
        if available < height and available - emitted < min_rows + margin:
            continue
        end = height if available >= height else available - margin
        window = np.concatenate(held) if len(held) > 1 else held[0]
        fixed = color_fix(window, reference_rows(start, available), config)
        yield emitted, fixed[emitted - start : end - start]
        emitted = end
        keep = max(start, emitted - margin)
        held, start = [window[keep - start :]], keep
    if emitted < height:
        raise ValueError(f"the bands end at row {available}, short of the height {height}")
