"""CPU thread defaults that hold up on a busy machine.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels) whose idle threads
spin for a while before sleeping, and it starts one thread per core. On a machine where other
processes already use the cores, the spinning threads and the barriers that wait for a
descheduled thread made an upscale 10-40x slower than with one thread (issue 19: 197 s against
5.2 s). Two settings fix that without costing idle speed: OpenMP threads that wait passively
(``OMP_WAIT_POLICY=PASSIVE``, read once when libgomp loads, so it must be set before torch is
imported) and a thread count no larger than the CPUs this process may use.
"""

from __future__ import annotations

import logging
import numbers
import os
import sys
from pathlib import Path

from adadiff.errors import ConfigError

log = logging.getLogger("adadiff")

WAIT_POLICY = "OMP_WAIT_POLICY"
NUM_THREADS = "OMP_NUM_THREADS"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return max(1, count)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup allows (v2's ``cpu.max``, else v1's CFS quota), or None."""
    try:
        text = (root / "cpu.max").read_text().split()
    except OSError:
        return _cgroup_v1_quota(root)
    if len(text) != 2 or text[0] == "max":
        return None
    return _ratio(text[0], text[1])


def _cgroup_v1_quota(root: Path) -> float | None:
    # Docker on cgroup v1 hosts mounts the controller as cpu,cpuacct with cpu linked to it.
    for name in ("cpu", "cpu,cpuacct"):
        try:
            quota = (root / name / "cpu.cfs_quota_us").read_text().strip()
            period = (root / name / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        if quota.startswith("-"):  # -1: no quota
            return None
        return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        value = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def default_threads() -> int:
    """The thread count used when none is given: ``OMP_NUM_THREADS`` where the user set it (its
    first level; torch alone honours it, so overriding it broke a shell's or a job script's
    limit), else every usable CPU; never more than the usable CPUs (see ``usable_cpus``)."""
    cpus = usable_cpus()
    first = os.environ.get(NUM_THREADS, "").split(",")[0].strip()
    if first.isascii() and first.isdigit() and int(first) >= 1:
        return min(int(first), cpus)
    return cpus


def prefer_passive_wait() -> bool:
    """Ask OpenMP for sleeping (not spinning) idle threads, unless the user chose a policy.

    Takes effect only if torch is not imported yet; returns whether it can still take effect."""
    if "torch" in sys.modules:
        if os.environ.get(WAIT_POLICY, "").upper() != "PASSIVE":
            log.debug("torch was imported before adadiff could set %s=PASSIVE", WAIT_POLICY)
        return False
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return True


def check_threads(threads: int | None) -> int:
    """``threads`` or the default; a count below 1 is a ``ConfigError``."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ConfigError(
            f"threads must be a whole number >= 1 (or None for the default), got {threads!r}"
        )
    return int(threads)


def excess_threads_note(threads: int | None) -> str | None:
    """What to tell a user whose ``threads`` is more than the CPUs this process may use (None
    when it is not): the extra threads only wait for each other, which made a run 7x slower."""
    cpus = usable_cpus()
    if threads is None or threads <= cpus:
        return None
    return (
        f"--threads {threads} is more than the {cpus} CPU{'s' if cpus > 1 else ''} this process "
        f"may use; the extra threads only wait for each other and slow the run down: use "
        f"--threads {cpus} or leave it out"
    )
