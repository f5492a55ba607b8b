"""The ONNX Runtime backend against the torch reference: per component, end to end, and errors."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from helpers import copy_export
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from adadiff import Upscaler
from adadiff.artifacts import MANIFEST_FILE
from adadiff.config import RunSettings
from adadiff.engines import make_backend
from adadiff.engines.onnxruntime import OnnxRuntimeBackend, OrtOptions, open_onnxruntime
from adadiff.engines.torch import TorchBackend
from adadiff.errors import (
    BackendUnavailableError,
    ConfigError,
    EngineMismatchError,
    ModelFolderError,
)
from adadiff.export.verify import compare
from adadiff.presets import tiny
from adadiff.specs import COMPONENTS, component_specs

# fp16 export against the fp32 torch image on this crop measured 89 dB (both schedules, same
# steps); with every op in fp16 (no fp32 timestep/softmax/norm statistics) adaptive fell to 48 dB
# and two tiles took other step counts. 70 dB keeps a clear margin and still catches that.
FP16_MIN_PSNR = 70.0


@pytest.fixture(scope="session")
def ort_backend(onnx_dir) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(onnx_dir)


@pytest.fixture(scope="session")
def torch_backend(tiny_models) -> TorchBackend:
    return TorchBackend(tiny_models)


class EngineRunner(BaseRunner):
    """A Polygraphy runner around any adadiff engine, so Comparator can drive both backends."""

    def __init__(self, engine, name: str) -> None:
        super().__init__(name=name)
        self.engine = engine

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for t in self.engine.spec.inputs:
            meta.add(t.name, np.float32, [d if isinstance(d, int) else -1 for d in t.shape])
        return meta

    def infer_impl(self, feed_dict):
        out = self.engine(feed_dict)
        self.inference_time = 0.0
        return OrderedDict((k, np.array(v)) for k, v in out.items())


def _feeds(spec, batches=(1, 3, 5)):
    # sample_inputs draws a different timestep for every tile of a batch.
    return [spec.sample_inputs(b, seed=10 + b) for b in batches]


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_parity_at_batch_1_3_5(component, ort_backend, torch_backend):
    ort_engine = ort_backend.open(component)
    torch_engine = torch_backend.open(component)
    spec = ort_engine.spec
    feeds = _feeds(spec)
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(
            [EngineRunner(ort_engine, "onnxruntime"), EngineRunner(torch_engine, "torch")],
            data_loader=feeds,
        )
        tol = spec.fp32_tolerance
        assert Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=tol.atol, rtol=tol.rtol)
        )
    (_, ort_runs), (_, torch_runs) = results.items()
    for batch_feeds, got, want in zip(feeds, ort_runs, torch_runs, strict=True):
        (name,) = spec.output_names
        batch = len(next(iter(batch_feeds.values())))
        assert got[name].shape[0] == batch
        # Stricter than Polygraphy's either-or: |got - want| <= atol + rtol |want| everywhere.
        ok, err, _ = compare(got[name], want[name], tol)
        assert ok, f"{component} at batch {batch}: max error {err}"


def test_io_binding_gives_the_same_result(onnx_dir, ort_backend):
    bound = OnnxRuntimeBackend(onnx_dir, options=OrtOptions(io_binding=True, intra_op_threads=1))
    feeds = _feeds(ort_backend.open("mmle").spec, (3,))[0]
    want = ort_backend.open("mmle")(feeds)["scores"]
    got = bound.open("mmle")(feeds)["scores"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert bound.describe()["threads"] == 1
    assert bound.open("mmle").io_binding and not ort_backend.open("mmle").io_binding  # CPU: off


def test_io_binding_leaves_the_outputs_on_the_sessions_gpu():
    """On CUDA the outputs are bound on the session's device, not copied through the host."""
    from adadiff.engines.onnxruntime import CPU, CUDA, OrtEngine, Placement

    spec = component_specs(tiny())["pfj"]
    bound: list[tuple] = []

    class Binding:
        def bind_cpu_input(self, name, array):
            pass

        def bind_output(self, name, device, device_id):
            bound.append((name, device, device_id))

        def copy_outputs_to_cpu(self):
            return [np.zeros((2, *spec.outputs[0].shape[1:]), np.float32)]

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            pass

    engine = OrtEngine(Session(), spec, Placement("cuda", 1, (CUDA, CPU)), io_binding=True)
    assert engine(spec.sample_inputs(2))["modulated"].shape[0] == 2
    assert bound == [("modulated", "cuda", 1)]


def test_session_options_are_checked_when_made():
    with pytest.raises(ConfigError, match=r"thread counts must be >= 0 .*got 0/-1"):
        OrtOptions(inter_op_threads=-1)
    with pytest.raises(ConfigError, match=r"thread counts must be >= 0 .*got -2/0"):
        OrtOptions(intra_op_threads=-2)
    with pytest.raises(ConfigError, match=r"graph_optimization must be one of .*'max'"):
        OrtOptions(graph_optimization="max")
    with pytest.raises(ConfigError, match="1 <= min <= opt <= max"):
        OrtOptions(trt_batch=(4, 2, 8))


def test_an_unknown_component_is_refused_by_name(ort_backend):
    with pytest.raises(ConfigError, match=r"unknown component 'decoder'; expected one of"):
        ort_backend.open("decoder")


def test_end_to_end_matches_torch(onnx_dir, tiny_dir, photo):
    crop = photo[:48, :48]
    reference = Upscaler.from_pretrained(tiny_dir, backend="torch")
    runtime = Upscaler.from_pretrained(tiny_dir, backend="onnxruntime", engines=onnx_dir)
    want, want_report = reference.upscale(crop, schedule="adaptive", seed=3)
    got, got_report = runtime.upscale(crop, schedule="adaptive", seed=3)
    assert got_report.tiles == 4
    assert got_report.steps_per_tile == want_report.steps_per_tile
    assert got_report.exits == want_report.exits
    mse = float(np.mean((got.astype(np.float64) - want) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-20))
    assert psnr >= 45.0, psnr
    described = got_report.backend
    assert described["backend"] == "onnxruntime" and described["precision"] == "fp32"
    assert set(described["providers"].values()) == {"CPUExecutionProvider"}


def test_upscale_cli_with_onnxruntime(onnx_dir, photo, tmp_path, capsys):
    from PIL import Image

    from adadiff.cli import main

    src = tmp_path / "in.png"
    Image.fromarray((photo[:32, :32] * 255).round().astype(np.uint8)).save(src)
    out = tmp_path / "out.png"
    report = tmp_path / "report.json"
    argv = ["upscale", str(src), "-o", str(out), "-q", "--report", str(report)]
    assert main([*argv, "--backend", "onnxruntime", "--engines", str(onnx_dir)]) == 0
    assert Image.open(out).size == (128, 128)
    assert json.loads(report.read_text())["backend"]["backend"] == "onnxruntime"
    capsys.readouterr()
    assert main([*argv, "--backend", "onnxruntime"]) == 2
    assert "needs --engines" in capsys.readouterr().err
    assert main([*argv, "--backend", "onnxruntime", "--engines", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_model_and_precision_must_match_the_export(onnx_dir, tiny_dir, tmp_path, tiny_models):
    config, backend = open_onnxruntime(onnx_dir)  # the folder alone is enough
    assert config == backend.config and config.name == "tiny"
    open_onnxruntime(onnx_dir, model=tiny_dir)
    folder = tiny_models.save(tmp_path / "model")
    open_onnxruntime(onnx_dir, model=folder)
    # the same config with other weights (a folder retrained in place) is refused too
    from adadiff.artifacts import ExportManifest, weights_digest
    from adadiff.models.bundle import build_random

    assert ExportManifest.load(onnx_dir).model_weights == weights_digest(tiny_dir)

    other = build_random(tiny_models.config, seed=9).save(tmp_path / "retrained")
    with pytest.raises(EngineMismatchError, match=r"--model .*retrained has other weights"):
        open_onnxruntime(onnx_dir, model=other)
    with pytest.raises(EngineMismatchError, match=r"--model sd21-base .* is not the model"):
        open_onnxruntime(onnx_dir, model="sd21-base")
    with pytest.raises(EngineMismatchError, match="pass --precision fp32"):
        make_backend(
            RunSettings(
                model=tiny_dir,
                backend="onnxruntime",
                engines=onnx_dir,
                precision="fp16",
                max_batch=16,
            )
        )
    with pytest.raises(EngineMismatchError, match="128 px tiles"):
        make_backend(
            RunSettings(
                model=tiny_dir, backend="onnxruntime", engines=onnx_dir, tile_size=256, max_batch=16
            )
        )
    config, _ = make_backend(
        RunSettings(
            model=tiny_dir, backend="onnxruntime", engines=onnx_dir, tile_overlap=64, max_batch=16
        )
    )
    assert config.tile_overlap == 64


def test_a_retrained_model_folder_gets_a_command_that_pastes(onnx_dir, tmp_path, tiny_models):
    """A model path with a space: the re-export command in the error is one argument, quoted."""
    import shlex

    from adadiff.models.bundle import build_random

    other = build_random(tiny_models.config, seed=9).save(tmp_path / "my model")
    with pytest.raises(EngineMismatchError, match="has other weights") as err:
        open_onnxruntime(onnx_dir, model=str(other))
    command = str(err.value).split("`")[1]
    assert shlex.split(command)[:4] == ["adadiff", "export", "--model", str(other)]


def _export_of_a_copy(onnx_dir: Path, tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny folder and a copy of its export that names the copy as its model."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_dir, source)
    folder = copy_export(onnx_dir, tmp_path / "export")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["model"] = str(source)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return source, folder


def test_other_weights_are_called_retrained_only_in_the_exported_folder(
    onnx_dir, tiny_dir, tmp_path, tiny_models
):
    """The export's own model folder with changed weights was retrained; another folder of the
    same config (a copy, a preset's shipped weights) is another model, not a retrained one."""
    import shutil

    from adadiff.models.bundle import build_random

    source, folder = _export_of_a_copy(onnx_dir, tiny_dir, tmp_path)
    open_onnxruntime(folder, model=source)
    other = build_random(tiny_models.config, seed=9).save(tmp_path / "other")
    with pytest.raises(EngineMismatchError, match="another model of the same config; export it"):
        open_onnxruntime(folder, model=other)
    shutil.rmtree(source)
    build_random(tiny_models.config, seed=9).save(source)
    with pytest.raises(EngineMismatchError, match="retrained or edited since; export it again"):
        open_onnxruntime(folder, model=source)


def test_a_model_folder_calibrated_since_its_export_is_told_to_export_again(
    onnx_dir, tiny_dir, tmp_path
):
    """adadiff calibrate rewrites the adadiff.json of the folder an export was made from: the
    error says that folder changed, not that it is another model than itself."""
    import shutil
    from dataclasses import replace

    from adadiff.config import ModelConfig
    from adadiff.training.cli import write_calibration

    source, folder = _export_of_a_copy(onnx_dir, tiny_dir, tmp_path)
    cfg = ModelConfig.load(source)
    write_calibration(source, replace(cfg, dtss=replace(cfg.dtss, tau=0.002)), {})
    with pytest.raises(EngineMismatchError) as err:
        open_onnxruntime(folder, model=source)
    message = str(err.value)
    assert "is the folder these ONNX files were exported from" in message
    assert "adadiff.json was changed since" in message and "is not the model" not in message
    assert f"adadiff export --model {source} -o FOLDER" in message
    other = tmp_path / "other"
    shutil.copytree(source, other)  # the same edit in another folder is another model
    with pytest.raises(EngineMismatchError, match="is not the model these ONNX files"):
        open_onnxruntime(folder, model=other)


def test_changed_or_missing_files_are_refused(onnx_dir, tmp_path):
    folder = copy_export(onnx_dir, tmp_path / "copy")
    data = bytearray((folder / "pfj.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "pfj.onnx").write_bytes(bytes(data))
    backend = OnnxRuntimeBackend(folder)
    backend.open("mmle")  # untouched files still open
    with pytest.raises(EngineMismatchError, match=r"pfj\.onnx changed since export.*re-export"):
        backend.open("pfj")
    (folder / "mmle.onnx").unlink()
    with pytest.raises(EngineMismatchError, match=r"mmle\.onnx is missing"):
        OnnxRuntimeBackend(folder, options=OrtOptions()).open("mmle")

    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edited = json.loads(json.dumps(manifest))
    edited["config"]["tile_overlap"] += 8
    (folder / MANIFEST_FILE).write_text(json.dumps(edited))
    with pytest.raises(EngineMismatchError, match="manifest was edited"):
        OnnxRuntimeBackend(folder)
    del manifest["components"]["pfj"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="--components pfj"):
        OnnxRuntimeBackend(folder).open("pfj")


def test_the_re_export_advice_of_an_fp16_export_keeps_it_fp16(onnx_dir, tmp_path):
    """The command in the error must not turn an fp16 export into an fp32 one, which
    `upscale --precision fp16` then refuses."""
    folder = copy_export(onnx_dir, tmp_path / "half")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["precision"] = "fp16"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    (folder / "pfj.onnx").write_bytes(b"not the exported file")
    with pytest.raises(EngineMismatchError, match=r"pfj\.onnx has .* -o \S+ --precision fp16`"):
        OnnxRuntimeBackend(folder).open("pfj")
    manifest["components"]["pfj"]["spec"]["fp16_tolerance"]["atol"] = 0.5
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=r"fp16_tolerance .* --precision fp16`"):
        OnnxRuntimeBackend(folder)
    manifest["version"] = 0  # an older adadiff's export
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=r"manifest version 0.* --precision fp16`"):
        OnnxRuntimeBackend(folder)


def test_an_export_of_another_spec_names_what_differs(onnx_dir, tmp_path):
    """An older adadiff's export whose tolerance or output differs: the error names that part,
    not the (identical) inputs of both."""
    folder = copy_export(onnx_dir, tmp_path / "older")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["components"]["vae_decoder"]["spec"]["fp32_tolerance"]["atol"] = 0.5
    manifest["components"]["pfj"]["spec"]["outputs"][0]["name"] = "renamed"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=r"vae_decoder .*fp32_tolerance \{'atol': 0\.5"):
        OnnxRuntimeBackend(folder)
    del manifest["components"]["vae_decoder"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=r"pfj .*outputs \[\{'name': 'renamed'") as err:
        OnnxRuntimeBackend(folder)
    assert "inputs" not in str(err.value) and "re-export" in str(err.value)


def test_an_export_without_a_weights_digest_still_runs_with_its_model(onnx_dir, tiny_dir):
    """An older adadiff's manifest records no weights digest: its config digest is all there is
    to check, so the model folder it names is not refused for "other weights"."""
    import dataclasses

    from adadiff.artifacts import ExportManifest

    older = dataclasses.replace(ExportManifest.load(onnx_dir), model_weights="")
    older.check_model(older.model_config(), str(tiny_dir), tiny_dir)


def test_an_export_listing_an_unknown_component_is_refused(onnx_dir, tmp_path):
    folder = copy_export(onnx_dir, tmp_path / "newer")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["components"]["upsampler"] = manifest["components"]["pfj"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=r"unknown component 'upsampler'.*re-export"):
        OnnxRuntimeBackend(folder)


def test_missing_onnxruntime_says_how_to_install(onnx_dir, tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r'pip install "adadiff\[onnx\]"'):
        make_backend(
            RunSettings(model=tiny_dir, backend="onnxruntime", engines=onnx_dir, max_batch=16)
        )


def test_devices_and_provider_fallback(onnx_dir, monkeypatch):
    with pytest.raises(ConfigError, match="--device gpu "):
        OnnxRuntimeBackend(onnx_dir, device="gpu")
    with pytest.raises(ConfigError, match="--device cpu:1 "):
        OnnxRuntimeBackend(onnx_dir, device="cpu:1")
    import onnxruntime as ort

    with monkeypatch.context() as cpu_wheel:  # the CPU wheel's providers, also under -gpu
        cpu_wheel.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
        with pytest.raises(
            BackendUnavailableError, match=r"CUDAExecutionProvider.*onnxruntime-gpu"
        ):
            OnnxRuntimeBackend(onnx_dir, device="cuda")

    real_session = ort.InferenceSession
    asked: dict = {}

    def quietly_on_cpu(path, options, providers, provider_options):
        asked["providers"] = providers
        asked["options"] = provider_options
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(ort, "InferenceSession", quietly_on_cpu)
    with pytest.raises(BackendUnavailableError, match="fell back"):
        OnnxRuntimeBackend(onnx_dir, device="cuda:1").open("pfj")
    assert asked["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert asked["options"][0] == {
        "device_id": 1,
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": 0,
    }
    with pytest.raises(BackendUnavailableError, match="fell back"):
        OnnxRuntimeBackend(onnx_dir, device="tensorrt").open("unet")
    trt = asked["options"][0]
    assert trt["trt_profile_min_shapes"] == "sample:1x8x32x32,timestep:1"
    assert trt["trt_profile_max_shapes"] == "sample:16x8x32x32,timestep:16"


def test_fp16_export_end_to_end(onnx_dir, tiny_dir, photo, tmp_path):
    """fp16 UNet and PFJ (VAE and MMLE fp32) on ONNX Runtime CPU against the fp32 torch image."""
    from adadiff.export import ExportOptions, export_onnx

    folder = copy_export(onnx_dir, tmp_path / "fp16")
    options = ExportOptions(components=("unet", "pfj", "mmle"), precision="fp16")
    export_onnx(tiny_dir, folder, options)
    crop = photo[:48, :48]
    reference = Upscaler.from_pretrained(tiny_dir, backend="torch")
    half = Upscaler.from_pretrained(
        tiny_dir, backend="onnxruntime", engines=folder, precision="fp16"
    )
    for schedule in ("uniform", "adaptive"):
        want, want_report = reference.upscale(crop, schedule=schedule, seed=3)
        got, got_report = half.upscale(crop, schedule=schedule, seed=3)
        mse = float(np.mean((got.astype(np.float64) - want) ** 2))
        psnr = 10 * np.log10(1.0 / max(mse, 1e-20))
        print(
            f"fp16 {schedule}: PSNR {psnr:.1f} dB, steps {got_report.steps_per_tile} "
            f"vs {want_report.steps_per_tile}"
        )
        assert psnr >= FP16_MIN_PSNR, (schedule, psnr)
    assert got_report.backend["precision"] == "fp16"


def test_tensorrt_provider_follows_the_export_and_max_batch(onnx_dir, tiny_config, monkeypatch):
    import dataclasses

    import onnxruntime as ort

    from adadiff.artifacts import ExportManifest
    from adadiff.runtime.upscaler import Upscaler

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    backend = OnnxRuntimeBackend(onnx_dir, device="tensorrt", max_batch=32)
    assert backend.max_batch == 32
    chosen = dict(backend._provider_options("unet"))
    trt = chosen["TensorrtExecutionProvider"]
    assert trt["trt_profile_max_shapes"] == "sample:32x8x32x32,timestep:32"
    assert trt["trt_profile_opt_shapes"] == "sample:4x8x32x32,timestep:4"
    assert OnnxRuntimeBackend(onnx_dir, device="tensorrt", max_batch=2).trt_batch == (1, 2, 2)
    assert chosen["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "HEURISTIC"
    with pytest.raises(ConfigError, match=r"--max-batch 33 .*batch 1 to 32.*--max-batch 32"):
        Upscaler(backend.config, backend, max_batch=33)
    assert OnnxRuntimeBackend(onnx_dir, device="cuda", max_batch=32).max_batch is None

    # A re-export (other weights: other sha256 in the manifest) gets its own TensorRT EP cache.
    manifest = ExportManifest.load(onnx_dir)
    unet = manifest.components["unet"]
    files = tuple(dataclasses.replace(f, sha256="0" * 64) for f in unet.files)
    changed = dataclasses.replace(
        manifest, components={**manifest.components, "unet": dataclasses.replace(unet, files=files)}
    )
    again = OnnxRuntimeBackend(onnx_dir, device="tensorrt", max_batch=32, manifest=changed)
    cache = backend.trt_cache_dir("unet")
    assert again.trt_cache_dir("unet") != cache
    assert again.trt_cache_dir("pfj") == backend.trt_cache_dir("pfj")
    assert (
        OnnxRuntimeBackend(onnx_dir, device="tensorrt", max_batch=16).trt_cache_dir("unet") != cache
    )
    assert trt["trt_engine_cache_path"] == str(cache)
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        OrtOptions(cudnn_conv_algo_search="exhaustive")


def test_a_damaged_decoder_is_found_before_any_tile_is_encoded(onnx_dir, tmp_path, photo):
    from adadiff.runtime.upscaler import Upscaler

    folder = copy_export(onnx_dir, tmp_path / "copy")
    with (folder / "vae_decoder.onnx").open("ab") as fp:
        fp.write(b"\0")
    up = Upscaler.from_pretrained(backend="onnxruntime", engines=folder, threads=1)
    stages: list[str] = []
    with pytest.raises(EngineMismatchError, match=r"vae_decoder\.onnx has"):
        up.upscale(photo[:16, :16], progress=lambda stage, *_: stages.append(stage))
    assert stages == []  # the decoder used to fail after the whole denoise
    up.close()
