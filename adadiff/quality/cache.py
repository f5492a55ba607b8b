"""Where the quality metrics' set-up step keeps its files, and the hint every loader gives."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ADADIFF_CACHE"
SETUP_HINT = "run `adadiff setup-metrics` (or `python -m adadiff.training.metrics_setup`) once"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$ADADIFF_CACHE``, else ``~/.cache/adadiff``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adadiff"
