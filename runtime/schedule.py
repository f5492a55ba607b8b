"""Noise schedule and the DDIM (eta = 0) jump between two arbitrary timesteps, per tile."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from adadiff.config import NoiseScheduleConfig, PredictionType


@lru_cache(maxsize=8)
def _alphas_cumprod(n: int, beta_start: float, beta_end: float, kind: str) -> np.ndarray:
    if kind == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    else:
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    out = np.cumprod(1.0 - betas)
    out.setflags(write=False)
    return out


def alphas_cumprod(cfg: NoiseScheduleConfig) -> np.ndarray:
    """alpha_bar_t for t = 0 .. T-1 (float64, read-only)."""
    return _alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule)


def _per_sample(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def split_prediction(
    z: np.ndarray, model_out: np.ndarray, t: np.ndarray, cfg: NoiseScheduleConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the noisy latent and the network output at integer timesteps t [B]."""
    ac = alphas_cumprod(cfg)
    a = _per_sample(ac[np.asarray(t, dtype=np.int64)], z.ndim)
    sa, s1a = np.sqrt(a), np.sqrt(1.0 - a)
    if cfg.prediction_type is PredictionType.EPSILON:
        eps = model_out.astype(np.float64)
        x0 = (z - s1a * eps) / sa
    else:
        x0 = sa * z - s1a * model_out
        eps = sa * model_out + s1a * z
    return x0, eps


def ddim_jump(
    z: np.ndarray,
    model_out: np.ndarray,
    t: np.ndarray,
    t_next: np.ndarray,
    cfg: NoiseScheduleConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic DDIM step from t to t_next (< t) for each sample; returns (z_next, x0).

    Tiles in one batch may sit at different t and jump by different amounts. Landing on t = 0
    uses alpha_bar_0 (Stable Diffusion's set_alpha_to_one = False), so that z_0 is the output, or
    1 with ``cfg.set_alpha_to_one``: then z_0 is the last clean estimate.
    """
    t = np.asarray(t, dtype=np.int64)
    t_next = np.asarray(t_next, dtype=np.int64)
    if np.any(t_next >= t) or np.any(t_next < 0):
        raise ValueError(f"DDIM jumps must go down to a timestep >= 0: {t} -> {t_next}")
    x0, eps = split_prediction(z.astype(np.float64), model_out, t, cfg)
    return renoise(x0, eps, t_next, cfg), x0.astype(np.float32)


def renoise(
    x0: np.ndarray, eps: np.ndarray, t_next: np.ndarray, cfg: NoiseScheduleConfig
) -> np.ndarray:
    """The DDIM (eta = 0) latent at t_next for a given clean estimate and noise (t_next = 0 with
    ``cfg.set_alpha_to_one``: the clean estimate)."""
    t_next = np.asarray(t_next, dtype=np.int64)
    a = alphas_cumprod(cfg)[t_next]
    if cfg.set_alpha_to_one:
        a = np.where(t_next == 0, 1.0, a)
    a_next = _per_sample(a, x0.ndim)
    return (np.sqrt(a_next) * x0 + np.sqrt(1.0 - a_next) * eps).astype(np.float32)


def next_timestep(t: int, interval: int) -> int:
    """The tile's next timestep: the last jump always lands exactly on 0."""
    return max(int(t) - int(interval), 0)


def uniform_timesteps(t_start: int, interval: int) -> list[int]:
    """Timesteps at which the UNet runs under a uniform schedule (20 -> 50 steps, 5 -> 200)."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    steps = []
    t = t_start
    while t > 0:
        steps.append(t)
        t = next_timestep(t, interval)
    return steps
