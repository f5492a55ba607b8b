"""The PyTorch backend: runs the export wrappers themselves, so it is the reference."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from adadiff.devices import check_precision, parse_device
from adadiff.errors import BackendUnavailableError, ConfigError
from adadiff.models.bundle import TorchModels
from adadiff.specs import COMPONENTS, HALF_COMPONENTS, ModelSpec, component_specs

log = logging.getLogger("adadiff")

# Half precision applies to HALF_COMPONENTS only (the VAE overflows, the MMLE's scores round).
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def full_fp32_on_cuda() -> None:
    """fp32 means IEEE fp32 on CUDA too: torch's cuDNN convolutions default to TF32 (10-bit
    mantissa), which the other backends do not use, so parity and the reference would differ.
    Process-wide, like every torch backend flag."""
    if hasattr(torch.backends.cudnn, "conv"):  # the fp32_precision API (torch 2.9 and newer)
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class TorchEngine:
    def __init__(
        self, module: torch.nn.Module, spec: ModelSpec, device: torch.device, dtype: torch.dtype
    ) -> None:
        current = next(module.parameters(), None)
        if current is not None and current.dtype in HALF_DTYPES.values() and current.dtype != dtype:
            # A backend casts the shared modules in place (a copy would double the host memory
            # of sd21's UNet); casting back would run the rounded weights as if they were fp32.
            raise ConfigError(
                f"the {spec.name} of these models was cast to {current.dtype} by an earlier "
                f"half-precision torch backend; load the models again (load_models) for a "
                f"{dtype} backend"
            )
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.module = module.to(device=device, dtype=dtype).eval()

    def close(self) -> None:
        self.module = None  # the backend's wrappers go in its close

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = []
        for t in self.spec.inputs:
            x = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device)
            # Timesteps stay fp32: their sinusoidal embedding loses steps in fp16.
            args.append(x if t.name == "timestep" else x.to(self.dtype))
        with torch.inference_mode():
            out = self.module(*args)
        (name,) = self.spec.output_names
        return {name: out.float().cpu().numpy()}


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        models: TorchModels,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
    ) -> None:
        """``threads``: torch's CPU thread count (process-wide); None leaves torch's own."""
        check_precision(precision, self.name)
        dev = torch.device(str(parse_device(device, self.name)))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {device!r} was asked for but torch sees no CUDA device; install a CUDA "
                "build of torch (see README, GPU) or use --device cpu"
            )
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {device!r} was asked for but torch sees {torch.cuda.device_count()} CUDA "
                f"device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        if dev.type == "cuda":
            full_fp32_on_cuda()
        if precision != "fp32" and dev.type == "cpu":
            log.warning(
                "--precision %s on the CPU is slow and meant for checks; the CPU runs fp32 fastest",
                precision,
            )
        if threads is not None:
            torch.set_num_threads(threads)
        self.models: TorchModels | None = models
        self.device = dev
        self.precision = precision
        self.specs = component_specs(models.config)
        self._wrappers = models.wrappers()

    def open(self, component: str) -> TorchEngine:
        if self.models is None:
            raise ConfigError("this torch backend was closed; open a new one")
        if component not in COMPONENTS:
            raise ConfigError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        half = self.precision in HALF_DTYPES and component in HALF_COMPONENTS
        dtype = HALF_DTYPES[self.precision] if half else torch.float32
        return TorchEngine(self._wrappers[component], self.specs[component], self.device, dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": self.precision,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        }

    def close(self) -> None:
        # the engines moved the modules to the device in place: let go of them too, so their
        # (GPU) memory is freed once the caller drops its own references
        self._wrappers.clear()
        self.models = None
