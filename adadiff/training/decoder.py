"""Stage 2b (optional): fine-tune the VAE decoder of a trained model, encoder frozen.

The UNet learns in the encoder's latent space, so a frozen encoder keeps every later stage valid
while the decoder learns to reconstruct what the encoder gives it better. That matters for two
reasons: the decoder draws every output pixel, and the oracle scores decoded estimates against
the bicubic-upscaled input, so the decoder's reconstruction error of that input sets the level
of every full-reference score, a level the MMLE regressor cannot see in the latents.

The decoder starts from the VAE in the newest UNet checkpoint and learns to map posterior means
(what the runtime decodes is a point estimate too) back to the input: L1 + ``perceptual_weight``
x LPIPS. A share ``lr_input_prob`` of the inputs are bicubic-upscaled LR crops.

With ``latent_noise`` > 0 those posterior means get white Gaussian noise of that standard
deviation, in the scaled units the UNet predicts in. A VAE trained with a small KL weight keeps
almost no posterior noise (a standard deviation of 0.001 to 0.004 in those units), so its decoder
never learns what to draw for a latent slightly off the encoder's: white noise of 0.1 cost a
face 1.3 dB through such a decoder against 0.2 dB through the shipped `tiny`'s, whose KL kept
noise of 0.04 to 0.4. The price is detail the encoder stores at small amplitudes
(docs/training.md has the trade measured).

With ``sample_prob`` > 0 that share of every batch is instead the model's own output: the
frozen UNet samples a tile-sized LR crop (bicubic or Real-ESRGAN-degraded, ``realesrgan_prob``)
with a uniform schedule drawn from ``sample_intervals``, and the decoder learns to map that
final latent to the HR crop. The UNet's latents are not exactly the encoder's: their small
errors decode as grain and colour speckles, which this teaches the decoder to draw cleanly (the
idea of StableSR's fidelity decoder, as a fine-tune). Those samples live in a pool of
``sample_pool`` (latent, HR) pairs, ``sample_refresh`` of which are replaced per step; a window
of ``crop`` px is taken from each. Checkpoints
hold the decoder weights and a fingerprint of the encoder they were trained against;
``frozen_models`` puts them into the assembled model when the fingerprint matches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from adadiff.config import ModelConfig
from adadiff.errors import ConfigError
from adadiff.models.bundle import TorchModels
from adadiff.quality.lpips import load_lpips
from adadiff.runtime.policy import UniformPolicy
from adadiff.training.assemble import DECODER_STAGE, UNET_STAGE, frozen_models, unet_checkpoint
from adadiff.training.checkpoint import load_latest
from adadiff.training.data import PhotoWeighting, check_weighting
from adadiff.training.degrade import strength_config
from adadiff.training.fingerprint import ENCODER_PREFIXES, encoder_fingerprint
from adadiff.training.labels import encode_latents, mmle_score, sample_with
from adadiff.training.loop import (
    Progress,
    StageResult,
    StepAbandoned,
    TrainOptions,
    check_trained_config,
    numpy_rng,
    rng_state,
    run_stage,
    set_rng_state,
    stop_requested,
)
from adadiff.training.pairs import (
    PairStream,
    check_training_set,
    load_images,
    merged_photos,
    photo_names,
    photos_a_crop_fits,
    to_tensor,
)
from adadiff.training.vae import build_vae, encode_moments

log = logging.getLogger("adadiff.training")

STAGE = DECODER_STAGE


@dataclass(frozen=True, kw_only=True)
class DecoderOptions:
    perceptual_weight: float = 0.1
    lr_input_prob: float = 0.5
    grad_clip: float = 1.0
    crop: int = 64
    weighting: PhotoWeighting = "photo"
    sample_prob: float = 0.0
    sample_intervals: tuple[int, ...] = (200, 100, 50)
    sample_pool: int = 256
    sample_refresh: int = 2
    realesrgan_prob: float = 0.5
    realesrgan_strength: str = "full"  # degrade.STRENGTHS
    photos: str = "train"  # pairs.PHOTO_SETS: "train+validation" for the final fit of a recipe
    latent_noise: float = 0.0  # std of the noise on the encoder's latents, scaled units

    def __post_init__(self) -> None:
        strength_config(self.realesrgan_strength)
        if not 0 <= self.latent_noise <= 1:
            raise ConfigError(
                f"latent_noise must be in [0, 1] (scaled latent units), got {self.latent_noise}"
            )
        check_training_set(self.photos)
        if not 0 <= self.sample_prob <= 1 or not 0 <= self.realesrgan_prob <= 1:
            raise ConfigError(
                f"sample_prob and realesrgan_prob must be in [0, 1], got {self.sample_prob}, "
                f"{self.realesrgan_prob}"
            )
        if self.sample_prob and (
            self.sample_pool < 1
            or self.sample_refresh < 1
            or not self.sample_intervals
            or min(self.sample_intervals) < 1
        ):
            raise ConfigError(
                "with sample_prob > 0, sample_pool and sample_refresh must be >= 1 and "
                f"sample_intervals positive, got {self}"
            )
        if self.crop < 8 or self.crop % 8:
            raise ConfigError(f"crop must be a multiple of 8 (>= 8), got {self.crop}")
        if self.perceptual_weight < 0 or self.grad_clip <= 0:
            raise ConfigError(f"perceptual_weight must be >= 0 and grad_clip > 0, got {self}")
        if not 0 <= self.lr_input_prob <= 1:
            raise ConfigError(f"lr_input_prob must be in [0, 1], got {self.lr_input_prob}")
        check_weighting(self.weighting)


def decoder_state(vae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae_state.items() if not k.startswith(ENCODER_PREFIXES)}


class DecoderStage:
    name = STAGE

    def __init__(
        self,
        cfg: ModelConfig,
        opts: TrainOptions,
        dopts: DecoderOptions,
        images: list[np.ndarray],
        vae_state: dict[str, torch.Tensor],
        *,
        scaling_factor: float,
        cache_dir: str | Path | None = None,
        sampler: TorchModels | None = None,
    ) -> None:
        self.cfg, self.opts, self.dopts = cfg, opts, dopts
        self.scaling_factor = float(scaling_factor)
        self.photos: list[str] = []  # names of the training photos, for the model card
        self.vae = build_vae(cfg, 0)
        self.vae.load_state_dict(vae_state)
        self.fingerprint = encoder_fingerprint(vae_state)
        self.unet_step: int | None = None
        # [{"from_step", "unet_step"}]: which UNet checkpoint drew the samples from which decoder
        # step on, so a card can tell a decoder resumed on a UNet that trained on in between
        self.sample_phases: list[dict[str, int]] = []
        self.vae.train()
        self.vae.requires_grad_(False)
        self.trained = [
            p for name, p in self.vae.named_parameters() if not name.startswith(ENCODER_PREFIXES)
        ]
        for p in self.trained:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.trained, lr=opts.lr, weight_decay=0.0)
        self.rng = numpy_rng(opts.seed, 21)
        self.stream = PairStream(
            images, self.rng, size=dopts.crop, scale=cfg.upscale, weighting=dopts.weighting
        )
        self.samples: SamplePool | None = None
        if dopts.sample_prob > 0:
            if sampler is None:
                raise ConfigError("sample_prob > 0 needs the frozen model to sample with")
            self.samples = SamplePool(cfg, sampler, images, dopts, numpy_rng(opts.seed, 22))
        self.lpips = None
        if dopts.perceptual_weight > 0:
            self.lpips = load_lpips(cache_dir)

    def step(self, step: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.opts.lr_at(step)
        n = self.opts.batch
        n_sampled = 0
        if self.samples is not None:
            n_sampled = int(np.sum(self.rng.random(n) < self.dopts.sample_prob))
        latents, targets = [], []
        if n > n_sampled:
            b = self.stream.batch(n - n_sampled)
            use_up = self.rng.random(n - n_sampled) < self.dopts.lr_input_prob
            x = to_tensor(np.where(use_up[:, None, None, None], b.up, b.hr))
            with torch.no_grad():
                latents.append(self.perturb(encode_moments(self.vae, x)[0]))
            targets.append(x)
        if n_sampled:
            assert self.samples is not None
            sampled, hr = self.samples.draw(n_sampled, self.dopts.crop, self.rng)
            latents.append(sampled / self.samples.scaling_factor)
            targets.append(hr)
        mean, x = torch.cat(latents), torch.cat(targets)
        rec = self.vae.decode(mean, return_dict=False)[0]
        l1 = F.l1_loss(rec, x)
        loss = l1
        terms = {"l1": l1.item()}
        if self.lpips is not None:
            perceptual = self.lpips(rec.clamp(-1, 1), x).mean()
            loss = loss + self.dopts.perceptual_weight * perceptual
            terms["lpips"] = perceptual.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, self.dopts.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            mse = F.mse_loss(rec.clamp(-1, 1), x) / 4.0  # images span 2, PSNR is on [0, 1]
        terms.update(psnr=float(-10.0 * torch.log10(mse + 1e-12)), loss=loss.item())
        return terms

    def perturb(self, mean: torch.Tensor) -> torch.Tensor:
        """``mean`` plus ``latent_noise`` in scaled units (unscaled here); unchanged at 0, so
        runs without noise draw the same random numbers as before the option existed."""
        if not self.dopts.latent_noise:
            return mean
        noise = torch.from_numpy(self.rng.standard_normal(mean.shape, dtype=np.float32))
        return mean + noise * (self.dopts.latent_noise / self.scaling_factor)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "decoder": decoder_state(self.vae.state_dict()),
            "encoder_fingerprint": self.fingerprint,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.rng),
        }
        if self.samples is not None:
            state["samples"] = self.samples.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["encoder_fingerprint"] != self.fingerprint:
            raise ConfigError(
                "this decoder checkpoint was trained against another encoder than the newest "
                "UNet checkpoint's; move the decoder folder away to start over"
            )
        self.vae.load_state_dict(state["decoder"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self.rng, state["rng"])
        if self.samples is not None and "samples" in state:
            self.samples.load_state_dict(state["samples"])

    def summary(self) -> dict[str, Any]:
        return {
            "photos": list(self.photos),
            "encoder_fingerprint": self.fingerprint,
            "options": self.dopts.__dict__.copy(),
            # the UNet whose samples it learned to draw; the shipped UNet may train on after
            "unet_step": self.unet_step,
            "sample_phases": self.sample_phases,
        }


class SamplePool:
    """(final latent, HR crop) pairs from the frozen model's own sampling, refreshed FIFO."""

    def __init__(
        self,
        cfg: ModelConfig,
        models: TorchModels,
        images: list[np.ndarray],
        dopts: DecoderOptions,
        rng: np.random.Generator,
    ) -> None:
        self.models, self.dopts, self.rng = models, dopts, rng
        self.tile = cfg.tile_size
        self.scaling_factor = float(models.config.scaling_factor)
        self.stream = PairStream(
            images,
            rng,
            size=cfg.tile_size,
            scale=cfg.upscale,
            realesrgan_prob=dopts.realesrgan_prob,
            weighting=dopts.weighting,
            strength=dopts.realesrgan_strength,
        )
        self.latents: torch.Tensor | None = None  # [P, C, s, s] scaled latents
        self.hr: torch.Tensor | None = None  # [P, 3, S, S] uint8
        self.cursor = 0
        self.made = 0

    def fresh(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.stream.batch(n)
        lr = encode_latents(self.models, batch.up, max_batch=16)
        interval = int(self.rng.choice(self.dopts.sample_intervals))
        result = sample_with(
            self.models,
            lr,
            mmle_score(self.models),
            UniformPolicy(interval),
            seed=int(self.rng.integers(0, 2**31 - 1)),
            max_batch=16,
        )
        self.made += n
        hr = torch.from_numpy(np.round(batch.hr * 255).astype(np.uint8).transpose(0, 3, 1, 2))
        return torch.from_numpy(np.ascontiguousarray(result.latents)), hr

    def draw(
        self, n: int, crop: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs from the pool, each cut to a ``crop`` px window: (latents, HR in [-1, 1])."""
        size = self.dopts.sample_pool
        if self.latents is None or self.hr is None:
            log.info("decoder: sampling %d tiles with the frozen model for the pool", size)
            parts = []
            for i in range(0, size, 16):  # a minute or more on a CPU: a stop drops the step
                if stop_requested():
                    raise StepAbandoned
                parts.append(self.fresh(min(16, size - i)))
            self.latents = torch.cat([p[0] for p in parts])
            self.hr = torch.cat([p[1] for p in parts])
        picked = torch.from_numpy(rng.integers(0, size, n))
        f = self.hr.shape[-1] // self.latents.shape[-1]  # HR px per latent px
        if crop % f or crop > self.hr.shape[-1]:
            raise ConfigError(
                f"crop {crop} must be a multiple of {f} and at most the tile size "
                f"{self.hr.shape[-1]} to cut windows from the samples"
            )
        side = crop // f
        span = self.latents.shape[-1] - side
        lat, hr = [], []
        for i in picked.tolist():
            y, x = (int(v) for v in rng.integers(0, span + 1, 2))
            lat.append(self.latents[i, :, y : y + side, x : x + side])
            hr.append(self.hr[i, :, y * f : (y + side) * f, x * f : (x + side) * f])
        slots = (self.cursor + torch.arange(self.dopts.sample_refresh)) % size
        new_latents, new_hr = self.fresh(len(slots))
        self.latents[slots], self.hr[slots] = new_latents, new_hr
        self.cursor = int(slots[-1] + 1) % size
        return torch.stack(lat), torch.stack(hr).float() / 127.5 - 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "latents": self.latents if self.latents is not None else torch.zeros(0),
            "hr": self.hr if self.hr is not None else torch.zeros(0, dtype=torch.uint8),
            "cursor": self.cursor,
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a changed --sample-pool, or a tile size changed in the config, samples a new pool
        hr = state["hr"]
        if len(state["latents"]) == self.dopts.sample_pool and hr.shape[-1] == self.tile:
            self.latents, self.hr = state["latents"].clone(), hr.clone()
        self.cursor = int(state["cursor"]) % self.dopts.sample_pool
        set_rng_state(self.rng, state["rng"])


def train_decoder(
    cfg: ModelConfig,
    workdir: str | Path,
    opts: TrainOptions,
    dopts: DecoderOptions = DecoderOptions(),
    *,
    images: list[np.ndarray] | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> StageResult:
    """Fine-tune (or resume) the decoder of the newest UNet checkpoint's VAE into
    ``workdir/decoder``."""
    workdir = Path(workdir)
    unet = unet_checkpoint(workdir)
    # the decoder fine-tunes that UNet's VAE for that UNet's latents: both are this config's
    check_trained_config(workdir / UNET_STAGE, unet, cfg.to_dict())
    state = unet["state"]
    sampler = None
    if dopts.sample_prob > 0:
        # the samples are tiles: check the window before minutes of sampling fill the pool
        f, tile = cfg.vae_scale_factor, cfg.tile_size
        if dopts.crop % f or dopts.crop > tile:
            raise ConfigError(
                f"--crop {dopts.crop} must be a multiple of {f} and at most the tile size {tile} "
                "to cut windows from the model's samples (or --sample-prob 0)"
            )
        sampler = frozen_models(cfg, workdir, with_mmle=False, seed=opts.seed)
    names: list[str] = []
    if images is None:
        names, images = photo_names(dopts.photos), load_images(dopts.photos)
    names, images = photos_a_crop_fits(names, images, dopts.crop, stage=STAGE)
    stage = DecoderStage(
        cfg,
        opts,
        dopts,
        images,
        state["vae"],
        scaling_factor=float(state["scaling_factor"]),
        cache_dir=cache_dir,
        sampler=sampler,
    )
    latest = load_latest(workdir / STAGE, stage=STAGE)
    before = latest.get("summary", {}).get("photos", []) if latest is not None else []
    stage.photos = merged_photos(before, names)
    stage.unet_step = int(unet["step"]) if sampler is not None else None
    stage.sample_phases = sample_phases(latest, stage.unet_step)
    return run_stage(stage, workdir / STAGE, opts, config=cfg.to_dict(), progress=progress)


def sample_phases(ckpt: dict[str, Any] | None, unet_step: int | None) -> list[dict[str, int]]:
    """The decoder checkpoint's sample phases, plus one from its step when this run samples
    from another UNet step (the UNet trained on between two decoder runs). Checkpoints from
    before phases were recorded give their ``unet_step`` from step 0 when they have one."""
    summary = (ckpt or {}).get("summary", {})
    phases = [dict(p) for p in summary.get("sample_phases") or []]
    if not phases and summary.get("unet_step") is not None:
        phases = [{"from_step": 0, "unet_step": int(summary["unet_step"])}]
    if unet_step is None:
        return phases
    if not phases or phases[-1]["unet_step"] != unet_step:
        start = int(ckpt["step"]) if ckpt is not None else 0
        phases.append({"from_step": start, "unet_step": int(unet_step)})
    return phases
