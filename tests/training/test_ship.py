"""The train command line and shipping a model folder.

Micro config, a few steps each; fixtures in conftest.py, helpers in training_helpers.py."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from training_helpers import opts, small_pool, synthetic_labels

# FR metrics only: numpy, no set-up files needed.
from adadiff.config import ColorFixConfig
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.training.checkpoint import load_latest


def test_train_cli_and_ship_give_a_loadable_model(tmp_path, unet_workdir, cfg, monkeypatch):
    from adadiff.engines.torch import TorchBackend
    from adadiff.models.bundle import load_folder
    from adadiff.runtime.upscaler import Upscaler
    from adadiff.training.cli import add_train_parser, cmd_train

    workdir = tmp_path / "w"
    shutil.copytree(unet_workdir / "unet", workdir / "unet")
    labels = workdir / "labels"
    labels.mkdir()
    shard = synthetic_labels(32)
    shard["photos"] = np.array(["moon", "rocket", "brick"])
    shard["photo"] = (shard["traj"] % 2).astype(np.int64)  # moon and rocket drawn, brick not
    shard["weighting"] = np.array("photo")
    unet_step = load_latest(workdir / "unet")["step"]
    shard["unet_step"] = np.array(unet_step - 1)  # drawn before the UNet trained one more step
    np.savez(labels / "shard-00000.npz", **shard)
    model_dir = tmp_path / "cfg"
    model_dir.mkdir()
    cfg.save(model_dir)

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    common = ["--model", str(model_dir), "--workdir", str(workdir)]
    args = parser.parse_args(["train", "mmle", *common, "--steps", "2", "--batch", "8"])
    assert args.func is cmd_train and args.resume is None
    assert cmd_train(args) == 0
    args = parser.parse_args(["train", "mmle", *common, "--steps", "3", "--resume"])
    assert cmd_train(args) == 0
    assert load_latest(workdir / "mmle")["step"] == 3
    # labels: --no-resume refuses a folder with shards, --resume one without
    with pytest.raises(ConfigError, match="already holds shards; drop --no-resume"):
        cmd_train(parser.parse_args(["train", "labels", *common, "--no-resume"]))
    empty = ["--model", str(model_dir), "--workdir", str(tmp_path / "empty")]
    with pytest.raises(ConfigError, match=r"--resume was given but .* holds no shards"):
        cmd_train(parser.parse_args(["train", "labels", *empty, "--resume"]))

    out = tmp_path / "shipped"
    ship = ["train", "export-tiny", *common, "--out", str(out)]
    # a limit under 1 MB is said as given (it read "0 MB"), and a NaN one is refused (every
    # size passed it)
    with pytest.raises(ModelFolderError, match=r"over the 0\.25 MB limit"):
        cmd_train(parser.parse_args([*ship, "--max-mb", "0.25"]))
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name[0] == "."] == []
    with pytest.raises(SystemExit):
        parser.parse_args([*ship, "--max-mb", "nan"])
    # SIGTERM while the folder is written stops as Ctrl-C does: the half-written folder beside
    # --out is removed (the default action left it); the caller's handler is restored
    import os
    import signal

    from adadiff.training import ship as ship_module

    def terminated(folder, record):
        real_write_record(folder, record)
        os.kill(os.getpid(), signal.SIGTERM)

    def ignored(_signum, _frame):  # stands in for the default action, which ends pytest
        pass

    real_write_record = ship_module.write_record
    before = signal.signal(signal.SIGTERM, ignored)
    try:
        monkeypatch.setattr(ship_module, "write_record", terminated)
        with pytest.raises(KeyboardInterrupt):
            cmd_train(parser.parse_args(ship))
        assert signal.getsignal(signal.SIGTERM) is ignored
    finally:
        signal.signal(signal.SIGTERM, before)
        monkeypatch.undo()
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name[0] == "."] == []
    assert cmd_train(parser.parse_args(ship)) == 0
    models = load_folder(out)
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Data" in card and "| mmle | 3 |" in card
    # the photo table lists what each stage recorded: here only the labels name their photos
    assert "| moon | scikit-image |" in card and "| labels |" in card
    assert "| brick |" not in card and "| camera |" not in card
    assert "Held out (never tuned on" in card and "astronaut (NASA" in card
    # rocket, a validation photo, is in this workdir's labels: the card names it
    assert "**Not every stage kept them out**: rocket by labels." in card
    record = json.loads((out / "training.json").read_text())
    assert record["photos"] == {"moon": ["labels"], "rocket": ["labels"]}
    assert record["sources"]["mmle"] == "trained in this run"
    assert "recorded no photo names: vae, unet" in card
    assert "labels draw every photo equally often" in card
    lag = f"labels were drawn by the UNet at step {unet_step - 1}; the shipped UNet is that run"
    assert lag in card
    unet_state = load_latest(workdir / "unet")["state"]
    assert models.config.scaling_factor == pytest.approx(unet_state["scaling_factor"])
    assert models.config.vae["scaling_factor"] == pytest.approx(unet_state["scaling_factor"])

    # a quality JSON of other weights is refused before anything is written; one of these
    # weights (the same workdir shipped again gives the same files) is taken
    from adadiff.artifacts import weights_digest

    other, again = tmp_path / "other.json", tmp_path / "again"
    other.write_text(json.dumps({"weights_digest": "0123456789abcdef"}))
    # the new weights are not at --out yet: the advice is to ship, benchmark, then card
    with pytest.raises(ConfigError, match="quality JSON was made with other weights") as refused:
        cmd_train(
            parser.parse_args(
                ["train", "ship", *common, "--out", str(again), "--quality", str(other)]
            )
        )
    assert "after shipping without --eval and --quality, then `adadiff train card" in str(
        refused.value
    )
    assert not again.exists() and not list(tmp_path.glob(".again-*"))
    other.write_text(json.dumps({"weights_digest": weights_digest(out)}))
    argv = ["train", "ship", *common, "--out", str(again), "--quality", str(other)]
    assert cmd_train(parser.parse_args(argv)) == 0
    assert weights_digest(again) == weights_digest(out)

    up = Upscaler(models.config, TorchBackend(models), max_batch=4)
    image, report = up.upscale(np.full((12, 12, 3), 0.5, dtype=np.float32), schedule="adaptive")
    assert image.shape == (48, 48, 3) and np.all(np.isfinite(image))
    assert report.unet_evaluations > 0


def test_ship_reuses_an_earlier_models_vae_and_mmle_and_says_so(tmp_path, cfg, images, monkeypatch):
    from adadiff import demo
    from adadiff.errors import ConfigError, ModelFolderError
    from adadiff.models.bundle import build_random, load_folder
    from adadiff.provenance import TrainingRecord, read_record, write_record
    from adadiff.training.ship import ship
    from adadiff.training.unet import train_unet

    earlier = build_random(cfg, seed=3).save(tmp_path / "earlier")
    (earlier / "MODEL_CARD.md").write_text("# older: a test model\n")
    write_record(
        earlier,
        TrainingRecord(photos={"astronaut": ("vae", "unet", "labels"), "moon": ("decoder",)}),
    )
    workdir = tmp_path / "w"
    train_unet(cfg, workdir, opts(2), small_pool(), images=images, vae_from=earlier)

    other = build_random(cfg, seed=4).save(tmp_path / "other")  # another encoder
    with pytest.raises(ConfigError, match="encoder"):
        ship(cfg, workdir, tmp_path / "refused", mmle_from=other)
    # calibrated weights are the policy's, not the MMLE's: its raw scores are the same
    calibrated = build_random(cfg, seed=3)
    weights = tuple(replace(m, weight=2 * m.weight) for m in cfg.mmle.metrics)
    calibrated.config = replace(cfg, mmle=replace(cfg.mmle, metrics=weights))
    calibrated.save(tmp_path / "calibrated")
    out = ship(cfg, workdir, tmp_path / "from-calibrated", mmle_from=tmp_path / "calibrated")
    shipped = load_folder(out)
    assert [m.weight for m in shipped.config.mmle.metrics] == [m.weight for m in cfg.mmle.metrics]
    # its MMLE scores images without a colour fix: not what a config with one outputs
    fixed = replace(cfg, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    with pytest.raises(ConfigError, match="color_fix none there, wavelet:3 here"):
        ship(fixed, workdir, tmp_path / "refused", mmle_from=earlier)
    assert not (tmp_path / "refused").exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ModelFolderError, match="cannot write the model folder"):
        ship(cfg, workdir, blocker / "out", mmle_from=earlier)

    out = ship(cfg, workdir, tmp_path / "out", mmle_from=earlier)
    # a full disk: safetensors reports the short write as its own error, not an OSError
    from safetensors import SafetensorError

    from adadiff.models.bundle import TorchModels

    def full_disk(self, folder, *, half=False):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    before = sorted(p.name for p in tmp_path.iterdir())
    with monkeypatch.context() as patch:
        patch.setattr(TorchModels, "save", full_disk)
        with pytest.raises(ModelFolderError, match=r"No space left.*existing .*out is unchanged"):
            ship(cfg, workdir, out, mmle_from=earlier)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left
    source, shipped = load_folder(earlier), load_folder(out)
    for a, b in ((source.mmle, shipped.mmle), (source.vae, shipped.vae)):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    card = (out / "MODEL_CARD.md").read_text()
    label = "an earlier `older` (VAE encoder sha256 "
    assert f"| vae | reused | - | - | - | from {label}" in card
    assert "| labels | reused |" in card and "| mmle | reused |" in card
    assert "| astronaut | scikit-image |" in card and "vae (reused), labels (reused) |" in card
    assert "| moon | scikit-image | " in card and "| decoder (reused) |" in card
    assert "**Not every stage kept them out**: astronaut by vae (reused), labels (reused)." in card
    assert f"- VAE: reused from {label}" in card and "unchanged (encoder and decoder);" in card
    assert f"- Labels and MMLE: reused from {label}" in card
    assert "The UNet draws every photo equally often. LR inputs" in card
    record = read_record(out)
    assert record is not None
    assert record.photos["astronaut"] == ("vae (reused)", "labels (reused)")
    assert record.sources["vae"].startswith(f"reused from {label}")
    assert demo.role("astronaut", out).startswith("its UNet never saw it")
    assert demo.role("chelsea", out) == "this model never trained on it"

    # A decoder fine-tune changes the reused VAE's decoder: the card must not call it unchanged.
    from adadiff.training.decoder import DecoderOptions, train_decoder

    train_decoder(
        cfg, workdir, opts(1), DecoderOptions(perceptual_weight=0.0, crop=32), images=images
    )
    card = (ship(cfg, workdir, tmp_path / "tuned", mmle_from=earlier) / "MODEL_CARD.md").read_text()
    assert "its encoder unchanged, its decoder the start of the decoder fine-tune below" in card
    assert "unchanged (encoder and decoder)" not in card

    shutil.rmtree(earlier)  # the card of the VAE's origin was the only record of its photos
    with pytest.raises(ModelFolderError, match="restore that folder"):
        ship(cfg, workdir, tmp_path / "again")


def test_ship_names_the_model_a_unet_started_from(tmp_path, cfg, images):
    from adadiff import demo
    from adadiff.errors import ModelFolderError
    from adadiff.models.bundle import build_random
    from adadiff.provenance import TrainingRecord, read_record, write_record
    from adadiff.training.ship import _unet_init, ship
    from adadiff.training.unet import train_unet

    earlier = build_random(cfg, seed=3).save(tmp_path / "earlier")
    (earlier / "MODEL_CARD.md").write_text("# older: a test model\n")
    write_record(earlier, TrainingRecord(photos={"astronaut": ("unet",), "moon": ("vae",)}))
    workdir = tmp_path / "w"
    train_unet(
        cfg, workdir, opts(2), small_pool(), images=images, vae_from=earlier, init_from=earlier
    )
    out = ship(cfg, workdir, tmp_path / "out", mmle_from=earlier)
    card = (out / "MODEL_CARD.md").read_text()
    label = "an earlier `older` (VAE encoder sha256 "
    assert f"- UNet + PFJ: started from the weights of {label}" in card
    assert "| astronaut | scikit-image |" in card and "| unet (reused) |" in card
    record = read_record(out)
    assert record is not None
    assert record.photos["astronaut"] == ("unet (reused)",)
    assert record.sources["unet"].startswith("trained in this run, starting from the weights of")
    # its UNet learned from astronaut through the weights it started from
    assert demo.role("astronaut", out) == "a photo this model was trained on"

    shutil.rmtree(earlier)  # its card was the only record of what the initial UNet saw
    with pytest.raises(ModelFolderError, match=r"started from the UNet of .*restore that folder"):
        _unet_init(workdir)


def test_same_encoder_holds_across_fp16_storage(tmp_path, cfg):
    from adadiff.models.bundle import build_random, load_folder
    from adadiff.training.fingerprint import same_encoder

    models = build_random(cfg, seed=3)
    half = load_folder(models.save(tmp_path / "half", half=True))  # fp16 on disk, fp32 loaded
    state, stored = models.vae.state_dict(), half.vae.state_dict()
    assert any(not torch.equal(state[k], stored[k]) for k in state)  # the rounding is real
    assert same_encoder(state, stored) and same_encoder(stored, state)
    other = build_random(cfg, seed=4).vae.state_dict()
    assert not same_encoder(state, other)
    # a change to the encoder alone counts; one to the decoder does not
    nudged = dict(state)
    key = next(k for k in state if k.startswith("encoder.") and k.endswith("weight"))
    nudged[key] = state[key] + 0.01
    assert not same_encoder(state, nudged)
    dkey = next(k for k in state if k.startswith("decoder.") and k.endswith("weight"))
    assert same_encoder(state, {**state, dkey: state[dkey] + 0.01})


def test_a_training_record_is_read_from_json_or_from_an_older_card(tmp_path):
    from adadiff.errors import ModelFolderError
    from adadiff.provenance import read_record

    assert read_record(tmp_path) is None and read_record(None) is None
    (tmp_path / "MODEL_CARD.md").write_text(
        "# m\n\n| photo | source | licence / statement | used by |\n|---|---|---|---|\n"
        "| astronaut | scikit-image | a | b | vae, unet |\n\nafter\n| x | y |\n"
    )
    record = read_record(tmp_path)
    assert record is not None and record.photos == {"astronaut": ("vae", "unet")}
    (tmp_path / "training.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="training record"):
        read_record(tmp_path)
    # a card saved by an editor in Latin-1: one line (the demo ended in a UnicodeDecodeError)
    (tmp_path / "training.json").unlink()
    (tmp_path / "MODEL_CARD.md").write_bytes("# m\n| café |\n".encode("latin-1"))
    with pytest.raises(ModelFolderError, match=r"not a readable model card .*save it as UTF-8"):
        read_record(tmp_path)


def test_half_storage_halves_the_big_weights_and_loads_as_fp32(tmp_path, cfg):
    from safetensors.torch import load_file

    from adadiff.models.bundle import WEIGHTS, build_random, load_folder
    from adadiff.training.ship import folder_bytes

    models = build_random(cfg, seed=2)
    full = models.save(tmp_path / "fp32")
    half = models.save(tmp_path / "fp16", half=True)
    stored = load_file(str(half / "unet" / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    assert folder_bytes(half / "unet") < 0.6 * folder_bytes(full / "unet")
    loaded = load_folder(half)
    for key, value in models.unet.state_dict().items():
        got = loaded.unet.state_dict()[key]
        assert got.dtype == value.dtype
        torch.testing.assert_close(got, value.half().float(), rtol=0, atol=0)


def test_shipped_tiny_weights_load_and_fit_the_budget():
    """`--model tiny` means the trained weights in the package, with their card, under 25 MB."""
    from adadiff.models.bundle import SHIPPED, load_models
    from adadiff.runtime.upscaler import Upscaler

    folder = SHIPPED / "tiny"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert 1e6 < size <= 25e6
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## Training" in card and "## Evaluation" in card and "held out" in card.lower()
    models = load_models("tiny")
    assert models.source == str(folder)
    assert Upscaler.from_pretrained("tiny").config == models.config


def test_label_lag_only_when_the_labels_came_from_another_unet_step():
    from adadiff.training.ship import LabelSummary, label_lag

    assert label_lag(LabelSummary(unet_steps={40}), 40) == ""
    assert label_lag(LabelSummary(), 40) == ""  # shards from before it was recorded
    assert label_lag(LabelSummary(unet_steps={40}), None) == ""
    assert "at step 30, 40; the shipped UNet is that run at step 40" in label_lag(
        LabelSummary(unet_steps={30, 40}), 40
    )


def test_the_card_says_which_reference_mmle_learned(cfg):
    from adadiff.config import MMLEConfig
    from adadiff.training.ship import LabelSummary, _labels_mmle_lines

    summary = {"recon_rows": 12, "options": {"recon_weight": 1.0, "latent_weight": 1.0}}
    paper = " ".join(_labels_mmle_lines(cfg, summary, LabelSummary()))
    assert "HR crop" not in paper and "latent part against the latent error" in paper
    hr = replace(cfg, mmle=MMLEConfig(metrics=cfg.mmle.metrics, reference="hr"))
    ours = " ".join(_labels_mmle_lines(hr, summary, LabelSummary()))
    assert 'also against the HR crop, which is what MMLE learns (`mmle.reference` "hr"' in ours
    assert "latent part" not in ours and "enters the head as one more feature" in ours


def test_the_card_says_how_the_label_trajectories_chose_their_jumps(tmp_path, cfg):
    """The card said "half oracle-driven DTSS and half random DTSS tiers" whatever
    --random-fraction the labels were made with."""
    from adadiff.training.ship import model_card

    params = dict.fromkeys(("unet", "vae", "pfj", "mmle", "total"), 1)
    labels = tmp_path / "labels"
    labels.mkdir()
    shard = synthetic_labels(16)  # 4 trajectories of 4 calls

    def said(**random: np.ndarray) -> str:
        np.savez(labels / "shard-00000.npz", **shard, **random)
        card = model_card(cfg, tmp_path, params, 1.0, None)
        (line,) = [row for row in card.splitlines() if row.startswith("- Labels: ")]
        return line.split("runtime sampler, ")[1].split(";")[0]

    for picked, text in (
        ([], "oracle-driven DTSS"),
        ([0, 3], "half oracle-driven DTSS and half random DTSS tiers"),
        ([2], "75% oracle-driven DTSS and 25% random DTSS tiers"),
        ([0, 1, 2], "25% oracle-driven DTSS and 75% random DTSS tiers"),
        ([0, 1, 2, 3], "random DTSS tiers"),
    ):
        assert said(random=np.isin(shard["traj"], picked)) == text
    # shards from before the random trajectories were recorded: no share is claimed
    assert said() == "oracle-driven DTSS and random DTSS tiers"


def test_the_card_names_the_scale_augmentation_a_stage_trained_with(tmp_path, cfg, images):
    """--min-scale shows the photos at other scales than their own: the card's account of the
    data (flips, rotations, colour jitter) says so for the stage that used it."""
    from adadiff.training.ship import model_card
    from adadiff.training.vae import VAEOptions, train_vae

    train_vae(
        cfg, tmp_path, opts(1), VAEOptions(perceptual_weight=0.0, min_scale=0.5), images=images
    )
    vae_line = next(
        line
        for line in model_card(cfg, tmp_path, {}, 0.0, None).splitlines()
        if line.startswith("- VAE: ")
    )
    assert "downscaled by a random factor in [0.5, 1]" in vae_line, vae_line


def _evaluation(lpips: float, digest: str | None = None) -> dict:
    methods = {
        "tiny-adaptive": {"psnr": 25.0, "ssim": 0.7, "lpips": lpips, "brisque": 30.0},
        "tiny-uniform-5": {"psnr": 25.1, "ssim": 0.71, "lpips": 0.2, "brisque": 33.0},
    }
    summary = {"methods": methods, "best_uniform_at_no_more_evaluations": "tiny-uniform-5"}
    return {"model": {"config_digest": digest} if digest else {}, "summary": summary}


def test_card_refresh_rewrites_only_the_evaluation_section(tmp_path, cfg):
    from adadiff.artifacts import weights_digest
    from adadiff.errors import ConfigError, ModelFolderError
    from adadiff.training.cli import add_train_parser, cmd_train
    from adadiff.training.ship import evaluation_lines, refresh_card

    folder = tmp_path / "model"
    folder.mkdir()
    cfg.save(folder)
    quality: dict = {}
    head = ["# tiny: a test card", "", "## Training", "", "| unet | 3 |", ""]
    notes = ["## Notes added after shipping", "", "- a hand note.", ""]
    old = evaluation_lines(quality, _evaluation(0.31))
    card = folder / "MODEL_CARD.md"
    card.write_text("\n".join([*head, *old, *notes]))
    weights = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "MODEL_CARD.md"}

    # the same JSONs give back the same card, byte for byte
    refresh_card(folder, evaluation=_evaluation(0.31, cfg.digest()), quality=quality)
    assert card.read_text() == "\n".join([*head, *old, *notes])

    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(_evaluation(0.27, cfg.digest())))
    quality_json = tmp_path / "quality.json"
    quality_json.write_text("{}")
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "card", str(folder), "--eval", str(eval_json), "--quality", str(quality_json)]
    assert cmd_train(parser.parse_args(argv)) == 0
    text = card.read_text()
    assert "| tiny-adaptive | 25.00 | 0.7000 | 0.2700 |" in text and "0.3100" not in text
    assert "no more UNet evaluations than adaptive: tiny-uniform-5." in text
    assert text.startswith("\n".join(head)) and text.endswith("\n".join(notes))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "MODEL_CARD.md"} == (
        weights
    )

    # figures of another model are refused, and the card is left as it was
    with pytest.raises(ConfigError, match="describes another model"):
        refresh_card(folder, evaluation=_evaluation(0.2, "0123456789abcdef"), quality=quality)
    # ... also when only the weights differ (candidates of one recipe share a config)
    other = _evaluation(0.2, cfg.digest())
    other["model"]["weights_digest"] = "0123456789abcdef"
    with pytest.raises(ConfigError, match="evaluate_tiny JSON was made with other weights"):
        refresh_card(folder, evaluation=other, quality=quality)
    with pytest.raises(ConfigError, match="quality JSON was made with other weights"):
        refresh_card(
            folder, evaluation=_evaluation(0.2), quality={"weights_digest": "0123456789abcdef"}
        )
    own = _evaluation(0.25, cfg.digest())
    own["model"]["weights_digest"] = weights_digest(folder)
    refresh_card(folder, evaluation=own, quality={"weights_digest": weights_digest(folder)})
    assert "| tiny-adaptive | 25.00 | 0.7000 | 0.2500 |" in card.read_text()
    refresh_card(folder, evaluation=_evaluation(0.27, cfg.digest()), quality=quality)
    # JSONs that are not those benchmarks' output are one-line errors
    with pytest.raises(ConfigError, match="holds a list, not what"):
        refresh_card(folder, evaluation=[1, 2], quality=quality)  # type: ignore[arg-type]
    broken = {"results": {"bicubic": {"model": {}}}}
    with pytest.raises(ConfigError, match="lacks what the card quotes"):
        refresh_card(folder, evaluation=_evaluation(0.2), quality=broken)
    assert card.read_text() == text
    card.write_text("# a card without the section\n")
    with pytest.raises(ModelFolderError, match="no '## Evaluation' section"):
        refresh_card(folder, evaluation=_evaluation(0.2), quality=quality)
    with pytest.raises(ModelFolderError, match="not a shipped model folder"):
        refresh_card(tmp_path, evaluation=_evaluation(0.2), quality=quality)


def test_ship_without_out_refuses_to_replace_a_built_in_model(tmp_path):
    """A config named tiny shipped without --out would overwrite the package's own weights."""
    from adadiff.config import ModelConfig
    from adadiff.models.bundle import SHIPPED
    from adadiff.training.cli import add_train_parser, cmd_train

    model_dir = tmp_path / "cfg"
    model_dir.mkdir()
    ModelConfig.load(SHIPPED / "tiny").save(model_dir)
    before = {p.name: p.stat().st_mtime_ns for p in (SHIPPED / "tiny").rglob("*")}
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "ship", "--model", str(model_dir), "--workdir", str(tmp_path / "w")]
    )
    with pytest.raises(ConfigError, match="would replace the built-in model 'tiny'"):
        cmd_train(args)
    assert {p.name: p.stat().st_mtime_ns for p in (SHIPPED / "tiny").rglob("*")} == before


def test_a_stage_folder_given_as_workdir_is_refused(tmp_path, vae_workdir, cfg):
    """`--workdir W/vae` started a new VAE run in W/vae/vae, and sent the other stages to look
    for W/vae/unet."""
    from adadiff.training.cli import add_train_parser, cmd_train

    model_dir = tmp_path / "cfg"
    model_dir.mkdir()
    cfg.save(model_dir)
    vae = tmp_path / "w" / "vae"
    shutil.copytree(vae_workdir / "vae", vae)
    labels = tmp_path / "w" / "labels"
    labels.mkdir()
    np.savez(labels / "shard-00000.npz", **synthetic_labels(8))
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    for stage, folder in (("vae", vae), ("unet", vae), ("mmle", labels), ("ship", labels)):
        argv = ["train", stage, "--model", str(model_dir), "--workdir", str(folder)]
        small = [] if stage == "ship" else ["--steps", "1", "--batch", "2"]
        with pytest.raises(ConfigError, match="one stage's folder, not a workdir"):
            cmd_train(parser.parse_args([*argv, *small]))
        assert not (folder / stage).exists()


def test_an_init_from_folder_with_an_empty_or_latin1_card_is_named_or_refused(tmp_path, cfg):
    """Reused.of read the card's first line: an empty card was an IndexError and a Latin-1 one
    a UnicodeDecodeError traceback in `train ship --init-from`."""
    from adadiff.errors import ModelFolderError
    from adadiff.models.bundle import build_random
    from adadiff.training.ship import Reused

    earlier = build_random(cfg, seed=3).save(tmp_path / "earlier")
    (earlier / "MODEL_CARD.md").write_text("")
    assert Reused.of(earlier).label.startswith("an earlier `earlier` (VAE encoder sha256 ")
    (earlier / "MODEL_CARD.md").write_bytes("# caf\xe9: a test model\n".encode("latin-1"))
    with pytest.raises(ModelFolderError, match=r"not a readable model card .* save it as UTF-8"):
        Reused.of(earlier)


def test_the_card_says_when_a_quality_interval_is_unavailable():
    from adadiff.training.ship import quality_section

    # benchmarks/quality.py on one 128 px block: nothing to resample, the interval is null
    one = {k: {"pooled": [0.3, None, None]} for k in ("lpips", "psnr", "ssim")}
    quality = {
        "photos": ["astronaut"],
        "results": {"bicubic": {"bicubic": one, "model": one}},
        "vae_round_trip": one,
    }
    text = "\n".join(quality_section(quality))
    assert text.count("0.300 (interval unavailable)") == 3


def test_the_cards_evaluation_states_intervals_ranks_and_targets_as_measured():
    from adadiff.training.ship import _eval_section, quality_section

    e = {k: {"pooled": [0.25, 0.2, 0.3]} for k in ("lpips", "psnr", "ssim")}
    quality = {"results": {"bicubic": {"bicubic": e, "model": e}}}
    assert "| 0.250 (0.200 to 0.300) |" in "\n".join(quality_section(quality))
    mmle = {
        "spearman": {"R_FR": 0.5, "R_NR": None},  # None: a constant score, nothing to rank
        "spearman_bootstrap_90": {"R_FR": [0.4, 0.6], "R_NR": [None, None]},
    }
    targets = {"adaptive beats uniform": False, "PSNR kept": True}
    text = "\n".join(_eval_section({"summary": {"mmle": mmle, "targets": targets}}))
    assert "Spearman R_FR 0.500, R_NR none;" in text
    assert "resampled: R_FR 0.400-0.600, R_NR unavailable." in text
    assert "Targets: adaptive beats uniform MISSED, PSNR kept met" in text


def test_a_card_of_a_workdir_that_recorded_nothing_says_so(tmp_path, cfg):
    from adadiff.training.ship import _photo_rows, _strength, model_card

    # no stage recorded its photos: the table lists those this machine trains on, marked so
    rows, unrecorded = _photo_rows({"vae": [], "unet": []})
    assert rows and all(row.endswith("| not recorded |") for row in rows)
    assert unrecorded == ["vae", "unet"]
    card = model_card(cfg, tmp_path, dict.fromkeys(("unet", "total"), 1), 1.0, None)
    # no Real-ESRGAN share recorded: every LR input is bicubic
    assert "LR inputs: bicubic x4 (antialiased, MATLAB-style) with probability 1.00," in card
    # nor a scale augmentation, nor a gentler Real-ESRGAN strength that no input was drawn with
    assert "downscaled by a random factor" not in card
    assert _strength({"realesrgan_strength": "mild", "realesrgan_prob": 0.0}) == ""


def test_the_card_says_which_unet_drew_the_decoders_samples():
    from adadiff.training.ship import _decoder_lag

    assert _decoder_lag({"unet_step": 40}, {"step": 40}) == ""
    # drawn from an earlier step of the shipped UNet's run
    assert _decoder_lag({"unet_step": 30}, {"step": 40}).startswith(
        " Its samples came from the UNet at step 30; the shipped UNet is that run at step 40"
    )
    # a decoder resumed with sample phases recorded only from its step 5
    phases = [{"from_step": 5, "unet_step": 40}]
    assert _decoder_lag({"sample_phases": phases}, {"step": 40}) == (
        " Its samples came from decoder step 5 on the UNet at step 40 (before decoder step 5: "
        "not recorded)."
    )


def test_a_card_with_a_reused_mmle_counts_only_its_own_training_time(tmp_path, cfg):
    from adadiff.training.ship import Reused, model_card

    reused = Reused(tmp_path / "earlier", "an earlier `tiny`", {})
    card = model_card(cfg, tmp_path, {"total": 1}, 1.0, None, mmle_reused=reused)
    (line,) = [row for row in card.splitlines() if row.startswith("Training time: ")]
    assert "(vae 0.0, unet 0.0), reused stages not counted, single process" in line
