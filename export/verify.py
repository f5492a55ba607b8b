"""Run a freshly written ONNX file in ONNX Runtime and compare it with the torch module.

Every export is checked this way at a few batch sizes (different timesteps in one batch), so a
graph that froze the batch or mistranslated an op never reaches a runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adadiff.errors import EngineMismatchError
from adadiff.specs import ModelSpec, Tolerance


def compare(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> tuple[bool, float, float]:
    """(within tolerance, max |got - want|, max |got - want| / (atol + rtol |want|))."""
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    ratio = err / (tol.atol + tol.rtol * np.abs(want.astype(np.float64)))
    finite = bool(np.all(np.isfinite(got)))
    return finite and bool(ratio.max() <= 1.0), float(err.max()), float(ratio.max())


def check_against_torch(
    path: Path,
    module: nn.Module,
    spec: ModelSpec,
    *,
    batches: Sequence[int],
    tolerance: Tolerance,
) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst_err = worst_ratio = 0.0
    for batch in batches:
        feeds = spec.sample_inputs(batch, seed=100 + batch)
        (got,) = session.run(list(spec.output_names), feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).float().numpy()
        if got.shape != want.shape:
            raise EngineMismatchError(
                f"{spec.name}: ONNX Runtime returned shape {got.shape} at batch {batch}, torch "
                f"{want.shape}; the exported graph did not keep its batch axis dynamic"
            )
        ok, err, ratio = compare(got, want, tolerance)
        if not ok:
            raise EngineMismatchError(
                f"{spec.name}: ONNX Runtime differs from torch at batch {batch} by up to {err:.3g} "
                f"({ratio:.2f}x the tolerance atol={tolerance.atol}, rtol={tolerance.rtol}); the "
                "export is not trustworthy. Try the other exporter (--exporter) or report it"
            )
        worst_err, worst_ratio = max(worst_err, err), max(worst_ratio, ratio)
    return {
        "batches": list(batches),
        "max_abs_error": worst_err,
        "tolerance_used": round(worst_ratio, 4),
        "atol": tolerance.atol,
        "rtol": tolerance.rtol,
    }
