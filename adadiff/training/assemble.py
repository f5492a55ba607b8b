"""Frozen ``TorchModels`` put together from the stage checkpoints of a workdir.

The VAE, its latent scaling factor, the UNet, PFJ and the empty-prompt embedding all come from
the newest UNet checkpoint (it carries the VAE it was trained on, so they always match); UNet
and PFJ are the EMA weights. A fine-tuned decoder (``workdir/decoder``) replaces the VAE's
decoder when it was trained against the same encoder. MMLE comes from the newest MMLE
checkpoint with its score standardisation baked into the last layer, or stays at its seeded init
when none is asked for.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from adadiff.config import ModelConfig
from adadiff.errors import ModelFolderError
from adadiff.models.bundle import TorchModels, build_modules
from adadiff.training.checkpoint import require_latest


def with_scaling(cfg: ModelConfig, scaling_factor: float) -> ModelConfig:
    s = float(scaling_factor)
    return replace(cfg, scaling_factor=s, vae={**cfg.vae, "scaling_factor": s})


def unet_checkpoint(workdir: str | Path) -> dict[str, Any]:
    from adadiff.training.unet import STAGE

    workdir = Path(workdir)
    return require_latest(
        workdir / STAGE, STAGE, f"run `adadiff train unet --workdir {workdir}` first"
    )


def mmle_checkpoint(workdir: str | Path) -> dict[str, Any]:
    from adadiff.training.mmle import STAGE

    workdir = Path(workdir)
    return require_latest(
        workdir / STAGE, STAGE, f"run `adadiff train mmle --workdir {workdir}` first"
    )


def _load_decoder(vae: torch.nn.Module, workdir: Path, vae_state: dict[str, Any]) -> int | None:
    """Put the newest decoder checkpoint into ``vae``; its step, or None when there is none."""
    from adadiff.training.checkpoint import load_latest
    from adadiff.training.decoder import ENCODER_PREFIXES, STAGE, encoder_fingerprint

    ckpt = load_latest(workdir / STAGE, stage=STAGE)
    if ckpt is None:
        return None
    if ckpt["state"]["encoder_fingerprint"] != encoder_fingerprint(vae_state):
        raise ModelFolderError(
            f"{workdir / STAGE} holds a decoder trained against another encoder than the newest "
            f"UNet checkpoint's; retrain it (adadiff train decoder) or move it away"
        )
    result = vae.load_state_dict(ckpt["state"]["decoder"], strict=False)
    if result.unexpected_keys or any(
        not k.startswith(ENCODER_PREFIXES) for k in result.missing_keys
    ):
        raise ModelFolderError(f"{workdir / STAGE}: the decoder checkpoint does not fit this VAE")
    return int(ckpt["step"])


def frozen_models(
    cfg: ModelConfig, workdir: str | Path, *, with_mmle: bool, seed: int = 0
) -> TorchModels:
    """Eval-mode models from the checkpoints (see the module docstring)."""
    from adadiff.training.mmle import baked_mmle

    ckpt = unet_checkpoint(workdir)
    state = ckpt["state"]
    cfg = with_scaling(cfg, state["scaling_factor"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, pfj, mmle = build_modules(cfg)
    vae.load_state_dict(state["vae"])
    decoder_step = _load_decoder(vae, Path(workdir), state["vae"])
    ema = state["ema"]["shadow"]
    unet.load_state_dict({k[len("unet.") :]: v for k, v in ema.items() if k.startswith("unet.")})
    pfj.load_state_dict({k[len("pfj.") :]: v for k, v in ema.items() if k.startswith("pfj.")})
    source = f"{cfg.name} (unet step {ckpt['step']})"
    if decoder_step is not None:
        source = f"{source[:-1]}, decoder step {decoder_step})"
    if with_mmle:
        m = mmle_checkpoint(workdir)
        mmle = baked_mmle(cfg, m["state"])
        source += f", mmle step {m['step']}"
    models = TorchModels(
        cfg, unet, vae, pfj, mmle, state["text_embedding"].float().clone(), source=source
    )
    for module in (unet, vae, pfj, mmle):
        module.eval().requires_grad_(False)
    return models
