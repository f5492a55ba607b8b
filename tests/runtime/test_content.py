"""The content schedule: per-tile uniform intervals from the LR latent's texture."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from adadiff.config import ContentConfig, ModelConfig
from adadiff.errors import ConfigError, ShapeError
from adadiff.runtime.content import ContentPolicy, content_intervals, latent_texture
from adadiff.runtime.policy import Category


def latents() -> np.ndarray:
    rng = np.random.default_rng(0)
    flat = np.full((1, 4, 8, 8), 0.3, np.float32)
    ramp = np.broadcast_to(np.linspace(-1, 1, 8, dtype=np.float32), (1, 4, 8, 8))
    noisy = rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    return np.concatenate([flat, ramp, noisy])


def test_texture_is_zero_on_flat_tiles_and_grows_with_detail():
    texture = latent_texture(latents())
    assert texture[0] == pytest.approx(0.0, abs=1e-7)
    assert 0 < texture[1] < texture[2]  # a smooth ramp has less detail than noise
    with pytest.raises(ShapeError, match=r"\[N, C, s, s\]"):
        latent_texture(np.zeros((4, 8, 8)))


def test_texture_is_the_mean_distance_to_one_121_blur():
    """An impulse in channel 0 of three: the [1, 2, 1] blur leaves 1/4 of it at its place, 1/8
    at each side and 1/16 at each corner, so |o - blur| sums to 3/4 + 4/8 + 4/16 = 3/2."""
    lr = np.zeros((1, 3, 8, 8), np.float32)
    lr[0, 0, 4, 4] = 1.0
    assert latent_texture(lr)[0] == pytest.approx(1.5 / (3 * 8 * 8), rel=1e-6)


def test_intervals_split_at_the_threshold():
    lr = latents()
    texture = latent_texture(lr)
    rule = ContentConfig(
        threshold=float(texture[1]) + 1e-6, flat_interval=999, textured_interval=50
    )
    assert content_intervals(lr, rule) == (999, 999, 50)
    assert content_intervals(lr, ContentConfig()) == (200, 200, 200)  # below 0: none
    policy = ContentPolicy.of(lr, rule)
    assert not policy.needs_scores
    d = policy.decide(2, 999, 0.0, 0.0)
    assert d.category is Category.STABLE and d.interval == 50
    assert policy.decide(0, 999, 0.0, 0.0).interval == 999
    with pytest.raises(ValueError, match=">= 1"):
        ContentPolicy((5, 0))


def test_content_config_is_checked_and_round_trips(tiny_config):
    with pytest.raises(ConfigError, match="threshold"):
        ContentConfig(threshold=-1.0)
    with pytest.raises(ConfigError, match="interval"):
        ContentConfig(flat_interval=0)
    cfg = replace(
        tiny_config,
        content=ContentConfig(threshold=0.2, flat_interval=500, textured_interval=100),
        default_schedule="content",
    )
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.content == cfg.content and back.default_schedule == "content"


def test_upscaler_runs_the_content_schedule_per_tile(tiny_models, photo):
    from adadiff.engines.torch import TorchBackend
    from adadiff.runtime.upscaler import Upscaler

    img = np.ascontiguousarray(photo[:40, :56])
    img[:, :28] = img[:, :28].mean(axis=(0, 1))  # the left tiles flat, the right ones photo
    up = Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=8)
    prepared = up.prepare(img, schedule="uniform", interval=200)
    texture = latent_texture(prepared.lr_latents)
    threshold = float(np.sort(texture)[1]) + 1e-6  # two tiles flat, two textured
    cfg = replace(
        tiny_models.config,
        content=ContentConfig(threshold=threshold, flat_interval=500, textured_interval=200),
    )
    content = Upscaler(cfg, TorchBackend(tiny_models), max_batch=8)
    out, rep = content.upscale(img, schedule="content", seed=0)
    assert rep.schedule == "content"
    expected = [2 if v < threshold else 5 for v in texture]
    assert rep.steps_per_tile == expected and sorted(expected) == [2, 2, 5, 5]
    assert out.shape == (160, 224, 3) and np.isfinite(out).all()
    with pytest.raises(ConfigError, match="uniform schedule only"):
        content.upscale(img, schedule="content", interval=100)
    with pytest.raises(ConfigError, match=r"needs a content rule.*has none"):
        up.upscale(img, schedule="content")  # the test model's config sets none
