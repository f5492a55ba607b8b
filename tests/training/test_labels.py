"""Label shards: oracle-scored trajectories of the frozen model.

Micro config, a few steps each; fixtures in conftest.py, helpers in training_helpers.py."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

# FR metrics only: numpy, no set-up files needed.
from training_helpers import (
    MICRO_METRICS,
    opts,
    with_lpips,
)

from adadiff.config import (
    ColorFixConfig,
    MetricKind,
)
from adadiff.errors import ConfigError, ModelFolderError


def strip_recon(path: Path, **changes: np.ndarray) -> dict[str, np.ndarray]:
    """Rewrite a shard as one made before latent and reconstruction errors were recorded."""
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    kept = {k: v for k, v in arrays.items() if not k.startswith(("recon_", "latent_err"))}
    np.savez(path, **{**kept, **changes})
    return arrays


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
            calls = npz["call"][npz["traj"] == traj]
            assert calls.tolist() == list(range(len(calls)))  # each UNet call, in order
        # reconstruction errors: the trajectories' own crops first, then 3 more
        assert npz["recon_lr"].shape == (5, 4, 16, 16) and npz["recon_err"].shape == (5,)
        np.testing.assert_array_equal(npz["recon_lr"][npz["traj"]], npz["lr"])
        np.testing.assert_array_equal(npz["recon_photo"][npz["traj"]], npz["photo"])
        extra = npz["recon_lr"][2:]  # crops of their own, not the trajectories' again
        assert not any(np.allclose(e, lr) for e in extra for lr in npz["recon_lr"][:2])
        assert np.all(np.isfinite(npz["recon_err"])) and np.all(npz["recon_err"] < 0)
        assert npz["latent_err"].shape == (n,) and np.all(np.isfinite(npz["latent_err"]))
        assert str(npz["color_fix"]) == "none"
        fr = [m.name for m in MICRO_METRICS if m.kind is MetricKind.FULL_REFERENCE]
        assert fr and [str(m) for m in npz["hr_metrics"]] == fr
        assert npz["scores_hr"].shape == (n, len(fr)) and np.all(np.isfinite(npz["scores_hr"]))
        # the truth is not the bicubic input: the same estimates score differently against it
        same = [i for i, m in enumerate(MICRO_METRICS) if m.kind is MetricKind.FULL_REFERENCE]
        assert not np.allclose(npz["scores_hr"], npz["scores"][:, same])
    again = make_labels(cfg, workdir, lopts, images=images)
    assert again.made == 0 and again.upgraded == 0
    with np.load(made.shards[0]) as npz:
        assert str(npz["drawn_by"]).endswith("(unet step 2)")
    # A folder holds one model's labels: after the UNet moves on, it is not extended...
    from adadiff.training.checkpoint import load_latest, save_checkpoint

    later = workdir / "later"
    shutil.copytree(workdir / "unet", later / "unet")
    shutil.copytree(workdir / "labels", later / "labels")
    ckpt = load_latest(later / "unet")
    save_checkpoint(later / "unet", 7, {k: v for k, v in ckpt.items() if k != "step"})
    more = replace(lopts, shards=3)
    with pytest.raises(ModelFolderError, match=r"drawn by .*unet step 2.*unet step 7"):
        make_labels(cfg, later, more, images=images, names=names)
    # (shards from before drawn_by was recorded are told apart by their UNet step alone)
    for shard in sorted((later / "labels").glob("shard-*.npz")):
        with np.load(shard) as npz:
            np.savez(shard, **{k: npz[k] for k in npz.files if k != "drawn_by"})
    with pytest.raises(ModelFolderError, match=r"UNet at step 2; the workdir's is at step 7"):
        make_labels(cfg, later, more, images=images, names=names)
    # ...and a UNet trained with another model config is refused before any label is drawn.
    wider = replace(cfg, unet={**cfg.unet, "block_out_channels": [16, 32, 32, 32]})
    with pytest.raises(ConfigError, match="whose unet differ"):
        make_labels(wider, workdir, more, images=images, names=names)
    corrected = replace(cfg, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    with pytest.raises(ModelFolderError, match="colour fix none, the config asks for wavelet:3"):
        make_labels(corrected, workdir, lopts, images=images, names=names)
    data = load_shards(made.shards)
    assert len(np.unique(data["traj"])) == 4
    assert set(data["photo_name"].tolist()) <= set(names)
    assert data["recon_err"].shape == (10,) and set(data["recon_photo_name"]) <= set(names)
    assert data["latent_err"].shape == data["t"].shape
    assert data["scores_hr"].shape[0] == len(data["t"]) and list(data["hr_metrics"]) == fr
    with pytest.raises(ConfigError, match="photo names"):
        make_labels(cfg, tmp_path / "x", lopts, images=images, names=names[:1])


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


def test_label_shards_record_lpips_parts(tmp_path, unet_workdir, cfg, images, metric_cache):
    from adadiff.imageio import gray_output
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
    # independent check: LPIPS of decode(x0) against decode(LR latent), one image at a time,
    # both gray for a crop of the gray photo (images[1]), as the runtime returns its output
    decoder = frozen_models(lcfg, workdir, with_mmle=False).wrappers()["vae_decoder"]
    for i in (0, n - 1):
        a, b = decode_latents(decoder, np.stack([first["x0"][i], first["lr"][i]]))
        if first["photo"][i] == 1:
            a, b = gray_output(a), gray_output(b)
        assert first["latent_lpips"][i] == pytest.approx(lpips(a, b), abs=1e-5)
    # a shard from before LPIPS was recorded gets both parts, equal to the values at make time
    # (and from before the recipe was recorded)
    old = {k: v for k, v in first.items() if k not in ("latent_lpips", "recon_lpips", "recipe")}
    np.savez(made.shards[0], **old)
    # the shard's own number of reconstruction crops counts, not this run's option
    again = make_labels(
        lcfg, workdir, replace(lopts, recon_crops=5), images=images, names=["a", "b"]
    )
    assert again.upgraded == 1 and again.made == 0
    with np.load(made.shards[0]) as npz:
        assert set(npz.files) == set(first) - {"recipe"}
        for key in ("latent_lpips", "recon_lpips", "latent_err", "recon_err"):
            np.testing.assert_allclose(npz[key], first[key], rtol=0, atol=1e-4)


def test_oracle_scores_the_colour_corrected_estimate(cfg, images):
    """With a colour fix configured, labels score what the runtime would output: the decoded
    estimate corrected against the bicubic input (gray for a gray input), and the latent error
    likewise."""
    from adadiff.imageio import gray_output, has_gray_channels
    from adadiff.models.bundle import build_random
    from adadiff.quality.oracle import score_images
    from adadiff.runtime.colorfix import color_fix
    from adadiff.training.labels import OracleScorer, encode_latents
    from adadiff.training.pairs import PairStream

    crops = PairStream(images, np.random.default_rng(0), size=cfg.tile_size, scale=4).batch(2)
    x0 = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    gray = has_gray_channels(crops.up)
    scores = {}
    for kind in ("none", "wavelet"):
        fixed_cfg = replace(cfg, color_fix=ColorFixConfig(kind=kind, levels=3))
        models = build_random(fixed_cfg, seed=0)
        lr = encode_latents(models, crops.up, 4)
        scorer = OracleScorer(models, crops.up, lr, cfg.mmle.metrics, hr=crops.hr)
        scores[kind] = scorer(x0, lr, np.array([999.0, 500.0], np.float32))
        decoded = scorer.decode(x0)
        expected = color_fix(decoded, crops.up, fixed_cfg.color_fix)
        expected[gray] = gray_output(expected[gray])
        fr = [m for m in cfg.mmle.metrics if m.kind is MetricKind.FULL_REFERENCE]
        for i in range(2):
            np.testing.assert_allclose(
                scores[kind][i], score_images(expected[i], crops.up[i], cfg.mmle.metrics), rtol=1e-5
            )
            # the same corrected estimate against the HR crop: FR metrics only
            np.testing.assert_allclose(
                scorer.arrays()["scores_hr"][i],
                score_images(expected[i], crops.hr[i], fr),
                rtol=1e-5,
            )
        lr_decoded = scorer.decode(lr)
        corrected = color_fix(decoded, lr_decoded, fixed_cfg.color_fix)
        corrected[gray], lr_decoded[gray] = (
            gray_output(corrected[gray]),
            gray_output(lr_decoded[gray]),
        )
        mse = np.mean((corrected - lr_decoded) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(scorer.arrays()["latent_err"], np.log10(mse), rtol=1e-4)
        # an oracle of mmle.reference "hr" shows the policy the HR scores; it records both
        oracle = OracleScorer(models, crops.up, lr, cfg.mmle.metrics, hr=crops.hr, reference="hr")
        seen = oracle(x0, lr, np.array([999.0, 500.0], np.float32))
        cols = [i for i, m in enumerate(cfg.mmle.metrics) if m.kind is MetricKind.FULL_REFERENCE]
        np.testing.assert_allclose(seen[:, cols], oracle.arrays()["scores_hr"], rtol=1e-5)
        np.testing.assert_allclose(oracle.arrays()["scores"], scores[kind], rtol=1e-6)
    assert not np.allclose(scores["none"], scores["wavelet"])
    with pytest.raises(ConfigError, match="HR crops"):
        OracleScorer(models, crops.up, lr, cfg.mmle.metrics, reference="hr")
    # two tiles with one LR latent could not be told apart: each would be scored as the other
    twice = np.concatenate([lr[:1], lr[:1]])
    with pytest.raises(ConfigError, match="same LR latent"):
        OracleScorer(models, crops.up, twice, cfg.mmle.metrics, hr=crops.hr)


def test_mixed_policy_draws_a_tier_per_tile_and_step_for_its_random_tiles_only():
    from adadiff.config import DTSSConfig
    from adadiff.runtime.policy import Category, DTSSPolicy
    from adadiff.training.labels import MixedPolicy

    dtss = DTSSConfig()
    policy = MixedPolicy(dtss, frozenset(range(1, 40)), seed=3)
    # tile 0 follows DTSS, exit included
    for t, g_fr, g_nr in ((100, 0.0, -1.0), (900, 1.0, 1.0), (900, 0.0, 0.0)):
        assert policy.decide(0, t, g_fr, g_nr) == DTSSPolicy(dtss).decide(0, t, g_fr, g_nr)
    assert policy.decide(0, 100, 0.0, -1.0).exits
    # the random tiles ignore the gains and never exit; each draws its own tier, every time alike
    drawn = [policy.decide(k, 100, 0.0, -1.0) for k in range(1, 40)]
    assert all(d.category is Category.STABLE and d.interval in dtss.tiers for d in drawn)
    assert len({d.interval for d in drawn}) > 1
    assert drawn == [policy.decide(k, 100, 0.0, -1.0) for k in range(1, 40)]


def test_trajectories_say_which_tiles_ran_random_tiers_and_may_follow_the_hr_scores(cfg, images):
    from adadiff.models.bundle import build_random
    from adadiff.training.labels import PixelErrors, run_trajectories
    from adadiff.training.pairs import PairStream

    models = build_random(cfg, seed=0)
    crops = PairStream(images, np.random.default_rng(0), size=cfg.tile_size, scale=4).batch(2)
    for fraction in (0.0, 1.0):
        out = run_trajectories(models, crops, seed=0, random_fraction=fraction)
        assert out["random"].tolist() == [fraction == 1.0] * len(out["t"])
    # driven by the HR scores (what evaluation's "hr" oracle does) without asking to record them
    out = run_trajectories(models, crops, seed=0, reference="hr")
    assert out["scores_hr"].shape == (len(out["t"]), len(MICRO_METRICS))
    # an estimate identical to its reference has a finite error (the floor), not -inf
    same = np.full((1, 16, 16, 3), 0.5, np.float32)
    assert PixelErrors(MICRO_METRICS)(same, same)["err"].tolist() == [-12.0]


def test_estimates_decode_into_range_and_only_fr_metrics_score_against_hr(
    cfg, images, metric_cache
):
    from adadiff.config import MetricConfig
    from adadiff.models.bundle import build_random
    from adadiff.training.labels import OracleScorer, decode_latents, encode_latents
    from adadiff.training.pairs import PairStream

    models = build_random(cfg, seed=0)
    loud = 20 * np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    decoded = decode_latents(models.wrappers()["vae_decoder"], loud)  # the decoder overshoots
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0
    crops = PairStream(images, np.random.default_rng(0), size=cfg.tile_size, scale=4).batch(2)
    lr = encode_latents(models, crops.up, 4)
    metrics = (
        MetricConfig(name="psnr", kind="fr", weight=1.0),
        MetricConfig(name="niqe", kind="nr", weight=-1.0),
    )
    scorer = OracleScorer(models, crops.up, lr, metrics, metric_cache, hr=crops.hr)
    scorer(loud, lr, np.array([999.0, 500.0], np.float32))
    # a no-reference score is the same against any reference: only PSNR is scored against HR
    assert scorer.arrays()["hr_metrics"].tolist() == ["psnr"]
    assert scorer.arrays()["scores_hr"].shape == (2, 1)


def test_oracle_scores_a_gray_input_gray_as_the_runtime_returns_it(cfg, images):
    """The runtime returns a gray input gray (``gray_output``); labels scored the estimate's faint
    colour instead, which for the shipped tiny's gray tiles is 0.1 dB of PSNR and 0.2 of NIQE
    off what it returns. A colour input is scored as before."""
    from adadiff.imageio import gray_output
    from adadiff.models.bundle import build_random
    from adadiff.quality.oracle import score_images
    from adadiff.runtime.colorfix import color_fix
    from adadiff.training.labels import (
        OracleScorer,
        PixelErrors,
        encode_latents,
        reconstruction_errors,
    )
    from adadiff.training.pairs import PairStream

    fixed = replace(cfg, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    models = build_random(fixed, seed=0)
    gray, colour = (
        PairStream([image], np.random.default_rng(0), size=cfg.tile_size, scale=4).batch(1)
        for image in (images[1], images[0])
    )
    up, hr = np.concatenate([gray.up, colour.up]), np.concatenate([gray.hr, colour.hr])
    assert np.ptp(up[0], axis=-1).max() < 1e-6 < np.ptp(up[1], axis=-1).max()
    x0 = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    lr = encode_latents(models, up, 4)
    scorer = OracleScorer(models, up, lr, cfg.mmle.metrics, hr=hr)
    scores = scorer(x0, lr, np.array([999.0, 500.0], np.float32))
    decoded = scorer.decode(x0)
    returned = color_fix(decoded, up, fixed.color_fix)
    returned[0] = gray_output(returned[0])
    assert not np.allclose(scores[0], score_images(decoded[0], up[0], cfg.mmle.metrics))
    fr = [m for m in cfg.mmle.metrics if m.kind is MetricKind.FULL_REFERENCE]
    for i in range(2):
        np.testing.assert_allclose(
            scores[i], score_images(returned[i], up[i], cfg.mmle.metrics), rtol=1e-5
        )
        np.testing.assert_allclose(
            scorer.arrays()["scores_hr"][i], score_images(returned[i], hr[i], fr), rtol=1e-5
        )
    # the error parts MMLE builds PSNR from: gray for the gray input too
    lr_decoded = scorer.decode(lr)
    latent = color_fix(decoded, lr_decoded, fixed.color_fix)
    latent[0], lr_decoded[0] = gray_output(latent[0]), gray_output(lr_decoded[0])
    mse = np.mean((latent - lr_decoded) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(scorer.arrays()["latent_err"], np.log10(mse), rtol=1e-4)
    _, recon = reconstruction_errors(models, up, 4, PixelErrors(cfg.mmle.metrics))
    rebuilt = color_fix(scorer.decode(lr), up, fixed.color_fix)
    rebuilt[0] = gray_output(rebuilt[0])
    mse = np.mean((rebuilt - up) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(recon["err"], np.log10(mse), rtol=1e-4)


def test_labels_that_scored_gray_inputs_in_colour_are_not_extended_or_learnt(
    tmp_path, unet_workdir, cfg, images
):
    from adadiff.training.labels import LabelOptions, load_shards, make_labels
    from adadiff.training.mmle import MMLEOptions, train_mmle

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    (first,) = make_labels(cfg, workdir, lopts, images=images).shards
    assert str(load_shards([first])["gray_output"]) == "luma"
    with np.load(first) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "gray_output"}
    second = workdir / "labels" / "shard-00001.npz"
    np.savez(second, **arrays)  # as made before: gray inputs scored in colour
    with pytest.raises(ModelFolderError, match=r"shard-00001\.npz scored gray inputs' estimates"):
        load_shards([first, second])
    first.unlink()
    with pytest.raises(ModelFolderError, match="scored the estimates of gray inputs in colour"):
        make_labels(cfg, workdir, replace(lopts, shards=2), images=images)
    first.unlink()  # remade before the old shard was reached
    with pytest.raises(ConfigError, match="scored the estimates of gray inputs in colour"):
        train_mmle(cfg, workdir, opts(1), MMLEOptions(val_fraction=0.0))


def test_a_labels_folder_holds_one_recipe_and_one_run(tmp_path, unet_workdir, cfg, images):
    from adadiff.training.checkpoint import stage_lock
    from adadiff.training.labels import LabelOptions, make_labels

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    names = [f"photo{i}" for i in range(len(images))]
    make_labels(cfg, workdir, lopts, images=images, names=names)
    # more shards with other options would mix two recipes in one folder
    for change, flag in (
        ({"trajectories": 3}, "--batch 2 there, 3 now"),
        ({"seed": 5}, "--seed 1 there, 5 now"),
        ({"random_fraction": 0.25}, "--random-fraction 0.5 there, 0.25 now"),
    ):
        with pytest.raises(ModelFolderError, match=flag):
            make_labels(
                cfg, workdir, replace(lopts, shards=2, **change), images=images, names=names
            )
    with pytest.raises(ModelFolderError, match=r"photos \['photo0', 'photo1'\] there"):
        make_labels(cfg, workdir, replace(lopts, shards=2), images=images, names=["a", "b"])
    # --max-batch never changes a shard: it is no part of the recipe
    make_labels(cfg, workdir, replace(lopts, max_batch=2), images=images, names=names)
    # a --workdir where the labels folder cannot be made is one line, before any work
    blocked = tmp_path / "blocked"
    shutil.copytree(workdir / "unet", blocked / "unet")
    (blocked / "labels").write_text("")
    with pytest.raises(ModelFolderError, match="cannot write"):
        make_labels(cfg, blocked, lopts, images=images, names=names)
    # a second run into the folder is refused, and a shard write cut short is cleaned up
    stale = workdir / "labels" / ".shard-cut.tmp"
    stale.write_bytes(b"half a shard")
    with stage_lock(workdir / "labels"), pytest.raises(ModelFolderError, match="being trained"):
        make_labels(cfg, workdir, lopts, images=images, names=names)
    make_labels(cfg, workdir, lopts, images=images, names=names)
    assert not stale.exists()


def test_a_damaged_shard_is_named_for_deletion_then_remade(tmp_path, unet_workdir, cfg, images):
    """An empty or cut-short npz (a copy that stopped, a full disk outside adadiff) raised
    EOFError or BadZipFile, a traceback from labels, mmle and ship alike."""
    from adadiff.training.labels import LabelOptions, load_shards, make_labels
    from adadiff.training.ship import _labels

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=2, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    shards = make_labels(cfg, workdir, lopts, images=images).shards
    whole = shards[1].read_bytes()
    with np.load(shards[1]) as npz:
        scores = npz["scores"]
    for damaged in (b"", whole[: len(whole) // 2]):
        shards[1].write_bytes(damaged)
        for read in (
            lambda: make_labels(cfg, workdir, lopts, images=images),
            lambda: load_shards(shards),
            lambda: _labels(workdir),
        ):
            with pytest.raises(ModelFolderError, match=r"shard-00001\.npz is not a label shard"):
                read()
    shards[1].unlink()
    assert make_labels(cfg, workdir, lopts, images=images).made == 1
    with np.load(shards[1]) as npz:
        assert np.array_equal(npz["scores"], scores)  # a shard is its seed and index alone


def test_a_labels_folder_holds_one_tile_size(tmp_path, unet_workdir, cfg, images):
    """The tile size is no part of the options a shard records: a config with another one added
    shards whose latents MMLE could not stack (a numpy traceback)."""
    from adadiff.training.labels import LabelOptions, load_shards, make_labels

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    (first,) = make_labels(cfg, workdir, lopts, images=images).shards
    smaller = replace(cfg, tile_size=16, tile_overlap=4)
    with pytest.raises(ModelFolderError, match="holds 32 px tiles, the config's tile_size is 16"):
        make_labels(smaller, workdir, replace(lopts, shards=2), images=images)
    assert not (workdir / "labels" / "shard-00001.npz").exists()
    # a folder mixed before this check: named, not a traceback
    with np.load(first) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["x0"], arrays["lr"] = arrays["x0"][..., :8, :8], arrays["lr"][..., :8, :8]
    np.savez(workdir / "labels" / "shard-00001.npz", **arrays)
    with pytest.raises(ModelFolderError, match=r"shard-00001\.npz holds latents of shape"):
        load_shards(sorted((workdir / "labels").glob("shard-*.npz")))


def test_a_labels_folder_holds_one_metric_list(tmp_path, unet_workdir, cfg, images):
    """A config with other metrics added shards that MMLE then refused to stack ("has metrics
    ..., other shards ..."), after the whole labels run."""
    from adadiff.training.labels import LabelOptions, make_labels

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    make_labels(cfg, workdir, lopts, images=images)
    fewer = replace(cfg, mmle=replace(cfg.mmle, metrics=cfg.mmle.metrics[:2]))
    with pytest.raises(ModelFolderError, match=r"the metrics \['psnr', 'ssim', 'gmsd'\], the"):
        make_labels(fewer, workdir, replace(lopts, shards=2), images=images)
    assert not (workdir / "labels" / "shard-00001.npz").exists()
    # calibrated weights score the same metrics: the folder goes on
    weights = tuple(replace(m, weight=-m.weight) for m in cfg.mmle.metrics)
    calibrated = replace(cfg, mmle=replace(cfg.mmle, metrics=weights))
    assert make_labels(calibrated, workdir, replace(lopts, shards=2), images=images).made == 1


def test_mmle_trains_only_on_labels_scored_with_the_configs_colour_fix(
    tmp_path, unet_workdir, cfg, images
):
    """Labels refused another colour fix, MMLE did not: labels scored without a fix trained an
    MMLE for a config whose runtime corrects its output (the scores of other images)."""
    from adadiff.training.labels import LabelOptions, load_shards, make_labels
    from adadiff.training.mmle import MMLEOptions, train_mmle

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    (first,) = make_labels(cfg, workdir, lopts, images=images).shards
    corrected = replace(cfg, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    with pytest.raises(ConfigError, match="colour fix none, the model config asks for wavelet:3"):
        train_mmle(corrected, workdir, opts(1), MMLEOptions(val_fraction=0.0))
    assert not (workdir / "mmle").exists()
    assert str(load_shards([first])["color_fix"]) == "none"
    # a folder mixed by hand: named, not learnt from
    with np.load(first) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.savez(workdir / "labels" / "shard-00001.npz", **{**arrays, "color_fix": "wavelet:3"})
    with pytest.raises(ModelFolderError, match=r"shard-00001\.npz was scored with colour fix"):
        load_shards(sorted((workdir / "labels").glob("shard-*.npz")))


def test_ship_refuses_an_mmle_trained_for_other_scores(tmp_path, unet_workdir, cfg, images):
    """An MMLE trained with mmle.reference "input" builds its PSNR column from two errors; a
    config of reference "hr" read that column as a plain score, and shipped it without a word.
    Likewise an MMLE of labels scored without a colour fix, shipped with one."""
    from adadiff.training.assemble import frozen_models
    from adadiff.training.labels import LabelOptions, make_labels
    from adadiff.training.mmle import MMLEOptions, train_mmle
    from adadiff.training.ship import ship

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=2, max_batch=4, recon_crops=1, seed=1)
    make_labels(cfg, workdir, lopts, images=images)
    train_mmle(cfg, workdir, opts(1), MMLEOptions(val_fraction=0.0))
    assert frozen_models(cfg, workdir, with_mmle=True).mmle.split_columns  # PSNR: two errors
    # calibrated weights are no change of what the columns mean
    weighted = tuple(replace(m, weight=-m.weight) for m in cfg.mmle.metrics)
    frozen_models(replace(cfg, mmle=replace(cfg.mmle, metrics=weighted)), workdir, with_mmle=True)
    for other, said in (
        (replace(cfg, mmle=replace(cfg.mmle, reference="hr")), "reference input there, hr in"),
        (replace(cfg, color_fix=ColorFixConfig(kind="wavelet")), "color_fix none there, wavelet:5"),
    ):
        with pytest.raises(ConfigError, match=f"trained for other scores .*{said}"):
            ship(other, workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mmle_resumes_only_on_the_labels_it_started_on(tmp_path, unet_workdir, cfg, images):
    from adadiff.training.labels import LabelOptions, make_labels
    from adadiff.training.mmle import MMLEOptions, train_mmle
    from adadiff.training.ship import stale_mmle

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    lopts = LabelOptions(shards=1, trajectories=3, max_batch=4, recon_crops=2, seed=1)
    made = make_labels(cfg, workdir, lopts, images=images)
    train_mmle(cfg, workdir, opts(1), MMLEOptions(val_fraction=0.0))
    assert stale_mmle(workdir) == ""
    # the labels remade by another UNet (here: their record says so)
    with np.load(made.shards[0]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["drawn_by"] = np.array("another model (unet step 9)")
    np.savez(made.shards[0], **arrays)
    assert "another model (unet step 9)" in stale_mmle(workdir)
    with pytest.raises(ConfigError, match="move the mmle folder aside"):
        train_mmle(cfg, workdir, opts(2), MMLEOptions(val_fraction=0.0))
    # labels handed over as arrays (no shard files) keep the checkpoint's record
    from adadiff.training.checkpoint import load_latest
    from adadiff.training.labels import load_shards

    before = load_latest(workdir / "mmle", stage="mmle")["state"]["labels_from"]
    train_mmle(cfg, workdir, opts(2), MMLEOptions(val_fraction=0.0), data=load_shards(made.shards))
    state = load_latest(workdir / "mmle", stage="mmle")["state"]
    assert state["labels_from"] == before and state["label_shards"] == 1
