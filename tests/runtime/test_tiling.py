from __future__ import annotations

import numpy as np
import pytest

from adadiff.errors import ConfigError, NumericsError
from adadiff.runtime.tiling import (
    TileGrid,
    axis_starts,
    decode_rows,
    gaussian_weights,
    merge_tiles,
    tiled_decode,
)


@pytest.mark.parametrize("length", [1, 37, 128, 129, 200, 512, 1000, 1031])
@pytest.mark.parametrize(("tile", "overlap"), [(128, 32), (64, 0), (512, 64)])
def test_axis_starts_cover_and_are_flush(length, tile, overlap):
    starts = axis_starts(max(length, tile), tile, overlap)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0
    assert starts[-1] + tile == max(length, tile)
    steps = np.diff(starts)
    assert np.all(steps <= tile - overlap)


def test_grid_pads_small_images_and_crops_back():
    grid = TileGrid(height=50, width=300, tile=128, overlap=32, multiple=4)
    assert grid.padded_height == 128 and grid.padded_width == 300
    img = np.random.default_rng(0).random((50, 300, 3)).astype(np.float32)
    padded = grid.pad(img)
    assert padded.shape == (128, 300, 3)
    np.testing.assert_array_equal(grid.crop(padded), img)
    # reflect, not zeros: the row after the last is the one before it
    np.testing.assert_array_equal(padded[50], img[48])
    tiles = grid.extract(padded)
    assert tiles.shape == (len(grid), 3, 128, 128)
    assert all(x % 4 == 0 and y % 4 == 0 for y, x in grid.origins())


def test_grid_pads_narrow_images_too():
    """The width pads like the height: up to one tile, whatever the other side needs."""
    grid = TileGrid(height=300, width=50, tile=128, overlap=32, multiple=4)
    assert grid.padded_height == 300 and grid.padded_width == 128
    img = np.random.default_rng(0).random((300, 50, 3)).astype(np.float32)
    padded = grid.pad(img)
    assert padded.shape == (300, 128, 3)
    np.testing.assert_array_equal(padded[:, 50], img[:, 48])
    assert grid.extract(padded).shape == (len(grid), 3, 128, 128)


def test_grid_rejects_bad_tiling():
    with pytest.raises(ConfigError, match="positive"):
        TileGrid(height=0, width=10, tile=64, overlap=0)
    with pytest.raises(ConfigError, match="overlap"):
        TileGrid(height=10, width=10, tile=64, overlap=64)
    with pytest.raises(ConfigError, match="multiples"):
        TileGrid(height=10, width=10, tile=64, overlap=6, multiple=4)


@pytest.mark.parametrize(("height", "width"), [(242, 128), (128, 242)])
def test_scaling_refuses_a_grid_that_does_not_divide_either_way(height, width):
    """A width that the factor does not divide lost its last column of tiles (3 -> 2) instead
    of being refused, as a height like it is."""
    grid = TileGrid(height=height, width=width, tile=128, overlap=16)
    with pytest.raises(ConfigError, match="cannot be divided by 4"):
        grid.scaled(4)


def test_scaled_grid_has_the_same_tiles_in_latent_units():
    grid = TileGrid(height=300, width=200, tile=128, overlap=32, multiple=4)
    latent = grid.scaled(4)
    assert (latent.tile, latent.overlap) == (32, 8)
    assert [(4 * y, 4 * x) for y, x in latent.origins()] == grid.origins()


def test_gaussian_weights_positive_and_symmetric():
    for size in (8, 31, 64):
        w = gaussian_weights(size)
        assert w.shape == (size, size)
        assert np.all(w > 0)
        np.testing.assert_array_equal(w, w.T)
        np.testing.assert_allclose(w, w[::-1, ::-1])


def test_tiles_fade_into_each_other_without_a_seam():
    grid = TileGrid(height=128, width=240, tile=128, overlap=16)
    assert grid.xs == (0, 112)
    tiles = np.stack([np.zeros((1, 128, 128)), np.ones((1, 128, 128))]).astype(np.float32)
    row = merge_tiles(tiles, grid)[0, 64]
    assert row[0] == 0.0 and row[-1] == 1.0
    # A linear cross-fade over the 16 overlapping columns steps by 1/16 per column; a plain
    # Gaussian (0.14 at the edge) jumps by 0.3 where the second tile begins.
    assert np.abs(np.diff(row)).max() < 1.5 / 16


def test_merging_a_constant_returns_it():
    grid = TileGrid(height=300, width=200, tile=128, overlap=32, multiple=4).scaled(4)
    tiles = np.full((len(grid), 4, grid.tile, grid.tile), 0.37, np.float32)
    merged = merge_tiles(tiles, grid)
    assert merged.shape == (4, grid.padded_height, grid.padded_width)
    np.testing.assert_allclose(merged, 0.37, rtol=1e-6)


def test_merge_refuses_tiles_that_do_not_fit_the_grid():
    grid = TileGrid(height=70, width=90, tile=32, overlap=8)
    with pytest.raises(ValueError, match="do not fit"):
        merge_tiles(np.zeros((len(grid), 2, 16, 16), np.float32), grid)
    with pytest.raises(ValueError, match="do not fit"):
        merge_tiles(np.zeros((len(grid) - 1, 2, 32, 32), np.float32), grid)


def test_merge_recovers_an_image_cut_into_tiles():
    grid = TileGrid(height=70, width=90, tile=32, overlap=8)
    img = (
        np.random.default_rng(1)
        .random((grid.padded_height, grid.padded_width, 2))
        .astype(np.float32)
    )
    merged = merge_tiles(grid.extract(img), grid)
    np.testing.assert_allclose(merged, img.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)


def test_tiled_decode_matches_whole_decode_for_a_local_decoder():
    latent = np.random.default_rng(2).random((4, 40, 56)).astype(np.float32)

    def decode(batch):  # a per-position decoder, so tiling must not change anything
        return np.repeat(np.repeat(batch[:, :3] * 2 - 1, 4, axis=2), 4, axis=3)

    calls = []
    out = tiled_decode(
        latent,
        lambda b: calls.append(len(b)) or decode(b),
        tile=16,
        overlap=4,
        factor=4,
        max_batch=3,
    )
    np.testing.assert_allclose(out, decode(latent[None])[0], rtol=1e-5, atol=1e-6)
    assert max(calls) <= 3


@pytest.mark.parametrize(("height", "width", "tile", "multiple"), [(37, 50, 16, 4), (9, 5, 16, 4)])
def test_padded_rows_are_rows_of_the_padded_image(height, width, tile, multiple):
    image = np.random.default_rng(3).random((height, width, 3)).astype(np.float32)
    grid = TileGrid(height=height, width=width, tile=tile, overlap=4, multiple=multiple)
    padded = grid.pad(image)
    asked = []
    for y in grid.ys:
        rows = grid.padded_rows(lambda a, b: asked.append(b - a) or image[a:b], y, y + tile)
        np.testing.assert_array_equal(rows, padded[y : y + tile])
    assert max(asked) <= max(tile, height)


def test_decode_rows_stream_equals_whole_canvas_and_holds_little():
    latent = np.random.default_rng(4).random((4, 48, 40)).astype(np.float32)

    def decode(batch):
        base = np.repeat(np.repeat(batch[:, :3] * 2 - 1, 4, axis=2), 4, axis=3)
        return base + 0.1 * np.sin(np.arange(base.size, dtype=np.float32)).reshape(base.shape)

    from adadiff.runtime.tiling import decode_rows

    seen = []
    bands = list(
        decode_rows(
            latent,
            decode,
            tile=16,
            overlap=4,
            factor=4,
            max_batch=2,
            progress=lambda *a: seen.append(a),
        )
    )
    whole = tiled_decode(latent, decode, tile=16, overlap=4, factor=4, max_batch=2)
    assert [first for first, _ in bands] == list(
        np.cumsum([0] + [len(r[0]) for _, r in bands[:-1]])
    )
    np.testing.assert_array_equal(np.concatenate([r for _, r in bands], axis=1), whole)
    assert len(bands) > 1 and max(r.shape[1] for _, r in bands) < whole.shape[1]
    assert seen[-1] == ("decode", 12, 12)


def test_merging_holds_little_more_than_its_result():
    import tracemalloc

    from adadiff.runtime.tiling import TileGrid, merge_tiles

    grid = TileGrid(height=512, width=512, tile=64, overlap=16)
    tiles = np.ones((len(grid), 4, 64, 64), dtype=np.float32)
    tracemalloc.start()
    merged = merge_tiles(tiles, grid)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert merged.dtype == np.float32 and np.allclose(merged, 1.0, atol=1e-6)
    assert peak < 1.6 * merged.nbytes  # a float64 accumulator and quotient took over 5x


def _upsampling_decoder(batch: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(batch[:, :3] * 2 - 1, 4, axis=2), 4, axis=3)


@pytest.mark.parametrize("shape", [(4, 12, 40), (4, 40, 12)])
def test_tiled_decode_refuses_a_latent_smaller_than_its_tile(shape):
    latent = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="smaller than the decode tile 16"):
        tiled_decode(latent, _upsampling_decoder, tile=16, overlap=4, factor=4, max_batch=2)


def test_tiled_decode_refuses_a_decoder_that_returns_nan():
    latent = np.zeros((4, 16, 16), np.float32)

    def decode(batch):
        out = _upsampling_decoder(batch)
        out[0, 0, 0, 0] = np.nan
        return out

    with pytest.raises(NumericsError, match="VAE decoder returned NaN"):
        tiled_decode(latent, decode, tile=16, overlap=4, factor=4, max_batch=2)


def test_decode_rows_hands_rows_out_as_soon_as_no_later_tile_covers_them():
    """With one tile row per batch, the rows above the second tile row are out after the first
    call: nothing is held back a row of tiles longer than it must be."""
    latent = np.random.default_rng(4).random((4, 48, 40)).astype(np.float32)
    grid = TileGrid(height=48, width=40, tile=16, overlap=4)
    calls = []
    bands = decode_rows(
        latent,
        lambda b: calls.append(len(b)) or _upsampling_decoder(b),
        tile=16,
        overlap=4,
        factor=4,
        max_batch=grid.cols,
    )
    first, rows = next(bands)
    assert calls == [grid.cols]
    assert first == 0 and rows.shape[1] == grid.ys[1] * 4
