"""The ``adadiff`` command line. User mistakes exit 2 with one line, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from adadiff import __version__, demo, file_upscale, imageio
from adadiff.argtypes import (
    DefaultsFormatter,
    noise_seed,
    non_negative,
    non_negative_float,
    positive,
    positive_float,
)
from adadiff.artifacts import (
    PRECISIONS,
    BatchProfile,
    ExportManifest,
    import_tensorrt,
    parse_profiles,
)
from adadiff.config import CONFIG_FILE, SCHEDULES, BackendKind
from adadiff.cuda import CudaDevice
from adadiff.device_check import check_device
from adadiff.devices import RUN_PRECISIONS, check_precision, parse_device
from adadiff.errors import AdadiffError, BackendUnavailableError, ConfigError, shell_arg
from adadiff.file_upscale import FileOutputs
from adadiff.presets import PRESETS, SHIPPED, is_preset, model_config, preset_name
from adadiff.progress import LogProgress, tiles_finished, write_line
from adadiff.runtime.upscaler import Upscaler
from adadiff.scaleout.job import (
    ClusterOptions,
    check_local_paths,
    print_record,
    print_status,
    run_job,
)
from adadiff.scaleout.plan import JobSettings
from adadiff.specs import COMPONENTS
from adadiff.threads import excess_threads_note, prefer_passive_wait

log = logging.getLogger("adadiff")


class ProgressBars:
    """A tqdm bar per stage, fed by the library's progress callback. ``denoise`` is drawn as a
    percentage with the tiles finished (the ``tiles`` stage) beside it: its count is timesteps
    of all tiles together (``adadiff.progress``), and "9849 t/s" read as thousands of steps."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.tiles: tuple[int, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage == "tiles":
            self.tiles = (done, total)
            return
        bar = self.bars.get(stage)
        if bar is None:
            denoise = stage == "denoise"
            bar = self.bars[stage] = tqdm(
                total=100 if denoise else total,
                desc=stage,
                unit="it",
                bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
                if denoise
                else None,
                leave=False,
                file=sys.stderr,
            )
        if stage == "denoise":
            bar.n = 100 * done / total if total > 0 else 100
            bar.set_postfix_str(tiles_finished(self.tiles), refresh=False)
        else:
            bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="preset (tiny, sd21-base; preset:tiny names the preset beside a folder ./tiny) or "
        "model folder; default tiny, or the model an --engines folder was exported from",
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=BackendKind.values(),
        help="engine library that runs the networks",
    )
    p.add_argument(
        "--engines", type=Path, help="exported ONNX / engine folder (onnxruntime, tensorrt)"
    )
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N] (onnxruntime: also tensorrt[:N])"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=RUN_PRECISIONS,
        help="fp16 (UNet and PFJ; the VAE and MMLE stay fp32) is meant for CUDA and runs on the "
        "CPU slowly, for checks; bf16 is for the torch backend only",
    )
    p.add_argument(
        "--threads",
        type=positive,
        help="CPU threads for torch / ONNX Runtime (default: OMP_NUM_THREADS if set, else every "
        "CPU this process may use; idle threads sleep instead of spinning, so a busy machine "
        "does not slow it down; more threads than CPUs only slow the run, and are warned about)",
    )


def _add_upscale_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="adaptive: DTSS picks each tile's steps; uniform: a fixed jump (--interval); "
        "content: each tile's jump from its LR texture (the model's content rule); default: "
        "the model's best on its quality/compute front",
    )
    p.add_argument(
        "--interval",
        type=positive,
        help="uniform schedule jump in timesteps, 1 to 999 (20 = 50 steps, 5 = 200 steps, 999 = "
        "1 step; default: the model's uniform_interval, 200 = 5 steps for tiny)",
    )
    p.add_argument(
        "--seed", type=noise_seed, default=0, help="seeds every tile's noise with (seed, tile)"
    )
    p.add_argument("--max-batch", type=positive, default=8, help="tiles per engine call")
    p.add_argument(
        "--tile",
        type=positive,
        help="tile size in output pixels, a multiple of the VAE factor (default: the model's, "
        "128 for tiny); one larger than the output is cut to the output's size",
    )
    p.add_argument(
        "--overlap",
        type=non_negative,
        help="tile overlap in output pixels (default: the model's, 16 for tiny)",
    )
    p.add_argument(
        "--max-pixels",
        type=positive,
        default=None,
        help="refuse inputs with more pixels than this (default 16 million)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress (a bar on a terminal, timestamped lines otherwise)",
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (exit 2) instead of the usage block."""

    argv: tuple[str, ...] = ()  # the arguments run() parses, for dashed_file_hint

    def error(self, message: str) -> NoReturn:
        hint = dashed_file_hint(self.argv)
        self.exit(2, f"adadiff: error: {self.prog}: {message}{hint} (see {self.prog} --help)\n")


def dashed_file_hint(argv: Sequence[str]) -> str:
    """argparse reads a file name that starts with "-" as an option, and its error ("the
    following arguments are required: input") does not say so."""
    for arg in argv:
        if len(arg) > 1 and arg.startswith("-") and "=" not in arg:
            path = Path(arg)
            if path.suffix.lower() in {*imageio.INPUT_FORMATS, ".json"} or path.exists():
                return f"; {arg} is read as an option: write ./{arg} for a file of that name"
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="adadiff", description="AdaDiffSR: adaptive-step diffusion 4x super-resolution"
    )
    parser.add_argument("--version", action="version", version=f"adadiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("upscale", help="upscale one image 4x")
    up.add_argument("input", type=Path, help=f"{imageio.input_format_names()} image")
    up.add_argument("-o", "--output", type=Path, required=True, help="output image path")
    _add_upscale_args(up)
    up.add_argument("--report", type=Path, help="write the run report as JSON here")
    up.add_argument("--step-map", type=Path, help="write a PNG of steps per tile here")
    up.set_defaults(func=cmd_upscale)

    many = sub.add_parser(
        "upscale-many",
        help="upscale every image in a folder on Ray workers (local Ray unless --ray-address)",
        description="Upscale every image in INPUT_DIR into OUTPUT_DIR (NAME.png and NAME.png.json "
        "per image, adadiff-job.json for the job). Reruns skip images whose output and report "
        "exist and match the settings. Unreadable images are listed in the job report.",
    )
    many.add_argument(
        "input_dir",
        type=Path,
        help=f"folder of {imageio.input_format_names()} images, picked by suffix",
    )
    many.add_argument("output_dir", type=Path, help="folder for the outputs (created if missing)")
    _add_upscale_args(many)
    many.add_argument(
        "--ray-address",
        help="join this Ray cluster (e.g. ray://head:10001 or auto); "
        "default: start a local Ray instance on this machine",
    )
    many.add_argument(
        "--workers",
        type=positive,
        help="worker actors, one Upscaler each (default: as many as the cluster's CPUs, or "
        "GPUs with --gpus-per-worker, allow)",
    )
    many.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=1.0,
        help="CPUs Ray reserves per worker; also its thread count unless --threads",
    )
    many.add_argument(
        "--gpus-per-worker",
        type=non_negative_float,
        default=0.0,
        help="GPU share per worker (e.g. 0.5 puts two workers on a GPU); > 0 implies --device cuda",
    )
    many.add_argument(
        "--queue",
        type=positive,
        help="images in flight per worker; their tiles share engine calls (default: --max-batch)",
    )
    many.add_argument(
        "--image-by-image",
        action="store_true",
        help="no cross-image batching: a worker starts an image when the previous one is done",
    )
    many.add_argument(
        "--output-format",
        choices=("png", "same"),
        default="png",
        help="png, or same: the input's format (PNG for GIF and BMP inputs)",
    )
    many.add_argument(
        "--strict", action="store_true", help="exit 1 when any image failed (default: exit 0)"
    )
    many.set_defaults(func=cmd_upscale_many)

    demo_p = sub.add_parser(
        "demo", help="upscale a scikit-image photo; write input, bicubic, output, report, step map"
    )
    demo_p.add_argument("-o", "--output", type=Path, default=Path("demo-out"), help="folder")
    demo_p.add_argument(
        "--photo",
        default=None,
        help="scikit-image photo name; the demo says whether the model was trained on it (from "
        "its training record); default: the first of " + ", ".join(demo.PHOTOS) + " that the "
        "model never trained on",
    )
    demo_p.add_argument("--size", type=positive, default=128, help="input long side in pixels")
    _add_upscale_args(demo_p)
    demo_p.set_defaults(func=cmd_demo)

    cv = sub.add_parser(
        "convert-sd21", help="turn a stock SD-2.1-base diffusers folder into a model folder"
    )
    cv.add_argument(
        "src", type=Path, help="diffusers folder with unet/, vae/, text_encoder/, tokenizer/"
    )
    cv.add_argument("-o", "--output", type=Path, required=True, help="new model folder")
    cv.add_argument("--seed", type=noise_seed, default=0, help="seed for PFJ and MMLE init")
    cv.set_defaults(func=cmd_convert)

    ex = sub.add_parser(
        "export", help="export a model to ONNX, one checked file per component plus a manifest"
    )
    ex.add_argument(
        "--model",
        default="tiny",
        help="preset (tiny, sd21-base; random init unless weights are shipped; preset:tiny "
        "names the preset beside a folder ./tiny) or model folder",
    )
    ex.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="folder for the ONNX files and manifest (created, parents included, if missing)",
    )
    ex.add_argument(
        "--components",
        default=",".join(COMPONENTS),
        help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all)",
    )
    ex.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp16: half precision inside the UNet and PFJ files (the VAE and MMLE stay fp32)",
    )
    ex.add_argument("--opset", type=positive, help="ONNX opset (default 20)")
    ex.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        help="torch.onnx exporter (default dynamo; torchscript is the deprecated fallback)",
    )
    ex.add_argument(
        "--check-batches",
        default="1,3",
        help="batch sizes at which ONNX Runtime is checked against torch after export; "
        "'none' skips the check",
    )
    ex.add_argument("--no-fold", action="store_true", help="skip Polygraphy constant folding")
    ex.add_argument(
        "--seed", type=noise_seed, default=0, help="init seed of a preset without weights"
    )
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=cmd_export)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (from a source checkout): quick, full, report, load, front, "
        "quality",
        add_help=False,
    )
    bench.set_defaults(func=cmd_bench)

    sm = sub.add_parser(
        "setup-metrics",
        help="fetch and verify the quality metrics' files (LPIPS, BRISQUE) and fit NIQE",
    )
    sm.add_argument("--cache-dir", type=Path, help="default: $ADADIFF_CACHE or ~/.cache/adadiff")
    sm.add_argument("--refit-niqe", action="store_true", help="fit the NIQE model again")
    sm.set_defaults(func=cmd_setup_metrics)

    # Local import: adadiff.training loads scipy and Pillow, which other commands do not need.
    from adadiff.training.cli import add_calibrate_parser, add_train_parser

    add_train_parser(sub)
    add_calibrate_parser(sub)

    bd = sub.add_parser(
        "build", help="build TensorRT engines from an export folder (needs tensorrt and a GPU)"
    )
    bd.add_argument("engines", type=Path, help="the folder written by `adadiff export`")
    bd.add_argument("--components", help="comma-separated components (default: all exported)")
    bd.add_argument("--min-batch", type=positive, default=1, help="(default: 1)")
    bd.add_argument("--opt-batch", type=positive, default=4, help="(default: 4)")
    bd.add_argument("--max-batch", type=positive, default=16, help="(default: 16)")
    bd.add_argument(
        "--profiles", help="several batch profiles MIN:OPT:MAX,... (overrides the above)"
    )
    bd.add_argument("--timing-cache", type=Path, help="timing cache file (default: in the folder)")
    bd.add_argument("--workspace", type=positive_float, default=4.0, help="builder workspace in GB")
    bd.add_argument("--device", default="cuda", help="cuda or cuda:N: the GPU to build for")
    bd.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 in fp32 engines (faster on Ampere and later, off parity with torch)",
    )
    bd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bd.set_defaults(func=cmd_build)
    return parser


# --------------------------------------------------------------------------------------------
# Option checks: everything a user can get wrong is refused here, naming the flag, before any
# model loads (reading a model's adadiff.json or an export's manifest.json is all they need).
# --------------------------------------------------------------------------------------------

# Tiles above this multiple of the model's own tile are refused: the model never saw them, and
# attention memory grows with the square of the tile's area (--tile 100000 asked for 112 GiB).
MAX_TILE_FACTOR = 4


def model_folder(model: str | None) -> Path | None:
    """The folder a --model names: a preset's shipped weights or a folder; None for a preset
    without shipped weights."""
    name = preset_name(model or "tiny")
    if name is not None:
        shipped = SHIPPED / name
        return shipped if shipped.is_dir() else None
    return Path(model or "tiny")


def model_config_of(args: argparse.Namespace) -> Any:
    """The model config the run will use, read without torch: an export's manifest with
    --engines, else the model's adadiff.json (or the preset)."""
    if args.model is not None and not is_preset(args.model) and not Path(args.model).is_dir():
        raise ConfigError(
            f"--model {args.model} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
            "model folder; check the path"
        )
    if args.backend == "torch":
        if args.engines is not None:
            raise ConfigError(
                f"--engines {args.engines} is for --backend onnxruntime or tensorrt, not torch; "
                "drop --engines or pass --backend onnxruntime"
            )
        return model_config(args.model or "tiny")
    if args.engines is None:
        raise ConfigError(
            f"--backend {args.backend} needs --engines FOLDER, the output of `adadiff export "
            "--model MODEL -o FOLDER`"
            + (" and `adadiff build FOLDER`" if args.backend == "tensorrt" else "")
        )
    return ExportManifest.load(args.engines).model_config()


def _multiple_hint(value: int, f: int) -> str:
    low = value // f * f
    options = [v for v in (low, low + f) if v >= f]
    return " or ".join(str(v) for v in options)


def check_tiling(args: argparse.Namespace, cfg: Any) -> None:
    """--tile and --overlap against the model: multiples of its VAE factor, overlap < tile, and
    no tile beyond ``MAX_TILE_FACTOR`` times the model's own (or another one than an export's)."""
    f = cfg.vae_scale_factor
    where = f"{cfg.name} (VAE factor {f})"
    if args.tile is not None:
        if args.tile % f:
            raise ConfigError(
                f"--tile {args.tile} must be a multiple of {f} for {where}; "
                f"use {_multiple_hint(args.tile, f)}"
            )
        if args.backend != "torch" and args.tile != cfg.tile_size:
            raise ConfigError(
                f"--tile {args.tile}: the exported files in --engines {args.engines} take "
                f"{cfg.tile_size} px tiles; drop --tile, use --backend torch (any tile size), or "
                f"export a copy of the model folder whose adadiff.json sets tile_size {args.tile}"
            )
        largest = MAX_TILE_FACTOR * cfg.tile_size
        if args.tile > largest:
            raise ConfigError(
                f"--tile {args.tile} is over {largest} px, {MAX_TILE_FACTOR}x the {cfg.tile_size} "
                f"px tiles {cfg.name} was made for (memory grows with the tile's area squared); "
                f"use --tile {largest} or less (a tile larger than the image is cut to its size)"
            )
    tile = cfg.tile_size if args.tile is None else args.tile
    if args.overlap is not None:
        if args.overlap % f:
            raise ConfigError(
                f"--overlap {args.overlap} must be a multiple of {f} for {where}; "
                f"use {_multiple_hint(args.overlap, f)}"
            )
        if args.overlap >= tile:
            source = f"--tile {tile}" if args.tile is not None else f"{cfg.name}'s default tile"
            raise ConfigError(
                f"--overlap {args.overlap} must be smaller than the tile ({source}, {tile} px); "
                f"use --overlap {max(0, min(cfg.tile_overlap, tile - f))} or less"
            )
    elif cfg.tile_overlap >= tile:
        raise ConfigError(
            f"--tile {tile} must be larger than {cfg.name}'s tile overlap ({cfg.tile_overlap} "
            f"px); use a larger --tile, or add --overlap {max(0, tile // 2 // f * f)}"
        )


def check_upscale_args(args: argparse.Namespace, *, here: bool = True) -> Any:
    """Every upscale option checked before the model loads; returns the model config.

    ``here=False`` (a remote Ray cluster: the model, engines and GPUs are the nodes') checks
    what needs no files or devices and returns None."""
    if args.interval is not None and args.schedule not in (None, "uniform"):
        raise ConfigError(
            f"--interval {args.interval} applies to --schedule uniform only; drop it or add "
            "--schedule uniform"
        )
    check_device(args.backend, args.device, here=here)
    check_precision(args.precision, args.backend)
    if not here:
        return None
    cfg = model_config_of(args)
    check_tiling(args, cfg)
    start = cfg.dtss.t_start
    if args.interval is not None and args.interval > start:
        raise ConfigError(
            f"--interval {args.interval} is over {start}, the timestep {cfg.name}'s tiles start "
            f"from: any larger jump is the same 1 step per tile; use --interval 1 to {start} "
            f"({start} = 1 step)"
        )
    fill_default_schedule(args, cfg)
    if args.schedule == "content":
        cfg.require_content_rule()
    return cfg


def fill_default_schedule(args: argparse.Namespace, cfg: Any) -> None:
    """--schedule, when not given, is the model's default; --interval must fit it."""
    if args.schedule is None:
        args.schedule = cfg.default_schedule
        if args.interval is not None and args.schedule != "uniform":
            raise ConfigError(
                f"--interval {args.interval} applies to --schedule uniform only, and this "
                f"model's default schedule is {args.schedule}; add --schedule uniform"
            )


def cap_tile(args: argparse.Namespace, cfg: Any, width: int, height: int) -> str | None:
    """Cut a --tile larger than the output down to the output's long side (rounded up to the
    VAE factor), so no tile is mostly padding; returns the note to print, or None."""
    if args.tile is None or args.backend != "torch":
        return None
    f = cfg.vae_scale_factor
    out_w, out_h = width * cfg.upscale, height * cfg.upscale
    fits = -(-max(out_w, out_h) // f) * f
    if args.tile <= fits:
        return None
    asked = args.tile
    args.tile = fits
    if args.overlap is not None or cfg.tile_overlap >= fits:  # one tile: any overlap below it
        overlap = cfg.tile_overlap if args.overlap is None else args.overlap
        args.overlap = max(0, min(overlap, fits - f))
    return (
        f"--tile {asked} is larger than the {out_w}x{out_h} output; using --tile {fits} (one tile)"
    )


def _upscaler(args: argparse.Namespace) -> Any:
    return Upscaler.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        engines=args.engines,
        max_batch=args.max_batch,
        tile_size=args.tile,
        tile_overlap=args.overlap,
        threads=args.threads,
    )


def draws_bars() -> bool:
    """stderr is a terminal that can redraw bars: tqdm moves the cursor up a line with an
    escape code that a dumb terminal (TERM=dumb: Emacs' shell, some CI log panes) prints as
    "^[[A" on every update."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def _progress(args: argparse.Namespace) -> Any:
    """A bar on a terminal, timestamped lines otherwise (TERM=dumb too), nothing with --quiet."""
    if args.quiet:
        return ProgressBars(enabled=False)
    if draws_bars():
        return ProgressBars(enabled=True)
    return LogProgress(sys.stderr)


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        write_line(sys.stderr, f"adadiff: note: {text}")


def _upscale(args: argparse.Namespace, input_path: Path, outputs: Any, cfg: Any) -> int:
    """Validate outputs and read the input before loading any model, so mistakes fail fast."""
    outputs, image = file_upscale.read_input(input_path, outputs, args.max_pixels, cfg.upscale)
    notes = file_upscale.input_notes(image, outputs.image)
    for note in (*notes, cap_tile(args, cfg, image.width, image.height)):
        if note:
            _note(args, note)
    upscaler = _upscaler(args)
    options = file_upscale.UpscaleOptions(
        schedule=args.schedule, interval=args.interval, seed=args.seed, max_pixels=args.max_pixels
    )
    bars = _progress(args)
    try:
        data = file_upscale.upscale_loaded(
            upscaler, image, input_path, outputs, options, progress=bars
        )
    finally:
        bars.close()
        upscaler.close()
    print(file_upscale.summary(data))
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    cfg = check_upscale_args(args)
    return _upscale(args, args.input, FileOutputs(args.output, args.report, args.step_map), cfg)


def cmd_upscale_many(args: argparse.Namespace) -> int:
    settings = JobSettings(
        model=args.model,
        backend=args.backend,
        engines=None if args.engines is None else str(args.engines.expanduser().resolve()),
        device=args.device,
        precision=args.precision,
        schedule=args.schedule,
        interval=args.interval,
        seed=args.seed,
        max_batch=args.max_batch,
        tile=args.tile,
        overlap=args.overlap,
        max_pixels=args.max_pixels,
        output_format=args.output_format,
    )
    if args.ray_address is None:
        check_local_paths(settings)  # missing model or engines folders, in the job's words
    cfg = check_upscale_args(args, here=args.ray_address is None)
    if cfg is None:
        # On a cluster the nodes load the model; a preset's config (or a folder's, which the
        # stamp already digests from here) still gives the defaults, so that a job begun on
        # this machine resumes on the cluster and the other way round.
        try:
            cfg = model_config_of(args)
        except AdadiffError:
            pass  # the model is the nodes' alone
        else:
            fill_default_schedule(args, cfg)
    if cfg is not None:  # the model's defaults spelled out, so a rerun that names them resumes
        uniform = args.schedule == "uniform"
        settings = dataclasses.replace(
            settings,
            schedule=args.schedule,
            interval=(cfg.uniform_interval if args.interval is None else args.interval)
            if uniform
            else None,
            # None is the model's own tiling (its digest is in the stamp): --tile 128 on tiny
            # is the same job as no --tile, and earlier outputs' stamps say None
            tile=None if args.tile == cfg.tile_size else args.tile,
            overlap=None if args.overlap == cfg.tile_overlap else args.overlap,
        )
    cluster = ClusterOptions(
        ray_address=args.ray_address,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        queue=args.queue,
        cross_image=not args.image_by_image,
        threads=args.threads,
    )
    result = run_job(
        args.input_dir,
        args.output_dir,
        settings,
        cluster,
        on_record=None if args.quiet else print_record,
        on_status=None if args.quiet else print_status,
    )
    failed = result.count("failed")
    print(
        f"{result.report_path}: {result.count('done')} upscaled, {result.count('skipped')} "
        f"already done, {failed} failed in {result.wall_seconds:.1f}s "
        f"({result.startup_seconds:.1f}s start-up; {result.steady_images_per_hour:.0f} images/hour "
        f"after it; mean batch {result.mean_batch:.2f})"
    )
    if result.stopped:
        print(
            f"adadiff: error: the job stopped early: {result.stopped}; free space (or fix the "
            "folder) and run the same command again to go on",
            file=sys.stderr,
        )
        return 2
    return 1 if failed and args.strict else 0


def _demo_model(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """The folder of the model the demo runs (None if it has none) and whether its weights are
    a preset's random init; with --engines alone, the model the export was made from."""
    if args.engines is not None and args.model is None:
        from adadiff.artifacts import ExportManifest

        source = ExportManifest.load(args.engines).model
        recorded = Path(source)
        if (recorded / CONFIG_FILE).is_file():
            return recorded, False
        return None, "random init" in source  # a preset's seeded init, as the export names it
    folder = model_folder(args.model)
    return folder, folder is None


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = check_upscale_args(args)
    folder, untrained = _demo_model(args)
    if args.photo is None:
        args.photo = demo.default_photo(folder)
    demo.check_photo(args.photo)
    out = args.output.expanduser()
    max_pixels = args.max_pixels or imageio.DEFAULT_MAX_PIXELS
    source = demo.prepare(out, args.photo, args.size, max_pixels)
    print(
        f"{source}: {args.photo} ({demo.role(args.photo, folder, untrained=untrained)}) at "
        f"{args.size} px long side; "
        f"{out / 'bicubic.png'}: bicubic 4x"
    )
    outputs = FileOutputs(out / "upscaled.png", out / "report.json", out / "steps.png")
    code = _upscale(args, source, outputs, cfg)
    print(f"{out / 'report.json'}: report; {out / 'steps.png'}: steps per tile")
    return code


def cmd_convert(args: argparse.Namespace) -> int:
    from adadiff.models.convert import convert_sd21

    start = time.perf_counter()
    dst = convert_sd21(
        args.src, args.output, seed=args.seed, log=lambda m: print(m, file=sys.stderr)
    )
    print(f"{dst}: converted in {time.perf_counter() - start:.1f}s")
    name = Path(args.output).name
    if name in PRESETS:
        print(
            f"note: {name!r} is also the name of a built-in preset; pass this folder to "
            f"--model as a path ({Path(dst).resolve()})",
            file=sys.stderr,
        )
    return 0


def _int_list(value: str, what: str) -> tuple[int, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        numbers = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(
            f"{what} must be comma-separated whole numbers or 'none', got {value!r}"
        ) from None
    return numbers


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from adadiff.export import ExportOptions, export_onnx
    except ImportError as exc:
        raise BackendUnavailableError(
            f"export needs torch, onnx, onnxscript, polygraphy and onnx-graphsurgeon ({exc}); "
            'pip install "adadiff[onnx]"'
        ) from exc

    # The exporters log every rewrite at INFO and a torchvision notice at WARNING.
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    chosen: dict[str, Any] = {
        "components": tuple(c.strip() for c in args.components.split(",") if c.strip()),
        "precision": args.precision,
        "fold": not args.no_fold,
        "check_batches": _int_list(args.check_batches, "--check-batches"),
    }
    if args.opset is not None:
        chosen["opset"] = args.opset
    if args.exporter is not None:
        chosen["exporter"] = args.exporter
    options = ExportOptions(**chosen)
    bars = ProgressBars(enabled=not args.quiet and draws_bars())
    start = time.perf_counter()
    try:
        manifest = export_onnx(args.model, args.output, options, seed=args.seed, progress=bars)
    finally:
        bars.close()
    for name, entry in manifest.components.items():
        nodes = entry.nodes
        print(
            f"{args.output / entry.onnx_file}: {name} {entry.precision}, "
            f"{entry.size / 1e6:.1f} MB in {len(entry.files)} file(s), nodes "
            f"{nodes.get('exported', '?')} -> {nodes.get('cleaned', '?')}"
            + (f" -> {nodes['fp16']} (fp16)" if "fp16" in nodes else "")
        )
    precision = " --precision fp16" if manifest.precision == "fp16" else ""
    summary = (
        f"{args.output}: {manifest.model}, {manifest.precision}, opset {manifest.opset}, "
        f"{manifest.exporter} exporter, {time.perf_counter() - start:.1f}s."
    )
    missing = [n for n in COMPONENTS if n not in manifest.components]
    if missing:
        print(
            f"{summary} It holds no {', '.join(missing)} yet; an upscale needs every component: "
            f"adadiff export --model {shell_arg(args.model)} -o {shell_arg(args.output)} "
            f"--components {','.join(missing)}{precision}"
            + (f" --opset {args.opset}" if args.opset is not None else "")
            + (f" --exporter {args.exporter}" if args.exporter is not None else "")
        )
    else:
        print(
            f"{summary} Run it with: adadiff upscale IMAGE -o OUT.png --backend onnxruntime "
            f"--engines {shell_arg(args.output)}{precision}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # benchmarks/ is a folder of a source checkout, never installed: run it as `python -m
    # benchmarks` from the checkout's root, as its README section says.
    if not (Path.cwd() / "benchmarks" / "__main__.py").is_file():
        raise ConfigError(
            "adadiff bench runs the benchmarks of a source checkout (the benchmarks/ folder is "
            "not installed); run it from the root of a clone of the repository after "
            "pip install -e ., or run python -m benchmarks there"
        )
    command = [sys.executable, "-m", "benchmarks", *args.args]
    if os.name == "posix":
        # become the benchmark: a SIGTERM to this process must stop it, not orphan a child
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)
    return subprocess.run(command).returncode


def cmd_setup_metrics(args: argparse.Namespace) -> int:
    from adadiff.training.metrics_setup import setup_metrics

    stored = setup_metrics(args.cache_dir, refit_niqe=args.refit_niqe, log=print)
    print(f"metrics ready: {', '.join(sorted(stored))}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    # What is missing on this machine comes first: it is what the user must fix before anything.
    if parse_device(args.device, "tensorrt").kind == "cpu":
        # upscale reads its default "cpu" as the first GPU for tensorrt; a build names its GPU
        raise ConfigError(
            f"--device {args.device}: TensorRT engines are built on a GPU; give cuda or cuda:N"
        )
    import_tensorrt()
    cuda = CudaDevice(args.device)
    exported = ExportManifest.load(args.engines)
    from adadiff.export.tensorrt_build import BuildOptions, build_engines, describe

    if args.profiles:
        profiles = parse_profiles(args.profiles)
    else:
        profiles = (BatchProfile(args.min_batch, args.opt_batch, args.max_batch),)
    components = (
        tuple(c.strip() for c in args.components.split(",") if c.strip())
        if args.components
        else tuple(exported.components)
    )
    options = BuildOptions(
        components=components,
        profiles=profiles,
        timing_cache=args.timing_cache,
        workspace_gb=args.workspace,
        tf32=args.tf32,
    )
    bars = ProgressBars(enabled=not args.quiet and draws_bars())
    try:
        manifest = build_engines(args.engines, options, progress=bars, cuda=cuda)
    finally:
        bars.close()
    for line in describe(manifest):
        print(line)
    return 0


def verbose_everywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``-v`` follow any sub-command too (``adadiff upscale -v ...``), not only precede it.
    Its default there is SUPPRESS, so a sub-command without it keeps what was said before it;
    a parser that already has a ``-v`` of its own, and ``bench`` (whose arguments are the
    runner's), are left as they are."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if name == "bench":
                    continue
                if not {"-v", "--verbose"} & set(child._option_string_actions):
                    child.add_argument(
                        "-v",
                        "--verbose",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help="log details to stderr (also before the command)",
                    )
                verbose_everywhere(child)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and every sub-command's parser ``DefaultsFormatter``."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)
    return parser


def run(argv: Sequence[str] | None, parser_factory: Callable[[], argparse.ArgumentParser]) -> int:
    # Before anything can import torch: OpenMP reads its wait policy once, when torch loads.
    prefer_passive_wait()
    # A path the console's encoding cannot spell (日本.png on an ASCII or Latin-1 locale, a
    # Windows console redirected to a file) is printed with escapes: strict encoding failed the
    # final summary line after the outputs were written. stderr already does this.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
    parser = show_defaults(verbose_everywhere(parser_factory()))
    argv = list(sys.argv[1:] if argv is None else argv)
    OneLineParser.argv = tuple(argv)
    lead = 0  # -v before the command is adadiff's own; everything after "bench" is not
    while lead < len(argv) and argv[lead] in ("-v", "--verbose"):
        lead += 1
    if argv[lead : lead + 1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark runner, --help included.
        args = argparse.Namespace(func=cmd_bench, args=argv[lead + 1 :], verbose=lead > 0)
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # On a Ray cluster (--ray-address) the workers run on the nodes, whose CPUs are not ours.
    if getattr(args, "ray_address", None) is None:
        note = excess_threads_note(getattr(args, "threads", None))
        if note:
            log.warning(note)
    try:
        return int(args.func(args))
    except AdadiffError as exc:
        print(f"adadiff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("adadiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader has exited (`| head -1`) after the work was done: end quietly, as a
        # program killed by SIGPIPE does, not with a traceback (and another when Python flushes
        # stdout at exit).
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser)


def export_main(argv: Sequence[str] | None = None) -> int:
    return main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
