"""The TensorRT backend: serialized engines from ``adadiff build``, run on one CUDA stream.

Everything happens on the one device the backend was given (``cuda:N``): it is made current
before an engine is deserialized and around every call. Each engine is deserialized once and
checked against the manifest (profile count and batch ranges, input and output names). Device
buffers are allocated once for the largest profile batch; a call copies its inputs in, sets the
input shapes whenever the batch changes (checking TensorRT's answer), then the addresses, reads
output shapes back with ``get_tensor_shape`` and runs ``execute_async_v3``. All components run
one after another on one stream, so they share one scratch (activation) block sized for the
largest engine, where the TensorRT version supports user-managed device memory. ``close()``
releases every context before that block.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.artifacts import (
    TRT_DIR,
    EngineEntry,
    EngineManifest,
    ExportManifest,
    import_tensorrt,
    profile_for,
)
from adadiff.cuda import CudaDevice
from adadiff.errors import ConfigError, EngineMismatchError, shell_arg
from adadiff.specs import COMPONENTS, ModelSpec, component_specs

log = logging.getLogger("adadiff")


class TensorRTEngine:
    def __init__(
        self,
        runtime: Any,
        trt: Any,
        path: Path,
        entry: EngineEntry,
        spec: ModelSpec,
        backend: TensorRTBackend,
    ) -> None:
        self.spec = spec
        self.entry = entry
        self.backend = backend
        self.trt = trt
        self.path = path
        backend.cuda.activate()  # TensorRT deserializes onto the current device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(
                f"TensorRT could not load {path}; rebuild with "
                f"`adadiff build {shell_arg(path.parent.parent)}`"
            )
        self._check_engine()
        self.contexts: list[Any] = []
        self.buffers: dict[str, Any] = {}
        try:
            for i in range(len(entry.profiles)):
                self.contexts.append(self._context(i))
            dims = {**spec.spatial, "B": entry.max_batch}
            for t in (*spec.inputs, *spec.outputs):
                dtype = _torch_dtype(backend.torch, trt, self.engine.get_tensor_dtype(t.name))
                self.buffers[t.name] = backend.cuda.empty(t.concrete(dims), dtype)
        except BaseException:
            # nothing made before the failure may stay on the backend's scratch list, where it
            # would keep the engine (its weights in GPU memory) alive until the backend closes
            self.close()
            raise
        self.last_batch = [-1] * len(self.contexts)

    def _check_engine(self) -> None:
        """The engine file must be what the manifest says: its profiles and I/O names."""
        trt, engine, entry, spec = self.trt, self.engine, self.entry, self.spec
        export_dir = shell_arg(self.path.parent.parent)
        rebuild = f"rebuild with `adadiff build {export_dir} --components {spec.name}`"
        if engine.num_optimization_profiles != len(entry.profiles):
            raise EngineMismatchError(
                f"{self.path.name} has {engine.num_optimization_profiles} optimisation profiles, "
                f"the manifest lists {len(entry.profiles)} ({', '.join(map(str, entry.profiles))});"
                f" {rebuild}"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if inputs != sorted(spec.input_names) or outputs != sorted(spec.output_names):
            raise EngineMismatchError(
                f"{self.path.name} takes {inputs} and gives {outputs}; the {spec.name} spec "
                f"expects {sorted(spec.input_names)} -> {sorted(spec.output_names)}; {rebuild}"
            )
        first = spec.input_names[0]
        for i, profile in enumerate(entry.profiles):
            lo, _, hi = engine.get_tensor_profile_shape(first, i)
            if (lo[0], hi[0]) != (profile.min, profile.max):
                raise EngineMismatchError(
                    f"{self.path.name} profile {i} covers batches {lo[0]} to {hi[0]}, the manifest "
                    f"says {profile}; {rebuild}"
                )

    def _context(self, index: int) -> Any:
        backend = self.backend
        user_managed = backend.scratch_for(self.engine) is not None
        if user_managed:
            ctx = self.engine.create_execution_context(
                self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
        else:
            ctx = self.engine.create_execution_context()
        if ctx is None:  # checked before the scratch list takes it: None has no memory to set
            raise EngineMismatchError(
                f"TensorRT could not create an execution context for {self.path.name} (out of "
                "device memory?); close other GPU work or use a smaller --max-batch at build"
            )
        if user_managed:
            backend.attach_scratch(ctx)
        try:  # the Python binding raises where the C++ API returns false
            selected = ctx.set_optimization_profile_async(index, backend.stream.cuda_stream)
        except RuntimeError:
            selected = False
        if not selected:
            backend.detach({id(ctx)})
            raise EngineMismatchError(
                f"TensorRT refused optimisation profile {index} of {self.path.name}; rebuild with "
                f"`adadiff build {shell_arg(self.path.parent.parent)}`"
            )
        return ctx

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.contexts:
            raise EngineMismatchError(
                f"the tensorrt backend that opened {self.spec.name} was closed; open a new one"
            )
        torch = self.backend.torch
        batch = int(next(iter(feeds.values())).shape[0])
        index = profile_for(self.entry.profiles, batch)
        ctx = self.contexts[index]
        cuda = self.backend.cuda
        with cuda.use(), cuda.on_stream(self.backend.stream):
            for t in self.spec.inputs:
                view = self.buffers[t.name][:batch]
                view.copy_(torch.from_numpy(np.ascontiguousarray(feeds[t.name])))
                if self.last_batch[index] != batch and not ctx.set_input_shape(
                    t.name, tuple(view.shape)
                ):
                    self.last_batch[index] = -1
                    raise EngineMismatchError(
                        f"TensorRT refused shape {tuple(view.shape)} for {self.spec.name} input "
                        f"{t.name} in profile {self.entry.profiles[index]}; rebuild the engines"
                    )
                ctx.set_tensor_address(t.name, view.data_ptr())
            self.last_batch[index] = batch
            outputs = {}
            dims = {**self.spec.spatial, "B": batch}
            for t in self.spec.outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(t.name))
                # the buffer is laid out for the spec's shape; any other shape reads garbage
                if shape != t.concrete(dims):
                    raise EngineMismatchError(
                        f"TensorRT reports output {t.name} of {self.spec.name} as {shape} at "
                        f"batch {batch}, the spec expects {t.concrete(dims)}; rebuild the engines"
                    )
                buf = self.buffers[t.name]
                ctx.set_tensor_address(t.name, buf.data_ptr())
                outputs[t.name] = (buf, shape)
            if not ctx.execute_async_v3(self.backend.stream.cuda_stream):
                raise EngineMismatchError(
                    f"TensorRT failed to run {self.spec.name} at batch {batch}"
                )
            self.backend.stream.synchronize()
        return {
            name: buf[: shape[0]].float().cpu().numpy() for name, (buf, shape) in outputs.items()
        }

    def close(self) -> None:
        """Contexts first, then the engine and buffers (TensorRT's destruction order). The
        backend's list of scratch users lets go of them too: a context keeps its engine alive."""
        mine = {id(ctx) for ctx in self.contexts}
        self.backend.detach(mine)
        self.contexts.clear()
        self.engine = None
        self.buffers.clear()


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise EngineMismatchError(f"engine I/O dtype {dtype} is not supported; re-export in fp32")
    return table[dtype]


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, export_dir: str | Path, *, device: str = "cuda", cuda: Any = None) -> None:
        """``cuda`` is the device object (default ``CudaDevice(device)``; tests pass a stand-in)."""
        if not device.startswith("cuda"):
            raise ConfigError(f"the tensorrt backend runs on CUDA; got --device {device}")
        self.trt = import_tensorrt()
        if cuda is None:
            cuda = CudaDevice(device)
        self.cuda = cuda
        self.torch = cuda.torch
        self.device_info = cuda.info()
        self.export_dir = Path(export_dir)
        self.exported = ExportManifest.load(self.export_dir)
        self.config = self.exported.model_config()
        self.specs = component_specs(self.config)
        self.manifest = EngineManifest.load(self.export_dir / TRT_DIR)
        for warning in self.manifest.check_runtime(
            self.trt.__version__, self.device_info, self.export_dir
        ):
            log.warning(warning)
        cuda.activate()
        self.device = cuda.torch_device
        self.stream = cuda.new_stream()
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self._scratch: Any = None
        self._contexts: list[Any] = []
        self._engines: list[TensorRTEngine] = []

    def scratch_for(self, engine: Any) -> Any:
        """One activation block shared by every context, grown to the largest engine's need."""
        size = getattr(engine, "device_memory_size_v2", None)
        if size is None or not hasattr(self.trt, "ExecutionContextAllocationStrategy"):
            return None
        if self._scratch is None or self._scratch.numel() < size:
            # The old block stays alive until every context points at the new one.
            old = self._scratch
            self._scratch = self.cuda.empty((max(int(size), 1),), self.torch.uint8)
            for ctx in self._contexts:
                self._set_memory(ctx)
            del old
        return self._scratch

    def attach_scratch(self, ctx: Any) -> None:
        self._set_memory(ctx)
        self._contexts.append(ctx)  # only once it points at the block

    def detach(self, ids: set[int]) -> None:
        """Forget the contexts of a closed engine (by ``id``)."""
        self._contexts = [ctx for ctx in self._contexts if id(ctx) not in ids]

    def _set_memory(self, ctx: Any) -> None:
        ptr, size = self._scratch.data_ptr(), self._scratch.numel()
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(ptr, size)
        else:
            ctx.device_memory = ptr

    def open(self, component: str) -> TensorRTEngine:
        if component not in COMPONENTS:  # before the manifest, whose advice names it as one
            raise ConfigError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        entry = self.exported.entry(component, self.export_dir)
        engine_entry = self.manifest.check_export(component, entry.files, self.export_dir)
        path = self.export_dir / TRT_DIR / engine_entry.file
        engine = TensorRTEngine(
            self.runtime, self.trt, path, engine_entry, self.specs[component], self
        )
        self._engines.append(engine)
        return engine

    @property
    def max_batch(self) -> int:
        """The largest batch every engine takes (profiles cover 1 to it without gaps)."""
        return min(e.max_batch for e in self.manifest.engines.values())

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": f"{self.cuda} ({self.device_info.name})",
            "tensorrt": self.trt.__version__,
            "engines": {k: v.file for k, v in self.manifest.engines.items()},
        }

    def close(self) -> None:
        """Release every context that points at the scratch block, then the block itself."""
        for engine in self._engines:
            engine.close()
        self._engines.clear()
        self._contexts.clear()
        self._scratch = None
