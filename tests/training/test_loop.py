"""Checkpoints and the training loop's schedules.

Micro config, a few steps each; fixtures in conftest.py, helpers in training_helpers.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

# FR metrics only: numpy, no set-up files needed.
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.training.checkpoint import list_checkpoints, load_latest, save_checkpoint
from adadiff.training.loop import TrainOptions


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
