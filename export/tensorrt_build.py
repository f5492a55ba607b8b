"""ONNX -> TensorRT engines with a dynamic tile-batch axis (``adadiff build``).

Networks are strongly typed: precision comes from the ONNX file (fp16 exports carry fp16
weights and casts), never from builder flags, which TensorRT 11 removed. TF32 is off unless
asked for, so fp32 engines match torch at the fp32 tolerances. The parser reads from the file
path so external weights (the sd21-base UNet) load. The timing cache is read before and saved
after every build, so rebuilding after a small change is fast; a cache from another GPU or
TensorRT is left as it is and the build starts a fresh one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adadiff.artifacts import (
    TIMING_CACHE,
    TRT_DIR,
    BatchProfile,
    DeviceInfo,
    EngineEntry,
    EngineManifest,
    ExportManifest,
    check_profiles,
    engine_key,
    export_digest,
    file_stamps,
    import_tensorrt,
    profile_shapes,
)
from adadiff.cuda import CudaDevice
from adadiff.errors import AdadiffError, ConfigError, EngineMismatchError, OutputPathError
from adadiff.export.manifest import save_engine_manifest
from adadiff.imageio import write_bytes_atomic
from adadiff.locks import folder_lock
from adadiff.progress import Progress
from adadiff.specs import COMPONENTS, component_specs

log = logging.getLogger("adadiff")

# Held while a build writes ENGINES/tensorrt/.
BUILD_LOCK = ".build-lock"


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    components: tuple[str, ...] = COMPONENTS
    profiles: tuple[BatchProfile, ...] = (BatchProfile(1, 4, 16),)
    timing_cache: Path | None = None  # default: ENGINES/tensorrt/timing.cache
    workspace_gb: float = 4.0
    tf32: bool = False  # TF32 matmuls in fp32 engines: faster, but off parity with torch fp32

    def __post_init__(self) -> None:
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown:
            raise ConfigError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
        if not self.components:
            raise ConfigError(
                f"--components names none; choose some of {','.join(COMPONENTS)}, or leave it "
                "out to build every exported one"
            )
        object.__setattr__(self, "profiles", check_profiles(self.profiles))
        # nan passes a "<= 0" test, then fails as int(nan) once TensorRT and the GPU are up
        if not math.isfinite(self.workspace_gb) or self.workspace_gb <= 0:
            raise ConfigError(f"--workspace must be positive (GB), got {self.workspace_gb}")
        if self.timing_cache is not None:
            cache = Path(self.timing_cache).expanduser()
            if cache.is_dir() or not cache.parent.is_dir():
                raise ConfigError(
                    f"--timing-cache {self.timing_cache} must be a file in an existing folder "
                    "(it is read before and written after each build)"
                )
            object.__setattr__(self, "timing_cache", cache)


def _progress_monitor(trt: Any, component: str, progress: Progress | None) -> Any:
    if progress is None or not hasattr(trt, "IProgressMonitor"):
        return None
    report: Progress = progress  # bound here: the class body below does not see the check

    class Monitor(trt.IProgressMonitor):
        """Reports the top-level build phase. TensorRT calls it from its own threads (so the
        callback runs under a lock), and its binding prints and drops any exception a method
        raises: the first one is kept in ``error`` and cancels the build, for the builder to
        raise once TensorRT returns."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.steps: dict[str, int] = {}
            self.error: BaseException | None = None

        def _report(self, phase_name: str, done: int, total: int) -> bool:
            with self.lock:
                if self.error is None:
                    try:
                        report(f"build {component}: {phase_name}", done, max(total, 1))
                    except BaseException as exc:  # Ctrl-C included: TensorRT would drop it
                        self.error = exc
                return self.error is None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                self.steps[phase_name] = num_steps
            if parent_phase is None:
                self._report(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                total = self.steps.get(phase_name, step + 1)
            return self._report(phase_name, step + 1, total)  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                self.steps.pop(phase_name, None)

    return Monitor()


@contextlib.contextmanager
def _ctrl_c_cancels(monitor: Any) -> Iterator[None]:
    """While TensorRT builds, Ctrl-C is kept in ``monitor.error`` (and cancels the build at the
    next step) instead of being raised. A SIGINT that arrives while the builder's C++ code runs is
    raised at the first Python bytecode, the entry of the next monitor method, outside any ``try``
    there: the binding's trampoline would print and drop it (lost in ``phase_start``, a cancel
    reported as a failed build in ``step_complete``). A second Ctrl-C raises as usual."""
    if monitor is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        # no lock: this runs on the main thread, which may hold the monitor's lock already
        if monitor.error is None:
            monitor.error = KeyboardInterrupt()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def build_engines(
    export_dir: str | Path,
    options: BuildOptions,
    *,
    progress: Progress | None = None,
    device: str = "cuda",
    cuda: Any = None,
) -> EngineManifest:
    """Build one engine per component from the export in ``export_dir`` on ``device``.

    ``cuda`` is the device object to build on (default ``CudaDevice(device)``)."""
    export_dir = Path(export_dir)
    exported = ExportManifest.load(export_dir)
    exported.verify_files(export_dir, options.components)
    trt = import_tensorrt()
    if cuda is None:
        cuda = CudaDevice(device)
    cuda.activate()  # TensorRT builds for the current device
    info = cuda.info()
    out = export_dir / TRT_DIR

    def busy(holder: str) -> OutputPathError:
        # two builds would each save a manifest without the other's engines, and delete them
        return OutputPathError(
            f"{out} is being built into by {holder}; wait for it or stop it, then run again"
        )

    def unwritable(exc: OSError) -> OutputPathError:
        fix = (
            f"move the file {out} away"
            if out.exists() and not out.is_dir()
            else f"make {export_dir} writable"
        )
        return OutputPathError(
            f"cannot write the engines into {out} ({exc.strerror or exc}); {fix}, or copy the "
            "export to a folder you can write to and build that"
        )

    with folder_lock(out / BUILD_LOCK, busy, unwritable=unwritable):
        return _build_locked(trt, info, exported, export_dir, out, options, progress)


def _build_locked(
    trt: Any,
    info: DeviceInfo,
    exported: ExportManifest,
    export_dir: Path,
    out: Path,
    options: BuildOptions,
    progress: Progress | None,
) -> EngineManifest:
    specs = component_specs(exported.model_config())
    cache = TimingCachePaths(
        read=options.timing_cache or out / TIMING_CACHE, own=out / TIMING_CACHE
    )
    previous = _previous_manifest(out, trt.__version__, info)
    engines = dict(previous.engines) if previous else {}

    def save(engines: dict[str, EngineEntry]) -> EngineManifest:
        manifest = EngineManifest(
            tensorrt=trt.__version__,
            device=info,
            engines=engines,
            config_digest=exported.config_digest,
        )
        save_engine_manifest(manifest, out)
        return manifest

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    for component in options.components:
        entry = exported.entry(component, export_dir)
        onnx_path = export_dir / entry.onnx_file
        digest = export_digest(entry.files)
        key = engine_key(
            onnx_sha256=digest,
            tensorrt=trt.__version__,
            gpu=info.name,
            compute_capability=info.compute_capability,
            profiles=options.profiles,
            precision=entry.precision,
            tf32=options.tf32,
        )
        name = f"{component}-{key}.engine"
        old = engines.get(component)
        if old is not None and old.key == key and (out / name).is_file():
            log.info("%s: engine %s is up to date", component, name)
            continue
        start = time.perf_counter()
        blob = _build_one(
            trt,
            builder,
            logger,
            onnx_path,
            specs[component],
            options,
            cache,
            _progress_monitor(trt, component, progress),
        )
        write_bytes_atomic(out / name, blob)
        engines[component] = EngineEntry(
            component=component,
            file=name,
            key=key,
            onnx_sha256=digest,
            precision=entry.precision,
            profiles=options.profiles,
            size=len(blob),
            build_seconds=round(time.perf_counter() - start, 2),
            tf32=options.tf32,
            stamps=file_stamps(export_dir, entry.files),
        )
        log.info("%s: built %s in %.1fs", component, name, time.perf_counter() - start)
        save(engines)  # each engine counts as soon as it is built: a later failure keeps it
    manifest = save(engines)
    _delete_superseded(out, manifest)
    return manifest


def _delete_superseded(out: Path, manifest: EngineManifest) -> None:
    """Engine files the manifest no longer names (older builds of a component) are deleted once
    the new manifest is saved: an sd21-base UNet engine is about 1.7 GB."""
    keep = {e.file for e in manifest.engines.values()}
    for path in sorted(out.glob("*.engine")):
        if path.name not in keep:
            log.info("deleting superseded engine %s", path.name)
            path.unlink()


def _previous_manifest(out: Path, version: str, device: DeviceInfo) -> EngineManifest | None:
    """Keep engines of an earlier build only if they were made for this TensorRT and GPU."""
    try:
        previous = EngineManifest.load(out)
        previous.check_runtime(version, device, out.parent)
    except AdadiffError:
        return None
    return previous


@dataclass(frozen=True)
class TimingCachePaths:
    read: Path  # the cache to start from (--timing-cache, or the folder's own)
    own: Path  # the folder's own cache, written when ``read`` belongs to another device


def _build_one(
    trt: Any,
    builder: Any,
    logger: Any,
    onnx_path: Path,
    spec: Any,
    options: BuildOptions,
    cache_paths: TimingCachePaths,
    monitor: Any,
) -> bytes:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineMismatchError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30))
    )
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 parity needs it off
    for profile in options.profiles:
        opt = builder.create_optimization_profile()
        shapes = profile_shapes(spec, profile)
        try:  # the binding raises RuntimeError where setDimensions returns false
            for name, (lo, mid, hi) in shapes.items():
                opt.set_shape(name, lo, mid, hi)
            index = config.add_optimization_profile(opt)
        except RuntimeError:
            index = -1
        if index < 0:
            raise EngineMismatchError(
                f"TensorRT rejected optimisation profile {profile} for {onnx_path.name} (inputs "
                f"{sorted(shapes)}); the ONNX inputs do not match this adadiff's spec: re-export "
                "with this version's `adadiff export`, then rebuild"
            )
    write_to = _attach_timing_cache(config, cache_paths)
    if monitor is not None:
        config.progress_monitor = monitor
    with _ctrl_c_cancels(monitor):
        serialized = builder.build_serialized_network(network, config)
    error = getattr(monitor, "error", None)
    if error is not None:  # the progress callback raised; TensorRT only saw a cancel
        raise error
    if serialized is None:
        raise EngineMismatchError(
            f"TensorRT failed to build {onnx_path.name}; rerun with -v for the builder log, or "
            "try a larger --workspace"
        )
    timing = config.get_timing_cache()
    if timing is not None:
        try:
            write_bytes_atomic(write_to, bytes(timing.serialize()))
        except (AdadiffError, OSError) as exc:  # the engine is what was asked for: keep it
            log.warning(
                "could not save the timing cache %s (%s); the engine is kept", write_to, exc
            )
    return bytes(serialized)


def _attach_timing_cache(config: Any, paths: TimingCachePaths) -> Path:
    """Start from the cache at ``paths.read`` when TensorRT accepts it, else from an empty one;
    return where the cache is saved after the build. A cache TensorRT refuses (made on another
    GPU or TensorRT version) is left as it is for the machine it belongs to."""
    data = paths.read.read_bytes() if paths.read.is_file() else b""
    if _use_timing_cache(config, data):
        return paths.read
    log.warning(
        "timing cache %s was made on another GPU or TensorRT version (or is not a timing "
        "cache); building with a fresh one saved to %s (the shared file is left as it is)",
        paths.read,
        paths.own,
    )
    own = paths.own.read_bytes() if paths.own != paths.read and paths.own.is_file() else b""
    for data in dict.fromkeys((own, b"")):  # the folder's own cache, else an empty one
        if _use_timing_cache(config, data):
            return paths.own
    raise EngineMismatchError(
        "TensorRT refused an empty timing cache; pass --timing-cache with a new file path"
    )


def _use_timing_cache(config: Any, data: bytes) -> bool:
    """Whether TensorRT took ``data`` as this build's timing cache. A blob it cannot read at all
    makes ``create_timing_cache`` raise or return None rather than a cache."""
    try:
        cache = config.create_timing_cache(data)
    except RuntimeError:
        return False
    return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))


def default_profiles(
    max_batch: int, opt_batch: int, min_batch: int = 1
) -> tuple[BatchProfile, ...]:
    return (BatchProfile(min_batch, opt_batch, max_batch),)


def describe(manifest: EngineManifest) -> Sequence[str]:
    return [
        f"{e.component}: {e.file} ({e.size / 1e6:.1f} MB, {e.precision}, profiles "
        f"{', '.join(str(p) for p in e.profiles)}, built in {e.build_seconds:.1f}s)"
        for e in manifest.engines.values()
    ]
