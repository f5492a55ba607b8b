"""Synthetic smooth-shading training images: smooth between edges, wired into the UNet stage and
onto the model card (seeding, and the images a stage gets: test_deadleaves.py)."""

from __future__ import annotations

import numpy as np
import pytest

from adadiff.errors import ConfigError
from adadiff.training.shading import NAME_PREFIX, shaded_scene


@pytest.mark.parametrize("seed", range(4))
def test_surfaces_are_smooth_between_few_edges(seed):
    """What the images are for: most of the picture changes slowly (second differences near
    zero, as on lit skin), with a few anti-aliased edges; not texture, not flat."""
    image = shaded_scene(np.random.default_rng(seed), 256)
    assert image.shape == (256, 256, 3) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    luma = image.mean(axis=2).astype(np.float64)
    curvature = np.abs(luma[:, 2:] - 2 * luma[:, 1:-1] + luma[:, :-2])
    assert np.median(curvature) < 0.01  # sensor-noise level at most: smooth almost everywhere
    edges = np.abs(np.diff(luma, axis=1)) > 0.03
    assert 0.0005 < edges.mean() < 0.05  # a few object outlines
    assert luma.std() > 0.03  # shading and objects, not a flat field


def test_the_unet_option_reaches_the_run_and_the_card():
    from adadiff.training.ship import _phase_lines, _photo_rows, _unet_photos
    from adadiff.training.unet import UNetOptions, training_phases

    with pytest.raises(ConfigError, match="shading"):
        UNetOptions(shading=-1)
    from adadiff.training.loop import TrainOptions

    run = TrainOptions(steps=4, batch=2, lr=1e-3)
    first = training_phases(None, run, UNetOptions())
    ckpt = {"step": 5, "summary": {"phases": first}}
    phases = training_phases(ckpt, run, UNetOptions(shading=2))
    assert [p["shading"] for p in phases] == [0, 2]  # a resume that adds them is a new phase
    (line,) = _phase_lines(phases, 9)
    assert "steps 5 to 9: photos drawn equally, 2 shading images among them," in line
    assert _unet_photos({"photos": ["brick"], "phases": phases}) == [
        "brick",
        f"{NAME_PREFIX}0",
        f"{NAME_PREFIX}1",
    ]
    rows, _ = _photo_rows({"unet": ["brick", f"{NAME_PREFIX}0"]})
    assert rows[1].startswith(f"| {NAME_PREFIX}0 | adadiff | made by adadiff")
