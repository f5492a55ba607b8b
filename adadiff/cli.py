"""The ``adadiff`` command line. User mistakes exit 2 with one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adadiff import __version__
from adadiff.errors import AdadiffError, ConfigError

log = logging.getLogger("adadiff")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


class ProgressBars:
    """A tqdm bar per stage, fed by the library's progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total,
                desc=stage,
                unit="t" if stage == "denoise" else "it",
                leave=False,
                file=sys.stderr,
            )
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset (tiny, sd21-base) or model folder")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"))
    p.add_argument(
        "--engines", type=Path, help="exported ONNX / engine folder (onnxruntime, tensorrt)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adadiff", description="AdaDiffSR: adaptive-step diffusion 4x super-resolution"
    )
    parser.add_argument("--version", action="version", version=f"adadiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("upscale", help="upscale one image 4x")
    up.add_argument("input", type=Path, help="PNG, JPEG, WebP or TIFF image")
    up.add_argument("-o", "--output", type=Path, required=True, help="output image path")
    _add_model_args(up)
    up.add_argument("--schedule", default="adaptive", choices=("adaptive", "uniform"))
    up.add_argument(
        "--interval",
        type=_positive,
        help="uniform schedule jump in timesteps (20 = 50 steps, 5 = 200 steps)",
    )
    up.add_argument("--seed", type=_non_negative, default=0)
    up.add_argument("--max-batch", type=_positive, default=8, help="tiles per engine call")
    up.add_argument("--tile", type=_positive, help="tile size in output pixels (model default)")
    up.add_argument("--overlap", type=_non_negative, help="tile overlap in output pixels")
    up.add_argument(
        "--max-pixels",
        type=_positive,
        default=None,
        help="refuse inputs with more pixels than this (default 16 million)",
    )
    up.add_argument("--report", type=Path, help="write the run report as JSON here")
    up.add_argument("--step-map", type=Path, help="write a PNG of steps per tile here")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=cmd_upscale)

    cv = sub.add_parser(
        "convert-sd21", help="turn a stock SD-2.1-base diffusers folder into a model folder"
    )
    cv.add_argument(
        "src", type=Path, help="diffusers folder with unet/, vae/, text_encoder/, tokenizer/"
    )
    cv.add_argument("-o", "--output", type=Path, required=True, help="new model folder")
    cv.add_argument("--seed", type=_non_negative, default=0, help="seed for PFJ and MMLE init")
    cv.set_defaults(func=cmd_convert)
    return parser


def _check_parent(path: Path | None, what: str) -> None:
    from adadiff.errors import OutputPathError

    if path is not None and not path.expanduser().resolve().parent.is_dir():
        raise OutputPathError(f"the folder for the {what} {path} does not exist; create it first")


def cmd_upscale(args: argparse.Namespace) -> int:
    from adadiff import imageio
    from adadiff.runtime.upscaler import Upscaler

    max_pixels = args.max_pixels or imageio.DEFAULT_MAX_PIXELS
    output = imageio.check_output_path(args.input, args.output)
    _check_parent(args.report, "report")
    _check_parent(args.step_map, "step map")
    for extra in (args.report, args.step_map):
        if extra is not None and extra.expanduser().resolve() in (
            output,
            args.input.expanduser().resolve(),
        ):
            raise ConfigError(f"{extra} would overwrite the input or the output image")
    if args.step_map is not None and args.step_map.suffix.lower() != ".png":
        raise ConfigError(f"--step-map must be a .png file, got {args.step_map}")
    if args.interval is not None and args.schedule != "uniform":
        raise ConfigError("--interval applies to --schedule uniform only")
    image = imageio.load_image(args.input, max_pixels=max_pixels)

    upscaler = Upscaler.from_pretrained(
        args.model,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        engines=args.engines,
        max_batch=args.max_batch,
        tile_size=args.tile,
        tile_overlap=args.overlap,
    )
    bars = ProgressBars(enabled=not args.quiet and sys.stderr.isatty())
    try:
        rgb, report = upscaler.upscale(
            image.rgb, schedule=args.schedule, interval=args.interval, seed=args.seed, progress=bars
        )
    finally:
        bars.close()
    alpha = (
        None if image.alpha is None else imageio.upscale_alpha(image.alpha, upscaler.config.upscale)
    )
    written = imageio.save_image(
        output, rgb, alpha, bit_depth=image.bit_depth, grayscale=image.grayscale
    )
    data = report.to_dict()
    data.update(
        input=str(args.input),
        output=str(written),
        input_mode=image.source_mode,
        bit_depth=image.bit_depth,
        alpha=image.alpha is not None,
        version=__version__,
    )
    if args.report is not None:
        imageio.write_bytes_atomic(args.report, (json.dumps(data, indent=2) + "\n").encode())
    if args.step_map is not None:
        from adadiff.stepmap import save_step_map

        save_step_map(args.step_map, rgb, report.boxes, report.steps_per_tile, report.exits)
    steps = report.steps_per_tile
    print(
        f"{written}: {report.output_size[0]}x{report.output_size[1]}, {report.tiles} tiles, "
        f"{report.unet_evaluations} UNet evaluations in {report.engine_calls} calls "
        f"(steps per tile {min(steps)}..{max(steps)}), {report.seconds['total']:.1f}s"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from adadiff.models.convert import convert_sd21

    start = time.perf_counter()
    dst = convert_sd21(
        args.src, args.output, seed=args.seed, log=lambda m: print(m, file=sys.stderr)
    )
    print(f"{dst}: converted in {time.perf_counter() - start:.1f}s")
    return 0


def run(argv: Sequence[str] | None, parser_factory: Callable[[], argparse.ArgumentParser]) -> int:
    parser = parser_factory()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except AdadiffError as exc:
        print(f"adadiff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("adadiff: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser)


def export_main(argv: Sequence[str] | None = None) -> int:
    return main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
