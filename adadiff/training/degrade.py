"""Seeded degradations: Real-ESRGAN's second-order pipeline, and plain bicubic x4.

The second-order model (Wang et al., "Real-ESRGAN", 2021) applies blur -> random resize ->
noise -> JPEG, then blur -> random resize -> noise again, then resizes to HR/scale with an
optional sinc (ringing) filter and a second, last JPEG (at the second round's quality), in random
order. Every random choice is drawn from the numpy Generator the caller passes,
in a fixed order, so one seed gives one LR image on every machine.

Images are float32 RGB [H, W, 3] in [0, 1]. Resizing uses separable weight matrices: "bilinear"
and "bicubic" (Keys, a = -0.75) sample at half-pixel centres without antialiasing, as PyTorch's
interpolate does in Real-ESRGAN (the aliasing is part of the degradation); "area" averages the
exact box each output pixel covers. ``bicubic_x4`` is the benchmark kernel instead: MATLAB-style
antialiased bicubic (a = -0.5).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image
from scipy import signal
from scipy.special import j1

from adadiff.errors import ConfigError, ShapeError

ResizeMode = Literal["area", "bilinear", "bicubic"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")
KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
_ODD_SIZES = tuple(range(7, 22, 2))


def _check_range(name: str, bounds: tuple[float, float], lo: float, hi: float) -> None:
    if len(bounds) != 2 or not lo <= bounds[0] <= bounds[1] <= hi:
        raise ConfigError(
            f"{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {bounds}"
        )


def _check_probs(name: str, probs: tuple[float, ...], count: int) -> None:
    if len(probs) != count or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
        raise ConfigError(f"{name} must be {count} probabilities summing to 1, got {probs}")


@dataclass(frozen=True, kw_only=True)
class BlurConfig:
    """One blur step: a sinc kernel with ``sinc_prob``, else one of ``KERNEL_TYPES``."""

    prob: float = 1.0
    kernel_sizes: tuple[int, ...] = _ODD_SIZES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    sigma: tuple[float, float] = (0.2, 3.0)
    beta_generalized: tuple[float, float] = (0.5, 4.0)
    beta_plateau: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(int(s) for s in self.kernel_sizes))
        if not self.kernel_sizes or any(s < 3 or s % 2 == 0 for s in self.kernel_sizes):
            raise ConfigError(f"kernel_sizes must be odd and >= 3, got {self.kernel_sizes}")
        _check_probs("kernel_probs", tuple(self.kernel_probs), len(KERNEL_TYPES))
        _check_range("blur prob", (0.0, self.prob), 0.0, 1.0)
        _check_range("sinc_prob", (0.0, self.sinc_prob), 0.0, 1.0)
        _check_range("sigma", self.sigma, 1e-3, 50.0)
        _check_range("beta_generalized", self.beta_generalized, 1e-2, 20.0)
        _check_range("beta_plateau", self.beta_plateau, 1e-2, 20.0)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One round: blur -> random resize -> Gaussian or Poisson noise -> JPEG (the second
    round's JPEG is the last step, before or after the resize to the LR size)."""

    blur: BlurConfig = field(default_factory=BlurConfig)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_sigma: tuple[float, float] = (1.0, 30.0)  # in 8-bit levels
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        _check_probs("resize_probs", tuple(self.resize_probs), 3)
        _check_range("resize_range", self.resize_range, 1e-2, 1e2)
        _check_range("gaussian_noise_prob", (0.0, self.gaussian_noise_prob), 0.0, 1.0)
        _check_range("gray_noise_prob", (0.0, self.gray_noise_prob), 0.0, 1.0)
        _check_range("noise_sigma", self.noise_sigma, 0.0, 255.0)
        _check_range("poisson_scale", self.poisson_scale, 0.0, 100.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1.0, 100.0)


# Real-ESRGAN's published training options (options/train_realesrnet_x4plus.yml).
REALESRGAN_FIRST = StageConfig()
REALESRGAN_SECOND = StageConfig(
    blur=BlurConfig(prob=0.8, sigma=(0.2, 1.5)),
    resize_probs=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_sigma=(1.0, 25.0),
    poisson_scale=(0.05, 2.5),
)


@dataclass(frozen=True, kw_only=True)
class DegradationConfig:
    first: StageConfig = REALESRGAN_FIRST
    second: StageConfig = REALESRGAN_SECOND
    final_sinc_prob: float = 0.8
    scale: int = 4

    def __post_init__(self) -> None:
        for name in ("first", "second"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, StageConfig(**value))
        _check_range("final_sinc_prob", (0.0, self.final_sinc_prob), 0.0, 1.0)
        if self.scale < 1:
            raise ConfigError(f"scale must be >= 1, got {self.scale}")


REALESRGAN = DegradationConfig()
# Half the noise, less blur, kinder JPEG: for a small model trained on few photos.
MILD = DegradationConfig(
    first=StageConfig(
        blur=BlurConfig(sigma=(0.2, 2.0)),
        noise_sigma=(1.0, 15.0),
        poisson_scale=(0.05, 1.5),
        jpeg_quality=(50.0, 95.0),
    ),
    second=StageConfig(
        blur=BlurConfig(prob=0.5, sigma=(0.2, 1.0)),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.5, 1.2),
        noise_sigma=(1.0, 10.0),
        poisson_scale=(0.05, 1.0),
        jpeg_quality=(60.0, 95.0),
    ),
    final_sinc_prob=0.5,
)
# A camera rather than the internet: lens and focus blur, light sensor noise, the camera's own
# JPEG, one plain downscale and a second JPEG: Real-ESRGAN's blur kernels and JPEG range without
# its strong noise and random resizes, after which our small UNets smoothed. On `tiny` neither
# this nor mild has yet beaten bicubic crops alone (docs/training.md).
CAMERA = DegradationConfig(
    first=StageConfig(
        blur=BlurConfig(prob=0.9, sigma=(0.2, 3.0), sinc_prob=0.0),
        resize_probs=(0.0, 0.0, 1.0),
        noise_sigma=(0.0, 3.0),
        poisson_scale=(0.0, 0.3),
        jpeg_quality=(75.0, 95.0),
    ),
    second=StageConfig(
        blur=BlurConfig(prob=0.0),
        resize_probs=(0.0, 0.0, 1.0),
        noise_sigma=(0.0, 1.0),
        poisson_scale=(0.0, 0.1),
        jpeg_quality=(30.0, 95.0),
    ),
    final_sinc_prob=0.0,
)
# The strengths a training stage can ask for by name (``--realesrgan-strength``), and the words
# the CLI help and the model card use for each.
STRENGTHS: dict[str, DegradationConfig] = {"full": REALESRGAN, "mild": MILD, "camera": CAMERA}
STRENGTH_NOTES: dict[str, str] = {
    "full": "Real-ESRGAN's published settings",
    "mild": "half the noise, less blur, kinder JPEG",
    "camera": "blur, light sensor noise, JPEG, one downscale, JPEG; no random resizes",
}


def strength_config(name: str) -> DegradationConfig:
    """The degradation a strength name stands for, or a ConfigError naming the choices."""
    if name not in STRENGTHS:
        raise ConfigError(f"Real-ESRGAN strength must be one of {tuple(STRENGTHS)}, got {name!r}")
    return STRENGTHS[name]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(size, dtype=np.float64) - size // 2
    return np.meshgrid(r, r, indexing="xy")


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on the kernel grid, Sigma = R diag(sx^2, sy^2) R^T."""
    xx, yy = _grid(size)
    c, s = np.cos(theta), np.sin(theta)
    u = c * xx + s * yy  # coordinates along the rotated principal axes
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def anisotropic_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float,
    theta: float,
    *,
    family: Literal["gaussian", "generalized", "plateau"] = "gaussian",
    beta: float = 1.0,
) -> np.ndarray:
    """Normalised (generalized / plateau) Gaussian blur kernel [size, size]."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if family == "gaussian":
        k = np.exp(-0.5 * q)
    elif family == "generalized":
        k = np.exp(-0.5 * q**beta)
    elif family == "plateau":
        k = 1.0 / (q**beta + 1.0)
    else:
        raise ConfigError(f"kernel family must be gaussian, generalized or plateau, got {family!r}")
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel with angular cutoff ``cutoff`` in (0, pi]."""
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = cutoff * j1(cutoff * r) / (2.0 * np.pi * r)
    k[r == 0] = cutoff**2 / (4.0 * np.pi)  # the limit at r -> 0
    return k / k.sum()


def random_kernel(rng: np.random.Generator, config: BlurConfig) -> np.ndarray:
    """One blur kernel drawn as Real-ESRGAN draws it."""
    size = int(rng.choice(config.kernel_sizes))
    if rng.random() < config.sinc_prob:
        low = np.pi / 3 if size < 13 else np.pi / 5
        return sinc_kernel(size, rng.uniform(low, np.pi))
    kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=np.asarray(config.kernel_probs)))]
    sigma_x = rng.uniform(*config.sigma)
    if "aniso" not in kind:
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = rng.uniform(*config.sigma), rng.uniform(-np.pi, np.pi)
    family: Literal["gaussian", "generalized", "plateau"] = "gaussian"
    beta = 1.0
    if kind.startswith("generalized"):
        family = "generalized"
        lo, hi = config.beta_generalized
        beta = rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)
    elif kind.startswith("plateau"):
        family = "plateau"
        lo, hi = config.beta_plateau
        beta = rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)
    return anisotropic_kernel(size, sigma_x, sigma_y, theta, family=family, beta=beta)


def filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve every channel with ``kernel`` (reflect padding), via FFT."""
    pad = kernel.shape[0] // 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def _linear(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


@lru_cache(maxsize=64)
def resize_matrix(
    n_in: int, n_out: int, mode: ResizeMode, antialias: bool = False, cubic_a: float = -0.75
) -> np.ndarray:
    """[n_out, n_in] weights of a 1-D resize; rows sum to 1 (constants stay constant)."""
    scale = n_in / n_out
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    if mode == "area":
        lo = np.arange(n_out)[:, None] * scale
        j = np.arange(n_in)[None, :]
        matrix = np.clip(np.minimum(j + 1.0, lo + scale) - np.maximum(j, lo), 0.0, None)
    elif mode in ("bilinear", "bicubic"):
        radius = 1.0 if mode == "bilinear" else 2.0
        stretch = scale if antialias and scale > 1.0 else 1.0
        centres = (np.arange(n_out) + 0.5) * scale - 0.5
        first = np.floor(centres - radius * stretch).astype(np.int64)
        taps = int(np.ceil(2 * radius * stretch)) + 2
        index = first[:, None] + np.arange(taps)[None, :]
        distance = (index - centres[:, None]) / stretch
        weights = _linear(distance) if mode == "bilinear" else _cubic(distance, cubic_a)
        rows = np.repeat(np.arange(n_out), taps)
        np.add.at(matrix, (rows, np.clip(index, 0, n_in - 1).ravel()), weights.ravel())
    else:
        raise ConfigError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    matrix /= matrix.sum(axis=1, keepdims=True)
    matrix.setflags(write=False)
    return matrix


def resize(
    image: np.ndarray,
    size: tuple[int, int],
    mode: ResizeMode,
    *,
    antialias: bool = False,
    cubic_a: float = -0.75,
) -> np.ndarray:
    """Resize float [H, W, C] to ``size`` = (height, width)."""
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ShapeError(f"resize target must be at least 1x1, got {size}")
    rows = resize_matrix(image.shape[0], height, mode, antialias, cubic_a).astype(np.float32)
    cols = resize_matrix(image.shape[1], width, mode, antialias, cubic_a).astype(np.float32)
    out = np.tensordot(rows, image.astype(np.float32, copy=False), axes=(1, 0))
    out = np.tensordot(cols, out, axes=(1, 1)).transpose(1, 0, 2)
    return np.ascontiguousarray(out, dtype=np.float32)


def bicubic_x4(hr: np.ndarray) -> np.ndarray:
    """Plain x4 bicubic downscale (antialiased, a = -0.5 as MATLAB imresize) to [H//4, W//4]."""
    _check_image(hr, 4)
    small = resize(
        hr, (hr.shape[0] // 4, hr.shape[1] // 4), "bicubic", antialias=True, cubic_a=-0.5
    )
    return np.clip(small, 0.0, 1.0)


def blur_jpeg_x4(hr: np.ndarray, *, sigma: float = 2.0, quality: int = 60) -> np.ndarray:
    """A fixed real-world degradation for evaluation: an isotropic Gaussian blur of ``sigma`` HR
    px (a camera's softness), ``bicubic_x4``, then JPEG at ``quality`` on the LR image."""
    _check_image(hr, 4)
    if sigma > 0:
        size = 2 * int(np.ceil(3 * sigma)) + 1
        hr = np.clip(filter2d(hr, anisotropic_kernel(size, sigma, sigma, 0.0)), 0.0, 1.0)
    return jpeg(bicubic_x4(hr), quality)


# --------------------------------------------------------------------------------------------
# Noise and JPEG
# --------------------------------------------------------------------------------------------


def _gray(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def add_gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, sigma: float, *, gray: bool
) -> np.ndarray:
    """Add N(0, sigma^2) noise (sigma in [0, 1] units); gray noise is shared by the channels."""
    shape = (*image.shape[:2], 1) if gray else image.shape
    noise = rng.normal(0.0, sigma, size=shape).astype(np.float32)
    return np.clip(image + noise, 0.0, 1.0)


def _quantise(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255.0) / 255.0


def add_poisson_noise(
    image: np.ndarray, rng: np.random.Generator, scale: float, *, gray: bool
) -> np.ndarray:
    """Shot noise: photon counts ~ value * 2^ceil(log2(distinct 8-bit levels)), times ``scale``."""
    source = _quantise(_gray(image) if gray else image)
    levels = 2.0 ** np.ceil(np.log2(max(len(np.unique(source)), 2)))
    noise = rng.poisson(source * levels) / levels - source
    if gray:
        noise = noise[:, :, None]
    return np.clip(image + (scale * noise).astype(np.float32), 0.0, 1.0)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode with Pillow's JPEG at ``quality`` (1..95 is Pillow's useful range)."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, scale: int) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ShapeError(f"expected a float RGB image [H, W, 3], got shape {image.shape}")
    if min(image.shape[:2]) < scale:
        raise ShapeError(f"image {image.shape[:2]} is smaller than the scale factor {scale}")


def _random_resize(
    image: np.ndarray, rng: np.random.Generator, config: StageConfig, base: tuple[int, int]
) -> np.ndarray:
    direction = int(rng.choice(3, p=np.asarray(config.resize_probs)))
    lo, hi = config.resize_range
    factor = (rng.uniform(1.0, hi), rng.uniform(lo, 1.0), 1.0)[direction]
    mode = RESIZE_MODES[int(rng.integers(0, 3))]
    size = (max(1, int(base[0] * factor)), max(1, int(base[1] * factor)))
    return resize(image, size, mode)


def _random_noise(image: np.ndarray, rng: np.random.Generator, config: StageConfig) -> np.ndarray:
    gaussian = rng.random() < config.gaussian_noise_prob
    gray = rng.random() < config.gray_noise_prob
    if gaussian:
        return add_gaussian_noise(image, rng, rng.uniform(*config.noise_sigma) / 255.0, gray=gray)
    return add_poisson_noise(image, rng, rng.uniform(*config.poisson_scale), gray=gray)


def _random_jpeg(image: np.ndarray, rng: np.random.Generator, config: StageConfig) -> np.ndarray:
    return jpeg(image, round(rng.uniform(*config.jpeg_quality)))


def degrade(
    hr: np.ndarray, rng: np.random.Generator, config: DegradationConfig = REALESRGAN
) -> np.ndarray:
    """Second-order degradation of HR [H, W, 3] to LR [H // scale, W // scale, 3], 8-bit levels."""
    _check_image(hr, config.scale)
    out = np.clip(hr.astype(np.float32), 0.0, 1.0)
    height, width = out.shape[:2]
    final = (height // config.scale, width // config.scale)

    # First round: sizes relative to the HR image.
    first = config.first
    if rng.random() < first.blur.prob:
        out = filter2d(out, random_kernel(rng, first.blur))
    out = _random_resize(out, rng, first, out.shape[:2])
    out = _random_noise(out, rng, first)
    out = _random_jpeg(out, rng, first)

    # Second round: Real-ESRGAN sizes this resize relative to the final LR size.
    second = config.second
    if rng.random() < second.blur.prob:
        out = filter2d(out, random_kernel(rng, second.blur))
    out = _random_resize(out, rng, second, final)
    out = _random_noise(out, rng, second)

    # Last: [resize to LR + sinc] and JPEG, in random order.
    if rng.random() < config.final_sinc_prob:
        sinc = sinc_kernel(int(rng.choice(_ODD_SIZES)), rng.uniform(np.pi / 3, np.pi))
    else:
        sinc = None
    mode = RESIZE_MODES[int(rng.integers(0, 3))]
    resize_first = rng.random() < 0.5
    quality = round(rng.uniform(*second.jpeg_quality))
    if not resize_first:
        out = jpeg(out, quality)
    out = resize(out, final, mode)
    if sinc is not None:
        out = filter2d(out, sinc)
    if resize_first:
        out = jpeg(out, quality)
    return _quantise(out).astype(np.float32)
