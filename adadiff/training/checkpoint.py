"""Atomic training checkpoints in a stage folder: ``ckpt-00001234.pt``, the last K kept.

A checkpoint is one ``torch.save`` dict of plain data and tensors (model and optimizer states,
step, RNG states, wall time), loaded with ``weights_only=True`` so reading one runs no code. It is
written to a temporary file in the same folder and renamed into place, so a crash or a SIGKILL
mid-write never leaves a half checkpoint behind the newest name.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adadiff.errors import ModelFolderError
from adadiff.locks import folder_lock

log = logging.getLogger("adadiff.training")

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _unreadable(exc: BaseException) -> str:
    """Why ``torch.load`` refused a file, in one clause: torch's own messages run to paragraphs,
    some advising ``weights_only=False``, which an adadiff checkpoint never needs."""
    if isinstance(exc, EOFError):
        return "the file is empty"
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds more than tensors and plain data, or is no torch file at all"
    return _first_line(exc).split(". ")[0]


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(folder: str | Path, step: int, payload: dict[str, Any], keep: int = 3) -> Path:
    """Write ``payload`` (plus its step) atomically, then drop all but the newest ``keep``."""
    import torch

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(folder, step)
    fd, tmp_name = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({**payload, "step": int(step)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except RuntimeError as exc:  # torch.save reports a short write (a full disk) as this
        tmp.unlink(missing_ok=True)
        raise OSError(f"the write stopped short, is the disk full? ({_first_line(exc)})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        log.info("removed %s (the newest %d are kept)", old, keep)
    log.debug("saved %s", target)
    return target


@contextmanager
def stage_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder/.lock`` while a run trains into it: a second run (a forgotten background
    job) would interleave its checkpoints with this one's and prune them. Advisory; a no-op
    where ``fcntl`` is missing (Windows)."""
    folder = Path(folder)

    def busy(holder: str) -> ModelFolderError:
        return ModelFolderError(
            f"{folder} is being trained into by {holder}; wait for it or stop it "
            "(Ctrl-C or kill saves a checkpoint), then run again"
        )

    lock = folder / ".lock"

    def unwritable(exc: OSError) -> ModelFolderError:
        # the lock file stays after a run: in a shared folder it is the last user's
        fix = f"remove the folder {lock}" if lock.is_dir() else f"make {lock} writable"
        return ModelFolderError(
            f"cannot open the lock file {lock} ({exc.strerror or exc}); {fix}, or choose "
            "another --workdir"
        )

    with folder_lock(lock, busy, unwritable=unwritable):
        # a write cut short by SIGKILL or a power loss leaves its temporary file; no other run
        # writes here while the lock is held, so any left is stale
        for pattern in (".ckpt-*.tmp", ".shard-*.tmp"):  # checkpoints, label shards
            for stale in folder.glob(pattern):
                stale.unlink(missing_ok=True)
                log.info("removed %s, left by an interrupted write", stale)
        yield


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    import torch

    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFolderError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        others = [p for p in path.parent.glob("ckpt-*.pt") if p != path]
        fallback = (
            "delete it to fall back to the previous one"
            if others
            else "it is the only one: delete it (and the stage folder) to start the stage over"
        )
        raise ModelFolderError(
            f"{path} is not a readable adadiff checkpoint ({_unreadable(exc)}); {fallback}"
        ) from exc
    if not isinstance(data, dict) or "step" not in data:
        raise ModelFolderError(f"{path} is not an adadiff checkpoint (no 'step' entry)")
    return data


def load_latest(folder: str | Path, *, stage: str | None = None) -> dict[str, Any] | None:
    """The newest checkpoint of ``folder`` or None; ``stage`` checks which trainer wrote it."""
    path = latest_checkpoint(folder)
    if path is None:
        return None
    data = load_checkpoint(path)
    if stage is not None and data.get("stage") != stage:
        raise ModelFolderError(
            f"{path} was written by the {data.get('stage')!r} trainer, expected {stage!r}; "
            "each stage needs its own folder"
        )
    return data


def require_latest(folder: str | Path, stage: str, hint: str) -> dict[str, Any]:
    """The newest checkpoint of an earlier stage, or an error that says how to make one."""
    data = load_latest(folder, stage=stage)
    if data is None:
        raise ModelFolderError(f"no {stage} checkpoint in {folder}; {hint}")
    return data
