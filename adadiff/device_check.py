"""Whether this machine has the device a backend is asked to run on, checked before any model
loads: the command line and the benchmarks refuse a GPU the machine lacks in one line."""

from __future__ import annotations

from importlib import metadata

from adadiff.artifacts import import_tensorrt
from adadiff.cuda import CudaDevice
from adadiff.devices import parse_device
from adadiff.engines.onnxruntime import CUDA, INSTALL_GPU, TENSORRT, import_onnxruntime
from adadiff.errors import BackendUnavailableError


def check_device(backend: str, device: str, *, here: bool = True) -> None:
    """Refuse a device the backend does not know, or (``here``) a GPU this machine lacks."""
    dev = parse_device(device, backend)
    if not here:
        return
    if backend == "tensorrt":
        # TensorRT runs on CUDA only (cpu means the first GPU); a missing library comes first
        import_tensorrt()
        CudaDevice(device)
        return
    if dev.kind == "cpu":
        return
    if backend == "onnxruntime":
        _check_ort_gpu(device, dev.kind)
    else:
        _check_torch_cuda(device, dev.index or 0)


def _check_torch_cuda(device: str, index: int) -> None:
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise BackendUnavailableError(
            f"--device {device} needs torch, which is not installed; see README, GPU"
        ) from None
    import torch

    # not the version's +cpu alone: PyPI's CPU-only torch for Windows and macOS has no suffix
    if torch.version.cuda is None and torch.version.hip is None:
        raise BackendUnavailableError(
            f"--device {device}: the installed torch {version} is a CPU-only build; install a "
            "CUDA build of torch (README, GPU) or use --device cpu"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise BackendUnavailableError(
            f"--device {device}: torch {version} sees {count} CUDA device(s); check the driver "
            "and CUDA_VISIBLE_DEVICES, or use --device cpu"
        )


def _check_ort_gpu(device: str, kind: str) -> None:
    provider = TENSORRT if kind == "tensorrt" else CUDA
    available = import_onnxruntime().get_available_providers()
    if provider not in available:
        raise BackendUnavailableError(
            f"--device {device} needs ONNX Runtime's {provider}, but this onnxruntime offers "
            f"{', '.join(available)}; {INSTALL_GPU}, or use --device cpu"
        )
