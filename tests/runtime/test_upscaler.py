from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from adadiff.engines.torch import TorchBackend
from adadiff.errors import ConfigError
from adadiff.runtime.stream import StreamItem
from adadiff.runtime.upscaler import Upscaler


@pytest.fixture(scope="module")
def upscaler(tiny_models):
    return Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=8)


def test_adaptive_upscale_report(upscaler, photo):
    img = photo[:40, :56]
    out, rep = upscaler.upscale(img, schedule="adaptive", seed=0)
    assert out.shape == (160, 224, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert rep.output_size == (224, 160)
    assert rep.tiles == len(rep.steps_per_tile) == len(rep.exits) == len(rep.boxes)
    assert rep.tiles == rep.grid[0] * rep.grid[1] == 4
    assert rep.unet_evaluations == sum(rep.steps_per_tile)
    assert rep.engine_calls == len(rep.batches)
    assert sum(b["size"] for b in rep.batches) == rep.unet_evaluations
    assert all(b["size"] <= 8 for b in rep.batches)
    assert set(rep.exits) <= {"t0", "saturated"}
    assert rep.components["unet"]["calls"] == rep.engine_calls
    assert rep.components["mmle"]["items"] == rep.unet_evaluations
    assert set(rep.seconds) == {"encode", "denoise", "decode", "total"}
    data = rep.to_dict()
    assert data["mean_batch"] == pytest.approx(rep.unet_evaluations / rep.engine_calls, abs=1e-3)
    # the numbers the policy ran with, as adadiff.json holds them, and the config they belong to
    cfg = upscaler.config.to_dict()
    assert data["dtss"] == {**cfg["dtss"], "metrics": cfg["mmle"]["metrics"]}
    assert data["config_digest"] == upscaler.config.digest() != ""
    json.loads(json.dumps(data))


def test_the_report_tells_a_recalibrated_config_apart(tiny_models, photo):
    """Two reports of one model name with other DTSS numbers read the same before; only the
    adaptive run carries the policy numbers (a uniform run has none to report)."""
    cfg = replace(tiny_models.config, dtss=replace(tiny_models.config.dtss, tau=0.02))
    up = Upscaler(cfg, TorchBackend(tiny_models), max_batch=8)
    _, rep = up.upscale(photo[:32, :32], schedule="adaptive", seed=0)
    assert rep.dtss is not None and rep.dtss["tau"] == 0.02
    assert rep.config_digest == cfg.digest() != tiny_models.config.digest()
    _, rep = up.upscale(photo[:32, :32], schedule="uniform", interval=200)
    assert rep.dtss is None and rep.config_digest == cfg.digest()


def test_uniform_schedule_counts(upscaler, photo):
    _, rep = upscaler.upscale(photo[:32, :32], schedule="uniform", interval=20)
    assert rep.steps_per_tile == [50] * rep.tiles
    assert rep.exits == ["t0"] * rep.tiles
    assert rep.rounds == 50
    assert rep.engine_calls == 50 * -(-rep.tiles // 8)
    assert "mmle" not in rep.components  # the uniform baseline runs no scorer


def test_max_batch_does_not_change_the_output(tiny_models, photo):
    img = photo[:36, :36]
    outs = []
    for mb in (1, 8):
        up = Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=mb)
        out, rep = up.upscale(img, schedule="uniform", interval=100, seed=3)
        outs.append((out, rep))
    (a, ra), (b, rb) = outs
    assert ra.engine_calls > rb.engine_calls
    assert ra.steps_per_tile == rb.steps_per_tile
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_seed_changes_output_and_is_reproducible(upscaler, photo):
    img = photo[:32, :32]
    a, _ = upscaler.upscale(img, schedule="uniform", interval=100, seed=1)
    b, _ = upscaler.upscale(img, schedule="uniform", interval=100, seed=1)
    c, _ = upscaler.upscale(img, schedule="uniform", interval=100, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_a_numpy_seed_goes_into_the_report_json(upscaler, photo):
    import json

    _, report = upscaler.upscale(
        photo[:16, :16], schedule="uniform", interval=500, seed=np.int64(3)
    )
    assert json.loads(json.dumps(report.to_dict()))["seed"] == 3


def test_a_numpy_interval_goes_into_the_report_json(upscaler, photo):
    import json

    _, report = upscaler.upscale(photo[:16, :16], schedule="uniform", interval=np.int64(500))
    assert json.loads(json.dumps(report.to_dict()))["interval"] == 500


def test_seeds_that_would_share_noise_words_are_refused(upscaler, photo):
    # noise is seeded with the 32-bit words of (seed, tile): seed 2**32 at tile 0 would be seed 0
    # at tile 1, so the largest seed taken is 2**32 - 1
    img = photo[:16, :16]
    top, _ = upscaler.upscale(img, schedule="uniform", interval=500, seed=2**32 - 1)
    assert top.shape == (64, 64, 3)
    for bad in (2**32, 2**32 + 5, -1):
        with pytest.raises(ConfigError, match="seed must be a whole number from 0 to 2"):
            upscaler.upscale(img, schedule="uniform", interval=500, seed=bad)


def test_pil_in_pil_out(upscaler, photo):
    pil = Image.fromarray((photo[:20, :24] * 255).astype(np.uint8))
    out, rep = upscaler.upscale(pil, schedule="uniform", interval=250)
    assert isinstance(out, Image.Image) and out.size == (96, 80)
    assert rep.input_size == (24, 20)


def test_a_pil_image_is_upscaled_upright_as_the_cli_reads_its_file(upscaler, photo, tmp_path):
    from adadiff.imageio import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # a portrait photo stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray((photo[:12, :20] * 255).astype(np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    with Image.open(tmp_path / "r.jpg") as img:
        out, _ = upscaler.upscale(img, schedule="uniform", interval=500)
    assert out.size == (48, 80)  # 20x12 as shown, times 4
    upright, _ = upscaler.upscale(load_image(tmp_path / "r.jpg").rgb, schedule="uniform",
                                  interval=500)  # fmt: skip
    assert np.array_equal(np.asarray(out), (upright * 255).round().astype(np.uint8))


def test_integer_outputs_are_the_float_output_rounded(upscaler, photo):
    """uint8 / uint16 (and so every PIL and PNG output) round to the nearest level: truncating
    would darken every image by up to a level."""
    img = photo[:20, :24]
    ref, _ = upscaler.upscale(img, schedule="uniform", interval=250)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        got, _ = upscaler.upscale(img, schedule="uniform", interval=250, dtype=dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, np.round(ref * float(top)).astype(dtype))


def test_the_encoder_sees_tiles_in_minus_one_to_one(upscaler, monkeypatch):
    """SD's VAE takes [-1, 1]: black must reach it as -1 and white as 1."""
    encoder = upscaler.components.vae_encoder
    real, seen = encoder.encode, []

    def spy(images):
        seen.append((float(images.min()), float(images.max())))
        return real(images)

    monkeypatch.setattr(encoder, "encode", spy)
    for level, want in ((0.0, -1.0), (1.0, 1.0)):
        seen.clear()
        upscaler.upscale(np.full((12, 20, 3), level, np.float32), schedule="uniform", interval=500)
        assert seen and all(lo == hi == want for lo, hi in seen), seen


def test_unknown_schedule(upscaler, photo):
    with pytest.raises(ConfigError, match="schedule"):
        upscaler.upscale(photo, schedule="fast")
    # the name is what is wrong, not the interval that came with it
    with pytest.raises(ConfigError, match=r"schedule must be one of .* got 'Uniform'"):
        upscaler.upscale(photo, schedule="Uniform", interval=5)


def test_bad_dtype_interval_and_grouping_are_refused_before_any_tile_runs(upscaler, photo):
    stages: list[str] = []

    def heard(stage, done, total):
        stages.append(stage)

    with pytest.raises(ConfigError, match="dtype must be"):
        upscaler.upscale(photo, dtype=np.float64, progress=heard)
    for interval in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="interval must be a whole number"):
            upscaler.upscale(photo, schedule="uniform", interval=interval, progress=heard)
    with pytest.raises(ConfigError, match=r"interval 5000 is over 999.*from 1 to 999"):
        upscaler.upscale(photo, schedule="uniform", interval=5000, progress=heard)
    with pytest.raises(ConfigError, match=r"grouping must be one of .*'regroup'.*got 'tiles'"):
        upscaler.upscale(photo, grouping="tiles", progress=heard)
    assert stages == []  # nothing was encoded, let alone denoised
    _, report = upscaler.upscale(photo[:16, :16], schedule="uniform", interval=np.int64(500))
    assert report.interval == 500 and report.steps_per_tile == [2]
    _, report = upscaler.upscale(photo[:16, :16], schedule="uniform", interval=999)
    assert report.steps_per_tile == [1]


def test_threads_take_any_whole_number_type():
    from adadiff.threads import check_threads

    assert check_threads(np.int64(1)) == 1 and type(check_threads(np.int64(1))) is int
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ConfigError, match="threads must be"):
            check_threads(bad)


def test_a_refused_max_batch_closes_the_backend_it_opened(monkeypatch, tiny_config):
    """Engines with batch profiles refuse a larger --max-batch; the opened backend is closed."""
    from adadiff.engines import factory
    from adadiff.errors import ConfigError
    from adadiff.runtime.upscaler import Upscaler

    class Profiled:
        name, max_batch, closed = "profiled", 4, False

        def close(self) -> None:
            self.closed = True

    opened = Profiled()
    monkeypatch.setattr(factory, "make_backend", lambda *a, **k: (tiny_config, opened))
    with pytest.raises(ConfigError, match="--max-batch 16 is larger"):
        Upscaler.from_pretrained("tiny", max_batch=16)
    assert opened.closed


def test_max_batch_is_refused_below_one_and_taken_up_to_the_engines_limit(monkeypatch, tiny_models):
    from adadiff.engines import factory

    with pytest.raises(ConfigError, match="max_batch must be >= 1, got 0"):
        Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=0)

    class Profiled:
        name, max_batch = "profiled", 4

    monkeypatch.setattr(factory, "make_backend", lambda *a, **k: (tiny_models.config, Profiled()))
    assert Upscaler.from_pretrained("tiny", max_batch=4).max_batch == 4


def test_close_closes_every_engine_the_run_opened(tiny_dir):
    up = Upscaler.from_pretrained(tiny_dir, threads=1)
    up.upscale(np.zeros((16, 16, 3), np.float32))
    engines = [facade.engine for facade in up.components._open.values()]
    assert {e.spec.name for e in engines} >= {"unet", "vae_encoder", "vae_decoder"}
    up.close()
    assert all(e.module is None for e in engines) and not up.components._open


def test_adaptive_runs_on_tiles_of_eight_latent_px_or_less(photo):
    """MMLE pools such a tile to one position; its spread was NaN, which PFJ carried into every
    latent, and the image decoded black."""
    up = Upscaler.from_pretrained("tiny", tile_size=32, tile_overlap=8, threads=1)  # latent 8
    out, rep = up.upscale(photo[:8, :8], schedule="adaptive", seed=0)
    assert np.isfinite(out).all() and out.max() > 0.2
    assert rep.tiles == 1 and rep.unet_evaluations > 1


def test_a_closed_upscaler_lets_go_of_its_models_and_says_so_on_reuse(tiny_dir):
    up = Upscaler.from_pretrained(tiny_dir, threads=1)
    up.upscale(np.zeros((16, 16, 3), np.float32), schedule="uniform", interval=500)
    up.close()
    assert up.backend.models is None
    with pytest.raises(ConfigError, match="was closed"):
        up.upscale(np.zeros((16, 16, 3), np.float32))


def test_a_stream_reads_each_input_once_even_from_a_reused_buffer(tiny_models, photo):
    """A frame reader fills one buffer per frame: each image keeps the colours of its own
    (the colour fix reads the input again after denoising)."""
    from dataclasses import replace

    from adadiff.config import ColorFixConfig
    from adadiff.runtime.stream import StreamItem, upscale_many

    config = replace(tiny_models.config, color_fix=ColorFixConfig(kind="wavelet", levels=3))
    upscaler = Upscaler(config, TorchBackend(tiny_models), max_batch=8)

    frames = [photo[:32, :32], 1.0 - photo[:32, :32]]
    alone = [upscaler.upscale(f, schedule="uniform", interval=250, seed=0)[0] for f in frames]
    buffer = np.empty_like(frames[0])

    def reader():
        for k, frame in enumerate(frames):
            buffer[:] = frame
            yield StreamItem(k, buffer, schedule="uniform", interval=250)

    results = {r.key: r for r in upscale_many(upscaler, reader(), target_tiles=64)}
    assert sorted(results) == [0, 1]  # every frame came back
    for key, result in results.items():
        assert result.error is None
        np.testing.assert_allclose(result.image, alone[key], atol=1e-4)


def test_a_failed_round_fails_its_images_and_the_stream_goes_on(upscaler, photo, monkeypatch):
    from adadiff.errors import NumericsError
    from adadiff.runtime.stream import ImageStream, StreamItem

    stream = ImageStream(upscaler, target_tiles=1, cross_image=False)
    real = stream.step
    calls = {"n": 0}

    def first_fails():
        calls["n"] += 1
        if calls["n"] == 1:
            raise NumericsError("the UNet returned NaN")
        return real()

    monkeypatch.setattr(stream, "step", first_fails)
    items = [StreamItem(k, photo[:16, :16], schedule="uniform", interval=500) for k in "abc"]
    # a bad seed is refused at admission, before its image is encoded
    items.insert(1, StreamItem("bad", photo[:16, :16], seed=-1))
    results = {r.key: r for r in stream.run(items)}
    assert isinstance(results["a"].error, NumericsError)
    assert "seed must be" in str(results["bad"].error)
    assert results["b"].error is None and results["c"].error is None
    assert results["c"].image.shape == (64, 64, 3)


def test_gray_and_transparent_arrays(upscaler, photo):
    gray = photo[:24, :24].mean(axis=2)
    out, _ = upscaler.upscale(gray, schedule="uniform", interval=500)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    # colour under transparent pixels is filled from the visible ones, as for PIL images
    rgba = np.zeros((24, 24, 4), dtype=np.float32)
    rgba[:, :12, 0], rgba[:, :12, 3] = 0.8, 1.0
    from adadiff.imageio import to_rgb_array

    assert to_rgb_array(rgba)[:, 12:, 0].min() > 0.7
    from adadiff.errors import InputImageError

    with pytest.raises(InputImageError, match="divide it by 255"):
        upscaler.upscale(photo[:16, :16] * 255, schedule="uniform", interval=500)


def test_an_image_the_pool_failed_comes_back_as_its_own_error(upscaler, photo):
    from adadiff.errors import NumericsError
    from adadiff.runtime.stream import ImageStream, StreamItem

    stream = ImageStream(upscaler, target_tiles=64)
    for key in "ab":
        stream.add(StreamItem(key, photo[:16, :16], schedule="uniform", interval=500))
    # what TilePool.round does with an image whose rows went NaN: it leaves the pool
    del stream.pool.members["b"]
    stream.pool.failed["b"] = NumericsError("the UNet returned NaN")
    results = {r.key: r for _ in range(4) for r in stream.step()}
    assert isinstance(results["b"].error, NumericsError)
    assert results["a"].error is None and stream.idle and not stream.pool.failed


def _items(photo, keys, interval=500):
    return [StreamItem(k, photo[:16, :16], schedule="uniform", interval=interval) for k in keys]


def test_a_stream_refuses_target_tiles_below_one_and_a_key_already_in_flight(upscaler, photo):
    from adadiff.runtime.stream import ImageStream

    with pytest.raises(ValueError, match="target_tiles must be >= 1, got 0"):
        ImageStream(upscaler, target_tiles=0)
    stream = ImageStream(upscaler)
    first, again = _items(photo, "aa")
    assert stream.add(first) is None
    refused = stream.add(again)
    assert "'a' is already in the stream" in str(refused.error)
    results = [r for _ in range(2) for r in stream.step()]  # the image in flight goes on
    assert [r.key for r in results] == ["a"] and results[0].error is None


def test_a_stream_keeps_target_tiles_active_and_cross_image_false_one_image(upscaler, photo):
    from adadiff.runtime.stream import ImageStream

    # three one-tile images of one step each: two share a call, then the third runs alone
    pooled = ImageStream(upscaler, target_tiles=2)
    assert all(r.error is None for r in pooled.run(_items(photo, "abc", 999)))
    assert (pooled.stats.unet_calls, pooled.stats.unet_evaluations) == (2, 3)
    alone = ImageStream(upscaler, cross_image=False)
    assert all(r.error is None for r in alone.run(_items(photo, "abc", 999)))
    assert (alone.stats.unet_calls, alone.stats.mean_batch) == (3, 1.0)


def test_leaving_a_run_early_drops_its_images_and_one_run_at_a_time(upscaler, photo):
    from adadiff.runtime.stream import ImageStream

    stream = ImageStream(upscaler, target_tiles=2)
    first = stream.run(_items(photo, "a", 999) + _items(photo, "bc"))
    assert next(first).key == "a"  # one step; "b" takes two
    with pytest.raises(RuntimeError, match="already running"):
        next(stream.run(_items(photo, "x")))
    first.close()  # the caller broke out of its loop with "b" in flight
    assert stream.idle and not stream.running and stream.pool.active_tiles == 0
    assert [r.key for r in stream.run(_items(photo, "d"))] == ["d"]


def test_stream_results_report_full_denoise_progress_and_no_shared_component_log(upscaler, photo):
    from adadiff.runtime.stream import ImageStream

    heard: dict = {}
    stream = ImageStream(
        upscaler, progress=lambda k, s, d, t: heard.setdefault((k, s), []).append((d, t))
    )
    results = list(stream.run(_items(photo, "ab")))
    assert all(r.error is None and r.report.components == {} for r in results)
    for key in "ab":
        done, total = heard[key, "denoise"][-1]
        assert done == total > 0


def test_a_stream_on_a_closed_upscaler_says_so(tiny_models, photo):
    from adadiff.runtime.stream import ImageStream

    up = Upscaler(tiny_models.config, TorchBackend(tiny_models), max_batch=8)
    stream = ImageStream(up)
    assert stream.add(_items(photo, "a")[0]) is None
    up.closed = True  # as close() marks it, keeping the shared test models
    with pytest.raises(ConfigError, match="was closed"):
        stream.step()
