"""Where the quality metrics' set-up step keeps its files, and the hint every loader gives."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from adadiff.errors import ModelFolderError

CACHE_ENV = "ADADIFF_CACHE"
SETUP_HINT = "run `adadiff setup-metrics` (or `python -m adadiff.training.metrics_setup`) once"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$ADADIFF_CACHE``, else ``~/.cache/adadiff``."""
    env = os.environ.get(CACHE_ENV)
    try:
        if cache_dir is not None:
            return Path(cache_dir).expanduser()
        if env:
            return Path(env).expanduser()
        return Path.home() / ".cache" / "adadiff"
    except RuntimeError:  # $HOME unset and no passwd entry for this user (docker run --user N)
        raise ModelFolderError(
            "cannot tell this user's home folder ($HOME is unset and the user has no passwd "
            f"entry) for the cache; set ${CACHE_ENV} or pass --cache-dir (a path without ~)"
        ) from None


def write_cache_file(path: Path, data: bytes) -> None:
    """Write ``path`` in the cache whole or not at all; a failure is one ``ModelFolderError``."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError as exc:
        raise ModelFolderError(
            f"cannot write {path} ({exc.strerror or exc}); make the folder writable or give "
            "another cache (--cache-dir, or $ADADIFF_CACHE)"
        ) from exc
    finally:
        # On a read-only cache or one under a file this raises too (EROFS, ENOTDIR): it must
        # not replace the error above.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
