"""Device strings and runtime precisions, checked before anything loads (no torch import here).

``--device gpu`` is a common typo; caught here it costs one line and exit code 2 instead of a
torch traceback after the model has loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from adadiff.config import Precision
from adadiff.errors import ConfigError

# What each backend runs on. "cpu" for tensorrt means "the first GPU" (TensorRT runs on CUDA only).
DEVICE_KINDS: dict[str, tuple[str, ...]] = {
    "torch": ("cpu", "cuda"),
    "onnxruntime": ("cpu", "cuda", "tensorrt"),
    "tensorrt": ("cpu", "cuda"),
}

# Precisions a run can ask for. Exports hold fp32 or fp16 (adadiff.artifacts.PRECISIONS); bf16
# exists for the torch backend only (the GPU check compares it with fp16).
RUN_PRECISIONS = Precision.values()
TORCH_ONLY_PRECISIONS = (Precision.BF16.value,)


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu", "cuda" or "tensorrt"
    index: int | None  # None: the default device of that kind

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def _accepted(backend: str) -> str:
    kinds = DEVICE_KINDS[backend]
    return ", ".join(k if k == "cpu" else f"{k}[:N]" for k in kinds)


def parse_device(device: str, backend: str = "torch") -> Device:
    """``"cuda:1"`` -> Device("cuda", 1); anything the backend cannot run on is a ConfigError."""
    if backend not in DEVICE_KINDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(DEVICE_KINDS)}")
    kind, colon, index = str(device).strip().partition(":")
    ok = kind in DEVICE_KINDS[backend] and (not colon or (index.isascii() and index.isdigit()))
    if not ok or (kind == "cpu" and colon):
        hint = " (for a GPU write cuda or cuda:0)" if kind in ("gpu", "cuda0", "nvidia") else ""
        raise ConfigError(
            f"--device {device} is not a device the {backend} backend knows; expected one of "
            f"{_accepted(backend)}{hint}"
        )
    return Device(kind, int(index) if colon else None)


def check_precision(precision: str, backend: str) -> str:
    if precision not in RUN_PRECISIONS:
        raise ConfigError(
            f"--precision {precision!r} is not one of {', '.join(RUN_PRECISIONS)}; use fp32 "
            "(the reference) or fp16"
        )
    if precision in TORCH_ONLY_PRECISIONS and backend != "torch":
        raise ConfigError(
            f"--precision {precision} runs on the torch backend only (exports are fp32 or fp16); "
            f"use --precision fp16 with --backend {backend}, or --backend torch"
        )
    return precision
