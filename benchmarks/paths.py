"""Checks of the output paths a benchmark is given, made before its runs: a path that cannot be
written fails in one line at the start, not in a traceback after minutes of work. Nothing is
created, so a refused run leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

from adadiff.errors import OutputPathError


def check_out_folder(path: Path, flag: str = "--out") -> None:
    """``OutputPathError`` unless ``path`` is, or can be made as, a folder to write in."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; give a folder (new or existing) instead")
    _check_can_hold(path, flag, path)


def check_out_file(path: Path, flag: str = "--out") -> None:
    """``OutputPathError`` unless ``path`` is a file name that can be written."""
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file name in it instead")
    if path.exists() and os.access(path, os.W_OK):  # rewritten in place (or /dev/null)
        return
    _check_can_hold(path.parent, flag, path)


def _check_can_hold(folder: Path, flag: str, path: Path) -> None:
    """``folder`` exists and can be written in, or its nearest existing parent can."""
    found = next(p for p in (folder, *folder.parents) if p.exists())
    if not found.is_dir():
        raise OutputPathError(
            f"{flag} {path}: {found} is a file, so no folder can be made there; give another {flag}"
        )
    if not os.access(found, os.W_OK):
        raise OutputPathError(f"{flag} {path}: cannot write in {found}; give another {flag}")


def readme_arg(readme: Path, *, required: bool = False) -> str:
    """The ``--readme`` that a generated section's command names: the README's own file name (the
    command's paths are relative to its folder), left out where optional and the default."""
    return f" --readme {readme.name}" if required or readme.name != "README.md" else ""
