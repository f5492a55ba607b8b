"""FLOPs per component: counted once per (component, batch) with torch's FlopCounterMode on the
torch export wrappers (the graphs every backend runs), then multiplied by the calls in a Report.

FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add); it leaves
out element-wise work (norms, activations), which is small next to those for these networks.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np

from adadiff.specs import ModelSpec, component_specs


class FlopCounter:
    """Caches FLOPs per (component, batch); counting runs each shape once on the CPU."""

    def __init__(self, models: Any) -> None:
        self.config = models.config
        self.specs: dict[str, ModelSpec] = component_specs(models.config)
        self._wrappers = models.wrappers()
        self._cache: dict[tuple[str, int], int] = {}

    def per_call(self, component: str, batch: int) -> int:
        key = (component, batch)
        if key not in self._cache:
            self._cache[key] = self._count(component, batch)
        return self._cache[key]

    def _count(self, component: str, batch: int) -> int:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        spec = self.specs[component]
        feeds = spec.sample_inputs(batch)
        module = self._wrappers[component]
        # The torch backend may have moved the shared modules to CUDA or fp16; follow them.
        param = next(module.parameters())
        module.to(param.device)
        args = [
            torch.from_numpy(feeds[n]).to(
                param.device, torch.float32 if n == "timestep" else param.dtype
            )
            for n in spec.input_names
        ]
        # FlopCounterMode has no formula for the CPU's fused attention kernel and counts it as
        # 0 (the attention matmuls of the UNet and VAE went missing); the math kernel is made
        # of matmuls it counts. CUDA's fused kernels have formulas and far less memory.
        kernel = sdpa_kernel(SDPBackend.MATH) if param.device.type == "cpu" else nullcontext()
        with torch.inference_mode(), kernel, FlopCounterMode(display=False) as counter:
            module(*args)
        return int(counter.get_total_flops())

    def linear_in_batch(self, component: str = "unet") -> bool:
        """FLOPs(B=2) == 2 * FLOPs(B=1): what lets per-item counts stand for any batch."""
        return self.per_call(component, 2) == 2 * self.per_call(component, 1)

    def table(self) -> dict[str, int]:
        """FLOPs per tile (B=1) of every component."""
        return {name: self.per_call(name, 1) for name in self.specs}


def report_flops(counter: FlopCounter, report: Any) -> dict[str, int]:
    """FLOPs of one upscale per component, from the calls its Report recorded.

    UNet calls are counted at their recorded batch sizes; the other components log calls and
    items (tiles) only, so their FLOPs are items times the per-tile count, which is exact
    because every count is linear in the batch (checked by ``linear_in_batch``).
    """
    flops: dict[str, int] = {}
    for name, log in report.components.items():
        if name == "unet":
            flops[name] = sum(counter.per_call("unet", b["size"]) for b in report.batches)
        else:
            flops[name] = int(log["items"]) * counter.per_call(name, 1)
    flops["total"] = int(np.sum([v for k, v in flops.items() if k != "total"]))
    return flops


def torch_models_of(backend: Any, model: str, seed: int) -> Any:
    """The torch modules behind ``backend`` when it is the torch one, else a fresh load."""
    models = getattr(backend, "models", None)
    if models is not None:
        return models
    from adadiff.models.bundle import load_models

    return load_models(model, seed=seed)
