"""Super-resolution quality of a model on whole photos, two degradations, and a gallery.

    python -m benchmarks.quality --out runs/quality [--model tiny] [--photos holdout]
    adadiff bench quality --out runs/quality ...

Every photo of the set (the hold-out photos by default: never trained or tuned on; ``--photos
validation`` for the photos choices are tuned on; or your own image files and folders, to see
how a model does on your kind of photo) is cut to a multiple of 4 and degraded twice:

- ``bicubic``: ``bicubic_x4`` (antialiased bicubic, the training pairs' plain degradation);
- ``realworld``: a Gaussian blur of 2 HR px, ``bicubic_x4``, then JPEG quality 60 on the LR.

Each LR image is upscaled by bicubic interpolation and by the model through the Upscaler (tiles,
merge, colour fix: what a user gets), with the model's default schedule unless ``--schedule``
says otherwise. PSNR, SSIM and LPIPS against the original are computed on 128 px blocks (every
whole block of the photo), so a photo's figure has an interval: 90% from resampling its blocks;
pooled figures weight every photo equally and resample blocks within photos; the model-minus-
bicubic differences are paired by block. BRISQUE (no reference) is computed on the whole output.
The gallery puts crops of bicubic, the model and the original side by side: a face, a flat
background and textures, so grain or colour speckles show where bicubic has none.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadiff.argtypes import DefaultsFormatter, non_negative, positive
from adadiff.config import SCHEDULES
from adadiff.engines.torch import TorchBackend
from adadiff.errors import AdadiffError, ConfigError, InputImageError
from adadiff.imageio import DEFAULT_MAX_PIXELS, INPUT_FORMATS, bicubic_upscale, load_image
from adadiff.models.bundle import TorchModels, describe, load_models
from adadiff.quality.brisque import brisque
from adadiff.quality.lpips import load_lpips
from adadiff.quality.metrics import psnr_capped, ssim
from adadiff.runtime.upscaler import Upscaler
from adadiff.scaleout.plan import list_inputs
from adadiff.training.data import load_photo
from adadiff.training.degrade import bicubic_x4, blur_jpeg_x4
from adadiff.training.labels import decode_latents, encode_latents
from adadiff.training.pairs import evaluation_photos
from benchmarks.machine import machine, weights_of
from benchmarks.paths import check_out_folder, readme_arg
from benchmarks.report import check_readme, ci, read_saved, relative_link

log = logging.getLogger("adadiff")

BLOCK = 128
# the hold-out and validation photos (640 px at most) go through the VAE whole
ROUND_TRIP_WHOLE = 1024
SET_NAMES = {"holdout": "hold-out", "validation": "validation", "named": "named", "files": "given"}
EVALUATION_SETS = ("holdout", "validation")
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
DEGRADATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "bicubic": (bicubic_x4, "bicubic x4"),
    "realworld": (blur_jpeg_x4, "Gaussian blur 2 px, bicubic x4, JPEG 60"),
}
# The targets: (degradation, what, bound)
LPIPS_AT_MOST = 0.30
LPIPS_BELOW_BICUBIC = {"bicubic": 0.12, "realworld": 0.20}
PSNR_WITHIN = 1.5


@dataclass(frozen=True)
class Region:
    """A gallery crop: a photo, the HR top-left corner and side, and what it shows."""

    photo: str
    top: int
    left: int
    size: int
    label: str


GALLERY: tuple[Region, ...] = (
    Region("astronaut", 70, 175, 128, "face"),
    Region("astronaut", 10, 20, 128, "flat background"),
    Region("coffee", 150, 60, 128, "saucer, flat colour"),
    Region("chelsea", 60, 200, 128, "fur and whiskers"),
    Region("gravel", 200, 200, 128, "gray texture"),
)


def blocks(image: np.ndarray, size: int = BLOCK) -> np.ndarray:
    """[N, size, size, 3]: every whole block of ``image``, row by row."""
    h, w = image.shape[:2]
    return np.stack(
        [
            image[y : y + size, x : x + size]
            for y in range(0, h - size + 1, size)
            for x in range(0, w - size + 1, size)
        ]
    )


class BlockScorer:
    """PSNR, SSIM and LPIPS of every block of an output against the same block of the HR."""

    def __init__(self) -> None:
        self.lpips = load_lpips()

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, np.ndarray]:
        a, b = blocks(sr), blocks(hr)
        with torch.inference_mode():
            t = [
                torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) * 2.0 - 1.0
                for x in (a, b)
            ]
            lp = self.lpips(*t).numpy().astype(np.float64)
        return {
            "lpips": lp,
            "psnr": np.array([psnr_capped(x, y) for x, y in zip(a, b, strict=True)]),
            "ssim": np.array([ssim(x, y) for x, y in zip(a, b, strict=True)]),
        }


def interval(
    per_photo: list[np.ndarray], *, draws: int = 2000, seed: int = 0
) -> tuple[float, float | None, float | None]:
    """Mean of the per-photo means and its 90% interval, blocks resampled within each photo.
    With one block per photo the photos are resampled instead; a single block has nothing to
    resample, and its interval is unavailable (None, None), not a zero width that reads as
    exact."""
    mean = float(np.mean([v.mean() for v in per_photo]))
    if all(len(v) == 1 for v in per_photo):
        if len(per_photo) == 1:
            return mean, None, None
        per_photo = [np.concatenate(per_photo)]  # the photos are what varies
    rng = np.random.default_rng(seed)
    stats = np.zeros(draws)
    for values in per_photo:
        picks = rng.integers(0, len(values), (draws, len(values)))
        stats += values[picks].mean(axis=1)
    stats /= len(per_photo)
    low, high = np.percentile(stats, [5, 95])
    return mean, float(low), float(high)


def vae_round_trip(
    models: TorchModels,
    hr: np.ndarray,
    *,
    whole_up_to: int = ROUND_TRIP_WHOLE,
    tile: int = BLOCK * 4,
) -> np.ndarray:
    """The original through the model's own VAE (encode, decode), [0, 1] like the outputs.

    What a UNet that found the exact latent would give, before the Upscaler's colour fix:
    blotches or lost detail here are the VAE's, and no UNet removes them. A photo longer than
    ``whole_up_to`` px on a side goes through in ``tile`` px pieces (seams on block borders):
    the VAE's attention grows with the square of the area (1024 px whole take 24 s on two
    threads here, 512 px 2.8 s; a 12-megapixel photo whole ran past 14 min). A piece whose
    sides are not multiples of the VAE's scale factor is reflect-padded to them, as the
    Upscaler pads its input, and cropped back after decoding."""
    decoder = models.wrappers()["vae_decoder"]
    factor = models.config.vae_scale_factor
    if max(hr.shape[:2]) <= whole_up_to:
        tile = max(hr.shape[:2])
    out = np.empty(hr.shape, np.float32)
    for y in range(0, hr.shape[0], tile):
        for x in range(0, hr.shape[1], tile):
            part = np.asarray(hr[y : y + tile, x : x + tile], dtype=np.float32)
            h, w = part.shape[:2]
            part = np.pad(part, ((0, -h % factor), (0, -w % factor), (0, 0)), mode="reflect")
            latent = encode_latents(models, np.ascontiguousarray(part)[None], max_batch=1)
            out[y : y + h, x : x + w] = decode_latents(decoder, latent)[0][:h, :w]
    return out


@dataclass(frozen=True)
class PhotoSource:
    """A photo to score: one of the project's, by name, or an image file (``path``) of at most
    ``max_pixels`` pixels."""

    name: str
    path: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def load(self) -> np.ndarray:
        # alpha, bit depth and colour profile do not enter the scores: RGB in [0, 1] only
        if self.path is None:
            return load_photo(self.name)
        return load_image(self.path, max_pixels=self.max_pixels).rgb


def _image_files(entry: str) -> list[Path]:
    path = Path(entry).expanduser()
    if path.is_dir():
        try:
            files, _ = list_inputs(path)  # as upscale-many lists a folder: hidden files left out
        except ConfigError as exc:  # one that cannot be listed
            raise InputImageError(str(exc)) from exc
        if not files:
            raise InputImageError(
                f"{path}: no {', '.join(INPUT_FORMATS)} images in this folder (subfolders are "
                "not searched)"
            )
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise InputImageError(f"{entry}: neither an image file nor a folder")
    raise InputImageError(
        f"{entry}: no such file or folder; --photos takes holdout, validation, photo names, or "
        "image files and folders, separated by commas"
    )


def _looks_like_path(entry: str) -> bool:
    if "/" in entry or "\\" in entry or entry.lower().endswith(tuple(INPUT_FORMATS)):
        return True
    return Path(entry).exists()


def photo_sources(
    text: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[PhotoSource], str]:
    """What ``--photos`` names, and the set's label (holdout, validation, named or files).

    An entry with a path separator, an image suffix, or that exists on disk is a file or a
    folder (its images, sorted, hidden files left out); ``holdout`` and ``validation`` stand for
    their photos; any other entry is a project photo's name. A project photo named twice is an
    error; a file met twice (a folder and a file in it) is scored once. Files are named by their
    stem; a stem already taken, by a project photo or another file (letter case aside, as on
    macOS and Windows), gets a number appended, so no output overwrites another.
    """
    if text in EVALUATION_SETS:
        return [PhotoSource(n) for n in evaluation_photos(text)], text
    entries: list[str | Path] = []  # project photo names and files, in the order given
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if entry in EVALUATION_SETS:
            entries.extend(evaluation_photos(entry))
        elif _looks_like_path(entry):
            entries.extend(_image_files(entry))
        else:
            entries.append(entry)
    projects = [e for e in entries if isinstance(e, str)]
    for name in projects:
        if projects.count(name) > 1:
            raise InputImageError(f"{name}: named twice in --photos; give each photo once")
    taken = {name.casefold() for name in projects}
    seen: set[Path] = set()
    sources: list[PhotoSource] = []
    for item in entries:
        if isinstance(item, str):
            sources.append(PhotoSource(item))
            continue
        if item.resolve() in seen:
            continue
        seen.add(item.resolve())
        name, k = item.stem, 2
        while name.casefold() in taken:
            name, k = f"{item.stem}-{k}", k + 1
        taken.add(name.casefold())
        sources.append(PhotoSource(name, item, max_pixels))
    if not sources:
        raise InputImageError("--photos names no photo; give a set, photo names or image files")
    return sources, "files" if len(seen) else "named"


def check_sources(sources: list[PhotoSource], max_side: int | None) -> None:
    """Load every photo once before any model runs, so a bad one fails the run at once."""
    for source in sources:
        hr, _ = hr_of(source, max_side)
        if min(hr.shape[:2]) < BLOCK:
            raise InputImageError(
                f"{source.path or source.name}: {hr.shape[1]}x{hr.shape[0]} px (after "
                f"--max-side and cutting to a multiple of 4); the scores are taken on {BLOCK} px "
                f"blocks, so each photo needs at least {BLOCK} px on its short side"
            )


def hr_of(source: PhotoSource, max_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The photo, centre-cropped to ``max_side`` if given, cut to a multiple of 4, and the
    (top, left) of what is kept."""
    hr = source.load()
    top = left = 0
    if max_side:
        h, w = hr.shape[:2]
        top, left = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
        hr = hr[top : top + max_side, left : left + max_side]
    h, w = (hr.shape[0] // 4) * 4, (hr.shape[1] // 4) * 4
    return np.ascontiguousarray(hr[:h, :w]), (top, left)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    sources, photo_set = photo_sources(args.photos, max_pixels=args.max_pixels)
    check_sources(sources, args.max_side)
    names = [source.name for source in sources]
    models = load_models(args.model)  # once: the Upscaler runs them, the VAE round trip too
    up = Upscaler(
        models.config,
        TorchBackend(models, threads=args.threads),
        max_batch=args.max_batch,
        model_name=str(args.model),
    )
    schedule = up.schedule_of(args.schedule, args.interval)
    if args.out:  # only once the photos, the model and the schedule are known good: a refused
        args.out.mkdir(parents=True, exist_ok=True)  # run leaves nothing behind
    scorer = BlockScorer()
    ceiling: dict[str, dict[str, np.ndarray]] = {}
    vae_images: dict[str, np.ndarray] = {}
    images: dict[str, dict[str, np.ndarray]] = {}
    offsets: dict[str, tuple[int, int]] = {}
    result: dict[str, Any] = {
        "benchmark": "quality",
        "model": str(args.model),
        "weights": weights_of(str(args.model)),
        "weights_digest": describe(models)["weights_digest"],
        "machine": machine(),
        "photos": names,
        "photo_set": photo_set,
        "files": {src.name: str(src.path) for src in sources if src.path is not None},
        "schedule": schedule,
        "interval": args.interval,
        "seed": args.seed,
        "max_side": args.max_side,  # None: whole photos
        "block": BLOCK,
        "degradations": {k: v[1] for k, v in DEGRADATIONS.items()},
        "results": {},
    }
    seconds, tiles = [], []
    width = max(12, *(len(n) for n in names))
    for degradation, (degrade, _) in DEGRADATIONS.items():
        per: dict[str, dict[str, dict[str, np.ndarray]]] = {"bicubic": {}, "model": {}}
        brisques: dict[str, dict[str, float]] = {"bicubic": {}, "model": {}}
        for source in sources:
            name = source.name
            hr, offset = hr_of(source, args.max_side)
            lr = degrade(hr)
            bic = bicubic_upscale(lr, 4)
            start = time.perf_counter()
            sr, report = up.upscale(
                lr, schedule=args.schedule, interval=args.interval, seed=args.seed
            )
            seconds.append(time.perf_counter() - start)
            tiles.append(report.tiles)
            if name not in ceiling:
                vae = vae_round_trip(models, hr)
                ceiling[name] = scorer(vae, hr)
                if args.out and args.images:
                    save_png(args.out / "images" / f"vae-round-trip-{name}.png", vae)
                if source.path is None:
                    vae_images[name] = vae
            if args.out and args.images:
                for what, image in (("bicubic", bic), ("model", sr)):
                    save_png(args.out / "images" / f"{degradation}-{name}-{what}.png", image)
            if source.path is None:
                # only the gallery keeps whole images, and its regions are in the project's
                # photos: a folder of large photos of one's own is scored one photo at a time
                images[f"{degradation}/{name}"] = {
                    "bicubic": bic,
                    "model": sr,
                    "vae": vae_images[name],
                    "hr": hr,
                }
                offsets[name] = offset
            for method, out in (("bicubic", bic), ("model", sr)):
                per[method][name] = scorer(out, hr)
                brisques[method][name] = float(brisque(out))
            log.info("%s %s: %.1f s", degradation, name, seconds[-1])
            print(
                f"{degradation:9s} {name:{width}s} LPIPS bicubic "
                f"{per['bicubic'][name]['lpips'].mean():.3f} model "
                f"{per['model'][name]['lpips'].mean():.3f}  ({seconds[-1]:.1f} s)",
                flush=True,
            )
        entry: dict[str, Any] = {}
        for method in ("bicubic", "model"):
            entry[method] = {
                key: {
                    "pooled": interval([per[method][n][key] for n in names]),
                    "per_photo": {n: interval([per[method][n][key]]) for n in names},
                }
                for key in ("lpips", "psnr", "ssim")
            }
            entry[method]["brisque"] = {
                "pooled": float(np.mean(list(brisques[method].values()))),
                "per_photo": brisques[method],
            }
        entry["model_minus_bicubic"] = {
            key: {
                "pooled": interval([per["model"][n][key] - per["bicubic"][n][key] for n in names]),
                "per_photo": {
                    n: interval([per["model"][n][key] - per["bicubic"][n][key]]) for n in names
                },
            }
            for key in ("lpips", "psnr", "ssim")
        }
        entry["blocks"] = {n: len(per["model"][n]["lpips"]) for n in names}
        result["results"][degradation] = entry
    result["vae_round_trip"] = {
        key: {
            "pooled": interval([ceiling[n][key] for n in names]),
            "per_photo": {n: interval([ceiling[n][key]]) for n in names},
        }
        for key in ("lpips", "psnr", "ssim")
    }
    result["timing"] = {
        "seconds": seconds,
        "tiles": tiles,
        "seconds_per_tile": float(np.median(np.array(seconds) / np.array(tiles))),
        "threads": torch.get_num_threads(),
    }
    result["targets"] = targets(result["results"])
    if args.out:
        result["gallery"] = gallery(images, offsets, args.out)
    return result


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of the built-in model issue's quality lines: the figure, the bound, met or not."""
    out: dict[str, dict[str, Any]] = {}
    b = results.get("bicubic")
    if b:
        lp = b["model"]["lpips"]["pooled"][0]
        below = -b["model_minus_bicubic"]["lpips"]["pooled"][0]
        dpsnr = b["model_minus_bicubic"]["psnr"]["pooled"][0]
        out["bicubic: LPIPS at most 0.30"] = {"value": lp, "met": lp <= LPIPS_AT_MOST}
        out["bicubic: LPIPS at least 0.12 below bicubic"] = {
            "value": below,
            "met": below >= LPIPS_BELOW_BICUBIC["bicubic"],
        }
        out["bicubic: PSNR within 1.5 dB of bicubic"] = {
            "value": dpsnr,
            "met": dpsnr >= -PSNR_WITHIN,
        }
    r = results.get("realworld")
    if r:
        below = -r["model_minus_bicubic"]["lpips"]["pooled"][0]
        out["realworld: LPIPS at least 0.20 below bicubic"] = {
            "value": below,
            "met": below >= LPIPS_BELOW_BICUBIC["realworld"],
        }
    return out


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def gallery(
    images: dict[str, dict[str, np.ndarray]],
    offsets: dict[str, tuple[int, int]],
    out: Path,
    zoom: int = 2,
) -> dict[str, str]:
    """One PNG per degradation: a row per gallery region that lies inside the photos as they
    ran, columns bicubic | model | original (| VAE round trip, when the images have one), each
    crop enlarged ``zoom`` times (nearest) so grain shows."""
    from PIL import Image, ImageDraw

    written: dict[str, str] = {}
    regions = []
    for r in GALLERY:
        if r.photo not in offsets:
            continue
        top, left = r.top - offsets[r.photo][0], r.left - offsets[r.photo][1]
        h, w = images[f"{next(iter(DEGRADATIONS))}/{r.photo}"]["hr"].shape[:2]
        if top >= 0 and left >= 0 and top + r.size <= h and left + r.size <= w:
            regions.append(Region(r.photo, top, left, r.size, r.label))
    if not regions:
        return written
    columns = {"bicubic": "bicubic", "model": "model", "hr": "original"}
    if all("vae" in parts for parts in images.values()):
        columns["vae"] = "VAE round trip"
    for degradation in DEGRADATIONS:
        side = max(r.size for r in regions) * zoom
        pad, head = 4, 18
        n = len(columns)
        canvas = Image.new(
            "RGB", (n * side + (n + 1) * pad, head + len(regions) * (side + pad) + pad), "white"
        )
        draw = ImageDraw.Draw(canvas)
        for c, title in enumerate(columns.values()):
            draw.text((pad + c * (side + pad) + 4, 3), title, fill="black")
        for r_i, region in enumerate(regions):
            parts = images[f"{degradation}/{region.photo}"]
            for c, key in enumerate(columns):
                crop = parts[key][
                    region.top : region.top + region.size, region.left : region.left + region.size
                ]
                tile = Image.fromarray(np.round(np.clip(crop, 0, 1) * 255).astype(np.uint8))
                tile = tile.resize(
                    (region.size * zoom, region.size * zoom), Image.Resampling.NEAREST
                )
                canvas.paste(tile, (pad + c * (side + pad), head + r_i * (side + pad)))
            draw.text(
                (pad + 4, head + r_i * (side + pad) + 4),
                f"{region.photo}: {region.label}",
                fill="white",
                stroke_width=2,
                stroke_fill="black",
            )
        path = out / f"gallery-{degradation}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, optimize=True)
        written[degradation] = path.name
    return written


def _resampled(result: dict[str, Any]) -> str:
    blocks = {n for entry in result["results"].values() for n in entry["blocks"].values()}
    if blocks != {1}:
        return "90% intervals from resampling blocks within photos"
    if len(result["photos"]) > 1:
        return "90% intervals from resampling photos (one block each)"
    return "no intervals (one block of one photo: nothing to resample)"


def _extent(result: dict[str, Any]) -> str:
    side = result.get("max_side")
    return "whole photos" if not side else f"centre crops of at most {side} px"


def render(result: dict[str, Any], json_path: Path, readme: Path) -> str:
    """Markdown for README's quality section, every figure from the JSON."""
    rel = Path(relative_link(json_path.resolve(), readme.resolve()))
    photos = result["photos"]
    lines = [
        f"Generated from [`{rel}`]({rel}) by `python -m benchmarks.quality --render {rel}"
        f"{readme_arg(readme, required=True)}`; do not edit by hand.",
        "",
        f"{result['model']} ({result['schedule']} schedule) on the {len(photos)} "
        f"{SET_NAMES.get(result['photo_set'], result['photo_set'])} photos "
        f"({', '.join(photos)}), {_extent(result)} through the Upscaler. PSNR, SSIM and LPIPS on "
        f"{result['block']} px blocks, {_resampled(result)}, "
        "every photo weighted equally; BRISQUE on the whole output (lower is better).",
        "",
        "| degradation | upscaler | LPIPS | PSNR dB | SSIM | BRISQUE |",
        "|---|---|---|---|---|---|",
    ]
    for deg, entry in result["results"].items():
        for method in ("bicubic", "model"):
            e = entry[method]
            lines.append(
                f"| {result['degradations'][deg]} | {method} | {ci(e['lpips']['pooled'])} | "
                f"{ci(e['psnr']['pooled'], 2)} | {e['ssim']['pooled'][0]:.3f} | "
                f"{e['brisque']['pooled']:.1f} |"
            )
        d = entry["model_minus_bicubic"]
        lines.append(
            f"| | model - bicubic | {ci(d['lpips']['pooled'])} | {ci(d['psnr']['pooled'], 2)}"
            f" | {d['ssim']['pooled'][0]:+.3f} | |"
        )
    ceiling = result.get("vae_round_trip")
    if ceiling:
        lines.append(
            f"| none | the original through {result['model']}'s VAE | "
            f"{ci(ceiling['lpips']['pooled'])} | {ci(ceiling['psnr']['pooled'], 2)} | "
            f"{ceiling['ssim']['pooled'][0]:.3f} | |"
        )
    lines += ["", "Per photo, LPIPS bicubic -> model:", ""]
    lines.append("| degradation | " + " | ".join(photos) + " |")
    lines.append("|---|" + "---|" * len(photos))
    for deg, entry in result["results"].items():
        cells = [
            f"{entry['bicubic']['lpips']['per_photo'][p][0]:.3f} -> "
            f"{entry['model']['lpips']['per_photo'][p][0]:.3f}"
            for p in photos
        ]
        lines.append(f"| {deg} | " + " | ".join(cells) + " |")
    if ceiling:
        cells = [f"{ceiling['lpips']['per_photo'][p][0]:.3f}" for p in photos]
        lines.append("| VAE round trip | " + " | ".join(cells) + " |")
        lines += [
            "",
            "The VAE round trip encodes and decodes the original itself: what a UNet that "
            "found the exact latent would give. It skips the colour fix the Upscaler applies "
            "to its outputs (their low frequencies come from the bicubic input), so its "
            "colours can be off where the model's are not; its blotches and lost detail are "
            "finer than what the colour fix replaces, and where they show they limit the "
            "model's outputs too (the gallery's last column).",
        ]
    t = result["timing"]
    lines += [
        "",
        f"Main job time: {t['seconds_per_tile']:.3f} s per tile (median over the runs, "
        f"{t['threads']} torch threads, {result['machine'].get('cpu', 'this CPU')}).",
    ]
    marks = result.get("targets", {})
    if marks:
        lines += ["", "Targets:", ""]
        for label, mark in marks.items():
            lines.append(f"- {label}: {mark['value']:.3f}, {'met' if mark['met'] else 'missed'}.")
    for deg, name in result.get("gallery", {}).items():
        lines += [
            "",
            f"Gallery, {result['degradations'][deg]} (bicubic | {result['model']} | original"
            f"{' | VAE round trip' if ceiling else ''}, crops enlarged 2x):",
            "",
            f"![gallery {deg}]({rel.parent / name})",
        ]
    return "\n".join(lines)


def write_readme(result: dict[str, Any], json_path: Path, readme: Path) -> None:
    from benchmarks.report import update_readme

    update_readme(readme, render(result, json_path, readme), start=START, end=END)
    print(f"updated {readme}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adadiff bench quality",
        description="a model against bicubic on whole photos, two degradations, and a gallery",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--out", type=Path, help="output folder (quality.json, gallery, images)")
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--photos",
        default="holdout",
        help="holdout, validation, or photo names, image files or folders of images, "
        "separated by commas (your own photos: the originals, which are degraded and upscaled; "
        "large ones take a while, see --max-side)",
    )
    p.add_argument(
        "--max-side", type=positive, help="centre-crop the photos to at most this many px"
    )
    p.add_argument(
        "--max-pixels",
        type=positive,
        default=DEFAULT_MAX_PIXELS,
        help="refuse image files with more pixels than this (a 24-megapixel photo needs 24000000)",
    )
    p.add_argument("--schedule", choices=SCHEDULES, help="default: the model's")
    p.add_argument("--interval", type=int, help="uniform interval (with --schedule uniform)")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--max-batch", type=positive, default=8)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument(
        "--images", action="store_true", help="also write every output as PNG under OUT/images"
    )
    p.add_argument("--readme", type=Path, help="rewrite this README's quality section")
    p.add_argument("--render", type=Path, help="only render a saved quality.json into --readme")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.render:
        if not args.readme:
            raise SystemExit("--render needs --readme")
        try:
            check_readme(args.readme, start=START, end=END)
            saved = read_saved(args.render, "quality.json", ("results", "degradations", "photos"))
            write_readme(saved, args.render, args.readme)
        except AdadiffError as exc:
            print(f"adadiff bench quality: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.readme and not args.out:  # the section links to the JSON, which needs a folder
        raise SystemExit("--readme needs --out (the README section is made from the saved JSON)")
    if args.images and not args.out:
        raise SystemExit("--images needs --out (the images are written under OUT/images)")
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.out:
            check_out_folder(args.out)
        if args.readme:
            check_readme(args.readme, start=START, end=END)
        result = run(args)
        result["argv"] = list(sys.argv[1:] if argv is None else argv)
    except AdadiffError as exc:
        print(f"adadiff bench quality: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        path = args.out / "quality.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
        if args.readme:
            write_readme(result, path, args.readme)
    for label, mark in result["targets"].items():
        print(f"{label}: {mark['value']:.3f} {'met' if mark['met'] else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
