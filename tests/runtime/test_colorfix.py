from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from adadiff.config import ColorFixConfig, ModelConfig
from adadiff.errors import ConfigError, ShapeError
from adadiff.runtime.colorfix import color_fix, color_fix_rows, low_band, reach


def wavelet_fix(image: np.ndarray, reference: np.ndarray, levels: int) -> np.ndarray:
    return color_fix(image, reference, ColorFixConfig(kind="wavelet", levels=levels))


def _smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth image in [0.2, 0.8]: its low band is most of it."""
    return 0.2 + 0.6 * low_band(rng.random(shape, dtype=np.float32), 4)


def test_low_band_keeps_constants_and_removes_detail():
    flat = np.full((32, 48, 3), 0.3, np.float32)
    np.testing.assert_allclose(low_band(flat, 5), flat, atol=1e-6)
    checker = (np.indices((32, 48)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, axis=2)
    assert np.ptp(low_band(checker, 3)[4:-4, 4:-4]) < 0.01 < np.ptp(checker)


def test_low_band_replicates_edges_and_reaches_as_far_as_reach_says():
    top = np.zeros((5, 4, 1), np.float32)
    top[0] = 1.0
    # [1, 2, 1] / 4 with the edge row repeated above it
    np.testing.assert_allclose(low_band(top, 1)[:, 0, 0], [0.75, 0.25, 0.0, 0.0, 0.0])
    impulse = np.zeros((41, 41, 1), np.float32)
    impulse[20, 20] = 1.0
    for levels in (1, 3):
        config = ColorFixConfig(kind="wavelet", levels=levels)
        rows = np.flatnonzero(low_band(impulse, levels)[:, 20, 0])
        assert rows.tolist() == list(range(20 - reach(config), 20 + reach(config) + 1))


def test_the_corrected_image_is_clipped_to_the_unit_range():
    image = np.random.default_rng(3).random((16, 16, 3), dtype=np.float32)
    for level, bound in ((1.0, "max"), (0.0, "min")):
        fixed = wavelet_fix(image, np.full_like(image, level), 2)
        assert getattr(fixed, bound)() == level and fixed.min() >= 0.0 and fixed.max() <= 1.0


def test_tile_wide_colour_offset_is_removed_exactly():
    rng = np.random.default_rng(0)
    reference = _smooth(rng, (64, 64, 3))
    shifted = reference + np.array([0.02, -0.03, 0.05], np.float32)
    np.testing.assert_allclose(wavelet_fix(shifted, reference, 5), reference, atol=1e-5)


def test_detail_comes_from_the_image_and_low_band_from_the_reference():
    rng = np.random.default_rng(1)
    image = _smooth(rng, (2, 64, 64, 3))  # a batch axis in front works too
    reference = _smooth(rng, (2, 64, 64, 3))
    fixed = wavelet_fix(image, reference, 3)
    np.testing.assert_allclose(fixed - low_band(fixed, 3), image - low_band(image, 3), atol=0.02)
    before = np.abs(low_band(image, 3) - low_band(reference, 3)).mean()
    after = np.abs(low_band(fixed, 3) - low_band(reference, 3)).mean()
    # the low band is a blur, not a projection, so one pass leaves a little of the old colour
    assert after < 0.2 * before


def test_none_returns_the_image_and_shapes_must_match():
    image = np.random.default_rng(2).random((16, 16, 3), dtype=np.float32)
    assert color_fix(image, image[::-1], ColorFixConfig()) is image
    with pytest.raises(ShapeError, match="one shape"):
        wavelet_fix(image, image[:8], 2)


def test_config_validates_and_round_trips(tiny_config):
    with pytest.raises(ConfigError, match="kind"):
        ColorFixConfig(kind="adain")
    with pytest.raises(ConfigError, match="levels"):
        ColorFixConfig(kind="wavelet", levels=0)
    cfg = replace(tiny_config, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    assert ModelConfig.from_dict(cfg.to_dict()).color_fix == ColorFixConfig(
        kind="wavelet", levels=3
    )
    older = tiny_config.to_dict()
    del older["color_fix"]  # configs written before the option existed load without it
    assert ModelConfig.from_dict(older).color_fix.kind == "none"


def test_upscaler_output_takes_the_inputs_low_band(tiny_models, photo):
    from adadiff.engines.torch import TorchBackend
    from adadiff.imageio import bicubic_upscale
    from adadiff.runtime import Upscaler

    fixed_cfg = replace(tiny_models.config, color_fix=ColorFixConfig(kind="wavelet", levels=5))
    plain_cfg = replace(tiny_models.config, color_fix=ColorFixConfig())
    outs = {}
    for name, cfg in (("plain", plain_cfg), ("fixed", fixed_cfg)):
        up = Upscaler(cfg, TorchBackend(tiny_models), max_batch=8)
        outs[name], report = up.upscale(photo, schedule="uniform", interval=200, seed=0)
        assert report.color_fix == cfg.color_fix.kind
    ref = bicubic_upscale(photo, tiny_models.config.upscale)
    low_err = {k: np.abs(low_band(v, 5) - low_band(ref, 5)).mean() for k, v in outs.items()}
    # random weights decode far from the input; the correction brings most of the colour back
    assert low_err["fixed"] < 0.2 * low_err["plain"]


@pytest.mark.parametrize(("band", "min_rows"), [(7, 5), (40, 256), (3, 1)])
def test_color_fix_in_bands_equals_whole_image(band, min_rows):
    rng = np.random.default_rng(5)
    image = rng.random((150, 40, 3), dtype=np.float32)
    reference = _smooth(rng, (150, 40, 3))
    config = ColorFixConfig(kind="wavelet", levels=4)
    asked = []

    def reference_rows(a, b):
        asked.append(b - a)
        return reference[a:b]

    bands = ((y, image[y : y + band]) for y in range(0, 150, band))
    out = list(color_fix_rows(bands, reference_rows, config, 150, min_rows=min_rows))
    whole = color_fix(image, reference, config)
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in out]), whole)
    assert [y for y, _ in out] == list(np.cumsum([0] + [len(r) for _, r in out[:-1]]))
    if min_rows < 100:
        assert max(asked) < 150  # never the whole reference at once


def test_color_fix_in_bands_refuses_gaps_and_a_short_image():
    image = np.random.default_rng(7).random((150, 8, 3), dtype=np.float32)
    config = ColorFixConfig(kind="wavelet", levels=2)

    def fix(starts, height):
        bands = ((y, image[y : y + 10]) for y in starts)
        return list(color_fix_rows(bands, lambda a, b: image[a:b], config, height, min_rows=5))

    with pytest.raises(ValueError, match="expected row 10, got 12"):
        fix([0, 12], 150)
    with pytest.raises(ValueError, match="end at row 140, short of the height 150"):
        fix(range(0, 140, 10), 150)


def test_bicubic_rows_are_rows_of_the_whole_upscale():
    from adadiff.imageio import bicubic_rows, bicubic_upscale

    rgb = np.random.default_rng(6).random((23, 31, 3), dtype=np.float32)
    whole = bicubic_upscale(rgb, 4)
    for y0, y1 in [(0, 5), (3, 40), (50, 92), (91, 92), (0, 92)]:
        np.testing.assert_array_equal(bicubic_rows(rgb, 4, y0, y1), whole[y0:y1])
    with pytest.raises(ValueError, match="rows"):
        bicubic_rows(rgb, 4, 10, 93)
