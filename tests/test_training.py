"""Smoke tests of the stage trainers on a micro config: a few steps each, resume, labels, ship."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff.config import (
    ColorFixConfig,
    DTSSConfig,
    MetricConfig,
    MMLEConfig,
    ModelConfig,
    PFJConfig,
)
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.presets import TINY_UNET, TINY_VAE
from adadiff.training.checkpoint import list_checkpoints, load_latest, save_checkpoint
from adadiff.training.loop import TrainOptions

# FR metrics only: numpy, no set-up files needed.
MICRO_METRICS = (
    MetricConfig(name="psnr", kind="fr", weight=0.1),
    MetricConfig(name="ssim", kind="fr", weight=1.0),
    MetricConfig(name="gmsd", kind="fr", weight=-2.0),
)


def micro_config() -> ModelConfig:
    unet = {
        **TINY_UNET,
        "sample_size": 16,
        "block_out_channels": [8, 16, 16, 16],
        "cross_attention_dim": 8,
        "norm_num_groups": 8,
    }
    vae = {
        **TINY_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [8, 8],
        "norm_num_groups": 4,
        "sample_size": 32,
    }
    return ModelConfig(
        name="micro",
        unet=unet,
        vae=vae,
        tile_size=32,
        tile_overlap=8,
        text_tokens=4,
        dtss=DTSSConfig(tiers=(200, 250, 300, 400)),  # a handful of steps per trajectory
        pfj=PFJConfig(hidden=8),
        mmle=MMLEConfig(hidden=8, metrics=MICRO_METRICS),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Micro models gain nothing from a second thread, and on a shared CPU the threads' handoffs
    # cost several times the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return micro_config()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    from skimage import data
    from skimage.transform import resize

    return [
        resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32),
        np.repeat(resize(data.camera(), (48, 64))[:, :, None], 3, axis=2).astype(np.float32),
    ]


def opts(steps: int, **kw) -> TrainOptions:
    return TrainOptions(steps=steps, batch=2, lr=1e-3, seed=3, log_every=1, warmup=2, **kw)


def lpips_ready() -> bool:
    from adadiff.quality.weights import LPIPS_ALEXNET, asset_location

    return asset_location(LPIPS_ALEXNET).is_file()


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory, cfg, images) -> Path:
    from adadiff.training.vae import VAEOptions, train_vae

    workdir = tmp_path_factory.mktemp("stages")
    train_vae(cfg, workdir, opts(2), VAEOptions(perceptual_weight=0.0), images=images)
    return workdir


def small_pool():
    from adadiff.training.unet import UNetOptions

    return UNetOptions(pool=4, refresh=2)


@pytest.fixture(scope="module")
def unet_workdir(vae_workdir, cfg, images) -> Path:
    from adadiff.training.unet import train_unet

    train_unet(cfg, vae_workdir, opts(2), small_pool(), images=images)
    return vae_workdir


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"stage": "demo", "w": torch.ones(2) * step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not list(tmp_path.glob("*.tmp"))
    latest = load_latest(tmp_path, stage="demo")
    assert latest["step"] == 5 and torch.equal(latest["w"], torch.full((2,), 5.0))
    with pytest.raises(ModelFolderError, match="written by the 'demo' trainer"):
        load_latest(tmp_path, stage="vae")
    (tmp_path / "ckpt-00000009.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFolderError, match="not a readable"):
        load_latest(tmp_path)


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


def test_unet_resumes_with_identical_next_loss(tmp_path, vae_workdir, cfg, images):
    from adadiff.training.unet import train_unet

    for name in ("a", "b"):
        shutil.copytree(vae_workdir / "vae", tmp_path / name / "vae")
    straight = train_unet(cfg, tmp_path / "a", opts(3), small_pool(), images=images)
    train_unet(cfg, tmp_path / "b", opts(2), small_pool(), images=images)
    resumed = train_unet(cfg, tmp_path / "b", opts(3), small_pool(), images=images)
    assert resumed.history[-1]["losses"] == straight.history[-1]["losses"]
    state = load_latest(tmp_path / "b" / "unet", stage="unet")["state"]
    assert {"unet", "pfj", "ema", "vae", "scaling_factor", "text_embedding"} <= set(state)
    assert state["pool"].shape == (4, 2, 4, 16, 16)


def test_unet_needs_a_vae_checkpoint(tmp_path, cfg, images):
    from adadiff.training.unet import train_unet

    with pytest.raises(ModelFolderError, match="adadiff train vae"):
        train_unet(cfg, tmp_path, opts(1), images=images)


def test_unet_can_take_the_vae_of_a_model_folder(tmp_path, cfg, images, tiny_dir):
    from adadiff.models.bundle import build_random
    from adadiff.training.unet import train_unet

    folder = build_random(cfg, seed=5).save(tmp_path / "model")
    train_unet(cfg, tmp_path / "w", opts(1), small_pool(), images=images, vae_from=folder)
    state = load_latest(tmp_path / "w" / "unet", stage="unet")["state"]
    source = build_random(cfg, seed=5)
    for key, value in source.vae.state_dict().items():
        torch.testing.assert_close(state["vae"][key], value, rtol=0, atol=0)
    assert state["scaling_factor"] == cfg.scaling_factor
    with pytest.raises(ConfigError, match="not the one"):
        train_unet(cfg, tmp_path / "x", opts(1), small_pool(), images=images, vae_from=tiny_dir)


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

    with pytest.raises(ConfigError, match="at most the tile size"):
        bad = DecoderOptions(perceptual_weight=0.0, crop=40, sample_prob=1.0, sample_pool=2)
        train_decoder(cfg, tmp_path / "b", opts(4), bad, images=images)


def test_learning_rate_schedules():
    constant = TrainOptions(steps=1000, batch=1, lr=2.0, warmup=100)
    assert [constant.lr_at(s) for s in (0, 99, 500, 999)] == [0.02, 2.0, 2.0, 2.0]
    cosine = replace(constant, schedule="cosine")
    assert cosine.lr_at(0) == constant.lr_at(0) and cosine.lr_at(100) == pytest.approx(2.0)
    assert cosine.lr_at(550) == pytest.approx(1.0)  # half-way through the decay
    assert cosine.lr_at(999) < 1e-4
    lrs = [cosine.lr_at(s) for s in range(100, 1000)]
    assert np.all(np.diff(lrs) <= 0)
    with pytest.raises(ConfigError, match="schedule"):
        replace(constant, schedule="step")


def test_gains_follow_the_runtime_rules():
    from adadiff.training.unet import sample_gains

    t = torch.tensor([999, 700, 499, 10] * 250)
    g = sample_gains(t, 2, 500, 0.5, 0.2, torch.Generator().manual_seed(0))
    assert torch.all(g[t >= 500, 1] == 0)
    zero = (g == 0).all(dim=1).float().mean()
    assert 0.4 < float(zero) < 0.6
    assert float(g.abs().max()) < 1


def test_label_shards_have_keys_and_shapes(tmp_path, unet_workdir, cfg, images):
    from adadiff.training.labels import KEYS, LabelOptions, load_shards, make_labels

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(
        shards=2, trajectories=2, max_batch=4, random_fraction=0.5, recon_crops=3, seed=1
    )
    names = [f"photo{i}" for i in range(len(images))]
    made = make_labels(cfg, workdir, lopts, images=images, names=names)
    assert made.made == 2 and len(made.shards) == 2
    with np.load(made.shards[0]) as npz:
        n = len(npz["t"])
        assert n >= 2
        assert npz["x0"].shape == (n, 4, 16, 16) == npz["lr"].shape
        assert npz["scores"].shape == (n, len(MICRO_METRICS))
        assert set(KEYS) <= set(npz.files)
        assert [str(m) for m in npz["metrics"]] == [m.name for m in MICRO_METRICS]
        assert np.all(np.isfinite(npz["scores"]))
        assert set(npz["traj"].tolist()) == {0, 1}
        assert npz["t"].max() == cfg.dtss.t_start
        assert [str(p) for p in npz["photos"]] == names
        # every call of a trajectory comes from the same photo
        for traj in (0, 1):
            assert len(set(npz["photo"][npz["traj"] == traj].tolist())) == 1
        # reconstruction errors: the trajectories' own crops first, then 3 more
        assert npz["recon_lr"].shape == (5, 4, 16, 16) and npz["recon_err"].shape == (5,)
        np.testing.assert_array_equal(npz["recon_lr"][npz["traj"]], npz["lr"])
        np.testing.assert_array_equal(npz["recon_photo"][npz["traj"]], npz["photo"])
        assert np.all(np.isfinite(npz["recon_err"])) and np.all(npz["recon_err"] < 0)
        assert npz["latent_err"].shape == (n,) and np.all(np.isfinite(npz["latent_err"]))
        assert str(npz["color_fix"]) == "none"
    again = make_labels(cfg, workdir, lopts, images=images)
    assert again.made == 0 and again.upgraded == 0
    corrected = replace(cfg, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    with pytest.raises(ModelFolderError, match="colour fix none, the config asks for wavelet:3"):
        make_labels(corrected, workdir, lopts, images=images, names=names)
    data = load_shards(made.shards)
    assert len(np.unique(data["traj"])) == 4
    assert set(data["photo_name"].tolist()) <= set(names)
    assert data["recon_err"].shape == (10,) and set(data["recon_photo_name"]) <= set(names)
    assert data["latent_err"].shape == data["t"].shape
    with pytest.raises(ConfigError, match="photo names"):
        make_labels(cfg, tmp_path / "x", lopts, images=images, names=names[:1])


def strip_recon(path: Path, **changes: np.ndarray) -> dict[str, np.ndarray]:
    """Rewrite a shard as one made before latent and reconstruction errors were recorded."""
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    kept = {k: v for k, v in arrays.items() if not k.startswith(("recon_", "latent_err"))}
    np.savez(path, **{**kept, **changes})
    return arrays


def test_old_label_shards_get_their_reconstruction_errors(tmp_path, unet_workdir, cfg, images):
    from adadiff.training.labels import LabelOptions, load_shards, make_labels
    from adadiff.training.mmle import MMLEOptions, MMLEStage

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=2, trajectories=2, max_batch=4, recon_crops=2, seed=2)
    names = ["a", "b"]
    made = make_labels(cfg, workdir, lopts, images=images, names=names)
    first = strip_recon(made.shards[0])
    # until every shard has them, the loaded labels hold none and MMLE says what to run
    data = load_shards(made.shards)
    assert "recon_err" not in data and "latent_err" not in data
    with pytest.raises(ConfigError, match="adadiff train labels"):
        MMLEStage(cfg, opts(1), MMLEOptions(), data)
    with pytest.raises(ConfigError, match="latent errors"):
        MMLEStage(cfg, opts(1), MMLEOptions(recon_weight=0.0), data)
    bare = MMLEStage(cfg, opts(1), MMLEOptions(recon_weight=0.0, latent_weight=0.0), data)
    assert bare.recon is None

    again = make_labels(cfg, workdir, lopts, images=images, names=names)
    assert again.made == 0 and again.upgraded == 1
    with np.load(made.shards[0]) as npz:
        # latent_err: the oracle's decoded x0 when made, a fresh decode now
        for key in ("recon_lr", "recon_err", "recon_photo", "latent_err"):
            np.testing.assert_allclose(npz[key], first[key], rtol=0, atol=1e-4)
        assert set(npz.files) == set(first)

    # a shard whose crops cannot be re-drawn is refused, not given wrong errors
    with np.load(made.shards[1]) as npz:
        lr = npz["lr"] + 0.5
    strip_recon(made.shards[1], lr=lr)
    with pytest.raises(ModelFolderError, match="re-drawing"):
        make_labels(cfg, workdir, lopts, images=images, names=names)
    with pytest.raises(ModelFolderError, match="photos"):
        make_labels(cfg, workdir, lopts, images=images, names=["c", "d"])


# The default metrics' full-reference pair that MMLE splits, and one it does not.
LPIPS_METRICS = (
    MetricConfig(name="psnr", kind="fr", weight=0.1),
    MetricConfig(name="lpips", kind="fr", weight=-2.0),
    MetricConfig(name="ssim", kind="fr", weight=1.0),
)


def with_lpips(cfg: ModelConfig) -> ModelConfig:
    return replace(cfg, mmle=MMLEConfig(hidden=8, metrics=LPIPS_METRICS))


def test_label_shards_record_lpips_parts(tmp_path, unet_workdir, cfg, images, metric_cache):
    from adadiff.quality.lpips import lpips
    from adadiff.training.assemble import frozen_models
    from adadiff.training.labels import LabelOptions, decode_latents, make_labels

    lcfg = with_lpips(cfg)
    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=2, seed=4)
    made = make_labels(lcfg, workdir, lopts, images=images, names=["a", "b"])
    with np.load(made.shards[0]) as npz:
        first = {k: npz[k] for k in npz.files}
    n = len(first["t"])
    assert first["latent_lpips"].shape == (n,) and first["recon_lpips"].shape == (4,)
    assert np.all(first["latent_lpips"] >= 0) and np.all(first["recon_lpips"] > 0)
    # independent check: LPIPS of decode(x0) against decode(LR latent), one image at a time
    decoder = frozen_models(lcfg, workdir, with_mmle=False).wrappers()["vae_decoder"]
    for i in (0, n - 1):
        a, b = decode_latents(decoder, np.stack([first["x0"][i], first["lr"][i]]))
        assert first["latent_lpips"][i] == pytest.approx(lpips(a, b), abs=1e-5)
    # a shard from before LPIPS was recorded gets both parts, equal to the values at make time
    old = {k: v for k, v in first.items() if k not in ("latent_lpips", "recon_lpips")}
    np.savez(made.shards[0], **old)
    # the shard's own number of reconstruction crops counts, not this run's option
    again = make_labels(
        lcfg, workdir, replace(lopts, recon_crops=5), images=images, names=["a", "b"]
    )
    assert again.upgraded == 1 and again.made == 0
    with np.load(made.shards[0]) as npz:
        assert set(npz.files) == set(first)
        for key in ("latent_lpips", "recon_lpips", "latent_err", "recon_err"):
            np.testing.assert_allclose(npz[key], first[key], rtol=0, atol=1e-4)


def test_mmle_options_refuse_unknown_choices():
    from adadiff.training.mmle import MMLEOptions

    with pytest.raises(ConfigError, match="lpips_recon"):
        MMLEOptions(lpips_recon="median")
    with pytest.raises(ConfigError, match="recon_weight"):
        MMLEOptions(recon_weight=-1.0)


def test_mmle_validates_on_named_photos():
    from adadiff.training.mmle import split_labels

    data = synthetic_labels(n=40)
    data["photo_name"] = np.array(["moon", "rocket", "brick", "", "moon"] * 8)[data["traj"]]
    train, val = split_labels(data, 0.1, seed=0, val_photos=("moon",))
    assert set(data["photo_name"][val].tolist()) == {"moon"}
    assert "moon" not in set(data["photo_name"][train].tolist())
    assert len(train) + len(val) == 40
    with pytest.raises(ConfigError, match="camera"):
        split_labels(data, 0.1, seed=0, val_photos=("camera",))
    # a random share of trajectories otherwise, whole trajectories only
    train, val = split_labels(data, 0.2, seed=0)
    assert not set(data["traj"][train].tolist()) & set(data["traj"][val].tolist())
    assert len(val) == 8


def synthetic_labels(
    n: int = 128, side: int = 16, seed: int = 0, lpips: bool = False
) -> dict[str, np.ndarray]:
    """Scores that are simple functions of the latents: learnable by a small CNN. With
    ``lpips``, the metrics are LPIPS_METRICS and the labels carry its two parts."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    lr = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    x0 *= rng.uniform(0.2, 2.0, (n, 1, 1, 1)).astype(np.float32)
    err = np.mean((x0 - lr) ** 2, axis=(1, 2, 3))
    scores = np.stack([30 - 5 * np.log10(err), 1 / (1 + err), 0.1 * err], axis=1)
    # reconstruction error: a function of the LR latent's scale, 35 to 45 dB as PSNR (the total
    # error of the decoded x0, 26 to 31 dB, includes it)
    recon_lr = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    recon_lr *= rng.uniform(0.2, 2.0, (n, 1, 1, 1)).astype(np.float32)
    recon_err = (-4.0 + 0.5 * np.log10(np.mean(recon_lr**2, axis=(1, 2, 3)))).astype(np.float32)
    extra = {}
    if lpips:
        # LPIPS parts: the latent one grows with the x0-LR error, the reconstruction one with
        # the LR latent's scale; the score column is their sum.
        latent_lpips = (0.05 + 0.1 * err / err.max()).astype(np.float32)
        own_recon = 0.02 * np.mean(lr**2, axis=(1, 2, 3))
        scores = np.stack([scores[:, 0], latent_lpips + own_recon, scores[:, 1]], axis=1)
        extra = {
            "metrics": np.array([m.name for m in LPIPS_METRICS]),
            "latent_lpips": latent_lpips,
            "recon_lpips": (0.02 * np.mean(recon_lr**2, axis=(1, 2, 3))).astype(np.float32),
        }
    return {
        "x0": x0,
        "lr": lr,
        "t": rng.integers(0, 1000, n).astype(np.float32),
        "scores": scores,
        "traj": np.arange(n) // 4,
        "call": np.arange(n) % 4,
        "metrics": np.array([m.name for m in MICRO_METRICS]),
        "latent_err": (-3.0 + 0.5 * np.log10(err)).astype(np.float32),  # -10x: the PSNR column
        "recon_lr": recon_lr,
        "recon_err": recon_err,
        "recon_photo": np.zeros(n, dtype=np.int64),
        "recon_photo_name": np.full(n, "", dtype=str),
        **extra,
    }


def test_mmle_psnr_and_lpips_add_the_latent_and_reconstruction_errors():
    from adadiff.models.networks import MMLE

    torch.manual_seed(0)
    model = MMLE(latent_channels=4, num_scores=4, hidden=8, psnr_index=1, lpips_index=3).eval()
    model.recon_scale.copy_(torch.tensor([[-3.5, -1.6], [0.4, 0.3]]))
    model.latent_scale.copy_(torch.tensor([[-2.9, -0.8], [-0.15, 0.2]]))
    model.column_scale.copy_(torch.tensor([[29.0, 0.3], [1.5, 0.1]]))
    x0, lr, t = torch.randn(5, 4, 16, 16), torch.randn(5, 4, 16, 16), torch.rand(5) * 999
    with torch.no_grad():
        out, recon = model.parts(x0, lr, t)
        scores = model(x0, lr, t).double().numpy()
    out, recon = out.double().numpy(), recon.double().numpy()
    assert recon.shape == (5, 2)
    a = out[:, 1] * -0.15 - 2.9
    r = recon[:, 0] * 0.4 - 3.5
    psnr = -10 * np.log10(10**a + 10**r)
    np.testing.assert_allclose(scores[:, 1], (psnr - 29.0) / 1.5, rtol=1e-4, atol=1e-4)
    # PSNR cannot exceed what either error alone allows
    assert np.all(psnr <= -10 * np.maximum(a, r) + 1e-6)
    lp = 10 ** (out[:, 3] * 0.2 - 0.8) + 10 ** (recon[:, 1] * 0.3 - 1.6)
    np.testing.assert_allclose(scores[:, 3], (lp - 0.3) / 0.1, rtol=1e-4, atol=1e-4)
    # the other columns are the head's own outputs
    np.testing.assert_allclose(scores[:, [0, 2]], out[:, [0, 2]], atol=1e-6)
    # with LPIPS's per-crop estimate unused, its reconstruction part is the training mean
    model.recon_used[1] = 0.0
    with torch.no_grad():
        mean_only = model(x0, lr, t).double().numpy()
    lp = 10 ** (out[:, 3] * 0.2 - 0.8) + 10**-1.6
    np.testing.assert_allclose(mean_only[:, 3], (lp - 0.3) / 0.1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean_only[:, :3], scores[:, :3], atol=1e-6)
    with pytest.raises(ValueError, match="both"):
        MMLE(num_scores=4, psnr_index=1, lpips_index=1)


@pytest.mark.parametrize("lpips", [False, True], ids=["psnr-split", "psnr-and-lpips-split"])
def test_mmle_reduces_loss_and_bakes_raw_scores(tmp_path, cfg, lpips):
    from adadiff.training.assemble import baked_mmle
    from adadiff.training.mmle import MMLEOptions, train_mmle

    data = synthetic_labels(lpips=lpips)
    cfg = with_lpips(cfg) if lpips else cfg
    o = TrainOptions(steps=60, batch=16, lr=3e-3, seed=0, log_every=10, warmup=0)
    result = train_mmle(cfg, tmp_path, o, MMLEOptions(val_fraction=0.1), data=data)
    l2 = [h["losses"]["l2"] for h in result.history]
    assert l2[-1] < 0.6 * l2[0]
    recon = [h["losses"]["recon"] for h in result.history]
    assert recon[-1] < 0.6 * recon[0]
    latent = [h["losses"]["latent"] for h in result.history]
    assert latent[-1] < 0.6 * latent[0]
    ckpt = load_latest(tmp_path / "mmle", stage="mmle")
    state = ckpt["state"]
    assert ckpt["summary"]["validation"]["rows"] > 0
    model = baked_mmle(cfg, state)
    x0, lr, t = (torch.from_numpy(data[k][:8]) for k in ("x0", "lr", "t"))
    from adadiff.training.assemble import build_mmle

    raw = build_mmle(cfg, 0)
    raw.load_state_dict(state["mmle"])
    with torch.no_grad():
        expected = raw(x0, lr, t) * state["std"] + state["mean"]
        torch.testing.assert_close(model(x0, lr, t), expected, rtol=1e-5, atol=1e-4)
    if lpips:
        # resuming with the other --lpips-recon would silently keep the checkpoint's choice
        longer = replace(o, steps=61)
        with pytest.raises(ConfigError, match="lpips-recon"):
            train_mmle(cfg, tmp_path, longer, MMLEOptions(lpips_recon="estimate"), data=data)
    # a checkpoint of another MMLE layout is refused with what to do, not a torch traceback
    old = {k.replace("column_scale", "psnr_scale"): v for k, v in state["mmle"].items()}
    with pytest.raises(ConfigError, match="mmle folder aside"):
        baked_mmle(cfg, {**state, "mmle": old})


def test_train_cli_and_ship_give_a_loadable_model(tmp_path, unet_workdir, cfg):
    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import load_folder
    from adadiff.runtime.upscaler import Upscaler
    from adadiff.training.cli import add_train_parser, cmd_train

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    labels = workdir / "labels"
    labels.mkdir()
    shard = synthetic_labels(32)
    shard["photos"] = np.array(["moon", "rocket", "brick"])
    shard["photo"] = (shard["traj"] % 2).astype(np.int64)  # moon and rocket drawn, brick not
    shard["weighting"] = np.array("photo")
    np.savez(labels / "shard-00000.npz", **shard)
    model_dir = tmp_path / "cfg"
    model_dir.mkdir()
    cfg.save(model_dir)

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    common = ["--model", str(model_dir), "--workdir", str(workdir)]
    args = parser.parse_args(["train", "mmle", *common, "--steps", "2", "--batch", "8"])
    assert args.func is cmd_train and args.resume is None
    assert cmd_train(args) == 0
    args = parser.parse_args(["train", "mmle", *common, "--steps", "3", "--resume"])
    assert cmd_train(args) == 0
    assert load_latest(workdir / "mmle")["step"] == 3

    out = tmp_path / "shipped"
    assert cmd_train(parser.parse_args(["train", "export-tiny", *common, "--out", str(out)])) == 0
    models = load_folder(out)
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Data" in card and "| mmle | 3 |" in card
    # the photo table lists what each stage recorded: here only the labels name their photos
    assert "| moon | scikit-image |" in card and "| labels |" in card
    assert "| brick |" not in card and "| camera |" not in card
    assert "Held out (never trained or tuned on" in card and "astronaut (NASA" in card
    assert "recorded no photo names: vae, unet" in card
    assert "labels draw every photo equally often" in card
    unet_state = load_latest(workdir / "unet")["state"]
    assert models.config.scaling_factor == pytest.approx(unet_state["scaling_factor"])
    assert models.config.vae["scaling_factor"] == pytest.approx(unet_state["scaling_factor"])

    up = Upscaler(models.config, TorchBackend(models), max_batch=4)
    image, report = up.upscale(np.full((12, 12, 3), 0.5, dtype=np.float32), schedule="adaptive")
    assert image.shape == (48, 48, 3) and np.all(np.isfinite(image))
    assert report.unet_evaluations > 0


def test_half_storage_halves_the_big_weights_and_loads_as_fp32(tmp_path, cfg):
    from safetensors.torch import load_file

    from adadiff.models.bundle import WEIGHTS, build_random, load_folder
    from adadiff.training.ship import folder_bytes

    models = build_random(cfg, seed=2)
    full = models.save(tmp_path / "fp32")
    half = models.save(tmp_path / "fp16", half=True)
    stored = load_file(str(half / "unet" / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    assert folder_bytes(half / "unet") < 0.6 * folder_bytes(full / "unet")
    loaded = load_folder(half)
    for key, value in models.unet.state_dict().items():
        got = loaded.unet.state_dict()[key]
        assert got.dtype == value.dtype
        torch.testing.assert_close(got, value.half().float(), rtol=0, atol=0)


def test_shipped_tiny_weights_load_and_fit_the_budget():
    """`--model tiny` means the trained weights in the package, with their card, under 25 MB."""
    from adadiff.models.bundle import SHIPPED, load_models
    from adadiff.runtime.upscaler import Upscaler

    folder = SHIPPED / "tiny"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert 1e6 < size <= 25e6
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## Training" in card and "## Evaluation" in card and "held out" in card.lower()
    models = load_models("tiny")
    assert models.source == str(folder)
    assert Upscaler.from_pretrained("tiny").config == models.config


def test_oracle_scores_the_colour_corrected_estimate(cfg, images):
    """With a colour fix configured, labels score what the runtime would output: the decoded
    estimate corrected against the bicubic input, and the latent error likewise."""
    from adadiff.models.bundle import build_random
    from adadiff.quality.oracle import score_images
    from adadiff.runtime.colorfix import color_fix
    from adadiff.training.labels import OracleScorer, encode_latents
    from adadiff.training.pairs import PairStream

    crops = PairStream(images, np.random.default_rng(0), size=cfg.tile_size, scale=4).batch(2)
    x0 = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    scores = {}
    for kind in ("none", "wavelet"):
        fixed_cfg = replace(cfg, color_fix=ColorFixConfig(kind=kind, levels=3))
        models = build_random(fixed_cfg, seed=0)
        lr = encode_latents(models, crops.up, 4)
        scorer = OracleScorer(models, crops.up, lr, cfg.mmle.metrics)
        scores[kind] = scorer(x0, lr, np.array([999.0, 500.0], np.float32))
        decoded = scorer.decode(x0)
        expected = color_fix(decoded, crops.up, fixed_cfg.color_fix)
        for i in range(2):
            np.testing.assert_allclose(
                scores[kind][i], score_images(expected[i], crops.up[i], cfg.mmle.metrics), rtol=1e-5
            )
        lr_decoded = scorer.decode(lr)
        corrected = color_fix(decoded, lr_decoded, fixed_cfg.color_fix)
        mse = np.mean((corrected - lr_decoded) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(scorer.arrays()["latent_err"], np.log10(mse), rtol=1e-4)
    assert not np.allclose(scores["none"], scores["wavelet"])
