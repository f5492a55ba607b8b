"""Overlapping tiles over the upscaled image, one Gaussian weight function, and merging."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from adadiff.errors import ConfigError, NumericsError

SIGMA_FRACTION = 0.25  # Gaussian sigma as a fraction of the tile side


def axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis: stride tile - overlap, the last tile flush with the end."""
    if length <= tile:
        return (0,)
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    return tuple(sorted(set(starts)))


@dataclass(frozen=True)
class TileGrid:
    """Tiles of side ``tile`` over an image of ``height`` x ``width`` (after padding).

    The image is reflect-padded up to at least one tile and to a multiple of ``multiple`` (the VAE
    factor), so every tile start is a whole latent position; ``crop`` undoes the padding.
    """

    height: int
    width: int
    tile: int
    overlap: int
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"image size must be positive, got {self.height}x{self.width}")
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ConfigError(
                f"need 0 <= overlap < tile, got tile {self.tile}, overlap {self.overlap}"
            )
        if self.tile % self.multiple or self.overlap % self.multiple:
            raise ConfigError(
                f"tile {self.tile} and overlap {self.overlap} must be multiples of {self.multiple}"
            )

    @property
    def padded_height(self) -> int:
        return max(self.tile, -(-self.height // self.multiple) * self.multiple)

    @property
    def padded_width(self) -> int:
        return max(self.tile, -(-self.width // self.multiple) * self.multiple)

    @property
    def ys(self) -> tuple[int, ...]:
        return axis_starts(self.padded_height, self.tile, self.overlap)

    @property
    def xs(self) -> tuple[int, ...]:
        return axis_starts(self.padded_width, self.tile, self.overlap)

    @property
    def rows(self) -> int:
        return len(self.ys)

    @property
    def cols(self) -> int:
        return len(self.xs)

    def __len__(self) -> int:
        return self.rows * self.cols

    def origins(self) -> list[tuple[int, int]]:
        """(y, x) of every tile, row-major; tile k keeps index k everywhere."""
        return [(y, x) for y in self.ys for x in self.xs]

    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [(y, x, y + self.tile, x + self.tile) for y, x in self.origins()]

    def scaled(self, factor: int) -> TileGrid:
        """The same grid in units ``factor`` times smaller (pixels -> latent positions)."""
        sides = (self.tile, self.overlap, self.padded_height, self.padded_width)
        if any(side % factor for side in sides):
            raise ConfigError(f"grid {self} cannot be divided by {factor}")
        return TileGrid(
            height=self.padded_height // factor,
            width=self.padded_width // factor,
            tile=self.tile // factor,
            overlap=self.overlap // factor,
            multiple=1,
        )

    def pad(self, image: np.ndarray) -> np.ndarray:
        """Reflect-pad [H, W, C] to the padded size (numpy reflects repeatedly if needed)."""
        ph, pw = self.padded_height - self.height, self.padded_width - self.width
        if ph == 0 and pw == 0:
            return image
        return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")

    def padded_rows(self, rows: Callable[[int, int], np.ndarray], y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of ``pad(image)``, for an image given by ``rows(a, b) = image[a:b]``:
        a band of tiles without the whole (padded) image in memory."""
        index = reflect_index(np.arange(y0, y1), self.height)
        a, b = int(index.min()), int(index.max()) + 1
        strip = rows(a, b)[index - a]
        pw = self.padded_width - self.width
        return strip if pw == 0 else np.pad(strip, ((0, 0), (0, pw), (0, 0)), mode="reflect")

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[: self.height, : self.width]

    def extract(self, image: np.ndarray) -> np.ndarray:
        """[Hp, Wp, C] padded image -> [N, C, tile, tile] tiles."""
        return np.stack(
            [
                image[y : y + self.tile, x : x + self.tile].transpose(2, 0, 1)
                for y, x in self.origins()
            ]
        )


def reflect_index(index: np.ndarray, length: int) -> np.ndarray:
    """Where numpy's ``reflect`` padding takes each index of a padded axis from."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    folded = index % period
    return np.where(folded >= length, period - folded, folded)


@lru_cache(maxsize=16)
def gaussian_weights(size: int) -> np.ndarray:
    """The one blending weight used everywhere: an isotropic Gaussian over a size x size tile,
    lowered by its value half a pixel past the edge so that it fades to zero there.

    A plain Gaussian still weighs 0.14 at the tile's edge, so where a tile begins or ends the
    blend jumps by 30% of the two tiles' difference: a visible seam in flat sky. Lowered, every
    pixel keeps a positive weight (tiles at the image border still count) and the blend moves
    smoothly across the overlap."""
    centre = (size - 1) / 2
    sigma = SIGMA_FRACTION * size
    axis = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
    axis -= np.exp(-0.5 * (size / 2 / sigma) ** 2)
    w = np.outer(axis, axis).astype(np.float32)
    w.setflags(write=False)
    return w


def merge_tiles(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Blend [N, C, tile, tile] tiles of a grid into [C, H, W] with the Gaussian weights."""
    n, c, s, _ = tiles.shape
    if n != len(grid) or s != grid.tile:
        raise ValueError(f"{n} tiles of side {s} do not fit a grid of {len(grid)} x {grid.tile}")
    # float32 throughout: a float64 accumulator and its quotient took 5x the result's memory
    # (672 MB for an 8192 px output's latent), for differences of about 5e-7
    acc = np.zeros((c, grid.padded_height, grid.padded_width), dtype=np.float32)
    norm = np.zeros((grid.padded_height, grid.padded_width), dtype=np.float32)
    w = gaussian_weights(s)
    for (y, x), tile in zip(grid.origins(), tiles, strict=True):
        acc[:, y : y + s, x : x + s] += tile * w
        norm[y : y + s, x : x + s] += w
    acc /= norm
    return acc


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def tiled_decode(
    latent: np.ndarray,
    decode: Callable[[np.ndarray], np.ndarray],
    *,
    tile: int,
    overlap: int,
    factor: int,
    max_batch: int,
) -> np.ndarray:
    """Decode a [C, h, w] latent in overlapping tiles into [3, h * factor, w * factor].

    Pixel tiles are blended with the same Gaussian weights, at pixel resolution. The whole
    image at once; ``decode_rows`` gives it band by band."""
    bands = decode_rows(
        latent, decode, tile=tile, overlap=overlap, factor=factor, max_batch=max_batch
    )
    return np.concatenate([rows for _y, rows in bands], axis=1)


def decode_rows(
    latent: np.ndarray,
    decode: Callable[[np.ndarray], np.ndarray],
    *,
    tile: int,
    overlap: int,
    factor: int,
    max_batch: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """``tiled_decode`` as bands of finished rows, top to bottom: (first row, [3, n, W]).

    Rows above the first tile not decoded yet get nothing more, so only the rows the current
    tiles still cover are held (about two tile rows of the canvas), never the whole canvas.
    ``progress`` hears ``("decode", tiles decoded, tiles)`` before the first batch and after
    each."""
    _c, h, w = latent.shape
    if h < tile or w < tile:
        raise ValueError(f"latent {h}x{w} is smaller than the decode tile {tile}")
    grid = TileGrid(height=h, width=w, tile=tile, overlap=overlap)
    px = tile * factor
    weight = gaussian_weights(px)
    width = w * factor
    acc = np.zeros((3, 0, width), dtype=np.float64)
    norm = np.zeros((0, width), dtype=np.float64)
    base = 0  # the canvas row that acc's first row is
    origins = grid.origins()
    done = 0
    if progress is not None:  # at 0 first: the stage's clock (and ETA) start with its work
        progress("decode", 0, len(origins))
    for group in chunks(origins, max_batch):
        batch = np.stack([latent[:, y : y + tile, x : x + tile] for y, x in group])
        images = decode(np.ascontiguousarray(batch, dtype=np.float32))
        if not np.isfinite(images).all():  # the colour fix's blur would spread it to a black blot
            raise NumericsError(
                "the VAE decoder returned NaN or infinite values; with --precision fp16 or bf16 "
                "try fp32, else check the model's weights"
            )
        for (y, x), img in zip(group, images, strict=True):
            py, pxx = y * factor - base, x * factor
            grow = py + px - acc.shape[1]
            if grow > 0:
                acc = np.concatenate([acc, np.zeros((3, grow, width))], axis=1)
                norm = np.concatenate([norm, np.zeros((grow, width))])
            acc[:, py : py + px, pxx : pxx + px] += img * weight
            norm[py : py + px, pxx : pxx + px] += weight
        done += len(group)
        if progress is not None:
            progress("decode", done, len(origins))
        final = origins[done][0] * factor if done < len(origins) else h * factor
        n = final - base
        if n > 0:
            yield base, (acc[:, :n] / norm[:n]).astype(np.float32)
            acc, norm = acc[:, n:].copy(), norm[n:].copy()
            base = final
