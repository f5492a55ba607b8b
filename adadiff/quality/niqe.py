"""NIQE (Mittal, Soundararajan, Bovik 2013) with a pristine model fitted on our training photos.

No-reference, lower is better: the distance between the multivariate Gaussian of an image's
patch-wise NSS features and that of pristine patches; 0 means "as natural as the pristine set",
photos typically land at 2..10 here and strong blur or noise well above that.

Why NIQE as the second no-reference metric (the paper uses MUSIQ, whose weights are not on PyPI):
it needs no trained network and no opinion scores, only a model of undistorted photos, which the
set-up step fits deterministically from the scikit-image training photos (never the hold-out
ones) and stores as ``niqe/pristine.npz``. The numbers therefore differ from MATLAB NIQE with its
125-image LIVE model; the behaviour (sharp, clean photos score low) is the same.

Details: BT.709 luma in [0, 1] (C = 1/255), MSCN with a replicate-padded 7x7 Gaussian (sigma
7/6), 96x96 patches (48x48 at half scale), GGD fit for MSCN and AGGD fits for the four neighbour
products, pristine patches kept when their mean local deviation is >= 0.75 of the image's best.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from adadiff.errors import ModelFolderError, ShapeError
from adadiff.quality import nss
from adadiff.quality.cache import SETUP_HINT, cache_root, write_cache_file
from adadiff.quality.metrics import check_image

PATCH = 96
MIN_SIDE = 32
SHARPNESS_KEEP = 0.75
MODEL_FILE = Path("niqe") / "pristine.npz"
MODEL_VERSION = 1


@dataclass(frozen=True)
class NiqeModel:
    mean: np.ndarray  # [36]
    cov: np.ndarray  # [36, 36]
    photos: tuple[str, ...]  # what it was fitted on


def _patches(values: np.ndarray, patch: int) -> np.ndarray:
    rows, cols = values.shape[0] // patch, values.shape[1] // patch
    cropped = values[: rows * patch, : cols * patch]
    return cropped.reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3).reshape(-1, patch, patch)


def patch_size_for(shape: tuple[int, ...]) -> int:
    """96, or the largest even size giving at least 2x2 patches on a smaller image."""
    side = min(shape[0], shape[1])
    if side < MIN_SIDE:
        raise ShapeError(f"NIQE needs an image with sides >= {MIN_SIDE}, got {shape}")
    return min(PATCH, (side // 2) // 2 * 2)


def patch_features(rgb: np.ndarray, *, patch: int = PATCH, keep_sharp: bool = False) -> np.ndarray:
    """NSS features [N, 36] of the image's non-overlapping patches (full + half scale)."""
    rgb = check_image(rgb, "NIQE")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ShapeError(f"NIQE expects a float RGB image [H, W, 3], got {rgb.shape}")
    gray = nss.luminance(rgb)
    m1, sigma = nss.mscn(gray, mode="nearest")
    m2, _ = nss.mscn(nss.half_cubic(gray), mode="nearest")
    # The half-scale map cut to the full-scale grid, so patch k is the same place at both
    # scales (rounding can give the half-scale map one more patch row or column).
    rows, cols = m1.shape[0] // patch, m1.shape[1] // patch
    half = patch // 2
    p1, p2 = _patches(m1, patch), _patches(m2[: rows * half, : cols * half], half)
    count = min(len(p1), len(p2))
    p1, p2 = p1[:count], p2[:count]
    features = np.concatenate(
        [nss.nss_features(p1, symmetric_mscn=True), nss.nss_features(p2, symmetric_mscn=True)],
        axis=1,
    )
    if keep_sharp:
        sharpness = _patches(sigma, patch)[:count].mean(axis=(1, 2))
        features = features[sharpness >= SHARPNESS_KEEP * sharpness.max()]
    return features


def fit_pristine(images: Sequence[np.ndarray], names: Sequence[str] = ()) -> NiqeModel:
    """Fit the pristine multivariate Gaussian on the sharpest patches of clean photos."""
    features = np.concatenate([patch_features(im, keep_sharp=True) for im in images])
    if len(features) < 2:
        raise ShapeError(f"NIQE needs >= 2 pristine patches of {PATCH} px, got {len(features)}")
    return NiqeModel(
        mean=features.mean(axis=0), cov=np.cov(features, rowvar=False), photos=tuple(names)
    )


def model_path(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / MODEL_FILE


def fit_and_store(
    photos: Sequence[tuple[str, np.ndarray]], cache_dir: str | Path | None = None
) -> Path:
    """Fit the pristine model on ``photos`` (name, float RGB) and store it in the cache."""
    if not photos:
        raise ModelFolderError(
            "no training photos found for the NIQE pristine model; install scikit-image "
            "(pip install scikit-image) and run the set-up again"
        )
    model = fit_pristine([rgb for _, rgb in photos], [name for name, _ in photos])
    buffer = io.BytesIO()
    np.savez(
        buffer,
        version=np.int64(MODEL_VERSION),
        mean=model.mean,
        cov=model.cov,
        photos=np.array(model.photos, dtype=str),
    )
    path = model_path(cache_dir)
    write_cache_file(path, buffer.getvalue())
    _load_cached.cache_clear()
    return path


def ensure_model(
    photos: Callable[[], Sequence[tuple[str, np.ndarray]]],
    cache_dir: str | Path | None = None,
    *,
    refit: bool = False,
) -> Path:
    """The stored pristine model's path, fitting it on ``photos()`` first when missing,
    unreadable or ``refit``."""
    if not refit:
        try:
            load_niqe_model(cache_dir)
            return model_path(cache_dir)
        except ModelFolderError:
            pass
    return fit_and_store(photos(), cache_dir)


@lru_cache(maxsize=4)
def _load_cached(path: Path) -> NiqeModel:
    try:
        with np.load(path, allow_pickle=False) as npz:
            version = int(npz["version"])
            mean, cov, photos = npz["mean"], npz["cov"], tuple(str(p) for p in npz["photos"])
    except FileNotFoundError:
        raise ModelFolderError(f"{path} is missing: NIQE is not set up; {SETUP_HINT}") from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelFolderError(f"{path} is not a NIQE model ({exc}); {SETUP_HINT}") from exc
    if version != MODEL_VERSION or mean.shape != (36,) or cov.shape != (36, 36):
        raise ModelFolderError(
            f"{path}: NIQE model version {version} with mean {mean.shape}, cov {cov.shape}; "
            f"expected version {MODEL_VERSION}, (36,), (36, 36). {SETUP_HINT}"
        )
    return NiqeModel(mean=mean, cov=cov, photos=photos)


def load_niqe_model(cache_dir: str | Path | None = None) -> NiqeModel:
    return _load_cached(model_path(cache_dir).resolve())


def niqe_distance(features: np.ndarray, model: NiqeModel) -> float:
    """Mahalanobis-like distance between a patch-feature MVG and the pristine MVG."""
    mean = features.mean(axis=0)
    cov = np.cov(features, rowvar=False) if len(features) > 1 else np.zeros_like(model.cov)
    diff = model.mean - mean
    pooled = np.linalg.pinv(0.5 * (model.cov + cov))
    return float(np.sqrt(max(diff @ pooled @ diff, 0.0)))


def niqe(rgb: np.ndarray, *, cache_dir: str | Path | None = None) -> float:
    """NIQE score of a float RGB image [H, W, 3] in [0, 1]; lower is better."""
    model = load_niqe_model(cache_dir)
    return niqe_distance(patch_features(rgb, patch=patch_size_for(rgb.shape)), model)
