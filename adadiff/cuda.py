"""The one CUDA device TensorRT builds for and runs on, reached through torch.

``cuda:N`` means device N for everything: its name and compute capability go into the engine key,
it is made current before an engine is deserialized or run, and buffers, scratch and the stream
are allocated on it. torch is imported when a ``CudaDevice`` is made, never at module import.
Tests pass a CPU stand-in with the same methods (tests/fake_tensorrt.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from adadiff.artifacts import DeviceInfo
from adadiff.devices import parse_device
from adadiff.errors import BackendUnavailableError


class CudaDevice:
    def __init__(self, device: str = "cuda") -> None:
        parsed = parse_device(device, "tensorrt")
        try:
            import torch
        except ImportError:
            raise BackendUnavailableError(
                "TensorRT engines need torch with CUDA; see README, GPU"
            ) from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "TensorRT needs a CUDA device and torch sees none; run on a machine with an "
                "NVIDIA GPU and driver and a CUDA build of torch (see README, GPU)"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index >= count:
            raise BackendUnavailableError(
                f"--device {device} was asked for but torch sees {count} CUDA device(s); use "
                f"cuda:0 to cuda:{count - 1}"
            )
        self.torch = torch
        self.index = index
        self.torch_device = torch.device("cuda", index)

    def info(self) -> DeviceInfo:
        """Name and compute capability of this device (not of whichever one is current)."""
        major, minor = self.torch.cuda.get_device_capability(self.index)
        return DeviceInfo(
            name=self.torch.cuda.get_device_name(self.index), compute_capability=f"{major}.{minor}"
        )

    def activate(self) -> None:
        """Make this device current: TensorRT deserializes and runs on the current device."""
        self.torch.cuda.set_device(self.index)

    def use(self) -> AbstractContextManager[Any]:
        return self.torch.cuda.device(self.index)

    def new_stream(self) -> Any:
        return self.torch.cuda.Stream(device=self.torch_device)

    def on_stream(self, stream: Any) -> AbstractContextManager[Any]:
        return self.torch.cuda.stream(stream)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.torch.empty(shape, dtype=dtype, device=self.torch_device)

    def __str__(self) -> str:
        return f"cuda:{self.index}"
