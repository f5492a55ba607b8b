"""Loading a model folder: what adadiff.json and the diffusers configs beside it must agree on,
and which --model names a preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adadiff.cli import main
from adadiff.config import CONFIG_FILE, ModelConfig
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.models.bundle import load_folder, load_models
from adadiff.presets import SHIPPED, is_preset, model_config, model_folder


@pytest.fixture
def folder(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_bad_diffusers_block_in_adadiff_json_is_a_model_folder_error(folder: Path) -> None:
    _edit(folder / CONFIG_FILE, lambda d: d["unet"].update(attention_head_dims=4))
    with pytest.raises(ModelFolderError, match=r"'unet' block .* UNet2DConditionModel"):
        load_folder(folder)


def test_the_cli_says_it_in_one_line(folder: Path, tmp_path: Path, capsys) -> None:
    _edit(folder / CONFIG_FILE, lambda d: d["unet"].update(down_block_types=["DownBlock2D"]))
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert main(["upscale", str(image), "-o", str(tmp_path / "o.png"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "'unet' block" in err and "Traceback" not in err


def test_a_diffusers_config_that_disagrees_with_adadiff_json_is_refused(folder: Path) -> None:
    # norm_eps changes no tensor's shape, so the weights alone cannot tell
    on_disk = json.loads((folder / "unet" / "config.json").read_text())["norm_eps"]
    _edit(folder / CONFIG_FILE, lambda d: d["unet"].update(norm_eps=on_disk * 10))
    with pytest.raises(ModelFolderError, match="norm_eps"):
        load_folder(folder)


def test_a_vae_config_that_disagrees_with_adadiff_json_is_refused(folder: Path) -> None:
    # the activation changes what the decoder computes, not any tensor's shape
    _edit(folder / "vae" / "config.json", lambda d: d.update(act_fn="gelu"))
    with pytest.raises(ModelFolderError, match=r"vae/config.json disagrees .*act_fn: 'gelu'"):
        load_folder(folder)


def test_a_diffusers_config_with_keys_adadiff_json_lacks_loads(folder: Path) -> None:
    # bookkeeping keys (starting with "_") describe no layer, and a field this diffusers does
    # not know (written by another version) is none it builds from
    _edit(
        folder / "unet" / "config.json",
        lambda d: d.update(_use_default_values=["norm_eps"], _diffusers_version="0.20.0", new=1),
    )
    assert load_folder(folder).unet.config.in_channels == 8


def test_a_diffusers_config_that_is_not_an_object_is_refused(folder: Path) -> None:
    (folder / "unet" / "config.json").write_text("[]")
    with pytest.raises(ModelFolderError, match="should hold a JSON object"):
        load_folder(folder)


def test_without_the_diffusers_configs_adadiff_json_decides(folder: Path) -> None:
    (folder / "unet" / "config.json").unlink()
    (folder / "vae" / "config.json").unlink()
    assert load_folder(folder).unet.config.in_channels == 8


def test_two_scaling_factors_must_agree(folder: Path) -> None:
    _edit(folder / CONFIG_FILE, lambda d: d["vae"].update(scaling_factor=0.5))
    with pytest.raises(ConfigError, match=r"vae\.scaling_factor"):
        ModelConfig.load(folder)


def test_a_pipeline_folder_is_pointed_at_convert(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="adadiff convert-sd21"):
        ModelConfig.load(tmp_path)


def test_a_folder_named_like_a_preset_is_not_silently_the_preset(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(folder, work / "tiny")
    monkeypatch.chdir(work)
    for resolve in (is_preset, model_folder, model_config, load_models):
        with pytest.raises(ConfigError, match=r"pass \./tiny"):
            resolve("tiny")
    with pytest.raises(ConfigError, match=r"or preset:tiny for the preset$"):
        is_preset("tiny")
    assert load_models("./tiny").config.name == ModelConfig.load(folder).name
    assert not is_preset(Path("tiny"))  # a Path names a folder (str() would drop the "./")
    assert is_preset("sd21-base")
    # preset:tiny always names the built-in preset, whatever the working directory holds
    assert model_folder("preset:tiny") == SHIPPED / "tiny"
    assert model_config("preset:tiny") == ModelConfig.load(SHIPPED / "tiny")
    assert model_folder("preset:sd21-base") is None  # no shipped weights: its seeded init
    with pytest.raises(ConfigError, match=r"no preset 'tiny2'; the presets are preset:sd21-base"):
        is_preset("preset:tiny2")


def test_the_cli_runs_the_preset_beside_a_folder_named_like_it(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import json

    import numpy as np
    from PIL import Image

    from adadiff.cli import main

    shutil.copytree(folder, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((12, 16, 3), 120, np.uint8)).save("in.png")
    run = ["upscale", "in.png", "-o", "o.png", "-q", "--schedule", "uniform", "--interval", "999"]
    assert main([*run, "--model", "tiny"]) == 2
    assert "preset:tiny for the preset" in capsys.readouterr().err
    assert main([*run, "--model", "preset:tiny", "--report", "r.json"]) == 0
    report = json.loads(Path("r.json").read_text())
    assert report["model"] == "tiny" and report["tiles"] == 1  # the preset, by its name


def test_the_shipped_folder_itself_is_no_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SHIPPED)
    assert is_preset("tiny")


def test_the_weights_digest_reads_the_loaded_files_only(folder: Path) -> None:
    from adadiff.artifacts import WEIGHT_FILES, weights_digest

    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert written == sorted(WEIGHT_FILES)  # what save() writes is what the digest reads
    before = weights_digest(folder)
    (folder / "backup").mkdir()
    shutil.copy(folder / "pfj.safetensors", folder / "backup" / "pfj-old.safetensors")
    assert weights_digest(folder) == before
    shutil.copy(folder / "mmle.safetensors", folder / "pfj.safetensors")
    assert weights_digest(folder) != before


@pytest.mark.parametrize("name", [CONFIG_FILE, "unet/config.json"])
def test_a_config_file_that_is_not_utf8_is_one_line(
    name: str, folder: Path, tmp_path: Path, capsys
) -> None:
    # json.loads(read_text()) raised UnicodeDecodeError: a traceback, not a message
    (folder / name).write_bytes(b'{"name": "\xff"}')
    with pytest.raises((ConfigError, ModelFolderError), match="not UTF-8"):
        load_folder(folder)
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    code = main(["upscale", str(image), "-o", str(tmp_path / "o.png"), "--model", str(folder)])
    assert code == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_weights_missing_or_extra_tensors_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from adadiff.models.bundle import load_state

    path = tmp_path / "pfj.safetensors"
    module = torch.nn.Linear(2, 2)
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelFolderError, match=r"missing \['bias'\], unexpected \[\]"):
        load_state(module, path)
    save_file({"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "b": torch.zeros(1)}, str(path))
    with pytest.raises(ModelFolderError, match=r"missing \[\], unexpected \['b'\]"):
        load_state(module, path)
    save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFolderError, match=r"'weight' has shape \(2, 3\), .* \(2, 2\)"):
        load_state(module, path)


def test_a_text_embedding_of_another_shape_or_integers_is_refused(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "text_embedding.safetensors"
    good = load_file(str(path))["embedding"]
    for bad in (good[:-1], good.to(torch.int32)):
        save_file({"embedding": bad}, str(path))
        with pytest.raises(ModelFolderError, match="must hold a floating-point 'embedding'"):
            load_folder(folder)
    save_file({"other": good}, str(path))
    with pytest.raises(ModelFolderError, match=r"'embedding' of shape .* got None"):
        load_folder(folder)
    save_file({"embedding": good.half()}, str(path))  # as the UNet and VAE weights may be
    assert load_folder(folder).text_embedding.dtype == torch.float32


def test_integer_weights_are_refused_not_truncated(folder: Path) -> None:
    # load_state_dict cast them into the float parameters: a damaged file loaded silently
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "pfj.safetensors"
    original = path.read_bytes()
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key].long()
    save_file(state, str(path))
    with pytest.raises(ModelFolderError, match=f"{key}.*torch.int64"):
        load_folder(folder)
    emb = folder / "text_embedding.safetensors"
    save_file({"embedding": torch.zeros(77, 64, dtype=torch.int32)}, str(emb))
    path.write_bytes(original)
    with pytest.raises(ModelFolderError, match="floating-point 'embedding'"):
        load_folder(folder)


def test_fp16_and_bf16_weights_load_as_fp32(folder: Path, tiny_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    reference = load_folder(tiny_dir)
    for name, dtype in (("pfj.safetensors", torch.bfloat16), ("mmle.safetensors", torch.float16)):
        state = load_file(str(folder / name))
        save_file({k: v.to(dtype) for k, v in state.items()}, str(folder / name))
    models = load_folder(folder)
    for mine, theirs in ((models.pfj, reference.pfj), (models.mmle, reference.mmle)):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", [CONFIG_FILE, "pfj.safetensors"])
@pytest.mark.parametrize("damage", ["folder", "link loop"])
def test_a_file_that_is_there_but_no_file_is_not_called_missing(
    name: str, damage: str, folder: Path
) -> None:
    # "is missing" sent the user looking for a file that is there, as a folder or a bad link
    path = folder / name
    path.unlink()
    if damage == "folder":
        path.mkdir()
    else:
        path.symlink_to(path.name)
    with pytest.raises((ConfigError, ModelFolderError), match="is not a file"):
        load_folder(folder)


def test_a_path_object_named_like_a_preset_is_the_folder(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # preset_name leaves a Path to the folder, but its callers passed str(model): Path("./tiny")
    # was refused with "pass ./tiny for the folder"
    shutil.copytree(folder, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert model_folder(Path("tiny")) == Path("tiny")
    assert model_config(Path("./tiny")) == ModelConfig.load(folder)
    assert load_models(Path("tiny")).source == "tiny"


def test_a_folder_under_home_loads_as_model_config_reads_it(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # model_config and model_folder expanded "~", load_models did not: the config was found and
    # Upscaler.from_pretrained("~/...") then said the folder did not exist
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_config("~/model") == ModelConfig.load(folder)
    assert load_models("~/model").source == str(folder)


def test_a_checkpoint_file_given_as_the_model_is_not_called_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a single-file SD checkpoint as --model was "model folder ... does not exist"
    ckpt = tmp_path / "v2-1_512-ema-pruned.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    for read in (load_folder, model_config):
        with pytest.raises(ModelFolderError, match=r"is a file, not a folder.*convert-sd21"):
            read(ckpt)
    assert main(["export", "--model", str(ckpt), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "does not exist" not in err
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_folder(tmp_path / "absent")


def _swap_psnr_and_ssim(data: dict) -> None:
    metrics = data["mmle"]["metrics"]
    names = [m["name"] for m in metrics]
    i, j = names.index("psnr"), names.index("ssim")
    metrics[i], metrics[j] = metrics[j], metrics[i]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_swap_psnr_and_ssim, "metrics"),
        (lambda d: d["mmle"].update(reference="hr"), "reference"),
        (lambda d: d["color_fix"].update(kind="wavelet", levels=3), "color_fix"),
    ],
)
def test_an_mmle_read_as_other_columns_is_refused(folder: Path, change, named: str) -> None:
    # every change keeps the tensors' shapes: the weights loaded and the DTSS policy read each
    # score as another metric (PSNR as SSIM), or PSNR and LPIPS built from the wrong columns
    _edit(folder / CONFIG_FILE, change)
    with pytest.raises(ModelFolderError, match=rf"mmle.safetensors predicts other .*{named} "):
        load_folder(folder)


def test_mmle_metadata_that_is_json_but_no_object_is_refused(tiny_config, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from adadiff.models.bundle import MMLE_META_KEY, check_mmle_metadata

    path = tmp_path / "mmle.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={MMLE_META_KEY: "[]"})
    with pytest.raises(ModelFolderError, match="metadata is not a JSON object"):
        check_mmle_metadata(tiny_config, path)


def test_mmle_metadata_is_checked_on_the_keys_it_records(tiny_config, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from adadiff.models.bundle import MMLE_META_KEY, check_mmle_metadata, mmle_columns

    path = tmp_path / "mmle.safetensors"
    recorded = {k: v for k, v in mmle_columns(tiny_config).items() if k != "split_columns"}
    for reference, refused in ((recorded["reference"], False), ("elsewhere", True)):
        meta = json.dumps({**recorded, "reference": reference})
        save_file({"w": torch.zeros(1)}, str(path), metadata={MMLE_META_KEY: meta})
        if refused:
            with pytest.raises(ModelFolderError, match=r"predicts other scores .*reference"):
                check_mmle_metadata(tiny_config, path)
        else:
            check_mmle_metadata(tiny_config, path)  # no split_columns there: not a KeyError


def test_mmle_labels_scored_at_other_colour_fix_levels_are_refused(
    tiny_config, tmp_path: Path
) -> None:
    from dataclasses import replace

    from safetensors.torch import save_file

    from adadiff.config import ColorFixConfig
    from adadiff.models.bundle import MMLE_META_KEY, check_mmle_metadata, mmle_columns

    written = replace(tiny_config, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    path = tmp_path / "mmle.safetensors"
    meta = {MMLE_META_KEY: json.dumps(mmle_columns(written))}
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    check_mmle_metadata(written, path)
    now = replace(tiny_config, color_fix=ColorFixConfig(kind="wavelet", levels=2))
    with pytest.raises(ModelFolderError, match=r"color_fix \"wavelet:3\" there"):
        check_mmle_metadata(now, path)


def test_a_calibrated_config_still_loads_its_mmle(folder: Path) -> None:
    # calibration rewrites the metric weights only, which the MMLE does not predict
    _edit(folder / CONFIG_FILE, lambda d: d["mmle"]["metrics"][0].update(weight=7.5))
    assert load_folder(folder).config.mmle.metrics[0].weight == 7.5


def test_an_mmle_file_without_the_metric_names_still_loads(folder: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shipped = SHIPPED / "tiny" / "mmle.safetensors"
    with safe_open(str(shipped), framework="pt") as fh:
        assert not (fh.metadata() or {})  # the shipped tiny's is such a file, and loads
    _assert_weights(load_models("tiny").mmle, load_file(str(shipped)))
    path = folder / "mmle.safetensors"
    state = load_file(str(path))
    save_file(state, str(path))  # as adadiff wrote it before: nothing to check
    _edit(folder / CONFIG_FILE, _swap_psnr_and_ssim)
    loaded = load_folder(folder)
    names = [m.name for m in loaded.config.mmle.metrics]
    assert names.index("ssim") < names.index("psnr")  # the config as given, not refused
    _assert_weights(loaded.mmle, state)


def _assert_weights(module, state: dict) -> None:
    """``module`` holds the tensors of ``state`` (a safetensors file's), every one of them."""
    import torch

    got = module.state_dict()
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


def test_a_folder_saved_twice_is_the_same_bytes(tiny_models, tmp_path: Path) -> None:
    # safetensors writes several metadata keys in a random order: shipping one workdir twice
    # gave two weights digests, and a benchmark JSON of the first was refused for the second
    from adadiff.artifacts import weights_digest

    a, b = (tiny_models.save(tmp_path / name) for name in ("a", "b"))
    assert weights_digest(a) == weights_digest(b)


def test_preset_names_with_and_without_the_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefix names the preset wherever it is asked for, and a folder named like a preset
    that holds no model (an output folder ./tiny, say) does not clash with it."""
    from adadiff.presets import preset, preset_name

    assert preset("preset:tiny") == preset("tiny")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "out.png").write_bytes(b"")
    assert preset_name("tiny") == "tiny" and is_preset("preset:tiny")


def test_model_folder_expands_the_home_folder(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_folder("~/model") == folder
