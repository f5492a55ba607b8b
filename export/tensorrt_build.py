"""ONNX -> TensorRT engines with a dynamic tile-batch axis (``adadiff build``).

Networks are strongly typed: precision comes from the ONNX file (fp16 exports carry fp16
weights and casts), never from builder flags, which TensorRT 11 removed. The parser reads from
the file path so external weights (the sd21-base UNet) load. The timing cache is read before
and saved after every build, so rebuilding after a small change is fast.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adadiff.errors import AdadiffError, ConfigError, EngineMismatchError
from adadiff.imageio import write_bytes_atomic
from adadiff.manifest import ExportManifest
from adadiff.specs import COMPONENTS, component_specs
from adadiff.trt_manifest import (
    TIMING_CACHE,
    TRT_DIR,
    BatchProfile,
    DeviceInfo,
    EngineEntry,
    EngineManifest,
    check_profiles,
    current_device,
    engine_key,
    import_tensorrt,
    profile_shapes,
)

log = logging.getLogger("adadiff")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    components: tuple[str, ...] = COMPONENTS
    profiles: tuple[BatchProfile, ...] = (BatchProfile(1, 4, 16),)
    timing_cache: Path | None = None  # default: ENGINES/tensorrt/timing.cache
    workspace_gb: float = 4.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown:
            raise ConfigError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
        object.__setattr__(self, "profiles", check_profiles(self.profiles))
        if self.workspace_gb <= 0:
            raise ConfigError(f"--workspace must be positive (GB), got {self.workspace_gb}")


def _progress_monitor(trt: Any, component: str, progress: Progress | None) -> Any:
    if progress is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        """Reports the top-level build phase; TensorRT calls it from its own threads."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                self.steps[phase_name] = num_steps
            if parent_phase is None:
                progress(f"build {component}: {phase_name}", 0, max(num_steps, 1))

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                total = self.steps.get(phase_name, step + 1)
            progress(f"build {component}: {phase_name}", step + 1, max(total, 1))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                self.steps.pop(phase_name, None)

    return Monitor()


def build_engines(
    export_dir: str | Path,
    options: BuildOptions,
    *,
    progress: Progress | None = None,
) -> EngineManifest:
    """Build one engine per component from the export in ``export_dir``."""
    export_dir = Path(export_dir)
    exported = ExportManifest.load(export_dir)
    exported.verify_files(export_dir, options.components)
    trt = import_tensorrt()
    device = current_device()
    specs = component_specs(exported.model_config())
    out = export_dir / TRT_DIR
    out.mkdir(parents=True, exist_ok=True)
    cache_path = options.timing_cache or out / TIMING_CACHE
    previous = _previous_manifest(out, trt.__version__, device)
    engines = dict(previous.engines) if previous else {}

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    for component in options.components:
        entry = exported.entry(component, export_dir)
        onnx_path = export_dir / entry.onnx_file
        onnx_sha = entry.files[0].sha256
        key = engine_key(
            onnx_sha256=onnx_sha,
            tensorrt=trt.__version__,
            compute_capability=device.compute_capability,
            profiles=options.profiles,
            precision=entry.precision,
        )
        name = f"{component}-{key}.engine"
        if component in engines and engines[component].key == key and (out / name).is_file():
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
            cache_path,
            _progress_monitor(trt, component, progress),
        )
        write_bytes_atomic(out / name, blob)
        engines[component] = EngineEntry(
            component=component,
            file=name,
            key=key,
            onnx_sha256=onnx_sha,
            precision=entry.precision,
            profiles=options.profiles,
            size=len(blob),
            build_seconds=round(time.perf_counter() - start, 2),
        )
        log.info("%s: built %s in %.1fs", component, name, engines[component].build_seconds)
    manifest = EngineManifest(
        tensorrt=trt.__version__,
        device=device,
        engines=engines,
        config_digest=exported.config_digest,
    )
    manifest.save(out)
    return manifest


def _previous_manifest(out: Path, version: str, device: DeviceInfo) -> EngineManifest | None:
    """Keep engines of an earlier build only if they were made for this TensorRT and GPU."""
    try:
        previous = EngineManifest.load(out)
        previous.check_runtime(version, device, out.parent)
    except AdadiffError:
        return None
    return previous


def _build_one(
    trt: Any,
    builder: Any,
    logger: Any,
    onnx_path: Path,
    spec: Any,
    options: BuildOptions,
    cache_path: Path,
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
    for profile in options.profiles:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile_shapes(spec, profile).items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineMismatchError(
            f"TensorRT failed to build {onnx_path.name}; rerun with -v for the builder log, or "
            "try a larger --workspace"
        )
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


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
