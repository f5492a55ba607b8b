"""What a benchmark ran on: recorded next to every figure."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

LIBRARIES = ("adadiff", "torch", "diffusers", "numpy", "onnx", "onnxruntime", "tensorrt")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu(device: str = "cuda:0") -> str | None:
    """The name of the CUDA ``device`` (cuda: the current one), None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    return torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)


def machine(device: str = "cuda:0") -> dict[str, Any]:
    """What this run ran on; ``device``: the CUDA device whose name is recorded."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    threads = None
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "gpu": gpu(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
    }


SHIPPED_WEIGHTS = "shipped weights"


def weights_of(model: str) -> str:
    """Which weights a preset name meant for this run: shipped, or seeded random init."""
    from adadiff.models.bundle import SHIPPED
    from adadiff.presets import preset_name

    name = preset_name(model)
    if name is None:
        return model
    shipped = SHIPPED / name / "adadiff.json"
    return SHIPPED_WEIGHTS if shipped.is_file() else "seeded random init (no weights shipped)"


def timed_section(name: str, run: Any, result: dict[str, Any]) -> None:
    """``result[name] = run()`` and its seconds in ``result["seconds"]``; an exception is recorded
    with its traceback instead, so the other sections still count."""
    import time
    import traceback

    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        result[name] = run()
    except Exception as exc:  # record and go on
        result[name] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=5),
        }
        print(f"[{name}] failed: {exc}", file=sys.stderr, flush=True)
    result["seconds"][name] = round(time.perf_counter() - t0, 1)


def machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    libs = m.get("libraries", {})
    versions = ", ".join(
        f"{k} {libs[k]}" for k in ("torch", "onnxruntime", "tensorrt") if k in libs
    )
    gpu = m.get("gpu") or "no GPU"
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('torch_threads')} torch "
        f"threads), {gpu}; Python {m.get('python')}, {versions}; {m.get('date', '')}"
    )
