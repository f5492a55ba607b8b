from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from adadiff.config import ModelConfig
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.presets import preset, sd21_base, tiny
from adadiff.specs import component_specs


def test_import_adadiff_is_light():
    code = (
        "import sys, adadiff, adadiff.runtime, adadiff.engines, adadiff.specs, adadiff.config;"
        "print([m for m in ('torch', 'onnxruntime', 'tensorrt', 'diffusers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_round_trip(tmp_path):
    cfg = tiny()
    cfg.save(tmp_path)
    back = ModelConfig.load(tmp_path)
    assert back == cfg
    assert back.digest() == cfg.digest()
    data = json.loads((tmp_path / "adadiff.json").read_text())
    assert [m["name"] for m in data["mmle"]["metrics"]] == [m.name for m in cfg.mmle.metrics]
    assert data["dtss"]["tiers"] == [5, 10, 15, 20]
    # mmle.reference: "input" by default (its digest rule: tests/runtime/test_policy.py)
    assert data["mmle"]["reference"] == "input"
    hr = replace(cfg, mmle=replace(cfg.mmle, reference="hr"))
    (tmp_path / "hr").mkdir()
    hr.save(tmp_path / "hr")
    assert ModelConfig.load(tmp_path / "hr").mmle.reference == "hr"
    assert hr.mmle.psnr_index is None and cfg.mmle.psnr_index is not None


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("sd15")
    with pytest.raises(ConfigError, match="mmle reference"):
        replace(tiny().mmle, reference="truth")
    with pytest.raises(ConfigError, match="multiple"):
        tiny().with_tiling(102, 32)
    with pytest.raises(ConfigError, match="missing"):
        ModelConfig.load(tmp_path)
    (tmp_path / "adadiff.json").write_text("{")
    with pytest.raises(ConfigError, match="JSON"):
        ModelConfig.load(tmp_path)


def test_sd21_shapes_follow_the_config():
    specs = component_specs(sd21_base())
    assert specs["unet"].inputs[0].shape == ("B", 8, 64, 64)
    assert specs["vae_encoder"].inputs[0].shape == ("B", 3, 512, 512)
    assert specs["mmle"].outputs[0].shape == ("B", 6)
    assert specs["unet"].profile(1, 4, 16)["timestep"] == ((1,), (4,), (16,))
    tiny_specs = component_specs(tiny())
    assert tiny_specs["unet"].inputs[0].shape == ("B", 8, 32, 32)


def test_model_folder_round_trip_and_errors(tmp_path, tiny_models):
    import torch

    from adadiff.models.bundle import load_folder

    tiny_models.save(tmp_path / "m")
    loaded = load_folder(tmp_path / "m")
    for a, b in zip(
        tiny_models.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(loaded.text_embedding, tiny_models.text_embedding)
    (tmp_path / "m" / "mmle.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"mmle\.safetensors"):
        load_folder(tmp_path / "m")


def test_damaged_or_mismatched_weights_name_the_file_and_tensor(tmp_path, tiny_models, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from adadiff.cli import main
    from adadiff.models.bundle import TEXT_EMBEDDING, WEIGHTS, load_folder

    good = tmp_path / "good"
    tiny_models.save(good)

    def variant(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    cut = variant("cut")
    data = (cut / "unet" / WEIGHTS).read_bytes()
    (cut / "unet" / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelFolderError, match=r"unet/diffusion_pytorch_model\.safetensors is not a readable"
    ):
        load_folder(cut)

    short = variant("short")
    state = load_file(str(short / "pfj.safetensors"))
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(short / "pfj.safetensors"))
    with pytest.raises(ModelFolderError, match=rf"pfj\.safetensors does not match.*{dropped}"):
        load_folder(short)

    wider = variant("wider")
    cfg = json.loads((wider / "adadiff.json").read_text())
    cfg["unet"]["block_out_channels"] = [2 * c for c in cfg["unet"]["block_out_channels"]]
    (wider / "adadiff.json").write_text(json.dumps(cfg))
    diffusers_cfg = json.loads((wider / "unet" / "config.json").read_text())
    diffusers_cfg["block_out_channels"] = cfg["unet"]["block_out_channels"]
    (wider / "unet" / "config.json").write_text(json.dumps(diffusers_cfg))
    with pytest.raises(ModelFolderError, match=r"unet/diffusion_pytorch_model\.safetensors"):
        load_folder(wider)

    text = variant("text")
    save_file({"embedding": torch.zeros(3, 5)}, str(text / TEXT_EMBEDDING))
    with pytest.raises(ModelFolderError, match=r"text_embedding\.safetensors must hold.*\(3, 5\)"):
        load_folder(text)

    src = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (90, 120, 60)).save(src)
    code = main(["upscale", str(src), "-o", str(tmp_path / "o.png"), "--model", str(cut)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a readable" in err
    assert not (tmp_path / "o.png").exists()


def test_unknown_backend_names_the_choices():
    from adadiff.config import RunSettings

    with pytest.raises(ConfigError, match=r"unknown backend 'trt'; choose one of .*tensorrt"):
        RunSettings(backend="trt")


def test_pfj_starts_as_identity(tiny_models):
    import torch

    lr = torch.randn(3, 4, 8, 8)
    gain = torch.randn(3, 2)
    assert torch.equal(tiny_models.pfj(lr, gain), lr)


@pytest.mark.slow
def test_sd21_base_random_init_runs_one_unet_call():
    import numpy as np

    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import build_random

    models = build_random(sd21_base())
    n = sum(p.numel() for p in models.unet.parameters())
    assert 850e6 < n < 880e6  # SD-2.1 UNet: about 865M parameters
    unet = TorchBackend(models).open("unet")
    feeds = unet.spec.sample_inputs(1)
    out = unet(feeds)["noise_pred"]
    assert out.shape == (1, 4, 64, 64) and np.isfinite(out).all()


def _extras() -> dict[str, set[str]]:
    """Distribution names of each optional-dependency group in pyproject.toml, with the groups
    an extra names (``adadiff[onnx,test]``) expanded."""
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]

    def names(extra: str) -> set[str]:
        found: set[str] = set()
        for line in groups[extra]:
            req = Requirement(line)
            if req.name == project["name"]:
                for inner in req.extras:
                    found |= names(inner)
            else:
                found.add(req.name.lower())
        return found

    return {extra: names(extra) for extra in groups}


@pytest.mark.parametrize(
    ("extra", "cuda", "other"), [("gpu-cu12", "12", "13"), ("gpu-cu13", "13", "12")]
)
def test_gpu_extras_name_one_onnxruntime_and_their_own_tensorrt(extra, cuda, other):
    extras = _extras()
    deps = extras[extra]
    assert {d for d in deps if d.startswith("onnxruntime")} == {"onnxruntime-gpu"}
    assert {d for d in deps if d.startswith("tensorrt")} == {f"tensorrt-cu{cuda}"}
    assert f"tensorrt-cu{other}" not in deps and "tensorrt" not in deps
    # GPU developers install ".[gpu-cuXX,test]": one ONNX Runtime module provider in all.
    combined = deps | extras["test"]
    assert {d for d in combined if d.startswith("onnxruntime")} == {"onnxruntime-gpu"}


def test_dev_extra_has_the_cpu_onnxruntime_only():
    extras = _extras()
    assert "gpu" not in extras  # the old extra resolved `tensorrt` to the newest CUDA's wheels
    assert {d for d in extras["dev"] if d.startswith("onnxruntime")} == {"onnxruntime"}
    assert not any(d.startswith("tensorrt") for d in extras["dev"])
    assert {"pytest", "ruff", "onnx", "polygraphy"} <= extras["dev"]
