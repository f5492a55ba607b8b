"""The TensorRT builder and backend end to end on the CPU, against tests/fake_tensorrt.py.

The double keeps TensorRT's documented contract (return values, None results, profiles, shape
and address order, one current device, live device memory) and runs the graphs with ONNX
Runtime, so these tests exercise the code paths a real GPU run takes.
"""

from __future__ import annotations

import json
import logging
import shutil

import fake_tensorrt as fake
import numpy as np
import pytest
from helpers import copy_export

from adadiff.artifacts import TIMING_CACHE, TRT_DIR, BatchProfile, EngineManifest
from adadiff.errors import ConfigError, EngineMismatchError, OutputPathError
from adadiff.export.manifest import save_export_manifest
from adadiff.export.tensorrt_build import BuildOptions, build_engines
from adadiff.specs import component_specs

TWO_PROFILES = (BatchProfile(1, 2, 2), BatchProfile(3, 4, 6))


@pytest.fixture()
def trt(monkeypatch):
    return fake.install(monkeypatch)


@pytest.fixture()
def export(onnx_dir, tmp_path):
    return copy_export(onnx_dir, tmp_path / "export")


def _build(folder, cuda=None, **options):
    opts = BuildOptions(profiles=options.pop("profiles", TWO_PROFILES), **options)
    return build_engines(folder, opts, cuda=cuda or fake.FakeCuda(0))


def _backend(folder, index=0):
    from adadiff.engines.tensorrt import TensorRTBackend

    return TensorRTBackend(folder, device=f"cuda:{index}", cuda=fake.FakeCuda(index))


def test_build_and_run_match_torch_at_fp32(trt, export, tiny_models):
    from adadiff.engines.torch import TorchBackend

    manifest = _build(export)
    assert all(not e.tf32 for e in manifest.engines.values())
    backend = _backend(export)
    ref = TorchBackend(tiny_models)
    specs = component_specs(tiny_models.config)
    batches = (1, 2, 3, 6, 1)  # both profiles, and back to a batch seen before
    for name, spec in specs.items():
        engine, torch_engine = backend.open(name), ref.open(name)
        (out,) = spec.output_names
        for batch in batches:
            feeds = spec.sample_inputs(batch, seed=batch)
            tol = spec.fp32_tolerance
            np.testing.assert_allclose(
                engine(feeds)[out],
                torch_engine(feeds)[out],
                atol=tol.atol,
                rtol=tol.rtol,
                err_msg=f"{name} at batch {batch}",
            )
    assert fake.STATE.executions == len(specs) * len(batches) and fake.STATE.violations == []
    backend.close()
    assert fake.STATE.violations == []


def test_upscale_takes_the_same_steps_as_torch(trt, export, tiny_models, photo):
    from adadiff.engines.torch import TorchBackend
    from adadiff.runtime.upscaler import Upscaler

    _build(export)
    img = photo[:32, :32]
    a, ra = Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=6).upscale(img)
    backend = _backend(export)
    with pytest.raises(ConfigError, match=r"--max-batch 8 .*batch 1 to 6"):
        Upscaler(backend.config, backend, max_batch=8)
    assert fake.STATE.executions == 0  # refused before anything was encoded
    b, rb = Upscaler(backend.config, backend, max_batch=6).upscale(img)
    assert ra.steps_per_tile == rb.steps_per_tile
    assert float(np.abs(a - b).max()) < 1e-3
    backend.close()
    assert fake.STATE.violations == []


def test_tf32_is_off_unless_asked_for(trt, export):
    manifest = _build(export, components=("pfj",), tf32=True)
    assert manifest.engines["pfj"].tf32
    header_of = json.loads
    blob = (export / TRT_DIR / manifest.engines["pfj"].file).read_bytes()
    n = int.from_bytes(blob[8:16], "little")
    assert header_of(blob[16 : 16 + n])["tf32"] is True
    again = _build(export, components=("pfj",))
    blob = (export / TRT_DIR / again.engines["pfj"].file).read_bytes()
    n = int.from_bytes(blob[8:16], "little")
    assert header_of(blob[16 : 16 + n])["tf32"] is False
    assert again.engines["pfj"].key != manifest.engines["pfj"].key


def test_engines_are_strongly_typed_with_the_workspace_asked_for_and_report_progress(trt, export):
    heard: list[tuple[str, int, int]] = []
    options = BuildOptions(profiles=TWO_PROFILES, components=("pfj",), workspace_gb=1.5)
    manifest = build_engines(
        export, options, cuda=fake.FakeCuda(0), progress=lambda *a: heard.append(a)
    )
    blob = (export / TRT_DIR / manifest.engines["pfj"].file).read_bytes()
    n = int.from_bytes(blob[8:16], "little")
    header = json.loads(blob[16 : 16 + n])
    assert header["strongly_typed"] is True and header["workspace"] == int(1.5 * (1 << 30))
    top = [h for h in heard if h[0] == "build pfj: Building engine"]
    assert top[0][1:] == (0, 2) and top[-1][1:] == (2, 2)  # the top phase, start to end
    assert all(h[0].startswith("build pfj: ") for h in heard)


@pytest.mark.parametrize("failing_call", [1, 2])  # 1: in phase_start, 2: in step_complete
def test_an_exception_in_the_progress_callback_stops_the_build_as_itself(trt, export, failing_call):
    """TensorRT's monitor trampoline prints and drops a Python exception (Ctrl-C while the
    callback runs, a closed stderr): the build must stop with that exception, not go on or end
    as "TensorRT failed to build ... try a larger --workspace"."""
    calls = []

    def progress(stage, done, total):
        calls.append(stage)
        if len(calls) == failing_call:
            raise KeyboardInterrupt

    options = BuildOptions(profiles=TWO_PROFILES, components=("pfj", "mmle"))
    with pytest.raises(KeyboardInterrupt):
        build_engines(export, options, cuda=fake.FakeCuda(0), progress=progress)
    assert len(calls) == failing_call  # cancelled at once: no more progress, no second engine
    assert not (export / TRT_DIR / "manifest.json").exists()


@pytest.mark.parametrize("method", ["phase_start", "step_complete"])
def test_ctrl_c_during_the_build_stops_it_as_a_keyboard_interrupt(trt, export, method):
    """A Ctrl-C that arrives while TensorRT's C++ code runs is raised at the entry of the next
    monitor method, outside any try there: the build must stop with KeyboardInterrupt, not go on
    (phase_start) or end as "TensorRT failed to build ... try a larger --workspace"."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    fake.STATE.sigint_at = method
    options = BuildOptions(profiles=TWO_PROFILES, components=("pfj", "mmle"))
    with pytest.raises(KeyboardInterrupt):
        build_engines(export, options, cuda=fake.FakeCuda(0), progress=lambda *a: None)
    assert fake.STATE.sigint_at is None  # it was delivered
    assert signal.getsignal(signal.SIGINT) is before
    assert not (export / TRT_DIR / "manifest.json").exists()


def test_timing_cache_from_another_gpu_is_left_alone(monkeypatch, export, tmp_path, caplog):
    shared = tmp_path / "shared.cache"
    fake.install(monkeypatch, devices=[("NVIDIA L4", "8.9")])
    other = copy_export(export, tmp_path / "other")
    _build(other, components=("pfj",), timing_cache=shared)
    made_on_l4 = shared.read_bytes()
    fake.install(monkeypatch, devices=[("NVIDIA H100", "9.0")])
    with caplog.at_level(logging.WARNING, logger="adadiff"):
        manifest = _build(export, components=("pfj", "mmle"), timing_cache=shared)
    assert set(manifest.engines) == {"pfj", "mmle"}
    assert "another GPU" in caplog.text
    assert shared.read_bytes() == made_on_l4
    own = export / TRT_DIR / TIMING_CACHE
    assert b"9.0" in own.read_bytes()


def _to_external_data(folder, scale: float) -> None:
    import onnx
    from onnx import numpy_helper

    from adadiff.artifacts import ExportManifest, FileEntry

    manifest = ExportManifest.load(folder)
    entry = manifest.components["unet"]
    path = folder / entry.onnx_file
    model = onnx.load(path)
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * scale, first.name))
    data = f"{path.name}.data"
    (folder / data).unlink(missing_ok=True)
    onnx.save(model, path, save_as_external_data=True, location=data, size_threshold=0)
    files = (FileEntry.of(folder, entry.onnx_file), FileEntry.of(folder, data))
    entry = type(entry)(**{**entry.__dict__, "files": files})
    save_export_manifest(
        type(manifest)(
            **{**manifest.__dict__, "components": {**manifest.components, "unet": entry}}
        ),
        folder,
    )


def test_new_external_weights_rebuild_and_old_engines_go(trt, export):
    _to_external_data(export, 1.0)
    first = _build(export, components=("unet",)).engines["unet"]
    onnx_bytes = (export / "unet.onnx").read_bytes()
    _to_external_data(export, 1.5)  # "retrained": same graph file, other weights
    assert (export / "unet.onnx").read_bytes() == onnx_bytes
    second = _build(export, components=("unet",)).engines["unet"]
    assert second.key != first.key and second.onnx_sha256 != first.onnx_sha256
    assert sorted(p.name for p in (export / TRT_DIR).glob("*.engine")) == [second.file]
    again = _build(export, components=("unet", "pfj"), profiles=(BatchProfile(1, 2, 6),))
    assert sorted(p.name for p in (export / TRT_DIR).glob("*.engine")) == sorted(
        e.file for e in again.engines.values()
    )


def test_cuda_n_builds_and_runs_on_device_n(monkeypatch, export):
    fake.install(monkeypatch, devices=[("NVIDIA L4", "8.9"), ("NVIDIA H100", "9.0")])
    manifest = _build(export, cuda=fake.FakeCuda(1), components=("pfj",))
    assert manifest.device.name == "NVIDIA H100" and manifest.device.compute_capability == "9.0"
    backend = _backend(export, index=1)
    fake.STATE.current = 0  # some other code left device 0 current after the backend started
    engine = backend.open("pfj")
    assert engine.engine._device == 1
    fake.STATE.current = 0
    spec = engine.spec
    out = engine(spec.sample_inputs(2))["modulated"]
    assert out.shape[0] == 2 and fake.STATE.current == 0
    assert backend.describe()["device"] == "cuda:1 (NVIDIA H100)"


@pytest.mark.parametrize("refusal", ["set_shape", "add_optimization_profile"])
def test_refused_profile_is_an_error(trt, export, monkeypatch, refusal):
    """TensorRT refuses a profile in either call: the binding's set_shape raises RuntimeError
    where setDimensions returns false, add_optimization_profile returns -1."""
    import adadiff.export.tensorrt_build as tb

    def inverted(spec, profile):
        return {n: (hi, mid, lo) for n, (lo, mid, hi) in spec.profile(1, 2, 6).items()}

    if refusal == "set_shape":
        monkeypatch.setattr(tb, "profile_shapes", inverted)
    else:
        fake.STATE.faults.add("add_optimization_profile")
    with pytest.raises(EngineMismatchError, match="rejected optimisation profile"):
        _build(export, components=("pfj",))


def test_refused_profile_selection_and_shapes_are_errors(trt, export):
    _build(export, components=("pfj", "mmle"))
    backend = _backend(export)
    engine = backend.open("pfj")
    fake.STATE.faults.add("set_input_shape")
    with pytest.raises(EngineMismatchError, match="refused shape"):
        engine(engine.spec.sample_inputs(3))
    fake.STATE.faults.clear()
    assert engine(engine.spec.sample_inputs(3))["modulated"].shape[0] == 3
    before = len(backend._contexts)
    fake.STATE.faults.add("set_optimization_profile_async")
    with pytest.raises(EngineMismatchError, match="refused optimisation profile 0"):
        backend.open("mmle")
    assert len(backend._contexts) == before  # the refused context is not kept alive
    # a name that is no component is refused as such, not sent to re-export "--components decoder"
    with pytest.raises(ConfigError, match="unknown component 'decoder'; expected one of"):
        backend.open("decoder")


def test_a_context_or_buffer_that_fails_at_open_leaves_the_backend_usable(trt, export, monkeypatch):
    _build(export, components=("pfj", "mmle"))
    backend = _backend(export)
    real_create = fake.ICudaEngine.create_execution_context
    calls = []

    def none_once(self, *args):
        calls.append(1)
        return None if len(calls) == 1 else real_create(self, *args)

    monkeypatch.setattr(fake.ICudaEngine, "create_execution_context", none_once)
    with pytest.raises(EngineMismatchError, match="could not create an execution context"):
        backend.open("pfj")
    assert backend._contexts == []  # no None on the scratch list
    monkeypatch.setattr(fake.ICudaEngine, "create_execution_context", real_create)
    real_dtype = fake.ICudaEngine.get_tensor_dtype
    monkeypatch.setattr(fake.ICudaEngine, "get_tensor_dtype", lambda self, name: 99)
    with pytest.raises(EngineMismatchError):
        backend.open("pfj")
    assert backend._contexts == []  # the contexts made before the buffers failed are gone
    monkeypatch.setattr(fake.ICudaEngine, "get_tensor_dtype", real_dtype)
    mmle = backend.open("mmle")  # the scratch grows over the contexts still listed: none broken
    assert mmle(mmle.spec.sample_inputs(2))["scores"].shape[0] == 2
    backend.close()
    assert fake.STATE.violations == []


def test_a_failed_second_profile_releases_the_first_context(trt, export, monkeypatch):
    from adadiff.engines.tensorrt import TensorRTEngine

    _build(export, components=("pfj",))
    backend = _backend(export)
    real = TensorRTEngine._context

    def second_fails(self, index):
        if index == 1:
            raise EngineMismatchError("refused optimisation profile 1")
        return real(self, index)

    monkeypatch.setattr(TensorRTEngine, "_context", second_fails)
    with pytest.raises(EngineMismatchError, match="profile 1"):
        backend.open("pfj")
    assert backend._contexts == [] and backend._engines == []
    backend.close()
    assert fake.STATE.violations == []


def test_output_shape_other_than_the_spec_is_an_error(trt, export):
    _build(export, components=("pfj",))
    engine = _backend(export).open("pfj")
    (out,) = engine.spec.output_names
    dims = engine.engine._header["output_dims"][out]
    engine.engine._header["output_dims"][out] = [*dims[:-1], dims[-1] * 2]  # another tile size
    with pytest.raises(EngineMismatchError, match=rf"output {out} of pfj as \(3, .*spec expects"):
        engine(engine.spec.sample_inputs(3))
    engine.engine._header["output_dims"][out] = dims
    assert engine(engine.spec.sample_inputs(3))[out].shape[0] == 3


def test_make_backend_checks_the_engines_against_the_run(trt, export, monkeypatch):
    """--backend tensorrt: the CPU default means the first GPU, and a precision, tile size or
    model other than the export's is refused before any engine loads."""
    import adadiff.engines.tensorrt as backend_module
    from adadiff.config import RunSettings
    from adadiff.engines import make_backend

    monkeypatch.setattr(backend_module, "CudaDevice", lambda device: fake.FakeCuda(0))
    _build(export, components=("pfj",))
    config, backend = make_backend(RunSettings(backend="tensorrt", engines=export))
    assert config.tile_size == backend.config.tile_size and backend.cuda.index == 0
    tile = config.tile_size
    refused = [
        (dict(precision="fp16"), ConfigError, r"holds a fp32 export; pass --precision fp32"),
        (dict(tile_size=tile // 2), ConfigError, rf"take {tile} px tiles, not --tile {tile // 2}"),
        (dict(model="sd21-base"), EngineMismatchError, "not the model these ONNX files"),
    ]
    for change, error, message in refused:
        with pytest.raises(error, match=message):
            make_backend(RunSettings(backend="tensorrt", engines=export, **change))


def test_the_backends_max_batch_is_what_every_engine_takes(trt, export):
    _build(export, components=("pfj",))  # TWO_PROFILES: up to 6
    _build(export, components=("mmle",), profiles=(BatchProfile(1, 4, 8),))
    backend = _backend(export)
    assert {e.max_batch for e in backend.manifest.engines.values()} == {6, 8}
    assert backend.max_batch == 6


def test_input_shapes_are_set_only_when_the_batch_changes(trt, export, monkeypatch):
    _build(export, components=("pfj",))
    engine = _backend(export).open("pfj")
    batches = []
    real = fake.IExecutionContext.set_input_shape

    def counted(ctx, name, shape):
        batches.append(shape[0])
        return real(ctx, name, shape)

    monkeypatch.setattr(fake.IExecutionContext, "set_input_shape", counted)
    for batch in (2, 2, 1, 2):  # all in the first profile
        assert engine(engine.spec.sample_inputs(batch))["modulated"].shape[0] == batch
    assert batches == [2, 2, 1, 1, 2, 2]  # two inputs each time the batch changes


def test_a_shape_refused_part_way_is_set_again_on_the_next_call(trt, export, monkeypatch):
    """TensorRT took the first input's new shape and refused the second's: the next call at the
    old batch must set both again, not trust the context's shapes."""
    _build(export, components=("pfj",))
    engine = _backend(export).open("pfj")
    assert engine(engine.spec.sample_inputs(1))["modulated"].shape[0] == 1
    real = fake.IExecutionContext.set_input_shape
    with monkeypatch.context() as refusing:
        refusing.setattr(
            fake.IExecutionContext,
            "set_input_shape",
            lambda ctx, name, shape: name != "gain" and real(ctx, name, shape),
        )
        with pytest.raises(EngineMismatchError, match=r"refused shape .* input gain"):
            engine(engine.spec.sample_inputs(2))
    assert engine(engine.spec.sample_inputs(1))["modulated"].shape[0] == 1


def test_engine_must_match_its_manifest(trt, export):
    manifest = _build(export, components=("pfj", "mmle"))
    folder = export / TRT_DIR
    data = json.loads((folder / "manifest.json").read_text())
    data["engines"]["pfj"]["profiles"] = [[1, 2, 3], [4, 4, 6]]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match=r"profile 0 covers batches 1 to 2.*1:2:3"):
        _backend(export).open("pfj")
    data["engines"]["pfj"]["profiles"] = [[1, 2, 6]]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="2 optimisation profiles, the manifest lists 1"):
        _backend(export).open("pfj")
    data["engines"]["pfj"]["profiles"] = [[1, 2, 2], [3, 4, 6]]
    shutil.copy(folder / manifest.engines["mmle"].file, folder / manifest.engines["pfj"].file)
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match=r"takes \['lr_latent', 'timestep', 'x0'\]"):
        _backend(export).open("pfj")


def test_an_engine_with_other_outputs_is_refused(trt, export, monkeypatch):
    _build(export, components=("pfj",))
    real = fake.ICudaEngine.__init__

    def renamed(engine, *args):  # the inputs of pfj, the output of another graph
        real(engine, *args)
        out = fake.TensorIOMode.OUTPUT
        engine._io = [("scores" if m == out else n, m, t) for n, m, t in engine._io]

    monkeypatch.setattr(fake.ICudaEngine, "__init__", renamed)
    with pytest.raises(EngineMismatchError, match=r"gives \['scores'\]; the pfj spec expects"):
        _backend(export).open("pfj")


def test_close_releases_contexts_before_the_scratch(trt, export):
    _build(export)
    backend = _backend(export)
    small = backend.open("pfj")  # the scratch grows when the UNet opens
    big = backend.open("unet")
    assert big.engine.device_memory_size_v2 > small.engine.device_memory_size_v2
    small(small.spec.sample_inputs(2))
    big(big.spec.sample_inputs(2))
    assert fake.STATE.violations == []
    backend.close()
    assert fake.STATE.violations == []
    with pytest.raises(EngineMismatchError, match="was closed"):
        small(small.spec.sample_inputs(1))


def test_closing_one_engine_lets_go_of_its_contexts(trt, export):
    _build(export)
    backend = _backend(export)
    small, big = backend.open("pfj"), backend.open("unet")
    theirs = {id(c) for c in small.contexts}
    assert theirs <= {id(c) for c in backend._contexts}
    small.close()
    assert not theirs & {id(c) for c in backend._contexts}  # nothing keeps its engine alive
    assert len(backend._contexts) == len(big.contexts)
    assert big(big.spec.sample_inputs(2))["noise_pred"].shape[0] == 2
    backend.close()
    assert fake.STATE.violations == []


def test_a_timing_cache_file_that_is_not_one_is_left_alone(trt, export, tmp_path, caplog):
    shared = tmp_path / "shared.cache"
    shared.write_bytes(b"not a timing cache")
    with caplog.at_level(logging.WARNING, logger="adadiff"):
        manifest = _build(export, components=("pfj",), timing_cache=shared)
    assert set(manifest.engines) == {"pfj"}
    assert "not a timing" in caplog.text
    assert shared.read_bytes() == b"not a timing cache"
    assert (export / TRT_DIR / TIMING_CACHE).is_file()


def test_open_does_not_hash_unchanged_files(trt, export, monkeypatch):
    import adadiff.artifacts

    _build(export, components=("unet",))
    hashed = []
    real = adadiff.artifacts.sha256_file
    monkeypatch.setattr(adadiff.artifacts, "sha256_file", lambda p: hashed.append(p) or real(p))
    backend = _backend(export)
    backend.open("unet")
    assert hashed == []
    path = export / "unet.onnx"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1  # same size, other content, new mtime
    path.write_bytes(bytes(blob))
    with pytest.raises(EngineMismatchError, match="changed since export"):
        _backend(export).open("unet")
    assert hashed


def test_a_missing_exported_file_is_refused_with_the_commands_that_fix_it(trt, export):
    _build(export, components=("pfj",))
    backend = _backend(export)
    (export / "pfj.onnx").unlink()
    with pytest.raises(EngineMismatchError, match=r"pfj\.onnx is missing; re-export .* rebuild"):
        backend.open("pfj")


def test_missing_shape_or_address_fails_in_the_double(trt, export):
    manifest = _build(export, components=("pfj",))
    runtime = fake.Runtime(fake.Logger())
    engine = runtime.deserialize_cuda_engine(
        (export / TRT_DIR / manifest.engines["pfj"].file).read_bytes()
    )
    ctx = engine.create_execution_context()
    assert ctx.set_optimization_profile_async(1, 0)
    assert not ctx.set_tensor_address("lr_latent", 1234)  # shape first
    assert not ctx.set_input_shape("lr_latent", (1, 4, 32, 32))  # batch 1 is in profile 0
    assert ctx.set_input_shape("lr_latent", (3, 4, 32, 32))
    assert ctx.get_tensor_shape("modulated")[0] == -1  # gain's shape is not set yet
    assert not ctx.execute_async_v3(0)
    assert fake.Runtime(fake.Logger()).deserialize_cuda_engine(b"not an engine") is None
    EngineManifest.load(export / TRT_DIR)  # still readable


def test_build_cli_refuses_a_bad_device(capsys, export):
    from adadiff.cli import main

    code = main(["build", str(export), "--device", "gpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device gpu " in err
    # "cpu" is upscale's default, read as the first GPU there; a build was silently on cuda:0
    code = main(["build", str(export), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "built on a GPU; give cuda or cuda:N" in err


@pytest.mark.parametrize("workspace", ["nan", "inf", "-1"])
def test_build_cli_refuses_a_workspace_that_is_not_a_positive_number(capsys, tmp_path, workspace):
    from adadiff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(tmp_path), f"--workspace={workspace}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--workspace" in err
    with pytest.raises(ConfigError, match="--workspace must be positive"):
        BuildOptions(workspace_gb=float(workspace))


def test_components_that_name_none_are_refused():
    with pytest.raises(ConfigError, match="--components names none"):
        BuildOptions(components=())


def test_an_export_folder_that_cannot_be_written_is_one_clear_error(trt, export):
    (export / TRT_DIR).write_text("a file where the engines folder goes")
    with pytest.raises(
        OutputPathError, match=r"cannot write the engines into .*move the file .* away"
    ):
        _build(export, components=("pfj",))


def test_a_failed_build_keeps_the_engines_built_before_it(trt, export, monkeypatch):
    import adadiff.export.tensorrt_build as tb

    real = tb._build_one
    calls: list[str] = []

    def failing_on_mmle(trt_module, builder, logger, onnx_path, *rest):
        calls.append(onnx_path.name)
        if onnx_path.name == "mmle.onnx" and calls.count("mmle.onnx") == 1:
            raise EngineMismatchError("TensorRT failed to build mmle.onnx")
        return real(trt_module, builder, logger, onnx_path, *rest)

    monkeypatch.setattr(tb, "_build_one", failing_on_mmle)
    with pytest.raises(EngineMismatchError, match="mmle"):
        _build(export, components=("pfj", "mmle"))
    assert set(EngineManifest.load(export / TRT_DIR).engines) == {"pfj"}
    manifest = _build(export, components=("pfj", "mmle"))
    assert calls == ["pfj.onnx", "mmle.onnx", "mmle.onnx"]  # pfj was not built again
    assert set(manifest.engines) == {"pfj", "mmle"}


def test_a_timing_cache_that_cannot_be_written_is_refused_first(trt, export, tmp_path):
    with pytest.raises(ConfigError, match=r"--timing-cache .* existing folder"):
        BuildOptions(timing_cache=tmp_path / "nosuchdir" / "cache.bin")
    with pytest.raises(ConfigError, match="existing folder"):
        BuildOptions(timing_cache=tmp_path)


def test_a_timing_cache_write_failure_keeps_the_engine(trt, export, monkeypatch, caplog):
    import adadiff.export.tensorrt_build as tb

    real = tb.write_bytes_atomic

    def no_cache(path, data):
        if path.name == TIMING_CACHE:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(tb, "write_bytes_atomic", no_cache)
    with caplog.at_level(logging.WARNING, logger="adadiff"):
        manifest = _build(export, components=("pfj",))
    assert set(manifest.engines) == {"pfj"} and "disk full" in caplog.text
    assert (export / TRT_DIR / manifest.engines["pfj"].file).is_file()


def test_two_builds_into_one_folder_are_refused(trt, export):
    """A second build would save a manifest without the first one's engines and delete them."""
    from adadiff.errors import OutputPathError
    from adadiff.export.tensorrt_build import BUILD_LOCK
    from adadiff.locks import folder_lock

    with (
        folder_lock(export / TRT_DIR / BUILD_LOCK, RuntimeError),
        pytest.raises(OutputPathError, match=r"being built into by process \d+"),
    ):
        _build(export, components=("pfj",))
    assert not (export / TRT_DIR / "manifest.json").exists()
    assert sorted(_build(export, components=("pfj",)).engines) == ["pfj"]  # released after
