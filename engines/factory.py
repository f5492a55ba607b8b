"""Pick and open a backend by name; each backend imports its library only here, when chosen."""

from __future__ import annotations

from pathlib import Path

from adadiff.config import BackendKind, ModelConfig, RunSettings
from adadiff.devices import check_precision, parse_device
from adadiff.engines.base import Backend
from adadiff.engines.onnxruntime import OrtOptions, open_onnxruntime
from adadiff.engines.tensorrt import TensorRTBackend
from adadiff.errors import BackendUnavailableError, ConfigError
from adadiff.presets import model_config, model_folder
from adadiff.threads import check_threads, prefer_passive_wait

BACKENDS = BackendKind.values()


def make_backend(settings: RunSettings) -> tuple[ModelConfig, Backend]:
    """Open ``settings.backend`` for ``settings.model``; tile overrides change every
    component's shapes.

    ``max_batch`` is the largest batch the runtime will send (ONNX Runtime's TensorRT profile).
    ``threads`` is the CPU thread count of torch or ONNX Runtime (default: every usable CPU,
    ``adadiff.threads``); the torch backend also asks OpenMP for passive waiting when torch
    is not imported yet."""
    model, backend, device, precision = (
        settings.model,
        settings.backend,
        settings.device,
        settings.precision,
    )
    engines, seed, max_batch = settings.engines, settings.seed, settings.max_batch
    tile_size, tile_overlap = settings.tile_size, settings.tile_overlap
    # Before any model or library loads: a typo costs one line, not a traceback.
    parse_device(device, backend)
    check_precision(precision, backend)
    threads = check_threads(settings.threads)
    if backend == "torch":
        prefer_passive_wait()
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
        models = load_models(model or "tiny", seed=seed)
        models.config = models.config.with_tiling(tile_size, tile_overlap)
        opened = TorchBackend(models, device=device, precision=precision, threads=threads)
        return models.config, opened
    if backend == "onnxruntime":
        if engines is None:
            raise ConfigError(
                "--backend onnxruntime needs --engines FOLDER, the output of "
                "`adadiff export --model MODEL -o FOLDER`"
            )
        return open_onnxruntime(
            engines,
            model=model,
            device=device,
            precision=precision,
            options=OrtOptions(intra_op_threads=threads),
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            max_batch=max_batch,
        )
    return _open_tensorrt(
        engines,
        model=model,
        device=device,
        precision=precision,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
    )


def _open_tensorrt(
    engines: str | Path | None,
    *,
    model: str | Path | None,
    device: str,
    precision: str,
    tile_size: int | None,
    tile_overlap: int | None,
) -> tuple[ModelConfig, Backend]:
    if engines is None:
        raise ConfigError(
            "--backend tensorrt needs --engines FOLDER: export with `adadiff export --model MODEL "
            "-o FOLDER`, then build with `adadiff build FOLDER`"
        )
    # TensorRT runs on CUDA only, so the CPU default means "the first GPU" here.
    backend = TensorRTBackend(engines, device="cuda" if device == "cpu" else device)
    try:
        return _checked_tensorrt(backend, engines, model, precision, tile_size, tile_overlap)
    except BaseException:
        backend.close()  # a refused setting must not leave engines and GPU memory behind
        raise


def _checked_tensorrt(
    backend: TensorRTBackend,
    engines: str | Path,
    model: str | Path | None,
    precision: str,
    tile_size: int | None,
    tile_overlap: int | None,
) -> tuple[ModelConfig, Backend]:
    if precision != backend.exported.precision:
        raise ConfigError(
            f"{engines} holds a {backend.exported.precision} export; pass --precision "
            f"{backend.exported.precision} or export again with --precision {precision}"
        )
    if model is not None:
        backend.exported.check_model(model_config(model), str(model), model_folder(model))
    cfg = backend.config
    if tile_size is not None and tile_size != cfg.tile_size:
        raise ConfigError(
            f"the engines in {engines} take {cfg.tile_size} px tiles, not --tile {tile_size}; "
            "drop --tile or export and build again"
        )
    return cfg.with_tiling(tile_size, tile_overlap), backend
