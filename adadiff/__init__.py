"""adadiff: AdaDiffSR (adaptive-step diffusion 4x super-resolution), reference and deployment.

``import adadiff`` is light: torch, onnxruntime and tensorrt load only when a backend is chosen.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Upscaler", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Upscaler":
        from adadiff.runtime.upscaler import Upscaler

        return Upscaler
    raise AttributeError(f"module 'adadiff' has no attribute {name!r}")
