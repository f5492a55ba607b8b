"""Every quality metric the MMLE oracle can compute, by the name used in ``adadiff.json``.

A metric reports itself unavailable (with the fix) instead of failing half-way: LPIPS, BRISQUE
and NIQE until the set-up step has stored their files; AHIQ and MUSIQ always, because no PyPI
package ships their weights and nothing is downloaded at run time. ``register_metric`` plugs in
an implementation (for AHIQ or MUSIQ once their weights exist locally); ``with_substitutes``
swaps an unavailable metric for its documented stand-in (ahiq -> ssim, musiq -> niqe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from adadiff.config import MetricConfig, MetricKind
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.quality import metrics
from adadiff.quality.brisque import brisque
from adadiff.quality.niqe import model_path, niqe
from adadiff.quality.weights import (
    BRISQUE_NORMALIZE,
    BRISQUE_SVM,
    LPIPS_ALEXNET,
    SETUP_HINT,
    Asset,
    asset_location,
    cache_root,
)

# Identical images have infinite PSNR; the oracle caps it so R and its gains stay finite.
PSNR_CAP_DB = metrics.PSNR_CAP_DB

CacheDir = str | Path | None
Compute = Callable[[np.ndarray, "np.ndarray | None", CacheDir], float]


@dataclass(frozen=True, kw_only=True)
class Metric:
    """``compute(image, reference, cache_dir)``; NR metrics get ``reference=None``."""

    name: str
    kind: MetricKind
    higher_is_better: bool
    value_range: str
    compute: Compute
    # None when usable, else why not; ``needs_setup`` picks the error (set-up vs config).
    unavailable: Callable[[CacheDir], str | None] = lambda _cache: None
    needs_setup: bool = True


def _missing_files(*paths: Callable[[CacheDir], Path]) -> Callable[[CacheDir], str | None]:
    def check(cache_dir: CacheDir) -> str | None:
        absent = [str(p(cache_dir)) for p in paths if not p(cache_dir).is_file()]
        return f"{', '.join(absent)} missing; {SETUP_HINT}" if absent else None

    return check


def _asset(asset: Asset) -> Callable[[CacheDir], Path]:
    return lambda cache_dir: asset_location(asset, cache_dir)


def _niqe_path(cache_dir: CacheDir) -> Path:
    return model_path(cache_dir)


def _ref(reference: np.ndarray | None) -> np.ndarray:
    if reference is None:
        raise ConfigError("a full-reference metric needs the reference image; pass it")
    return reference


def _psnr(image: np.ndarray, reference: np.ndarray | None, _cache: CacheDir) -> float:
    return metrics.psnr_capped(image, _ref(reference))


def _lpips(image: np.ndarray, reference: np.ndarray | None, cache_dir: CacheDir) -> float:
    from adadiff.quality.lpips import lpips  # torch is imported only when LPIPS is used

    return lpips(image, _ref(reference), cache_dir=cache_dir)


def _brisque(image: np.ndarray, _reference: np.ndarray | None, cache_dir: CacheDir) -> float:
    return brisque(image, cache_dir=cache_dir)


def _niqe(image: np.ndarray, _reference: np.ndarray | None, cache_dir: CacheDir) -> float:
    return niqe(image, cache_dir=cache_dir)


def _not_implemented(name: str) -> Compute:
    def compute(image: np.ndarray, reference: np.ndarray | None, cache_dir: CacheDir) -> float:
        raise ConfigError(f"metric {name!r} has no implementation; see registry.unavailable")

    return compute


def _no_weights(name: str, what: str, substitute: MetricConfig) -> Callable[[CacheDir], str]:
    def reason(cache_dir: CacheDir) -> str:
        return (
            f"{name} needs {what}, which no PyPI package ships, and adadiff downloads nothing at "
            f"run time; register an implementation with adadiff.quality.registry.register_metric "
            f"once its weights are in {cache_root(cache_dir)}, or configure the stand-in "
            f'{{"name": "{substitute.name}", "kind": "{substitute.kind.value}", '
            f'"weight": {substitute.weight}}} in adadiff.json (with_substitutes() does this)'
        )

    return reason


FR, NR = MetricKind.FULL_REFERENCE, MetricKind.NO_REFERENCE

# Stand-ins with weights that keep one unit of R a clearly visible change, like the originals:
# SSIM spans about the same 0..1 as AHIQ; NIQE moves ~5..15 where MUSIQ moves ~20..30 points.
SUBSTITUTES: dict[str, MetricConfig] = {
    "ahiq": MetricConfig(name="ssim", kind=FR, weight=1.0),
    "musiq": MetricConfig(name="niqe", kind=NR, weight=-0.05),
}

_BUILTIN = (
    Metric(
        name="psnr",
        kind=FR,
        higher_is_better=True,
        value_range=f"dB, capped at {PSNR_CAP_DB:g}",
        compute=_psnr,
    ),
    Metric(
        name="ssim",
        kind=FR,
        higher_is_better=True,
        value_range="[-1, 1]",
        compute=lambda x, y, _c: metrics.ssim(x, _ref(y)),
    ),
    Metric(
        name="gmsd",
        kind=FR,
        higher_is_better=False,
        value_range="[0, ~0.35]",
        compute=lambda x, y, _c: metrics.gmsd(x, _ref(y)),
    ),
    Metric(
        name="nlpd",
        kind=FR,
        higher_is_better=False,
        value_range="[0, ~1]",
        compute=lambda x, y, _c: metrics.nlpd(x, _ref(y)),
    ),
    Metric(
        name="lpips",
        kind=FR,
        higher_is_better=False,
        value_range="[0, ~1]",
        compute=_lpips,
        unavailable=_missing_files(_asset(LPIPS_ALEXNET)),
    ),
    Metric(
        name="brisque",
        kind=NR,
        higher_is_better=False,
        value_range="about 0..100, can exceed",
        compute=_brisque,
        unavailable=_missing_files(_asset(BRISQUE_SVM), _asset(BRISQUE_NORMALIZE)),
    ),
    Metric(
        name="niqe",
        kind=NR,
        higher_is_better=False,
        value_range="[0, inf), photos ~3..10",
        compute=_niqe,
        unavailable=_missing_files(_niqe_path),
    ),
    Metric(
        name="ahiq",
        kind=FR,
        higher_is_better=True,
        value_range="~[0, 1]",
        compute=_not_implemented("ahiq"),
        needs_setup=False,
        unavailable=_no_weights(
            "AHIQ", "a pretrained ViT + ResNet checkpoint", SUBSTITUTES["ahiq"]
        ),
    ),
    Metric(
        name="musiq",
        kind=NR,
        higher_is_better=True,
        value_range="[0, 100]",
        compute=_not_implemented("musiq"),
        needs_setup=False,
        unavailable=_no_weights(
            "MUSIQ", "a pretrained multi-scale transformer checkpoint", SUBSTITUTES["musiq"]
        ),
    ),
)

_REGISTRY: dict[str, Metric] = {m.name: m for m in _BUILTIN}


def register_metric(metric: Metric) -> None:
    """Add or replace a metric (e.g. a real AHIQ or MUSIQ); later lookups use it."""
    _REGISTRY[metric.name] = metric


def known_metrics() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_metric(name: str) -> Metric:
    """The registered metric, or ``ConfigError`` naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown quality metric {name!r}; known metrics are {', '.join(known_metrics())}"
        ) from None


def check_available(config: MetricConfig, cache_dir: CacheDir = None) -> Metric:
    """The metric for ``config`` if it exists, has the configured kind and can run here."""
    metric = get_metric(config.name)
    if metric.kind != config.kind:
        raise ConfigError(
            f"metric {config.name!r} is {metric.kind.value!r} (full-reference 'fr' or "
            f"no-reference 'nr'), but adadiff.json says {config.kind.value!r}; fix its kind"
        )
    reason = metric.unavailable(cache_dir)
    if reason is not None:
        error = ModelFolderError if metric.needs_setup else ConfigError
        raise error(f"metric {config.name!r} is unavailable: {reason}")
    return metric


def with_substitutes(
    configs: Sequence[MetricConfig], cache_dir: CacheDir = None
) -> tuple[MetricConfig, ...]:
    """``configs`` with each unavailable metric that has a stand-in replaced by it.

    The stand-in takes the original's place (so score order is kept) and its own weight.
    """
    out = []
    for config in configs:
        metric = get_metric(config.name)
        if metric.unavailable(cache_dir) is not None and config.name in SUBSTITUTES:
            out.append(replace(SUBSTITUTES[config.name]))
        else:
            out.append(config)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"substituting unavailable metrics gives duplicate names {names}; configure the "
            "metrics in adadiff.json by hand"
        )
    return tuple(out)
