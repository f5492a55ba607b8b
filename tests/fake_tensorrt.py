"""A test double of the ``tensorrt`` module (the TensorRT 10/11 Python API), for CPU-only CI.

It keeps the documented contract that adadiff's builder and backend rely on, and is stricter
where a real GPU would crash or silently misbehave:

- return values: ``IOptimizationProfile.set_shape`` raises RuntimeError for min/opt/max shapes
  that disagree (rank, sign, order), ``add_optimization_profile`` -> index or -1,
  ``set_timing_cache`` -> bool
  (False for a cache from another device or TensorRT unless ``ignore_mismatch``),
  ``build_serialized_network`` -> ``IHostMemory`` or None, ``deserialize_cuda_engine`` ->
  ``ICudaEngine`` or None (another TensorRT, another compute capability),
  ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` -> bool;
  ``set_optimization_profile_async`` -> True or RuntimeError (the binding raises where the C++
  API returns false); ``create_timing_cache`` raises for a blob that is not a timing cache;
  ``get_timing_cache`` is None until a cache is set; an exception in an ``IProgressMonitor``
  method (a Ctrl-C handled at its entry included: ``STATE.sigint_at``) is printed and dropped,
  and one in ``step_complete`` cancels the build (None);
- profile selection: shapes are checked against the context's active profile, and selecting a
  profile forgets the shapes set before;
- every shape and address set before execution (unset output shapes read as -1); input shapes
  before their addresses, which is stricter than TensorRT (its ``setTensorAddress`` fails only
  for an unknown name or a misaligned address) and pins the order the backend keeps;
- one current device: engines deserialize onto it and run only while it is current;
- memory: buffers and scratch live in ``STATE``'s allocation table; running with freed memory or
  freeing scratch that a live context still points at is recorded in ``STATE.violations``.

Engines are JSON headers plus the ONNX model; ``execute_async_v3`` reads the inputs from their
addresses, runs the graph with ONNX Runtime on the CPU and writes the outputs to their addresses
when the stream is synchronised.
Every public name here exists in the real bindings (``tools/check_trt_double.py`` checks that
against the tensorrt-cu12-bindings wheel).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import signal
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__version__ = "11.4.0.106"

_MAGIC = b"FAKETRT1"
_CACHE_MAGIC = b"FAKETIMING1"


# -- enums (names as in the bindings) -------------------------------------------------------------


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    TF32 = 7


class TensorIOMode(enum.IntEnum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    USER_MANAGED = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1


float32 = DataType.FLOAT
float16 = DataType.HALF
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF}


# -- the fake CUDA side: devices, the current one, allocations ------------------------------------


@dataclass
class _Gpu:
    name: str
    compute_capability: str


@dataclass
class _State:
    devices: list[_Gpu] = field(default_factory=list)
    current: int = 0
    live: dict[int, int] = field(default_factory=dict)  # pointer -> bytes
    contexts: Any = field(default_factory=weakref.WeakSet)
    violations: list[str] = field(default_factory=list)
    # Output writes of executions not yet synchronised: they land when the stream syncs, so
    # reading an output buffer before ``synchronize`` reads what was there before, as on a GPU.
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    faults: set[str] = field(default_factory=set)  # method names made to fail (return False)
    # a progress-monitor method to enter with a SIGINT pending (Ctrl-C during the build)
    sigint_at: str | None = None
    executions: int = 0

    def reset(self, devices: list[tuple[str, str]]) -> None:
        self.devices = [_Gpu(n, cc) for n, cc in devices]
        self.current = 0
        self.live.clear()
        self.violations.clear()
        self.pending.clear()
        self.faults.clear()
        self.sigint_at = None
        self.executions = 0

    def allocate(self, tensor: Any) -> Any:
        ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        self.live[ptr] = size
        weakref.finalize(tensor, self._free, ptr)
        return tensor

    def _free(self, ptr: int) -> None:
        self.live.pop(ptr, None)
        for ctx in list(self.contexts):
            if ctx._memory is not None and ctx._memory[0] == ptr:
                self.violations.append(
                    f"device memory {ptr:#x} freed while an execution context still uses it"
                )

    def is_live(self, ptr: int, size: int) -> bool:
        return any(p <= ptr and ptr + size <= p + n for p, n in self.live.items())


STATE = _State()
STATE.reset([("NVIDIA Fake GPU", "9.0")])


class FakeStream:
    cuda_stream = 0x57

    def synchronize(self) -> None:
        for address, data in STATE.pending:
            ctypes.memmove(address, data, len(data))
        STATE.pending.clear()


class FakeCuda:
    """Stand-in for ``adadiff.cuda.CudaDevice``: CPU tensors registered as device memory."""

    def __init__(self, index: int = 0) -> None:
        import torch

        if index >= len(STATE.devices):
            raise AssertionError(f"fake GPU {index} does not exist")
        self.torch = torch
        self.index = index
        self.torch_device = torch.device("cpu")

    def info(self) -> Any:
        from adadiff.artifacts import DeviceInfo

        gpu = STATE.devices[self.index]
        return DeviceInfo(name=gpu.name, compute_capability=gpu.compute_capability)

    def activate(self) -> None:
        STATE.current = self.index

    @contextlib.contextmanager
    def use(self) -> Any:
        before, STATE.current = STATE.current, self.index
        try:
            yield
        finally:
            STATE.current = before

    def new_stream(self) -> FakeStream:
        return FakeStream()

    def on_stream(self, stream: FakeStream) -> Any:
        return contextlib.nullcontext()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return STATE.allocate(self.torch.empty(shape, dtype=dtype))

    def __str__(self) -> str:
        return f"cuda:{self.index}"


def _current_gpu() -> _Gpu:
    return STATE.devices[STATE.current]


# -- building -------------------------------------------------------------------------------------


class Logger:
    WARNING = 2

    def __init__(self, min_severity: int = WARNING) -> None:
        self.min_severity = min_severity


class IHostMemory:
    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return self._data


class ITimingCache:
    def __init__(self, owner: tuple[str, str] | None, entries: int) -> None:
        self._owner = owner  # (TensorRT version, compute capability) that made it
        self._entries = entries

    def serialize(self) -> IHostMemory:
        owner = self._owner or (__version__, _current_gpu().compute_capability)
        body = json.dumps({"owner": list(owner), "entries": self._entries}).encode()
        return IHostMemory(_CACHE_MAGIC + body)


class IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        """The binding calls setDimensions for min, opt and max and raises RuntimeError where
        one returns false (shapes inconsistent with each other: rank, negative or unordered
        dims); it never leaves that to ``add_optimization_profile``."""
        shapes = (tuple(min), tuple(opt), tuple(max))
        if len({len(s) for s in shapes}) != 1 or any(d < 0 for s in shapes for d in s):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        if any(not a <= b <= c for a, b, c in zip(*shapes, strict=True)):
            raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
        self._shapes[input] = shapes

    def __bool__(self) -> bool:
        """isValid: every shape has one rank and min <= opt <= max per dimension."""
        if not self._shapes:
            return False
        for lo, mid, hi in self._shapes.values():
            if not len(lo) == len(mid) == len(hi):
                return False
            if any(not a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
                return False
        return True


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self._flags = flags
        self._model: Any = None


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self._network = network
        self._errors: list[str] = []

    def parse_from_file(self, model: str) -> bool:
        import onnx

        try:
            # onnx.load reads external data from beside the file, as the real parser does.
            self._network._model = onnx.load(model)
        except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
            self._errors.append(f"{model}: {exc}")
            return False
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]


class IProgressMonitor:
    """TensorRT's build progress callback: phase_start, step_complete (False cancels the build)
    and phase_finish, nested phases naming their parent."""

    def __init__(self) -> None:
        pass


def _call_monitor(monitor: Any, method: str, *args: Any) -> Any:
    """As the binding's IProgressMonitor trampoline calls Python: an exception (any, as pybind11
    wraps it) is printed and dropped; for step_complete it then answers False, which cancels
    the build. With ``STATE.sigint_at`` naming the method, a Ctrl-C is pending when it is
    called: CPython runs the SIGINT handler at the method's first bytecode, before its body."""
    try:
        if STATE.sigint_at == method:
            STATE.sigint_at = None
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, None)
        return getattr(monitor, method)(*args)
    except BaseException as exc:
        print(f"[ERROR] Exception caught in {method}(): {exc!r}", file=sys.stderr)
        return False if method == "step_complete" else None


def _report_progress(monitor: Any) -> bool:
    """The phases a build reports, as TensorRT nests them; False when the monitor cancelled."""
    _call_monitor(monitor, "phase_start", "Building engine", None, 2)
    for step in range(2):
        _call_monitor(monitor, "phase_start", "Tactic search", "Building engine", 3)
        for inner in range(3):
            if not _call_monitor(monitor, "step_complete", "Tactic search", inner):
                return False
        _call_monitor(monitor, "phase_finish", "Tactic search")
        if not _call_monitor(monitor, "step_complete", "Building engine", step):
            return False
    _call_monitor(monitor, "phase_finish", "Building engine")
    return True


class IBuilderConfig:
    def __init__(self) -> None:
        self._flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self._profiles: list[IOptimizationProfile] = []
        self._cache: ITimingCache | None = None
        self._pools: dict[int, int] = {}
        self.progress_monitor: Any = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._pools[int(pool)] = int(pool_size)

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self._flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile or "add_optimization_profile" in STATE.faults:
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(None, 0)
        if not data.startswith(_CACHE_MAGIC):
            raise RuntimeError("the blob is not a timing cache")
        body = json.loads(data[len(_CACHE_MAGIC) :])
        return ITimingCache(tuple(body["owner"]), body["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        here = (__version__, _current_gpu().compute_capability)
        if cache._owner is not None and cache._owner != here and not ignore_mismatch:
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        self._logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        model = network._model
        if model is None or not config._profiles:
            return None  # nothing parsed, or dynamic inputs without a profile
        inputs = {i.name: i for i in model.graph.input}
        for profile in config._profiles:
            if set(profile._shapes) != set(inputs):
                return None  # a profile must give every network input, and only those
        if config.progress_monitor is not None and not _report_progress(config.progress_monitor):
            return None  # cancelled by the monitor
        gpu = _current_gpu()
        if config._cache is not None:
            owner = config._cache._owner or (__version__, gpu.compute_capability)
            config._cache = ITimingCache(owner, config._cache._entries + len(model.graph.node))
        header = {
            "version": __version__,
            "compute_capability": gpu.compute_capability,
            "tf32": BuilderFlag.TF32 in config._flags,
            "strongly_typed": bool(
                network._flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            ),
            "workspace": config._pools.get(int(MemoryPoolType.WORKSPACE)),
            "profiles": [
                {n: [list(s) for s in shapes] for n, shapes in p._shapes.items()}
                for p in config._profiles
            ],
            "inputs": [[i.name, int(_dtype_of(i))] for i in model.graph.input],
            "outputs": [[o.name, int(_dtype_of(o))] for o in model.graph.output],
            "output_dims": {o.name: _dims_of(o) for o in model.graph.output},
        }
        head = json.dumps(header).encode()
        blob = _MAGIC + len(head).to_bytes(8, "little") + head + model.SerializeToString()
        return IHostMemory(blob)


def _dtype_of(value_info: Any) -> DataType:
    return _ONNX_TYPES[value_info.type.tensor_type.elem_type]


def _dims_of(value_info: Any) -> list[int]:
    """Fixed dims, -1 for dynamic ones (the batch, and sizes derived from dynamic inputs)."""
    return [
        d.dim_value if d.HasField("dim_value") else -1
        for d in value_info.type.tensor_type.shape.dim
    ]


# -- running --------------------------------------------------------------------------------------


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(_MAGIC):
            return None
        n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8
        header = json.loads(data[start : start + n])
        if header["version"] != __version__:
            return None
        if header["compute_capability"] != _current_gpu().compute_capability:
            return None
        return ICudaEngine(header, data[start + n :], STATE.current)


class ICudaEngine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes, device: int) -> None:
        self._header = header
        self._onnx = onnx_bytes
        self._device = device
        self._io = [(n, TensorIOMode.INPUT, DataType(t)) for n, t in header["inputs"]]
        self._io += [(n, TensorIOMode.OUTPUT, DataType(t)) for n, t in header["outputs"]]
        self._session: Any = None
        self._shape_cache: dict[Any, dict[str, tuple[int, ...]]] = {}

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._find(name)[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._find(name)[2]

    def _find(self, name: str) -> tuple[str, TensorIOMode, DataType]:
        for item in self._io:
            if item[0] == name:
                return item
        raise KeyError(f"no tensor {name!r} in this engine")

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._header["profiles"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self._header["profiles"][profile_index][name]]

    @property
    def device_memory_size_v2(self) -> int:
        top = max(p[self._io[0][0]][2][0] for p in self._header["profiles"])
        return top * (4096 + len(self._onnx) // 64)  # bigger graphs need more scratch

    def create_execution_context(
        self,
        strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC,
    ) -> IExecutionContext | None:
        if STATE.current != self._device:
            return None
        ctx = IExecutionContext(self, strategy)
        STATE.contexts.add(ctx)
        return ctx

    def _output_shapes(
        self, inputs: dict[str, tuple[tuple[int, ...], DataType]]
    ) -> dict[str, tuple[int, ...]]:
        """Every output's shape at these input shapes: fixed dims as built, the dynamic ones
        as TensorRT infers them from the graph (here by running it once on zeros)."""
        key = tuple(sorted((n, s) for n, (s, _) in inputs.items()))
        if key not in self._shape_cache:
            zeros = {n: np.zeros(s, _NUMPY[t]) for n, (s, t) in inputs.items()}
            self._shape_cache[key] = {n: tuple(v.shape) for n, v in self._run(zeros).items()}
        inferred = self._shape_cache[key]
        return {
            name: tuple(d if d >= 0 else g for d, g in zip(dims, inferred[name], strict=True))
            for name, dims in self._header["output_dims"].items()
        }

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self._session = ort.InferenceSession(self._onnx, so, providers=["CPUExecutionProvider"])
        names = [n for n, mode, _ in self._io if mode == TensorIOMode.OUTPUT]
        return dict(zip(names, self._session.run(names, feeds), strict=True))


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self._engine = engine
        self._strategy = strategy
        self._profile = 0
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        # the real binding turns the C++ API's false into a RuntimeError
        if "set_optimization_profile_async" in STATE.faults:
            raise RuntimeError("setOptimizationProfileAsync failed")
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            raise RuntimeError(f"profile index {profile_index} out of range")
        self._profile = profile_index
        self._shapes.clear()  # shapes belong to a profile
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if "set_input_shape" in STATE.faults:
            return False
        if self._engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        lo, _, hi = self._engine.get_tensor_profile_shape(name, self._profile)
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(
            not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)
        ):
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        mode = self._engine.get_tensor_mode(name)
        if mode == TensorIOMode.INPUT and name not in self._shapes:
            return False  # the double's stricter order (module docstring): shape first
        self._addresses[name] = int(memory)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self._engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            lo = self._engine.get_tensor_profile_shape(name, self._profile)[0]
            return self._shapes.get(name, tuple(-1 for _ in lo))
        dims = self._engine._header["output_dims"][name]
        inputs = [(n, t) for n, m, t in self._engine._io if m == TensorIOMode.INPUT]
        if any(n not in self._shapes for n, _ in inputs):
            return tuple(-1 if d < 0 else d for d in dims)
        shapes = {n: (self._shapes[n], t) for n, t in inputs}
        return self._engine._output_shapes(shapes)[name]

    def set_device_memory(self, memory: int, size: int) -> None:
        self._memory = (int(memory), int(size))

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self._engine
        if STATE.current != engine._device:
            return False
        if self._strategy == ExecutionContextAllocationStrategy.USER_MANAGED:
            need = engine.device_memory_size_v2
            if self._memory is None or self._memory[1] < need:
                return False
            if not STATE.is_live(self._memory[0], need):
                STATE.violations.append("execute_async_v3 with freed scratch memory")
                return False
        feeds = {}
        for name, mode, dtype in engine._io:
            shape = self.get_tensor_shape(name)
            if any(d < 0 for d in shape) or name not in self._addresses:
                return False  # every input shape and every address must be set
            nbytes = int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize
            if not STATE.is_live(self._addresses[name], nbytes):
                STATE.violations.append(f"{name}: address not in live device memory")
                return False
            if mode == TensorIOMode.INPUT:
                raw = (ctypes.c_char * nbytes).from_address(self._addresses[name])
                array = np.frombuffer(bytes(raw), dtype=_NUMPY[dtype]).reshape(shape)
                if engine._header["tf32"] and dtype == DataType.FLOAT:
                    array = _tf32(array)
                feeds[name] = array
        for name, value in engine._run(feeds).items():
            STATE.pending.append((self._addresses[name], np.ascontiguousarray(value).tobytes()))
        STATE.executions += 1
        return True


def _tf32(x: np.ndarray) -> np.ndarray:
    """What TF32 matmuls do to fp32 operands: keep 10 of the 23 mantissa bits."""
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def install(monkeypatch: Any, devices: list[tuple[str, str]] | None = None) -> Any:
    """Make ``import tensorrt`` return this module, with fresh fake GPUs (name, capability)."""
    STATE.reset(devices or [("NVIDIA Fake GPU", "9.0")])
    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module
