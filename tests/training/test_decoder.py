"""The decoder fine-tune. Micro config, a few steps each (fixtures: conftest.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

# FR metrics only: numpy, no set-up files needed.
from training_helpers import (
    opts,
)

from adadiff.errors import ConfigError, ModelFolderError
from adadiff.training.checkpoint import load_latest


def test_decoder_fine_tune_keeps_the_encoder_and_is_assembled(tmp_path, unet_workdir, cfg, images):
    from adadiff.training.assemble import frozen_models
    from adadiff.training.decoder import DecoderOptions, train_decoder

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    before = load_latest(workdir / "unet")["state"]["vae"]
    dopts = DecoderOptions(perceptual_weight=0.0, crop=32)
    result = train_decoder(cfg, workdir, opts(3), dopts, images=images)
    assert result.step == 3 and result.last_losses["l1"] > 0
    ckpt = load_latest(workdir / "decoder", stage="decoder")
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in ckpt["state"]["decoder"])

    models = frozen_models(cfg, workdir, with_mmle=False)
    assert "decoder step 3" in models.source
    after = models.vae.state_dict()
    for key, value in before.items():
        if key.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    changed = [k for k in ckpt["state"]["decoder"] if not torch.equal(after[k], before[k])]
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    for key in changed:
        torch.testing.assert_close(after[key], ckpt["state"]["decoder"][key], rtol=0, atol=0)

    # Resuming continues; a decoder trained against another encoder is refused.
    assert train_decoder(cfg, workdir, opts(4), dopts, images=images).step == 4
    from adadiff.training.ship import model_card

    card = model_card(cfg, workdir, {"unet": 1}, 1.0, None)
    assert "| decoder | 4 | 2 |" in card and "- Decoder: fine-tuned" in card
    # its crops are its own size, not necessarily a tile's: the card gives it
    decoder_line = next(line for line in card.splitlines() if line.startswith("- Decoder: "))
    assert f"; crops {dopts.crop} px;" in decoder_line, decoder_line
    path = sorted((workdir / "decoder").glob("ckpt-*.pt"))[-1]
    data = torch.load(path, weights_only=True)
    data["state"]["encoder_fingerprint"] = "0" * 64
    torch.save(data, path)
    with pytest.raises(ModelFolderError, match="another encoder"):
        frozen_models(cfg, workdir, with_mmle=False)
    with pytest.raises(ConfigError, match="another encoder"):
        train_decoder(cfg, workdir, opts(5), dopts, images=images)


def test_decoder_learns_from_the_models_own_samples(tmp_path, unet_workdir, cfg, images):
    from adadiff.training.assemble import frozen_models
    from adadiff.training.decoder import DecoderOptions, SamplePool, train_decoder

    dopts = DecoderOptions(
        perceptual_weight=0.0,
        crop=16,
        sample_prob=1.0,
        sample_pool=3,
        sample_refresh=1,
        sample_intervals=(500,),
        realesrgan_prob=0.0,
    )
    for name in ("a", "b"):
        shutil.copytree(unet_workdir / "unet", tmp_path / name / "unet")
    straight = train_decoder(cfg, tmp_path / "a", opts(3), dopts, images=images)
    train_decoder(cfg, tmp_path / "b", opts(2), dopts, images=images)
    resumed = train_decoder(cfg, tmp_path / "b", opts(3), dopts, images=images)
    # The pool of samples travels in the checkpoint, so a resumed run continues exactly.
    assert resumed.history[-1]["losses"] == straight.history[-1]["losses"]
    samples = load_latest(tmp_path / "b" / "decoder", stage="decoder")["state"]["samples"]
    assert samples["latents"].shape == (3, 4, 16, 16) and samples["hr"].shape == (3, 3, 32, 32)
    assert samples["hr"].dtype == torch.uint8
    # it records which UNet drew its samples, so a card can say when the UNet trained on after
    from adadiff.training.ship import _decoder_lag

    summary = load_latest(tmp_path / "b" / "decoder", stage="decoder")["summary"]
    unet_step = load_latest(unet_workdir / "unet", stage="unet")["step"]
    assert summary["unet_step"] == unet_step
    # resumed on the same UNet: still one phase
    assert summary["sample_phases"] == [{"from_step": 0, "unet_step": unet_step}]
    assert _decoder_lag(summary, {"step": unet_step}) == ""
    later = _decoder_lag(summary, {"step": unet_step + 7})
    shipped = f"the shipped UNet is that run at step {unet_step + 7}"
    assert f"UNet at step {unet_step}; {shipped}" in later

    # Each drawn latent window sits over the HR window it is trained to decode to.
    pool = SamplePool(
        cfg,
        frozen_models(cfg, unet_workdir, with_mmle=False),
        images,
        dopts,
        rng=np.random.default_rng(0),
    )
    ys, xs = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    pool.latents = torch.from_numpy(np.stack([np.stack([ys, xs, ys, xs])] * 3)).float()
    hy, hx = np.meshgrid(np.arange(32) // 2, np.arange(32) // 2, indexing="ij")
    pool.hr = torch.from_numpy(np.stack([np.stack([hy, hx, hy])] * 3).astype(np.uint8))
    latents, hr = pool.draw(4, 16, np.random.default_rng(1))
    assert latents.shape == (4, 4, 8, 8) and hr.shape == (4, 3, 16, 16)
    hr_levels = torch.round((hr + 1.0) * 127.5)
    for lat, target in zip(latents, hr_levels, strict=True):
        torch.testing.assert_close(
            lat[0].repeat_interleave(2, 0).repeat_interleave(2, 1), target[0]
        )
        torch.testing.assert_close(
            lat[1].repeat_interleave(2, 0).repeat_interleave(2, 1), target[1]
        )

    # refused before the pool is sampled
    with pytest.raises(ConfigError, match=r"at most the tile size \d+ to cut .*--sample-prob 0"):
        bad = DecoderOptions(perceptual_weight=0.0, crop=40, sample_prob=1.0, sample_pool=2)
        train_decoder(cfg, tmp_path / "b", opts(4), bad, images=images)
    # the config's tile size (the samples' size) may change at a resume: a new pool is drawn
    # (the checkpoint's did not fit it: a traceback at the first refresh)
    from dataclasses import replace

    smaller = replace(cfg, tile_size=16, tile_overlap=4)
    assert train_decoder(smaller, tmp_path / "b", opts(4), dopts, images=images).step == 4
    samples = load_latest(tmp_path / "b" / "decoder", stage="decoder")["state"]["samples"]
    assert samples["latents"].shape == (3, 4, 8, 8) and samples["hr"].shape == (3, 3, 16, 16)


def test_latent_noise_is_scaled_like_the_unets_latents(unet_workdir, cfg, images):
    from adadiff.training.decoder import DecoderOptions, DecoderStage

    state = load_latest(unet_workdir / "unet")["state"]
    sf = float(state["scaling_factor"])
    stages = {
        noise: DecoderStage(
            cfg,
            opts(1),
            DecoderOptions(perceptual_weight=0.0, crop=32, latent_noise=noise),
            images,
            state["vae"],
            scaling_factor=sf,
        )
        for noise in (0.0, 0.2)
    }
    # The noise enters training: the same first step (same crops, same seed) decodes other
    # latents with it than without it.
    losses = [stage.step(0)["l1"] for stage in stages.values()]
    assert losses[0] != losses[1]
    mean = torch.full((64, 4, 8, 8), 0.3)
    assert stages[0.0].perturb(mean) is mean
    noisy = stages[0.2].perturb(mean)
    # 0.2 in the UNet's units is 0.2 / scaling_factor in the encoder's
    assert abs(float((noisy - mean).std()) * sf - 0.2) < 0.01
    assert abs(float((noisy - mean).mean())) < 0.01
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="latent_noise"):
            DecoderOptions(latent_noise=bad)


def test_latent_noise_from_the_command_line_reaches_the_checkpoint(tmp_path, unet_workdir, cfg):
    import argparse

    from adadiff.training.cli import add_train_parser, cmd_train

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    model_dir = tmp_path / "cfg"
    model_dir.mkdir()
    cfg.save(model_dir)
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    common = ["--model", str(model_dir), "--workdir", str(workdir), "--crop", "32"]
    common += ["--steps", "1", "--batch", "2", "--perceptual-weight", "0"]
    args = parser.parse_args(["train", "decoder", *common, "--latent-noise", "0.05"])
    assert cmd_train(args) == 0
    summary = load_latest(workdir / "decoder", stage="decoder")["summary"]
    assert summary["options"]["latent_noise"] == 0.05
    from adadiff.training.ship import model_card

    card = model_card(cfg, workdir, {"unet": 1}, 1.0, None)
    assert "posterior means plus white noise of std 0.05 (scaled latent units)" in card


def test_decoder_refuses_a_unet_checkpoint_of_another_config(tmp_path, unet_workdir, cfg, images):
    """Checked at the start, as the samples' frozen models are: another VAE was a state-dict
    traceback, another UNet a decoder run that its own config then refused to resume."""
    from dataclasses import replace

    from adadiff.training.decoder import DecoderOptions, train_decoder

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    dopts = DecoderOptions(perceptual_weight=0.0, crop=32)
    for other in (
        replace(cfg, vae={**cfg.vae, "block_out_channels": [8, 16]}),
        replace(cfg, unet={**cfg.unet, "block_out_channels": [8, 16, 16, 32]}),
    ):
        with pytest.raises(ConfigError, match=r"unet holds a checkpoint .* differ from the"):
            train_decoder(other, workdir, opts(1), dopts, images=images)
    assert not (workdir / "decoder").exists()


def test_sample_intervals_from_the_command_line_are_checked(capsys):
    """A bad list was argparse's 'invalid <lambda> value', and 0 reached DecoderOptions."""
    import argparse

    from adadiff.training.cli import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "decoder", "--sample-intervals", "200, 50"])
    assert args.sample_intervals == (200, 50)
    for bad, said in (("abc", "expected a whole number"), ("200,", "separated by commas")):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "decoder", "--sample-intervals", bad])
        err = capsys.readouterr().err
        assert said in err and "lambda" not in err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "decoder", "--sample-intervals", "0"])
    assert "expected a number >= 1, got 0" in capsys.readouterr().err


def test_sample_phases_follow_the_unet_a_decoder_resumes_on():
    from adadiff.training.decoder import sample_phases
    from adadiff.training.ship import _decoder_lag

    assert sample_phases(None, 100) == [{"from_step": 0, "unet_step": 100}]
    assert sample_phases(None, None) == []
    one = {"step": 50, "summary": {"sample_phases": [{"from_step": 0, "unet_step": 100}]}}
    assert sample_phases(one, 100) == [{"from_step": 0, "unet_step": 100}]
    two = sample_phases(one, 200)
    assert two == [{"from_step": 0, "unet_step": 100}, {"from_step": 50, "unet_step": 200}]
    assert one["summary"]["sample_phases"] == [{"from_step": 0, "unet_step": 100}]  # not mutated
    # a checkpoint from before phases were recorded: its unet_step from step 0, or nothing known
    assert sample_phases({"step": 50, "summary": {"unet_step": 100}}, 200) == two
    assert sample_phases({"step": 50, "summary": {}}, 200) == [{"from_step": 50, "unet_step": 200}]

    summary = {"unet_step": 200, "sample_phases": two}
    said = _decoder_lag(summary, {"step": 200})
    assert (
        "from decoder step 0 on the UNet at step 100, then from decoder step 50 on the UNet at "
        "step 200." in said
    )
    assert "not fine-tuned again" not in said
    assert "The shipped UNet is that run at step 300" in _decoder_lag(summary, {"step": 300})
    unknown = {"unet_step": 200, "sample_phases": [{"from_step": 50, "unet_step": 200}]}
    assert "(before decoder step 50: not recorded)" in _decoder_lag(unknown, {"step": 200})


def test_a_stop_while_the_first_sample_pool_fills_drops_the_step(
    tmp_path, unet_workdir, cfg, images
):
    """Sampling the first pool takes a minute or more on a CPU: a stop signal between its
    batches ends the run there, before any step trains."""
    import os
    import signal

    from adadiff.training.decoder import DecoderOptions, SamplePool, train_decoder

    made = []
    real = SamplePool.fresh

    def fresh(self, n):
        made.append(n)
        os.kill(os.getpid(), signal.SIGINT)  # lands after the first batch of samples
        return real(self, n)

    dopts = DecoderOptions(
        perceptual_weight=0.0,
        crop=16,
        sample_prob=1.0,
        sample_pool=40,  # three batches of 16 at most
        sample_refresh=1,
        sample_intervals=(500,),
        realesrgan_prob=0.0,
    )
    shutil.copytree(unet_workdir / "unet", tmp_path / "unet")
    SamplePool.fresh = fresh
    try:
        result = train_decoder(cfg, tmp_path, opts(3), dopts, images=images)
    finally:
        SamplePool.fresh = real
    assert (result.step, result.stopped) == (0, True)
    assert made == [16]  # the second batch was never sampled
    assert load_latest(tmp_path / "decoder", stage="decoder") is None  # nothing to resume from
