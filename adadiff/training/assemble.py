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
from typing import Any, cast

import torch
from torch import nn

from adadiff.config import ColorFixConfig, MMLEConfig, ModelConfig
from adadiff.errors import ConfigError, ModelFolderError, shell_arg
from adadiff.models.bundle import (
    TorchModels,
    build_modules,
    changed_targets,
    mmle_for,
    mmle_targets,
)
from adadiff.models.networks import MMLE
from adadiff.training.checkpoint import load_latest, require_latest
from adadiff.training.fingerprint import ENCODER_PREFIXES, encoder_fingerprint
from adadiff.training.loop import check_trained_config
from adadiff.training.unet import STAGE as UNET_STAGE

# The stages whose checkpoints are assembled here; their trainers import these names.
DECODER_STAGE = "decoder"
MMLE_STAGE = "mmle"


def build_mmle(cfg: ModelConfig, seed: int) -> MMLE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mmle_for(cfg)


def baked_mmle(cfg: ModelConfig, state: dict[str, Any]) -> MMLE:
    """The trained MMLE with de-standardisation folded in: it outputs raw scores."""
    names = tuple(state["metrics"])
    expected = tuple(m.name for m in cfg.mmle.metrics)
    if names != expected:
        raise ConfigError(
            f"the MMLE checkpoint predicts {list(names)}, the model config lists "
            f"{list(expected)}; make labels and train MMLE with this config"
        )
    model = build_mmle(cfg, 0)
    load_mmle_weights(model, state)
    mean, std = state["mean"].float(), state["std"].float()
    last = cast(nn.Linear, model.head[-1])  # MMLE.head is Linear, SiLU, Linear
    keep = torch.ones(len(mean), dtype=torch.bool)
    for col, _ in model.split_columns:
        # these columns' head outputs are log10 errors; their standardisation is column_scale
        keep[col] = False
    with torch.no_grad():
        last.weight[keep] *= std[keep, None]
        last.bias[keep] = last.bias[keep] * std[keep] + mean[keep]
        model.column_scale.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    return model.eval()


def load_mmle_weights(model: MMLE, state: dict[str, Any]) -> None:
    try:
        model.load_state_dict(state["mmle"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise ConfigError(
            "the MMLE checkpoint does not fit this version's MMLE for this config "
            f"({first[0].strip()}); it was trained by an older adadiff or for other metrics. "
            "Move the workdir's mmle folder aside and train MMLE again (labels are kept)"
        ) from exc


def check_mmle_config(cfg: ModelConfig, ckpt: dict[str, Any], folder: Path) -> None:
    """``ConfigError`` if the MMLE checkpoint of ``folder`` was trained for other targets than
    ``cfg``'s: with another ``mmle.reference`` the PSNR and LPIPS columns are built otherwise
    (``MMLE.split_columns``), so every score would be read wrongly, without an error."""
    trained = ckpt.get("config") or {}
    try:
        then = mmle_targets(
            MMLEConfig(**trained["mmle"]), ColorFixConfig(**trained.get("color_fix", {}))
        )
    except (KeyError, TypeError, ConfigError):  # checkpoints from before configs were saved
        return
    now = mmle_targets(cfg.mmle, cfg.color_fix)
    changed = changed_targets(then, now, "in the config")
    if changed:
        raise ConfigError(
            f"{folder} holds an MMLE (step {ckpt['step']}) trained for other scores "
            f"({'; '.join(changed)}); ship with the --model it was trained with, or train MMLE "
            "for this one (move the mmle folder aside; a new colour fix needs new labels too)"
        )


def with_scaling(cfg: ModelConfig, scaling_factor: float) -> ModelConfig:
    s = float(scaling_factor)
    return replace(cfg, scaling_factor=s, vae={**cfg.vae, "scaling_factor": s})


def unet_checkpoint(workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    return require_latest(
        workdir / UNET_STAGE,
        UNET_STAGE,
        f"run `adadiff train unet --workdir {shell_arg(workdir)}` first",
    )


def mmle_checkpoint(workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    return require_latest(
        workdir / MMLE_STAGE,
        MMLE_STAGE,
        f"run `adadiff train mmle --workdir {shell_arg(workdir)}` first",
    )


def _load_decoder(vae: torch.nn.Module, workdir: Path, vae_state: dict[str, Any]) -> int | None:
    """Put the newest decoder checkpoint into ``vae``; its step, or None when there is none."""
    folder = workdir / DECODER_STAGE
    ckpt = load_latest(folder, stage=DECODER_STAGE)
    if ckpt is None:
        return None
    if ckpt["state"]["encoder_fingerprint"] != encoder_fingerprint(vae_state):
        raise ModelFolderError(
            f"{folder} holds a decoder trained against another encoder than the newest "
            f"UNet checkpoint's; retrain it (adadiff train decoder) or move it away"
        )
    result = vae.load_state_dict(ckpt["state"]["decoder"], strict=False)
    if result.unexpected_keys or any(
        not k.startswith(ENCODER_PREFIXES) for k in result.missing_keys
    ):
        raise ModelFolderError(f"{folder}: the decoder checkpoint does not fit this VAE")
    return int(ckpt["step"])


def frozen_models(
    cfg: ModelConfig, workdir: str | Path, *, with_mmle: bool, seed: int = 0
) -> TorchModels:
    """Eval-mode models from the checkpoints (see the module docstring)."""
    ckpt = unet_checkpoint(workdir)
    check_trained_config(Path(workdir) / UNET_STAGE, ckpt, cfg.to_dict())
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
        check_mmle_config(cfg, m, Path(workdir) / MMLE_STAGE)
        mmle = baked_mmle(cfg, m["state"])
        source += f", mmle step {m['step']}"
    models = TorchModels(
        cfg, unet, vae, pfj, mmle, state["text_embedding"].float().clone(), source=source
    )
    for module in (unet, vae, pfj, mmle):
        module.eval().requires_grad_(False)
    return models
