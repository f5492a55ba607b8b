"""Checkpoints and the training loop's schedules.

Micro config, a few steps each; fixtures in conftest.py, helpers in training_helpers.py."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

# FR metrics only: numpy, no set-up files needed.
from adadiff.errors import ConfigError, ModelFolderError
from adadiff.training.checkpoint import list_checkpoints, load_latest, save_checkpoint
from adadiff.training.loop import TrainOptions


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"stage": "demo", "w": torch.ones(2) * step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not list(tmp_path.glob("*.tmp"))
    latest = load_latest(tmp_path, stage="demo")
    assert latest["step"] == 5 and torch.equal(latest["w"], torch.full((2,), 5.0))
    with pytest.raises(ModelFolderError, match="written by the 'demo' trainer"):
        load_latest(tmp_path, stage="vae")
    # damaged or foreign files: one line on what is wrong, not torch's paragraphs of advice
    whole = (tmp_path / "ckpt-00000005.pt").read_bytes()
    for content, reason in (
        (b"not a checkpoint", "more than tensors and plain data, or is no torch file"),
        (b"", "the file is empty"),
        (whole[: len(whole) // 2], "failed reading zip archive"),
    ):
        (tmp_path / "ckpt-00000009.pt").write_bytes(content)
        with pytest.raises(ModelFolderError, match="not a readable") as caught:
            load_latest(tmp_path)
        message = str(caught.value)
        assert reason in message and "\n" not in message and "weights_only" not in message
        assert message.endswith("delete it to fall back to the previous one")


def test_a_checkpoint_cut_short_by_a_full_disk_is_an_os_error(tmp_path):
    """torch.save reports a short write as a RuntimeError; the loop turns OSErrors into its
    one-line "the step-N checkpoint is intact" message, so the save must raise one."""
    from helpers import run_with_file_size_limit

    body = (
        "import torch\n"
        "from adadiff.training.checkpoint import save_checkpoint\n"
        "save_checkpoint(sys.argv[1], 1, {'w': torch.zeros(4)})\n"
        "# limited\n"
        "try:\n"
        "    save_checkpoint(sys.argv[1], 2, {'w': torch.zeros(100_000)})\n"
        "except OSError as exc:\n"
        "    print('OSError', exc)\n"
    )
    stdout = run_with_file_size_limit(body, tmp_path, 4096)
    assert stdout.startswith("OSError") and "disk full" in stdout
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt"]


def test_learning_rate_schedules():
    constant = TrainOptions(steps=1000, batch=1, lr=2.0, warmup=100)
    assert [constant.lr_at(s) for s in (0, 99, 500, 999)] == [0.02, 2.0, 2.0, 2.0]
    cosine = replace(constant, schedule="cosine")
    assert cosine.lr_at(0) == constant.lr_at(0) and cosine.lr_at(100) == pytest.approx(2.0)
    assert cosine.lr_at(550) == pytest.approx(1.0)  # half-way through the decay
    assert cosine.lr_at(999) < 1e-4
    lrs = [cosine.lr_at(s) for s in range(100, 1000)]
    assert np.all(np.diff(lrs) <= 0)
    with pytest.raises(ConfigError, match="schedule"):
        replace(constant, schedule="step")


def test_a_resume_names_how_the_cosine_decay_changed(caplog):
    from dataclasses import asdict

    from adadiff.training.loop import _report_changes

    def resume(before: TrainOptions, now: TrainOptions) -> str:
        caplog.clear()
        with caplog.at_level("WARNING", logger="adadiff.training"):
            _report_changes("unet", {"step": 200, "options": asdict(before)}, now)
        return caplog.text

    cosine = TrainOptions(steps=300, batch=1, lr=1e-4, warmup=10, schedule="cosine")
    text = resume(cosine, replace(cosine, steps=600))
    assert "the cosine decay now ends at step 600, not 300" in text
    # the run was constant: it had no decay, so none ended at its --steps
    text = resume(replace(cosine, schedule="constant"), replace(cosine, steps=68))
    assert "--lr-schedule is cosine now, constant before" in text
    assert "the cosine decay now runs to step 68: the learning rate at step 200 goes from " in text
    assert "not 300" not in text
    assert resume(cosine, cosine) == ""


class Counter:
    """A stage whose one weight counts its steps; ``losses`` overrides the loss at some steps."""

    name = "demo"

    def __init__(self, losses: dict[int, float] | None = None) -> None:
        self.w = 0.0
        self.losses = losses or {}

    def step(self, step: int) -> dict[str, float]:
        self.w += 1
        return {"loss": self.losses.get(step, 1.0 / (step + 1))}

    def state_dict(self) -> dict:
        return {"w": torch.tensor(self.w)}

    def load_state_dict(self, state: dict) -> None:
        self.w = float(state["w"])

    def summary(self) -> dict:
        return {}


def _opts(**kw) -> TrainOptions:
    return TrainOptions(**{"steps": 6, "batch": 1, "lr": 1.0, "ckpt_every": 4, **kw})


def test_a_run_saves_each_checkpoint_once_and_resumes(tmp_path, monkeypatch):
    from adadiff.training import loop

    saved = []
    real = loop.save_checkpoint
    monkeypatch.setattr(
        loop,
        "save_checkpoint",
        lambda f, step, p, keep: saved.append(step) or real(f, step, p, keep),
    )
    result = loop.run_stage(Counter(), tmp_path, _opts())
    assert (result.step, result.stopped, saved) == (6, False, [4, 6])
    stage = Counter()
    loop.run_stage(stage, tmp_path, _opts(steps=9))
    assert stage.w == 9 and saved == [4, 6, 8, 9]


def test_a_resume_refuses_another_model_and_names_changed_options(tmp_path, caplog):
    from adadiff.presets import tiny
    from adadiff.training.loop import run_stage

    cfg = tiny().to_dict()
    run_stage(Counter(), tmp_path, _opts(), config=cfg)
    wider = {**cfg, "unet": {**cfg["unet"], "block_out_channels": [8, 16, 32, 32]}}
    with pytest.raises(ConfigError, match="whose unet differ from the --model given"):
        run_stage(Counter(), tmp_path, _opts(steps=8), config=wider)
    # inference settings and metric weights are not what the networks learnt
    calibrated = {**cfg, "dtss": {**cfg["dtss"], "tau": 0.5}, "tile_size": 256}
    calibrated["mmle"] = {
        **cfg["mmle"],
        "metrics": [{**m, "weight": 2 * m["weight"]} for m in cfg["mmle"]["metrics"]],
    }
    with caplog.at_level("WARNING", logger="adadiff.training"):
        run_stage(Counter(), tmp_path, _opts(steps=8, lr=0.5, schedule="cosine"), config=calibrated)
    text = caplog.text
    assert "--lr is 0.5 now, 1.0 before" in text and "--lr-schedule is cosine now" in text
    assert "--steps is 8 now, 6 before" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="adadiff.training"):
        result = run_stage(Counter(), tmp_path, _opts(steps=5, lr=0.5, schedule="cosine"))
    assert result.step == 8 and "nothing to train" in caplog.text


def test_a_diverged_run_stops_before_overwriting_a_good_checkpoint(tmp_path):
    from adadiff.training.loop import run_stage

    with pytest.raises(
        ConfigError, match=r"loss nan at step 6: .*the step-4 checkpoint is the latest"
    ):
        run_stage(Counter({5: float("nan")}), tmp_path, _opts())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_an_unwritable_workdir_fails_at_the_start_in_one_line(tmp_path, monkeypatch):
    from adadiff.training import loop

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    stage = Counter()
    with pytest.raises(ModelFolderError, match="cannot write checkpoints into"):
        loop.run_stage(stage, blocker / "unet", _opts())
    assert stage.w == 0  # refused before any step

    def full(*_args, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_checkpoint", full)
    with pytest.raises(
        ModelFolderError, match=r"step-4 checkpoint .*No space left.*there is no earlier one"
    ):
        loop.run_stage(Counter(), tmp_path / "unet", _opts())


def test_a_stage_that_learns_the_metrics_checks_them_too(tmp_path):
    from adadiff.presets import tiny
    from adadiff.training.loop import TRAINED_CONFIG_KEYS, run_stage

    class Scorer(Counter):
        config_keys = (*TRAINED_CONFIG_KEYS, "mmle")

    cfg = tiny().to_dict()
    run_stage(Scorer(), tmp_path, _opts(), config=cfg)
    metrics = cfg["mmle"]["metrics"]
    reweighted = {**cfg, "mmle": {**cfg["mmle"], "metrics": [{**m, "weight": 1} for m in metrics]}}
    assert run_stage(Scorer(), tmp_path, _opts(steps=7), config=reweighted).step == 7
    fewer = {**cfg, "mmle": {**cfg["mmle"], "metrics": metrics[:-1]}}
    with pytest.raises(ConfigError, match="whose mmle differ"):
        run_stage(Scorer(), tmp_path, _opts(steps=8), config=fewer)
    assert run_stage(Counter(), tmp_path, _opts(steps=8), config=fewer).step == 8


def test_two_runs_cannot_train_into_one_folder(tmp_path):
    from adadiff.training.checkpoint import stage_lock
    from adadiff.training.loop import run_stage

    busy = pytest.raises(ModelFolderError, match=r"being trained into by process \d+")
    with stage_lock(tmp_path / "unet"), busy:
        run_stage(Counter(), tmp_path / "unet", _opts())
    stale = tmp_path / "unet" / ".ckpt-abc123.tmp"  # a write killed mid-way
    stale.write_bytes(b"half a checkpoint")
    assert run_stage(Counter(), tmp_path / "unet", _opts()).step == 6  # released after
    assert not stale.exists()


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    """The .lock a run leaves, owned by another user in a shared workdir (root opens it anyway,
    hence the stand-in), or a folder in its place: a ModelFolderError, not a traceback."""
    from adadiff import locks
    from adadiff.training.loop import run_stage

    (tmp_path / "unet" / ".lock").mkdir(parents=True)
    stage = Counter()
    with pytest.raises(ModelFolderError, match=r"Is a directory\); remove the folder .*\.lock"):
        run_stage(stage, tmp_path / "unet", _opts())

    def not_ours(path: Path, mode: str) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(locks, "open", not_ours, raising=False)
    with pytest.raises(ModelFolderError, match=r"Permission denied\); make .*\.lock writable"):
        run_stage(stage, tmp_path / "mmle", _opts())
    assert stage.w == 0  # refused before any step


def test_a_folder_lock_names_its_holder_and_empties_on_release(tmp_path):
    """A holder killed mid-run left its line in the lock file: the next holder's line replaces
    it, so a second writer is told who holds the folder now, and a release empties the file.
    Without ``unwritable``, a folder that cannot be made is the caller's OSError."""
    from adadiff.locks import folder_lock

    lock = tmp_path / "unet" / ".lock"
    lock.parent.mkdir()
    lock.write_text("process 1234567")
    holder = f"process {os.getpid()}"
    with folder_lock(lock, RuntimeError):
        assert lock.read_text() == holder
        with pytest.raises(RuntimeError, match=f"^{holder}$"), folder_lock(lock, RuntimeError):
            pass
    assert lock.read_text() == ""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError), folder_lock(tmp_path / "file" / ".lock", RuntimeError):
        pass


class Abandons(Counter):
    """Steps 0 and 1 finish; step 2 is where a stop signal arrives during a long preparation."""

    def step(self, step: int) -> dict[str, float]:
        from adadiff.training.loop import StepAbandoned, stop_requested

        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop_requested()
            raise StepAbandoned
        return super().step(step)


def test_a_step_dropped_on_a_stop_ends_the_run_at_the_last_finished_step(tmp_path):
    from adadiff.training import loop

    stage = Abandons()
    result = loop.run_stage(stage, tmp_path, _opts())
    assert (result.step, result.stopped, stage.w) == (2, True, 2.0)
    assert loop.load_latest(tmp_path)["step"] == 2
    assert not loop.stop_requested()  # the flag is the run's only
