from __future__ import annotations

import argparse

import numpy as np
import pytest

from adadiff.errors import ConfigError, ShapeError
from adadiff.training import data, degrade


@pytest.fixture(scope="session")
def hr() -> np.ndarray:
    return data.load_photo("astronaut")[64:192, 192:320].copy()


def test_degrade_is_deterministic_per_seed_and_quarter_size(hr):
    a = degrade.degrade(hr, np.random.default_rng(7))
    b = degrade.degrade(hr, np.random.default_rng(7))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_different_seeds_differ(hr):
    outputs = [degrade.degrade(hr, np.random.default_rng(s)) for s in range(12)]
    assert all(o.shape == (32, 32, 3) for o in outputs)
    distinct = len({o.tobytes() for o in outputs})
    assert distinct == len(outputs), f"{distinct} different outputs of {len(outputs)} seeds"
    # whichever of the last JPEG and resize ran last, the LR comes out in 8-bit levels
    for lr in outputs:
        np.testing.assert_allclose(lr * 255, np.round(lr * 255), atol=1e-3)
    mild = degrade.degrade(hr[:96, :120], np.random.default_rng(0), degrade.MILD)
    assert mild.shape == (24, 30, 3)


def test_every_branch_of_the_second_order_degradation_runs(hr, monkeypatch):
    """Over 40 seeds: both rounds blur, resize (every mode), add Gaussian and Poisson noise (gray
    and colour) and JPEG; the last stage runs in both orders, with and without its sinc filter."""
    import re

    events: list[str] = []

    def spy(name, token):
        real = getattr(degrade, name)

        def wrapper(*args, **kwargs):
            if name == "resize":
                events.append(f"R:{args[2]}")
            elif "noise" in name:
                events.append(f"N:{token}{'-gray' if kwargs['gray'] else ''}")
            else:
                events.append(token)
            return real(*args, **kwargs)

        monkeypatch.setattr(degrade, name, wrapper)

    for name, token in (
        ("filter2d", "B"),
        ("resize", "R"),
        ("add_gaussian_noise", "gaussian"),
        ("add_poisson_noise", "poisson"),
        ("jpeg", "J"),
    ):
        spy(name, token)
    shapes = re.compile(r"^(B?)R.*?N(.*?)J(B?)R.*?N(.*?)(?:(J)R(B?)|R(B?)(J))$")
    seen: dict[str, set] = {k: set() for k in ("blur1", "blur2", "noise1", "noise2", "end")}
    modes: set[str] = set()
    for seed in range(40):
        events.clear()
        degrade.degrade(hr, np.random.default_rng(seed))
        modes |= {e[2:] for e in events if e.startswith("R:")}
        flat = "".join(e[0] if e[0] in "BRJ" else f"N{e[2:]}" for e in events)
        m = shapes.match(flat)
        assert m, (seed, events)
        seen["blur1"].add(m[1])
        seen["blur2"].add(m[3])
        seen["noise1"].add(m[2])
        seen["noise2"].add(m[4])
        seen["end"].add("jpeg, resize, sinc" if m[5] else "resize, sinc, jpeg")
        seen["end"].add(f"sinc {bool(m[6] or m[7])}")
    assert seen["blur1"] == {"B"} and degrade.REALESRGAN.first.blur.prob == 1.0
    assert seen["blur2"] == {"", "B"}
    for round_ in ("noise1", "noise2"):
        assert seen[round_] == {"gaussian", "gaussian-gray", "poisson", "poisson-gray"}, seen
    assert seen["end"] == {"jpeg, resize, sinc", "resize, sinc, jpeg", "sinc True", "sinc False"}
    assert modes == set(degrade.RESIZE_MODES)


def test_bicubic_x4_keeps_constants_and_shape():
    flat = np.full((40, 24, 3), 0.3, np.float32)
    small = degrade.bicubic_x4(flat)
    assert small.shape == (10, 6, 3)
    np.testing.assert_allclose(small, 0.3, atol=1e-6)


def test_resize_matrices():
    for mode in degrade.RESIZE_MODES:
        for n_in, n_out in ((10, 4), (7, 19), (64, 64)):
            matrix = degrade.resize_matrix(n_in, n_out, mode)
            np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    area = degrade.resize(image, (2, 2), "area")[:, :, 0]
    np.testing.assert_allclose(area, [[2.5, 4.5], [10.5, 12.5]])


def test_kernels_are_normalised_and_symmetric():
    rng = np.random.default_rng(0)
    for _ in range(20):
        kernel = degrade.random_kernel(rng, degrade.BlurConfig())
        assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
        assert kernel.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-12)  # point symmetric
    iso = degrade.anisotropic_kernel(9, 1.5, 1.5, 0.0)
    np.testing.assert_allclose(iso, iso.T, atol=1e-12)
    assert degrade.sinc_kernel(11, np.pi / 2).sum() == pytest.approx(1.0)


def test_resize_samples_half_pixel_centres_with_keys_taps():
    """Halving puts every output midway between two inputs: bilinear averages them, bicubic
    (a = -0.75, no antialiasing) has the fixed taps OpenCV and PyTorch use."""
    bilinear = degrade.resize_matrix(8, 4, "bilinear")
    np.testing.assert_allclose(bilinear[1], [0, 0, 0.5, 0.5, 0, 0, 0, 0], atol=1e-12)
    bicubic = degrade.resize_matrix(8, 4, "bicubic")
    taps = [0, -0.09375, 0.59375, 0.59375, -0.09375, 0, 0, 0]
    np.testing.assert_allclose(bicubic[1], taps, atol=1e-12)


def test_bicubic_x4_is_matlab_style_antialiased_bicubic():
    """Pillow's BICUBIC is the same kernel (a = -0.5, widened by the scale); away from the
    borders, where the two pad differently, they agree."""
    from PIL import Image

    image = np.random.default_rng(0).random((64, 48, 3)).astype(np.float32)
    pil = np.stack(
        [
            np.asarray(Image.fromarray(image[:, :, c]).resize((12, 16), Image.Resampling.BICUBIC))
            for c in range(3)
        ],
        axis=2,
    )
    small = degrade.bicubic_x4(image)
    np.testing.assert_allclose(small[2:-2, 2:-2], np.clip(pil, 0, 1)[2:-2, 2:-2], atol=1e-5)


def test_kernel_shapes_follow_their_formulas(monkeypatch):
    size, sx, sy, theta = 11, 2.5, 1.0, 0.6
    c, s = np.cos(theta), np.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    inverse = np.linalg.inv(rotation @ np.diag([sx**2, sy**2]) @ rotation.T)
    r = np.arange(size) - size // 2
    xx, yy = np.meshgrid(r, r, indexing="xy")
    points = np.stack([xx, yy], axis=-1)
    expected = np.exp(-0.5 * np.einsum("...i,ij,...j->...", points, inverse, points))
    kernel = degrade.anisotropic_kernel(size, sx, sy, theta)
    np.testing.assert_allclose(kernel, expected / expected.sum(), atol=1e-12)
    # the sinc's centre is its limit at r -> 0, cutoff^2 / (4 pi)
    from scipy.special import j1

    cutoff = 2.0
    sinc = degrade.sinc_kernel(9, cutoff)
    ratio = (cutoff**2 / (4 * np.pi)) / (cutoff * j1(cutoff) / (2 * np.pi))
    assert sinc[4, 4] / sinc[4, 5] == pytest.approx(ratio)
    # iso kernels are iso; sinc cutoffs start at pi/3 below 13 px and pi/5 from 13 px, as
    # Real-ESRGAN draws them
    rng = np.random.default_rng(0)
    iso = degrade.BlurConfig(kernel_probs=(1, 0, 0, 0, 0, 0), sinc_prob=0.0)
    for _ in range(10):
        kernel = degrade.random_kernel(rng, iso)
        np.testing.assert_allclose(kernel, kernel.T, atol=1e-12)
    cutoffs: list[float] = []
    real_sinc = degrade.sinc_kernel
    monkeypatch.setattr(
        degrade, "sinc_kernel", lambda n, cut: cutoffs.append(cut) or real_sinc(n, cut)
    )
    for sizes in ((7, 11), (13, 21)):
        cutoffs.clear()
        config = degrade.BlurConfig(kernel_sizes=sizes, sinc_prob=1.0)
        for _ in range(60):
            degrade.random_kernel(rng, config)
        assert (min(cutoffs) >= np.pi / 3) is (sizes[0] < 13)
        assert min(cutoffs) >= np.pi / 5


def test_noise_is_shared_by_the_channels_when_gray_and_poisson_counts_in_powers_of_two():
    image = np.full((16, 16, 3), 0.5, np.float32)
    for add in (degrade.add_gaussian_noise, degrade.add_poisson_noise):
        noise = add(image, np.random.default_rng(0), 0.05, gray=True) - image
        assert np.abs(noise).max() > 0
        np.testing.assert_array_equal(noise[:, :, 0], noise[:, :, 1])
        np.testing.assert_array_equal(noise[:, :, 0], noise[:, :, 2])
    # three distinct 8-bit levels: photon counts are value * 4, the next power of two
    levels = np.array([0.2, 0.4, 0.6], np.float32)[np.arange(48) % 3].reshape(4, 4, 3)
    levels = np.round(levels * 255) / 255
    got = degrade.add_poisson_noise(levels, np.random.default_rng(1), 1.0, gray=False)
    counts = np.random.default_rng(1).poisson(levels * 4.0) / 4.0
    np.testing.assert_allclose(got, np.clip(levels + (counts - levels), 0, 1), atol=1e-6)


def test_the_pipeline_runs_its_steps_in_order_with_each_rounds_numbers(hr, monkeypatch):
    """First round up-scales (its only resize choice), the second keeps the final LR size (it
    is sized from that, not from the image it gets); the last JPEG takes the second round's
    quality; no blur or sinc where their odds are 0."""
    events: list[tuple[str, object]] = []
    for name in ("filter2d", "resize", "jpeg", "add_gaussian_noise", "add_poisson_noise"):
        real = getattr(degrade, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            events.append((_name, args[1] if _name in ("resize", "jpeg") else None))
            return _real(*args, **kwargs)

        monkeypatch.setattr(degrade, name, spy)
    config = degrade.DegradationConfig(
        first=degrade.StageConfig(
            blur=degrade.BlurConfig(prob=0.0),
            resize_probs=(1.0, 0.0, 0.0),
            gaussian_noise_prob=1.0,
            jpeg_quality=(95.0, 95.0),
        ),
        second=degrade.StageConfig(
            blur=degrade.BlurConfig(prob=0.0),
            resize_probs=(0.0, 0.0, 1.0),
            gaussian_noise_prob=1.0,
            jpeg_quality=(30.0, 30.0),
        ),
        final_sinc_prob=0.0,
    )
    final = (hr.shape[0] // 4, hr.shape[1] // 4)
    first_sizes = []
    for seed in range(4):
        events.clear()
        degrade.degrade(hr, np.random.default_rng(seed), config)
        names = [name for name, _ in events]
        assert "filter2d" not in names and "add_poisson_noise" not in names
        assert names.count("add_gaussian_noise") == 2
        sizes = [arg for name, arg in events if name == "resize"]
        first_sizes.append(sizes[0])
        assert sizes[0][0] >= hr.shape[0] and sizes[1:] == [final, final]
        assert [arg for name, arg in events if name == "jpeg"] == [95, 30]
    assert max(size[0] for size in first_sizes) > hr.shape[0]


def test_config_validation():
    with pytest.raises(ConfigError, match="kernel_probs"):
        degrade.BlurConfig(kernel_probs=(0.5, 0.5, 0.5, 0, 0, 0))
    with pytest.raises(ConfigError, match="jpeg_quality"):
        degrade.StageConfig(jpeg_quality=(50, 120))


def test_missing_optional_photos_are_named_once(monkeypatch):
    import logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    real = data._package_dir
    monkeypatch.setattr(data, "_package_dir", lambda p: None if p == "pywt" else real(p))
    data._warn_missing.cache_clear()
    collect = Collect()  # on the logger itself: the train CLI may have stopped its propagation
    logger = logging.getLogger("adadiff.training")
    logger.addHandler(collect)
    try:
        names = {p.name for p in data.training_photos()}
        data.training_photos()
    finally:
        logger.removeHandler(collect)
        data._warn_missing.cache_clear()
    assert "pywt_aero" not in names
    warned = [m for m in collect.messages if "not available here" in m]
    assert len(warned) == 1 and "pywt_aero (package pywt)" in warned[0], warned


def test_holdout_never_in_training():
    training = {p.name for p in data.training_photos()}
    held = {p.name for p in data.holdout_photos()}
    tuned = {p.name for p in data.validation_photos()}
    assert held == set(data.HOLDOUT) and len(held) >= 3
    assert tuned == set(data.VALIDATION) and len(tuned) >= 2  # leave-one-photo-out needs two
    assert not training & held and not training & tuned and not tuned & held
    assert "astronaut" in held  # the demo's photo, a face: reported, never trained on
    from adadiff.training.pairs import evaluation_photos

    assert evaluation_photos("holdout") == data.HOLDOUT
    assert evaluation_photos("validation") == data.VALIDATION
    assert evaluation_photos("gravel,rocket") == ("gravel", "rocket")
    with pytest.raises(argparse.ArgumentTypeError, match="photo names separated by commas"):
        evaluation_photos(",")
    with pytest.raises(argparse.ArgumentTypeError, match="gravel: named twice"):
        evaluation_photos("gravel,rocket,gravel")
    assert len(training) >= 8


def test_no_installed_photo_is_one_clear_error(monkeypatch):
    from adadiff.training import pairs

    monkeypatch.setattr(pairs, "training_photos", tuple)
    with pytest.raises(ConfigError, match="no training photos are installed"):
        pairs.photo_names("train")


def test_an_npz_photo_of_0_to_255_floats_is_scaled_to_0_to_1(tmp_path):
    """load_photo scales an .npz of 0..255 floats (the PyWavelets installed here stores uint8,
    so only this test reaches that branch)."""
    levels = np.tile(np.linspace(0, 255, 8)[None], (8, 1))
    np.savez(tmp_path / "aero.npz", levels)
    photo = data.load_photo(data.Photo("pywt_aero", "pywt", tmp_path / "aero.npz"))
    assert photo.shape == (8, 8, 3)
    np.testing.assert_allclose(photo[..., 0], levels / 255, atol=1e-6)


def test_blur_jpeg_degradation_is_fixed_and_softer_than_bicubic():
    hr = data.load_photo("gravel")[:128, :128]
    lr = degrade.blur_jpeg_x4(hr)
    assert lr.shape == (32, 32, 3) and lr.dtype == np.float32
    np.testing.assert_array_equal(lr, degrade.blur_jpeg_x4(hr))  # no randomness

    def detail(x):
        return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())

    plain = degrade.bicubic_x4(hr)
    assert detail(lr) < 0.8 * detail(plain)
    no_blur = degrade.blur_jpeg_x4(hr, sigma=0.0, quality=60)
    np.testing.assert_array_equal(no_blur, degrade.jpeg(plain, 60))


def test_crop_stream_is_seeded_and_pairs_have_both_modes():
    images = [data.load_photo("astronaut"), data.load_photo("camera")]
    config = data.CropConfig(size=64)
    stream = data.sample_crops(images, np.random.default_rng(3), config)
    first = [next(stream) for _ in range(3)]
    again = data.sample_crops(images, np.random.default_rng(3), config)
    for crop in first:
        np.testing.assert_array_equal(crop, next(again))
        assert crop.shape == (64, 64, 3) and crop.min() >= 0.0 and crop.max() <= 1.0
    lr, hr = data.pair(first[0], np.random.default_rng(0), "realesrgan")
    assert lr.shape == (16, 16, 3) and hr is first[0]
    lr, _ = data.pair(first[0], np.random.default_rng(0), "bicubic")
    assert lr.shape == (16, 16, 3)
    with pytest.raises(ConfigError, match="bicubic"):
        data.pair(first[0], np.random.default_rng(0), "nearest")  # type: ignore[arg-type]


def test_crop_weighting_by_area_or_by_photo():
    big = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)
    small = np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)
    tiny = np.zeros((16, 16, 3), np.float32)  # smaller than a crop: never drawn
    images = [tiny, big, small, np.zeros((16, 300, 3), np.float32)]  # nor one short side

    def share_of_small(weighting: str) -> float:
        config = data.CropConfig(size=64, weighting=weighting, rotations=False, flips=False)
        stream = data.sample_indexed_crops(images, np.random.default_rng(5), config)
        drawn = [next(stream) for _ in range(400)]
        for index, crop in drawn[:20]:
            assert index in (1, 2) and crop.shape == (64, 64, 3)
            if index == 2:  # no geometric augmentation: the crop is the whole small image
                jitter = crop.mean() / small.mean()
                assert 0.8 < jitter < 1.2
        return float(np.mean([index == 2 for index, _ in drawn]))

    assert share_of_small("area") < 0.15  # 64^2 / (256^2 + 64^2) = 0.06
    assert 0.4 < share_of_small("photo") < 0.6
    with pytest.raises(ConfigError, match="weighting"):
        data.CropConfig(weighting="pixels")  # type: ignore[arg-type]


def test_the_demo_says_whether_its_photo_was_trained_on(tmp_path):
    from adadiff import demo
    from adadiff.errors import ModelFolderError
    from adadiff.presets import SHIPPED

    shipped = SHIPPED / "tiny"
    assert demo.role("astronaut", shipped) == "this model never trained on it"  # the default
    assert demo.role("immunohistochemistry", shipped) == "a photo this model was trained on"
    # no record: nothing is claimed (the project's split says nothing of a converted model)
    assert "unknown" in demo.role("immunohistochemistry", tmp_path)
    assert "unknown" in demo.role("astronaut", None)
    assert "random weights" in demo.role("astronaut", None, untrained=True)
    # a record in UTF-16 or with a stage list spelt as a string is damaged, not misread
    for text in ('\ufeff{"photos": {}}'.encode("utf-16"), b'{"photos": {"astronaut": "unet"}}'):
        (tmp_path / "training.json").write_bytes(text)
        with pytest.raises(ModelFolderError, match="not a readable training record"):
            demo.role("astronaut", tmp_path)


def test_the_demo_reads_what_a_model_trained_on_from_its_card(tmp_path):
    from adadiff import demo

    card = tmp_path / "MODEL_CARD.md"
    card.write_text(
        "# m\n\n## Data\n\n| photo | source | licence / statement | used by |\n|---|---|---|---|\n"
        "| astronaut | scikit-image | public domain | vae, unet |\n| rocket | scikit-image | pd "
        "| labels |\n\nHeld out: chelsea.\n\n| other | table |\n|---|---|\n| chelsea | x |\n"
    )
    assert demo.trained_on(tmp_path) == {"astronaut", "rocket"}
    # the card wins over the project's split: this model saw astronaut, a hold-out photo now
    assert demo.role("astronaut", tmp_path) == "a photo this model was trained on"
    assert demo.role("chelsea", tmp_path) == "this model never trained on it"
    assert demo.trained_on(tmp_path / "none") is None
    # by default the demo shows the first of its photos this model never trained on
    assert demo.default_photo(tmp_path) == "chelsea"
    assert demo.default_photo(tmp_path / "none") == "astronaut"
    assert demo.default_photo(None) == "astronaut"


def test_the_shipped_demo_shows_a_photo_its_model_never_saw():
    from adadiff import demo
    from adadiff.training.ship import models_folder

    folder = models_folder("tiny")
    name = demo.default_photo(folder)
    assert name in data.HOLDOUT and name not in (demo.trained_on(folder) or set())
    assert demo.role(name, folder) == "this model never trained on it"


def test_scale_augmentation_shows_more_of_the_photo_at_the_crop_size():
    ramp = np.tile(np.linspace(0, 1, 512, dtype=np.float32)[None, :, None], (512, 1, 3))
    rng = np.random.default_rng(0)
    spans = [np.ptp(data.scaled_crop(ramp, 64, rng, 0.25)[0, :, 0]) for _ in range(50)]
    plain = np.ptp(data.random_crop(ramp, 64, rng)[0, :, 0])
    assert plain == pytest.approx(63 / 511, abs=1e-6)
    # a crop at scale s covers 64 / s px of the ramp: up to 4x the plain span
    assert min(spans) > 0.95 * plain and max(spans) > 2.5 * plain and max(spans) < 4.1 * plain
    crop = data.scaled_crop(ramp, 64, rng, 0.25)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.float32
    assert crop.min() >= 0 and crop.max() <= 1
    # min_scale 1 draws exactly what random_crop draws (older runs stay reproducible)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(data.scaled_crop(ramp, 64, a, 1.0), data.random_crop(ramp, 64, b))
    with pytest.raises(ConfigError, match="min_scale"):
        data.CropConfig(min_scale=0.0)
    # a photo shorter than size / scale gives its whole shorter side, scaled to the crop size
    small = ramp[:80, :100]
    for _ in range(20):
        assert data.scaled_crop(small, 64, rng, 0.25).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 62}, "positive multiple of 4"),
        ({"brightness": 1.0}, r"brightness jitter must be in \[0, 1\)"),
        ({"saturation": -0.1}, r"saturation jitter must be in \[0, 1\)"),
        ({"max_tries": 0}, "max_tries must be >= 1"),
    ],
)
def test_crop_config_refuses_what_no_crop_can_be_drawn_with(options, message):
    with pytest.raises(ConfigError, match=message):
        data.CropConfig(**options)


def test_nearly_flat_crops_are_drawn_again():
    """A photo flat but for a strip at its right edge: most crops miss the strip, and are
    drawn again (up to max_tries) until one has some contrast."""
    image = np.zeros((64, 640, 3), np.float32)
    image[:, -64:] = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    config = data.CropConfig(size=64, flips=False, rotations=False)
    stream = data.sample_crops([image], np.random.default_rng(1), config)
    textured = [float(data._luma(next(stream)).std()) >= config.min_std for _ in range(30)]
    assert np.mean(textured) > 0.7  # without redraws about 64 / 577 of them


def test_augment_flips_and_jitters_saturation():
    crop = 0.3 + 0.4 * np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)  # no clip
    flips = data.CropConfig(size=8, rotations=False, brightness=0, contrast=0, saturation=0)
    rng = np.random.default_rng(1)
    flipped = [np.allclose(data.augment(crop, rng, flips), crop[:, ::-1]) for _ in range(20)]
    assert 0 < sum(flipped) < 20  # about half
    colour = data.CropConfig(size=8, flips=False, rotations=False, brightness=0, contrast=0)
    gray = data._luma(crop)[:, :, None]
    for _ in range(5):  # saturation scales the distance from gray, and keeps the luma
        out = data.augment(crop, rng, colour)
        np.testing.assert_allclose(data._luma(out), gray[:, :, 0], atol=1e-5)
        assert not np.allclose(out, crop, atol=1e-4)


def test_photos_a_crop_fits_keeps_those_exactly_the_crop_size():
    from adadiff.training.pairs import photos_a_crop_fits

    fits, short = np.zeros((64, 64, 3), np.float32), np.zeros((63, 100, 3), np.float32)
    names, images = photos_a_crop_fits(["fits", "short"], [fits, short], 64, stage="unet")
    assert names == ["fits"] and len(images) == 1 and images[0] is fits


def test_a_pair_stream_refuses_a_bad_probability_or_scale():
    from adadiff.training.pairs import PairStream

    images = [np.zeros((64, 64, 3), np.float32)]
    with pytest.raises(ConfigError, match=r"realesrgan_prob must be in \[0, 1\], got 1.5"):
        PairStream(images, np.random.default_rng(0), size=64, realesrgan_prob=1.5)
    with pytest.raises(ConfigError, match="x4 only, got upscale 2"):
        PairStream(images, np.random.default_rng(0), size=64, scale=2)


def test_crops_per_photo_index_their_photo_and_do_not_depend_on_the_next():
    from adadiff.training.pairs import crops_per_photo

    both = crops_per_photo(["camera", "moon"], 2, size=64, seed=0, stream=1)
    assert both.photo.tolist() == [0, 0, 1, 1]
    assert both.hr.shape == (4, 64, 64, 3) and both.lr.shape == (4, 16, 16, 3)
    alone = crops_per_photo(["camera"], 2, size=64, seed=0, stream=1)
    np.testing.assert_array_equal(both.hr[:2], alone.hr)


def test_to_tensor_gives_channels_first_in_minus_one_to_one():
    from adadiff.training.pairs import to_tensor

    images = np.zeros((1, 2, 3, 3), np.float32)
    images[0, :, :, 1] = 1.0
    tensor = to_tensor(images)
    assert tuple(tensor.shape) == (1, 3, 2, 3)
    assert tensor[0, 0].unique().tolist() == [-1.0] and tensor[0, 1].unique().tolist() == [1.0]


def test_a_crop_larger_than_its_image_is_refused_on_either_side():
    rng = np.random.default_rng(0)
    for shape in ((8, 64, 3), (64, 8, 3)):
        with pytest.raises(ShapeError, match="cannot crop 16x16"):
            data.random_crop(np.zeros(shape, np.float32), 16, rng)


def test_mild_strength_degrades_less_than_full_and_streams_use_it(hr):
    from adadiff.training.pairs import PairStream

    assert degrade.strength_config("full") is degrade.REALESRGAN
    assert degrade.strength_config("mild") is degrade.MILD
    with pytest.raises(ConfigError, match="mild"):
        degrade.strength_config("harsh")
    clean = degrade.bicubic_x4(hr)

    def error(config: degrade.DegradationConfig) -> float:
        return float(
            np.mean(
                [
                    np.abs(degrade.degrade(hr, np.random.default_rng(s), config) - clean).mean()
                    for s in range(24)
                ]
            )
        )

    assert error(degrade.MILD) < 0.8 * error(degrade.REALESRGAN)

    def lows(strength: str) -> np.ndarray:
        stream = PairStream(
            [hr], np.random.default_rng(5), size=64, realesrgan_prob=1.0, strength=strength
        )
        return stream.batch(3).lr

    again = lows("mild")
    np.testing.assert_array_equal(lows("mild"), again)
    assert not np.array_equal(lows("full"), again)  # same draws, another pipeline
    with pytest.raises(ConfigError, match="strength"):
        PairStream([hr], np.random.default_rng(5), size=64, strength="harsh")


def test_camera_strength_blurs_and_compresses_with_little_noise(hr):
    assert degrade.strength_config("camera") is degrade.CAMERA
    assert set(degrade.STRENGTH_NOTES) == set(degrade.STRENGTHS)  # the card words every strength
    flat = np.full((128, 128, 3), 0.5, dtype=np.float32)

    def noise(config: degrade.DegradationConfig) -> float:
        return float(
            np.mean(
                [degrade.degrade(flat, np.random.default_rng(s), config).std() for s in range(16)]
            )
        )

    def detail(image: np.ndarray) -> float:
        return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())

    assert noise(degrade.CAMERA) < 0.35 * noise(degrade.REALESRGAN)
    camera = [degrade.degrade(hr, np.random.default_rng(s), degrade.CAMERA) for s in range(16)]
    assert all(lr.shape == (32, 32, 3) for lr in camera)
    assert np.mean([detail(lr) for lr in camera]) < detail(degrade.bicubic_x4(hr))
