"""Timers: median of N after warm-up; CUDA events on the GPU, perf_counter on the CPU.

On the GPU a host clock measures launch time unless the stream is drained, so GPU timings use
CUDA events recorded around the call and read after a synchronize.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    seconds: list[float]  # every timed run, in order
    warmup: int
    method: str  # "perf_counter" or "cuda_events"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": round(self.median, 6),
            "min": round(min(self.seconds), 6),
            "all": [round(s, 6) for s in self.seconds],
            "warmup": self.warmup,
            "method": self.method,
        }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: str) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)  # that device, not the current one (cuda:1 runs too)


def measure(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: str = "cpu"
) -> tuple[Timing, Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return the timing and
    the last result."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    if is_cuda(device):
        return _cuda_events(fn, repeats, warmup, device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds, warmup, "perf_counter"), result


def _cuda_events(
    fn: Callable[[], Any], repeats: int, warmup: int, device: str
) -> tuple[Timing, Any]:
    import torch

    seconds = []
    result = None
    with torch.cuda.device(torch.device(device)):  # events go on that device's current stream
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000.0)
    return Timing(seconds, warmup, "cuda_events"), result


class Stopwatch:
    """Wall time of one block, draining the GPU first and last so queued work is counted."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
