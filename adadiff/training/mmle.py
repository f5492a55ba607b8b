"""Stage 4: the MMLE regressor, (x0 latent, LR latent, t) -> the configured raw scores.

Training regresses standardised scores (per metric: minus the training mean, over the training
std) with L2 and Adam. Consecutive calls of one trajectory also give an L2 term on the change of
R_FR and R_NR between them (``diff_weight``): DTSS acts on tanh(R_i - R_{i-1}), so the steps'
differences matter as much as the scores. The runtime adds the configured signed weights to raw
scores, so ``baked_mmle`` folds the de-standardisation into the last linear layer: the shipped
module outputs raw scores and needs no extra tensors.

The FR scores compare the decoded x0 with the bicubic LR input, so across tiles their level is set
largely by how well the VAE reconstructs that input, which the latents do not show (a colour fix in
the config, ``color_fix``, takes the tile-wide part of that error out of the scores; the rest
stays). The labels record that error for every crop (``recon_lr``; ``recon_err``: log10 MSE; with
LPIPS scored, ``recon_lpips``), and MMLE's LR branch (``MMLE.recon_error``) regresses it with its
own L2 term (``recon_weight``, standardised log10, random rot90 and flips) before it enters the
head. Without that term the branch would be just more weights, learning from the few hundred
trajectories. PSNR and LPIPS are built from that estimate and the head's latent part, whose own
targets are the labels' ``latent_err`` and ``latent_lpips`` (``latent_weight``). For LPIPS the
reconstruction part is by default the branch's training mean, not its per-crop estimate
(``lpips_recon``): on photos the branch never saw, that estimate ranks the real reconstruction LPIPS
at Spearman 0.66 only, and it made the LPIPS column rank worse than a constant did.

With ``mmle.reference`` "hr" the full-reference targets are the labels' scores against the HR
crop (``referenced``) instead; no reconstruction error of the input enters them, so PSNR and LPIPS
are head outputs like the rest and the LR branch's estimate is one more feature of the head.

A share of whole trajectories (``val_fraction``) is held out, or, with ``val_photos``, every
trajectory of the named photos: a photo the regressor never saw tells how it generalises, which
a random share of trajectories (their photos are in training too) overstates. Each checkpoint
reports the held-out rows' standardised L2 and Spearman's rho per metric.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from adadiff.config import MetricKind, ModelConfig
from adadiff.errors import ConfigError
from adadiff.training.assemble import MMLE_STAGE, build_mmle, load_mmle_weights
from adadiff.training.labels import GRAY_OUTPUT, color_fix_tag, labels_origin, load_shards
from adadiff.training.labels import STAGE as LABEL_STAGE
from adadiff.training.loop import (
    TRAINED_CONFIG_KEYS,
    Progress,
    StageResult,
    TrainOptions,
    numpy_rng,
    rng_state,
    run_stage,
    set_rng_state,
)

log = logging.getLogger("adadiff.training")

STAGE = MMLE_STAGE


LPIPS_RECON = ("estimate", "mean")


@dataclass(frozen=True, kw_only=True)
class MMLEOptions:
    diff_weight: float = 1.0
    recon_weight: float = 1.0
    latent_weight: float = 1.0
    # LPIPS's reconstruction part: the LR branch's per-crop estimate, or its training mean
    lpips_recon: str = "mean"
    val_fraction: float = 0.1
    val_photos: tuple[str, ...] = ()  # when given, replaces val_fraction

    def __post_init__(self) -> None:
        weights = (self.diff_weight, self.recon_weight, self.latent_weight)
        if min(weights) < 0 or not 0 <= self.val_fraction < 1:
            raise ConfigError(
                "diff_weight, recon_weight and latent_weight must be >= 0 and val_fraction in "
                f"[0, 1), got {self}"
            )
        if self.lpips_recon not in LPIPS_RECON:
            raise ConfigError(f"lpips_recon must be one of {LPIPS_RECON}, got {self.lpips_recon!r}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# The label arrays of each part of a split score (MMLE.split_columns): MSE, LPIPS.
LATENT_TARGETS = ("latent_err", "latent_lpips")
RECON_TARGETS = ("recon_err", "recon_lpips")


def _log10_part(values: np.ndarray, part: int) -> np.ndarray:
    """The labels' errors as the branch's targets: log10 MSE is stored as such, LPIPS raw."""
    values = values.astype(np.float32)
    return values if part == 0 else np.log10(np.maximum(values, 1e-6))


class LabelSet:
    """Label arrays as tensors, finite rows only, with each row's predecessor in its trajectory.

    ``latent`` holds the log10 latent errors of the split scores' parts, one column per part
    (None when the labels lack one)."""

    def __init__(self, data: dict[str, np.ndarray], rows: np.ndarray, parts: int) -> None:
        self.x0 = torch.from_numpy(data["x0"][rows])
        self.lr = torch.from_numpy(data["lr"][rows])
        self.t = torch.from_numpy(data["t"][rows].astype(np.float32))
        self.scores = torch.from_numpy(data["scores"][rows].astype(np.float32))
        keys = LATENT_TARGETS[:parts]
        self.latent = (
            torch.from_numpy(
                np.stack([_log10_part(data[k][rows], j) for j, k in enumerate(keys)], axis=1)
            )
            if all(k in data for k in keys)
            else None
        )
        key = {
            (int(tr), int(c)): i
            for i, (tr, c) in enumerate(zip(data["traj"][rows], data["call"][rows], strict=True))
        }
        self.prev = torch.tensor(
            [
                key.get((int(tr), int(c) - 1), -1)
                for tr, c in zip(data["traj"][rows], data["call"][rows], strict=True)
            ],
            dtype=torch.long,
        )

    def __len__(self) -> int:
        return len(self.t)


class ReconSet:
    """LR latents of label crops with the log10 errors (MSE, then LPIPS when ``parts`` is 2) of
    the VAE's reconstruction of their input, [N, parts]."""

    def __init__(self, data: dict[str, np.ndarray], val_photos: Sequence[str], parts: int) -> None:
        keys = RECON_TARGETS[:parts]
        if not all(k in data for k in (*keys, "recon_lr")):
            raise ConfigError(
                "the label shards lack reconstruction errors "
                f"{[k for k in (*keys, 'recon_lr') if k not in data]} (shards from before they "
                "were recorded); run `adadiff train labels` again with the same "
                "--steps to add them to the shards, or train with --recon-weight 0"
            )
        err = np.stack([_log10_part(data[k], j) for j, k in enumerate(keys)], axis=1)
        finite = np.all(np.isfinite(err), axis=1)
        is_val = np.isin(data["recon_photo_name"], list(val_photos)) & finite
        train = finite & ~is_val
        self.lr = torch.from_numpy(data["recon_lr"][train])
        self.err = torch.from_numpy(err[train])
        self.val_lr = torch.from_numpy(data["recon_lr"][is_val])
        self.val_err = torch.from_numpy(err[is_val])
        if len(self.err) < 2:
            raise ConfigError(f"only {len(self.err)} reconstruction-error rows; make more labels")
        self.mean = self.err.mean(dim=0)
        self.std = self.err.std(dim=0).clamp_min(1e-6)


def _per_target_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch, summed over the [B, K] targets: each target weighs as much as a
    lone one would, so adding LPIPS's parts does not halve PSNR's."""
    return (pred - target).pow(2).mean(dim=0).sum()


def _dihedral(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One random rotation by a multiple of 90 degrees, then maybe a flip (the error is
    invariant to both)."""
    x = torch.rot90(x, int(rng.integers(0, 4)), dims=(2, 3))
    return torch.flip(x, dims=(3,)) if rng.random() < 0.5 else x


def referenced(data: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The labels with the scores MMLE learns for ``cfg``: as the oracle scored them against the
    input, or (``mmle.reference`` "hr") with each full-reference column against the HR crop."""
    if cfg.mmle.reference == "input":
        return data
    if "scores_hr" not in data:
        raise ConfigError(
            "the model's MMLE predicts full-reference scores against the HR crop (mmle.reference "
            '"hr" in adadiff.json), and these label shards do not hold them (made before they '
            "were recorded); move the labels folder away and run `adadiff train labels` again"
        )
    hr_names = [str(m) for m in data["hr_metrics"]]
    scores = data["scores"].copy()
    for i, metric in enumerate(cfg.mmle.metrics):
        if metric.kind is MetricKind.FULL_REFERENCE:
            if metric.name not in hr_names:
                raise ConfigError(
                    f"the labels' HR scores are {hr_names}, the config's metric {metric.name!r} is "
                    "not among them; make the labels with this config"
                )
            scores[:, i] = data["scores_hr"][:, hr_names.index(metric.name)]
    return {**data, "scores": scores}


def split_labels(
    data: dict[str, np.ndarray],
    val_fraction: float,
    seed: int,
    val_photos: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val), split by whole trajectories or, given ``val_photos``, by photo;
    rows with non-finite scores go."""
    finite = np.all(np.isfinite(data["scores"]), axis=1)
    if val_photos:
        names = data.get("photo_name", np.full(len(data["t"]), "", dtype=str))
        known = sorted({str(n) for n in names if n})
        unknown = [p for p in val_photos if p not in known]
        if unknown:
            raise ConfigError(
                f"--val-photos {unknown} are not in the labels; their shards name {known} "
                "(shards made before photo names were recorded name none)"
            )
        is_val = np.isin(names, list(val_photos))
    else:
        trajs = np.unique(data["traj"])
        n_val = round(val_fraction * len(trajs))
        val_trajs = numpy_rng(seed, 11).permutation(trajs)[:n_val]
        is_val = np.isin(data["traj"], val_trajs)
    return np.flatnonzero(finite & ~is_val), np.flatnonzero(finite & is_val)


class MMLEStage:
    name = STAGE
    # its output columns are the metrics (their weights come later, at calibration)
    config_keys = (*TRAINED_CONFIG_KEYS, "mmle")

    def __init__(
        self,
        cfg: ModelConfig,
        opts: TrainOptions,
        mopts: MMLEOptions,
        data: dict[str, np.ndarray],
    ) -> None:
        names = tuple(str(m) for m in data["metrics"])
        self.metric_names = tuple(m.name for m in cfg.mmle.metrics)
        if names != self.metric_names:
            raise ConfigError(
                f"labels hold scores for {list(names)}, the model config lists "
                f"{list(self.metric_names)}; make the labels with this config"
            )
        # MMLE stands in for the oracle on what the runtime outputs: its colour-fixed image
        fix = str(data["color_fix"]) if "color_fix" in data else color_fix_tag(cfg)
        if fix != color_fix_tag(cfg):
            raise ConfigError(
                f"the labels were scored with colour fix {fix}, the model config asks for "
                f"{color_fix_tag(cfg)}, so MMLE would learn the scores of images the runtime "
                "does not output; train with the config the labels were made with, or move the "
                "labels folder aside and run `adadiff train labels` with this one"
            )
        if str(data.get("gray_output", GRAY_OUTPUT)) != GRAY_OUTPUT:
            raise ConfigError(
                "the labels scored the estimates of gray inputs in colour, where the runtime "
                "returns them gray, so MMLE would learn the scores of images it does not output; "
                "move the labels folder aside and run `adadiff train labels` again"
            )
        self.cfg, self.opts, self.mopts = cfg, opts, mopts
        # what drew the labels (train_mmle fills these in from the shards)
        self.labels_from: tuple[str, ...] = ()
        self.label_shards = 0
        data = referenced(data, cfg)
        train_rows, val_rows = split_labels(data, mopts.val_fraction, opts.seed, mopts.val_photos)
        if len(train_rows) < 2:
            raise ConfigError(f"only {len(train_rows)} usable label rows; make more labels")
        self.model = build_mmle(cfg, opts.seed).train()
        parts = self.model.recon_scale.shape[1]
        self.train = LabelSet(data, train_rows, parts)
        self.val = LabelSet(data, val_rows, parts) if len(val_rows) else None
        self.mean = self.train.scores.mean(dim=0)
        self.std = self.train.scores.std(dim=0).clamp_min(1e-6)
        kinds = [m.kind for m in cfg.mmle.metrics]
        w = torch.tensor([m.weight for m in cfg.mmle.metrics])
        # Rows: R_FR and R_NR as linear maps of the raw scores.
        self.r_map = torch.stack(
            [
                w * torch.tensor([k is kind for k in kinds], dtype=torch.float32)
                for kind in (MetricKind.FULL_REFERENCE, MetricKind.NO_REFERENCE)
            ]
        )
        has_prev = self.train.prev >= 0
        d = self._r(self.train.scores[has_prev]) - self._r(
            self.train.scores[self.train.prev[has_prev]]
        )
        self.diff_std = d.std(dim=0).clamp_min(1e-6) if len(d) > 1 else torch.ones(2)
        self.recon = ReconSet(data, mopts.val_photos, parts) if mopts.recon_weight > 0 else None
        split = self.model.split_columns
        self.latent_weight = mopts.latent_weight if split else 0.0
        if self.latent_weight > 0 and self.train.latent is None:
            raise ConfigError(
                f"the label shards lack latent errors {list(LATENT_TARGETS[:parts])} (shards from "
                "before they were recorded); run `adadiff train labels` again with the same "
                "--steps to add them to the shards, or train with --latent-weight 0"
            )
        with torch.no_grad():
            if self.recon is not None:
                self.model.recon_scale.copy_(torch.stack([self.recon.mean, self.recon.std]))
            if parts == 2 and mopts.lpips_recon == "mean":
                self.model.recon_used[1] = 0.0
            for col, part in split:
                scale = torch.stack([self.mean[col], self.std[col]])
                self.model.column_scale[:, part] = scale
                if part == 0:
                    # log10 MSE = -PSNR / 10: the head starts out predicting standardised PSNR
                    self.model.latent_scale[:, 0] = -scale / 10
                else:
                    # the head starts out predicting the standardised log10 of the whole score
                    logs = torch.log10(self.train.scores[:, col].clamp_min(1e-6))
                    self.model.latent_scale[:, 1] = torch.stack([logs.mean(), logs.std()])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=opts.lr)
        self.rng = numpy_rng(opts.seed, 5)
        self.last_val: dict[str, Any] = {}

    def _r(self, scores: torch.Tensor) -> torch.Tensor:
        return scores @ self.r_map.T

    def _predict(self, s: LabelSet, idx: torch.Tensor) -> torch.Tensor:
        """Standardised predictions for rows ``idx`` of ``s``."""
        return self.model(s.x0[idx], s.lr[idx], s.t[idx])

    def step(self, step: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.opts.lr_at(step)
        s = self.train
        idx = torch.from_numpy(self.rng.integers(0, len(s), self.opts.batch))
        target = (s.scores[idx] - self.mean) / self.std
        out, recon_est = self.model.parts(s.x0[idx], s.lr[idx], s.t[idx])
        pred = self.model.combine(out, recon_est)
        loss = F.mse_loss(pred, target)
        terms = {"l2": loss.item()}
        if self.latent_weight > 0 and s.latent is not None:
            # The split columns' head outputs, before they are combined with the
            # reconstruction errors, have targets of their own: the latents' share of the error.
            cols, parts = zip(*self.model.split_columns, strict=True)
            mean, std = self.model.latent_scale[:, list(parts)]
            latent = _per_target_l2(
                out[:, list(cols)], (s.latent[idx][:, list(parts)] - mean) / std
            )
            loss = loss + self.latent_weight * latent
            terms["latent"] = latent.item()
        with_prev = idx[s.prev[idx] >= 0]
        if self.mopts.diff_weight > 0 and len(with_prev):
            prev = s.prev[with_prev]
            raw_now = self._predict(s, with_prev) * self.std + self.mean
            raw_prev = self._predict(s, prev) * self.std + self.mean
            d_pred = self._r(raw_now) - self._r(raw_prev)
            d_true = self._r(s.scores[with_prev]) - self._r(s.scores[prev])
            diff = F.mse_loss(d_pred / self.diff_std, d_true / self.diff_std)
            loss = loss + self.mopts.diff_weight * diff
            terms["diff"] = diff.item()
        if self.recon is not None:
            r = self.recon
            ridx = torch.from_numpy(self.rng.integers(0, len(r.err), self.opts.batch))
            pred_r = self.model.recon_error(_dihedral(r.lr[ridx], self.rng))
            recon = _per_target_l2(pred_r, (r.err[ridx] - r.mean) / r.std)
            loss = loss + self.mopts.recon_weight * recon
            terms["recon"] = recon.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        terms["loss"] = loss.item()
        return terms

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        if self.val is None or len(self.val) == 0:
            return {}
        self.model.eval()
        pred = torch.cat(
            [
                self._predict(self.val, torch.arange(i, min(i + 256, len(self.val))))
                for i in range(0, len(self.val), 256)
            ]
        )
        self.model.train()
        target = (self.val.scores - self.mean) / self.std
        raw = (pred * self.std + self.mean).numpy()
        rho = {
            name: spearman(raw[:, j], self.val.scores[:, j].numpy())
            for j, name in enumerate(self.metric_names)
        }
        out = {"val_l2": float(F.mse_loss(pred, target)), "spearman": rho, "rows": len(self.val)}
        if self.recon is not None and len(self.recon.val_err) > 2:
            self.model.eval()
            pred_r = self.model.recon_error(self.recon.val_lr).numpy()
            self.model.train()
            truth = self.recon.val_err.numpy()
            out["recon_spearman"] = {
                key.removeprefix("recon_"): spearman(pred_r[:, j], truth[:, j])
                for j, key in enumerate(RECON_TARGETS[: truth.shape[1]])
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        self.last_val = self.validate()
        if self.last_val:
            log.info(
                "mmle: val L2 %.4f, Spearman %s",
                self.last_val["val_l2"],
                " ".join(f"{k} {v:.3f}" for k, v in self.last_val["spearman"].items()),
            )
            if "recon_spearman" in self.last_val:
                log.info(
                    "mmle: reconstruction error Spearman %s",
                    " ".join(f"{k} {v:.3f}" for k, v in self.last_val["recon_spearman"].items()),
                )
        return {
            "mmle": self.model.state_dict(),
            "mean": self.mean.clone(),
            "std": self.std.clone(),
            "metrics": list(self.metric_names),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.rng),
            "labels_from": list(self.labels_from),
            "label_shards": self.label_shards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints from before the labels' origin was recorded cannot be checked
        trained_on = state.get("labels_from")
        if not self.labels_from:  # labels given as arrays, not read from shards: keep the record
            self.labels_from = tuple(trained_on or ())
            self.label_shards = int(state.get("label_shards", 0))
        if trained_on and self.labels_from and list(trained_on) != list(self.labels_from):
            raise ConfigError(
                f"this MMLE checkpoint trained on labels drawn by {trained_on}, the labels "
                f"folder now holds labels drawn by {list(self.labels_from)}; move the mmle "
                "folder aside to train MMLE on the new labels (it would learn from two models "
                "at once)"
            )
        before = int(state.get("label_shards", 0))
        if before and self.label_shards != before:
            log.warning(
                "mmle: the labels folder holds %d shards, %d when this MMLE started; the run "
                "goes on with all of them and the score standardisation it started with",
                self.label_shards,
                before,
            )
        chosen = self.model.recon_used.clone()
        load_mmle_weights(self.model, state)
        if not torch.equal(chosen, self.model.recon_used):
            raise ConfigError(
                "--lpips-recon differs from the one this MMLE checkpoint was trained with; "
                "resume with the same choice, or move the mmle folder aside to start over"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self.rng, state["rng"])
        # Keep the standardisation the weights were trained with, even if labels were added.
        self.mean, self.std = state["mean"].clone(), state["std"].clone()
        if self.recon is not None:
            # the model's buffer holds the standardisation its branch was trained with
            self.recon.mean, self.recon.std = self.model.recon_scale.clone()

    def summary(self) -> dict[str, Any]:
        return {
            "train_rows": len(self.train),
            "recon_rows": len(self.recon.err) if self.recon is not None else 0,
            "validation": self.last_val,
            "options": {**self.mopts.__dict__, "val_photos": list(self.mopts.val_photos)},
        }


def train_mmle(
    cfg: ModelConfig,
    workdir: str | Path,
    opts: TrainOptions,
    mopts: MMLEOptions = MMLEOptions(),
    *,
    data: dict[str, np.ndarray] | None = None,
    progress: Progress | None = None,
) -> StageResult:
    """Train (or resume) MMLE into ``workdir/mmle`` on the shards in ``workdir/labels``."""
    workdir = Path(workdir)
    paths: list[Path] = []
    if data is None:
        paths = sorted((workdir / LABEL_STAGE).glob("shard-*.npz"))
        data = load_shards(paths)
    # MMLE's layers take latents of any size, so labels of another tile size would train it,
    # on the scores of tiles the runtime never makes
    side = int(data["x0"].shape[-1]) * cfg.vae_scale_factor
    if side != cfg.tile_size:
        raise ConfigError(
            f"{workdir / LABEL_STAGE} holds labels of {side} px tiles, the config's tile_size is "
            f"{cfg.tile_size}; train with the --model the labels were made with, or move the "
            "labels folder aside and run `adadiff train labels` with this one"
        )
    stage = MMLEStage(cfg, opts, mopts, data)
    stage.labels_from, stage.label_shards = labels_origin(paths), len(paths)
    log.info(
        "mmle: %d training rows, %s validation rows",
        len(stage.train),
        len(stage.val) if stage.val is not None else 0,
    )
    return run_stage(stage, workdir / STAGE, opts, config=cfg.to_dict(), progress=progress)
