"""Ship: a model folder (safetensors + adadiff.json + MODEL_CARD.md + training.json) from a
workdir.

The folder is written next to its destination and swapped in with renames, so ``--model tiny``
never sees half a model; a failure, Ctrl-C, SIGTERM or SIGHUP while it is written removes it.
Its total size is checked against ``max_mb``. Components reused from an earlier model folder (the
VAE given to ``train unet --vae-from``, the MMLE given to ``--mmle-from``) carry that folder's
training photos into the card and the record, marked "reused", so that a hold-out photo an
earlier stage saw is named as such.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adadiff.artifacts import weights_digest
from adadiff.config import CONFIG_FILE, ModelConfig
from adadiff.errors import ConfigError, ModelFolderError, shell_arg
from adadiff.models.bundle import (
    SHIPPED,
    TorchModels,
    changed_targets,
    describe,
    load_models,
    mmle_targets,
)
from adadiff.provenance import MODEL_CARD, TrainingRecord, read_card, read_record, write_record
from adadiff.training.assemble import frozen_models
from adadiff.training.checkpoint import list_checkpoints, load_latest
from adadiff.training.data import HOLDOUT, VALIDATION, available_photos, training_photos
from adadiff.training.deadleaves import NAME_PREFIX as DEADLEAVES_PREFIX
from adadiff.training.deadleaves import SOURCE as DEADLEAVES_SOURCE
from adadiff.training.degrade import STRENGTH_NOTES
from adadiff.training.fingerprint import encoder_fingerprint, same_encoder
from adadiff.training.labels import UNREADABLE, labels_origin
from adadiff.training.shading import NAME_PREFIX as SHADING_PREFIX
from adadiff.training.shading import SOURCE as SHADING_SOURCE

log = logging.getLogger("adadiff.training")

MAX_MB = 25.0

# What each photo's package says about it (scikit-image: the skimage.data docstrings).
PHOTO_LICENCES: dict[str, str] = {
    "astronaut": "NASA Great Images; no known copyright restrictions, public domain",
    "brick": "CC0Textures (Bricks25), CC0",
    "camera": "CC0 by the photographer (Lav Varshney)",
    "chelsea": "CC0 by the photographer (Stefan van der Walt)",
    "coffee": "CC0 by the photographer (Rachel Michetti)",
    "grass": "CC0Textures, CC0",
    "gravel": "CC0Textures (Gravel04), CC0",
    "hubble_deep_field": "NASA, may be freely used in the public domain",
    "immunohistochemistry": "Center for Microscopy and Molecular Imaging; no known copyright "
    "restrictions",
    "moon": "scikit-image sample data (BSD-3-Clause package); no separate statement",
    "motorcycle_left": "Middlebury 2014 stereo benchmark (Scharstein et al.), as redistributed by "
    "scikit-image; no licence statement in the package",
    "motorcycle_right": "Middlebury 2014 stereo benchmark (Scharstein et al.), as redistributed by "
    "scikit-image; no licence statement in the package",
    "retina": "Wikimedia Commons, CC0 1.0",
    "rocket": "SpaceX, released into the public domain",
    "sklearn_china": "scikit-learn sample image (see scikit-learn's README for its credit)",
    "sklearn_flower": "scikit-learn sample image (see scikit-learn's README for its credit)",
    "mpl_grace_hopper": "matplotlib sample data; US Navy photograph, public domain",
    "pywt_aero": "PyWavelets sample data; no separate statement",
}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


REUSED = "reused"


@dataclass(frozen=True)
class Reused:
    """A component taken from an earlier model folder: what the card and record say of it."""

    folder: Path
    # e.g. "an earlier `tiny` (VAE encoder sha256 0123456789ab)": the name from its card's
    # heading, and which latent space it reads, since a new model may carry the same name
    label: str
    photos: dict[str, tuple[str, ...]]  # that folder's photos -> its stages

    @classmethod
    def of(cls, folder: str | Path) -> Reused:
        folder = Path(folder)
        card = folder / MODEL_CARD
        # an empty card, or none: the folder's name stands for it
        lines = read_card(card).splitlines() if card.is_file() else []
        heading = lines[0].lstrip("# ").strip() if lines else ""
        name = heading.split(":")[0].strip() or folder.name
        encoder = encoder_fingerprint(load_models(folder).vae.state_dict())[:12]
        record = read_record(folder)
        label = f"an earlier `{name}` (VAE encoder sha256 {encoder})"
        return cls(folder, label, record.photos if record else {})

    def stage_photos(self, stages: tuple[str, ...]) -> dict[str, list[str]]:
        """``{"vae (reused)": [photos], ...}`` for those of the folder's stages in ``stages``."""
        out: dict[str, list[str]] = {}
        for name, used in self.photos.items():
            for stage in used:
                base = stage.split(" ")[0]
                if base in stages:
                    out.setdefault(f"{base} ({REUSED})", []).append(name)
        return out


def _reused_mmle(models: TorchModels, folder: str | Path) -> TorchModels:
    """``models`` with the MMLE of ``folder``, refused unless it reads the same latent space
    (the same encoder) and predicts the same metrics."""
    source = load_models(folder)
    if not Path(source.source).is_dir():
        raise ConfigError(f"--mmle-from {folder}: no trained weights there; give a model folder")
    then, now = (mmle_targets(c.mmle, c.color_fix) for c in (source.config, models.config))
    changed = changed_targets(then, now, "here")
    if changed:
        raise ConfigError(
            f"--mmle-from {folder}: its MMLE predicts other scores or has another shape than "
            f"this config's ({'; '.join(changed)}); make labels and train MMLE for this model "
            "instead"
        )
    if not same_encoder(source.vae.state_dict(), models.vae.state_dict()):
        raise ConfigError(
            f"--mmle-from {folder}: its VAE encoder differs from this model's, so its MMLE reads "
            "another latent space; make labels and train MMLE for this model instead"
        )
    models.mmle = source.mmle
    models.source += f", mmle reused from {folder}"
    return models


def _checkpoint(workdir: Path, stage: str) -> dict[str, Any] | None:
    return load_latest(workdir / stage, stage=stage)


def _stage_row(name: str, ckpt: dict[str, Any] | None) -> str:
    if ckpt is None:
        return f"| {name} | - | - | - | - | - |"
    opts = ckpt.get("options", {})
    history = ckpt.get("history") or [{}]
    losses = history[-1].get("losses", {})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    return (
        f"| {name} | {ckpt['step']} | {opts.get('batch', '-')} | {opts.get('lr', '-')} | "
        f"{ckpt.get('elapsed_s', 0.0) / 60:.1f} | {shown} |"
    )


def _phase_lr(phase: dict[str, Any]) -> str:
    if "lr" not in phase:
        return ""
    if "steps" in phase:
        return f", lr {phase['lr']} ({phase.get('schedule', 'constant')} to step {phase['steps']})"
    return f", lr {phase['lr']} ({phase.get('schedule', 'constant')})"


def _phase_lines(phases: list[dict[str, Any]], last_step: int | None) -> list[str]:
    """The UNet's training phases (runs resumed with other options), when there was more than
    one; the options above are the last phase's."""
    if len(phases) < 2:
        return []
    # the photo set is named only where it changed; the table lists every photo of any phase
    sets_differ = len({str(p.get("photos")) for p in phases}) > 1
    parts = []
    for k, phase in enumerate(phases):
        end = phases[k + 1]["from_step"] if k + 1 < len(phases) else last_step
        drawn = "equally" if phase.get("weighting", "area") == "photo" else "by area"
        which = f" ({phase.get('photos')})" if sets_differ else ""
        leaves = int(phase.get("deadleaves", 0) or 0)
        extra = f", {leaves} dead-leaves images among them" if leaves else ""
        shading = int(phase.get("shading", 0) or 0)
        extra += f", {shading} shading images among them" if shading else ""
        parts.append(
            f"steps {phase['from_step']} to {end}: photos{which} drawn {drawn}{extra}, "
            f"Real-ESRGAN share {phase.get('realesrgan_prob', 0.0)}{_strength(phase)}"
            + _phase_lr(phase)
        )
    return ["- UNet training was resumed with other options: " + "; ".join(parts) + "."]


def _unet_photos(summary: dict[str, Any]) -> list[str]:
    """The photos the UNet's runs recorded plus what any earlier phase drew on, the validation
    photos and dead-leaves images included: a run resumed without them still carries what it
    learned from them (runs recorded only their last phase's photos before resumes merged
    them)."""
    photos = list(summary.get("photos", []))
    phases = summary.get("phases", [])
    if any(p.get("photos") == "train+validation" for p in phases):
        photos += [n for n in VALIDATION if n not in photos]
    leaves = max((int(p.get("deadleaves", 0) or 0) for p in phases), default=0)
    photos += [n for n in (f"{DEADLEAVES_PREFIX}{k}" for k in range(leaves)) if n not in photos]
    shading = max((int(p.get("shading", 0) or 0) for p in phases), default=0)
    photos += [n for n in (f"{SHADING_PREFIX}{k}" for k in range(shading)) if n not in photos]
    return photos


def _reused_row(name: str, reused: Reused) -> str:
    return f"| {name} | {REUSED} | - | - | - | from {reused.label} |"


@dataclass
class LabelSummary:
    shards: int = 0
    samples: int = 0
    minutes: float = 0.0
    photos: set[str] = field(default_factory=set)  # names drawn, where shards record them
    weightings: set[str] = field(default_factory=set)
    unet_steps: set[int] = field(default_factory=set)  # the UNet checkpoints that drew them
    # trajectories, and those of them on random tiers; None where a shard does not say
    trajectories: int | None = 0
    random_trajectories: int = 0

    def row(self) -> str:
        return (
            f"| labels | {self.shards} shards, {self.samples} samples | - | - | "
            f"{self.minutes:.1f} | oracle-scored UNet calls |"
        )


def _labels(workdir: Path) -> LabelSummary:
    out = LabelSummary()
    for path in sorted((workdir / "labels").glob("shard-*.npz")):
        try:
            with np.load(path, allow_pickle=False) as npz:
                out.shards += 1
                out.samples += len(npz["t"])
                out.minutes += float(npz["seconds"]) / 60 if "seconds" in npz.files else 0.0
                if "photos" in npz.files and npz["photos"].size and "photo" in npz.files:
                    out.photos.update(str(n) for n in npz["photos"][np.unique(npz["photo"])])
                if "weighting" in npz.files:
                    out.weightings.add(str(npz["weighting"]))
                if "unet_step" in npz.files:
                    out.unet_steps.add(int(npz["unet_step"]))
                if "random" not in npz.files:
                    out.trajectories = None
                elif out.trajectories is not None and len(npz["traj"]):
                    traj = npz["traj"]
                    out.trajectories += int(traj.max()) + 1
                    out.random_trajectories += len(np.unique(traj[npz["random"]]))
        except (*UNREADABLE, KeyError) as exc:
            raise ModelFolderError(f"{path} is not a label shard ({exc}); delete it") from exc
    return out


def stale_mmle(workdir: Path) -> str:
    """A sentence when the MMLE checkpoint trained on labels other than the labels folder's
    (remade since), else ""."""
    ckpt = load_latest(workdir / "mmle", stage="mmle")
    trained_on = (ckpt or {}).get("state", {}).get("labels_from")
    if not trained_on:  # no MMLE, or one from before the labels' origin was recorded
        return ""
    now = labels_origin(sorted((workdir / "labels").glob("shard-*.npz")))
    if not now or list(now) == list(trained_on):
        return ""
    return (
        f"MMLE trained on labels drawn by {', '.join(trained_on)}; the labels folder now holds "
        f"labels drawn by {', '.join(now)}."
    )


def label_lag(labels: LabelSummary, unet_step: int | None) -> str:
    """A sentence when the labels (hence MMLE) came from another UNet checkpoint than the one
    shipped (``train labels`` refuses to mix checkpoints, ``ship`` does not), else ""."""
    if unet_step is None or not labels.unet_steps or labels.unet_steps == {int(unet_step)}:
        return ""
    drew = ", ".join(str(s) for s in sorted(labels.unet_steps))
    return (
        f"The labels were drawn by the UNet at step {drew}; the shipped UNet is that run at step "
        f"{unet_step}, and MMLE was not retrained on its trajectories."
    )


def _photo_rows(stages: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """Table rows of every photo a stage records, with the stages that used it, and the names
    of stages that recorded no photos."""
    source = {p.name: p.package for p in available_photos()}
    used: dict[str, list[str]] = {}
    for stage, names in stages.items():
        for name in names:
            used.setdefault(name, []).append(stage)
    if not used:  # nothing recorded: the photos this machine would train on
        used = {p.name: ["not recorded"] for p in training_photos()}
    rows = []
    for name, by in used.items():
        if name.startswith(DEADLEAVES_PREFIX):
            origin, licence = "adadiff", DEADLEAVES_SOURCE
        elif name.startswith(SHADING_PREFIX):
            origin, licence = "adadiff", SHADING_SOURCE
        else:
            origin, licence = source.get(name, "-"), PHOTO_LICENCES.get(name, "see the package")
        rows.append(f"| {name} | {origin} | {licence} | {', '.join(by)} |")
    return rows, [stage for stage, names in stages.items() if not names]


def _eval_section(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return [
            "Not recorded with this folder; run `python -m benchmarks.evaluate_tiny --out "
            "runs/eval_tiny.json` and ship again with `--eval runs/eval_tiny.json`.",
        ]
    lines = ["From `benchmarks/evaluate_tiny.py` (hold-out photos, bicubic x4 degradation):", ""]
    summary = evaluation.get("summary", {})
    methods = summary.get("methods", {})
    if methods:
        lines += [
            "| method | PSNR | SSIM | LPIPS | BRISQUE | UNet evaluations |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in methods.items():
            lines.append(
                f"| {name} | {m.get('psnr', float('nan')):.2f} | {m.get('ssim', float('nan')):.4f} "
                f"| {m.get('lpips', float('nan')):.4f} | {m.get('brisque', float('nan')):.2f} "
                f"| {m.get('unet_evaluations', '-')} |"
            )
        if "best_uniform_at_no_more_evaluations" in summary:
            rival = summary["best_uniform_at_no_more_evaluations"]
            lines += [
                "",
                f"Best uniform schedule at no more UNet evaluations than adaptive: {rival}."
                if rival
                else "Every uniform schedule in the table takes more UNet evaluations than "
                "adaptive.",
            ]
    mmle = summary.get("mmle", {})
    if mmle:
        rho = ", ".join(f"{k} {_rho(v)}" for k, v in mmle.get("spearman", {}).items())
        picked = {"photo": ", each photo equally likely", "area": ", photos by pixel count"}
        majority = mmle.get("majority_category_share")
        baseline = (
            f" (always the oracle's most frequent category: {100 * majority:.1f}%)"
            if majority is not None
            else ""
        )
        lines += [
            "",
            f"MMLE vs oracle on {mmle.get('trajectories', '?')} trajectories of hold-out crops"
            f"{picked.get(mmle.get('crop_weighting', ''), '')}: Spearman {rho}; same DTSS "
            f"category in {100 * mmle.get('category_agreement', float('nan')):.1f}% of steps"
            f"{baseline}.",
        ]
        within = mmle.get("spearman_within_trajectory_median", {})
        between = mmle.get("spearman_between_trajectory_means", {})
        if within and between:
            lines += [
                "",
                "Within one trajectory (median over trajectories): "
                + ", ".join(f"{k} {_rho(v)}" for k, v in within.items())
                + "; between trajectories (their mean scores): "
                + ", ".join(f"{k} {_rho(v)}" for k, v in between.items())
                + ". DTSS acts on step-to-step changes, which the first figures describe.",
            ]
        interval = mmle.get("spearman_bootstrap_90", {})
        if interval:
            lines += [
                "",
                "90% intervals of the pooled Spearman when whole trajectories are resampled: "
                + ", ".join(f"{k} {_span(low, high)}" for k, (low, high) in interval.items())
                + ".",
            ]
    checks = summary.get("targets", {})
    if checks:
        lines += [
            "",
            "Targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in checks.items()),
        ]
    return lines


def _rho(v: float | None) -> str:
    # None: benchmarks/evaluate_tiny.py had nothing to rank (one trajectory, or a constant score)
    return "none" if v is None else f"{v:.3f}"


def _span(low: float | None, high: float | None) -> str:
    if low is None or high is None:  # benchmarks/evaluate_tiny.py on a single trajectory
        return "unavailable"
    return f"{low:.3f}-{high:.3f}"


def _interval(v: list[float | None]) -> str:
    mean, low, high = v
    if low is None or high is None:  # benchmarks/quality.py on a single block
        return f"{mean:.3f} (interval unavailable)"
    return f"{mean:.3f} ({low:.3f} to {high:.3f})"


def quality_section(quality: dict[str, Any] | None) -> list[str]:
    """The whole-photo figures of ``benchmarks/quality.py``, both degradations."""
    if not quality:
        return []
    photos = ", ".join(quality.get("photos", []))
    lines = [
        f"From `benchmarks/quality.py` (whole {quality.get('photo_set', '')} photos: {photos}; "
        f"{quality.get('schedule', '?')} schedule; LPIPS, PSNR, SSIM on "
        f"{quality.get('block', '?')} px blocks, every photo weighted equally, 90% intervals):",
        "",
        "| degradation | upscaler | LPIPS | PSNR | SSIM |",
        "|---|---|---|---|---|",
    ]
    for deg, entry in quality.get("results", {}).items():
        for method in ("bicubic", "model"):
            e = entry[method]
            lines.append(
                f"| {quality.get('degradations', {}).get(deg, deg)} | {method} | "
                f"{_interval(e['lpips']['pooled'])} | {e['psnr']['pooled'][0]:.2f} | "
                f"{e['ssim']['pooled'][0]:.3f} |"
            )
    ceiling = quality.get("vae_round_trip")
    if ceiling:
        lines.append(
            f"| none | the original through this VAE | {_interval(ceiling['lpips']['pooled'])}"
            f" | {ceiling['psnr']['pooled'][0]:.2f} | {ceiling['ssim']['pooled'][0]:.3f} |"
        )
    timing = quality.get("timing", {})
    if timing:
        lines += [
            "",
            f"Time: {timing['seconds_per_tile']:.3f} s per tile with {timing['threads']} torch "
            "threads on the CPU named in the JSON.",
        ]
    return [*lines, ""]


def _strength(options: dict[str, Any]) -> str:
    """Names a gentler degradation than Real-ESRGAN's own settings; silent for those."""
    if options.get("realesrgan_strength", "full") == "full" or not options.get("realesrgan_prob"):
        return ""
    strength = options["realesrgan_strength"]
    return f" ({strength} strength: {STRENGTH_NOTES[strength]})"


def _scale_augmentation(options: dict[str, Any]) -> str:
    """The stage's scale augmentation (``--min-scale``); silent for crops at the photos' scale."""
    low = float(options.get("min_scale", 1.0))
    if low >= 1:
        return ""
    return f"; HR crops show their photo downscaled by a random factor in [{low:g}, 1]"


def _latent_noise(options: dict[str, Any]) -> str:
    noise = float(options.get("latent_noise", 0.0))
    return f" plus white noise of std {noise:g} (scaled latent units)" if noise else ""


def _decoder_lag(summary: dict[str, Any], unet: dict[str, Any] | None) -> str:
    """Sentences on which UNet checkpoint drew the decoder's samples when it is not simply the
    shipped one: a decoder resumed on a UNet that trained on in between, or a UNet trained on
    after its decoder stage."""
    phases = summary.get("sample_phases") or []
    drew = summary.get("unet_step")
    text = ""
    if len(phases) > 1 or (phases and phases[0]["from_step"] > 0):
        parts = [
            f"from decoder step {p['from_step']} on the UNet at step {p['unet_step']}"
            for p in phases
        ]
        text = " Its samples came " + ", then ".join(parts)
        if phases[0]["from_step"] > 0:
            text += f" (before decoder step {phases[0]['from_step']}: not recorded)"
        text += "."
        drew = phases[-1]["unet_step"]
    if drew is None or unet is None or int(drew) == int(unet["step"]):
        return text
    if text:
        return text + (
            f" The shipped UNet is that run at step {unet['step']}, and the decoder was not "
            "fine-tuned again on its samples."
        )
    return (
        f" Its samples came from the UNet at step {drew}; the shipped UNet is that run at step "
        f"{unet['step']}, and the decoder was not fine-tuned again on its samples."
    )


def _decoder_samples(options: dict[str, Any]) -> str:
    share = options.get("sample_prob", 0.0)
    if not share:
        return ""
    intervals = ", ".join(str(i) for i in options.get("sample_intervals", ()))
    return (
        f"; a share {share} of each batch is instead the final latent the frozen UNet samples "
        f"from an LR crop (uniform intervals {intervals}; LR Real-ESRGAN-degraded with "
        f"probability {options.get('realesrgan_prob', '-')}{_strength(options)}), decoded "
        "against its HR crop, so the decoder draws the UNet's own latents without their grain"
    )


def stage_photos(
    workdir: Path,
    *,
    vae_reused: Reused | None = None,
    mmle_reused: Reused | None = None,
    unet_init: Reused | None = None,
) -> dict[str, list[str]]:
    """Stage -> the photos it trained on, the reused components' stages included."""
    vae, unet, decoder = (_checkpoint(workdir, s) for s in ("vae", "unet", "decoder"))
    stages: dict[str, list[str]] = {}
    if vae is not None or vae_reused is None:
        stages["vae"] = (vae or {}).get("summary", {}).get("photos", [])
    stages["unet"] = _unet_photos((unet or {}).get("summary", {}))
    if decoder:
        stages["decoder"] = decoder.get("summary", {}).get("photos", [])
    if mmle_reused is None:
        stages["labels"] = sorted(_labels(workdir).photos)
    for reused, kinds in (
        (vae_reused, ("vae", "decoder")),
        (mmle_reused, ("labels",)),
        (unet_init, ("unet",)),  # what the initial weights learned from stays in them
    ):
        if reused is not None:
            stages.update(reused.stage_photos(kinds))
    return stages


def training_record(stages: dict[str, list[str]], sources: dict[str, str]) -> TrainingRecord:
    photos: dict[str, list[str]] = {}
    for stage, names in stages.items():
        for name in names:
            photos.setdefault(name, []).append(stage)
    return TrainingRecord(
        photos={k: tuple(v) for k, v in photos.items()},
        holdout=tuple(HOLDOUT),
        validation=tuple(VALIDATION),
        sources=sources,
    )


def _split_line(record: TrainingRecord) -> list[str]:
    holdout = [p for p in available_photos() if p.name in HOLDOUT]
    seen = record.seen([*HOLDOUT, *VALIDATION])
    line = (
        "Held out (never tuned on, used by the evaluation): "
        + ", ".join(f"{p.name} ({PHOTO_LICENCES.get(p.name, 'see the package')})" for p in holdout)
        + ". Validation (choices such as calibration are tuned on them): "
        + ", ".join(VALIDATION)
        + "."
    )
    if not seen:
        return [line + " No stage trained on either set.", ""]
    used = "; ".join(f"{name} by {', '.join(by)}" for name, by in seen.items())
    return [line + f" **Not every stage kept them out**: {used}.", ""]


def _trajectory_kinds(labels: LabelSummary) -> str:
    """How the labels' trajectories chose their jumps (``--random-fraction``), as recorded."""
    if not labels.trajectories:
        return "oracle-driven DTSS and random DTSS tiers"
    share = labels.random_trajectories / labels.trajectories
    if share == 0:
        return "oracle-driven DTSS"
    if share == 1:
        return "random DTSS tiers"
    if share == 0.5:
        return "half oracle-driven DTSS and half random DTSS tiers"
    return f"{1 - share:.0%} oracle-driven DTSS and {share:.0%} random DTSS tiers"


def _labels_mmle_lines(cfg: ModelConfig, m_sum: dict[str, Any], labels: LabelSummary) -> list[str]:
    split = [
        name
        for name, index in (("PSNR", cfg.mmle.psnr_index), ("LPIPS", cfg.mmle.lpips_index))
        if index is not None
    ]
    errors = "log10 MSE and LPIPS" if "LPIPS" in split else "log10 MSE"
    val = m_sum.get("validation", {})
    val_photos = m_sum.get("options", {}).get("val_photos", [])
    rho = ", ".join(f"{k} {v:.3f}" for k, v in val.get("spearman", {}).items()) or "-"
    return [
        "- Labels: trajectories of the frozen model through the runtime sampler, "
        + _trajectory_kinds(labels)
        + "; every UNet call's x0 decoded and scored by the oracle ("
        + ", ".join(m.name for m in cfg.mmle.metrics)
        + ") against the LR input"
        + (
            ", and the full-reference ones also against the HR crop, which is what MMLE learns "
            '(`mmle.reference` "hr": a gain is real quality gained). '
            if cfg.mmle.reference == "hr"
            else ". "
        )
        + f"Also each call's latent error ({errors} between decode(x0) and decode(LR latent)) "
        "and, for every crop and more crops that run no trajectory, the VAE's reconstruction "
        f"error ({errors}) of the bicubic input"
        + (
            ": the FR scores carry both, and only the first shows in the latents."
            if cfg.mmle.reference == "input"
            else " (the LR branch's target; scores against the HR crop are not built from them)."
        )
        + (
            f" Every decoded image is colour-corrected first ({cfg.color_fix.kind}, "
            f"{cfg.color_fix.levels} levels: the low frequencies come from the image it is "
            "compared with), as the runtime corrects its output."
            if cfg.color_fix.kind != "none"
            else ""
        ),
        "- MMLE: L2 on standardised scores plus L2 on step-to-step changes of R_FR and R_NR, "
        + (
            f"plus L2 of its LR branch's estimate of the reconstruction error (weight "
            f"{m_sum.get('options', {}).get('recon_weight', 0)}, {m_sum['recon_rows']} crops) "
            f"and of the {' and '.join(split)} head columns' latent part against the latent "
            f"error (weight {m_sum.get('options', {}).get('latent_weight', 0)}); "
            + "; ".join(
                f"{name} is {rule}"
                for name, rule in (
                    ("PSNR", "-10 log10(10^latent + 10^reconstruction) of the MSEs"),
                    (
                        "LPIPS",
                        "latent + reconstruction LPIPS"
                        + (
                            " (the reconstruction part is its mean over the training crops)"
                            if m_sum.get("options", {}).get("lpips_recon") == "mean"
                            else ""
                        ),
                    ),
                )
                if name in split
            )
            + ", "
            if m_sum.get("recon_rows") and split
            else (
                f"plus L2 of its LR branch's estimate of the reconstruction error (weight "
                f"{m_sum.get('options', {}).get('recon_weight', 0)}, {m_sum['recon_rows']} "
                "crops), which enters the head as one more feature, "
                if m_sum.get("recon_rows")
                else ""
            )
        )
        + "Adam; de-standardisation is folded into the last layer (raw scores out). Validation: "
        + (
            f"every trajectory of {', '.join(val_photos)} (photos MMLE never trained on)"
            if val_photos
            else "a held-out share of the label trajectories (their photos are also in training)"
        )
        + f", Spearman {rho}.",
    ]


def model_card(
    cfg: ModelConfig,
    workdir: Path,
    params: dict[str, int],
    size_mb: float,
    evaluation: dict[str, Any] | None,
    *,
    half: bool = False,
    quality: dict[str, Any] | None = None,
    vae_reused: Reused | None = None,
    mmle_reused: Reused | None = None,
    unet_init: Reused | None = None,
) -> str:
    vae, unet, decoder, mmle = (_checkpoint(workdir, s) for s in ("vae", "unet", "decoder", "mmle"))
    labels = _labels(workdir)
    lag = "" if mmle_reused else label_lag(labels, (unet or {}).get("step"))
    stages = stage_photos(
        workdir, vae_reused=vae_reused, mmle_reused=mmle_reused, unet_init=unet_init
    )
    photo_rows, unrecorded = _photo_rows(stages)
    record = training_record(stages, {})
    u_opts = (unet or {}).get("summary", {}).get("options", {})
    v_opts = (vae or {}).get("summary", {}).get("options", {})
    m_sum = (mmle or {}).get("summary", {})
    own = {"vae": vae_reused is None, "mmle": mmle_reused is None}
    minutes = {
        name: (c.get("elapsed_s", 0.0) / 60 if c else 0.0)
        for name, c in (("vae", vae), ("unet", unet), ("decoder", decoder), ("mmle", mmle))
        if (name != "decoder" or c is not None) and own.get(name, True)
    }
    if mmle_reused is None:
        minutes["labels"] = labels.minutes
    phases = (vae or {}).get("summary", {}).get("crop_phases", [])
    crops = ", ".join(f"{side} px from step {first}" for first, side in phases) or "-"
    lines = [
        f"# {cfg.name}: a tiny AdaDiffSR model trained on CPU",
        "",
        "A deliberately small latent-diffusion 4x super-resolution model with Stable Diffusion's "
        "block structure (UNet2DConditionModel, AutoencoderKL), PFJ and an MMLE regressor, "
        "trained from scratch on a few public-domain / CC0 photos on a 2-core CPU. It exists so "
        "that every code path of adadiff runs end to end with real, non-random weights; it is not "
        "a competitive SR model.",
        "",
        "## Architecture",
        "",
        f"- VAE downsampling factor {cfg.vae_scale_factor}, {cfg.latent_channels} latent "
        f"channels, latent scaling factor {cfg.scaling_factor:.5f} (1 / std of latent means).",
        f"- Tile {cfg.tile_size} px ({cfg.latent_tile}x{cfg.latent_tile} latent), overlap "
        f"{cfg.tile_overlap} px; prediction type {cfg.noise.prediction_type.value}.",
        "- Parameters: "
        + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in params.items())
        + f"; {size_mb:.1f} MB as safetensors ("
        + ("UNet and VAE stored as fp16, loaded into fp32; the rest fp32)." if half else "fp32)."),
        "",
        "## Data",
        "",
        "HR crops of one tile (the VAE's and the decoder's of the size their lines below give), "
        "with flips, 90-degree rotations and mild colour jitter. "
        + ("The VAE draws photos in proportion to their area; " if vae is not None else "")
        + ("the UNet draws " if vae is not None else "The UNet draws ")
        + (
            "every photo equally often"
            if u_opts.get("weighting", "area") == "photo"
            else "photos in proportion to their area"
        )
        + (
            "; labels draw "
            + (
                "every photo equally often"
                if labels.weightings == {"photo"}
                else "photos in proportion to their area"
                if labels.weightings == {"area"}
                else "photos as recorded in the shards"
            )
            if mmle_reused is None
            else ""
        )
        + ". LR inputs: bicubic x4 (antialiased, MATLAB-style) with "
        f"probability {1 - float(u_opts.get('realesrgan_prob', 0.0)):.2f}, else Real-ESRGAN's "
        f"second-order degradation{_strength(u_opts)}. The conditioning is the LR image "
        "bicubic-upscaled x4, exactly what the runtime encodes.",
        "",
        "| photo | source | licence / statement | used by |",
        "|---|---|---|---|",
        *photo_rows,
        "",
        *(
            [f"Stages that recorded no photo names: {', '.join(unrecorded)}.", ""]
            if unrecorded
            else []
        ),
        *_split_line(record),
        "## Training",
        "",
        "| stage | steps | batch | lr | minutes | last logged losses |",
        "|---|---|---|---|---|---|",
        _reused_row("vae", vae_reused) if vae_reused and vae is None else _stage_row("vae", vae),
        _stage_row("unet + pfj", unet),
        *([_stage_row("decoder", decoder)] if decoder else []),
        *(
            [_reused_row("labels", mmle_reused), _reused_row("mmle", mmle_reused)]
            if mmle_reused
            else [labels.row(), _stage_row("mmle", mmle)]
        ),
        "",
        f"Training time: {sum(minutes.values()):.1f} min in all ("
        + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
        + ")"
        + (", reused stages not counted" if vae_reused or mmle_reused else "")
        + ", single process on the CPU named in the evaluation JSON.",
        "",
        (
            f"- VAE: reused from {vae_reused.label}, "
            + (
                "its encoder unchanged, its decoder the start of the decoder fine-tune below"
                if decoder
                else "unchanged (encoder and decoder)"
            )
            + "; the photo table marks that model's stages as reused."
            if vae_reused and vae is None
            else f"- VAE: L1 + {v_opts.get('perceptual_weight', '-')} x LPIPS (AlexNet) + "
            f"{v_opts.get('kl_weight', '-')} x KL on a sampled posterior; a share "
            f"{v_opts.get('lr_input_prob', '-')} of inputs are bicubic-upscaled LR crops (a share "
            f"{v_opts.get('realesrgan_prob', 0.0)} of them Real-ESRGAN-degraded, the rest bicubic "
            f"x4); crops {crops}{_scale_augmentation(v_opts)}."
        ),
        *(
            [
                f"- UNet + PFJ: started from the weights of {unet_init.label} (`train unet "
                "--init-from`), not from a random init; the photo table marks the photos that "
                "model's UNet trained on as reused, and its training time is not counted."
            ]
            if unet_init
            else []
        ),
        f"- UNet + PFJ: {cfg.noise.prediction_type.value} MSE, t uniform in [0, 999], AdamW, EMA "
        f"{u_opts.get('ema', '-')} (the EMA weights are shipped); latent pairs from a pool of "
        f"{u_opts.get('pool', '-')} refreshed by {u_opts.get('refresh', '-')} per step"
        f"{_scale_augmentation(u_opts)}; LR "
        f"crops degraded by the Real-ESRGAN second-order pipeline with probability "
        f"{u_opts.get('realesrgan_prob', 0.0)}{_strength(u_opts)}, else bicubic x4. PFJ "
        "sees gains as the runtime "
        f"can produce them: zero with probability {u_opts.get('gain_zero_prob', '-')}, else "
        f"tanh(N(0, {u_opts.get('gain_std', '-')})) per component, g_NR = 0 for "
        f"t >= {cfg.dtss.nr_start_t}. The target does not depend on the gains, so PFJ "
        "learns a conditioning transform that holds for any gain (close to gain-invariant).",
        *_phase_lines((unet or {}).get("summary", {}).get("phases", []), (unet or {}).get("step")),
        *(
            [
                "- Decoder: fine-tuned after the UNet with the encoder frozen (the UNet's latent "
                "space is unchanged), L1 + "
                f"{decoder['summary']['options'].get('perceptual_weight', '-')} x LPIPS on "
                "posterior means" + _latent_noise(decoder["summary"]["options"]) + "; crops "
                f"{decoder['summary']['options'].get('crop', '-')} px; a share "
                f"{decoder['summary']['options'].get('lr_input_prob', '-')} of inputs are "
                "bicubic-upscaled LR crops"
                + _decoder_samples(decoder["summary"]["options"])
                + ". The shipped VAE decoder is this one."
                + _decoder_lag(decoder["summary"], unet)
            ]
            if decoder
            else []
        ),
        *(
            [
                f"- Labels and MMLE: reused from {mmle_reused.label}. Its MMLE "
                "reads the same latent space (the VAE encoder is the same) and predicts the same "
                "metrics, but its labels are trajectories of that model's UNet, not this one's."
            ]
            if mmle_reused
            else _labels_mmle_lines(cfg, m_sum, labels)
        ),
        *([f"- {lag}"] if lag else []),
        "",
        *evaluation_lines(quality, evaluation),
    ]
    return "\n".join(lines)


def ship(
    cfg: ModelConfig,
    workdir: str | Path,
    out: str | Path | None = None,
    *,
    evaluation: dict[str, Any] | None = None,
    max_mb: float = MAX_MB,
    half: bool = False,
    quality: dict[str, Any] | None = None,
    mmle_from: str | Path | None = None,
) -> Path:
    """Assemble the workdir's checkpoints into the model folder ``out`` (default: shipped tiny);
    with ``mmle_from``, MMLE comes from that model folder instead of the workdir's mmle stage."""
    workdir = Path(workdir)
    out = Path(out) if out is not None else SHIPPED / cfg.name
    vae_reused = _vae_reused(workdir)
    unet_init = _unet_init(workdir)
    models = frozen_models(cfg, workdir, with_mmle=mmle_from is None)
    # the step from the checkpoint's name: the card loads the checkpoint itself
    steps = list_checkpoints(workdir / "unet")
    lag = label_lag(_labels(workdir), steps[-1][0] if steps else None) if mmle_from is None else ""
    if lag:
        log.warning("%s Rerun `adadiff train labels` and `train mmle` to match it.", lag)
    stale = stale_mmle(workdir) if mmle_from is None else ""
    if stale:
        log.warning("%s Rerun `adadiff train mmle` on them (in a fresh mmle folder).", stale)
    mmle_reused = None
    if mmle_from is not None:
        models = _reused_mmle(models, mmle_from)
        mmle_reused = Reused.of(models_folder(mmle_from))
    sources = {
        "vae": f"reused from {vae_reused.label}" if vae_reused else "trained in this run",
        "unet": "trained in this run"
        + (f", starting from the weights of {unet_init.label}" if unet_init else ""),
        "mmle": f"reused from {mmle_reused.label}" if mmle_reused else "trained in this run",
    }
    record = training_record(
        stage_photos(workdir, vae_reused=vae_reused, mmle_reused=mmle_reused, unet_init=unet_init),
        sources,
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as exc:
        raise ModelFolderError(
            f"cannot write the model folder {out} ({exc.strerror or exc}); choose an --out you "
            "can write to"
        ) from exc
    tmp.chmod(0o755)
    try:
        # a kill now would leave the half-written folder beside --out
        with _terminate_as_interrupt():
            try:
                models.save(tmp, half=half)
                write_record(tmp, record)
            except Exception as exc:  # OSError, or safetensors' SafetensorError for a short write
                if not (isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"):
                    raise
                raise ModelFolderError(
                    f"cannot write the model folder beside {out} ({str(exc).splitlines()[0]}); "
                    f"{'the existing ' + str(out) + ' is unchanged; ' if out.exists() else ''}"
                    "free space or choose another --out, then run again"
                ) from exc
            for path in tmp.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            size = folder_bytes(tmp) / 1e6
            if size > max_mb:
                raise ModelFolderError(
                    f"the model folder is {size:.1f} MB, over the {max_mb:g} MB limit; shrink the "
                    "config" + ("" if half else ", or store the weights as fp16 (--half)")
                )
            check_figures_match(tmp, evaluation=evaluation, quality=quality, shown_as=out)
            params = describe(models)["parameters"]
            card = model_card(
                models.config,
                workdir,
                params,
                size,
                evaluation,
                half=half,
                quality=quality,
                vae_reused=vae_reused,
                mmle_reused=mmle_reused,
                unet_init=unet_init,
            )
            (tmp / MODEL_CARD).write_text(card)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("shipped %s (%.1f MB) to %s", models.source, size, out)
    return out


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (unless ignored, as under nohup) raise KeyboardInterrupt, as Ctrl-C
    does, so that the temporary folder is removed; their handlers are restored after."""
    signals = [signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # absent on Windows
    if hangup is not None and signal.getsignal(hangup) is signal.SIG_DFL:
        signals.append(hangup)

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def models_folder(model: str | Path) -> Path:
    """The folder ``load_models`` reads for a preset name or a path."""
    return Path(load_models(model).source)


def _vae_reused(workdir: Path) -> Reused | None:
    """The model folder the UNet's VAE came from (``train unet --vae-from``), when not the
    workdir's own vae stage."""
    return _unet_source(workdir, "vae_from", "was trained on the VAE of", "VAE")


def _unet_init(workdir: Path) -> Reused | None:
    """The model folder the UNet and PFJ started from (``train unet --init-from``), if any."""
    return _unet_source(workdir, "init_from", "started from the UNet of", "initial UNet")


def _unet_source(workdir: Path, key: str, verb: str, what: str) -> Reused | None:
    """The model folder the UNet stage's summary names under ``key``; refused when that folder
    is gone, since its card is the only record of what that component trained on."""
    unet = _checkpoint(workdir, "unet")
    origin = (unet or {}).get("summary", {}).get(key, "")
    if not origin:
        return None
    folder = Path(origin)
    if read_record(folder) is None:
        raise ModelFolderError(
            f"the UNet in {workdir} {verb} {folder}, which has no model card or training.json "
            f"any more; restore that folder so the new card can say what its {what} trained on"
        )
    return Reused.of(folder)


def _swap_in(new: Path, out: Path) -> None:
    if out.exists():
        if not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"{out} exists and is not a model folder; refusing to replace it")
        old = out.with_name(f".{out.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


EVALUATION_HEADING = "## Evaluation"


def evaluation_lines(
    quality: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> list[str]:
    """The card's Evaluation section, as ``ship`` writes it."""
    for data, what in ((quality, "quality"), (evaluation, "evaluate_tiny")):
        side = data.get("max_side") if isinstance(data, dict) else None
        if side:  # the card states figures of the hold-out photos, whole
            raise ConfigError(
                f"the {what} JSON was made with --max-side {side} (centre crops); the card quotes "
                f"the whole hold-out photos: rerun benchmarks.{what} without --max-side"
            )
    return [EVALUATION_HEADING, "", *quality_section(quality), *_eval_section(evaluation), ""]


def check_figures_match(
    folder: Path,
    *,
    evaluation: dict[str, Any] | None,
    quality: dict[str, Any] | None,
    shown_as: Path | None = None,
) -> None:
    """Refuse benchmark JSONs made on another model than the one in ``folder``: a card must
    not quote figures of other weights. ``shown_as`` names the folder in the rerun commands
    (``ship`` checks its temporary folder before it takes the final name)."""
    name = shell_arg(shown_as or folder)
    # ship checks weights that are not at their --out yet: what is there now is the previous
    # model (or nothing), so a benchmark of that folder can only be run after this ship
    then = (
        ""
        if shown_as is None
        else f" after shipping without --eval and --quality, then `adadiff train card {name} "
        "--eval E.json --quality Q.json`"
    )
    model = evaluation.get("model", {}) if isinstance(evaluation, dict) else {}
    digest = model.get("config_digest") if isinstance(model, dict) else None
    own = ModelConfig.load(folder).digest()
    if digest is not None and digest != own:
        raise ConfigError(
            f"the evaluate_tiny JSON describes another model (config digest {digest}, the "
            f"folder's {own}); run `python -m benchmarks.evaluate_tiny --model {name}`{then}"
        )
    # Candidates of one recipe share a config: the weights digest tells them apart (JSONs
    # written before it was recorded are taken on trust).
    weights = weights_digest(folder)
    rerun = {
        "evaluate_tiny": f"python -m benchmarks.evaluate_tiny --model {name}",
        "quality": f"python -m benchmarks.quality --model {name}",
    }
    for what, recorded in (
        ("evaluate_tiny", model.get("weights_digest") if isinstance(model, dict) else None),
        ("quality", quality.get("weights_digest") if isinstance(quality, dict) else None),
    ):
        if recorded is not None and recorded != weights:
            raise ConfigError(
                f"the {what} JSON was made with other weights (digest {recorded}, the folder's "
                f"{weights}); run `{rerun[what]}`{then}"
            )


def refresh_card(
    folder: str | Path, *, evaluation: dict[str, Any], quality: dict[str, Any]
) -> Path:
    """Rewrite the Evaluation section of a shipped folder's model card from new benchmark JSONs.

    For benchmarks rerun (or changed) on weights that did not change: the weights, the record
    and every other part of the card (the sections ``ship`` generated from checkpoints that may
    be gone by now, and notes added after shipping) stay as they are."""
    folder = Path(folder)
    path = folder / MODEL_CARD
    if not (folder / CONFIG_FILE).is_file() or not path.is_file():
        raise ModelFolderError(
            f"{folder} is not a shipped model folder (it needs {CONFIG_FILE} and {MODEL_CARD}); "
            "ship one with `adadiff train ship`"
        )
    for data, what in ((evaluation, "evaluate_tiny"), (quality, "quality")):
        if not isinstance(data, dict):
            raise ConfigError(
                f"the {what} JSON holds a {type(data).__name__}, not what benchmarks.{what} writes"
            )
    check_figures_match(folder, evaluation=evaluation, quality=quality)
    try:
        section = evaluation_lines(quality, evaluation)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"the evaluate_tiny or quality JSON lacks what the card quotes ({exc!r}); give the "
            "files those benchmarks wrote"
        ) from exc
    lines = path.read_text().split("\n")
    if EVALUATION_HEADING not in lines:
        raise ModelFolderError(
            f"{path} has no '{EVALUATION_HEADING}' section to refresh; ship the folder again"
        )
    start = lines.index(EVALUATION_HEADING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    text = "\n".join([*lines[:start], *section, *lines[end:]])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_evaluation(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the evaluation JSON {path}: {exc}") from exc
