"""A model's latent channel count comes from its VAE config: `tiny` may use other than SD's 4."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from adadiff.config import ModelConfig
from adadiff.errors import ConfigError
from adadiff.presets import tiny
from adadiff.specs import component_specs


def with_latents(channels: int, *, unet_out: int | None = None) -> ModelConfig:
    cfg = tiny()
    unet = dict(cfg.unet, in_channels=2 * channels, out_channels=unet_out or channels)
    return dataclasses.replace(cfg, vae=dict(cfg.vae, latent_channels=channels), unet=unet)


def test_unet_must_predict_in_the_latent_space() -> None:
    with pytest.raises(ConfigError, match=r"out_channels 8 .*got 4"):
        with_latents(8, unet_out=4)
    with pytest.raises(ConfigError, match="in_channels 16, got 8"):
        dataclasses.replace(with_latents(8), unet=dict(tiny().unet, out_channels=8))


def test_specs_follow_the_latent_channels() -> None:
    specs = component_specs(with_latents(8))
    assert specs["vae_encoder"].outputs[0].shape[1] == 8
    assert specs["vae_decoder"].inputs[0].shape[1] == 8
    assert specs["unet"].inputs[0].shape[1] == 16
    assert specs["unet"].outputs[0].shape[1] == 8
    assert specs["pfj"].inputs[0].shape[1] == 8
    assert [t.shape[1] for t in specs["mmle"].inputs[:2]] == [8, 8]


def test_an_eight_channel_model_upscales_from_its_folder(tmp_path: Path, photo) -> None:
    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import build_random, load_models
    from adadiff.runtime.upscaler import Upscaler

    build_random(with_latents(8), seed=0).save(tmp_path / "m8", half=True)
    models = load_models(tmp_path / "m8")
    assert models.config.latent_channels == 8
    assert models.unet.conv_out.out_channels == 8
    up = Upscaler(models.config, TorchBackend(models, threads=1), max_batch=4)
    out, rep = up.upscale(photo[:32, :40], schedule="adaptive", seed=0)
    assert out.shape == (128, 160, 3)
    assert np.isfinite(out).all()
    assert rep.unet_evaluations == sum(rep.steps_per_tile) > 0
