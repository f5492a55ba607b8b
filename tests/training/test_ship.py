"""The train command line and shipping a model folder.

Micro config, a few steps each; fixtures in conftest.py, helpers in training_helpers.py."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch
from training_helpers import synthetic_labels

# FR metrics only: numpy, no set-up files needed.
from adadiff.training.checkpoint import load_latest


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
