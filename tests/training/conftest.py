"""Fixtures of the training tests: a micro model config, two small photos, and a workdir with
VAE and UNet stages trained for two steps each (once per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import micro_config, opts, small_pool

from adadiff.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Micro models gain nothing from a second thread, and on a shared CPU the threads' handoffs
    # cost several times the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cfg() -> ModelConfig:
    return micro_config()


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    from skimage import data
    from skimage.transform import resize

    return [
        resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32),
        np.repeat(resize(data.camera(), (48, 64))[:, :, None], 3, axis=2).astype(np.float32),
    ]


@pytest.fixture(scope="session")
def vae_workdir(tmp_path_factory, cfg, images) -> Path:
    from adadiff.training.vae import VAEOptions, train_vae

    workdir = tmp_path_factory.mktemp("stages")
    train_vae(cfg, workdir, opts(2), VAEOptions(perceptual_weight=0.0), images=images)
    return workdir


@pytest.fixture(scope="session")
def unet_workdir(vae_workdir, cfg, images) -> Path:
    from adadiff.training.unet import train_unet

    train_unet(cfg, vae_workdir, opts(2), small_pool(), images=images)
    return vae_workdir
