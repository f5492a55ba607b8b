"""Natural-scene statistics shared by BRISQUE and NIQE (Mittal, Moorthy, Bovik 2012/2013).

An image's mean-subtracted contrast-normalised (MSCN) coefficients and the products of
neighbouring coefficients follow (asymmetric) generalized Gaussian laws; distortions change the
fitted shapes and spreads. Everything here is vectorised over leading axes so NIQE can fit all of
an image's patches at once.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.special import gammaln

# ITU-R BT.709 luma, the weights skimage.color.rgb2gray uses (the brisque model saw those).
LUMA_709 = np.array([0.2125, 0.7154, 0.0721])
MSCN_C = 1.0 / 255.0  # the papers' C = 1 on 0..255 images
_ALPHA_MIN, _ALPHA_MAX = 0.2, 10.0


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Float64 gray [H, W] from float RGB [H, W, 3] in [0, 1]."""
    return np.asarray(rgb, dtype=np.float64) @ LUMA_709


def gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """Normalised 2-D Gaussian window; 7x7 with sigma 7/6 in both papers."""
    offsets = np.arange(size) - size // 2
    g = np.exp(-(offsets**2) / (2.0 * sigma**2))
    window = np.outer(g, g)
    return window / window.sum()


def mscn(gray: np.ndarray, *, mode: str = "constant") -> tuple[np.ndarray, np.ndarray]:
    """MSCN coefficients and the local standard deviation map of a gray image.

    ``mode`` is the scipy border mode: "constant" (zero padding) is what the ``brisque`` package
    trained its model with; NIQE uses "nearest" (MATLAB's 'replicate').
    """
    window = gaussian_window()
    mu = ndimage.correlate(gray, window, mode=mode)
    second = ndimage.correlate(gray * gray, window, mode=mode)
    sigma = np.sqrt(np.abs(second - mu * mu))
    deviation = gray - mu
    # Over a flat neighbourhood the weighted mean misses its pixels by rounding alone; the
    # shape fits are scale-free, so that noise (~1e-16, present at some grey levels and not
    # at others) would be fitted as texture: a flat tile scored NIQE 26 at 0.3 and 909 at 0.5.
    rounding = window.size * np.finfo(np.float64).eps * float(np.abs(gray).max(initial=0.0))
    deviation[np.abs(deviation) <= rounding] = 0.0
    return deviation / (sigma + MSCN_C), sigma


def pair_products(m: np.ndarray) -> tuple[np.ndarray, ...]:
    """Horizontal, vertical, main- and anti-diagonal neighbour products of MSCN [..., H, W]."""
    return (
        m[..., :, :-1] * m[..., :, 1:],
        m[..., :-1, :] * m[..., 1:, :],
        m[..., :-1, :-1] * m[..., 1:, 1:],
        m[..., 1:, :-1] * m[..., :-1, 1:],
    )


@lru_cache(maxsize=1)
def _shape_table() -> tuple[np.ndarray, np.ndarray]:
    # rho(a) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) rises monotonically with the shape a, so
    # inverting it is a 1-D interpolation instead of a root search per fit.
    alphas = np.linspace(_ALPHA_MIN, _ALPHA_MAX, 9801)
    rho = np.exp(2.0 * gammaln(2.0 / alphas) - gammaln(1.0 / alphas) - gammaln(3.0 / alphas))
    return rho, alphas


def _shape_from_ratio(ratio: np.ndarray) -> np.ndarray:
    rho, alphas = _shape_table()
    return np.interp(ratio, rho, alphas)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def ggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-mean generalized Gaussian fit over the last axis: (shape alpha, variance)."""
    x = np.asarray(x, dtype=np.float64)
    second = np.mean(x * x, axis=-1)
    first = np.mean(np.abs(x), axis=-1)
    return _shape_from_ratio(_safe_div(first * first, second)), second


def aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric GGD fit over the last axis: (shape, mean, left variance, right variance)."""
    x = np.asarray(x, dtype=np.float64)
    sq = x * x
    left = x < 0
    var_l = _safe_div(np.sum(sq * left, axis=-1), np.sum(left, axis=-1).astype(np.float64))
    var_r = _safe_div(np.sum(sq * ~left, axis=-1), np.sum(~left, axis=-1).astype(np.float64))
    sigma_l, sigma_r = np.sqrt(var_l), np.sqrt(var_r)
    gamma = _safe_div(sigma_l, sigma_r)
    first = np.mean(np.abs(x), axis=-1)
    r_hat = _safe_div(first * first, np.mean(sq, axis=-1))
    ratio = r_hat * (gamma**3 + 1.0) * (gamma + 1.0) / (gamma**2 + 1.0) ** 2
    alpha = _shape_from_ratio(ratio)
    spread = np.exp(0.5 * (gammaln(1.0 / alpha) - gammaln(3.0 / alpha)))
    mean = (sigma_r - sigma_l) * spread * np.exp(gammaln(2.0 / alpha) - gammaln(1.0 / alpha))
    return alpha, mean, var_l, var_r


def nss_features(m: np.ndarray, *, symmetric_mscn: bool) -> np.ndarray:
    """18 features from MSCN values ``m`` [..., H, W]; fits run over the last two axes.

    MSCN: (shape, variance); each neighbour product: (shape, mean, left var, right var).
    ``symmetric_mscn`` fits the MSCN law with a GGD (NIQE); otherwise with the AGGD and the mean
    of its two variances (the ``brisque`` package's model).
    """
    lead = m.shape[:-2]
    flat = m.reshape(*lead, -1)
    if symmetric_mscn:
        alpha, var = ggd_fit(flat)
    else:
        alpha, _, var_l, var_r = aggd_fit(flat)
        var = 0.5 * (var_l + var_r)
    features = [alpha, var]
    for product in pair_products(m):
        features.extend(aggd_fit(product.reshape(*lead, -1)))
    return np.stack(features, axis=-1)


def _half_cubic_taps(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Half-pixel-centred cubic (Keys, a = -0.75) at exactly 1/2 scale: every output sits midway
    # between two inputs, so the taps are fixed; borders replicate. This is OpenCV's INTER_CUBIC
    # at fx = fy = 0.5, which the brisque package's features were computed with.
    out = max(1, int(np.rint(n / 2.0)))
    base = 2 * np.arange(out)
    index = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)
    weights = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    return index, weights


def half_cubic(gray: np.ndarray) -> np.ndarray:
    """Downscale a gray image [H, W] by 2 with non-antialiased cubic interpolation."""
    rows, w = _half_cubic_taps(gray.shape[0])
    tmp = np.tensordot(gray[rows], w, axes=([1], [0]))
    cols, w = _half_cubic_taps(gray.shape[1])
    return np.tensordot(tmp[:, cols], w, axes=([2], [0]))
