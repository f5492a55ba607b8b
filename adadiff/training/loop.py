"""The loop every trainer shares: resume, seeded steps, log lines, checkpoints, clean stops.

A trainer is a ``Stage``: it owns its modules, optimizer and random generators, runs one
optimisation step at a time and can put all of that into (and take it back from) a state dict.
``run_stage`` does the rest. Steps are counted in completed optimisation steps; ``--steps N`` is
the total, so running again with a larger N continues the same run.

SIGINT, SIGTERM and SIGHUP (unless ignored, as under nohup) only set a flag: the step in flight
finishes, a checkpoint is written and the result says ``stopped``. A step that would run on for
minutes first (the UNet's first pool of encoded crops) is dropped instead (``StepAbandoned``).
A second SIGINT interrupts at once (without saving).

A resume checks that the model config the checkpoint was trained with is the one given (what the
networks compute and learn: a different one would load, or fail to, and train toward something
else), says which options changed since the checkpoint, and stops a run whose loss is no longer
finite before it overwrites a good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adadiff.errors import ConfigError, ModelFolderError
from adadiff.progress import Progress
from adadiff.training.checkpoint import load_latest, save_checkpoint, stage_lock

log = logging.getLogger("adadiff.training")


LR_SCHEDULES = ("constant", "cosine")
# The parts of a model config that decide what the networks of a stage compute and learn
# toward; the rest (tiling, schedules, DTSS numbers, colour fix) is for inference. A stage may
# name others (``config_keys``): MMLE adds "mmle", whose metrics the UNet never sees.
TRAINED_CONFIG_KEYS = ("unet", "vae", "noise", "pfj", "upscale", "text_tokens")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """What every stage takes; ``resume`` None resumes when a checkpoint exists."""

    steps: int
    batch: int
    lr: float
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 200
    keep: int = 3
    warmup: int = 50  # linear learning-rate warm-up, in steps
    # after warm-up: "constant", or "cosine" down to 0 at ``steps`` (the last checkpoints then
    # differ little, so which one ships matters less)
    schedule: str = "constant"
    resume: bool | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "log_every", "ckpt_every", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if self.seed < 0 or self.warmup < 0:
            raise ConfigError(f"seed and warmup must be >= 0, got {self.seed}, {self.warmup}")
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")

    def lr_at(self, step: int) -> float:
        ramp = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.schedule == "constant" or step < self.warmup:
            return self.lr * ramp
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


class Stage(Protocol):
    name: str

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step (``step`` counts from 0); returns the loss terms."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def summary(self) -> dict[str, Any]:
        """Plain data saved beside the state (read by later stages and the model card)."""
        ...


@dataclass
class StageResult:
    stage: str
    folder: Path
    step: int
    stopped: bool
    elapsed_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_losses(self) -> dict[str, float]:
        return dict(self.history[-1]["losses"]) if self.history else {}


# --------------------------------------------------------------------------------------------
# Random state
# --------------------------------------------------------------------------------------------


def numpy_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return dict(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters; the decay warms up as (1 + n) / (10 + n)."""

    def __init__(self, modules: dict[str, Any], decay: float) -> None:
        import torch

        if not 0 <= decay < 1:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.modules = modules
        self.shadow: dict[str, torch.Tensor] = {
            f"{name}.{key}": value.detach().clone()
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in self.modules.items():
                for key, value in module.state_dict().items():
                    avg = self.shadow[f"{name}.{key}"]
                    if value.dtype.is_floating_point:
                        avg.mul_(d).add_(value.detach(), alpha=1 - d)
                    else:
                        avg.copy_(value)

    def state_of(self, name: str) -> dict[str, Any]:
        """The averaged state dict of one module."""
        prefix = f"{name}."
        return {k[len(prefix) :]: v.clone() for k, v in self.shadow.items() if k.startswith(prefix)}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)


# --------------------------------------------------------------------------------------------
# Stop signals
# --------------------------------------------------------------------------------------------


class StopFlag:
    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None


class StepAbandoned(Exception):
    """A stage raises it from inside a step that would run on for minutes (filling a pool of
    encoded crops) once a stop was asked for: the step is dropped, nothing of it is kept, and
    the run stops as after its last finished step."""


_ACTIVE: list[StopFlag] = []  # the running stage's stop flag, innermost last


def stop_requested() -> bool:
    """Whether a stop signal reached the running stage (for a stage's long preparations)."""
    return bool(_ACTIVE) and _ACTIVE[-1].requested


@contextmanager
def stop_on_signals(
    finishing: str = "finishing this step and saving a checkpoint",
) -> Iterator[StopFlag]:
    """SIGINT, SIGTERM and SIGHUP (unless ignored, as under nohup) set the flag (a second
    SIGINT raises); handlers are restored after. ``finishing``: what the run does before it
    stops, for the log."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum: int, _frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.reason = signal.Signals(signum).name
        log.warning("%s received: %s", flag.reason, finishing)

    signals = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # a closed terminal; absent on Windows
    if hangup is not None and signal.getsignal(hangup) is signal.SIG_DFL:  # nohup ignores it
        signals.append(hangup)
    previous = {s: signal.signal(s, handle) for s in signals}
    _ACTIVE.append(flag)
    try:
        yield flag
    finally:
        _ACTIVE.remove(flag)
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _format(losses: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in losses.items())


def trained_part(config: dict[str, Any]) -> dict[str, Any]:
    """What of a config dict (``ModelConfig.to_dict``) training depends on, in plain JSON types
    (a preset's tuples and a model folder's lists compare equal)."""
    part = {k: config.get(k) for k in (*TRAINED_CONFIG_KEYS, "mmle")}
    mmle = dict(part["mmle"] or {})
    if "metrics" in mmle:  # calibration changes the weights, not the network or its targets
        mmle["metrics"] = [(m["name"], m["kind"]) for m in mmle["metrics"]]
    part["mmle"] = mmle
    # the VAE's latent scale is measured after its training and each stage reads it from the
    # VAE's checkpoint, so a shipped folder's adadiff.json (which records it) still matches
    part["vae"] = {k: v for k, v in (part["vae"] or {}).items() if k != "scaling_factor"}
    return json.loads(json.dumps(part))


def check_trained_config(
    folder: Path,
    ckpt: dict[str, Any],
    config: dict[str, Any] | None,
    keys: tuple[str, ...] = TRAINED_CONFIG_KEYS,
) -> None:
    """``ConfigError`` if ``ckpt`` (of ``folder``) was trained with another model config, as far
    as ``keys`` go."""
    trained = ckpt.get("config") or {}
    if not (trained and config):  # checkpoints from before configs were saved
        return
    then, now = trained_part(trained), trained_part(config)
    changed = [k for k in keys if then[k] != now[k]]
    if changed:
        raise ConfigError(
            f"{folder} holds a checkpoint (step {ckpt['step']}) of a model config "
            f"{trained.get('name', '')!r} whose {', '.join(changed)} differ from the --model "
            f"given ({config.get('name', '')!r}); pass the --model it was trained with, or "
            "choose another --workdir"
        )


def _report_changes(stage: str, ckpt: dict[str, Any], opts: TrainOptions) -> None:
    now = asdict(opts)
    before = {k: v for k, v in (ckpt.get("options") or {}).items() if k in now}
    for key, value in now.items():
        if key in ("resume", "log_every", "ckpt_every") or key not in before:
            continue
        if before[key] != value:
            flag = "lr-schedule" if key == "schedule" else key
            log.warning(
                "%s: --%s is %s now, %s before this resume", stage, flag, value, before[key]
            )
    if opts.schedule != "cosine":
        return
    step = int(ckpt["step"])
    old = TrainOptions(**{**now, **before, "resume": None})
    if old.schedule != "cosine":  # the run had no decay: there is no earlier end to name
        log.warning(
            "%s: the cosine decay now runs to step %d: the learning rate at step %d goes from "
            "%.3g to %.3g",
            stage,
            opts.steps,
            step,
            old.lr_at(step),
            opts.lr_at(step),
        )
    elif old.steps != opts.steps:
        log.warning(
            "%s: the cosine decay now ends at step %d, not %d: the learning rate at step %d "
            "goes from %.3g to %.3g",
            stage,
            opts.steps,
            old.steps,
            step,
            old.lr_at(step),
            opts.lr_at(step),
        )


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists compare equal


# Stage options whose command-line flag is not their name with dashes, or that have none.
_RENAMED_FLAGS = {"weighting": "photo-weighting", "trajectories": "batch"}
_NO_FLAG = ("grad_clip",)
# Options that may change at a resume without changing the recipe (a checkpoint resumes on
# either device).
_NOT_RECIPE = ("device",)


def option_flag(key: str) -> str | None:
    """The command-line flag of a stage option (``None``: it has none)."""
    if key in _NO_FLAG:
        return None
    return "--" + _RENAMED_FLAGS.get(key, key.replace("_", "-"))


def _report_stage_changes(stage: str, ckpt: dict[str, Any], now: dict[str, Any]) -> None:
    """Warn about each of the stage's own options (data, losses, pools) that differs from the
    checkpoint's: a resume means typing every flag again, and a forgotten one changes the
    recipe from here on without a word."""
    before = (ckpt.get("summary") or {}).get("options") or {}
    for key, value in now.items():
        if key in _NOT_RECIPE or key not in before or _plain(before[key]) == _plain(value):
            continue
        flag = option_flag(key)
        shown = (
            (",".join(map(str, before[key])) or "''")  # '': the flag's empty list
            if isinstance(before[key], list | tuple)
            else before[key]
        )
        keep = (
            f" (pass {flag} {shown} to keep the recipe)"
            if flag is not None and before[key] is not None
            else ""
        )
        log.warning(
            "%s: %s is %s now, %s before this resume; the run trains with the new value from "
            "here on%s",
            stage,
            flag or key,
            value,
            before[key],
            keep,
        )


def check_writable(folder: Path) -> None:
    """Fail at the start, not at the first checkpoint minutes or hours later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ModelFolderError(
            f"cannot write checkpoints into {folder} ({exc.strerror or exc}); choose a "
            "--workdir you can write to"
        ) from exc


def run_stage(
    stage: Stage,
    folder: str | Path,
    opts: TrainOptions,
    *,
    config: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> StageResult:
    """Train ``stage`` to ``opts.steps`` completed steps, checkpointing into ``folder`` (which
    no other run may train into meanwhile)."""
    folder = Path(folder)
    check_writable(folder)
    with stage_lock(folder):
        return _train(stage, folder, opts, config, progress)


def _train(
    stage: Stage,
    folder: Path,
    opts: TrainOptions,
    config: dict[str, Any] | None,
    progress: Progress | None,
) -> StageResult:
    ckpt = load_latest(folder, stage=stage.name)
    if ckpt is not None and opts.resume is False:
        raise ConfigError(
            f"{folder} already holds {stage.name} checkpoints (step {ckpt['step']}); resume "
            "(the default) or choose an empty --workdir"
        )
    if ckpt is None and opts.resume is True:
        raise ConfigError(f"--resume was given but {folder} holds no {stage.name} checkpoint")
    done, elapsed, history = 0, 0.0, []
    if ckpt is not None:
        keys = getattr(stage, "config_keys", TRAINED_CONFIG_KEYS)
        check_trained_config(folder, ckpt, config, keys)
        stage.load_state_dict(ckpt["state"])
        done, elapsed, history = int(ckpt["step"]), float(ckpt["elapsed_s"]), ckpt["history"]
        log.info("%s: resumed from step %d (%.0f s trained)", stage.name, done, elapsed)
        _report_changes(stage.name, ckpt, opts)
        _report_stage_changes(stage.name, ckpt, stage.summary().get("options") or {})
        if done >= opts.steps:
            log.warning(
                "%s: already at step %d, --steps is %d: nothing to train (give a larger --steps "
                "to continue)",
                stage.name,
                done,
                opts.steps,
            )
    saved_at = done if ckpt is not None else -1

    def save() -> None:
        nonlocal saved_at
        payload = {
            "stage": stage.name,
            "state": stage.state_dict(),
            "summary": stage.summary(),
            "elapsed_s": elapsed,
            "history": history,
            "options": asdict(opts),
            "config": config or {},
        }
        try:
            path = save_checkpoint(folder, done, payload, keep=opts.keep)
        except OSError as exc:
            kept = (
                f"the step-{saved_at} checkpoint is intact"
                if saved_at >= 0
                else "there is no earlier one"
            )
            raise ModelFolderError(
                f"could not write the step-{done} checkpoint into {folder} "
                f"({exc.strerror or exc}); {kept}. Free space or fix the folder and run the "
                "same command again"
            ) from exc
        saved_at = done
        log.info("%s: checkpoint %s", stage.name, path)

    window: dict[str, list[float]] = {}
    window_start = time.perf_counter()
    window_steps = 0
    stopped = False
    with stop_on_signals() as stop:
        tick = time.perf_counter()
        while done < opts.steps and not stop.requested:
            try:
                losses = stage.step(done)
            except StepAbandoned:
                log.warning("%s: step %d dropped: stopped while preparing it", stage.name, done + 1)
                if done == max(saved_at, 0):
                    # nothing trained since the last checkpoint (or at all), and the stage's
                    # generators moved on: a checkpoint now would make a resume differ from a
                    # run that was never stopped
                    saved_at = done
                break
            bad = {k: v for k, v in losses.items() if not math.isfinite(float(v))}
            if bad:
                last = (
                    f"the step-{saved_at} checkpoint is the latest"
                    if saved_at >= 0
                    else "no checkpoint was written"
                )
                raise ConfigError(
                    f"{stage.name}: {_format(bad)} at step {done + 1}: training diverged and "
                    f"stopped without saving ({last}); run again with a lower --lr"
                )
            done += 1
            window_steps += 1
            for key, value in losses.items():
                window.setdefault(key, []).append(float(value))
            now = time.perf_counter()
            elapsed += now - tick
            tick = now
            if done % opts.log_every == 0 or done == opts.steps:
                rate = window_steps / max(now - window_start, 1e-9)
                means = {k: float(np.mean(v)) for k, v in window.items()}
                history.append(
                    {"step": done, "losses": means, "steps_per_s": rate, "elapsed_s": elapsed}
                )
                log.info(
                    "%s step %d/%d %s | %.3g steps/s",
                    stage.name,
                    done,
                    opts.steps,
                    _format(means),
                    rate,
                )
                window, window_steps, window_start = {}, 0, now
            if progress is not None:
                progress(stage.name, done, opts.steps)
            if done % opts.ckpt_every == 0:
                save()
                tick = time.perf_counter()
        stopped = stop.requested
        if done != saved_at:  # inside the signal guard: a stop signal now cannot cut it short
            save()
    return StageResult(stage.name, folder, done, stopped, elapsed, history)
