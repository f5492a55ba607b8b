"""Stage 2: train the UNet and PFJ jointly on the denoising loss, with the VAE frozen.

Per sample: HR latent x0 = E(hr) and LR latent o = E(bicubic_x4_up(degrade(hr))), both scaled
as VAEEncoderWrapper scales them (the factor the VAE stage measured); t uniform in [0, T-1];
z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; the UNet sees concat(z_t, PFJ(o, g)) and the model's
fixed empty-prompt embedding, and predicts eps (or v, as the config says).

How PFJ sees gains: the runtime feeds g = (g_FR, g_NR) = tanh(R_i - R_{i-1}); zeros before a
tile's first score and on every step of a uniform schedule, and g_NR = 0 while t >= nr_start_t.
Training draws g the same way the runtime can produce it: zeros with ``gain_zero_prob``, else
each component tanh(N(0, gain_std)), with g_NR zeroed where t >= nr_start_t. The target
does not depend on g, so this objective teaches PFJ a conditioning transform that holds for any
gain the runtime may feed (it is pushed towards gain-invariance); a gain-dependent PFJ would
need a trajectory-level objective, which this trainer does not attempt.

Encoding a batch with the frozen VAE costs about four times the UNet step on a CPU, so latent
pairs live in a pool (``pool``) that is filled once and then refreshed first-in-first-out with
``refresh`` newly encoded pairs per step; each pair is drawn a few times (``batch * pool /
refresh / pool`` on average), each time with new t, noise and gains. The pool is part of the
checkpoint, so a resumed run continues exactly.

Weights are averaged with an EMA (``ema``); the averaged UNet and PFJ are what later stages and
the shipped model use.

``device`` runs the VAE encoding, the pool and the optimisation there (``cuda``: a GPU); crops,
timesteps, noise and gains are still drawn on the CPU from the same generators, so a run is the
same sequence of samples on any device and its checkpoints resume on any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from adadiff.config import ModelConfig, PredictionType
from adadiff.devices import parse_device
from adadiff.errors import ConfigError, shell_arg
from adadiff.models.bundle import load_models
from adadiff.models.networks import PFJ
from adadiff.models.wrappers import DiffusersModel, UNetWrapper
from adadiff.runtime.schedule import alphas_cumprod
from adadiff.training.checkpoint import load_latest, require_latest
from adadiff.training.data import PhotoWeighting, check_min_scale, check_weighting
from adadiff.training.deadleaves import with_dead_leaves
from adadiff.training.degrade import strength_config
from adadiff.training.fingerprint import same_encoder
from adadiff.training.loop import (
    EMA,
    Progress,
    StageResult,
    StepAbandoned,
    TrainOptions,
    check_trained_config,
    numpy_rng,
    rng_state,
    run_stage,
    set_rng_state,
    stop_requested,
)
from adadiff.training.pairs import (
    PairStream,
    check_training_set,
    load_images,
    merged_photos,
    photo_names,
    photos_a_crop_fits,
    to_tensor,
    warn_scale_caps,
)
from adadiff.training.shading import with_shading
from adadiff.training.vae import STAGE as VAE_STAGE
from adadiff.training.vae import build_vae, encode_moments

log = logging.getLogger("adadiff.training")

STAGE = "unet"


@dataclass(frozen=True, kw_only=True)
class UNetOptions:
    gain_zero_prob: float = 0.5
    gain_std: float = 0.2
    realesrgan_prob: float = 0.0
    realesrgan_strength: str = "full"  # degrade.STRENGTHS
    ema: float = 0.999
    grad_clip: float = 1.0
    pool: int = 1024  # latent pairs kept encoded; 0 encodes every batch afresh
    refresh: int = 4  # pairs encoded per step into the pool, replacing the oldest
    # Equal odds per photo: by area, retina and the Hubble deep field alone were half the crops.
    weighting: PhotoWeighting = "photo"
    min_scale: float = 1.0  # scale augmentation of the HR crops (CropConfig.min_scale)
    photos: str = "train"  # pairs.PHOTO_SETS: "train+validation" for the final fit of a recipe
    deadleaves: int = 0  # synthetic dead-leaves images added to the photos (deadleaves.py)
    shading: int = 0  # synthetic smooth-shading images added to the photos (shading.py)
    device: str = "cpu"  # where the networks train: cpu or cuda[:N]

    def __post_init__(self) -> None:
        check_weighting(self.weighting)
        check_min_scale(self.min_scale)
        if self.deadleaves < 0:
            raise ConfigError(f"deadleaves must be >= 0, got {self.deadleaves}")
        if self.shading < 0:
            raise ConfigError(f"shading must be >= 0, got {self.shading}")
        check_training_set(self.photos)
        strength_config(self.realesrgan_strength)
        parse_device(self.device, "torch")
        if self.pool < 0 or self.refresh < 0 or (self.pool and not self.refresh):
            raise ConfigError(
                f"pool must be >= 0 and refresh >= 1 when pool > 0, got {self.pool}, {self.refresh}"
            )
        if not 0 <= self.gain_zero_prob <= 1 or self.gain_std < 0:
            raise ConfigError(
                f"gain_zero_prob must be in [0, 1] and gain_std >= 0, got {self.gain_zero_prob}, "
                f"{self.gain_std}"
            )
        if not 0 <= self.ema < 1 or self.grad_clip <= 0:
            raise ConfigError(f"ema must be in [0, 1) and grad_clip > 0, got {self}")


def build_denoiser(cfg: ModelConfig, seed: int) -> tuple[DiffusersModel, PFJ, torch.Tensor]:
    """UNet, PFJ and the fixed empty-prompt embedding, seeded like ``build_random``."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg.unet)
        pfj = PFJ(
            latent_channels=cfg.latent_channels, gain_dim=cfg.pfj.gain_dim, hidden=cfg.pfj.hidden
        )
        text = torch.randn(cfg.text_tokens, cfg.text_dim) * 0.5
    return unet, pfj, text


def sample_gains(
    t: torch.Tensor,
    gain_dim: int,
    nr_start_t: int,
    zero_prob: float,
    std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Gains as the runtime produces them: see the module docstring."""
    b = t.shape[0]
    g = torch.tanh(torch.randn(b, gain_dim, generator=generator) * std)
    keep = torch.rand(b, 1, generator=generator) >= zero_prob
    g = g * keep
    if gain_dim >= 2:
        g[:, 1] = torch.where(t < nr_start_t, g[:, 1], torch.zeros_like(g[:, 1]))
    return g


class UNetStage:
    name = STAGE

    def __init__(
        self,
        cfg: ModelConfig,
        opts: TrainOptions,
        uopts: UNetOptions,
        images: list[np.ndarray],
        vae_state: dict[str, Any],
        scaling_factor: float,
        *,
        init: InitialWeights | None = None,
    ) -> None:
        self.cfg, self.opts, self.uopts = cfg, opts, uopts
        self.photos: list[str] = []  # names of the training photos, for the model card
        self.vae_from = ""  # the model folder the VAE came from (--vae-from), for the card
        # the model folder the UNet and PFJ started from (--init-from), for the card
        self.init_from = init.origin if init is not None else ""
        # What each resumed run trained with, from the step it started at (for the card).
        self.phases: list[dict[str, Any]] = []
        self.device = training_device(uopts.device)
        self.vae = build_vae(cfg, 0)
        self.vae.load_state_dict(vae_state)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        unet, pfj, text = build_denoiser(cfg, opts.seed)
        if init is not None:
            unet.load_state_dict(init.unet)
            pfj.load_state_dict(init.pfj)
            text = init.text_embedding.clone()
        self.pfj = pfj.to(self.device)
        self.text = text.to(self.device)
        self.unet = UNetWrapper(unet, self.text).to(self.device).train()
        self.pfj.train()
        params = [*self.unet.parameters(), *self.pfj.parameters()]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
        self.ema = EMA({"unet": self.unet.unet, "pfj": self.pfj}, uopts.ema)
        self.rng = numpy_rng(opts.seed, 3)
        self.torch_rng = torch.Generator().manual_seed(opts.seed + 1)
        self.stream = PairStream(
            images,
            self.rng,
            size=cfg.tile_size,
            scale=cfg.upscale,
            realesrgan_prob=uopts.realesrgan_prob,
            weighting=uopts.weighting,
            min_scale=uopts.min_scale,
            strength=uopts.realesrgan_strength,
        )
        alphas = np.asarray(alphas_cumprod(cfg.noise), dtype=np.float32)
        self.alphas = torch.from_numpy(alphas).to(self.device)
        self.pool: torch.Tensor | None = None  # [P, 2, C, s, s]: (x0, o) pairs
        self.cursor = 0

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        mean, _ = encode_moments(self.vae, to_tensor(images).to(self.device))
        return mean * self.scaling_factor

    def fresh_pairs(self, n: int, chunk: int = 32, *, stoppable: bool = False) -> torch.Tensor:
        """[n, 2, C, s, s]: (HR latent, LR-conditioning latent) of n new crops; ``stoppable``:
        a stop signal between chunks drops the step (``StepAbandoned``)."""
        out = []
        for start in range(0, n, chunk):
            if stoppable and stop_requested():
                raise StepAbandoned
            batch = self.stream.batch(min(chunk, n - start))
            latents = self.encode(np.concatenate([batch.hr, batch.up]))
            out.append(torch.stack(latents.chunk(2), dim=1))
        return torch.cat(out)

    def pairs(self) -> torch.Tensor:
        b, size = self.opts.batch, self.uopts.pool
        if not size:
            return self.fresh_pairs(b)
        if self.pool is None:
            log.info("unet: encoding %d latent pairs for the pool", size)
            self.pool = self.fresh_pairs(size, stoppable=True)  # minutes on a CPU
        picked = self.pool[torch.from_numpy(self.rng.integers(0, size, b)).to(self.device)]
        slots = (self.cursor + torch.arange(self.uopts.refresh)) % size
        self.pool[slots.to(self.device)] = self.fresh_pairs(self.uopts.refresh)
        self.cursor = int(slots[-1] + 1) % size
        return picked

    def step(self, step: int) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.opts.lr_at(step)
        b = self.opts.batch
        pairs = self.pairs()
        x0, o = pairs[:, 0], pairs[:, 1]
        g = self.torch_rng
        t = torch.randint(0, self.cfg.noise.num_train_timesteps, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        gain = sample_gains(
            t,
            self.cfg.pfj.gain_dim,
            self.cfg.dtss.nr_start_t,
            self.uopts.gain_zero_prob,
            self.uopts.gain_std,
            g,
        )
        t, eps, gain = t.to(self.device), eps.to(self.device), gain.to(self.device)
        a = self.alphas[t].view(b, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        cond = self.pfj(o, gain)
        pred = self.unet(torch.cat([z, cond], dim=1), t.float())
        if self.cfg.noise.prediction_type is PredictionType.EPSILON:
            target = eps
        else:
            target = a.sqrt() * eps - (1 - a).sqrt() * x0
        loss = F.mse_loss(pred, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.uopts.grad_clip)
        self.optimizer.step()
        self.ema.update(step)
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "unet": self.unet.unet.state_dict(),
            "pfj": self.pfj.state_dict(),
            "text_embedding": self.text.clone(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.rng),
            "torch_rng": self.torch_rng.get_state(),
            # The frozen VAE travels with the UNet: later stages and ship use this exact pair.
            "vae": self.vae.state_dict(),
            "scaling_factor": self.scaling_factor,
            "pool": self.pool.clone() if self.pool is not None else torch.zeros(0),
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.unet.load_state_dict(state["unet"])
        self.pfj.load_state_dict(state["pfj"])
        self.text.copy_(state["text_embedding"])
        self.unet.text_embedding.copy_(self.text[None])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self.rng, state["rng"])
        self.torch_rng.set_state(state["torch_rng"])
        self.vae.load_state_dict(state["vae"])
        self.scaling_factor = float(state["scaling_factor"])
        pool = state["pool"]
        # A changed --pool size, or a tile size (the crops' size) changed in the config, starts
        # a new pool (the run is then no longer bit-exact).
        fits = (
            pool.numel() and len(pool) == self.uopts.pool and pool.shape[-1] == self.cfg.latent_tile
        )
        self.pool = pool.to(self.device, copy=True) if fits else None
        self.cursor = int(state["cursor"])

    def summary(self) -> dict[str, Any]:
        return {
            "photos": list(self.photos),
            "vae_from": self.vae_from,
            "init_from": self.init_from,
            "phases": self.phases,
            "scaling_factor": self.scaling_factor,
            "options": self.uopts.__dict__.copy(),
        }


def train_unet(
    cfg: ModelConfig,
    workdir: str | Path,
    opts: TrainOptions,
    uopts: UNetOptions = UNetOptions(),
    *,
    images: list[np.ndarray] | None = None,
    progress: Progress | None = None,
    vae_from: str | Path | None = None,
    init_from: str | Path | None = None,
) -> StageResult:
    """Train (or resume) UNet + PFJ into ``workdir/unet`` on the newest VAE checkpoint, or on
    the VAE of the model folder ``vae_from`` (a bigger UNet on a VAE that already works).

    ``init_from``: a fresh run starts from the UNet, PFJ and text embedding of that model folder
    instead of a random init (a fine-tune, or a run moved between machines through a shipped
    folder); a run that resumes from its own checkpoint ignores it."""
    workdir = Path(workdir)

    latest = load_latest(workdir / STAGE, stage=STAGE)
    # a checkpoint of another config is refused before its VAE loads into this config's, where
    # another architecture is a state-dict traceback (run_stage checks too late for that)
    if latest is not None:
        check_trained_config(workdir / STAGE, latest, cfg.to_dict())
        vae_state, scaling_factor, origin = _resumed_vae(workdir, latest, vae_from)
    elif vae_from is not None:
        vae_state, scaling_factor, origin = vae_of_model(cfg, vae_from)
    else:
        vae_ckpt = require_latest(
            workdir / VAE_STAGE,
            VAE_STAGE,
            f"run `adadiff train vae --workdir {shell_arg(workdir)}` first, or take the VAE of a "
            "model folder with --vae-from",
        )
        check_trained_config(workdir / VAE_STAGE, vae_ckpt, cfg.to_dict(), keys=("vae",))
        vae_state = vae_ckpt["state"]["vae"]
        scaling_factor = vae_ckpt["summary"]["scaling_factor"]
        origin = f"step {vae_ckpt['step']} of {workdir / VAE_STAGE}"
    names: list[str] = []
    if images is None:
        names, images = photo_names(uopts.photos), load_images(uopts.photos)
    names, images = with_dead_leaves(names, images, uopts.deadleaves, seed=opts.seed, stage=STAGE)
    names, images = with_shading(names, images, uopts.shading, seed=opts.seed, stage=STAGE)
    names, images = photos_a_crop_fits(names, images, cfg.tile_size, stage=STAGE)
    warn_scale_caps(names, images, cfg.tile_size, uopts.min_scale, stage=STAGE)
    init = None
    if init_from is not None and latest is None:
        init = unet_of_model(cfg, init_from)
        if not same_encoder(init.vae, vae_state):
            log.warning(
                "unet: %s was trained on another VAE encoder's latents than this run's; its "
                "weights are only a starting point here",
                init.origin,
            )
    elif init_from is not None and latest is not None:
        log.info(
            "unet: resuming from step %d; --init-from %s is not used", latest["step"], init_from
        )
    stage = UNetStage(cfg, opts, uopts, images, vae_state, scaling_factor, init=init)
    before = latest.get("summary", {}) if latest is not None else {}
    # what every phase trained on, for the model card: a resume with fewer photos keeps the rest
    stage.photos = merged_photos(before.get("photos", []), names)
    stage.vae_from = (
        before.get("vae_from", "")
        if latest is not None
        else (origin if vae_from is not None else "")
    )
    if latest is not None:
        stage.init_from = before.get("init_from", "")
    stage.phases = training_phases(latest, opts, uopts)
    log.info("unet: VAE from %s, latent scaling factor %.5f", origin, stage.scaling_factor)
    return run_stage(stage, workdir / STAGE, opts, config=cfg.to_dict(), progress=progress)


def _resumed_vae(
    workdir: Path, latest: dict[str, Any], vae_from: str | Path | None
) -> tuple[dict[str, torch.Tensor], float, str]:
    """A resumed UNet keeps the VAE it trained on, which its checkpoint holds: a VAE stage
    trained on since, or a --vae-from given now, would move the latents under it."""

    state = latest["state"]
    step = int(latest["step"])
    if vae_from is not None:
        log.info("unet: resuming from step %d; --vae-from %s is not used", step, vae_from)
    vae_ckpt = load_latest(workdir / VAE_STAGE, stage=VAE_STAGE)
    if vae_ckpt is not None and not same_encoder(vae_ckpt["state"]["vae"], state["vae"]):
        log.warning(
            "unet: the VAE stage is at step %d now, with another encoder than the one this UNet "
            "trains on; the UNet keeps its own (from its checkpoint). Start a new UNet run to "
            "train on the new VAE",
            vae_ckpt["step"],
        )
    return state["vae"], float(state["scaling_factor"]), f"the step-{step} UNet checkpoint"


def training_phases(
    ckpt: dict[str, Any] | None, opts: TrainOptions, uopts: UNetOptions
) -> list[dict[str, Any]]:
    """The checkpoint's training phases, plus one from its step when this run's options differ
    (a resumed run with another data mix or schedule)."""
    current = {**uopts.__dict__, "lr": opts.lr, "batch": opts.batch, "schedule": opts.schedule}
    if opts.schedule != "constant":  # a decay's length is part of it; a longer constant run is not
        current["steps"] = opts.steps
    if ckpt is None:
        return [{"from_step": 0, **current}]
    summary = ckpt.get("summary", {})
    # checkpoints from before phases were recorded: their options stand for every step so far
    phases = list(summary.get("phases") or [{"from_step": 0, **summary.get("options", {})}])
    last = {k: v for k, v in phases[-1].items() if k != "from_step"}
    # options added after a checkpoint was written held their default in its phases
    defaults = UNetOptions().__dict__
    if any(last.get(k, defaults.get(k)) != v for k, v in current.items()):
        phases.append({"from_step": int(ckpt["step"]), **current})
    return phases


def training_device(device: str) -> torch.device:
    """``device`` as torch's, or an error that says what to do when torch cannot use it."""
    dev = torch.device(str(parse_device(device, "torch")))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} was asked for but torch sees no CUDA device; install a CUDA "
                "build of torch (see README, GPU) or train with --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device} was asked for but torch sees {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    return dev


@dataclass(frozen=True)
class InitialWeights:
    """What a UNet stage can start from: a model folder's UNet, PFJ and text embedding."""

    unet: dict[str, torch.Tensor]
    pfj: dict[str, torch.Tensor]
    text_embedding: torch.Tensor
    origin: str  # the model folder
    vae: dict[str, torch.Tensor]  # that folder's VAE, whose latents they learned


def unet_of_model(cfg: ModelConfig, model: str | Path) -> InitialWeights:
    """The UNet, PFJ and text embedding of a model folder (or a preset's shipped weights),
    checked against ``cfg``'s architecture."""
    source = load_models(model)
    if not Path(source.source).is_dir():
        raise ConfigError(
            f"--init-from {model}: no trained weights there ({source.source}); give a model folder"
        )
    for part in ("unet", "pfj"):  # the VAE may differ: train_unet warns when its encoder does
        if getattr(source.config, part) != getattr(cfg, part):
            raise ConfigError(
                f"--init-from {model}: its '{part}' entries in adadiff.json differ from "
                f"the config's ({cfg.name!r}), so its weights do not fit; pass its folder as "
                "--model too (a preset name is the preset's own config), or train from scratch"
            )
    if tuple(source.text_embedding.shape) != (cfg.text_tokens, cfg.text_dim):
        raise ConfigError(
            f"--init-from {model}: its text embedding has shape "
            f"{tuple(source.text_embedding.shape)}, not ({cfg.text_tokens}, {cfg.text_dim})"
        )
    return InitialWeights(
        unet=source.unet.state_dict(),
        pfj=source.pfj.state_dict(),
        text_embedding=source.text_embedding.detach().clone(),
        origin=str(source.source),
        vae=source.vae.state_dict(),
    )


def vae_of_model(cfg: ModelConfig, model: str | Path) -> tuple[dict[str, Any], float, str]:
    """The VAE weights and latent scaling factor of a model folder (or a preset's shipped
    weights), checked against ``cfg``'s VAE architecture."""
    source = load_models(model)
    if not Path(source.source).is_dir():
        raise ConfigError(
            f"{model} has no trained weights here ({source.source}); give a model folder"
        )
    if source.config.vae != cfg.vae:
        raise ConfigError(
            f"--vae-from {model}: its 'vae' entries in adadiff.json differ from the config's "
            f"({cfg.name!r}, from --model), so its VAE does not fit; pass its folder as --model "
            "too (a preset name there is the preset's own config, not its shipped adadiff.json), "
            "give a model with the same VAE, or train one with `adadiff train vae`"
        )
    return source.vae.state_dict(), float(source.config.scaling_factor), str(source.source)
