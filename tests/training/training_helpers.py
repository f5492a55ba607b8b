"""Helpers of the training tests (fixtures are in this folder's conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from adadiff.config import (
    DTSSConfig,
    MetricConfig,
    MMLEConfig,
    ModelConfig,
    PFJConfig,
)
from adadiff.presets import TINY_UNET, TINY_VAE
from adadiff.training.loop import TrainOptions

# FR metrics only: numpy, no set-up files needed.
MICRO_METRICS = (
    MetricConfig(name="psnr", kind="fr", weight=0.1),
    MetricConfig(name="ssim", kind="fr", weight=1.0),
    MetricConfig(name="gmsd", kind="fr", weight=-2.0),
)


def micro_config() -> ModelConfig:
    unet = {
        **TINY_UNET,
        "sample_size": 16,
        "block_out_channels": [8, 16, 16, 16],
        "cross_attention_dim": 8,
        "norm_num_groups": 8,
    }
    vae = {
        **TINY_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [8, 8],
        "norm_num_groups": 4,
        "sample_size": 32,
    }
    return ModelConfig(
        name="micro",
        unet=unet,
        vae=vae,
        tile_size=32,
        tile_overlap=8,
        text_tokens=4,
        dtss=DTSSConfig(tiers=(200, 250, 300, 400)),  # a handful of steps per trajectory
        pfj=PFJConfig(hidden=8),
        mmle=MMLEConfig(hidden=8, metrics=MICRO_METRICS),
    )


def opts(steps: int, **kw) -> TrainOptions:
    return TrainOptions(steps=steps, batch=2, lr=1e-3, seed=3, log_every=1, warmup=2, **kw)


def lpips_ready() -> bool:
    from adadiff.quality.weights import LPIPS_ALEXNET, asset_location

    return asset_location(LPIPS_ALEXNET).is_file()


def small_pool(**kw):
    from adadiff.training.unet import UNetOptions

    return UNetOptions(pool=4, refresh=2, **kw)


LPIPS_METRICS = (
    MetricConfig(name="psnr", kind="fr", weight=0.1),
    MetricConfig(name="lpips", kind="fr", weight=-2.0),
    MetricConfig(name="ssim", kind="fr", weight=1.0),
)


def with_lpips(cfg: ModelConfig) -> ModelConfig:
    return replace(cfg, mmle=MMLEConfig(hidden=8, metrics=LPIPS_METRICS))


def synthetic_labels(
    n: int = 128, side: int = 16, seed: int = 0, lpips: bool = False
) -> dict[str, np.ndarray]:
    """Scores that are simple functions of the latents: learnable by a small CNN. With
    ``lpips``, the metrics are LPIPS_METRICS and the labels carry its two parts."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    lr = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    x0 *= rng.uniform(0.2, 2.0, (n, 1, 1, 1)).astype(np.float32)
    err = np.mean((x0 - lr) ** 2, axis=(1, 2, 3))
    scores = np.stack([30 - 5 * np.log10(err), 1 / (1 + err), 0.1 * err], axis=1)
    # reconstruction error: a function of the LR latent's scale, 35 to 45 dB as PSNR (the total
    # error of the decoded x0, 26 to 31 dB, includes it)
    recon_lr = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    recon_lr *= rng.uniform(0.2, 2.0, (n, 1, 1, 1)).astype(np.float32)
    recon_err = (-4.0 + 0.5 * np.log10(np.mean(recon_lr**2, axis=(1, 2, 3)))).astype(np.float32)
    extra = {}
    if lpips:
        # LPIPS parts: the latent one grows with the x0-LR error, the reconstruction one with
        # the LR latent's scale; the score column is their sum.
        latent_lpips = (0.05 + 0.1 * err / err.max()).astype(np.float32)
        own_recon = 0.02 * np.mean(lr**2, axis=(1, 2, 3))
        scores = np.stack([scores[:, 0], latent_lpips + own_recon, scores[:, 1]], axis=1)
        extra = {
            "metrics": np.array([m.name for m in LPIPS_METRICS]),
            "latent_lpips": latent_lpips,
            "recon_lpips": (0.02 * np.mean(recon_lr**2, axis=(1, 2, 3))).astype(np.float32),
        }
    return {
        "x0": x0,
        "lr": lr,
        "t": rng.integers(0, 1000, n).astype(np.float32),
        "scores": scores,
        "traj": np.arange(n) // 4,
        "call": np.arange(n) % 4,
        "metrics": np.array([m.name for m in MICRO_METRICS]),
        "latent_err": (-3.0 + 0.5 * np.log10(err)).astype(np.float32),  # -10x: the PSNR column
        "recon_lr": recon_lr,
        "recon_err": recon_err,
        "recon_photo": np.zeros(n, dtype=np.int64),
        "recon_photo_name": np.full(n, "", dtype=str),
        "gray_output": np.array("luma"),  # gray inputs scored as the runtime returns them
        **extra,
    }
