"""``adadiff train {vae,unet,decoder,labels,mmle,ship}``: the stage trainers on the command line.

Every stage keeps its state under ``--workdir`` (one sub-folder per stage) and resumes from it
by default, so the same command run again continues where it stopped; ``--steps`` is the total.
Log lines go to stderr whatever ``-v`` says: training is usually run under nohup.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from adadiff.argtypes import (
    DefaultsFormatter,
    fraction,
    noise_seed,
    non_negative,
    non_negative_float,
    positive,
    positive_float,
    positive_list,
)
from adadiff.config import CONFIG_FILE, ModelConfig
from adadiff.errors import ConfigError, shell_arg
from adadiff.imageio import bytes_writer, check_writable, write_files_atomic
from adadiff.presets import SHIPPED, is_preset, preset, preset_name
from adadiff.progress import format_duration
from adadiff.quality.cache import cache_root
from adadiff.training.data import HOLDOUT
from adadiff.training.degrade import STRENGTH_NOTES, STRENGTHS
from adadiff.training.loop import LR_SCHEDULES, TrainOptions
from adadiff.training.pairs import TRAINING_SETS, crops_per_photo, photo_names

STAGES = ("vae", "unet", "decoder", "labels", "mmle", "ship")

# Per-stage defaults for the shared flags: (steps, batch, lr).
DEFAULTS: dict[str, tuple[int, int, float]] = {
    "vae": (1000, 8, 5e-4),
    "unet": (4000, 16, 3e-4),
    "decoder": (2000, 8, 2e-4),
    "labels": (8, 16, 0.0),  # steps = shards, batch = trajectories per shard
    "mmle": (3000, 64, 1e-3),
}


def default_workdir(model: str = "tiny") -> Path:
    return cache_root() / "train" / (preset_name(model) or Path(model).name)


def _common(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--model", default="tiny", help="preset name or model folder (its config)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="checkpoints and labels (default: ~/.cache/adadiff/train/MODEL)",
    )
    p.add_argument(
        "--seed", type=noise_seed, default=0, help="seed of the data stream and the init"
    )
    p.add_argument(
        "--threads",
        type=positive,
        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)",
    )
    p.add_argument("--metrics-cache", type=Path, help="metric files (default: the set-up cache)")
    if stage in DEFAULTS:
        steps, batch, lr = DEFAULTS[stage]
        if stage == "labels":
            p.add_argument("--steps", type=positive, default=steps, help="label shards")
            p.add_argument("--batch", type=positive, default=batch, help="trajectories per shard")
        else:
            p.add_argument("--steps", type=positive, default=steps, help="total optimisation steps")
            per_step = "label rows per step" if stage == "mmle" else "crops per step"
            p.add_argument("--batch", type=positive, default=batch, help=per_step)
            p.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
            p.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps")
            p.add_argument(
                "--lr-schedule",
                choices=LR_SCHEDULES,
                default="constant",
                help="after warm-up: constant, or cosine decay to 0 at --steps",
            )
            p.add_argument(
                "--log-every", type=positive, default=20, help="steps between progress lines"
            )
            p.add_argument(
                "--ckpt-every",
                type=positive,
                default=200,
                help="steps between checkpoints (the last step, and a stop by Ctrl-C, always save)",
            )
            p.add_argument(
                "--keep",
                type=positive,
                default=3,
                help="checkpoints kept: each save removes all but the newest KEEP in the stage "
                "folder, earlier runs' included",
            )
        resume = p.add_mutually_exclusive_group()
        resume.add_argument(
            "--resume",
            action="store_true",
            default=None,
            help="require a checkpoint to resume from (resuming is the default when one exists)",
        )
        resume.add_argument(
            "--no-resume",
            dest="resume",
            action="store_false",
            default=argparse.SUPPRESS,  # the default is --resume's None, not this flag's True
            help="refuse to start if the workdir already holds checkpoints",
        )


def _photo_weighting(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--photo-weighting",
        choices=("photo", "area"),
        default="photo",
        help="pick each crop's photo with equal odds (photo) or in proportion to its area",
    )


def _training_photos(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--photos",
        choices=("train", "train+validation"),
        default="train",
        help="the training photos, or those and the validation photos (the final fit of a "
        "recipe chosen on them; hold-out photos are never trained on)",
    )


def _realesrgan_strength(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--realesrgan-strength",
        choices=tuple(STRENGTHS),
        default="full",
        help="; ".join(f"{name}: {STRENGTH_NOTES[name]}" for name in STRENGTHS),
    )


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` and its stage sub-commands to an ``add_subparsers()`` object."""
    train = subparsers.add_parser(
        "train", help="train the tiny model's stages (vae, unet, decoder, labels, mmle) and ship it"
    )
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")

    vae = stages.add_parser("vae", help="train the autoencoder (L1 + LPIPS + KL)")
    _common(vae, "vae")
    vae.add_argument(
        "--perceptual-weight",
        type=non_negative_float,
        default=0.1,
        help="weight of the LPIPS loss beside L1",
    )
    vae.add_argument(
        "--kl-weight", type=non_negative_float, default=1e-6, help="weight of the KL loss"
    )
    vae.add_argument(
        "--kl-reduction",
        choices=("value", "sum"),
        default="value",
        help="value: the summed KL is divided by the image's value count, the balance of Stable "
        "Diffusion's autoencoder (default); sum: as the first tiny's VAE trained, 3*H*W times "
        "heavier",
    )
    vae.add_argument(
        "--lr-input-prob",
        type=fraction,
        default=0.25,
        help="share of inputs that are bicubic-upscaled LR crops",
    )
    vae.add_argument(
        "--realesrgan-prob",
        type=fraction,
        default=0.0,
        help="share of crops degraded the Real-ESRGAN way instead of bicubic x4",
    )
    vae.add_argument(
        "--crop", type=positive, help="training crop side in px (default: the tile size)"
    )
    vae.add_argument(
        "--min-scale",
        type=float,
        default=1.0,
        help="scale augmentation: each crop shows its photo downscaled by a random factor in "
        "[MIN, 1] (1: the photo's own scale)",
    )
    vae.add_argument(
        "--deadleaves",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic dead-leaves images (made from the seed) to the photos",
    )

    unet = stages.add_parser("unet", help="train UNet + PFJ on the denoising loss (VAE frozen)")
    _common(unet, "unet")
    unet.add_argument(
        "--gain-zero-prob", type=fraction, default=0.5, help="share of samples with zero gains"
    )
    unet.add_argument(
        "--gain-std",
        type=non_negative_float,
        default=0.2,
        help="gains are tanh(N(0, std)) otherwise",
    )
    unet.add_argument(
        "--realesrgan-prob",
        type=fraction,
        default=0.0,
        help="share of crops degraded by Real-ESRGAN's pipeline instead of bicubic x4",
    )
    _realesrgan_strength(unet)
    _training_photos(unet)
    unet.add_argument(
        "--ema", type=float, default=0.999, help="decay of the weights' moving average"
    )
    unet.add_argument(
        "--pool", type=int, default=1024, help="encoded latent pairs kept (0: encode every batch)"
    )
    unet.add_argument("--refresh", type=int, default=4, help="pairs re-encoded per step")
    unet.add_argument(
        "--device",
        default="cpu",
        help="where the networks train: cpu or cuda[:N] (a CUDA build of torch; crops are still "
        "made on the CPU, and checkpoints resume on either)",
    )
    _photo_weighting(unet)
    unet.add_argument(
        "--min-scale",
        type=float,
        default=1.0,
        help="scale augmentation: each HR crop shows its photo downscaled by a random factor in "
        "[MIN, 1] (1: the photo's own scale)",
    )
    unet.add_argument(
        "--deadleaves",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic dead-leaves images (made from the seed) to the photos: content "
        "variety for UNets wider than 14 photos can teach",
    )
    unet.add_argument(
        "--shading",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic images of smooth shading (lit ellipsoids, made from the seed) to "
        "the photos: smooth surfaces that stay smooth, which the photos rarely show",
    )
    unet.add_argument(
        "--vae-from",
        metavar="MODEL",
        help="take the VAE from this model folder or preset instead of the workdir's vae stage",
    )
    unet.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start a fresh run from the UNet and PFJ of this model folder or preset (same "
        "architecture) instead of a random init; ignored when the workdir's run resumes",
    )

    decoder = stages.add_parser(
        "decoder",
        help="optional: fine-tune the VAE decoder after the UNet (encoder frozen)",
    )
    _common(decoder, "decoder")
    decoder.add_argument(
        "--perceptual-weight",
        type=non_negative_float,
        default=0.1,
        help="weight of the LPIPS loss beside L1",
    )
    decoder.add_argument(
        "--lr-input-prob",
        type=fraction,
        default=0.5,
        help="share of inputs that are bicubic-upscaled LR crops",
    )
    decoder.add_argument("--crop", type=positive, default=64, help="training crop side in px")
    decoder.add_argument(
        "--sample-prob",
        type=fraction,
        default=0.0,
        help="share of each batch decoded from the UNet's own samples (target: the HR crop)",
    )
    decoder.add_argument(
        "--sample-intervals",
        type=positive_list,
        default=(200, 100, 50),
        help="uniform intervals the samples are drawn with (200: 5 steps)",
    )
    decoder.add_argument(
        "--latent-noise",
        type=non_negative_float,
        default=0.0,
        help="std of white noise added to the encoder's latents, in the scaled units the UNet "
        "predicts in, so that the decoder draws slightly-off latents cleanly; it costs detail "
        "(0.1 doubled a validation photo's round-trip LPIPS, docs/training.md)",
    )
    decoder.add_argument("--sample-pool", type=positive, default=256, help="samples kept")
    decoder.add_argument("--sample-refresh", type=positive, default=2, help="new samples per step")
    decoder.add_argument(
        "--realesrgan-prob",
        type=fraction,
        default=0.5,
        help="share of sampled crops degraded by Real-ESRGAN's pipeline instead of bicubic x4",
    )
    _realesrgan_strength(decoder)
    _photo_weighting(decoder)
    _training_photos(decoder)

    labels = stages.add_parser("labels", help="oracle-scored trajectories of the frozen model")
    _common(labels, "labels")
    labels.add_argument("--max-batch", type=positive, default=8, help="tiles per UNet call")
    labels.add_argument(
        "--random-fraction",
        type=fraction,
        default=0.5,
        help="share of trajectories that jump by random tiers instead of oracle-driven DTSS",
    )
    labels.add_argument(
        "--realesrgan-prob",
        type=fraction,
        default=0.0,
        help="share of crops degraded the Real-ESRGAN way instead of bicubic x4",
    )
    labels.add_argument(
        "--recon-crops",
        type=int,
        default=128,
        help="extra crops per shard with only the VAE's reconstruction error of their input",
    )
    _photo_weighting(labels)

    mmle = stages.add_parser("mmle", help="train the MMLE score regressor on the labels")
    _common(mmle, "mmle")
    mmle.add_argument(
        "--diff-weight", type=non_negative_float, default=1.0, help="step-difference L2 weight"
    )
    mmle.add_argument(
        "--recon-weight",
        type=non_negative_float,
        default=1.0,
        help="L2 weight of the LR branch's reconstruction-error targets (0: no such targets)",
    )
    mmle.add_argument(
        "--latent-weight",
        type=non_negative_float,
        default=1.0,
        help="L2 weight of the PSNR and LPIPS columns' latent-error targets (0: no such targets)",
    )
    mmle.add_argument(
        "--lpips-recon",
        choices=("estimate", "mean"),  # MMLEOptions checks these; importing it loads torch
        default="mean",
        help="LPIPS = latent part + reconstruction part: the LR branch's per-crop estimate of "
        "the latter, or its mean over the training crops (the default: the estimate ranks "
        "unseen photos' reconstruction LPIPS poorly)",
    )
    mmle.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        help="share of label trajectories held out for validation",
    )
    mmle.add_argument(
        "--val-photos",
        type=lambda text: tuple(n for n in text.split(",") if n),
        default=(),
        metavar="NAME[,NAME]",
        help="validate on every trajectory of these training photos instead of a random share",
    )

    ship = stages.add_parser(
        "ship", aliases=["export-tiny"], help="assemble the checkpoints into a model folder"
    )
    _common(ship, "ship")
    ship.add_argument(
        "--out",
        type=Path,
        help="model folder (default: adadiff/weights/NAME in the package, NAME the model "
        "config's name, unless a built-in model of that name is there: to replace it, give "
        "its folder here)",
    )
    ship.add_argument("--eval", type=Path, help="evaluate_tiny JSON to quote in the model card")
    ship.add_argument(
        "--quality", type=Path, help="benchmarks.quality JSON to quote in the model card"
    )
    ship.add_argument(
        "--max-mb", type=positive_float, default=25.0, help="size limit of the folder"
    )
    ship.add_argument(
        "--mmle-from",
        metavar="MODEL",
        help="take MMLE from this model folder (it must have the same VAE encoder and metrics) "
        "instead of the workdir's labels and mmle stages",
    )
    ship.add_argument(
        "--half",
        action="store_true",
        help="store the UNet and VAE weights as fp16 (computed in fp32 after loading)",
    )

    card = stages.add_parser(
        "card",
        help="rewrite the Evaluation section of a shipped model folder's card from benchmark "
        "JSONs rerun on the same weights (weights and the rest of the card untouched)",
    )
    card.add_argument("folder", type=Path, help="the shipped model folder (its MODEL_CARD.md)")
    card.add_argument(
        "--eval", type=Path, required=True, help="evaluate_tiny JSON of these weights"
    )
    card.add_argument(
        "--quality", type=Path, required=True, help="benchmarks.quality JSON of these weights"
    )

    train.set_defaults(func=cmd_train)
    return train


def _config(model: str) -> ModelConfig:
    return preset(model) if is_preset(model) else ModelConfig.load(Path(model))


def check_workdir(workdir: Path) -> None:
    """Refuse a stage folder given as ``--workdir``: the stage would start over in a folder
    inside it, and the next stage would not find it."""
    from adadiff.training.checkpoint import list_checkpoints

    if list_checkpoints(workdir):
        held = "checkpoints"
    elif any(workdir.glob("shard-*.npz")):
        held = "label shards"
    else:
        return
    raise ConfigError(
        f"{workdir} holds {held}: it is one stage's folder, not a workdir; give the folder "
        f"that holds it as --workdir ({shell_arg(workdir.parent)})"
    )


def _training_logs() -> None:
    logger = logging.getLogger("adadiff.training")
    if not any(getattr(h, "_adadiff_train", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler._adadiff_train = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _options(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        warmup=args.warmup,
        schedule=args.lr_schedule,
        resume=args.resume,
    )


def cmd_train(args: argparse.Namespace) -> int:
    _training_logs()
    if args.stage == "card":
        from adadiff.training.ship import read_evaluation, refresh_card

        evaluation, quality = read_evaluation(args.eval), read_evaluation(args.quality)
        assert evaluation is not None and quality is not None  # both are required options
        print(f"refreshed {refresh_card(args.folder, evaluation=evaluation, quality=quality)}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _config(args.model)
    workdir = args.workdir or default_workdir(args.model)
    check_workdir(workdir)
    stage = "ship" if args.stage == "export-tiny" else args.stage
    if stage == "vae":
        from adadiff.training.vae import VAEOptions, train_vae

        vopts = VAEOptions(
            perceptual_weight=args.perceptual_weight,
            kl_weight=args.kl_weight,
            kl_reduction=args.kl_reduction,
            lr_input_prob=args.lr_input_prob,
            realesrgan_prob=args.realesrgan_prob,
            crop=args.crop,
            min_scale=args.min_scale,
            deadleaves=args.deadleaves,
        )
        result = train_vae(cfg, workdir, _options(args), vopts, cache_dir=args.metrics_cache)
    elif stage == "unet":
        from adadiff.training.unet import UNetOptions, train_unet

        uopts = UNetOptions(
            gain_zero_prob=args.gain_zero_prob,
            gain_std=args.gain_std,
            realesrgan_prob=args.realesrgan_prob,
            realesrgan_strength=args.realesrgan_strength,
            ema=args.ema,
            pool=args.pool,
            refresh=args.refresh,
            weighting=args.photo_weighting,
            min_scale=args.min_scale,
            photos=args.photos,
            deadleaves=args.deadleaves,
            shading=args.shading,
            device=args.device,
        )
        result = train_unet(
            cfg,
            workdir,
            _options(args),
            uopts,
            vae_from=args.vae_from,
            init_from=args.init_from,
        )
    elif stage == "decoder":
        from adadiff.training.decoder import DecoderOptions, train_decoder

        dopts = DecoderOptions(
            perceptual_weight=args.perceptual_weight,
            lr_input_prob=args.lr_input_prob,
            crop=args.crop,
            weighting=args.photo_weighting,
            sample_prob=args.sample_prob,
            sample_intervals=args.sample_intervals,
            sample_pool=args.sample_pool,
            sample_refresh=args.sample_refresh,
            realesrgan_prob=args.realesrgan_prob,
            realesrgan_strength=args.realesrgan_strength,
            photos=args.photos,
            latent_noise=args.latent_noise,
        )
        result = train_decoder(cfg, workdir, _options(args), dopts, cache_dir=args.metrics_cache)
    elif stage == "labels":
        from adadiff.training.labels import LabelOptions, make_labels

        lopts = LabelOptions(
            shards=args.steps,
            trajectories=args.batch,
            max_batch=args.max_batch,
            random_fraction=args.random_fraction,
            realesrgan_prob=args.realesrgan_prob,
            weighting=args.photo_weighting,
            recon_crops=args.recon_crops,
            seed=args.seed,
        )
        has_shards = any((Path(workdir) / "labels").glob("shard-*.npz"))
        if args.resume is False and has_shards:
            raise ConfigError(f"{workdir}/labels already holds shards; drop --no-resume")
        if args.resume is True and not has_shards:
            raise ConfigError(f"--resume was given but {workdir}/labels holds no shards")
        made = make_labels(cfg, workdir, lopts, cache_dir=args.metrics_cache)
        upgraded = f"; {made.upgraded} given their error fields" if made.upgraded else ""
        print(
            f"labels: {len(made.shards)}/{args.steps} shards in {made.folder} "
            f"({made.made} new, {made.samples} new samples, "
            f"{made.elapsed_s / 60:.1f} min{upgraded})"
        )
        return 130 if made.stopped else 0
    elif stage == "mmle":
        from adadiff.training.mmle import MMLEOptions, train_mmle

        mopts = MMLEOptions(
            diff_weight=args.diff_weight,
            recon_weight=args.recon_weight,
            latent_weight=args.latent_weight,
            lpips_recon=args.lpips_recon,
            val_fraction=args.val_fraction,
            val_photos=args.val_photos,
        )
        result = train_mmle(cfg, workdir, _options(args), mopts)
    else:
        from adadiff.models.bundle import SHIPPED
        from adadiff.training.ship import read_evaluation, ship

        if args.out is None and (SHIPPED / cfg.name / CONFIG_FILE).is_file():
            raise ConfigError(
                f"without --out, ship would replace the built-in model {cfg.name!r} in "
                f"{SHIPPED / cfg.name}; give --out DIR (that path itself to replace it)"
            )
        out = ship(
            cfg,
            workdir,
            args.out,
            evaluation=read_evaluation(args.eval),
            max_mb=args.max_mb,
            half=args.half,
            quality=read_evaluation(args.quality),
            mmle_from=args.mmle_from,
        )
        print(f"shipped to {out}")
        return 0
    print(
        f"{stage}: step {result.step} in {result.folder} ({result.elapsed_s / 60:.1f} min "
        f"trained)" + (", stopped early: run the same command to go on" if result.stopped else "")
    )
    return 130 if result.stopped else 0


def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``adadiff calibrate MODEL_DIR``: fit DTSS's metric weights, tau and second-half start."""
    p = subparsers.add_parser(
        "calibrate",
        help="fit a model folder's DTSS weights and tau on tuning photos (writes adadiff.json)",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("model", type=Path, help="model folder whose adadiff.json is calibrated")
    p.add_argument(
        "--photos",
        help="comma-separated tuning photos, or train, validation or train+validation "
        "(default: the validation photos; hold-out refused)",
    )
    p.add_argument("--crops", type=positive, default=6, help="tile-sized crops per photo")
    p.add_argument("--seeds", type=positive, default=1, help="noise seeds per crop")
    p.add_argument("--interval", type=positive, default=20, help="jump of the recorded runs")
    p.add_argument(
        "--budget",
        type=positive_float,
        help="most UNet evaluations per tile on average in the replay of the tuning crops "
        "(jumps of --interval); a real run jumps by the model's tiers and may take more",
    )
    p.add_argument("--crop-seed", type=non_negative, default=0, help="seed of the tuning crops")
    p.add_argument("--max-batch", type=positive, default=16, help="tiles per UNet call")
    p.add_argument("--threads", type=positive, help="torch CPU threads")
    p.add_argument(
        "--dry-run", action="store_true", help="print the result, leave adadiff.json unchanged"
    )
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from adadiff.models.bundle import load_folder
    from adadiff.runtime.schedule import uniform_timesteps
    from adadiff.training.calibrate import NR_STARTS, calibrate, fewest_steps, record

    folder = args.model
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{folder} has no {CONFIG_FILE}: give a model folder (calibrate rewrites its config; "
            f"to calibrate the built-in model, copy it: cp -r {shell_arg(SHIPPED / 'tiny')} DIR)"
        )
    if not args.dry_run and folder.resolve().parent == SHIPPED.resolve():
        raise ConfigError(
            f"{folder} is the built-in model {folder.resolve().name!r}: calibrating it in place "
            f"would change every run with --model {folder.resolve().name}; copy it "
            f"(cp -r {shell_arg(str(folder))} DIR) and calibrate the copy"
        )
    text = args.photos or "validation"
    # "holdout" is read as the set too, so that it is refused as hold-out photos below
    given = (
        photo_names(text) if text in (*TRAINING_SETS, "validation", "holdout") else text.split(",")
    )
    names = list(dict.fromkeys(n.strip() for n in given if n.strip()))  # each photo once
    held = sorted(set(names) & set(HOLDOUT))
    if held:
        raise ConfigError(
            f"--photos includes hold-out photos {held}: they are kept for evaluation; tune on "
            "the validation photos (the default), training photos, or both (train+validation)"
        )
    if len(names) < 2:
        raise ConfigError("--photos needs at least two different photos (each is left out in turn)")
    if not args.dry_run:
        # the result is written after minutes of recording: a folder that refuses it fails now
        check_writable(
            folder / CONFIG_FILE,
            str(folder),
            "copy the model folder to one you can write and calibrate the copy, or add "
            "--dry-run to only print the result",
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_folder(folder)
    cfg = models.config
    t_all = uniform_timesteps(cfg.dtss.t_start, args.interval)
    late = [t for t in t_all if t < max(NR_STARTS)]
    if len(late) < 2:
        raise ConfigError(
            f"--interval {args.interval} records {len(late)} step(s) below t = {max(NR_STARTS)}, "
            "where the exits are fitted; use a smaller --interval (20 is the default)"
        )
    fewest = fewest_steps(t_all)
    if args.budget is not None and fewest is not None and args.budget < fewest:
        raise ConfigError(
            f"no calibration fits a budget of {args.budget:g} steps per tile: with jumps of "
            f"{args.interval} a tile exits after {fewest} steps at the earliest; raise --budget "
            "or use a larger --interval"
        )
    crops = crops_per_photo(
        names, args.crops, size=cfg.tile_size, scale=cfg.upscale, seed=args.crop_seed, stream=902
    )
    print(
        f"recording {len(crops.hr)} crops x {args.seeds} seeds from {len(names)} photos, "
        f"jumps of {args.interval}",
        file=sys.stderr,
        flush=True,
    )
    traj = record(
        models,
        crops,
        seeds=args.seeds,
        interval=args.interval,
        max_batch=args.max_batch,
        progress=recording_progress(),
    )
    metrics, dtss, report = calibrate(traj, cfg.mmle.metrics, cfg.dtss, budget=args.budget)
    new = replace(cfg, dtss=dtss, mmle=replace(cfg.mmle, metrics=metrics))
    c, ref = report["choice"], report["reference"]
    print(
        f"tau {c['tau']:g}, second half from t < {c['nr_start_t']}, exit on the total gain; "
        f"replayed with metric weights fitted without the replayed photo: LPIPS "
        f"{c['lpips']:.4f} at {c['steps']:.1f} steps per tile (last estimate "
        f"{ref['last_estimate']:.4f}, fixed exit at t < 400 {ref['fixed_exit_t<400']:.4f}, "
        f"best second-half estimate "
        f"{ref['best_second_half_estimate']:.4f})"
    )
    print("weights: " + ", ".join(f"{m.name} {m.weight:+.4g}" for m in metrics))
    report["photos"] = names
    report["before"] = {"dtss": cfg.to_dict()["dtss"], "metrics": cfg.to_dict()["mmle"]["metrics"]}
    report["argv"] = sys.argv[1:]
    if args.dry_run:
        return 0
    write_calibration(folder, new, report)
    print(f"wrote {folder / CONFIG_FILE} and {folder / 'calibration.json'}")
    if cfg.default_schedule != "adaptive":
        print(
            f"note: this model's default schedule is {cfg.default_schedule}; the calibrated DTSS "
            "runs with --schedule adaptive"
        )
    return 0


def write_calibration(folder: Path, config: ModelConfig, report: dict[str, Any]) -> None:
    """The calibrated ``adadiff.json`` and its ``calibration.json``, both or neither: a full
    disk leaves the folder's earlier pair as it was, never a config without the report that
    explains it."""
    write_files_atomic(
        [
            (folder / CONFIG_FILE, bytes_writer(config.to_json().encode()), "model config"),
            (
                folder / "calibration.json",
                bytes_writer((json.dumps(report, indent=1) + "\n").encode()),
                "calibration report",
            ),
        ],
        follow_links=False,  # a linked copy (cp -rs) of a model: never rewrite the original
    )


def recording_progress(
    every: float = 10.0, clock: Callable[[], float] = time.monotonic
) -> Callable[[int, int], None]:
    """A line on stderr at most every ``every`` s while calibrate records (minutes of sampling
    and scoring with nothing else to show), and one at the end."""
    start = clock()
    last = [start]

    def show(done: int, total: int) -> None:
        now = clock()
        if done < total and now - last[0] < every:
            return
        last[0] = now
        elapsed = now - start
        left = (
            f", ETA {format_duration(elapsed * (total - done) / done)}" if 0 < done < total else ""
        )
        print(
            f"recorded {100 * done / total:.0f}% of the estimates ({done}/{total}, "
            f"{format_duration(elapsed)}{left})",
            file=sys.stderr,
            flush=True,
        )

    return show
