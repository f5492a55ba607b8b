"""Plain helpers for tests (fixtures are in conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def copy_export(src: Path, dst: Path) -> Path:
    """A private copy of an export folder, for a test that edits or rebuilds it."""
    shutil.copytree(src, dst)
    return dst


def run_with_file_size_limit(body: str, arg: Path, limit: int) -> str:
    """Run ``body`` (Python, ``sys.argv[1]`` is ``arg``) in a child process after the code
    above the ``# limited`` line, with files capped at ``limit`` bytes from that line on, as a
    full disk would cut them: writes past it fail with EFBIG. Returns the child's stdout."""
    setup, _, limited = body.partition("# limited\n")
    script = (
        "import resource, signal, sys\n"
        f"{setup}"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"{limited}"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(arg)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
