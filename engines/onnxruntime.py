"""The ONNX Runtime backend: one InferenceSession per component of an ``adadiff export`` folder.

The folder's manifest carries the model config, so the folder runs alone. Every file is checked
against its recorded sha256 before its session opens, and every session is checked to really
run on the execution provider that was asked for: ONNX Runtime falls back to the CPU quietly
when CUDA or TensorRT libraries are missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adadiff import devices
from adadiff.artifacts import BatchProfile, ExportManifest, export_digest
from adadiff.config import ModelConfig
from adadiff.errors import (
    BackendUnavailableError,
    ConfigError,
    EngineMismatchError,
)
from adadiff.presets import model_config, model_folder
from adadiff.specs import COMPONENTS, ModelSpec, component_specs

log = logging.getLogger("adadiff")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")
CUDNN_SEARCH = ("HEURISTIC", "DEFAULT", "EXHAUSTIVE")
TRT_EP_CACHE = "ort_trt_cache"
INSTALL = 'pip install "adadiff[onnx]"'
INSTALL_GPU = (
    'pip uninstall onnxruntime, then pip install "adadiff[gpu-cu12]" (or gpu-cu13, the CUDA major '
    "of your torch): onnxruntime-gpu in place of onnxruntime"
)


@dataclass(frozen=True, kw_only=True)
class OrtOptions:
    """Session settings. 0 threads means ONNX Runtime's default (one per physical core)."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    io_binding: bool | None = None  # None: on for CUDA and TensorRT, off on the CPU
    # Spinning thread pools answer back-to-back calls faster but burn the cores that the other
    # four sessions and the host-side sampler need between UNet calls.
    allow_spinning: bool = False
    verify_files: bool = True  # sha256 of every file before its session opens
    # TensorRT EP profile (min, opt, max batch); None: 1 to the Upscaler's --max-batch
    trt_batch: tuple[int, int, int] | None = None
    # cuDNN's convolution search in the CUDA EP. EXHAUSTIVE benchmarks every algorithm again for
    # each new input shape, and the runtime's batch changes from round to round.
    cudnn_conv_algo_search: str = "HEURISTIC"

    def __post_init__(self) -> None:
        if self.cudnn_conv_algo_search not in CUDNN_SEARCH:
            raise ConfigError(
                f"cudnn_conv_algo_search must be one of {CUDNN_SEARCH}, got "
                f"{self.cudnn_conv_algo_search!r}"
            )
        if self.trt_batch is not None:
            BatchProfile(*self.trt_batch)  # 1 <= min <= opt <= max, or a ConfigError
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError(
                f"thread counts must be >= 0 (0 = ONNX Runtime's default), got "
                f"{self.intra_op_threads}/{self.inter_op_threads}"
            )
        if self.graph_optimization not in GRAPH_OPTIMIZATION:
            raise ConfigError(
                f"graph_optimization must be one of {GRAPH_OPTIMIZATION}, got "
                f"{self.graph_optimization!r}"
            )


@dataclass(frozen=True)
class Placement:
    """Where sessions run: the provider list handed to ONNX Runtime, first one required."""

    device: str  # "cpu", "cuda" or "tensorrt"
    device_id: int
    providers: tuple[str, ...]

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def parse_device(device: str) -> Placement:
    providers = {"cpu": (CPU,), "cuda": (CUDA, CPU), "tensorrt": (TENSORRT, CUDA, CPU)}
    parsed = devices.parse_device(device, "onnxruntime")
    return Placement(parsed.kind, parsed.index or 0, providers[parsed.kind])


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the onnxruntime backend needs ONNX Runtime ({exc}); {INSTALL}"
        ) from exc
    return onnxruntime


class OrtEngine:
    """One component's session; name -> float32 arrays in, name -> arrays out."""

    def __init__(self, session: Any, spec: ModelSpec, placement: Placement, io_binding: bool):
        self.session = session
        self.spec = spec
        self.placement = placement
        self.io_binding = io_binding
        self.outputs = list(spec.output_names)

    def close(self) -> None:
        self.session = None  # the backend's own reference goes in its close

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.io_binding:
            arrays = self.session.run(self.outputs, {n: feeds[n] for n in self.spec.input_names})
            return dict(zip(self.outputs, arrays, strict=True))
        # ONNX Runtime's recommended path on CUDA: inputs are copied to the device once, outputs
        # are allocated there by the session and come back in one copy after the run.
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        target = "cuda" if self.placement.on_gpu else "cpu"
        for name in self.outputs:
            binding.bind_output(name, target, self.placement.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu(), strict=True))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str = "cpu",
        options: OrtOptions | None = None,
        manifest: ExportManifest | None = None,
        max_batch: int = 16,
    ) -> None:
        """``max_batch``: the largest batch the runtime sends (the TensorRT EP profile's max
        unless ``options.trt_batch`` sets the profile)."""
        self.ort = import_onnxruntime()
        self.folder = Path(folder)
        self.options = options or OrtOptions()
        self.trt_batch = self.options.trt_batch or (1, min(4, max_batch), max_batch)
        self.manifest = manifest or ExportManifest.load(self.folder)
        self.config: ModelConfig = self.manifest.model_config()
        self.manifest.check_specs(self.folder)
        self.specs = component_specs(self.config)
        self.placement = parse_device(device)
        self._check_available()
        self.sessions: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}

    def _check_available(self) -> None:
        available = self.ort.get_available_providers()
        wanted = self.placement.providers[0]
        if wanted not in available:
            raise BackendUnavailableError(
                f"device {self.placement.device!r} needs ONNX Runtime's {wanted}, but this "
                f"onnxruntime {self.ort.__version__} offers only {available}; {INSTALL_GPU}, "
                "or use --device cpu"
            )

    def _session_options(self) -> Any:
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        level = self.ort.GraphOptimizationLevel
        so.graph_optimization_level = {
            "disable": level.ORT_DISABLE_ALL,
            "basic": level.ORT_ENABLE_BASIC,
            "extended": level.ORT_ENABLE_EXTENDED,
            "all": level.ORT_ENABLE_ALL,
        }[self.options.graph_optimization]
        so.log_severity_level = 3  # graph-optimiser notes are not the user's business
        spin = "1" if self.options.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return so

    def trt_cache_dir(self, component: str) -> Path:
        """The TensorRT EP's engine and timing caches of one component, keyed to the exported
        files and the profile: a re-export or another --max-batch never meets an old engine."""
        entry = self.manifest.entry(component, self.folder)
        key = export_digest(entry.files)[:16] + "-b" + "-".join(map(str, self.trt_batch))
        return self.folder / TRT_EP_CACHE / f"{component}-{key}"

    def _provider_options(self, component: str) -> list[tuple[str, dict[str, Any]]]:
        p = self.placement
        chosen: list[tuple[str, dict[str, Any]]] = []
        for provider in p.providers:
            if provider == CUDA:
                chosen.append(
                    (
                        CUDA,
                        {
                            "device_id": p.device_id,
                            "cudnn_conv_algo_search": self.options.cudnn_conv_algo_search,
                            # the provider's default TF32 would make fp32 differ from the
                            # other backends (TensorRT builds without TF32 too)
                            "use_tf32": 0,
                        },
                    )
                )
            elif provider == TENSORRT:
                shapes = self.specs[component].profile(*self.trt_batch)
                cache = self.trt_cache_dir(component)

                def profile(i: int, shapes: dict = shapes) -> str:
                    return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())

                chosen.append(
                    (
                        TENSORRT,
                        {
                            "device_id": p.device_id,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": True,
                            "trt_timing_cache_path": str(cache),
                            "trt_profile_min_shapes": profile(0),
                            "trt_profile_opt_shapes": profile(1),
                            "trt_profile_max_shapes": profile(2),
                        },
                    )
                )
            else:
                chosen.append((CPU, {}))
        return chosen

    @property
    def max_batch(self) -> int | None:
        """The TensorRT EP's profile max; other providers take any batch."""
        return self.trt_batch[2] if self.placement.device == "tensorrt" else None

    def open(self, component: str) -> OrtEngine:
        if component not in COMPONENTS:
            raise ConfigError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        entry = self.manifest.entry(component, self.folder)
        if component not in self.sessions:
            start = time.perf_counter()
            if self.options.verify_files:
                self.manifest.verify_files(self.folder, [component])
            chosen = self._provider_options(component)
            try:
                session = self.ort.InferenceSession(
                    str(self.folder / entry.onnx_file),
                    self._session_options(),
                    providers=[name for name, _ in chosen],
                    provider_options=[opts for _, opts in chosen],
                )
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException
                raise EngineMismatchError(
                    f"ONNX Runtime {self.ort.__version__} cannot load {entry.onnx_file} from "
                    f"{self.folder}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                    "re-export with this version's adadiff, or check the installed onnxruntime"
                ) from exc
            in_use = session.get_providers()
            wanted = self.placement.providers[0]
            if not in_use or in_use[0] != wanted:
                raise BackendUnavailableError(
                    f"{component}: asked ONNX Runtime for {wanted}, but the session runs on "
                    f"{in_use}: it fell back, usually because the CUDA, cuDNN or TensorRT "
                    f"libraries it was built for are missing; {INSTALL_GPU} and check the "
                    "CUDA setup, or use --device cpu"
                )
            self.sessions[component] = session
            self.load_seconds[component] = round(time.perf_counter() - start, 3)
            log.info(
                "%s: session on %s in %.2fs", component, in_use[0], self.load_seconds[component]
            )
        io_binding = self.options.io_binding
        if io_binding is None:
            io_binding = self.placement.on_gpu
        return OrtEngine(
            self.sessions[component], self.specs[component], self.placement, io_binding
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.placement.device
            + (f":{self.placement.device_id}" if self.placement.on_gpu else ""),
            "precision": self.manifest.precision,
            "onnxruntime": self.ort.__version__,
            "providers": {name: s.get_providers()[0] for name, s in self.sessions.items()},
            "engines": str(self.folder.resolve()),
            "exporter": self.manifest.exporter,
            "opset": self.manifest.opset,
            "threads": self.options.intra_op_threads or "default",
            "graph_optimization": self.options.graph_optimization,
            "load_seconds": dict(self.load_seconds),
        }

    def close(self) -> None:
        self.sessions.clear()


def open_onnxruntime(
    engines: str | Path,
    *,
    model: str | Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    options: OrtOptions | None = None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    max_batch: int = 16,
) -> tuple[ModelConfig, OnnxRuntimeBackend]:
    """The backend behind ``--backend onnxruntime --engines FOLDER``.

    ``model``, when given, must be the model the folder was exported from (same config digest).
    The tile size is baked into the exported shapes; the overlap is the runtime's alone.
    """
    import_onnxruntime()
    folder = Path(engines).expanduser()
    manifest = ExportManifest.load(folder)
    if precision != manifest.precision:
        raise EngineMismatchError(
            f"{folder} holds a {manifest.precision} export but --precision {precision} was asked "
            f"for; pass --precision {manifest.precision}, or export again with --precision "
            f"{precision}"
        )
    if model is not None:
        manifest.check_model(model_config(model), str(model), model_folder(model))
    backend = OnnxRuntimeBackend(
        folder, device=device, options=options, manifest=manifest, max_batch=max_batch
    )
    exported = backend.config.tile_size
    if tile_size is not None and tile_size != exported:
        raise EngineMismatchError(
            f"{folder} was exported for {exported} px tiles, so --tile {tile_size} cannot run on "
            f"it; drop --tile (or use --tile {exported}), or export a model whose tile_size is "
            f"{tile_size}"
        )
    return backend.config.with_tiling(tile_size, tile_overlap), backend
