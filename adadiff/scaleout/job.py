"""``adadiff upscale-many``: a folder of images over Ray workers.

The driver owns the folders: it reads each input's bytes, sends them to a worker actor, and
writes the encoded output and its report atomically when they come back (report last, so a report
on disk means its image is complete). Workers need no shared file system. Each worker holds up to
``queue`` images, so it can pool their tiles into full engine calls. A worker process that dies
is restarted by Ray, which resubmits its unfinished calls; a worker that cannot be restarted has
its images sent to the others. While images are in flight and no line came for a while, the
driver asks the workers where each image is (stage and share done) and says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adadiff import __version__
from adadiff.errors import (
    AdadiffError,
    BackendUnavailableError,
    ConfigError,
    OutputPathError,
    WorkerStoppedError,
)
from adadiff.imageio import INPUT_FORMATS, check_writable, remove_stale_temps, write_bytes_atomic
from adadiff.presets import PRESETS, is_preset
from adadiff.progress import DEFAULT_EVERY, format_duration, write_line
from adadiff.scaleout.plan import JOB_REPORT, ImageTask, JobSettings, Plan, job_stamp, make_plan
from adadiff.scaleout.worker import UpscaleWorker

if sys.platform != "win32":
    import resource

log = logging.getLogger("adadiff")

MAX_ATTEMPTS = 3  # sends of one image to a new worker after its worker was lost for good
PROGRESS_POLL_SECONDS = 2.0  # how long a progress line waits for the workers' answers
PROGRESS_SHOWN = 4  # images named on a progress line; the rest are counted
RESTART_POLL_SECONDS = 0.5  # how often a restarting worker is asked whether it is back
# Temporary files of an interrupted write (a killed job) are removed when untouched this long.
# Two jobs may write into one folder at once (they are not refused), and a live temporary file is
# written within seconds, so an hour never catches another job's write under way.
STALE_TEMP_SECONDS = 3600.0
_STAGES = {"encode": "encoding", "denoise": "denoising", "decode": "decoding", "save": "saving"}


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    ray_address: str | None = None
    workers: int | None = None  # None: as many as the cluster's CPUs (GPUs) allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    queue: int | None = None  # images in flight per worker; None: the max batch
    cross_image: bool = True
    max_restarts: int = 3
    threads: int | None = None  # CPU threads per worker; None: its whole CPUs (at least 1)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if not self.cpus_per_worker > 0:  # written so that NaN is refused too
            raise ConfigError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if not self.gpus_per_worker >= 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.queue is not None and self.queue < 1:
            raise ConfigError(f"--queue must be at least 1, got {self.queue}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class ImageRecord:
    input: str
    output: str
    status: str  # done | skipped | failed
    error: str | None = None
    worker_pid: int | None = None
    seconds: float | None = None  # from send to write, as the driver saw it
    unet_evaluations: int | None = None
    tiles: int | None = None


@dataclass
class JobResult:
    records: list[ImageRecord]
    wall_seconds: float
    startup_seconds: float = 0.0  # Ray start and model loading, before the first image is sent
    workers: list[dict[str, Any]] = field(default_factory=list)  # statistics at the end
    started: list[dict[str, Any]] = field(default_factory=list)  # worker info at the start
    report_path: Path | None = None
    # why the job stopped before its last image (the output's disk is full), or None
    stopped: str | None = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r.status == status)

    @property
    def images_per_hour(self) -> float:
        """Over the whole job, start-up included."""
        return 3600.0 * self.count("done") / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def steady_images_per_hour(self) -> float:
        """After start-up: what more images in the same job would come at."""
        busy = self.wall_seconds - self.startup_seconds
        return 3600.0 * self.count("done") / busy if busy > 0 else 0.0

    @property
    def mean_batch(self) -> float:
        calls = sum(w.get("unet_calls", 0) for w in self.workers)
        evals = sum(w.get("unet_evaluations", 0) for w in self.workers)
        return evals / calls if calls else 0.0


Listener = Callable[[ImageRecord, int, int], None]
Status = Callable[[str], None]  # a line about the job as a whole: start-up, images in flight


def worker_threads(cpus_per_worker: float) -> int:
    """The torch threads a worker gets when --threads is not given: its whole CPUs."""
    return max(1, math.floor(cpus_per_worker))


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(
            f'upscale-many runs on Ray, which is not installed ({exc}); pip install "adadiff[ray]"'
        ) from exc
    return ray


def run_job(
    input_dir: Path,
    output_dir: Path,
    settings: JobSettings,
    cluster: ClusterOptions,
    *,
    on_record: Listener | None = None,
    on_status: Status | None = None,
    progress_every: float = DEFAULT_EVERY,
) -> JobResult:
    """Upscale every image in ``input_dir`` that has no valid output yet; write the job report.

    ``on_record`` hears each image as it ends; ``on_status`` hears the start-up steps and, when
    neither kind of line came for ``progress_every`` seconds, where the images in flight are."""
    started = time.perf_counter()
    plan = make_plan(input_dir, output_dir, settings)
    output_dir = output_dir.expanduser().resolve()
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(
            f"cannot create the output folder {output_dir} ({exc.strerror or exc}); pick another"
        ) from exc
    try:
        # before Ray starts and any image is upscaled: a folder that refuses files fails now
        check_writable(output_dir / JOB_REPORT, "OUTPUT_DIR")
        listeners = _Listeners(on_record, on_status, progress_every)
        stale = remove_stale_temps(output_dir, STALE_TEMP_SECONDS)
        if stale:
            listeners.status(
                f"removed {len(stale)} temporary file{'s' * (len(stale) != 1)} left in "
                f"{output_dir} by an interrupted job ({', '.join(p.name for p in stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''})"
            )
        return _run_planned(plan, output_dir, settings, cluster, started, listeners)
    except AdadiffError:
        # A refused job (too many --workers, a model that does not load) leaves no empty folder.
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def _run_planned(
    plan: Plan,
    output_dir: Path,
    settings: JobSettings,
    cluster: ClusterOptions,
    started: float,
    listeners: _Listeners,
) -> JobResult:
    records = [ImageRecord(str(t.source), str(t.output), "skipped") for t in plan.done]
    total = len(plan.todo) + len(plan.done)
    for index, record in enumerate(records, start=1):
        listeners.record(record, index, total)
    for path in plan.ignored:
        why = (
            "a folder (subfolders are not searched)"
            if path.is_dir()
            else "not an image by its name"
            if path.is_file()
            else "a link to nothing"
        )
        log.warning("%s: %s; left out", path, why)
    if plan.outdated:
        log.warning("%s", outdated_line(plan.outdated))
    if total == 0:
        names = ", ".join(sorted(INPUT_FORMATS))
        log.warning("the input folder holds no images (by name: %s); nothing to do", names)
    workers: list[dict[str, Any]] = []
    started_info: list[dict[str, Any]] = []
    startup = 0.0
    stopped: str | None = None
    if plan.todo:
        if cluster.ray_address is None:
            check_local_paths(settings)
            if os.environ.get("RAY_ADDRESS"):  # Ray's own way to name a cluster counts too
                check_reachable(os.environ["RAY_ADDRESS"], given="RAY_ADDRESS")
        else:
            check_reachable(cluster.ray_address)
        ray = import_ray()
        previous = signal.getsignal(signal.SIGTERM)
        started_ray = _connect(ray, cluster, listeners)
        # ray.init puts its own SIGTERM handler in this process, which aborts with a stack dump
        # and leaves the local Ray running: stop the way Ctrl-C does instead
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            dispatcher = _Dispatcher(ray, settings, cluster, plan.todo, output_dir, listeners)
            startup = time.perf_counter() - started
            started_info = dispatcher.info
            n = len(dispatcher.actors)
            listeners.status(
                f"{n} worker{'s' * (n != 1)} ready in {startup:.1f}s; upscaling "
                f"{len(plan.todo)} image{'s' * (len(plan.todo) != 1)}"
            )
            workers = dispatcher.run(records, total)
            stopped = dispatcher.stopped
        except KeyboardInterrupt:
            # An earlier job's report would otherwise stay, describing other settings and
            # outputs that this job has since replaced.
            _report_interrupted(plan, output_dir, settings, cluster, records, started, startup)
            raise
        finally:
            if started_ray:
                ray.shutdown()
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, previous)
    result = JobResult(records, time.perf_counter() - started, startup, workers, started_info)
    result.stopped = stopped
    result.report_path = write_job_report(output_dir, settings, cluster, result, plan.ignored)
    return result


def outdated_line(outdated: dict[ImageTask, str]) -> str:
    """One line on the earlier outputs this job replaces, grouped by what changed."""
    by_why: dict[str, list[str]] = {}
    for task, why in outdated.items():
        by_why.setdefault(why, []).append(task.output.name)
    n = len(outdated)
    parts = []
    for why, names in by_why.items():
        shown = ", ".join(names[:PROGRESS_SHOWN]) + (", ..." if len(names) > PROGRESS_SHOWN else "")
        parts.append(f"{len(names)} {why} ({shown})")
    return f"{n} earlier output{'s' * (n != 1)} made again: " + "; ".join(parts)


INTERRUPTED = "interrupted (Ctrl-C or SIGTERM) before its output was written"


def _report_interrupted(
    plan: Plan,
    output_dir: Path,
    settings: JobSettings,
    cluster: ClusterOptions,
    records: list[ImageRecord],
    started: float,
    startup: float,
) -> None:
    """Write the job report of a job stopped by Ctrl-C or SIGTERM: the images that ended, and
    every other one as failed. Best effort: the interruption is what the user must hear of."""
    ended = {r.input for r in records}
    records = records + [
        ImageRecord(str(t.source), str(t.output), "failed", INTERRUPTED)
        for t in plan.todo
        if str(t.source) not in ended
    ]
    result = JobResult(records, time.perf_counter() - started, startup)
    result.stopped = "interrupted"
    try:
        write_job_report(output_dir, settings, cluster, result, plan.ignored)
    except AdadiffError as exc:
        log.warning("no job report for the interrupted job: %s", exc)


# The output folder takes no more files. Not EFBIG: a file-size limit (ulimit -f, FAT32's 4 GiB)
# refuses that one file, and the next, smaller image still fits.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class _Listeners:
    """The job's two kinds of lines, and when the last one went out (progress lines fill the
    gaps, so a job whose images end often prints none)."""

    def __init__(self, on_record: Listener | None, on_status: Status | None, every: float) -> None:
        if every < 0:
            raise ValueError(f"progress_every must be >= 0 seconds, got {every}")
        self.on_record = on_record
        self.on_status = on_status
        self.every = every
        self.last_line = time.perf_counter()

    def record(self, record: ImageRecord, done: int, total: int) -> None:
        if self.on_record:
            self.on_record(record, done, total)
        self.last_line = time.perf_counter()

    def status(self, text: str) -> None:
        if self.on_status:
            self.on_status(text)
        self.last_line = time.perf_counter()

    def wait_seconds(self) -> float | None:
        """How long to wait for an image before a progress line is due (None: no lines)."""
        if self.on_status is None:
            return None
        return max(0.0, self.last_line + self.every - time.perf_counter())


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def check_local_paths(settings: JobSettings) -> None:
    """Fail before Ray starts when a model or engines folder named on this machine is missing
    (on a remote cluster the folders live on the nodes, so they are not checked here)."""
    model = settings.model
    if model is not None and not is_preset(model) and not (Path(model) / "adadiff.json").is_file():
        raise ConfigError(
            f"--model {model} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor a model folder with an adadiff.json"
        )
    if settings.engines is not None and not Path(settings.engines).is_dir():
        raise ConfigError(f"--engines {settings.engines} is not a folder; run adadiff export first")


# Recent Ray (2.60) turns token authentication on for a new local instance and logs this, advising
# RAY_AUTH_MODE=disabled to opt out: for an instance that adadiff starts on this machine for one
# job and stops after it, the line gives the user nothing to do but weaken it. Authentication
# stays on; only this line is dropped, and only while adadiff starts its own instance.
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster."


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_AUTH_NOTICE)


@contextlib.contextmanager
def _quiet_token_auth_notice() -> Iterator[None]:
    logger = logging.getLogger(_TOKEN_AUTH_LOGGER)
    notice = _DropTokenAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


RAY_PROBE_SECONDS = 10.0
# What an HTTP/2 client sends first; a gRPC server (Ray's GCS and its client server) answers with
# a SETTINGS frame: 3 bytes of length, then the frame type 4.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4


def check_reachable(
    address: str, timeout: float = RAY_PROBE_SECONDS, given: str = "--ray-address"
) -> None:
    """Refuse a Ray address of the form HOST:PORT (or ray://HOST:PORT) where nothing answers, or
    where something that is not Ray does (a web server, a mistyped port): ``ray.init`` keeps
    retrying such an address for minutes and says so only in its own connection warnings.
    ``auto`` and forms without a port are left to Ray; ``given`` names where the address came
    from (``--ray-address`` or ``RAY_ADDRESS``)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return  # an IPv6 address without brackets (::1): no port can be told apart; Ray's to say
    shown = f"{host}:{port}"  # [::1]:6379 as given
    host = host.removeprefix("[").removesuffix("]")
    fix = (
        "give the address the head node's `ray start --head` printed (ray://HEAD:10001 from "
        "outside the cluster, auto on a node), or "
        f"{'unset RAY_ADDRESS' if given == 'RAY_ADDRESS' else 'leave out --ray-address'} "
        "to run on this machine"
    )
    try:
        conn = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        # a timeout has no strerror: its text ("timed out") says more than its class name
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"{given} {address}: nothing answers at {shown} ({why}); {fix}") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS server answers nothing to plain HTTP/2: Ray's to check
        try:
            conn.sendall(_HTTP2_PREFACE)
            head = _read_some(conn, 4)
        except OSError:
            head = b""
    if len(head) < 4 or head[3] != _HTTP2_SETTINGS:
        raise ConfigError(
            f"{given} {address}: something answers at {shown}, but not Ray (it does not speak "
            f"gRPC, as Ray's GCS and client server do: another program, or the dashboard's "
            f"port); {fix}"
        )


def _read_some(conn: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes, fewer when the peer closes; the socket's timeout ends the wait."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _connect(ray: Any, cluster: ClusterOptions, listeners: _Listeners) -> bool:
    """Join ``--ray-address`` or start a local instance; True when this call started Ray."""
    if ray.is_initialized():
        return False
    # Without --ray-address, "local": a new instance of our own. Plain ray.init() would join the
    # cluster that /tmp/ray/ray_current_cluster names (the last `ray start` here), and wait
    # minutes on one that is gone. RAY_ADDRESS, Ray's own way to name a cluster, still counts.
    address = cluster.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        given = "" if cluster.ray_address else " (RAY_ADDRESS)"
        listeners.status(f"connecting to the Ray cluster at {address}{given}")
    else:
        listeners.status("starting a local Ray instance (--ray-address joins a running one)")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    # the processes a local start adds below this one are Ray's (the caller may have others)
    before = set(_descendants(os.getpid())) if address == "local" else set()
    try:
        if address != "local":
            ray.init(address=address, **kwargs)
        else:
            with _quiet_token_auth_notice():
                ray.init(address="local", **kwargs)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C, or SIGTERM: ray.init's first step is a SIGTERM handler that exits with 15
        if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
            raise
        if address == "local":
            _stop_half_started_ray(ray, before)
        raise KeyboardInterrupt from exc
    except Exception as exc:  # Ray raises a bare Exception when its node does not come up
        where = "a local Ray instance" if address == "local" else address
        if address == "local":
            hint = _file_size_limit_hint() or _ray_home_hint(exc)
        else:
            hint = _token_hint(exc)
        why = str(exc).rstrip(".") if hint else exc
        raise ConfigError(f"could not start or reach {where}: {why}{hint}") from exc
    return True


STOP_WAIT_SECONDS = 5.0  # how long the processes of a stopped local Ray get to end on SIGTERM


def _stop_half_started_ray(ray: Any, before: set[int]) -> None:
    """Stop what an interrupted ``ray.init`` of a local instance had started. ``ray.shutdown``
    stops only a node that finished starting, and the raylet's agents outlive the raylet: they
    kept running after the job ended. Until then they are this process's descendants, less
    ``before`` (those it had before Ray started)."""
    started = [pid for pid in _descendants(os.getpid()) if pid not in before]
    with contextlib.suppress(Exception):  # best effort: the interruption is what counts
        ray.shutdown()
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        for pid in started:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        while started and time.monotonic() < deadline:
            started = [pid for pid in started if _running(pid)]
            time.sleep(0.1)
        if not started:
            return
        deadline = time.monotonic() + STOP_WAIT_SECONDS


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (children first reached first), from ``ps``; none where
    ``ps`` is missing (Windows)."""
    try:
        table = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "ppid="],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(fields[0]))
    found: list[int] = []
    todo = [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` is still a live process (a zombie is not: it has ended); reaps it when
    it is this process's child."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _file_size_limit_hint() -> str:
    """Why a local Ray cannot start under ``ulimit -f``: its object store is a file of several
    GB, and the limit kills the raylet that makes it (the job times out waiting for it)."""
    if sys.platform == "win32":
        return ""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return ""
    return (
        f"; this shell limits files to {limit} bytes (ulimit -f), and the object store of a "
        "local Ray is one file of up to 30% of memory: raise the limit (ulimit -f unlimited)"
    )


def _ray_home_hint(exc: BaseException) -> str:
    """Why a local Ray cannot start under a read-only $HOME, or none (unset, and no passwd
    entry): it first saves an access token of its own in ~/.ray/auth_token, unless
    RAY_AUTH_TOKEN gives one."""
    filename = exc.filename if isinstance(exc, OSError) else None
    if filename is not None and ".ray" in Path(filename).parts:
        where = "make that folder writable"
    elif isinstance(exc, RuntimeError) and "home directory" in str(exc):  # Path.home()'s words
        where = "set $HOME to a writable folder"
    else:
        return ""
    return (
        f"; a local Ray saves its access token in ~/.ray: {where}, or give the token yourself "
        "(export RAY_AUTH_TOKEN=$(openssl rand -hex 32)) and run again"
    )


def _token_hint(exc: BaseException) -> str:
    """Why a running cluster refused this process: it uses token authentication, and the
    token (or RAY_AUTH_MODE=token, without which none is sent) is missing here. Ray says so
    only in the cause it chains and in a warning a second, then "Failed to connect"."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not any("InvalidAuthToken" in str(error) for error in chain):
        return ""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            "; the cluster uses token authentication: set RAY_AUTH_MODE=token here too, with "
            "the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        )
    return (
        "; the cluster uses token authentication and refused the token here (RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): give the one the cluster was started with"
    )


class _Dispatcher:
    def __init__(
        self,
        ray: Any,
        settings: JobSettings,
        cluster: ClusterOptions,
        todo: list[ImageTask],
        output_dir: Path,
        listeners: _Listeners,
    ) -> None:
        self.ray = ray
        self.listeners = listeners
        self.settings = settings
        self.cluster = cluster
        self.pending = list(reversed(todo))  # pop() takes the next in name order
        self.attempts: dict[Path, int] = {}
        self.unreadable: list[ImageRecord] = []
        self.digests: dict[Path, str] = {}  # sha256 of the bytes sent, for the resume stamp
        # images in flight when their worker died: each goes again alone, so that one that kills
        # its worker (out of memory) fails by itself instead of with the images beside it
        self.suspects: set[Path] = set()
        # workers Ray is restarting: a call to one fails at once, so each is asked (info) until
        # it answers, and is sent images again only then; by the call's ref
        self.waking: dict[Any, int] = {}
        self.queue = cluster.queue or settings.max_batch
        self.started = 0.0
        self.output_dir = output_dir
        self.stopped: str | None = None
        # every worker loads the model: one per CPU of a large machine for a few images would
        # fill its memory, and a worker beyond one per image never gets one
        asked = self._worker_count()
        self.workers = min(asked, len(todo))

        actor = ray.remote(UpscaleWorker).options(
            num_cpus=cluster.cpus_per_worker,
            num_gpus=cluster.gpus_per_worker,
            max_restarts=cluster.max_restarts,
            # no retries by Ray, which resent every image in flight together: the images a
            # death interrupts come back here, and go again alone (suspects)
            max_task_retries=0,
            # each queued image holds a thread until it is done; the spare ones answer info,
            # progress and stats while the engine is busy
            max_concurrency=self.queue + 2,
        )
        device = settings.device
        if cluster.gpus_per_worker > 0 and device == "cpu":
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the worker's share
        worker_settings = asdict(settings) | {"device": device}
        threads = cluster.threads or worker_threads(cluster.cpus_per_worker)
        share = f"{cluster.cpus_per_worker:g} CPU{'s' * (cluster.cpus_per_worker > 1)}"
        if cluster.gpus_per_worker > 0:
            share += f", {cluster.gpus_per_worker:g} GPU"
        listeners.status(
            f"starting {self.workers} worker{'s' * (self.workers != 1)} ({share} and "
            f"{threads} thread{'s' * (threads != 1)} each"
            f"{', one per image' if self.workers < asked else ''}) and loading the model"
        )
        self.actors = [
            actor.remote(worker_settings, threads=threads, cross_image=cluster.cross_image)
            for _ in range(self.workers)
        ]
        self.info = self._wait_ready()

    def _worker_count(self) -> int:
        """--workers, checked against the cluster (Ray would wait forever for missing
        resources), or as many as fit."""
        have = self.ray.cluster_resources()
        c = self.cluster
        per = {"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker}
        if c.workers is None:
            fit = min(int(have.get(k, 0.0) / v + 1e-9) for k, v in per.items() if v > 0)
            if fit < 1:
                raise ConfigError(
                    f"the Ray cluster has {have.get('CPU', 0.0):g} CPU and "
                    f"{have.get('GPU', 0.0):g} GPU, too few for one worker with "
                    f"{c.cpus_per_worker:g} CPU and {c.gpus_per_worker:g} GPU"
                )
            return fit
        for name, amount in per.items():
            need = c.workers * amount
            if need > have.get(name, 0.0) + 1e-9:
                raise ConfigError(
                    f"{c.workers} workers need {need:g} {name} in all but the Ray cluster has "
                    f"{have.get(name, 0.0):g}; lower --workers or --{name.lower()}s-per-worker"
                )
        return c.workers

    def _wait_ready(self) -> list[dict[str, Any]]:
        refs = [a.info.remote() for a in self.actors]
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayActorError as exc:
            raise ConfigError(f"a worker failed to start: {_cause(exc)}") from exc
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, AdadiffError) else exc
            raise ConfigError(f"a worker failed to load the model: {_cause(cause)}") from exc

    def _send(self, actor_index: int, in_flight: dict[Any, tuple[ImageTask, int, float]]) -> None:
        task = self.pending.pop()
        try:
            data = task.source.read_bytes()
        except OSError as exc:
            error = f"cannot read the file ({exc.strerror or exc})"
            self.unreadable.append(ImageRecord(str(task.source), str(task.output), "failed", error))
            return
        self.digests[task.source] = hashlib.sha256(data).hexdigest()
        payload = {"name": task.name, "data": data, "suffix": task.output.suffix}
        ref = self.actors[actor_index].upscale.remote(payload)
        in_flight[ref] = (task, actor_index, time.perf_counter())

    def run(self, records: list[ImageRecord], total: int) -> list[dict[str, Any]]:
        ray = self.ray
        in_flight: dict[Any, tuple[ImageTask, int, float]] = {}
        alive = set(range(len(self.actors)))
        self.started = time.perf_counter()
        for _ in range(self.queue):  # round robin, so short jobs spread over every worker
            for index in range(len(self.actors)):
                if self.pending:
                    self._send(index, in_flight)
        while in_flight or self.unreadable or (self.waking and self.pending):
            self._flush_unreadable(records, total)
            if not in_flight and not self.waking:
                self._refill(alive, in_flight)
                continue
            timeout = self.listeners.wait_seconds()
            ready, _ = ray.wait([*in_flight, *self.waking], num_returns=1, timeout=timeout)
            if not ready:  # nothing ended for a while: say where the images are
                self.listeners.status(self._progress_line(in_flight, len(records), total))
                continue
            ref = ready[0]
            if ref in self.waking:
                self._woken(ref, alive)
                self._refill(alive, in_flight)
                continue
            task, index, sent = in_flight.pop(ref)
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                # Restarting (ActorUnavailableError), the worker takes the image again; with its
                # restarts used up it is gone, and its images go to the others.
                restarting = isinstance(exc, ray.exceptions.ActorUnavailableError)
                record = self._gone(task, exc, index, alive, died=True, restarting=restarting)
                if record is None:
                    self._refill(alive, in_flight)
                    continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, WorkerStoppedError):
                    # its engine stopped (a lost device): it would fail every image sent to it
                    record = self._gone(task, exc, index, alive)
                    if record is None:
                        self._refill(alive, in_flight)
                        continue
                else:
                    record = ImageRecord(str(task.source), str(task.output), "failed", _cause(exc))
            else:
                record = self._write(task, reply)
            record.seconds = round(time.perf_counter() - sent, 3)
            records.append(record)
            self.listeners.record(record, len(records), total)
            if self.stopped:
                continue  # the images in flight finish; no new one starts
            self._refill(alive, in_flight)
        for task in reversed(self.pending):
            record = (
                self._not_started(task)
                if self.stopped
                else ImageRecord(str(task.source), str(task.output), "failed", "no worker left")
            )
            records.append(record)
            self.listeners.record(record, len(records), total)
        self.pending.clear()
        return self._stats(alive)

    def _not_started(self, task: ImageTask) -> ImageRecord:
        why = f"not started: {self.stopped}"
        return ImageRecord(str(task.source), str(task.output), "failed", why)

    def _flush_unreadable(self, records: list[ImageRecord], total: int) -> None:
        while self.unreadable:
            records.append(self.unreadable.pop(0))
            self.listeners.record(records[-1], len(records), total)

    def _progress_line(
        self, in_flight: dict[Any, tuple[ImageTask, int, float]], finished: int, total: int
    ) -> str:
        """Ask the workers that hold images where each one is. The actor is threaded, so the
        call runs beside a busy engine; a worker that does not answer in time (restarting, say)
        has its images listed without a stage."""
        ray = self.ray
        asked = {
            self.actors[index].progress.remote(): index
            for index in sorted({index for _, index, _ in in_flight.values()})
        }
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=PROGRESS_POLL_SECONDS)
        answers: dict[int, dict[str, dict[str, Any]]] = {}
        for ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                answers[asked[ref]] = {entry["name"]: entry for entry in ray.get(ref)}
        now = time.perf_counter()
        working = []
        for task, index, sent in in_flight.values():
            answer = answers.get(index)
            entry = None if answer is None else answer.get(task.name, {"stage": "queued"})
            working.append((task.name, now - sent, entry))
        return progress_line(finished, total, working)

    def _refill(self, alive: set[int], in_flight: dict[Any, tuple[ImageTask, int, float]]) -> None:
        """Keep every live worker's queue full; a suspect goes only to a worker with nothing in
        flight, and that worker gets nothing more until it is done. None once stopped."""
        if self.stopped:
            return
        load = {i: 0 for i in alive}
        alone = set(self.waking.values())  # workers running a suspect, and restarting ones
        for task, index, _ in in_flight.values():
            if index in load:
                load[index] += 1
                if task.source in self.suspects:
                    alone.add(index)
        for index in sorted(alive):
            while self.pending and load[index] < self.queue and index not in alone:
                suspect = self.pending[-1].source in self.suspects
                if suspect and load[index] > 0:
                    break
                self._send(index, in_flight)
                load[index] += 1
                if suspect:
                    alone.add(index)

    def _gone(
        self,
        task: ImageTask,
        exc: Exception,
        index: int,
        alive: set[int],
        *,
        died: bool = False,
        restarting: bool = False,
    ) -> ImageRecord | None:
        """``task``'s worker process died (``restarting``: Ray restarts it) or its engine stopped:
        None when ``task`` goes back to be sent again (alone after a death), else its record."""
        if not restarting:
            alive.discard(index)
        elif index not in self.waking.values():
            self.waking[self.actors[index].info.remote()] = index
        if died:
            self.suspects.add(task.source)
        record = self._lost(task, exc, alive)
        if record is None and self.stopped:  # no image starts again once stopped
            return self._not_started(task)
        if record is None:
            self.pending.append(task)
        return record

    def _woken(self, ref: Any, alive: set[int]) -> None:
        """A restarting worker's answer: back (it takes images again), still restarting (ask
        again), or gone for good."""
        index = self.waking.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:
            time.sleep(RESTART_POLL_SECONDS)
            self.waking[self.actors[index].info.remote()] = index
        except self.ray.exceptions.RayError:
            alive.discard(index)

    def _lost(self, task: ImageTask, exc: Exception, alive: set[int]) -> ImageRecord | None:
        tries = self.attempts[task.source] = self.attempts.get(task.source, 0) + 1
        if alive and tries < MAX_ATTEMPTS:
            log.warning("%s: its worker died or stopped; sending it again", task.name)
            return None
        why = "no worker left" if not alive else f"its worker died or stopped {tries} times"
        return ImageRecord(str(task.source), str(task.output), "failed", f"{why}: {_cause(exc)}")

    def _write(self, task: ImageTask, reply: dict[str, Any]) -> ImageRecord:
        base = ImageRecord(str(task.source), str(task.output), reply["status"])
        base.worker_pid = reply.get("pid")
        if reply["status"] != "done":
            base.error = reply.get("error")
            return base
        report = {"input": str(task.source), "output": str(task.output), **reply["report"]}
        report["job"] = job_stamp(task, self.settings, self.digests.pop(task.source, None))
        try:
            # the old report goes first: a kill between the two writes must not leave a new
            # image under a report whose stamp says it is the old one (a rerun would skip it)
            with contextlib.suppress(OSError):
                task.report.unlink(missing_ok=True)
            # a link in OUTPUT_DIR (a cp -rs copy, a link to the input) is replaced, not written
            # through: the job's files go into OUTPUT_DIR and nowhere else
            write_bytes_atomic(task.output, reply["image"], follow_links=False)
            report_bytes = (json.dumps(report, indent=2) + "\n").encode()
            write_bytes_atomic(task.report, report_bytes, follow_links=False)
        except OutputPathError as exc:  # this image's files only: the others go on
            # no output without its report (a report name can pass the file system's limit
            # where the output's does not): a rerun sees a failed image, not a half-done one
            with contextlib.suppress(OSError):
                if task.output.is_file():
                    task.output.unlink()
            base.status, base.error = "failed", str(exc)
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in _NO_ROOM:
                # every later image would fail the same way after its whole upscale
                self.stopped = f"the output folder takes no more files ({exc.__cause__.strerror})"
            return base
        base.unet_evaluations = report["unet_evaluations"]
        base.tiles = report["tiles"]
        return base

    def _stats(self, alive: set[int]) -> list[dict[str, Any]]:
        stats = []
        for index in sorted(alive - set(self.waking.values())):  # a restarting one has none
            try:
                stats.append(self.ray.get(self.actors[index].stats.remote(), timeout=60))
            except Exception as exc:  # statistics are best effort
                log.warning("worker %d: no statistics (%s)", index, _cause(exc))
        for actor in self.actors:
            self.ray.kill(actor)
        return stats


def _cause(exc: BaseException) -> str:
    text = str(getattr(exc, "cause", None) or exc).strip()
    first = text.splitlines()[-1] if text else type(exc).__name__
    return first[:500]


def write_job_report(
    output_dir: Path,
    settings: JobSettings,
    cluster: ClusterOptions,
    result: JobResult,
    ignored: list[Path],
) -> Path:
    data = {
        "version": __version__,
        "settings": asdict(settings),
        "cluster": asdict(cluster),
        "images": len(result.records),
        "done": result.count("done"),
        "skipped": result.count("skipped"),
        "failed": result.count("failed"),
        # why the job ended before its last image (interrupted, a full disk), or null
        "stopped": result.stopped,
        "wall_seconds": round(result.wall_seconds, 3),
        "startup_seconds": round(result.startup_seconds, 3),
        "images_per_hour": round(result.images_per_hour, 1),
        "steady_images_per_hour": round(result.steady_images_per_hour, 1),
        "mean_batch": round(result.mean_batch, 3),
        "workers_started": result.started,
        "workers": result.workers,
        "ignored": [str(p) for p in ignored],
        "records": [asdict(r) for r in result.records],
    }
    path = output_dir / JOB_REPORT
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), follow_links=False)
    return path


def progress_line(
    finished: int, total: int, working: list[tuple[str, float, dict[str, Any] | None]]
) -> str:
    """``[k/N done] working: NAME denoising 40% (1m05s, ETA 1m30s), ...; 3 queued``.

    ``working`` holds each image in flight, oldest first: its name, seconds since it was sent,
    and its worker's entry (``stage``, ``done``, ``total``, ``seconds`` in that stage), or
    ``{"stage": "queued"}`` while it waits in the worker, or None when its worker did not
    answer. Images under way come first; after ``PROGRESS_SHOWN`` of them the rest are counted.
    """
    active = [w for w in working if w[2] is None or w[2]["stage"] != "queued"]
    queued = len(working) - len(active)
    parts = []
    for name, seconds, entry in active[:PROGRESS_SHOWN]:
        if entry is None:
            parts.append(f"{name} (sent {format_duration(seconds)} ago, no answer from its worker)")
            continue
        stage = entry["stage"]
        if stage == "save":
            parts.append(f"{name} {_STAGES[stage]} ({format_duration(seconds)})")
            continue
        share = entry["done"] / entry["total"] if entry["total"] > 0 else 1.0
        detail = format_duration(seconds)
        if stage == "denoise" and 0 < share < 1:
            # the rate so far: images joining or leaving the worker's batches change it
            detail += f", ETA {format_duration(entry['seconds'] * (1 - share) / share)}"
        parts.append(f"{name} {_STAGES.get(stage, stage)} {100 * share:.0f}% ({detail})")
    line = f"[{finished}/{total} done] working: " + (", ".join(parts) or "nothing under way")
    rest = [f"{len(active) - PROGRESS_SHOWN} more"] if len(active) > PROGRESS_SHOWN else []
    rest += [f"{queued} queued"] if queued else []
    return line + ("; " + ", ".join(rest) if rest else "")


def print_status(text: str) -> None:
    write_line(sys.stderr, text)


def print_record(record: ImageRecord, done: int, total: int) -> None:
    name = Path(record.input).name
    if record.status == "done":
        detail = f"{record.seconds:.1f}s, {record.unet_evaluations} UNet evaluations"
    elif record.status == "failed":
        detail = record.error or "failed"
    else:
        detail = "output up to date"
    write_line(sys.stderr, f"[{done}/{total}] {name}: {record.status} ({detail})")
