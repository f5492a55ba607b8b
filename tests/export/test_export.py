"""adadiff export: files, graph I/O, clean-up, manifest, fp16, options and errors."""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

import onnx
import onnxruntime as ort
import torch
from helpers import copy_export

from adadiff.artifacts import MANIFEST_FILE, ExportManifest, sha256_file
from adadiff.errors import ConfigError, EngineMismatchError, ModelFolderError, OutputPathError
from adadiff.export import ExportOptions, export_onnx
from adadiff.export.fp16 import convert_to_fp16
from adadiff.export.onnx_export import file_opset
from adadiff.export.pipeline import LOCK_FILE
from adadiff.export.verify import compare
from adadiff.specs import COMPONENTS, Tolerance, component_specs


@pytest.fixture(scope="session")
def manifest(onnx_dir) -> ExportManifest:
    return ExportManifest.load(onnx_dir)


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_manifest_records_the_export(onnx_dir, manifest, tiny_config):
    assert sorted(manifest.components) == sorted(COMPONENTS)
    assert manifest.config_digest == tiny_config.digest()
    assert manifest.model_config() == tiny_config
    assert (manifest.precision, manifest.opset, manifest.exporter) == ("fp32", 20, "dynamo")
    assert {"torch", "onnx", "onnxruntime", "polygraphy", "onnx_graphsurgeon"} <= set(
        manifest.libraries
    )
    for name, entry in manifest.components.items():
        assert entry.onnx_file == f"{name}.onnx"
        for f in entry.files:
            assert sha256_file(onnx_dir / f.path) == f.sha256
        assert entry.spec == json.loads(json.dumps(entry.spec))  # plain JSON
        assert 0 < entry.nodes["cleaned"] <= entry.nodes["exported"]
        assert entry.check["batches"] == [1, 3] and entry.check["tolerance_used"] <= 1.0
    unet = manifest.components["unet"].nodes
    assert unet["cleaned"] < unet["exported"]  # folding removes shape arithmetic
    manifest.verify_files(onnx_dir)
    manifest.check_specs(onnx_dir)


def test_graph_io_follows_the_spec(onnx_dir, tiny_config):
    specs = component_specs(tiny_config)
    for name, spec in specs.items():
        model = onnx.load(str(onnx_dir / f"{name}.onnx"), load_external_data=False)
        graph = model.graph
        assert [v.name for v in graph.input] == list(spec.input_names)
        assert [v.name for v in graph.output] == list(spec.output_names)
        for value, tensor in zip(
            (*graph.input, *graph.output), (*spec.inputs, *spec.outputs), strict=True
        ):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert _dims(value) == list(tensor.shape), (name, value.name)
    unet = onnx.load(str(onnx_dir / "unet.onnx"), load_external_data=False)
    assert _dims(unet.graph.input[1]) == ["B"]  # timestep: float32 [B], never a scalar
    decoder = onnx.load(str(onnx_dir / "vae_decoder.onnx"), load_external_data=False)
    assert _dims(decoder.graph.input[0]) == ["B", 4, "h", "w"]
    assert _dims(decoder.graph.output[0]) == ["B", 3, "4h", "4w"]


def test_unet_file_runs_at_any_batch(onnx_dir, tiny_models):
    spec = component_specs(tiny_models.config)["unet"]
    session = ort.InferenceSession(str(onnx_dir / "unet.onnx"), providers=["CPUExecutionProvider"])
    wrapper = tiny_models.wrappers()["unet"]
    for batch in (1, 3, 5, 16):
        feeds = spec.sample_inputs(batch, seed=batch)
        assert len(set(feeds["timestep"].tolist())) > 1 or batch == 1
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
        ok, err, _ = compare(got, want, spec.fp32_tolerance)
        assert got.shape == (batch, 4, 32, 32) and ok, (batch, err)


def test_decoder_file_takes_any_latent_size(onnx_dir, tiny_models):
    spec = component_specs(tiny_models.config)["vae_decoder"]
    session = ort.InferenceSession(
        str(onnx_dir / "vae_decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = spec.sample_inputs(2, h=8, w=24)
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        want = tiny_models.wrappers()["vae_decoder"](torch.from_numpy(feeds["latent"])).numpy()
    assert got.shape == (2, 3, 32, 96)
    assert compare(got, want, spec.fp32_tolerance)[0]


def test_fp16_pass_keeps_time_softmax_and_norms_in_fp32(onnx_dir, tiny_models):
    half = onnx.load(str(onnx_dir / "unet.onnx"))
    report = convert_to_fp16(half)
    onnx.checker.check_model(half)
    inferred = onnx.shape_inference.infer_shapes(half)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    fp32 = onnx.TensorProto.FLOAT
    kept = {"Softmax", "InstanceNormalization", "LayerNormalization", "Sin", "Cos"}
    seen = set()
    for node in inferred.graph.node:
        if node.op_type in kept:
            seen.add(node.op_type)
            assert all(types[i] == fp32 for i in node.input if i), node.name
        if node.op_type == "Conv":
            assert types[node.input[1]] == onnx.TensorProto.FLOAT16, node.name
    assert seen == kept
    assert report.fp16_nodes > report.fp32_nodes and report.clipped_weights == 0
    assert [v.type.tensor_type.elem_type for v in half.graph.input] == [fp32, fp32]
    assert half.graph.output[0].type.tensor_type.elem_type == fp32

    spec = component_specs(tiny_models.config)["unet"]
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = spec.sample_inputs(3, seed=7)
    (got,) = session.run(None, feeds)
    wrapper = tiny_models.wrappers()["unet"]
    with torch.no_grad():
        want = wrapper(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
    ok, err, _ = compare(got, want, spec.fp16_tolerance)
    assert ok, err


def test_fp16_export_keeps_the_vae_fp32_and_reuses_it(onnx_dir, tiny_dir, tmp_path, caplog):
    out = copy_export(onnx_dir, tmp_path / "fp16")
    vae_hash = ExportManifest.load(out).components["vae_encoder"].files[0].sha256
    options = ExportOptions(components=("pfj", "mmle"), precision="fp16")
    with caplog.at_level(logging.WARNING, logger="adadiff.export"):
        manifest = export_onnx(tiny_dir, out, options)
    assert manifest.precision == "fp16"
    assert {n: c.precision for n, c in manifest.components.items()} == {
        "unet": "fp16",
        "vae_encoder": "fp32",
        "vae_decoder": "fp32",
        "pfj": "fp16",
        "mmle": "fp32",
    }  # the fp32 UNet of the earlier export is not an fp16 UNet: exported again, with a word
    assert "unet in" in caplog.text and "are fp32 exports (this one is fp16)" in caplog.text
    unet = onnx.load(str(out / "unet.onnx")).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in unet)
    assert manifest.components["vae_encoder"].files[0].sha256 == vae_hash
    weights = onnx.load(str(out / "pfj.onnx")).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    pfj = component_specs(manifest.model_config())["pfj"]
    assert pfj.fp16_tolerance.atol != pfj.fp32_tolerance.atol
    assert manifest.components["pfj"].check["atol"] == pfj.fp16_tolerance.atol  # checked at it
    mmle = onnx.load(str(out / "mmle.onnx")).graph.initializer
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in mmle)  # fp32 at every precision
    manifest.verify_files(out)


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 18), ("dynamo", 20)])
def test_exporters_and_external_data(exporter, opset, tmp_path, tiny_models):
    out = tmp_path / exporter
    options = ExportOptions(
        components=("pfj",), exporter=exporter, opset=opset, external_data_threshold=0
    )
    manifest = export_onnx(tiny_models, out, options, progress=lambda *a: None)
    entry = manifest.components["pfj"]
    assert (manifest.exporter, manifest.opset) == (exporter, opset)
    assert file_opset(out / "pfj.onnx") == opset  # the file says what the manifest says
    assert [f.path for f in entry.files] == ["pfj.onnx", "pfj.onnx.data"]
    assert entry.check["max_abs_error"] <= 1e-4  # ONNX Runtime read the external data
    mode = (out / "pfj.onnx").stat().st_mode
    assert (out / "pfj.onnx.data").stat().st_mode == mode
    # Written again inline, the stale data file goes and the manifest follows.
    options = ExportOptions(components=("pfj",), exporter=exporter, opset=opset)
    manifest = export_onnx(tiny_models, out, options)
    assert [f.path for f in manifest.components["pfj"].files] == ["pfj.onnx"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, MANIFEST_FILE, "pfj.onnx"]


def test_progress_reaches_the_total(tmp_path, tiny_models):
    seen: list[tuple[str, int, int]] = []
    export_onnx(
        tiny_models,
        tmp_path / "p",
        ExportOptions(components=("mmle",), check_batches=()),
        progress=lambda *a: seen.append(a),
    )
    assert seen[0] == ("export", 0, 4) and seen[-1] == ("export", 4, 4)


def test_options_and_output_errors(tmp_path):
    with pytest.raises(ConfigError, match="not all known"):
        ExportOptions(components=("unet", "text_encoder"))
    with pytest.raises(ConfigError, match="twice"):
        ExportOptions(components=("pfj", "pfj"))
    with pytest.raises(ConfigError, match="precision"):
        ExportOptions(precision="int8")
    with pytest.raises(ConfigError, match="exporter"):
        ExportOptions(exporter="tf2onnx")
    with pytest.raises(ConfigError, match="opset 21 is outside"):
        ExportOptions(exporter="torchscript", opset=21)
    with pytest.raises(
        ConfigError, match=r"opset 17 is outside .* dynamo exporter writes \(18\.\.23\)"
    ):
        ExportOptions(exporter="dynamo", opset=17)  # onnxscript would write 18 and say 17
    with pytest.raises(ConfigError, match="batch sizes"):
        ExportOptions(check_batches=(0,))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="not empty"):
        export_onnx("tiny", busy, ExportOptions(components=("pfj",)))
    with pytest.raises(OutputPathError, match="is a file"):
        export_onnx("tiny", busy / "holiday.jpg", ExportOptions(components=("pfj",)))
    with pytest.raises(ModelFolderError, match="does not exist"):
        export_onnx(tmp_path / "nope", tmp_path / "out", ExportOptions(components=("pfj",)))


def test_missing_parent_folders_of_the_output_are_created(tmp_path, tiny_models):
    # README's `adadiff export --model tiny -o runs/tiny-onnx` on a checkout without runs/
    out = tmp_path / "runs" / "deep" / "tiny-onnx"
    export_onnx(tiny_models, out, ExportOptions(components=("mmle",), check_batches=()))
    assert sorted(ExportManifest.load(out).components) == ["mmle"]
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputPathError, match=r"plain is not a folder; pick another"):
        export_onnx(tiny_models, tmp_path / "plain" / "o", ExportOptions(components=("mmle",)))
    broken = tmp_path / "broken"  # a link to nothing: mkdir raised FileExistsError, a traceback
    broken.symlink_to(tmp_path / "nowhere")
    for target in (broken / "sub" / "o", broken):
        with pytest.raises(OutputPathError, match=r"broken (is not a folder|\()"):
            export_onnx(tiny_models, target, ExportOptions(components=("mmle",)))


def test_a_file_written_at_another_opset_than_asked_is_refused(tmp_path, tiny_models, monkeypatch):
    """The manifest records the opset asked for, so an exporter that wrote another must fail."""
    import adadiff.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "file_opset", lambda path: 19)
    options = ExportOptions(components=("mmle",), check_batches=())
    with pytest.raises(ConfigError, match=r"wrote mmle at opset 19, not the 20 asked for"):
        export_onnx(tiny_models, tmp_path / "out", options)


def test_export_cli(tmp_path, capsys):
    from adadiff.cli import export_main, main

    out = tmp_path / "cli"
    assert export_main(["--model", "tiny", "-o", str(out), "--components", "pfj,mmle", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "pfj fp32" in printed and "--backend onnxruntime" not in printed  # it cannot run yet
    assert sorted(ExportManifest.load(out).components) == ["mmle", "pfj"]
    command = printed.strip().splitlines()[-1].split("an upscale needs every component: ")[1]
    assert command.startswith("adadiff export ")
    assert export_main([*shlex.split(command)[2:], "-q", "--check-batches", "none"]) == 0
    assert "Run it with: adadiff upscale IMAGE" in capsys.readouterr().out
    assert sorted(ExportManifest.load(out).components) == sorted(COMPONENTS)
    assert main(["export", "-o", str(tmp_path / "x"), "--components", "unet,clip"]) == 2
    assert "clip" in capsys.readouterr().err
    assert main(["export", "-o", str(tmp_path / "x"), "--check-batches", "one"]) == 2
    assert "--check-batches" in capsys.readouterr().err


def test_runtime_does_not_import_export():
    import subprocess
    import sys

    code = (
        "import sys, adadiff.engines.onnxruntime, adadiff.artifacts, adadiff.runtime.upscaler;"
        "print([m for m in ('adadiff.export', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_manifest_refuses_foreign_or_damaged_files(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text("{")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        ExportManifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelFolderError, match="not an adadiff ONNX manifest"):
        ExportManifest.load(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match=r"no manifest\.json"):
        ExportManifest.load(empty)
    with pytest.raises(ModelFolderError, match="does not exist"):
        ExportManifest.load(tmp_path / "nowhere")
    # a command to paste into a shell quotes a path with a space
    spaced = tmp_path / "no such"
    with pytest.raises(ModelFolderError, match=re.escape(f"-o '{spaced}'`")):
        ExportManifest.load(spaced)
    # --engines given the manifest itself rather than its folder
    with pytest.raises(ModelFolderError, match=rf"is a file; --engines takes .*{tmp_path.name}"):
        ExportManifest.load(tmp_path / MANIFEST_FILE)


def test_an_edited_manifest_reads_as_damaged_not_as_a_traceback(onnx_dir, tmp_path):
    good = json.loads((onnx_dir / MANIFEST_FILE).read_text())
    first = next(iter(good["components"]))

    def edited(change) -> Path:
        data = json.loads(json.dumps(good))
        change(data)
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
        return tmp_path

    cases = [
        (lambda d: d.update(components=list(d["components"])), "'components' must map"),
        (lambda d: d["components"][first].update(spec={}), f"{first!r} has no 'spec'"),
        (lambda d: d["components"][first].update(files="x.onnx"), "must list its files"),
        (lambda d: d.update(config=[1]), "'config' must be the model's adadiff.json"),
        (lambda d: d["components"][first].update(files=[]), f"{first!r} lists no files"),
        (lambda d: d["components"][first].update(precision="int8"), "precision 'int8'"),
    ]
    for change, message in cases:
        with pytest.raises(ModelFolderError, match=f"is damaged.*{message}"):
            ExportManifest.load(edited(change))
    manifest = ExportManifest.load(edited(lambda d: d["config"].pop("tile_size")))
    with pytest.raises(EngineMismatchError, match=r"config in the export's manifest\.json"):
        manifest.model_config()


def test_a_partial_export_keeps_no_component_of_other_weights(onnx_dir, tiny_config, tmp_path):
    """Exporting one component of another model into a folder exports the rest of the earlier
    export again from this model, instead of listing its files as this model's (same config,
    other weights) or leaving a folder that cannot run."""
    from adadiff.export.pipeline import weights_digest
    from adadiff.models.bundle import build_random

    out = copy_export(onnx_dir, tmp_path / "mixed")
    old = ExportManifest.load(out)
    other = build_random(tiny_config, seed=5)
    manifest = export_onnx(other, out, ExportOptions(components=("pfj",), check_batches=()))
    assert sorted(manifest.components) == sorted(COMPONENTS)
    wrappers = other.wrappers()
    for name, entry in manifest.components.items():
        assert entry.weights == weights_digest(wrappers[name]) != old.components[name].weights
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE, LOCK_FILE, *(f"{n}.onnx" for n in COMPONENTS)]
    )
    manifest.verify_files(out)


def test_a_partial_export_redoes_a_kept_component_whose_files_changed(
    onnx_dir, tiny_models, tmp_path, caplog
):
    """An export killed after moving some new files in, before its manifest: the manifest
    still names the old files. A partial export must not keep such a component and report a
    folder that cannot run."""
    out = copy_export(onnx_dir, tmp_path / "torn")
    unet = out / "unet.onnx"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="adadiff"):
        manifest = export_onnx(
            tiny_models, out, ExportOptions(components=("pfj",), check_batches=())
        )
    manifest.verify_files(out)
    assert "unet" in caplog.text and "changed since the manifest was written" in caplog.text


def test_a_partial_export_redoes_a_kept_component_of_another_spec(
    onnx_dir, tiny_models, tmp_path, caplog
):
    """A component exported by an adadiff whose spec differed (an output renamed, a tolerance
    changed) is refused by the runtime; a partial export must export it again rather than keep
    it and print a folder that cannot run."""
    out = copy_export(onnx_dir, tmp_path / "older")
    data = json.loads((out / MANIFEST_FILE).read_text())
    data["components"]["vae_decoder"]["spec"]["fp32_tolerance"]["atol"] *= 10
    (out / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="vae_decoder"):
        ExportManifest.load(out).check_specs(out)
    with caplog.at_level(logging.WARNING, logger="adadiff"):
        manifest = export_onnx(
            tiny_models, out, ExportOptions(components=("pfj",), check_batches=())
        )
    ExportManifest.load(out).check_specs(out)
    manifest.verify_files(out)
    assert "vae_decoder" in caplog.text and "other inputs, outputs or tolerances" in caplog.text


def test_an_export_killed_midway_is_cleaned_up_and_two_at_once_are_refused(tiny_models, tmp_path):
    from adadiff.locks import folder_lock

    out = tmp_path / "killed"
    out.mkdir()
    left = out / ".export-9wcfv0gh" / "raw" / "unet"  # a staging folder SIGKILL left behind
    left.mkdir(parents=True)
    (left / "unet.onnx.data").write_bytes(b"half a UNet")
    options = ExportOptions(components=("pfj",), check_batches=())
    export_onnx(tiny_models, out, options)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, MANIFEST_FILE, "pfj.onnx"]
    busy = pytest.raises(OutputPathError, match=r"being exported into by process \d+")
    with folder_lock(out / LOCK_FILE, RuntimeError), busy:  # another export holds the folder
        export_onnx(tiny_models, out, options)
    assert export_onnx(tiny_models, out, options).components["pfj"].weights != ""


def test_an_export_stopped_while_moving_its_files_in_can_be_run_again(
    tiny_models, tmp_path, monkeypatch
):
    """Ctrl-C after the first file is in place and before manifest.json: the folder holds
    adadiff's own files without a manifest, and the same command must then export over them."""
    from adadiff.export import pipeline

    out = tmp_path / "stopped"
    options = ExportOptions(components=("pfj", "mmle"), check_batches=())
    entry = pipeline.component_entry
    calls: list[str] = []

    def stop_at_the_second(folder: Path, spec, files: list[str], **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return entry(folder, spec, files, **kwargs)

    monkeypatch.setattr(pipeline, "component_entry", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_models, out, options)
    assert not (out / MANIFEST_FILE).exists() and (out / "pfj.onnx").is_file()
    monkeypatch.setattr(pipeline, "component_entry", entry)
    export_onnx(tiny_models, out, ExportOptions(components=("mmle",), check_batches=()))
    # the pfj file no manifest lists is gone with the rest of the stopped export
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, MANIFEST_FILE, "mmle.onnx"]
    ExportManifest.load(out).verify_files(out)


def test_a_folder_the_lock_cannot_be_written_in_is_one_line(tiny_models, tmp_path, monkeypatch):
    """A read-only OUTPUT (root writes anyway, hence the stand-in) or a folder where the lock
    file goes: an OutputPathError saying what to do, not a PermissionError traceback."""
    from adadiff import locks

    options = ExportOptions(components=("pfj",), check_batches=())
    blocked = tmp_path / "blocked"
    (blocked / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(OutputPathError, match=r"Is a directory\); remove the folder .*lock"):
        export_onnx(tiny_models, blocked, options)

    def read_only(path: Path, mode: str) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(locks, "open", read_only, raising=False)
    out = tmp_path / "read-only"
    with pytest.raises(OutputPathError, match=r"Permission denied\); make .*read-only writable"):
        export_onnx(tiny_models, out, options)


def test_a_folder_where_an_export_file_goes_is_refused_before_exporting(tiny_models, tmp_path):
    out = tmp_path / "blocked-file"
    options = ExportOptions(components=("pfj",), check_batches=())
    export_onnx(tiny_models, out, options)
    (out / "pfj.onnx").unlink()
    (out / "pfj.onnx").mkdir()
    with pytest.raises(OutputPathError, match=r"pfj\.onnx is a folder where .* move it away"):
        export_onnx(tiny_models, out, options)


def test_a_foreign_manifest_is_not_overwritten(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / MANIFEST_FILE).write_text(json.dumps({"name": "my web app"}))
    (site / "index.html").write_text("<html></html>")
    with pytest.raises(OutputPathError, match="not an adadiff export's"):
        export_onnx("tiny", site, ExportOptions(components=("pfj",)))
    assert json.loads((site / MANIFEST_FILE).read_text()) == {"name": "my web app"}


def test_a_damaged_manifest_of_an_export_can_be_exported_over(tiny_models, tmp_path):
    """Loading it says to export again; that export must not then refuse the folder."""
    out = tmp_path / "damaged"
    options = ExportOptions(components=("pfj",), check_batches=())
    export_onnx(tiny_models, out, options)
    (out / MANIFEST_FILE).write_text("{")
    with pytest.raises(ModelFolderError, match=r"not valid JSON.*adadiff export"):
        ExportManifest.load(out)
    export_onnx(tiny_models, out, options)
    assert sorted(ExportManifest.load(out).components) == ["pfj"]


def test_a_partial_export_names_every_missing_component(tiny_models, tmp_path):
    out = tmp_path / "partial"
    export_onnx(tiny_models, out, ExportOptions(components=("pfj",), check_batches=()))
    manifest = ExportManifest.load(out)
    with pytest.raises(ModelFolderError) as raised:
        manifest.entry("unet", out)
    assert "--components unet,vae_encoder,vae_decoder,mmle`" in str(raised.value)


def test_folding_keeps_onnx_runtime_warnings_off_stderr(tiny_models, tmp_path, capfd):
    """onnx-graphsurgeon folds through ONNX Runtime, which warns on the torchscript graphs."""
    options = ExportOptions(components=("vae_decoder",), exporter="torchscript", check_batches=())
    export_onnx(tiny_models, tmp_path / "ts", options)
    assert "onnxruntime" not in capfd.readouterr().err


@pytest.mark.parametrize("path", ["/tmp/victim.txt", "../victim.txt", "sub/victim.txt"])
def test_manifest_file_paths_stay_inside_the_folder(onnx_dir, tiny_models, tmp_path, path):
    out = copy_export(onnx_dir, tmp_path / "copied")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    data = json.loads((out / MANIFEST_FILE).read_text())
    target = str(victim) if path.startswith("/") else path
    data["components"]["mmle"]["files"].append({"path": target, "size": 7, "sha256": "0" * 64})
    (out / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="expected a plain file name"):
        ExportManifest.load(out)
    export_onnx(tiny_models, out, ExportOptions(components=("pfj",), check_batches=()))
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("name", ["", ".", "..", "..\\victim.txt", "C:\\victim.txt"])
def test_a_manifest_file_name_is_a_plain_name_on_every_system(name):
    """A Windows separator or a bare ".." leads out of the folder as a "/" does."""
    from adadiff.artifacts import FileEntry

    with pytest.raises(ConfigError, match="expected a plain file name"):
        FileEntry(path=name, size=0, sha256="0" * 64)


def test_the_parity_tolerance_is_relative_to_torchs_answer():
    """compare's ratio is |got - want| / (atol + rtol |want|): the reference (torch) sets the
    scale, and an error of exactly the tolerance is within it."""
    ok, err, ratio = compare(np.array([2.0]), np.array([1.0]), Tolerance(atol=0.0, rtol=0.6))
    assert not ok and err == 1.0 and ratio == pytest.approx(1 / 0.6)
    assert compare(np.array([1.5]), np.array([1.0]), Tolerance(atol=0.5, rtol=0.0))[0]
    assert not compare(np.array([np.nan]), np.array([1.0]), Tolerance(atol=1.0, rtol=1.0))[0]


def test_the_parity_check_refuses_a_graph_that_differs_from_torch(onnx_dir, tiny_models):
    """An export whose numbers or batch axis are wrong never counts as done."""
    from torch import nn

    from adadiff.export.verify import check_against_torch

    spec = component_specs(tiny_models.config)["pfj"]
    module = tiny_models.wrappers()["pfj"]
    path = onnx_dir / "pfj.onnx"
    tol = spec.fp32_tolerance
    checked = check_against_torch(path, module, spec, batches=(1, 3), tolerance=tol)
    assert checked["atol"] == tol.atol

    class Off(nn.Module):  # torch and the file disagree by a hundredth
        def forward(self, *args):
            return module(*args) + 0.01

    differs = r"differs from torch at batch 1.*not trustworthy"
    with pytest.raises(EngineMismatchError, match=differs):
        check_against_torch(path, Off(), spec, batches=(1, 3), tolerance=tol)

    class FirstOnly(nn.Module):  # as a graph whose batch was frozen at 1 would answer
        def forward(self, *args):
            return module(*args)[:1]

    with pytest.raises(EngineMismatchError, match="did not keep its batch axis dynamic"):
        check_against_torch(path, FirstOnly(), spec, batches=(3,), tolerance=tol)
