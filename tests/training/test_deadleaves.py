"""Synthetic dead-leaves training images: seeded, natural-looking statistics, wired into the UNet
stage."""

from __future__ import annotations

import numpy as np
import pytest
from training_helpers import opts, small_pool

from adadiff.errors import ConfigError
from adadiff.training.deadleaves import NAME_PREFIX, dead_leaves, dead_leaves_set, with_dead_leaves
from adadiff.training.shading import NAME_PREFIX as SHADING_PREFIX
from adadiff.training.shading import shading_set, with_shading


@pytest.mark.parametrize(
    ("make", "prefix"),
    [(dead_leaves_set, NAME_PREFIX), (shading_set, SHADING_PREFIX)],
    ids=["deadleaves", "shading"],
)
def test_images_depend_on_seed_and_index_only(make, prefix):
    names, first = make(2, seed=4, size=64)
    _, again = make(3, seed=4, size=64)
    _, other = make(1, seed=5, size=64)
    assert names == [f"{prefix}0", f"{prefix}1"]
    np.testing.assert_array_equal(first[1], again[1])  # asking for more does not change image 1
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[0])  # seed and index are not one number
    with pytest.raises(ConfigError, match=">= 0"):
        make(-1)


def test_a_rotated_rectangle_keeps_its_corners():
    from adadiff.training.deadleaves import shape_mask

    for a, b, angle in ((20.0, 20.0, np.pi / 4), (30.0, 12.0, 0.8), (25.0, 10.0, 0.0)):
        mask = shape_mask(150.5, 150.5, a, b, angle, True, 300)[3]
        assert abs(mask.sum() / (4 * a * b) - 1) < 0.05, (a, b, angle, mask.sum())
        ellipse = shape_mask(150.5, 150.5, a, b, angle, False, 300)[3]
        assert abs(ellipse.sum() / (np.pi * a * b) - 1) < 0.05


def test_shapes_cover_the_canvas_at_every_scale():
    image = dead_leaves(np.random.default_rng(0), 256)
    assert image.shape == (256, 256, 3) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    luma = image.mean(axis=2)
    edges = np.abs(np.diff(luma, axis=1)) > 0.05
    # edges everywhere, not a few blobs on a flat background...
    assert 0.05 < edges.mean() < 0.6
    blocks = edges[:, :248].reshape(8, 32, 8, 31).any(axis=(1, 3))
    assert blocks.mean() > 0.9
    # ...and structure at coarse scales too: 4x smaller, the image still has contrast
    coarse = luma.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert coarse.std() > 0.08


@pytest.mark.parametrize(
    ("add", "make", "stage"),
    [(with_dead_leaves, dead_leaves_set, "vae"), (with_shading, shading_set, "unet")],
    ids=["deadleaves", "shading"],
)
def test_a_stage_gets_the_photos_then_the_images_of_its_seed(add, make, stage):
    photo = np.zeros((16, 16, 3), np.float32)
    names, images = add(["p"], [photo], 2, seed=3, stage=stage)
    want_names, want = make(2, seed=3)
    assert names == ["p", *want_names]
    assert images[0] is photo and len(images) == 3
    for got, expected in zip(images[1:], want, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert add(["p"], [photo], 0, seed=3, stage=stage) == (["p"], [photo])


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError, match="size"):
        dead_leaves(np.random.default_rng(0), 8)
    with pytest.raises(ConfigError, match="supersample >= 1"):
        dead_leaves(np.random.default_rng(0), 64, supersample=0)
    with pytest.raises(ConfigError, match=">= 0"):
        dead_leaves_set(-1)


def test_the_unet_stage_trains_on_photos_and_dead_leaves(tmp_path, cfg, vae_workdir, images):
    pytest.importorskip("skimage", reason="the training photos come from scikit-image")
    from adadiff.training.checkpoint import load_latest
    from adadiff.training.pairs import photo_names
    from adadiff.training.unet import UNetOptions, train_unet

    work = tmp_path / "w"
    work.mkdir()
    (work / "vae").symlink_to(vae_workdir / "vae")
    train_unet(cfg, work, opts(1), small_pool(deadleaves=2))
    summary = load_latest(work / "unet", stage="unet")["summary"]
    assert summary["photos"] == [*photo_names("train"), f"{NAME_PREFIX}0", f"{NAME_PREFIX}1"]
    assert summary["phases"][0]["deadleaves"] == 2  # the card says what the UNet saw
    # given images of its own, the caller still gets the dead leaves it asked for
    other = tmp_path / "x"
    other.mkdir()
    (other / "vae").symlink_to(vae_workdir / "vae")
    train_unet(cfg, other, opts(1), small_pool(deadleaves=1), images=images)
    assert load_latest(other / "unet", stage="unet")["summary"]["photos"] == [f"{NAME_PREFIX}0"]
    with pytest.raises(ConfigError, match="deadleaves"):
        UNetOptions(deadleaves=-1)


def test_the_model_card_says_who_made_the_synthetic_images():
    from adadiff.training.ship import PHOTO_LICENCES, _photo_rows

    rows, unrecorded = _photo_rows({"unet": ["brick", f"{NAME_PREFIX}0"], "decoder": []})
    assert unrecorded == ["decoder"]
    assert rows[1].startswith(f"| {NAME_PREFIX}0 | adadiff | made by adadiff")
    assert rows[0].startswith("| brick | ") and PHOTO_LICENCES["brick"] in rows[0]
