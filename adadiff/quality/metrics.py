"""Full-reference metrics in numpy/scipy on float RGB images [H, W, 3] in [0, 1].

- psnr: higher is better; dB in [0, inf), inf when identical; MSE over all pixels and channels.
  ``psnr_capped`` stops at ``PSNR_CAP_DB`` so means over tiles stay finite (a flat crop can be
  reproduced exactly).
- ssim: higher is better; [-1, 1], 1 when identical (Wang et al. 2004); Gaussian window 11x11,
  sigma 1.5; the mean of the three channels' SSIM (as skimage with channel_axis).
- gmsd: lower is better; [0, ~0.35], 0 when identical (Xue et al. 2014); standard deviation of
  the gradient-magnitude similarity map on BT.601 luma.
- nlpd: lower is better; [0, ~1], 0 when identical (Laparra et al. 2016/2017); six-level
  normalised Laplacian pyramid per channel.

Arguments are (distorted, reference); every metric here is symmetric except in name.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from adadiff.errors import ShapeError

_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_SSIM_SIGMA, _SSIM_TRUNCATE = 1.5, 3.5  # 11x11 window (radius 5), as skimage and Wang et al.

_GMSD_C = 170.0 / 255.0**2  # the paper's T = 170 for images on 0..255
_PREWITT = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0

# NLPD parameters fitted by Laparra et al. (2017) for RGB in [0, 1]: per level, the constant
# sigma and the 3x3 weights on |neighbours| (top, left, right, bottom; zero centre and corners).
_NLPD_LOWPASS = np.outer([0.05, 0.25, 0.4, 0.25, 0.05], [0.05, 0.25, 0.4, 0.25, 0.05])
_NLPD_SIGMAS = (0.0248, 0.0185, 0.0179, 0.0191, 0.0220, 0.2782)
_NLPD_NEIGHBOURS = (
    (0.1011, 0.1493, 0.1460, 0.1015),
    (0.0757, 0.1986, 0.1846, 0.0837),
    (0.0477, 0.2138, 0.2243, 0.0467),
    (0.0, 0.2503, 0.2616, 0.0),
    (0.0, 0.2598, 0.2552, 0.0),
    (0.0, 0.2215, 0.0717, 0.0),
)
NLPD_LEVELS = len(_NLPD_SIGMAS)


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    """A float image with finite values, as every metric here expects ([0, 1] by convention):
    integer levels would be read as values up to 255, and NaN would come out as a NaN score."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise ShapeError(
            f"{name} expects float images in [0, 1], got {image.dtype}; divide uint8 levels by "
            "255 (uint16 by 65535)"
        )
    if not np.all(np.isfinite(image)):
        raise ShapeError(f"{name}: images contain NaN or infinite values")
    return image


def _check_pair(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = check_image(x, name), check_image(y, name)
    if x.shape != y.shape or x.ndim != 3 or x.shape[2] != 3:
        raise ShapeError(
            f"{name} compares two float RGB images [H, W, 3] of one shape, got {x.shape} and "
            f"{y.shape}"
        )
    return x.astype(np.float64), y.astype(np.float64)


def psnr(x: np.ndarray, y: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    x, y = _check_pair(x, y, "psnr")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


PSNR_CAP_DB = 100.0


def psnr_capped(x: np.ndarray, y: np.ndarray, *, data_range: float = 1.0) -> float:
    """``psnr`` capped at ``PSNR_CAP_DB``, for scores that are averaged or differenced."""
    return min(psnr(x, y, data_range=data_range), PSNR_CAP_DB)


def _blur(values: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(
        values, sigma=_SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode="reflect"
    )


def ssim_map(x: np.ndarray, y: np.ndarray, *, data_range: float = 1.0) -> np.ndarray:
    """Per-pixel SSIM of two gray images [H, W] (borders included)."""
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    mx, my = _blur(x), _blur(y)
    vx = _blur(x * x) - mx * mx
    vy = _blur(y * y) - my * my
    cov = _blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(x: np.ndarray, y: np.ndarray, *, data_range: float = 1.0) -> float:
    """Mean SSIM over the three channels, ignoring the window radius at the borders."""
    x, y = _check_pair(x, y, "ssim")
    radius = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)
    if min(x.shape[:2]) <= 2 * radius:
        raise ShapeError(f"ssim needs images of at least {2 * radius + 1} px, got {x.shape}")
    crop = (slice(radius, -radius), slice(radius, -radius))
    values = [ssim_map(x[:, :, c], y[:, :, c], data_range=data_range)[crop] for c in range(3)]
    return float(np.mean([v.mean() for v in values]))


def _luma601(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _gradient_magnitude(gray: np.ndarray) -> np.ndarray:
    gx = ndimage.correlate(gray, _PREWITT, mode="constant")
    gy = ndimage.correlate(gray, _PREWITT.T, mode="constant")
    return np.sqrt(gx * gx + gy * gy)


def gmsd(x: np.ndarray, y: np.ndarray) -> float:
    """Gradient magnitude similarity deviation; 0 for identical images, higher is worse."""
    x, y = _check_pair(x, y, "gmsd")
    if min(x.shape[:2]) < 4:
        raise ShapeError(f"gmsd needs images of at least 4x4, got {x.shape}")
    # The paper averages 2x2 blocks and keeps every other pixel before taking gradients.
    grads = []
    for image in (x, y):
        # origin -1 puts each window on pixels (2i, 2i+1): aligned blocks, as the reference code.
        gray = ndimage.uniform_filter(_luma601(image), size=2, origin=-1, mode="constant")[::2, ::2]
        grads.append(_gradient_magnitude(gray))
    gx, gy = grads
    similarity = (2.0 * gx * gy + _GMSD_C) / (gx * gx + gy * gy + _GMSD_C)
    return float(np.std(similarity))


def _divisive_normaliser(level: int) -> np.ndarray:
    top, left, right, bottom = _NLPD_NEIGHBOURS[level]
    return np.array([[0.0, top, 0.0], [left, 0.0, right], [0.0, bottom, 0.0]])


def _downsample(values: np.ndarray) -> np.ndarray:
    return ndimage.correlate(values, _NLPD_LOWPASS, mode="reflect")[::2, ::2]


def _upsample(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # Zero insertion, then the low-pass filter scaled by 4 to restore the mean.
    up = np.zeros(shape)
    up[::2, ::2] = values
    return ndimage.correlate(up, 4.0 * _NLPD_LOWPASS, mode="reflect")


def normalised_laplacian_pyramid(plane: np.ndarray) -> list[np.ndarray]:
    """The six NLPD levels of one channel [H, W]: band-pass levels divided by local amplitude."""
    levels = []
    current = plane
    for level in range(NLPD_LEVELS):
        if level < NLPD_LEVELS - 1:
            low = _downsample(current)
            band = current - _upsample(low, current.shape)
        else:
            low, band = current, current  # the last level is the low-pass residual itself
        # convolve, not correlate: the authors' MATLAB conv2 flips the (asymmetric) weights.
        local = ndimage.convolve(np.abs(band), _divisive_normaliser(level), mode="reflect")
        levels.append(band / (_NLPD_SIGMAS[level] + local))
        current = low
    return levels


def nlpd(x: np.ndarray, y: np.ndarray) -> float:
    """Normalised Laplacian pyramid distance; 0 for identical images, higher is worse.

    Per channel and level: the root mean square difference of the normalised coefficients;
    the result is the mean over levels and channels.
    """
    x, y = _check_pair(x, y, "nlpd")
    if min(x.shape[:2]) < 2 ** (NLPD_LEVELS - 1):
        raise ShapeError(
            f"nlpd needs images of at least {2 ** (NLPD_LEVELS - 1)} px, got {x.shape}"
        )
    distances = []
    for c in range(3):
        for a, b in zip(
            normalised_laplacian_pyramid(x[:, :, c]),
            normalised_laplacian_pyramid(y[:, :, c]),
            strict=True,
        ):
            distances.append(np.sqrt(np.mean((a - b) ** 2)))
    return float(np.mean(distances))
