"""The MMLE oracle: real quality scores of a decoded tile, in the order ``adadiff.json`` lists.

Full-reference metrics compare the SR image with the LR input upscaled by bicubic interpolation
(the paper scores against the LR input, which has no HR ground truth at inference); no-reference
metrics see the SR image alone. Scores are raw metric values; the signed weights in the config
turn them into R (see runtime/policy.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adadiff.config import MetricConfig, MetricKind
from adadiff.errors import ShapeError
from adadiff.imageio import bicubic_upscale
from adadiff.quality.metrics import check_image
from adadiff.quality.registry import check_available


def _rgb(name: str, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ShapeError(
            f"{name} must be a float RGB image [H, W, 3] in [0, 1], got {image.dtype} {image.shape}"
        )
    check_image(image, name)  # clipping would keep a NaN, and score it as NaN
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def reference_for(sr: np.ndarray, lr_reference: np.ndarray) -> np.ndarray:
    """The full-reference target: ``lr_reference`` bicubic-upscaled to ``sr``'s size.

    ``lr_reference`` may already have ``sr``'s size; otherwise both sides must be one integer
    factor larger in ``sr``.
    """
    sr_h, sr_w = sr.shape[:2]
    lr_h, lr_w = lr_reference.shape[:2]
    if (sr_h, sr_w) == (lr_h, lr_w):
        return lr_reference
    if sr_h % lr_h or sr_w % lr_w or sr_h // lr_h != sr_w // lr_w:
        raise ShapeError(
            f"SR image {sr_h}x{sr_w} is not an integer upscale of the LR reference "
            f"{lr_h}x{lr_w}; pass the LR tile that produced it (or one already at SR size)"
        )
    return bicubic_upscale(lr_reference, sr_h // lr_h)


def score_images(
    sr: np.ndarray,
    lr_reference: np.ndarray,
    metrics: Sequence[MetricConfig],
    *,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """One raw score per configured metric, float64 [len(metrics)].

    Raises ``ConfigError`` for an unknown metric, a wrong kind or one without an implementation
    (AHIQ, MUSIQ: see ``registry.with_substitutes``), and ``ModelFolderError`` when a metric's
    files are not set up. Every metric is checked before any is computed.
    """
    sr = _rgb("sr", sr)
    lr_reference = _rgb("lr_reference", lr_reference)
    resolved = [check_available(config, cache_dir) for config in metrics]
    needs_reference = any(m.kind == MetricKind.FULL_REFERENCE for m in resolved)
    reference = reference_for(sr, lr_reference) if needs_reference else None
    scores = np.empty(len(resolved), dtype=np.float64)
    for i, metric in enumerate(resolved):
        target = reference if metric.kind == MetricKind.FULL_REFERENCE else None
        scores[i] = metric.compute(sr, target, cache_dir)
    return scores
