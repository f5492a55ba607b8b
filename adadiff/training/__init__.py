"""Training data for adadiff's learned parts: photos, crops and degradations (numpy only).

The pipeline function is ``adadiff.training.degrade.degrade``; it is not re-exported here so
that ``adadiff.training.degrade`` stays the module.
"""

from __future__ import annotations

from adadiff.training.data import (
    HOLDOUT,
    CropConfig,
    Photo,
    available_photos,
    holdout_photos,
    load_photo,
    pair,
    sample_crops,
    training_photos,
)
from adadiff.training.degrade import DegradationConfig, bicubic_x4

__all__ = [
    "HOLDOUT",
    "CropConfig",
    "DegradationConfig",
    "Photo",
    "available_photos",
    "bicubic_x4",
    "holdout_photos",
    "load_photo",
    "pair",
    "sample_crops",
    "training_photos",
]
