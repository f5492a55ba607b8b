"""The UNet + PFJ stage. Micro config, a few steps each (fixtures: conftest.py)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

# FR metrics only: numpy, no set-up files needed.
from training_helpers import (
    opts,
    small_pool,
)

from adadiff.errors import ConfigError, ModelFolderError
from adadiff.training.checkpoint import load_latest


def test_unet_resumes_with_identical_next_loss(tmp_path, vae_workdir, cfg, images):
    from adadiff.training.unet import train_unet

    for name in ("a", "b"):
        shutil.copytree(vae_workdir / "vae", tmp_path / name / "vae")
    straight = train_unet(cfg, tmp_path / "a", opts(3), small_pool(), images=images)
    train_unet(cfg, tmp_path / "b", opts(2), small_pool(), images=images)
    resumed = train_unet(cfg, tmp_path / "b", opts(3), small_pool(), images=images)
    assert resumed.history[-1]["losses"] == straight.history[-1]["losses"]
    state = load_latest(tmp_path / "b" / "unet", stage="unet")["state"]
    assert {"unet", "pfj", "ema", "vae", "scaling_factor", "text_embedding"} <= set(state)
    assert state["pool"].shape == (4, 2, 4, 16, 16)
    # extending a constant-rate run is one phase; another data mix from step 3 is a second
    summary = load_latest(tmp_path / "b" / "unet", stage="unet")["summary"]
    assert [p["from_step"] for p in summary["phases"]] == [0]
    train_unet(cfg, tmp_path / "b", opts(4), small_pool(weighting="area"), images=images)
    phases = load_latest(tmp_path / "b" / "unet", stage="unet")["summary"]["phases"]
    assert [(p["from_step"], p["weighting"]) for p in phases] == [(0, "photo"), (3, "area")]
    from adadiff.training.ship import _phase_lines

    (line,) = _phase_lines(phases, 4)
    assert "steps 0 to 3: photos drawn equally" in line
    assert "steps 3 to 4: photos drawn by area" in line


def test_unet_needs_a_vae_checkpoint(tmp_path, cfg, images):
    from adadiff.training.unet import train_unet

    with pytest.raises(ModelFolderError, match="adadiff train vae"):
        train_unet(cfg, tmp_path, opts(1), images=images)


def test_unet_refuses_a_vae_or_unet_checkpoint_of_another_vae_config(
    tmp_path, vae_workdir, cfg, images
):
    """Said as a config error before the checkpoint's VAE loads into this config's (where it
    was a state-dict traceback); another UNet on the workdir's VAE is fine."""
    from dataclasses import replace

    from adadiff.training.unet import train_unet

    wider_vae = replace(cfg, vae={**cfg.vae, "block_out_channels": [8, 16]})
    work = tmp_path / "w"
    shutil.copytree(vae_workdir / "vae", work / "vae")
    with pytest.raises(ConfigError, match=r"vae holds a checkpoint .* whose vae differ"):
        train_unet(wider_vae, work, opts(1), small_pool(), images=images)
    train_unet(cfg, work, opts(1), small_pool(), images=images)
    with pytest.raises(ConfigError, match=r"unet holds a checkpoint .* whose vae differ"):
        train_unet(wider_vae, work, opts(2), small_pool(), images=images)
    # the latent scale a shipped adadiff.json records is measured, not trained: still this VAE
    measured = replace(cfg, scaling_factor=0.5, vae={**cfg.vae, "scaling_factor": 0.5})
    assert train_unet(measured, work, opts(2), small_pool(), images=images).step == 2
    wider_unet = replace(cfg, unet={**cfg.unet, "block_out_channels": [8, 16, 16, 32]})
    other = tmp_path / "other"
    shutil.copytree(vae_workdir / "vae", other / "vae")
    assert train_unet(wider_unet, other, opts(1), small_pool(), images=images).step == 1


def test_a_resume_with_another_tile_size_encodes_a_new_pool(tmp_path, vae_workdir, cfg, images):
    """Tiling may change at a resume, but the tile is the crops' size: the checkpoint's pool of
    the old size was kept and the first refresh failed on its shape."""
    from dataclasses import replace

    from adadiff.training.unet import train_unet

    work = tmp_path / "w"
    shutil.copytree(vae_workdir / "vae", work / "vae")
    train_unet(cfg, work, opts(1), small_pool(), images=images)
    smaller = replace(cfg, tile_size=16, tile_overlap=4)
    assert train_unet(smaller, work, opts(2), small_pool(), images=images).step == 2
    pool = load_latest(work / "unet", stage="unet")["state"]["pool"]
    assert pool.shape == (4, 2, 4, 8, 8)


def test_unet_can_take_the_vae_of_a_model_folder(tmp_path, cfg, images, tiny_dir):
    from adadiff.models.bundle import build_random
    from adadiff.training.unet import train_unet

    folder = build_random(cfg, seed=5).save(tmp_path / "model")
    train_unet(cfg, tmp_path / "w", opts(1), small_pool(), images=images, vae_from=folder)
    state = load_latest(tmp_path / "w" / "unet", stage="unet")["state"]
    source = build_random(cfg, seed=5)
    for key, value in source.vae.state_dict().items():
        torch.testing.assert_close(state["vae"][key], value, rtol=0, atol=0)
    assert state["scaling_factor"] == cfg.scaling_factor
    summary = load_latest(tmp_path / "w" / "unet", stage="unet")["summary"]
    assert summary["vae_from"] == str(folder)  # the card names where the VAE came from
    with pytest.raises(ConfigError, match=r"--vae-from .* pass its folder as --model too"):
        train_unet(cfg, tmp_path / "x", opts(1), small_pool(), images=images, vae_from=tiny_dir)


def test_unet_can_start_from_the_weights_of_a_model_folder(
    tmp_path, vae_workdir, cfg, images, caplog
):
    from adadiff.models.bundle import build_random
    from adadiff.training.unet import train_unet

    source = build_random(cfg, seed=5)
    folder = source.save(tmp_path / "model")
    shutil.copytree(vae_workdir / "vae", tmp_path / "w" / "vae")
    logger = logging.getLogger("adadiff.training")
    # the CLI's tests turn propagation off for this logger; listen to it directly
    logger.addHandler(caplog.handler)
    try:
        train_unet(cfg, tmp_path / "w", opts(1), small_pool(), images=images, init_from=folder)
    finally:
        logger.removeHandler(caplog.handler)
    # that folder's UNet learned a random VAE's latents, not the workdir VAE's
    assert "another VAE encoder" in caplog.text
    ckpt = load_latest(tmp_path / "w" / "unet", stage="unet")
    # one AdamW step (lr 5e-4 in the warm-up) moves no weight further than its lr
    for part in ("unet", "pfj"):
        start = getattr(source, part).state_dict()
        moved = max((ckpt["state"][part][k] - v).abs().max().item() for k, v in start.items())
        assert moved <= 1e-3, f"{part} moved {moved} from the initial weights"
    torch.testing.assert_close(ckpt["state"]["text_embedding"], source.text_embedding)
    assert ckpt["summary"]["init_from"] == str(folder)
    # a random init (the default) is far from those weights
    shutil.copytree(vae_workdir / "vae", tmp_path / "r" / "vae")
    train_unet(cfg, tmp_path / "r", opts(1), small_pool(), images=images)
    fresh = load_latest(tmp_path / "r" / "unet", stage="unet")
    assert fresh["summary"]["init_from"] == ""
    far = max(
        (fresh["state"]["unet"][k] - v).abs().max().item()
        for k, v in source.unet.state_dict().items()
    )
    assert far > 0.01
    # the same command again resumes its own checkpoint and keeps the record of the start
    train_unet(cfg, tmp_path / "w", opts(2), small_pool(), images=images, init_from=folder)
    resumed = load_latest(tmp_path / "w" / "unet", stage="unet")
    assert resumed["step"] == 2 and resumed["summary"]["init_from"] == str(folder)


def test_unet_init_from_refuses_another_architecture(tmp_path, vae_workdir, cfg, images, tiny_dir):
    from adadiff.training.unet import train_unet

    shutil.copytree(vae_workdir / "vae", tmp_path / "w" / "vae")
    with pytest.raises(ConfigError, match=r"--init-from .*'unet' entries"):
        train_unet(cfg, tmp_path / "w", opts(1), small_pool(), images=images, init_from=tiny_dir)
    assert load_latest(tmp_path / "w" / "unet", stage="unet") is None


def test_unet_options_check_the_photo_weighting():
    from adadiff.training.unet import UNetOptions

    assert UNetOptions().weighting == "photo"  # by area, two photos were half the crops
    with pytest.raises(ConfigError, match="weighting"):
        UNetOptions(weighting="pixels")  # type: ignore[arg-type]


def test_unet_options_refuse_a_bad_scale_before_any_photo_loads():
    from adadiff.training.unet import UNetOptions

    with pytest.raises(ConfigError, match="min_scale"):
        UNetOptions(min_scale=1.5)


def test_unet_options_check_the_degradation_strength():
    from adadiff.training.unet import UNetOptions

    assert UNetOptions().realesrgan_strength == "full"
    assert UNetOptions(realesrgan_strength="mild").realesrgan_strength == "mild"
    assert UNetOptions(realesrgan_strength="camera").realesrgan_strength == "camera"
    with pytest.raises(ConfigError, match="strength"):
        UNetOptions(realesrgan_strength="harsh")


def test_training_stages_never_draw_the_holdout_photos():
    from adadiff.training.data import HOLDOUT, VALIDATION
    from adadiff.training.decoder import DecoderOptions
    from adadiff.training.pairs import photo_names
    from adadiff.training.unet import UNetOptions

    assert UNetOptions().photos == "train" and DecoderOptions().photos == "train"
    both = photo_names("train+validation")
    assert both == photo_names("train") + photo_names("validation")
    assert set(VALIDATION) <= set(both) and not set(HOLDOUT) & set(both)
    for options in (UNetOptions, DecoderOptions):
        options(photos="train+validation")
        with pytest.raises(ConfigError, match="hold-out photos are for reporting only"):
            options(photos="holdout")


def test_a_phase_recorded_before_an_option_existed_holds_its_default():
    from adadiff.training.loop import TrainOptions
    from adadiff.training.unet import UNetOptions, training_phases

    old = {"from_step": 0, **UNetOptions().__dict__, "lr": 1e-3, "batch": 2}
    old["schedule"] = "constant"
    del old["realesrgan_strength"]  # written before the option existed
    ckpt = {"step": 5, "summary": {"phases": [old]}}
    run = TrainOptions(steps=9, batch=2, lr=1e-3)
    assert training_phases(ckpt, run, UNetOptions()) == [old]
    mild = UNetOptions(realesrgan_strength="mild", realesrgan_prob=0.5)
    changed = training_phases(ckpt, run, mild)
    assert [(p["from_step"], p.get("realesrgan_strength")) for p in changed] == [
        (0, None),
        (5, "mild"),
    ]
    from adadiff.training.ship import _phase_lines

    (line,) = _phase_lines(changed, 9)
    assert "steps 0 to 5: photos drawn equally, Real-ESRGAN share 0.0, lr 0.001 (constant);" in line
    assert "steps 5 to 9: photos drawn equally, Real-ESRGAN share 0.5 (mild strength" in line
    assert line.endswith("kinder JPEG), lr 0.001 (constant).")


def test_a_run_resumed_without_dead_leaves_still_lists_them():
    from adadiff.training.ship import _phase_lines, _unet_photos
    from adadiff.training.unet import UNetOptions

    base = {**UNetOptions().__dict__, "lr": 1e-3, "batch": 2, "schedule": "constant"}
    phases = [
        {"from_step": 0, **base, "deadleaves": 3, "photos": "train"},
        {"from_step": 5, **base, "deadleaves": 0, "photos": "train+validation"},
    ]
    summary = {"photos": ["brick", "grass"], "phases": phases}
    leaves = ["deadleaves-0", "deadleaves-1", "deadleaves-2"]
    # the validation photos of the second phase count whatever the summary recorded
    assert _unet_photos(summary) == ["brick", "grass", "rocket", *leaves]
    (line,) = _phase_lines(phases, 9)
    assert "steps 0 to 5: photos (train) drawn equally, 3 dead-leaves images among them," in line
    assert "steps 5 to 9: photos (train+validation) drawn equally, Real-ESRGAN" in line
    # a run that never had them lists its photos only
    train_only = [{**phases[1], "photos": "train"}]
    assert _unet_photos({"photos": ["brick"], "phases": train_only}) == ["brick"]


def test_a_resume_with_fewer_photos_keeps_the_earlier_ones_on_record():
    from adadiff.training.pairs import merged_photos

    assert merged_photos(["brick", "grass", "rocket"], ["brick", "moon"]) == [
        "brick",
        "grass",
        "rocket",
        "moon",
    ]
    assert merged_photos([], ["brick"]) == ["brick"]


def test_gains_follow_the_runtime_rules():
    from adadiff.training.unet import sample_gains

    t = torch.tensor([999, 700, 499, 10] * 250)
    g = sample_gains(t, 2, 500, 0.5, 0.2, torch.Generator().manual_seed(0))
    assert torch.all(g[t >= 500, 1] == 0)
    zero = (g == 0).all(dim=1).float().mean()
    assert 0.4 < float(zero) < 0.6
    assert float(g.abs().max()) < 1


def test_unet_device_is_checked_before_any_photo_loads(monkeypatch):
    from adadiff.training.unet import UNetOptions, training_device

    with pytest.raises(ConfigError, match="--device gpu is not a device"):
        UNetOptions(device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a CUDA machine
    with pytest.raises(ConfigError, match=r"torch sees no CUDA device.*--device cpu"):
        training_device("cuda")
    assert training_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_unet_on_cuda_resumes_on_the_cpu(tmp_path, vae_workdir, cfg, images):
    """A run on the GPU and one that continues on the CPU: same samples, losses close."""
    from adadiff.training.unet import train_unet

    for name in ("a", "b"):
        shutil.copytree(vae_workdir / "vae", tmp_path / name / "vae")
    cpu = train_unet(cfg, tmp_path / "a", opts(3), small_pool(), images=images)
    train_unet(cfg, tmp_path / "b", opts(2), small_pool(device="cuda"), images=images)
    resumed = train_unet(cfg, tmp_path / "b", opts(3), small_pool(), images=images)
    got, want = resumed.history[-1]["losses"]["loss"], cpu.history[-1]["losses"]["loss"]
    assert got == pytest.approx(want, rel=1e-2)


def test_a_resumed_unet_keeps_its_vae(tmp_path, vae_workdir, cfg, images, caplog):
    from adadiff.training.unet import train_unet
    from adadiff.training.vae import VAEOptions, train_vae

    work = tmp_path / "w"
    shutil.copytree(vae_workdir / "vae", work / "vae")
    train_unet(cfg, work, opts(1), small_pool(), images=images)
    own = load_latest(work / "unet", stage="unet")["state"]["vae"]
    # the VAE stage trains on; the UNet resumes on the VAE it started with, and says so
    train_vae(cfg, work, opts(4), VAEOptions(perceptual_weight=0.0), images=images)
    with caplog.at_level(logging.INFO, logger="adadiff.training"):
        train_unet(cfg, work, opts(2), small_pool(), images=images)
    state = load_latest(work / "unet", stage="unet")["state"]
    assert all(torch.equal(state["vae"][k], own[k]) for k in own)
    assert "the VAE stage is at step 4 now" in caplog.text
    assert "VAE from the step-1 UNet checkpoint" in caplog.text
    summary = load_latest(work / "unet", stage="unet")["summary"]
    assert summary["vae_from"] == ""  # the workdir's VAE, as when the run started
    # a UNet folder carried alone to another workdir resumes: its checkpoint holds the VAE
    carried = tmp_path / "carried"
    shutil.copytree(work / "unet", carried / "unet")
    assert train_unet(cfg, carried, opts(3), small_pool(), images=images).step == 3


def test_a_resume_names_each_changed_stage_option(tmp_path, vae_workdir, cfg, images, caplog):
    from adadiff.training.unet import train_unet

    work = tmp_path / "w"
    shutil.copytree(vae_workdir / "vae", work / "vae")
    train_unet(cfg, work, opts(1), small_pool(realesrgan_prob=0.5), images=images)
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        train_unet(cfg, work, opts(2), small_pool(realesrgan_prob=0.0), images=images)
    assert "--realesrgan-prob is 0.0 now, 0.5 before this resume" in caplog.text
    assert "--pool" not in caplog.text  # unchanged options are not named
    from adadiff.training.loop import _report_stage_changes
    from adadiff.training.unet import UNetOptions

    caplog.clear()
    then = {"summary": {"options": {**UNetOptions().__dict__, "weighting": "area"}}}
    now = {**UNetOptions(device="cuda").__dict__, "weighting": "photo"}
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        _report_stage_changes("unet", then, now)
    assert "pass --photo-weighting area" in caplog.text  # the flag's real name
    from adadiff.training.decoder import DecoderOptions

    caplog.clear()
    then = {"summary": {"options": DecoderOptions().__dict__}}
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        _report_stage_changes("decoder", then, DecoderOptions(sample_intervals=(999,)).__dict__)
    assert "pass --sample-intervals 200,100,50 to keep" in caplog.text  # as the parser takes it
    from adadiff.training.mmle import MMLEOptions

    caplog.clear()
    then = {"summary": {"options": MMLEOptions().__dict__}}
    with caplog.at_level(logging.WARNING, logger="adadiff.training"):
        _report_stage_changes("mmle", then, MMLEOptions(val_photos=("grass",)).__dict__)
    assert "pass --val-photos '' to keep" in caplog.text  # an empty list, as a shell passes it
    assert "--device" not in caplog.text  # a checkpoint resumes on either device


def test_a_stop_while_the_first_pool_fills_drops_the_step(tmp_path, vae_workdir, cfg, images):
    """Filling the first pool of encoded crops takes minutes on a CPU: a stop signal between
    its chunks ends the run there (nothing trained) instead of after the fill."""
    import os
    import signal

    from adadiff.training.loop import StepAbandoned, stop_on_signals
    from adadiff.training.unet import UNetOptions, train_unet

    work = tmp_path / "w"
    shutil.copytree(vae_workdir / "vae", work / "vae")
    calls = []
    from adadiff.training import unet as unet_module

    real = unet_module.UNetStage.fresh_pairs

    def fill(self, n, chunk=32, *, stoppable=False):
        calls.append(n)
        if stoppable and len(calls) == 1:  # the signal lands during the first chunk
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, n, chunk=2, stoppable=stoppable)

    unet_module.UNetStage.fresh_pairs = fill
    try:
        result = train_unet(cfg, work, opts(3), UNetOptions(pool=8, refresh=2), images=images)
    finally:
        unet_module.UNetStage.fresh_pairs = real
    assert (result.step, result.stopped) == (0, True)
    assert len(calls) == 1  # the fill stopped, and no step ran (each would refresh the pool)
    assert not list((work / "unet").glob("*.pt"))  # nothing trained, nothing saved
    with stop_on_signals() as flag, pytest.raises(StepAbandoned):
        flag.reason = "SIGINT"
        real(object.__new__(unet_module.UNetStage), 4, stoppable=True)
