"""TensorRT: pure parts on every machine; engine tests only where tensorrt and CUDA exist."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from adadiff.artifacts import (
    BatchProfile,
    DeviceInfo,
    EngineEntry,
    EngineManifest,
    engine_key,
    parse_profiles,
    profile_for,
    profile_shapes,
)
from adadiff.errors import ConfigError, EngineMismatchError, ModelFolderError
from adadiff.export.manifest import save_engine_manifest
from adadiff.presets import tiny
from adadiff.specs import component_specs

H100 = DeviceInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def test_parse_profiles():
    assert parse_profiles("1:4:16") == (BatchProfile(1, 4, 16),)
    assert parse_profiles("9:12:16, 1:4:8") == (BatchProfile(1, 4, 8), BatchProfile(9, 12, 16))
    with pytest.raises(ConfigError, match="overlap"):
        parse_profiles("1:4:8,8:12:16")
    with pytest.raises(ConfigError, match="MIN:OPT:MAX"):
        parse_profiles("1-4-8")
    with pytest.raises(ConfigError, match="MIN:OPT:MAX"):  # one number too many, not a TypeError
        parse_profiles("1:4:8:16")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        parse_profiles("0:4:8")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        parse_profiles("4:2:8")


def test_profile_shapes_come_from_specs():
    specs = component_specs(tiny())
    shapes = profile_shapes(specs["unet"], BatchProfile(1, 4, 16))
    assert shapes["sample"] == ((1, 8, 32, 32), (4, 8, 32, 32), (16, 8, 32, 32))
    assert shapes["timestep"] == ((1,), (4,), (16,))
    dec = profile_shapes(specs["vae_decoder"], BatchProfile(2, 3, 5))
    assert dec["latent"] == ((2, 4, 32, 32), (3, 4, 32, 32), (5, 4, 32, 32))
    mmle = profile_shapes(specs["mmle"], BatchProfile(1, 1, 1))
    assert set(mmle) == {"x0", "lr_latent", "timestep"}


def test_profiles_cover_every_batch_from_one():
    with pytest.raises(ConfigError, match=r"leave batches 5 to 8 uncovered"):
        parse_profiles("1:2:4,9:12:16")
    with pytest.raises(ConfigError, match=r"starts at 2.*single tile.*1:4:8"):
        parse_profiles("2:4:8")
    from adadiff.export.tensorrt_build import BuildOptions

    with pytest.raises(ConfigError, match="uncovered"):
        BuildOptions(profiles=(BatchProfile(1, 2, 4), BatchProfile(6, 8, 8)))
    assert parse_profiles("5:6:8,1:2:4") == (BatchProfile(1, 2, 4), BatchProfile(5, 6, 8))
    with pytest.raises(ConfigError, match="at least one batch profile"):
        BuildOptions(profiles=())


def test_profile_for_picks_the_covering_profile():
    profiles = parse_profiles("1:2:4,5:8:16")
    assert profile_for(profiles, 1) == 0
    assert profile_for(profiles, 4) == 0
    assert profile_for(profiles, 5) == 1
    with pytest.raises(EngineMismatchError, match="--max-batch 16"):
        profile_for(profiles, 17)


def test_engine_key_changes_with_every_input():
    base = dict(
        onnx_sha256="a" * 64,
        tensorrt="10.9.0",
        gpu="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        profiles=(BatchProfile(1, 4, 16),),
        precision="fp16",
    )
    key = engine_key(**base)
    assert key == engine_key(**base)
    for change in (
        {"onnx_sha256": "b" * 64},
        {"tensorrt": "11.0.0"},
        {"compute_capability": "8.9"},
        {"gpu": "NVIDIA H200"},
        {"tf32": True},
        {"profiles": (BatchProfile(1, 8, 16),)},
        {"precision": "fp32"},
    ):
        assert engine_key(**{**base, **change}) != key


def _manifest(tmp_path):
    entry = EngineEntry(
        component="unet",
        file="unet-abc.engine",
        key="abc",
        onnx_sha256="f" * 64,
        precision="fp16",
        profiles=(BatchProfile(1, 4, 16),),
        size=123,
        build_seconds=1.5,
    )
    manifest = EngineManifest(
        tensorrt="10.9.0", device=H100, engines={"unet": entry}, config_digest="xyz"
    )
    save_engine_manifest(manifest, tmp_path / "tensorrt")
    return manifest


def test_manifest_round_trip(tmp_path):
    saved = _manifest(tmp_path)
    loaded = EngineManifest.load(tmp_path / "tensorrt")
    assert loaded == saved
    assert loaded.engines["unet"].max_batch == 16


def test_manifest_refuses_other_tensorrt_or_gpu(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(
        EngineMismatchError, match=r"TensorRT 10\.9\.0.*TensorRT 11\.0\.0.*adadiff build"
    ):
        manifest.check_runtime("11.0.0", H100, tmp_path)
    ada = DeviceInfo(name="NVIDIA L4", compute_capability="8.9")
    with pytest.raises(EngineMismatchError, match=r"compute capability 9\.0.*8\.9.*adadiff build"):
        manifest.check_runtime("10.9.0", ada, tmp_path)
    h200 = DeviceInfo(name="NVIDIA H200", compute_capability="9.0")
    warnings = manifest.check_runtime("10.9.0", h200, tmp_path)
    assert warnings and "H200" in warnings[0]
    assert manifest.check_runtime("10.9.0", H100, tmp_path) == []


def test_manifest_refuses_changed_onnx_and_missing_engines(tmp_path):
    manifest = _manifest(tmp_path)
    assert manifest.check_onnx("unet", "f" * 64, tmp_path).file == "unet-abc.engine"
    with pytest.raises(EngineMismatchError, match="another ONNX file"):
        manifest.check_onnx("unet", "0" * 64, tmp_path)
    with pytest.raises(ModelFolderError, match="--components mmle"):
        manifest.check_onnx("mmle", "f" * 64, tmp_path)
    with pytest.raises(ModelFolderError, match="adadiff build"):
        EngineManifest.load(tmp_path / "elsewhere")
    (tmp_path / "tensorrt" / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ModelFolderError, match="rebuild"):
        EngineManifest.load(tmp_path / "tensorrt")


HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_missing_tensorrt_is_one_line(tmp_path, capsys, monkeypatch):
    from adadiff.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # absent, even where it is installed

    code = main(["build", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "TensorRT is not installed" in err and 'pip install "adadiff[gpu-cu12]"' in err


def test_the_tensorrt_backend_refuses_a_device_other_than_cuda(tmp_path):
    from adadiff.engines.tensorrt import TensorRTBackend

    with pytest.raises(ConfigError, match="runs on CUDA; got --device cpu"):
        TensorRTBackend(tmp_path, device="cpu")


def test_backend_tensorrt_without_library(tmp_path, capsys, photo, monkeypatch):
    from PIL import Image

    from adadiff.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)

    src = tmp_path / "in.png"
    Image.fromarray((photo[:16, :16] * 255).astype(np.uint8)).save(src)
    code = main(
        [
            "upscale",
            str(src),
            "-o",
            str(tmp_path / "o.png"),
            "--backend",
            "tensorrt",
            "--engines",
            str(tmp_path),
            "--device",
            "cuda",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "TensorRT is not installed" in err and 'pip install "adadiff[gpu-cu12]"' in err


gpu = pytest.mark.skipif(
    not (HAVE_TRT and _cuda()),
    reason="needs tensorrt and a CUDA device: "
    + ("tensorrt is not installed" if not HAVE_TRT else "no CUDA device"),
)


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory, tiny_models):
    from adadiff.export import ExportOptions, export_onnx
    from adadiff.export.tensorrt_build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("trt")
    export_onnx(tiny_models, out, ExportOptions())
    build_engines(out, BuildOptions(profiles=(BatchProfile(1, 4, 8),)))
    return out


@pytest.mark.gpu
@gpu
def test_engines_match_torch_at_every_batch(tiny_engines, tiny_models):
    from adadiff.engines.tensorrt import TensorRTBackend
    from adadiff.engines.torch import TorchBackend

    trt_backend = TensorRTBackend(tiny_engines)
    ref = TorchBackend(tiny_models)
    for name, spec in component_specs(tiny_models.config).items():
        engine, torch_engine = trt_backend.open(name), ref.open(name)
        for batch in range(1, 9):
            feeds = spec.sample_inputs(batch, seed=batch)
            (out_name,) = spec.output_names
            got = engine(feeds)[out_name]
            want = torch_engine(feeds)[out_name]
            tol = spec.fp32_tolerance
            np.testing.assert_allclose(
                got,
                want,
                atol=tol.atol * 10,
                rtol=tol.rtol * 10,
                err_msg=f"{name} at batch {batch}",
            )


@pytest.mark.gpu
@gpu
def test_tensorrt_upscale_takes_the_same_steps_as_torch(tiny_engines, tiny_models, photo):
    from adadiff.engines.tensorrt import TensorRTBackend
    from adadiff.engines.torch import TorchBackend
    from adadiff.runtime.upscaler import Upscaler

    img = photo[:32, :32]
    a, ra = Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=8).upscale(img)
    b, rb = Upscaler(tiny_models.config, TensorRTBackend(tiny_engines), max_batch=8).upscale(img)
    assert ra.steps_per_tile == rb.steps_per_tile
    mse = float(np.mean((a - b) ** 2))
    assert 10 * np.log10(1.0 / max(mse, 1e-12)) >= 45


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: [],
        lambda d: None,
        lambda d: {**d, "engines": []},
        lambda d: {**d, "device": "h100"},
        lambda d: {**d, "engines": {"unet": "unet.engine"}},
        lambda d: {**d, "version": 2},  # a later adadiff's
    ],
    ids=["list", "null", "engines-list", "device-string", "engine-string", "version-2"],
)
def test_a_damaged_engine_manifest_reads_as_damaged(tmp_path, edit):
    _manifest(tmp_path)
    path = tmp_path / "tensorrt" / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ModelFolderError, match=r"not a readable engine manifest.*rebuild"):
        EngineManifest.load(tmp_path / "tensorrt")
