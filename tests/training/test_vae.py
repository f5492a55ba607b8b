"""The VAE stage. Micro config, a few steps each (fixtures: conftest.py)."""

from __future__ import annotations

import logging

import numpy as np
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


@pytest.mark.parametrize("reduction", ["value", "sum"])
def test_vae_kl_weighs_per_image_value_unless_summed(cfg, images, reduction):
    from adadiff.training.vae import VAEOptions, VAEStage

    crop = 16
    vopts = VAEOptions(perceptual_weight=0.0, kl_weight=1e-3, kl_reduction=reduction, crop=crop)
    terms = VAEStage(cfg, opts(1), vopts, images).step(0)
    per = 1.0 / (3 * crop * crop) if reduction == "value" else 1.0
    assert terms["kl"] > 0
    assert terms["loss"] == pytest.approx(terms["l1"] + 1e-3 * per * terms["kl"], rel=1e-5)


def test_vae_options_refuse_bad_values():
    from adadiff.training.vae import VAEOptions

    with pytest.raises(ConfigError, match="kl_reduction"):
        VAEOptions(kl_reduction="mean")
    with pytest.raises(ConfigError, match="min_scale"):
        VAEOptions(min_scale=0.0)
    with pytest.raises(ConfigError, match="deadleaves"):
        VAEOptions(deadleaves=-1)


def test_vae_trains_on_dead_leaves_beside_the_photos(tmp_path, cfg, images, monkeypatch):
    from adadiff.training import vae as vae_module
    from adadiff.training.vae import VAEOptions, train_vae

    seen: list[list] = []

    class Recording(vae_module.VAEStage):
        def __init__(self, cfg, opts, vopts, images, **kwargs):
            seen.append(images)
            super().__init__(cfg, opts, vopts, images, **kwargs)

    monkeypatch.setattr(vae_module, "VAEStage", Recording)
    vopts = VAEOptions(perceptual_weight=0.0, deadleaves=2, min_scale=0.5)
    train_vae(cfg, tmp_path, opts(1), vopts, images=images)
    assert len(seen) == 1 and len(seen[0]) == len(images) + 2  # the images, not only the names
    assert all(got is mine for got, mine in zip(seen[0], images, strict=False))
    summary = load_latest(tmp_path / "vae")["summary"]
    assert [p for p in summary["photos"] if p.startswith("deadleaves-")] == [
        "deadleaves-0",
        "deadleaves-1",
    ]
    assert summary["options"]["min_scale"] == 0.5


def test_a_vae_lists_only_the_photos_its_crops_fit_in(tmp_path, cfg, images, monkeypatch, caplog):
    """The crop sampler never draws a photo smaller than the crop: the stage says so, and the
    model card's photo table (the summary's photos) does not claim it was trained on."""
    from adadiff.training import vae as vae_module
    from adadiff.training.vae import VAEOptions, train_vae

    narrow = np.full((cfg.tile_size - 4, 3 * cfg.tile_size, 3), 0.5, np.float32)
    monkeypatch.setattr(vae_module, "photo_names", lambda which: ["wide", "narrow"])
    monkeypatch.setattr(vae_module, "load_images", lambda which: [images[0], narrow])
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        train_vae(cfg, tmp_path, opts(1), VAEOptions(perceptual_weight=0.0))
    assert load_latest(tmp_path / "vae")["summary"]["photos"] == ["wide"]
    warned = [r.getMessage() for r in caplog.records if "never drawn" in r.getMessage()]
    assert len(warned) == 1 and f"narrow ({cfg.tile_size - 4}x" in warned[0], warned


def test_a_vae_names_the_photos_too_small_for_its_smallest_scale(tmp_path, cfg, images, caplog):
    """A crop at --min-scale covers tile / min_scale px; on a shorter photo the sampler caps it
    at the photo's side, so that photo never shows the smaller scales: the stage says so."""
    from adadiff.training.vae import VAEOptions, train_vae

    assert [im.shape[0] for im in images] == [64, 48] and cfg.tile_size == 32
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        train_vae(
            cfg, tmp_path, opts(1), VAEOptions(perceptual_weight=0.0, min_scale=0.6), images=images
        )
    warned = [r.getMessage() for r in caplog.records if "--min-scale" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "image 1 (48x64: scale 0.67 at the smallest)" in warned[0], warned
    assert "image 0" not in warned[0] and "53 px a 32 px crop at --min-scale 0.6" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        train_vae(
            cfg,
            tmp_path / "b",
            opts(1),
            VAEOptions(perceptual_weight=0.0, min_scale=0.75),
            images=images,
        )
    assert not [r for r in caplog.records if "--min-scale" in r.getMessage()]


def test_a_vae_resumed_without_dead_leaves_still_lists_them(tmp_path, cfg, images):
    from adadiff.training.vae import VAEOptions, train_vae

    with_leaves = VAEOptions(perceptual_weight=0.0, deadleaves=2)
    train_vae(cfg, tmp_path, opts(1), with_leaves, images=images)
    leaves = load_latest(tmp_path / "vae")["summary"]["photos"]
    assert leaves == ["deadleaves-0", "deadleaves-1"]
    train_vae(cfg, tmp_path, opts(2), VAEOptions(perceptual_weight=0.0), images=images)
    assert load_latest(tmp_path / "vae")["summary"]["photos"] == leaves
