"""BRISQUE (Mittal, Moorthy, Bovik 2012), scored with the ``brisque`` 0.2.0 package's SVR.

No-reference, lower is better; about 0 for pristine photos and up to ~100 (values outside 0..100
occur) for heavily distorted ones. The model is a libsvm epsilon-SVR with an RBF kernel stored as
text (``svm.txt``: a header, then one support vector per line as ``coef idx:value ...``) plus a
pickle of per-feature min/max used to scale features to [-1, 1]. Both are read with numpy; the
prediction is ``sum_i coef_i * exp(-gamma * |x - sv_i|^2) - rho``, exactly what libsvm computes.

Features follow that package, because its model was trained on them: gray from BT.709 luma,
MSCN with a zero-padded 7x7 Gaussian (sigma 7/6), 18 NSS features at full and at half scale
(half scale by non-antialiased cubic interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from adadiff.errors import ModelFolderError, ShapeError
from adadiff.quality import nss
from adadiff.quality.metrics import check_image
from adadiff.quality.weights import (
    BRISQUE_NORMALIZE,
    BRISQUE_SVM,
    SETUP_HINT,
    asset_location,
    cache_root,
    load_pickle_asset,
    read_asset,
)

NUM_FEATURES = 36
MIN_SIDE = 16


@dataclass(frozen=True)
class SVRModel:
    """An RBF epsilon-SVR: ``predict(x) = coef @ exp(-gamma * |x - sv|^2) - rho``."""

    support_vectors: np.ndarray  # [N, D]
    coef: np.ndarray  # [N]
    gamma: float
    rho: float

    def predict(self, x: np.ndarray) -> float:
        d2 = np.sum((self.support_vectors - x[None, :]) ** 2, axis=1)
        return float(self.coef @ np.exp(-self.gamma * d2) - self.rho)


@dataclass(frozen=True)
class BrisqueModel:
    svr: SVRModel
    feature_min: np.ndarray  # [36]
    feature_max: np.ndarray  # [36]

    def scale(self, features: np.ndarray) -> np.ndarray:
        span = self.feature_max - self.feature_min
        return -1.0 + 2.0 * (features - self.feature_min) / span


def parse_libsvm_model(text: str, *, num_features: int, where: str = "svm model") -> SVRModel:
    """Parse a libsvm text model (epsilon-SVR, RBF kernel) into dense numpy arrays."""
    lines = text.splitlines()
    header: dict[str, str] = {}
    try:
        start = lines.index("SV") + 1
    except ValueError:
        raise ModelFolderError(f"{where}: no 'SV' line, not a libsvm model; {SETUP_HINT}") from None
    for line in lines[: start - 1]:
        key, _, value = line.partition(" ")
        header[key] = value.strip()
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ModelFolderError(
            f"{where}: expected an epsilon_svr model with an rbf kernel, got "
            f"{header.get('svm_type')!r} / {header.get('kernel_type')!r}"
        )
    rows = [line.split() for line in lines[start:] if line.strip()]
    vectors = np.zeros((len(rows), num_features))
    coef = np.empty(len(rows))
    try:
        for i, fields in enumerate(rows):
            coef[i] = float(fields[0])
            for pair in fields[1:]:
                index, value = pair.split(":")
                # libsvm numbers features from 1 and leaves out zeros.
                vectors[i, int(index) - 1] = float(value)
        gamma, rho = float(header["gamma"]), float(header["rho"])
    except (ValueError, IndexError, KeyError) as exc:
        raise ModelFolderError(f"{where}: malformed libsvm model ({exc}); {SETUP_HINT}") from exc
    if len(rows) != int(header.get("total_sv", len(rows))):
        raise ModelFolderError(
            f"{where}: header says {header['total_sv']} support vectors, found {len(rows)}"
        )
    return SVRModel(support_vectors=vectors, coef=coef, gamma=gamma, rho=rho)


@lru_cache(maxsize=4)
def _load_cached(root: Path) -> BrisqueModel:
    svm_text = read_asset(BRISQUE_SVM, root).decode("ascii")
    svr = parse_libsvm_model(
        svm_text, num_features=NUM_FEATURES, where=str(asset_location(BRISQUE_SVM, root))
    )
    ranges = load_pickle_asset(BRISQUE_NORMALIZE, root)
    try:
        lo = np.asarray(ranges["min_"], dtype=np.float64)
        hi = np.asarray(ranges["max_"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFolderError(
            f"{asset_location(BRISQUE_NORMALIZE, root)}: expected a dict with 'min_' and 'max_' "
            f"lists ({exc}); {SETUP_HINT}"
        ) from exc
    if lo.shape != (NUM_FEATURES,) or hi.shape != (NUM_FEATURES,) or np.any(hi <= lo):
        raise ModelFolderError(
            f"{asset_location(BRISQUE_NORMALIZE, root)}: expected {NUM_FEATURES} increasing "
            f"min/max pairs, got shapes {lo.shape} / {hi.shape}"
        )
    return BrisqueModel(svr=svr, feature_min=lo, feature_max=hi)


def load_brisque_model(cache_dir: str | Path | None = None) -> BrisqueModel:
    """The cached BRISQUE model; ``ModelFolderError`` if the set-up step has not run."""
    return _load_cached(cache_root(cache_dir).resolve())


def brisque_features(rgb: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of a float RGB image [H, W, 3] in [0, 1]."""
    rgb = check_image(rgb, "BRISQUE")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < MIN_SIDE:
        raise ShapeError(
            f"BRISQUE expects a float RGB image [H, W, 3] with sides >= {MIN_SIDE}, got {rgb.shape}"
        )
    gray = nss.luminance(rgb)
    scales = []
    for image in (gray, nss.half_cubic(gray)):
        coefficients, _ = nss.mscn(image, mode="constant")
        scales.append(nss.nss_features(coefficients, symmetric_mscn=False))
    return np.concatenate(scales)


def brisque(rgb: np.ndarray, *, cache_dir: str | Path | None = None) -> float:
    """BRISQUE score of a float RGB image [H, W, 3] in [0, 1]; lower is better."""
    model = load_brisque_model(cache_dir)
    return model.svr.predict(model.scale(brisque_features(rgb)))
