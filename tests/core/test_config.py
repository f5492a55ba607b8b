"""adadiff.json values that cannot work are refused with a ConfigError that names the key,
never left to fail deep in torch or numpy."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from adadiff.cli import main
from adadiff.config import ModelConfig, RunSettings
from adadiff.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "adadiff" / "weights" / "tiny"
BASE = json.loads((SHIPPED / "adadiff.json").read_text())


def _set(part: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d[part].__setitem__(key, value)


CASES = [
    (_set("dtss", "t_start", 5000), "t_start 5000 must be below"),
    (_set("dtss", "nr_start_t", -1), "nr_start_t -1"),
    (_set("dtss", "tiers", "abcd"), "tiers must be four positive"),
    (_set("dtss", "tiers", [5, 10, 15]), "tiers must be four positive"),
    (_set("noise", "prediction_type", "sample"), "prediction_type must be one of"),
    (lambda d: d["mmle"]["metrics"][0].__setitem__("kind", "both"), "metric kind must be one of"),
    (lambda d: d["vae"].pop("block_out_channels"), "vae config needs"),
    (lambda d: d["unet"].pop("cross_attention_dim"), "unet config needs"),
    # diffusers takes a per-block list; it loaded here and text_dim raised a TypeError
    (_set("unet", "cross_attention_dim", [64] * 4), "cross_attention_dim must be a whole"),
    (_set("unet", "cross_attention_dim", None), "cross_attention_dim must be a whole"),
    (_set("vae", "latent_channels", "8"), "latent_channels must be a whole number"),
    (_set("vae", "latent_channels", 8.0), "latent_channels must be a whole number"),
    (_set("vae", "block_out_channels", 64), "block_out_channels must be a non-empty list"),
    (_set("vae", "block_out_channels", []), "block_out_channels must be a non-empty list"),
    (lambda d: d.__setitem__("unet", [1, 2]), "unet must be a mapping"),
    (lambda d: d["mmle"]["metrics"][0].pop("weight"), "invalid adadiff.json"),
    # JSON reads NaN: it made every tile "stable", never growing or exiting
    (_set("dtss", "tau", float("nan")), "tau must be a positive number"),
    (_set("dtss", "growth_split", float("inf")), "growth_split must be a number >= 1"),
    # the timestep features fill it in pairs: an odd width crashed at the first MMLE call
    (_set("mmle", "hidden", 33), "mmle hidden must be an even number"),
    (lambda d: d.__setitem__("scaling_factor", 0.0), "scaling_factor must be a positive number"),
    (lambda d: d.__setitem__("scaling_factor", -0.18215), "scaling_factor must be a positive"),
    # numbers of the wrong type loaded and failed later: a float width or tile with a traceback
    # from torch or the tiling, a string weight at the first adaptive step
    (lambda d: d.__setitem__("tile_size", 128.0), "tile_size must be a whole number"),
    (lambda d: d.__setitem__("upscale", "4"), "upscale must be a whole number"),
    (lambda d: d.__setitem__("uniform_interval", 200.5), "uniform_interval must be a whole"),
    (_set("mmle", "hidden", 32.0), "mmle.hidden must be a whole number"),
    (_set("pfj", "hidden", 32.0), "pfj.hidden must be a whole number"),
    (_set("noise", "num_train_timesteps", 1000.5), "noise.num_train_timesteps must be a whole"),
    (_set("dtss", "tiers", "5555"), "tiers must be four positive"),
    (_set("dtss", "tiers", [5.9, 10, 15, 20]), "tiers must be four positive"),
    (_set("dtss", "tau", "0.005"), "dtss.tau must be a number"),
    (_set("content", "threshold", float("nan")), "content threshold must be >= 0"),
    (lambda d: d["mmle"]["metrics"][0].__setitem__("weight", "0.1"), "weight must be a number"),
    (lambda d: d["mmle"]["metrics"][0].__setitem__("weight", float("nan")), "must be finite"),
    (lambda d: d.__setitem__("noise", None), "noise must be a JSON object"),
    (_set("dtss", "tua", 0.005), r"unknown keys in dtss: \['tua'\]"),
    # every run without --schedule failed, saying --schedule content needs a rule
    (lambda d: d.__setitem__("default_schedule", "content"), "default_schedule is content, but"),
    # true is an int to Python: it loaded as 1 (a one-step schedule, a one-wide network)
    (lambda d: d.__setitem__("upscale", True), "upscale must be a whole number"),
    (lambda d: d.__setitem__("scaling_factor", True), "scaling_factor must be a number"),
    (lambda d: d["mmle"]["metrics"][0].__setitem__("name", ""), "a metric needs a name"),
    (_set("noise", "set_alpha_to_one", "yes"), "set_alpha_to_one must be true or false"),
    (_set("noise", "num_train_timesteps", 1), "num_train_timesteps must be >= 2"),
    (_set("noise", "beta_end", 0.00085), "betas must satisfy 0 < beta_start < beta_end < 1"),
    (_set("noise", "beta_end", 1.0), "betas must satisfy 0 < beta_start < beta_end < 1"),
    (_set("noise", "beta_schedule", "cosine"), "beta_schedule 'cosine' is not supported"),
    (_set("dtss", "tiers", [0, 10, 15, 20]), "tiers must be four positive"),
    (_set("dtss", "tau", 0.0), "tau must be a positive number"),
    (_set("dtss", "t_start", 0), "t_start must be >= 1"),
    (_set("dtss", "t_start", 1000), "t_start 1000 must be below"),
    (_set("dtss", "nr_start_t", 1001), "nr_start_t 1001 must be in"),
    (_set("dtss", "exit_on", "both"), "exit_on must be one of"),
    (_set("pfj", "hidden", 0), "PFJ hidden and gain_dim must be >= 1"),
    (_set("mmle", "hidden", 0), "mmle hidden must be an even number >= 2"),
    (_set("mmle", "metrics", None), "mmle metrics must be a list"),
    (_set("mmle", "metrics", []), "MMLE needs at least one metric"),
    (lambda d: d["mmle"]["metrics"].append(d["mmle"]["metrics"][0]), "metric names must be uniq"),
    (lambda d: d.__setitem__("color_fix", {"kind": "gray"}), "color_fix kind must be one of"),
    (lambda d: d.__setitem__("color_fix", {"levels": 0}), r"color_fix levels must be in \[1, 12\]"),
    (lambda d: d.__setitem__("color_fix", {"levels": 13}), r"color_fix levels must be in \[1, 12"),
    (_set("content", "flat_interval", 0), "flat_interval and textured_interval must be >= 1"),
    (_set("content", "textured_interval", 0), "flat_interval and textured_interval must be"),
    (lambda d: d.__setitem__("name", 5), "name must be a string"),
    (lambda d: d.__setitem__("text_tokens", 0), "text_tokens must be >= 1"),
    (lambda d: d.__setitem__("scaling_factor", float("inf")), "scaling_factor must be a positive"),
    (lambda d: d.__setitem__("tile_size", 130), "tile_size 130 must be a positive multiple"),
    (lambda d: d.update(tile_size=0, tile_overlap=0), "tile_size 0 must be a positive multiple"),
    (lambda d: d.__setitem__("tile_overlap", 128), r"tile_overlap 128 must be a multiple of 4 in"),
    (lambda d: d.__setitem__("tile_overlap", 18), r"tile_overlap 18 must be a multiple of 4 in"),
    # 1.4% apart: diffusers and the runtime would scale the latents differently
    (_set("vae", "scaling_factor", 0.55), "and vae.scaling_factor 0.55 differ"),
    (lambda d: d.__setitem__("uniform_interval", 0), "uniform_interval must be >= 1"),
    (lambda d: d.__setitem__("default_schedule", "fast"), "default_schedule must be one of"),
    (_set("vae", "latent_channels", 0), "latent_channels must be a whole number >= 1"),
    # diffusers builds 4 output channels when the UNet config names none
    (
        lambda d: (
            d["vae"].__setitem__("latent_channels", 8),
            d["unet"].__setitem__("in_channels", 16),
            d["unet"].pop("out_channels", None),
        ),
        r"out_channels 8 \(the VAE's latent_channels\), got 4",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), CASES)
def test_bad_values_are_config_errors(mutate, message):
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "mutate",
    [
        _set("dtss", "growth_split", 1.0),
        _set("dtss", "nr_start_t", 1000),  # NR gains from the first step on
        _set("dtss", "nr_start_t", 0),
        _set("dtss", "t_start", 1),
        _set("dtss", "tiers", [1, 1, 1, 1]),
        lambda d: d.__setitem__("tile_overlap", 0),
        lambda d: d.update(tile_size=4, tile_overlap=0),  # one latent pixel: the VAE factor
        lambda d: d.__setitem__("color_fix", {"kind": "none", "levels": 1}),
        lambda d: d.__setitem__("color_fix", {"kind": "wavelet", "levels": 12}),
        _set("noise", "num_train_timesteps", 1000),
    ],
)
def test_values_at_the_edge_of_their_range_load(mutate):
    data = copy.deepcopy(BASE)
    mutate(data)
    ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("max_batch", 0, "max_batch must be a whole number >= 1, got 0"),
        ("seed", -1, "seed must be a whole number >= 0, got -1"),
        ("tile_size", 0, "tile_size must be a whole number >= 1, got 0"),
        ("tile_overlap", -16, "tile_overlap must be a whole number >= 0, got -16"),
        ("max_batch", True, "max_batch must be a whole number"),
        ("backend", "tensorflow", "unknown backend 'tensorflow'; choose one of torch, onnx"),
        ("precision", "int8", "--precision 'int8' is not one of fp32, fp16, bf16; use fp32"),
    ],
)
def test_run_settings_refuse_values_before_any_model_loads(keyword, value, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings(**{keyword: value})
    settings = RunSettings(seed=0, tile_overlap=0, max_batch=1, tile_size=None)
    assert (settings.seed, settings.tile_overlap, settings.max_batch) == (0, 0, 1)


def test_missing_keys_are_named_in_plain_words(tmp_path):
    (tmp_path / "adadiff.json").write_text("{}")
    with pytest.raises(ConfigError) as caught:
        ModelConfig.load(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'adadiff.json'} lacks the keys name, unet, vae, ")
    assert "__init__" not in message and "start from a complete one" in message
    data = {k: v for k, v in BASE.items() if k != "tile_overlap"}
    with pytest.raises(ConfigError, match=r"adadiff\.json lacks the key tile_overlap, which"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"must hold a JSON object of config keys, not a list"):
        ModelConfig.from_dict([])  # type: ignore[arg-type]


def test_the_shipped_config_loads_and_round_trips():
    cfg = ModelConfig.from_dict(BASE)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("dtss", "t_start", 5000), "t_start 5000"),
        # a per-block list, which diffusers builds: a TypeError traceback from text_dim
        (_set("unet", "cross_attention_dim", [64] * 4), "cross_attention_dim must be"),
    ],
)
def test_a_bad_model_folder_is_one_line_before_any_work(tmp_path, capsys, mutate, message):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    data = copy.deepcopy(BASE)
    mutate(data)
    (folder / "adadiff.json").write_text(json.dumps(data))
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 12), (90, 120, 150)).save(image)
    code = main(["upscale", str(image), "-o", str(tmp_path / "out.png"), "--model", str(folder)])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out.png").exists()


def test_saving_a_config_on_a_full_disk_keeps_the_old_file(tmp_path):
    """adadiff calibrate rewrites a model folder's only adadiff.json: a write cut short must
    leave the old file whole (a truncated one makes the folder unloadable)."""
    from helpers import run_with_file_size_limit

    folder = tmp_path / "model"
    folder.mkdir()
    ModelConfig.load(Path(__file__).parents[2] / "adadiff" / "weights" / "tiny").save(folder)
    before = (folder / "adadiff.json").read_bytes()
    body = (
        "from adadiff.config import ModelConfig\n"
        "from adadiff.errors import OutputPathError\n"
        "cfg = ModelConfig.load(sys.argv[1])\n"
        "# limited\n"
        "try:\n"
        "    cfg.save(sys.argv[1])\n"
        "except OutputPathError as exc:\n"
        "    print('refused:', exc)\n"
    )
    stdout = run_with_file_size_limit(body, folder, 1024)
    assert stdout.startswith("refused:") and "adadiff.json is unchanged" in stdout
    assert (folder / "adadiff.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["adadiff.json"]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("max_batch", 2.5), ("max_batch", "4"), ("tile_size", 128.0), ("tile_overlap", 16.0)],
)
def test_from_pretrained_refuses_counts_that_are_not_whole_numbers(keyword, value):
    """A float tile or batch size went through and failed in the first upscale, with a
    TypeError or an IndexError from deep inside the tiling."""
    import numpy as np

    from adadiff import Upscaler

    with pytest.raises(ConfigError, match=f"{keyword} must be a whole number >= "):
        Upscaler.from_pretrained("tiny", **{keyword: value})
    upscaler = Upscaler.from_pretrained("tiny", max_batch=np.int64(4), tile_size=np.int32(128))
    assert (upscaler.max_batch, upscaler.config.tile_size) == (4, 128)
    assert type(upscaler.max_batch) is int


@pytest.mark.parametrize(
    ("version", "message"),
    [(2, "config_version 2, newer than"), ("1", "config_version in"), (0, "config_version in")],
)
def test_a_config_version_this_adadiff_cannot_read_is_refused(version, message):
    # a newer file's fields may mean what this version cannot tell: it loaded silently
    data = copy.deepcopy(BASE)
    data["config_version"] = version
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_a_config_without_a_version_is_the_first_one():
    data = copy.deepcopy(BASE)
    del data["config_version"]
    assert ModelConfig.from_dict(data) == ModelConfig.from_dict(BASE)
