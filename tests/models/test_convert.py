"""convert_sd21 on a tiny, offline SD-2.1-shaped diffusers folder."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from adadiff.config import CONFIG_FILE, PredictionType
from adadiff.errors import BackendUnavailableError, ModelFolderError
from adadiff.models.bundle import WEIGHTS, load_folder
from adadiff.models.convert import convert_sd21
from adadiff.presets import sd21_base

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENS = 77
CROSS_DIM = 32


def _write_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer as SD-2.1 ships it: vocab.json + merges.txt, no tokenizer.json."""
    vocab = {BOS: 0, EOS: 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["ab</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    # No model_max_length: the tokenizer then reports a huge sentinel, which convert must not use.
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
            }
        )
    )
    return len(vocab)


def _build_stock(root: Path) -> Path:
    torch.manual_seed(1234)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=CROSS_DIM,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    # Stock weights that are not all zero anywhere, so "kept" and "zeroed" are distinguishable.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(root / "unet", safe_serialization=True)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)

    vocab_size = _write_tokenizer(root / "tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TOKENS,
            projection_dim=CROSS_DIM,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    text.save_pretrained(root / "text_encoder")

    # v-prediction and a non-default beta_end, so the test sees they come from this file.
    DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.0125,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
    ).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def stock_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_stock(tmp_path_factory.mktemp("stock") / "sd21")


@pytest.fixture
def stock(stock_template: Path, tmp_path: Path) -> Path:
    """A private copy per test, so tests that break files do not affect the others."""
    return Path(shutil.copytree(stock_template, tmp_path / "sd21"))


def _empty_prompt_reference(src: Path) -> torch.Tensor:
    tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"), local_files_only=True)
    ids = tokenizer(
        "", padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.tolist() == [[0] + [1] * (TOKENS - 1)]
    encoder = CLIPTextModel.from_pretrained(str(src / "text_encoder"), local_files_only=True)
    with torch.no_grad():
        return encoder.eval()(ids).last_hidden_state[0]


def _siblings(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name != "sd21")


def test_convert_keeps_stock_weights_and_widens_conv_in(stock: Path, tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    lines: list[str] = []
    assert convert_sd21(stock, dst, seed=3, log=lines.append) == dst
    assert any("4 -> 8" in line for line in lines)
    assert _siblings(dst) == ["converted"]  # the temporary folder is gone

    models = load_folder(dst)
    unet_stock = load_file(str(stock / "unet" / WEIGHTS))
    unet_new = models.unet.state_dict()
    assert models.unet.conv_in.in_channels == 8
    w_new, w_stock = unet_new["conv_in.weight"], unet_stock["conv_in.weight"]
    assert w_new.shape == (w_stock.shape[0], 8, *w_stock.shape[2:])
    assert torch.equal(w_new[:, :4], w_stock)
    assert torch.count_nonzero(w_new[:, 4:]) == 0
    assert set(unet_new) == set(unet_stock)
    for key, tensor in unet_stock.items():
        if key != "conv_in.weight":
            assert torch.equal(unet_new[key], tensor), key

    vae_stock = load_file(str(stock / "vae" / WEIGHTS))
    vae_new = models.vae.state_dict()
    assert set(vae_new) == set(vae_stock)
    for key, tensor in vae_stock.items():
        assert torch.equal(vae_new[key], tensor), key

    expected = _empty_prompt_reference(stock)
    assert models.text_embedding.shape == (TOKENS, CROSS_DIM)
    assert models.text_embedding.dtype == torch.float32
    assert torch.allclose(models.text_embedding, expected, atol=1e-6)

    lr = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(models.pfj(lr, torch.rand(2, 2)), lr)

    cfg = json.loads((dst / CONFIG_FILE).read_text())
    assert cfg["unet"]["in_channels"] == 8
    assert cfg["unet"]["cross_attention_dim"] == CROSS_DIM
    assert not any(k.startswith("_") for k in (*cfg["unet"], *cfg["vae"]))
    assert cfg["scaling_factor"] == pytest.approx(0.13025)
    assert models.config.noise.prediction_type is PredictionType.V_PREDICTION
    assert models.config.noise.beta_end == pytest.approx(0.0125)


def test_tiles_keep_sd21_base_latent_size_at_other_vae_factor(stock: Path, tmp_path: Path) -> None:
    """SD-2.1-base's 512/64 px tiles are 64/8 latents at its VAE factor 8. This stock VAE has
    factor 2: 512 px tiles would be 256 latents a side (an upscale of a 16x16 input took 26 s
    per step with them); its tiles are 128/16 px, the same 64/8 latents."""
    cfg = load_folder(convert_sd21(stock, tmp_path / "converted")).config
    base = sd21_base()
    assert (base.vae_scale_factor, cfg.vae_scale_factor) == (8, 2)
    assert cfg.latent_tile == base.latent_tile == 64
    assert cfg.tile_overlap // 2 == base.tile_overlap // 8 == 8
    assert (cfg.tile_size, cfg.tile_overlap) == (128, 16)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_every_file_of_the_model_folder_is_readable_by_others(stock: Path, tmp_path: Path) -> None:
    dst = convert_sd21(stock, tmp_path / "converted")
    modes = {
        str(p.relative_to(dst)): p.stat().st_mode & 0o777 for p in dst.rglob("*") if p.is_file()
    }
    assert all(mode & 0o044 == 0o044 for mode in modes.values()), modes


def test_seed_decides_pfj_and_mmle(stock: Path, tmp_path: Path) -> None:
    a = load_folder(convert_sd21(stock, tmp_path / "a", seed=0))
    b = load_folder(convert_sd21(stock, tmp_path / "b", seed=0))
    c = load_folder(convert_sd21(stock, tmp_path / "c", seed=1))
    wa, wb, wc = (m.mmle.head[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_the_command_line_passes_its_seed_and_notes_a_preset_name(
    stock: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adadiff.cli import main

    assert main(["convert-sd21", str(stock), "-o", str(tmp_path / "tiny"), "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "'tiny' is also the name of a built-in preset" in err and str(tmp_path / "tiny") in err
    cli = load_folder(tmp_path / "tiny").mmle.head[0].weight
    api = load_folder(convert_sd21(stock, tmp_path / "api", seed=1)).mmle.head[0].weight
    assert torch.equal(cli, api)
    assert main(["convert-sd21", str(stock), "-o", str(tmp_path / "mine")]) == 0
    assert "preset" not in capsys.readouterr().err


def test_zero_init_reproduces_the_stock_unet(stock: Path, tmp_path: Path) -> None:
    models = load_folder(convert_sd21(stock, tmp_path / "converted"))
    stock_unet = UNet2DConditionModel.from_pretrained(str(stock / "unet")).eval()
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    lr = torch.randn(2, 4, 16, 16, generator=gen) * 3
    t = torch.tensor([10, 700])
    text = models.text_embedding[None].expand(2, -1, -1)
    with torch.no_grad():
        want = stock_unet(z, t, encoder_hidden_states=text).sample
        got = models.unet(torch.cat([z, lr], dim=1), t, encoder_hidden_states=text).sample
    assert got.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-5)


def test_missing_unet_weights(stock: Path, tmp_path: Path) -> None:
    (stock / "unet" / WEIGHTS).unlink()
    dst = tmp_path / "converted"
    with pytest.raises(ModelFolderError, match=re.escape(str(stock / "unet" / WEIGHTS))):
        convert_sd21(stock, dst)
    assert not dst.exists()


def test_bin_only_unet_asks_for_safetensors(stock: Path, tmp_path: Path) -> None:
    (stock / "unet" / WEIGHTS).rename(stock / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="convert it to safetensors"):
        convert_sd21(stock, tmp_path / "converted")


def test_missing_tokenizer_folder(stock: Path, tmp_path: Path) -> None:
    shutil.rmtree(stock / "tokenizer")
    with pytest.raises(ModelFolderError, match=re.escape(str(stock / "tokenizer"))):
        convert_sd21(stock, tmp_path / "converted")


def test_vae_tensor_with_wrong_shape(stock: Path, tmp_path: Path) -> None:
    path = stock / "vae" / WEIGHTS
    state = load_file(str(path))
    key = "decoder.conv_out.weight"
    state[key] = torch.zeros(3, 16, 3, 3)
    save_file(state, str(path))
    dst = tmp_path / "converted"
    with pytest.raises(ModelFolderError, match=re.escape(key)):
        convert_sd21(stock, dst)
    assert not dst.exists()
    assert _siblings(dst) == []  # nor any temporary folder


def test_failure_while_writing_leaves_no_dst(
    stock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save(self: object, folder: Path) -> Path:
        (Path(folder) / "unet").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr("adadiff.models.bundle.TorchModels.save", broken_save)
    dst = tmp_path / "converted"
    with pytest.raises(ModelFolderError, match=r"cannot write the model folder .*disk full"):
        convert_sd21(stock, dst)
    assert not dst.exists()
    assert _siblings(dst) == []


def test_dst_under_a_file_is_refused_before_converting(
    stock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(
        "adadiff.models.convert._read_safetensors",
        lambda path: pytest.fail("read the weights before checking the output folder"),
    )
    with pytest.raises(ModelFolderError, match=r"notes\.txt is not a folder"):
        convert_sd21(stock, tmp_path / "notes.txt" / "sub" / "converted")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_refuses_non_empty_dst(stock: Path, tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="pick a new folder"):
        convert_sd21(stock, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


def test_empty_dst_is_fine(stock: Path, tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    dst.mkdir()
    convert_sd21(stock, dst)
    assert (dst / CONFIG_FILE).is_file()


def test_the_working_directory_as_dst_is_refused_before_converting(
    stock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "-o ." in an empty folder converted, then said ". already exists and is not empty"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    said: list[str] = []
    for dst in (".", str(here), "../here"):
        with pytest.raises(ModelFolderError, match="is the working directory; pick a new folder"):
            convert_sd21(stock, dst, log=said.append)
    assert said == [] and list(here.iterdir()) == []
    assert convert_sd21(stock, "sd21-adadiff") == Path("sd21-adadiff")
    assert (here / "sd21-adadiff" / CONFIG_FILE).is_file()


def test_without_transformers(stock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BackendUnavailableError, match=re.escape('pip install "adadiff[convert]"')):
        convert_sd21(stock, tmp_path / "converted")


def test_vae_with_pre_0_15_attention_names(stock: Path, tmp_path: Path) -> None:
    """The stock SD-2.1-base VAE file names its attention query/key/value/proj_attn."""
    path = stock / "vae" / WEIGHTS
    modern = load_file(str(path))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in modern.items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = tensor
    assert any(".attentions.0.query." in k for k in renamed)
    save_file(renamed, str(path))
    models = load_folder(convert_sd21(stock, tmp_path / "converted"))
    vae = models.vae.state_dict()
    for key, tensor in modern.items():
        assert torch.equal(vae[key], tensor), key


def test_fp16_variant_files(stock: Path, tmp_path: Path) -> None:
    """A download of the fp16 variant only (diffusion_pytorch_model.fp16.safetensors)."""
    for part, name in (("unet", WEIGHTS), ("vae", WEIGHTS), ("text_encoder", "model.safetensors")):
        path = stock / part / name
        state = load_file(str(path))
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
            str(path.with_name(name.replace(".safetensors", ".fp16.safetensors"))),
        )
        path.unlink()
    lines: list[str] = []
    models = load_folder(convert_sd21(stock, tmp_path / "converted", log=lines.append))
    assert any("fp16" in line for line in lines)
    assert models.unet.conv_in.weight.dtype == torch.float32
    assert models.text_embedding.dtype == torch.float32
    assert torch.count_nonzero(models.text_embedding) > 0


def test_sharded_fp16_text_encoder(stock: Path, tmp_path: Path) -> None:
    """transformers' sharded fp16 variant: model.safetensors.index.fp16.json + its shards."""
    expected = _empty_prompt_reference(stock)
    encoder = CLIPTextModel.from_pretrained(str(stock / "text_encoder"), local_files_only=True)
    shutil.rmtree(stock / "text_encoder")
    encoder.half().save_pretrained(stock / "text_encoder", variant="fp16", max_shard_size="20KB")
    assert (stock / "text_encoder" / "model.safetensors.index.fp16.json").is_file()
    models = load_folder(convert_sd21(stock, tmp_path / "converted"))
    assert models.text_embedding.dtype == torch.float32
    assert torch.allclose(models.text_embedding, expected, atol=1e-2)  # fp16 weights


@pytest.mark.parametrize(
    "extra",
    [
        # SDXL's: the UNet also wants added_cond_kwargs (pooled text and size embeddings)
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": CROSS_DIM + 6 * 8,
        },
        {"num_class_embeds": 10},  # class labels, as the SD x2/x4 upscalers take
    ],
)
def test_a_unet_that_needs_extra_conditioning_is_refused(
    stock: Path, tmp_path: Path, extra: dict[str, object]
) -> None:
    config = dict(UNet2DConditionModel.load_config(str(stock / "unet")))
    shutil.rmtree(stock / "unet")
    UNet2DConditionModel.from_config({**config, **extra}).save_pretrained(
        stock / "unet", safe_serialization=True
    )
    dst = tmp_path / "converted"
    with pytest.raises(ModelFolderError, match="extra conditioning inputs"):
        convert_sd21(stock, dst)
    assert not dst.exists()


def test_fp32_text_encoder_beats_a_sharded_fp16_one_beside_it(stock: Path, tmp_path: Path) -> None:
    """A full hub snapshot holds model.safetensors and the fp16 shards: fp32 is read, as for
    the UNet and the VAE."""
    expected = _empty_prompt_reference(stock)
    config = (stock / "text_encoder" / "config.json").read_bytes()
    encoder = CLIPTextModel.from_pretrained(str(stock / "text_encoder"), local_files_only=True)
    encoder.half().save_pretrained(stock / "text_encoder", variant="fp16", max_shard_size="20KB")
    (stock / "text_encoder" / "config.json").write_bytes(config)  # the snapshot's fp32 config
    models = load_folder(convert_sd21(stock, tmp_path / "converted"))
    assert torch.equal(models.text_embedding, expected)
