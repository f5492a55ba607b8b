"""Image quality metrics and the MMLE oracle; torch is imported only when LPIPS is used.

Full-reference (against the bicubic-upscaled LR input): psnr, ssim, gmsd, nlpd (metrics.py),
lpips (lpips.py). No-reference: brisque (brisque.py), niqe (niqe.py). LPIPS, BRISQUE and NIQE
read files stored by the set-up step (weights.py: ``adadiff setup-metrics``).

Names below load their module on first use, so ``import adadiff.quality`` stays cheap (scipy
and torch load with the metric that needs them). The set-up step is
``adadiff.training.metrics_setup``: NIQE is fitted on the training photos.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "gmsd": "metrics",
    "nlpd": "metrics",
    "psnr": "metrics",
    "ssim": "metrics",
    "score_images": "oracle",
    "SUBSTITUTES": "registry",
    "check_available": "registry",
    "get_metric": "registry",
    "known_metrics": "registry",
    "register_metric": "registry",
    "with_substitutes": "registry",
    "fetch_brisque": "weights",
    "fetch_lpips": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
