"""Pick and open a backend by name; each backend imports its library only here, when chosen."""

from __future__ import annotations

from pathlib import Path

from adadiff.config import ModelConfig
from adadiff.engines.base import Backend
from adadiff.errors import BackendUnavailableError, ConfigError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def make_backend(
    model: str | Path,
    *,
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    engines: str | Path | None = None,
    seed: int = 0,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
) -> tuple[ModelConfig, Backend]:
    """Open ``backend`` for ``model``; tile overrides change every component's shapes."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if engines is not None:
            raise ConfigError("--engines is for the onnxruntime and tensorrt backends, not torch")
        try:
            from adadiff.engines.torch import TorchBackend
            from adadiff.models.bundle import load_models
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the torch backend needs torch and diffusers ({exc}); pip install torch==2.13.0 "
                "diffusers, or see README for GPU builds"
            ) from exc
        models = load_models(model, seed=seed)
        models.config = models.config.with_tiling(tile_size, tile_overlap)
        return models.config, TorchBackend(models, device=device, precision=precision)
    raise BackendUnavailableError(
        f"the {backend} backend is not part of this build yet; use --backend torch"
    )
