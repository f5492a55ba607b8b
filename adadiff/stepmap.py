"""The "step map": how many denoising steps each tile used, drawn over the upscaled image.

Each pixel belongs to the tile whose centre is nearest, which turns overlapping tiles into a clean
partition. Cells are coloured with a viridis-like ramp over a grayscale copy of the image, bordered,
labelled with their step count when large enough, and marked in the top-left corner when the tile
stopped early ("saturated"). A legend strip with the ramp and a one-line summary goes below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from adadiff.imageio import (
    LUMA_601,
    Writer,
    format_for_path,
    pil_writer,
    write_files_atomic,
)

__all__ = ["EXIT_KINDS", "render_step_map", "save_step_map", "step_colours", "step_map_writer"]

Box = tuple[int, int, int, int]

EXIT_KINDS = ("t0", "saturated")

# Viridis at 0, 0.25, 0.5, 0.75, 1: perceptually even and readable by colour-blind users.
_RAMP_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float32,
)
_SATURATED_RGB = np.array([240, 60, 40], dtype=np.float32)
_BORDER_RGB = np.array([255, 255, 255], dtype=np.float32)
_BORDER_OPACITY = 0.6
_COLOUR_OPACITY = 0.5
_LEGEND_MIN_WIDTH = 420
_MIN_SIDE = 256
_PAD = 6


@dataclass(frozen=True)
class _Cells:
    labels: np.ndarray  # int32 [h, w]: tile index per map pixel
    y_min: np.ndarray
    y_max: np.ndarray
    x_min: np.ndarray
    x_max: np.ndarray


def step_colours(t: np.ndarray) -> np.ndarray:
    """Ramp colours (float32 RGB in [0, 255]) for positions ``t`` in [0, 1]."""
    pos = np.clip(np.asarray(t, dtype=np.float32), 0.0, 1.0) * (len(_RAMP_ANCHORS) - 1)
    low = np.minimum(np.floor(pos).astype(np.int64), len(_RAMP_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    return _RAMP_ANCHORS[low] * (1.0 - frac) + _RAMP_ANCHORS[low + 1] * frac


def _ramp_positions(steps: np.ndarray) -> np.ndarray:
    low, high = float(steps.min()), float(steps.max())
    if high <= low:
        return np.full(steps.shape, 0.5, dtype=np.float32)
    return ((steps - low) / (high - low)).astype(np.float32)


def _validate(
    image: np.ndarray, boxes: Sequence[Box], steps: Sequence[int], exits: Sequence[str], side: int
) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape [H, W, 3], got {image.shape}")
    if not len(boxes):
        raise ValueError("step map needs at least one tile")
    if not len(boxes) == len(steps) == len(exits):
        raise ValueError(
            f"boxes, steps and exits must have equal lengths, got "
            f"{len(boxes)}, {len(steps)}, {len(exits)}"
        )
    unknown = sorted({e for e in exits if e not in EXIT_KINDS})
    if unknown:
        raise ValueError(f"unknown exit kinds {unknown}; expected one of {EXIT_KINDS}")
    if side < 16:
        raise ValueError(f"max_side must be at least 16, got {side}")


def _map_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Big images shrink to ``max_side``; small ones grow (in blocks) to ``_MIN_SIDE``, so that
    a map of a thumbnail is not a few pixels above a legend hundreds of pixels wide."""
    long_side = max(height, width)
    target = max(min(long_side, max_side), min(_MIN_SIDE, max_side))
    scale = target / long_side
    return max(1, min(max_side, round(height * scale))), max(1, min(max_side, round(width * scale)))


def _tile_centres(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ys = np.clip(arr[:, [0, 2]], 0, height)
    xs = np.clip(arr[:, [1, 3]], 0, width)
    return np.stack([ys.mean(axis=1), xs.mean(axis=1)], axis=1)


def _nearest_centre_labels(
    centres: np.ndarray, full_size: tuple[int, int], map_size: tuple[int, int]
) -> np.ndarray:
    (height, width), (h, w) = full_size, map_size
    # Pixel centres of the small map in the full image's coordinates.
    ys = (np.arange(h, dtype=np.float64) + 0.5) * (height / h)
    xs = (np.arange(w, dtype=np.float64) + 0.5) * (width / w)
    best = np.full((h, w), np.inf)
    labels = np.zeros((h, w), dtype=np.int32)
    for k, (cy, cx) in enumerate(centres):
        dist = ((ys - cy) ** 2)[:, None] + ((xs - cx) ** 2)[None, :]
        closer = dist < best
        best[closer] = dist[closer]
        labels[closer] = k
    return labels


def _cells(labels: np.ndarray, count: int) -> _Cells:
    h, w = labels.shape
    flat = labels.ravel()
    yy, xx = np.divmod(np.arange(h * w), w)
    y_min = np.full(count, h, dtype=np.int64)
    x_min = np.full(count, w, dtype=np.int64)
    y_max = np.full(count, -1, dtype=np.int64)
    x_max = np.full(count, -1, dtype=np.int64)
    np.minimum.at(y_min, flat, yy)
    np.minimum.at(x_min, flat, xx)
    np.maximum.at(y_max, flat, yy)
    np.maximum.at(x_max, flat, xx)
    return _Cells(labels, y_min, y_max, x_min, x_max)


def _grayscale_base(image: np.ndarray, h: int, w: int) -> np.ndarray:
    weights = LUMA_601
    if np.issubdtype(image.dtype, np.integer):
        # uint8 / uint16 output canvases: shrink first, so no full-size float copy is made
        eight = image if image.dtype == np.uint8 else (image // 257).astype(np.uint8)
        small_rgb = Image.fromarray(eight).resize((w, h), Image.Resampling.BOX)
        luma = (np.asarray(small_rgb, dtype=np.float32) / 255.0) @ weights
        return np.clip(luma, 0.0, 1.0) * 255.0
    luma = np.clip(image, 0.0, 1.0).astype(np.float32) @ weights
    small = Image.fromarray(luma).resize((w, h), Image.Resampling.BOX)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0) * 255.0


def _border_mask(labels: np.ndarray) -> np.ndarray:
    mask = np.zeros(labels.shape, dtype=bool)
    mask[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    mask[1:, :] |= labels[1:, :] != labels[:-1, :]
    return mask


def _saturated_corner_mask(cells: _Cells, saturated: np.ndarray) -> np.ndarray:
    labels = cells.labels
    h, w = labels.shape
    cell_side = np.minimum(cells.y_max - cells.y_min, cells.x_max - cells.x_min) + 1
    marker = np.clip(cell_side // 5, 4, 14)
    dy = np.arange(h)[:, None] - cells.y_min[labels]
    dx = np.arange(w)[None, :] - cells.x_min[labels]
    return saturated[labels] & (dy + dx < marker[labels])


def _paint_map(
    gray: np.ndarray, cells: _Cells, colours: np.ndarray, saturated: np.ndarray
) -> np.ndarray:
    labels = cells.labels
    rgb = (1.0 - _COLOUR_OPACITY) * gray[:, :, None] + _COLOUR_OPACITY * colours[labels]
    border = _border_mask(labels)
    rgb[border] = (1.0 - _BORDER_OPACITY) * rgb[border] + _BORDER_OPACITY * _BORDER_RGB
    rgb[_saturated_corner_mask(cells, saturated)] = _SATURATED_RGB
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _label_cells(draw: ImageDraw.ImageDraw, cells: _Cells, steps: np.ndarray, font: Font) -> None:
    for k, count in enumerate(steps):
        if cells.y_max[k] < 0:
            continue
        text = str(int(count))
        tw, th = _text_size(draw, text, font)
        cell_w = int(cells.x_max[k] - cells.x_min[k] + 1)
        cell_h = int(cells.y_max[k] - cells.y_min[k] + 1)
        if cell_w < tw + 8 or cell_h < th + 8:
            continue
        cx = (cells.x_min[k] + cells.x_max[k] + 1) / 2
        cy = (cells.y_min[k] + cells.y_max[k] + 1) / 2
        draw.text(
            (cx, cy),
            text,
            font=font,
            fill=(255, 255, 255),
            anchor="mm",
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )


def _caption(steps: np.ndarray, saturated: np.ndarray) -> str:
    early = int(saturated.sum())
    return (
        f"steps per tile (min {int(steps.min())}, median {float(np.median(steps)):g}, "
        f"max {int(steps.max())}; {early} of {len(steps)} tiles exited early)"
    )


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and _text_size(draw, trial, font)[0] > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current] if current else lines


def _legend(width: int, steps: np.ndarray, saturated: np.ndarray, font: Font) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag0", font)[1] + 4
    caption = _wrap(probe, _caption(steps, saturated), font, width - 2 * _PAD)
    key = "corner mark = tile stopped early (saturated); the rest ran to t = 0"
    key_lines = _wrap(probe, key, font, width - 3 * _PAD - line_h)
    bar_h = max(10, line_h)
    height = _PAD + bar_h + _PAD + line_h * (len(caption) + len(key_lines)) + _PAD
    legend = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    low_text, high_text = str(int(steps.min())), str(int(steps.max()))
    low_w = _text_size(draw, low_text, font)[0]
    high_w = _text_size(draw, high_text, font)[0]
    bar_x0 = _PAD + low_w + _PAD
    bar_x1 = max(bar_x0 + 1, width - _PAD - high_w - _PAD)
    # With equal steps everywhere a full ramp would suggest a range that is not there.
    positions = np.linspace(0.0, 1.0, bar_x1 - bar_x0)
    ramp = step_colours(positions if steps.max() > steps.min() else np.full_like(positions, 0.5))
    bar = np.broadcast_to(ramp[None, :, :], (bar_h, bar_x1 - bar_x0, 3))
    legend.paste(Image.fromarray(np.round(bar).astype(np.uint8)), (bar_x0, _PAD))
    mid = _PAD + bar_h / 2
    draw.text((_PAD, mid), low_text, font=font, fill=(0, 0, 0), anchor="lm")
    draw.text((width - _PAD, mid), high_text, font=font, fill=(0, 0, 0), anchor="rm")
    y = _PAD + bar_h + _PAD
    for line in caption:
        draw.text((_PAD, y), line, font=font, fill=(0, 0, 0))
        y += line_h
    marker = line_h - 4
    corner_rgb = tuple(int(v) for v in _SATURATED_RGB)
    draw.polygon([(_PAD, y), (_PAD + marker, y), (_PAD, y + marker)], fill=corner_rgb)
    for line in key_lines:
        draw.text((2 * _PAD + line_h, y), line, font=font, fill=(80, 80, 80))
        y += line_h
    return legend


def render_step_map(
    image: np.ndarray,
    boxes: Sequence[Box],
    steps: Sequence[int],
    exits: Sequence[str],
    *,
    max_side: int = 1024,
) -> Image.Image:
    """Draw the per-tile step counts over a grayscale copy of ``image`` with a legend below.

    ``image`` is float32 [H, W, 3] in [0, 1] (or uint8 / uint16); ``boxes`` are (y0, x0, y1,
    x1) in its pixels (they may overlap or extend past the edge); ``steps[k]`` and
    ``exits[k]`` describe tile k.
    """
    image = np.asarray(image)
    _validate(image, boxes, steps, exits, max_side)
    step_arr = np.asarray(steps, dtype=np.int64)
    saturated = np.asarray([e == "saturated" for e in exits], dtype=bool)
    height, width = image.shape[:2]
    h, w = _map_size(height, width, max_side)
    centres = _tile_centres(boxes, height, width)
    labels = _nearest_centre_labels(centres, (height, width), (h, w))
    cells = _cells(labels, len(step_arr))
    colours = step_colours(_ramp_positions(step_arr))
    painted = _paint_map(_grayscale_base(image, h, w), cells, colours, saturated)
    font = _font(int(np.clip(max(h, w) / 64, 10, 16)))
    step_map = Image.fromarray(painted)
    _label_cells(ImageDraw.Draw(step_map), cells, step_arr, font)
    canvas_w = max(w, min(_LEGEND_MIN_WIDTH, max_side))
    legend = _legend(canvas_w, step_arr, saturated, font)
    canvas = Image.new("RGB", (canvas_w, h + legend.height), (255, 255, 255))
    canvas.paste(step_map, (0, 0))
    canvas.paste(legend, (0, h))
    return canvas


def save_step_map(
    path: str | Path,
    image: np.ndarray,
    boxes: Sequence[Box],
    steps: Sequence[int],
    exits: Sequence[str],
    *,
    max_side: int = 1024,
) -> Path:
    """Render the step map and write it atomically to ``path`` (format from the suffix)."""
    writer = step_map_writer(path, image, boxes, steps, exits, max_side=max_side)
    return write_files_atomic([(path, writer, "step map")])[0]


def step_map_writer(
    path: str | Path,
    image: np.ndarray,
    boxes: Sequence[Box],
    steps: Sequence[int],
    exits: Sequence[str],
    *,
    max_side: int = 1024,
) -> Writer:
    """The rendered step map for ``write_files_atomic``."""
    fmt = format_for_path(path)
    picture = render_step_map(image, boxes, steps, exits, max_side=max_side)
    return pil_writer(picture, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
