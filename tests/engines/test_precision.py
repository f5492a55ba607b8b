"""Half precision on the torch backend, run on the CPU so CI exercises the fp16 code path."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from adadiff.devices import check_precision, parse_device
from adadiff.errors import ConfigError
from adadiff.presets import tiny
from adadiff.specs import component_specs

# as for the fp16 ONNX export against the fp32 torch image (tests/engines/test_onnxruntime.py)
FP16_MIN_PSNR = 70.0


def _fresh_models():
    # TorchEngine moves its module to the run's dtype in place, so a half-precision backend gets
    # its own copy of the (seeded) weights and never touches the session's tiny_models.
    from adadiff.models.bundle import build_random

    return build_random(tiny(), seed=0)


@pytest.fixture(scope="module")
def half_backend():
    from adadiff.engines.torch import TorchBackend

    return TorchBackend(_fresh_models(), device="cpu", precision="fp16")


@pytest.mark.parametrize("component", ["unet", "pfj"])
def test_fp16_components_match_fp32_on_cpu(half_backend, tiny_models, component):
    from adadiff.engines.torch import TorchBackend

    spec = component_specs(tiny_models.config)[component]
    feeds = spec.sample_inputs(3, seed=5)
    (name,) = spec.output_names
    engine = half_backend.open(component)
    assert str(next(engine.module.parameters()).dtype) == "torch.float16"  # fp16 really runs
    got = engine(feeds)[name]
    want = TorchBackend(tiny_models).open(component)(feeds)[name]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - want).max() > 0  # not fp32 under another name
    tol = spec.fp16_tolerance
    np.testing.assert_allclose(got, want, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_vae_and_mmle_stay_fp32_at_half_precision(tiny_models, precision):
    """Half precision rounds the MMLE's raw scores (PSNR near 28, BRISQUE near 60) by 0.016 to
    0.25, about the DTSS threshold once weighted: its scores must be fp32's, bit for bit."""
    from adadiff.engines.torch import TorchBackend

    backend = TorchBackend(_fresh_models(), device="cpu", precision=precision)
    for component in ("vae_encoder", "vae_decoder", "mmle"):
        engine = backend.open(component)
        assert str(next(engine.module.parameters()).dtype) == "torch.float32", component
    spec = component_specs(tiny_models.config)["mmle"]
    feeds = spec.sample_inputs(2, seed=1)
    want = TorchBackend(tiny_models).open("mmle")(feeds)["scores"]
    np.testing.assert_array_equal(backend.open("mmle")(feeds)["scores"], want)


def test_fp16_upscale_end_to_end_on_cpu(half_backend, tiny_models, photo, caplog):
    from adadiff.engines.torch import TorchBackend
    from adadiff.runtime.upscaler import Upscaler

    with caplog.at_level(logging.WARNING, logger="adadiff"):
        backend = TorchBackend(half_backend.models, device="cpu", precision="fp16")
    assert "slow and meant for checks" in caplog.text
    up = Upscaler(backend.models.config, backend, max_batch=4)
    out, rep = up.upscale(photo[:24, :24], schedule="adaptive", seed=0)
    assert out.shape == (96, 96, 3) and np.isfinite(out).all()
    assert rep.backend["precision"] == "fp16"
    assert rep.components["mmle"]["items"] == rep.unet_evaluations > 0
    # the same image as fp32 within half precision's error (a fixed schedule: same steps)
    full = Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=4)
    want, _ = full.upscale(photo[:24, :24], schedule="uniform", interval=200, seed=0)
    got, _ = up.upscale(photo[:24, :24], schedule="uniform", interval=200, seed=0)
    mse = float(np.mean((got.astype(np.float64) - want) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-20))
    print(f"fp16 torch upscale: PSNR {psnr:.1f} dB against fp32")
    assert psnr >= FP16_MIN_PSNR


@pytest.mark.parametrize(
    ("device", "backend"),
    [
        ("gpu", "torch"),
        ("cuda:x", "torch"),
        ("cuda:\u00b2", "torch"),  # str.isdigit() takes superscripts, int() does not
        ("cpu:0", "torch"),
        ("tensorrt", "torch"),
        ("gpu", "onnxruntime"),
        ("gpu", "tensorrt"),
    ],
)
def test_bad_devices_are_config_errors(device, backend):
    with pytest.raises(ConfigError, match=rf"--device {re.escape(device)} .*expected one of"):
        parse_device(device, backend)


def test_good_devices_and_precisions():
    assert str(parse_device("cuda:1")) == "cuda:1" and parse_device("cuda").index is None
    assert str(parse_device("tensorrt:0", "onnxruntime")) == "tensorrt:0"
    assert check_precision("bf16", "torch") == "bf16"
    with pytest.raises(ConfigError, match="torch backend only"):
        check_precision("bf16", "onnxruntime")


def test_the_torch_backend_refuses_engines_before_loading_a_model(monkeypatch):
    """From Python (the command line has its own check): engines are not torch's."""
    from adadiff.config import RunSettings
    from adadiff.engines import make_backend
    from adadiff.models import bundle

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(bundle, "load_models", no_model)
    with pytest.raises(ConfigError, match="--engines is for the onnxruntime and tensorrt"):
        make_backend(RunSettings(backend="torch", engines="tiny-onnx"))


def test_fp32_on_cuda_turns_tf32_off(monkeypatch, tiny_models):
    """A CUDA torch backend computes fp32 as IEEE fp32, as the other backends do (torch's cuDNN
    convolutions default to TF32). The CUDA check is patched: the flags are settable anywhere."""
    import torch

    from adadiff.engines.torch import TorchBackend

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        TorchBackend(tiny_models, device="cpu")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")  # CPU: untouched
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        backend = TorchBackend(tiny_models, device="cuda")
        assert backend.device.type == "cuda"
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_models_a_half_backend_cast_are_refused_by_a_later_fp32_backend():
    """A half-precision backend casts the shared modules in place; an fp32 backend opened on the
    same models afterwards ran the rounded weights and gave results 0.02 off a fresh model's."""
    from adadiff.engines.torch import TorchBackend

    models = _fresh_models()
    TorchBackend(models, device="cpu", precision="bf16").open("unet")
    with pytest.raises(ConfigError, match=r"cast to torch\.bfloat16 .* load the models again"):
        TorchBackend(models, device="cpu").open("unet")
    with pytest.raises(ConfigError, match=r"cast to torch\.bfloat16"):
        TorchBackend(models, device="cpu", precision="fp16").open("unet")
    # the same precision again, and components the half backend left in fp32, still open
    TorchBackend(models, device="cpu", precision="bf16").open("unet")
    TorchBackend(models, device="cpu").open("vae_decoder")
