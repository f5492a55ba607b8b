"""Plain helpers for tests (fixtures are in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_export(src: Path, dst: Path) -> Path:
    """A private copy of an export folder, for a test that edits or rebuilds it."""
    shutil.copytree(src, dst)
    return dst
