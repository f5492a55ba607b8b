"""The MMLE regressor stage. Micro config, a few steps each (fixtures: conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

# FR metrics only: numpy, no set-up files needed.
from training_helpers import (
    opts,
    synthetic_labels,
    with_lpips,
)

from adadiff.errors import ConfigError
from adadiff.training.checkpoint import load_latest
from adadiff.training.loop import TrainOptions


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


def test_mmle_learns_scores_against_the_hr_crop_when_the_config_asks(tmp_path, cfg):
    """mmle.reference "hr": the full-reference columns come from the labels' scores_hr, and
    PSNR is one head output like the others (no latent + reconstruction split)."""
    from adadiff.config import MMLEConfig
    from adadiff.training.assemble import baked_mmle
    from adadiff.training.mmle import MMLEOptions, referenced, train_mmle

    data = synthetic_labels()
    # against the truth: a different, still learnable function of the latents
    scale = np.mean(data["x0"] ** 2, axis=(1, 2, 3))
    data["scores_hr"] = np.stack([20 + 3 * np.log10(scale), 1 / (1 + scale), scale], axis=1)
    data["hr_metrics"] = data["metrics"].copy()
    hr_cfg = replace(
        cfg, mmle=MMLEConfig(hidden=cfg.mmle.hidden, metrics=cfg.mmle.metrics, reference="hr")
    )
    assert hr_cfg.mmle.psnr_index is None and cfg.mmle.psnr_index is not None
    np.testing.assert_array_equal(referenced(data, hr_cfg)["scores"], data["scores_hr"])
    assert referenced(data, cfg)["scores"] is data["scores"]
    o = TrainOptions(steps=60, batch=16, lr=3e-3, seed=0, log_every=10, warmup=0)
    result = train_mmle(cfg=hr_cfg, workdir=tmp_path, opts=o, mopts=MMLEOptions(), data=data)
    l2 = [h["losses"]["l2"] for h in result.history]
    assert l2[-1] < 0.6 * l2[0]
    state = load_latest(tmp_path / "mmle", stage="mmle")["state"]
    assert float(state["mean"][0]) == pytest.approx(data["scores_hr"][:, 0].mean(), rel=0.05)
    assert not baked_mmle(hr_cfg, state).split_columns
    stale = {k: v for k, v in data.items() if k not in ("scores_hr", "hr_metrics")}
    with pytest.raises(ConfigError, match="adadiff train labels"):
        train_mmle(cfg=hr_cfg, workdir=tmp_path / "b", opts=o, mopts=MMLEOptions(), data=stale)


def test_mmle_refuses_labels_of_another_tile_size(tmp_path, cfg):
    # labels of 32 px tiles (16 latent px) for a 64 px config: MMLE's layers take any size, so
    # it trained on them silently, on the scores of tiles the runtime never makes
    from adadiff.training.mmle import train_mmle

    other = replace(cfg, tile_size=2 * cfg.tile_size)
    with pytest.raises(ConfigError, match=r"labels of 32 px tiles, the config's tile_size is 64"):
        train_mmle(other, tmp_path, opts(1), data=synthetic_labels(side=cfg.latent_tile))
    assert not (tmp_path / "mmle").exists()
    train_mmle(cfg, tmp_path, opts(1), data=synthetic_labels(side=cfg.latent_tile))
