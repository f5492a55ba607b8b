"""Backends that run a component: torch (reference), onnxruntime, tensorrt.

Each backend imports its library only when it is chosen.
"""

from __future__ import annotations

from adadiff.engines.base import Backend, CallLog, Components, Engine
from adadiff.engines.factory import BACKENDS, make_backend

__all__ = ["BACKENDS", "Backend", "CallLog", "Components", "Engine", "make_backend"]
