"""The TensorRT backend: serialized engines from ``adadiff build``, run on one CUDA stream.

Each engine is deserialized once. Device buffers are torch CUDA tensors allocated once for the
largest profile batch; a call copies its inputs in, sets the input shapes whenever the batch
changes, reads output shapes back with ``get_tensor_shape`` and runs ``execute_async_v3``. All
components run one after another on one stream, so they share one scratch (activation) block
sized for the largest engine, where the TensorRT version supports user-managed device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.errors import ConfigError, EngineMismatchError
from adadiff.manifest import ExportManifest, sha256_file
from adadiff.specs import ModelSpec, component_specs
from adadiff.trt_manifest import (
    TRT_DIR,
    EngineEntry,
    EngineManifest,
    current_device,
    import_tensorrt,
    profile_for,
)

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
        import torch

        self.spec = spec
        self.entry = entry
        self.backend = backend
        self.torch = torch
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(
                f"TensorRT could not load {path}; rebuild with `adadiff build {path.parent.parent}`"
            )
        self.contexts = [self._context(trt, i) for i in range(len(entry.profiles))]
        device = backend.device
        max_b = entry.max_batch
        dims = {**spec.spatial}
        self.buffers: dict[str, Any] = {}
        for t in (*spec.inputs, *spec.outputs):
            shape = t.concrete({**dims, "B": max_b})
            dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(t.name))
            self.buffers[t.name] = torch.empty(shape, dtype=dtype, device=device)
        self.last_batch = [-1] * len(self.contexts)

    def _context(self, trt: Any, index: int) -> Any:
        shared = self.backend.scratch_for(self.engine)
        if shared is not None:
            ctx = self.engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
            self.backend.attach_scratch(ctx)
        else:
            ctx = self.engine.create_execution_context()
        ctx.set_optimization_profile_async(index, self.backend.stream.cuda_stream)
        return ctx

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        batch = int(next(iter(feeds.values())).shape[0])
        index = profile_for(self.entry.profiles, batch)
        if batch < self.entry.profiles[index].min:
            raise EngineMismatchError(f"batch {batch} is below the profile minimum")
        ctx = self.contexts[index]
        with torch.cuda.stream(self.backend.stream):
            for t in self.spec.inputs:
                view = self.buffers[t.name][:batch]
                view.copy_(
                    torch.from_numpy(np.ascontiguousarray(feeds[t.name])), non_blocking=False
                )
                if self.last_batch[index] != batch:
                    ctx.set_input_shape(t.name, tuple(view.shape))
                ctx.set_tensor_address(t.name, view.data_ptr())
            self.last_batch[index] = batch
            outputs = {}
            for t in self.spec.outputs:
                shape = tuple(ctx.get_tensor_shape(t.name))
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


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise EngineMismatchError(f"engine I/O dtype {dtype} is not supported; re-export in fp32")
    return table[dtype]


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, export_dir: str | Path, *, device: str = "cuda") -> None:
        import torch

        if not device.startswith("cuda"):
            raise ConfigError(f"the tensorrt backend runs on CUDA; got --device {device}")
        self.trt = import_tensorrt()
        self.device_info = current_device()
        self.export_dir = Path(export_dir)
        self.exported = ExportManifest.load(self.export_dir)
        self.config = self.exported.model_config()
        self.specs = component_specs(self.config)
        self.manifest = EngineManifest.load(self.export_dir / TRT_DIR)
        for warning in self.manifest.check_runtime(
            self.trt.__version__, self.device_info, self.export_dir
        ):
            log.warning(warning)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self._scratch: Any = None
        self._contexts: list[Any] = []

    def scratch_for(self, engine: Any) -> Any:
        """One activation block shared by every context, grown to the largest engine's need."""
        size = getattr(engine, "device_memory_size_v2", None)
        if size is None or not hasattr(self.trt, "ExecutionContextAllocationStrategy"):
            return None
        import torch

        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(int(size), dtype=torch.uint8, device=self.device)
            for ctx in self._contexts:
                self._set_memory(ctx)
        return self._scratch

    def attach_scratch(self, ctx: Any) -> None:
        self._contexts.append(ctx)
        self._set_memory(ctx)

    def _set_memory(self, ctx: Any) -> None:
        ptr, size = self._scratch.data_ptr(), self._scratch.numel()
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(ptr, size)
        else:
            ctx.device_memory = ptr

    def open(self, component: str) -> TensorRTEngine:
        entry = self.exported.entry(component, self.export_dir)
        onnx_sha = entry.files[0].sha256
        if sha256_file(self.export_dir / entry.onnx_file) != onnx_sha:
            raise EngineMismatchError(
                f"{entry.onnx_file} changed since export; re-export and rebuild"
            )
        engine_entry = self.manifest.check_onnx(component, onnx_sha, self.export_dir)
        path = self.export_dir / TRT_DIR / engine_entry.file
        return TensorRTEngine(
            self.runtime, self.trt, path, engine_entry, self.specs[component], self
        )

    @property
    def max_batch(self) -> int:
        return min(e.max_batch for e in self.manifest.engines.values())

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": f"{self.device} ({self.device_info.name})",
            "tensorrt": self.trt.__version__,
            "engines": {k: v.file for k, v in self.manifest.engines.items()},
        }

    def close(self) -> None:
        self._contexts.clear()
        self._scratch = None
