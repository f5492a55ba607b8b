"""Stage 2b (optional): fine-tune the VAE decoder of a trained model, encoder frozen.

The UNet learns in the encoder's latent space, so a frozen encoder keeps every later stage valid
while the decoder learns to reconstruct what the encoder gives it better. That matters for two
reasons: the decoder draws every output pixel, and the oracle scores decoded estimates against
the bicubic-upscaled input, so the decoder's reconstruction error of that input sets the level
of every full-reference score, a level the MMLE regressor cannot see in the latents.

The decoder starts from the VAE in the newest UNet checkpoint and learns to map posterior means
(what the runtime decodes is a point estimate too) back to the input: L1 + ``perceptual_weight``
x LPIPS. A share ``lr_input_prob`` of the inputs are bicubic-upscaled LR crops. Checkpoints
hold the decoder weights and a fingerprint of the encoder they were trained against;
``frozen_models`` puts them into the assembled model when the fingerprint matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from adadiff.config import ModelConfig
from adadiff.errors import ConfigError
from adadiff.training.data import PhotoWeighting, check_weighting
from adadiff.training.loop import (
    Progress,
    StageResult,
    TrainOptions,
    numpy_rng,
    rng_state,
    run_stage,
    set_rng_state,
)
from adadiff.training.pairs import PairStream, load_images, photo_names, to_tensor
from adadiff.training.vae import build_vae, encode_moments

STAGE = "decoder"
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


@dataclass(frozen=True, kw_only=True)
class DecoderOptions:
    perceptual_weight: float = 0.1
    lr_input_prob: float = 0.5
    grad_clip: float = 1.0
    crop: int = 64
    weighting: PhotoWeighting = "photo"

    def __post_init__(self) -> None:
        if self.crop < 8 or self.crop % 8:
            raise ConfigError(f"crop must be a multiple of 8 (>= 8), got {self.crop}")
        if self.perceptual_weight < 0 or self.grad_clip <= 0:
            raise ConfigError(f"perceptual_weight must be >= 0 and grad_clip > 0, got {self}")
        if not 0 <= self.lr_input_prob <= 1:
            raise ConfigError(f"lr_input_prob must be in [0, 1], got {self.lr_input_prob}")
        check_weighting(self.weighting)


def _encoder_items(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for key in sorted(state):
        if key.startswith(ENCODER_PREFIXES):
            yield key, state[key]


def encoder_fingerprint(vae_state: dict[str, torch.Tensor]) -> str:
    """sha256 over the encoder's (and quant_conv's) tensors: which latent space this is."""
    digest = hashlib.sha256()
    for key, value in _encoder_items(vae_state):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
        cache_dir: str | Path | None = None,
    ) -> None:
        self.cfg, self.opts, self.dopts = cfg, opts, dopts
        self.photos: list[str] = []  # names of the training photos, for the model card
        self.vae = build_vae(cfg, 0)
        self.vae.load_state_dict(vae_state)
        self.fingerprint = encoder_fingerprint(vae_state)
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
        self.lpips = None
        if dopts.perceptual_weight > 0:
            from adadiff.quality.lpips import load_lpips

            self.lpips = load_lpips(cache_dir)

    def step(self, step: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.opts.lr_at(step)
        b = self.stream.batch(self.opts.batch)
        use_up = self.rng.random(self.opts.batch) < self.dopts.lr_input_prob
        x = to_tensor(np.where(use_up[:, None, None, None], b.up, b.hr))
        with torch.no_grad():
            mean, _ = encode_moments(self.vae, x)
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "decoder": decoder_state(self.vae.state_dict()),
            "encoder_fingerprint": self.fingerprint,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["encoder_fingerprint"] != self.fingerprint:
            raise ConfigError(
                "this decoder checkpoint was trained against another encoder than the newest "
                "UNet checkpoint's; move the decoder folder away to start over"
            )
        self.vae.load_state_dict(state["decoder"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self.rng, state["rng"])

    def summary(self) -> dict[str, Any]:
        return {
            "photos": list(self.photos),
            "encoder_fingerprint": self.fingerprint,
            "options": self.dopts.__dict__.copy(),
        }


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
    from adadiff.training.assemble import unet_checkpoint

    workdir = Path(workdir)
    state = unet_checkpoint(workdir)["state"]
    stage = DecoderStage(
        cfg,
        opts,
        dopts,
        images if images is not None else load_images("train"),
        state["vae"],
        cache_dir=cache_dir,
    )
    stage.photos = photo_names("train") if images is None else []
    return run_stage(stage, workdir / STAGE, opts, config=cfg.to_dict(), progress=progress)
