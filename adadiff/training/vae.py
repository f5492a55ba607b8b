"""Stage 1: train the model's AutoencoderKL on HR crops one tile in size.

Loss: L1 + ``perceptual_weight`` * LPIPS (AlexNet, from the metric set-up) + ``kl_weight`` * KL,
on a sampled posterior, as Stable Diffusion's autoencoder without the discriminator. That
autoencoder sums its reconstruction loss over pixels; with a mean L1 the summed KL is divided by
the image's value count (``kl_reduction="value"``) to keep the same balance. Summed as it is
(``"sum"``, how the first `tiny`'s VAE trained) it weighs 3 * H * W times more, and the posterior
noise it keeps drowns whole latent channels. A share of
the inputs (``lr_input_prob``) are bicubic-upscaled x4-degraded crops, reconstructed as they are:
the encoder meets exactly those at inference, so it must represent them too.

The network is fully convolutional (plus one attention block at the lowest resolution), so it can
train on crops smaller than a tile (``crop``), which costs far less per sample on a CPU; a last
stretch at the tile size (resume with another ``crop``) matches the statistics of inference.

The latent scaling factor (1 / std of the latent means over fixed crops) is measured at every
checkpoint; the UNet stage trains on latents scaled by it and the shipped config records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from adadiff.config import ModelConfig
from adadiff.errors import ConfigError
from adadiff.models.wrappers import DiffusersModel
from adadiff.quality.lpips import load_lpips
from adadiff.training.checkpoint import load_latest
from adadiff.training.data import check_min_scale
from adadiff.training.deadleaves import with_dead_leaves
from adadiff.training.loop import (
    Progress,
    StageResult,
    TrainOptions,
    numpy_rng,
    rng_state,
    run_stage,
    set_rng_state,
)
from adadiff.training.pairs import (
    PairStream,
    load_images,
    merged_photos,
    photo_names,
    photos_a_crop_fits,
    to_tensor,
    warn_scale_caps,
)

STAGE = "vae"
SCALE_CROPS = 32  # crops used to measure the latent scaling factor
KL_REDUCTIONS = ("value", "sum")


@dataclass(frozen=True, kw_only=True)
class VAEOptions:
    perceptual_weight: float = 0.1
    kl_weight: float = 1e-6
    kl_reduction: str = "value"  # "value": per image value, as SD's autoencoder; "sum": legacy
    lr_input_prob: float = 0.25
    realesrgan_prob: float = 0.0
    grad_clip: float = 1.0
    crop: int | None = None  # training crop side; None: the config's tile size
    min_scale: float = 1.0  # scale augmentation of the crops (CropConfig.min_scale)
    deadleaves: int = 0  # synthetic dead-leaves images added to the photos (deadleaves.py)

    def __post_init__(self) -> None:
        if self.crop is not None and (self.crop < 8 or self.crop % 8):
            raise ConfigError(f"crop must be a multiple of 8 (>= 8), got {self.crop}")
        if self.perceptual_weight < 0 or self.kl_weight < 0 or self.grad_clip <= 0:
            raise ConfigError(f"VAE loss weights must be >= 0 and grad_clip > 0, got {self}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(
                f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}"
            )
        check_min_scale(self.min_scale)
        if self.deadleaves < 0:
            raise ConfigError(f"deadleaves must be >= 0, got {self.deadleaves}")
        if not 0 <= self.lr_input_prob <= 1:
            raise ConfigError(f"lr_input_prob must be in [0, 1], got {self.lr_input_prob}")


def build_vae(cfg: ModelConfig, seed: int) -> DiffusersModel:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**cfg.vae)


def encode_moments(vae: DiffusersModel, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the posterior, unscaled; the encoder path of VAEEncoderWrapper."""
    moments = vae.encoder(image)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


class VAEStage:
    name = STAGE

    def __init__(
        self,
        cfg: ModelConfig,
        opts: TrainOptions,
        vopts: VAEOptions,
        images: list[np.ndarray],
        *,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.cfg, self.opts, self.vopts = cfg, opts, vopts
        self.photos: list[str] = []  # names of the training photos, for the model card
        self.vae = build_vae(cfg, opts.seed).train()
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=opts.lr, weight_decay=0.0)
        self.rng = numpy_rng(opts.seed, 1)
        self.torch_rng = torch.Generator().manual_seed(opts.seed)
        self.stream = PairStream(
            images,
            self.rng,
            size=vopts.crop or cfg.tile_size,
            scale=cfg.upscale,
            realesrgan_prob=vopts.realesrgan_prob,
            min_scale=vopts.min_scale,
        )
        self.scale_crops = PairStream(images, numpy_rng(opts.seed, 2), size=cfg.tile_size).hr(
            SCALE_CROPS
        )
        self.lpips = None
        if vopts.perceptual_weight > 0:
            self.lpips = load_lpips(cache_dir)
        self.scaling_factor = cfg.scaling_factor
        self.phases: list[list[int]] = []  # [first step, crop side] of each crop size used

    def _inputs(self) -> torch.Tensor:
        b = self.stream.batch(self.opts.batch)
        use_up = self.rng.random(self.opts.batch) < self.vopts.lr_input_prob
        return to_tensor(np.where(use_up[:, None, None, None], b.up, b.hr))

    def step(self, step: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.opts.lr_at(step)
        crop = self.vopts.crop or self.cfg.tile_size
        if not self.phases or self.phases[-1][1] != crop:
            self.phases.append([step, crop])
        x = self._inputs()
        mean, logvar = encode_moments(self.vae, x)
        std = torch.exp(0.5 * logvar)
        z = mean + std * torch.randn(mean.shape, generator=self.torch_rng)
        rec = self.vae.decode(z, return_dict=False)[0]
        l1 = F.l1_loss(rec, x)
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        kl_scale = 1.0 / x[0].numel() if self.vopts.kl_reduction == "value" else 1.0
        loss = l1 + self.vopts.kl_weight * kl_scale * kl
        terms = {"l1": l1.item()}
        if self.lpips is not None:
            perceptual = self.lpips(rec.clamp(-1, 1), x).mean()
            loss = loss + self.vopts.perceptual_weight * perceptual
            terms["lpips"] = perceptual.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.vopts.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            mse = F.mse_loss(rec.clamp(-1, 1), x) / 4.0  # images span 2, PSNR is on [0, 1]
        terms.update(kl=kl.item(), psnr=float(-10.0 * torch.log10(mse + 1e-12)), loss=loss.item())
        return terms

    @torch.no_grad()
    def measure_scaling_factor(self) -> float:
        self.vae.eval()
        mean, _ = encode_moments(self.vae, to_tensor(self.scale_crops))
        self.vae.train()
        return float(1.0 / mean.std().clamp_min(1e-6))

    def state_dict(self) -> dict[str, Any]:
        self.scaling_factor = self.measure_scaling_factor()
        return {
            "vae": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.rng),
            "torch_rng": self.torch_rng.get_state(),
            "phases": [list(p) for p in self.phases],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self.rng, state["rng"])
        self.torch_rng.set_state(state["torch_rng"])
        self.phases = [list(p) for p in state.get("phases", [])]

    def summary(self) -> dict[str, Any]:
        return {
            "photos": list(self.photos),
            "scaling_factor": self.scaling_factor,
            "options": self.vopts.__dict__.copy(),
            "crop_phases": [list(p) for p in self.phases],
        }


def train_vae(
    cfg: ModelConfig,
    workdir: str | Path,
    opts: TrainOptions,
    vopts: VAEOptions = VAEOptions(),
    *,
    images: list[np.ndarray] | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> StageResult:
    """Train (or resume) the VAE into ``workdir/vae``."""
    names: list[str] = []
    if images is None:
        names, images = photo_names("train"), load_images("train")
    names, images = with_dead_leaves(names, images, vopts.deadleaves, seed=opts.seed, stage=STAGE)
    names, images = photos_a_crop_fits(names, images, vopts.crop or cfg.tile_size, stage=STAGE)
    warn_scale_caps(names, images, vopts.crop or cfg.tile_size, vopts.min_scale, stage=STAGE)
    stage = VAEStage(cfg, opts, vopts, images, cache_dir=cache_dir)
    latest = load_latest(Path(workdir) / STAGE, stage=STAGE)
    # what every run of the stage trained on, for the model card: a resume with fewer photos
    # (or without --deadleaves) keeps the rest
    before = (latest or {}).get("summary", {}).get("photos", [])
    stage.photos = merged_photos(before, names)
    return run_stage(stage, Path(workdir) / STAGE, opts, config=cfg.to_dict(), progress=progress)
