"""Progress as timestamped log lines, for runs whose stderr is a file, a pipe or a job system.

``LogProgress`` is a progress callback (``stage, done, total``, what ``Upscaler.upscale`` calls):
it writes one line when a stage starts, at most one every ``every`` seconds while it runs, and
one when it ends. During ``denoise`` a line also says the tiles finished (from the ``tiles``
stage), the step (UNet pass over the active tiles) so far and an estimate of the time left from
the rate so far.

``denoise`` counts the timesteps the tiles have travelled from the start (999) towards 0, all
tiles together: adaptive tiles jump by varying intervals and exit early, so no count of steps is
known in advance, but this distance is. Shown as a percentage: as a count (24975 for 25 tiles)
it reads as if that many steps ran.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

# A progress callback: (stage, done, total); the library calls it, the CLI draws it.
Progress = Callable[[str, int, int], None]

DEFAULT_EVERY = 10.0


def format_duration(seconds: float) -> str:
    # whole seconds first: 59.6 s read "60s" where 60.0 s reads "1m00s"
    whole = round(max(0.0, seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LogProgress:
    """Timestamped progress lines on ``stream`` (default stderr), rate-limited to ``every`` s."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every: float = DEFAULT_EVERY,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0 seconds, got {every}")
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.clock = clock
        self.now = now
        self.stage: str | None = None
        self.stage_start = 0.0
        self.last_line = -float("inf")
        self.rounds = 0
        self.tiles: tuple[int, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "tiles":  # extra detail for the denoise lines, not a stage of its own
            self.tiles = (done, total)
            return
        t = self.clock()
        if stage != self.stage:
            # a caller that skips the call at 0 starts with its first step done
            self.stage, self.stage_start, self.rounds = stage, t, int(done > 0)
            if done < total:
                self._write(self._line(stage, done, total, t, started=True))
                return
        elif stage == "denoise":
            self.rounds += 1
        if done >= total or t - self.last_line >= self.every:
            self._write(self._line(stage, done, total, t, started=False))

    def _line(self, stage: str, done: int, total: int, t: float, *, started: bool) -> str:
        elapsed = t - self.stage_start
        share = done / total if total > 0 else 1.0
        if stage != "denoise":
            parts = [f"{stage} {100 * share:.0f}% ({done}/{total} tiles)"]
        else:
            parts = [f"{stage} {100 * share:.0f}%" + tiles_finished(self.tiles, " ({})")]
            if not started:
                parts.append(f"step {self.rounds}")
        if done >= total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif not started:
            parts.append(f"{format_duration(elapsed)} elapsed")
            if share > 0:
                parts.append(f"ETA {format_duration(elapsed * (1 - share) / share)}")
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        self.last_line = self.clock()
        stamp = self.now().isoformat(timespec="seconds")
        write_line(self.stream, f"{stamp} adadiff: {text}")

    def close(self) -> None:
        """Nothing to release; here so the CLI can treat it like its progress bars."""


def write_line(stream: TextIO, text: str) -> bool:
    """Print ``text`` to ``stream`` and flush; False where the stream refuses it.

    Progress and notes are for whoever watches the run: a stderr that cannot take them (a pipe
    whose reader has exited, as in ``2>&1 | head``, or a log file on a full disk) must not stop
    the work they describe and lose its output.
    """
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):  # ValueError: the stream was closed
        return False
    return True


def tiles_finished(tiles: tuple[int, int] | None, template: str = "{}") -> str:
    """``template`` around "5/25 tiles finished", or "" before the sampler has said."""
    return "" if tiles is None else template.format(f"{tiles[0]}/{tiles[1]} tiles finished")
