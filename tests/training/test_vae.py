"""The VAE stage. Micro config, a few steps each (fixtures: conftest.py)."""

from __future__ import annotations

import pytest

# FR metrics only: numpy, no set-up files needed.
from training_helpers import (
    lpips_ready,
    opts,
)

from adadiff.errors import ConfigError
from adadiff.training.checkpoint import list_checkpoints, load_latest


def test_vae_writes_checkpoint_and_resumes_exactly(tmp_path, cfg, images):
    from adadiff.training.vae import VAEOptions, train_vae

    vopts = VAEOptions(perceptual_weight=0.1 if lpips_ready() else 0.0)
    straight = train_vae(cfg, tmp_path / "a", opts(3), vopts, images=images)
    assert [s for s, _ in list_checkpoints(tmp_path / "a" / "vae")] == [3]
    first = train_vae(cfg, tmp_path / "b", opts(2), vopts, images=images)
    assert first.step == 2
    resumed = train_vae(cfg, tmp_path / "b", opts(3), vopts, images=images)
    assert resumed.step == 3
    assert resumed.history[-1]["losses"] == straight.history[-1]["losses"]
    summary = load_latest(tmp_path / "b" / "vae")["summary"]
    assert summary["scaling_factor"] > 0
    with pytest.raises(ConfigError, match="already holds vae checkpoints"):
        train_vae(cfg, tmp_path / "b", opts(4, resume=False), vopts, images=images)
    with pytest.raises(ConfigError, match="no vae checkpoint"):
        train_vae(cfg, tmp_path / "c", opts(1, resume=True), vopts, images=images)
