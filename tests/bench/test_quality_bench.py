"""benchmarks.quality: blocks, intervals, targets, and a run end to end on the seeded tiny."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from adadiff.artifacts import weights_digest
from benchmarks import quality
from benchmarks.report import ci


def test_blocks_cover_every_whole_block_row_by_row():
    image = np.arange(300 * 260 * 3, dtype=np.float32).reshape(300, 260, 3)
    got = quality.blocks(image, 128)
    assert got.shape == (4, 128, 128, 3)  # 2 rows x 2 columns; the rest is not a whole block
    np.testing.assert_array_equal(got[1], image[:128, 128:256])
    np.testing.assert_array_equal(got[2], image[128:256, :128])


def test_a_block_reproduced_exactly_keeps_the_psnr_mean_finite(metric_cache):
    from adadiff.quality.metrics import PSNR_CAP_DB

    rng = np.random.default_rng(0)
    hr = np.full((128, 256, 3), 0.5, dtype=np.float32)  # a flat left block, a textured right one
    hr[:, 128:] = rng.random((128, 128, 3), dtype=np.float32)
    sr = hr.copy()
    sr[:, 128:] = np.clip(sr[:, 128:] + 0.05, 0, 1)
    scores = quality.BlockScorer()(sr, hr)
    assert scores["psnr"][0] == PSNR_CAP_DB and np.isfinite(scores["psnr"].mean())
    assert scores["psnr"][1] < 40


def test_readme_needs_a_saved_json(tmp_path, monkeypatch, capsys):
    def no_run(_args):
        raise AssertionError("the quality benchmark ran with arguments it should have refused")

    monkeypatch.setattr(quality, "run", no_run)
    with pytest.raises(SystemExit, match="--readme needs --out"):
        quality.main(["--readme", "README.md"])
    with pytest.raises(SystemExit, match="--images needs --out"):
        quality.main(["--images"])
    # a README that cannot take the section is refused before the run, not after it
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    out = tmp_path / "never"
    assert quality.main(["--out", str(out), "--readme", str(plain)]) == 2
    assert "quality:start" in capsys.readouterr().err
    assert not out.exists()


def test_render_refuses_a_missing_readme_in_one_line(tmp_path, capsys):
    saved = str(Path(quality.__file__).parent / "reference" / "quality-cpu" / "quality.json")
    missing = tmp_path / "nowhere" / "README.md"
    assert quality.main(["--render", saved, "--readme", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adadiff bench quality: error: --readme") and str(missing) in err
    assert len(err.splitlines()) == 1


def test_interval_weights_photos_equally_and_holds_the_mean():
    big = np.full(100, 0.2)
    small = np.array([0.4, 0.6])
    mean, low, high = quality.interval([big, small])
    assert mean == pytest.approx((0.2 + 0.5) / 2)  # not the pooled block mean (about 0.206)
    assert low < mean < high
    const = quality.interval([np.full(5, 0.3), np.full(7, 0.1)])
    assert const == pytest.approx((0.2, 0.2, 0.2))


def _results(model_lpips, bicubic_lpips, dpsnr, real_below):
    def entry(lp, bic, dp):
        return {
            "model": {"lpips": {"pooled": (lp, lp, lp)}},
            "model_minus_bicubic": {
                "lpips": {"pooled": (lp - bic,) * 3},
                "psnr": {"pooled": (dp,) * 3},
            },
        }

    return {
        "bicubic": entry(model_lpips, bicubic_lpips, dpsnr),
        "realworld": entry(0.3, 0.3 + real_below, 0.0),
    }


def test_targets_are_the_issue_bounds():
    met = quality.targets(_results(0.29, 0.42, -1.4, 0.21))
    assert all(m["met"] for m in met.values()) and len(met) == 4
    missed = quality.targets(_results(0.31, 0.42, -1.6, 0.19))
    assert [m["met"] for m in missed.values()] == [False, False, False, False]
    assert missed["bicubic: LPIPS at least 0.12 below bicubic"]["value"] == pytest.approx(0.11)
    # "at most" and "within" include the bound itself
    at = quality.targets(_results(0.30, 0.42, -1.5, 0.21))
    assert at["bicubic: LPIPS at most 0.30"]["met"]
    assert at["bicubic: PSNR within 1.5 dB of bicubic"]["met"]


def test_quality_runs_on_a_model_folder_and_renders(tmp_path, tiny_dir, metric_cache):
    out = tmp_path / "q"
    argv = ["--model", str(tiny_dir), "--photos", "astronaut,gravel", "--max-side", "256"]
    assert quality.main([*argv, "--out", str(out), "--threads", "1", "--images"]) == 0
    result = json.loads((out / "quality.json").read_text())
    assert set(result["results"]) == {"bicubic", "realworld"}
    assert result["weights_digest"] == weights_digest(tiny_dir)  # what `train card` checks
    for entry in result["results"].values():
        assert entry["blocks"] == {"astronaut": 4, "gravel": 4}
        for method in ("bicubic", "model"):
            low_mean_high = entry[method]["lpips"]["pooled"]
            assert low_mean_high[1] <= low_mean_high[0] <= low_mean_high[2]
            assert set(entry[method]["lpips"]["per_photo"]) == {"astronaut", "gravel"}
        diff = entry["model_minus_bicubic"]["lpips"]["pooled"][0]
        assert diff == pytest.approx(
            entry["model"]["lpips"]["pooled"][0] - entry["bicubic"]["lpips"]["pooled"][0]
        )
    # The realworld input is blurred and compressed: bicubic of it is worse than of plain x4.
    r = result["results"]
    assert (
        r["realworld"]["bicubic"]["lpips"]["pooled"][0]
        > r["bicubic"]["bicubic"]["lpips"]["pooled"][0]
    )
    assert result["timing"]["seconds_per_tile"] > 0 and len(result["targets"]) == 4
    # The VAE round trip of the originals: scored like the outputs, one entry per photo.
    ceiling = result["vae_round_trip"]
    assert set(ceiling["psnr"]["per_photo"]) == {"astronaut", "gravel"}
    low_mean_high = ceiling["lpips"]["pooled"]
    assert 0.0 < low_mean_high[1] <= low_mean_high[0] <= low_mean_high[2]
    assert (out / "images" / "vae-round-trip-gravel.png").is_file()
    # Only the gallery regions inside the 256 px centre crops are drawn.
    assert set(result["gallery"]) == {"bicubic", "realworld"}
    assert (out / result["gallery"]["bicubic"]).is_file()
    assert (out / "images" / "realworld-gravel-model.png").is_file()

    # The model card quotes the same figures.
    from adadiff.training.ship import quality_section

    card = "\n".join(quality_section(result))
    bic = result["results"]["bicubic"]["model"]["lpips"]["pooled"][0]
    assert f"| bicubic x4 | model | {bic:.3f} (" in card and "s per tile with 1 torch" in card
    assert f"| none | the original through this VAE | {low_mean_high[0]:.3f} (" in card

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{quality.START}\nold\n{quality.END}\n")
    assert quality.main(["--render", str(out / "quality.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| Gaussian blur 2 px, bicubic x4, JPEG 60 | model |" in text
    assert "![gallery bicubic](q/gallery-bicubic.png)" in text
    assert f"| none | the original through {tiny_dir}'s VAE | {low_mean_high[0]:.3f} (" in text
    # crops are said to be crops, and a model card, which quotes whole photos, refuses them
    assert result["max_side"] == 256 and "centre crops of at most 256 px" in text
    from adadiff.errors import ConfigError
    from adadiff.training.ship import evaluation_lines

    with pytest.raises(ConfigError, match="--max-side 256"):
        evaluation_lines(result, None)
    # Four columns: bicubic, model, original, VAE round trip.
    from PIL import Image

    with Image.open(out / result["gallery"]["bicubic"]) as im:
        assert im.width == 4 * 256 + 5 * 4


def test_vae_round_trip_keeps_the_shape_and_range(tiny_models):
    hr = np.random.default_rng(0).random((64, 96, 3), dtype=np.float32)
    out = quality.vae_round_trip(tiny_models, hr)
    assert out.shape == hr.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_vae_round_trip_pads_to_the_vae_scale_factor(tiny_config):
    # An 8x VAE (as SD-2.1's) on a photo 4 px more than a multiple of 8, whole and in pieces
    # with a 4 px wide last piece: the round trip keeps the photo's shape.
    import dataclasses

    from adadiff.models.bundle import build_random

    vae = {
        **tiny_config.vae,
        "block_out_channels": [16, 32, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    models = build_random(dataclasses.replace(tiny_config, vae=vae), seed=0)
    assert models.config.vae_scale_factor == 8
    hr = np.random.default_rng(2).random((84, 68, 3), dtype=np.float32)
    whole = quality.vae_round_trip(models, hr)
    assert whole.shape == hr.shape and whole.min() >= 0.0 and whole.max() <= 1.0
    pieces = quality.vae_round_trip(models, hr, whole_up_to=64, tile=32)
    assert pieces.shape == hr.shape
    np.testing.assert_allclose(
        pieces[:32, 64:], quality.vae_round_trip(models, np.ascontiguousarray(hr[:32, 64:]))
    )


def test_a_large_photo_goes_through_the_vae_in_pieces(tiny_models):
    hr = np.random.default_rng(1).random((96, 160, 3), dtype=np.float32)
    whole = quality.vae_round_trip(tiny_models, hr)
    assert np.array_equal(quality.vae_round_trip(tiny_models, hr, whole_up_to=160), whole)
    pieces = quality.vae_round_trip(tiny_models, hr, whole_up_to=128, tile=64)
    assert pieces.shape == hr.shape
    # each piece is the round trip of that crop alone, edge pieces included
    for y, x in ((0, 0), (0, 128), (64, 64), (64, 128)):
        crop = np.ascontiguousarray(hr[y : y + 64, x : x + 64])
        np.testing.assert_allclose(
            pieces[y : y + 64, x : x + 64], quality.vae_round_trip(tiny_models, crop), atol=1e-6
        )


def _png(path, size=(160, 136), seed=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_photos_takes_sets_names_files_and_folders(tmp_path):
    sources, label = quality.photo_sources("astronaut,gravel")
    assert [(s.name, s.path) for s in sources] == [("astronaut", None), ("gravel", None)]
    assert label == "named"
    holdout, label = quality.photo_sources("holdout")
    assert label == "holdout" and all(s.path is None for s in holdout) and holdout
    a = _png(tmp_path / "mine" / "b.png")
    _png(tmp_path / "mine" / "a.jpg")
    (tmp_path / "mine" / "notes.txt").write_text("not an image")
    _png(tmp_path / "mine" / "deeper" / "c.png")  # subfolders are not searched
    other = _png(tmp_path / "elsewhere" / "b.png")  # the same stem as mine/b.png
    sources, label = quality.photo_sources(f"{tmp_path / 'mine'},{other},astronaut")
    assert label == "files"
    assert [(s.name, s.path) for s in sources] == [
        ("a", tmp_path / "mine" / "a.jpg"),
        ("b", a),
        ("b-2", other),  # no output may overwrite another's
        ("astronaut", None),
    ]


def test_photos_refuses_what_it_cannot_score(tmp_path, capsys):
    with pytest.raises(quality.InputImageError, match="no such file or folder"):
        quality.photo_sources(str(tmp_path / "missing.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(quality.InputImageError, match=r"no \.png"):
        quality.photo_sources(str(tmp_path / "empty"))
    with pytest.raises(quality.InputImageError, match="names no photo"):
        quality.photo_sources(",")
    with pytest.raises(quality.InputImageError, match="named twice"):
        quality.photo_sources("astronaut,gravel,astronaut")
    with pytest.raises(quality.InputImageError, match="astronaut: named twice"):
        quality.photo_sources("holdout,astronaut")  # the set holds it already
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(quality.InputImageError, match="neither an image file nor a folder"):
        quality.photo_sources(str(fifo))
    small = _png(tmp_path / "small.png", size=(300, 100))
    sources, _ = quality.photo_sources(str(small))
    with pytest.raises(quality.InputImageError, match=r"300x100 px.*at least 128 px"):
        quality.check_sources(sources, None)
    big = _png(tmp_path / "big.png", size=(300, 200))
    sources, _ = quality.photo_sources(str(big))
    quality.check_sources(sources, None)
    with pytest.raises(quality.InputImageError, match="120x120 px"):
        quality.check_sources(sources, 120)
    # Over --max-pixels (60,000 here): refused at the check, and the message's advice works.
    sources, _ = quality.photo_sources(str(big), max_pixels=50_000)
    with pytest.raises(quality.InputImageError, match="--max-pixels 60000"):
        quality.check_sources(sources, None)
    sources, _ = quality.photo_sources(str(big), max_pixels=60_000)
    quality.check_sources(sources, None)
    # From the command line: one line saying why, exit status 2, nothing written; a bad model
    # or schedule is refused before the output folder is made too.
    out = tmp_path / "q"
    assert quality.main(["--photos", f"{big},{small}", "--out", str(out)]) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()
    assert quality.main(["--photos", f"{big}", "--model", "no-such-model", "--out", str(out)]) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()
    argv = ["--photos", f"{big}", "--schedule", "adaptive", "--interval", "5", "--out", str(out)]
    assert quality.main(argv) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()


def test_photos_names_every_file_once_and_apart(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    a = _png(mine / "IMG_1.jpg")
    (mine / "._IMG_1.JPG").write_bytes(b"macOS sidecar, not an image")
    (mine / ".hidden.png").write_bytes(b"")
    b = _png(tmp_path / "other" / "img_1.png")  # differs from IMG_1 in letter case only
    gravel = _png(tmp_path / "gravel.png")
    sources, label = quality.photo_sources(f"{mine},{a},{b},{gravel},gravel,validation")
    assert label == "files"
    assert [(s.name, s.path) for s in sources] == [
        ("IMG_1", a),  # given by its folder and by itself: scored once
        ("img_1-2", b),
        ("gravel-2", gravel),  # the project's gravel keeps its name, whatever the order
        ("gravel", None),
        ("grass", None),
        ("rocket", None),
    ]

    # A folder that cannot be listed: one line saying so.
    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(quality.Path, "iterdir", refuse)
    with pytest.raises(quality.InputImageError, match=r"cannot list the input folder .*mine"):
        quality.photo_sources(str(mine))


def test_quality_runs_on_your_own_files(tmp_path, tiny_dir, metric_cache):
    from PIL import Image

    from adadiff.training.data import load_photo

    folder = tmp_path / "photos"
    folder.mkdir()
    # what --max-side 256 keeps of the 512 px astronaut: its centre
    centre = load_photo("astronaut")[128:384, 128:384]
    Image.fromarray(np.round(centre * 255).astype(np.uint8)).save(folder / "portrait.png")
    Image.fromarray(np.round(centre[:, ::-1] * 255).astype(np.uint8)).save(folder / "flip.jpg")
    out = tmp_path / "q"
    argv = ["--model", str(tiny_dir), "--threads", "1"]
    assert quality.main([*argv, "--photos", str(folder), "--out", str(out), "--images"]) == 0
    result = json.loads((out / "quality.json").read_text())
    assert result["photo_set"] == "files" and result["photos"] == ["flip", "portrait"]
    assert result["files"] == {
        "flip": str(folder / "flip.jpg"),
        "portrait": str(folder / "portrait.png"),
    }
    for entry in result["results"].values():
        assert entry["blocks"] == {"flip": 4, "portrait": 4}
    assert result["gallery"] == {}  # the gallery's regions belong to the project's photos
    assert (out / "images" / "bicubic-portrait-model.png").is_file()
    # The same pixels score the same, named or given as a (lossless) file.
    named = tmp_path / "named"
    argv += ["--photos", "astronaut", "--max-side", "256", "--out", str(named)]
    assert quality.main(argv) == 0
    by_name = json.loads((named / "quality.json").read_text())
    for degradation, entry in result["results"].items():
        for method in ("bicubic", "model"):
            for key in ("lpips", "psnr"):
                got = entry[method][key]["per_photo"]["portrait"][0]
                want = by_name["results"][degradation][method][key]["per_photo"]["astronaut"][0]
                assert got == pytest.approx(want, rel=1e-5), (degradation, method, key)


def test_a_file_as_out_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    def no_run(_args):
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr(quality, "run", no_run)
    plain = tmp_path / "a-file"
    plain.write_text("")
    assert quality.main(["--out", str(plain)]) == 2
    assert f"--out {plain} is a file; give a folder" in capsys.readouterr().err


def test_one_block_per_photo_resamples_the_photos_and_one_block_alone_has_no_interval():
    # --max-side 128: one block per photo, drawn every time, gave zero-width intervals
    mean, low, high = quality.interval([np.array([0.2]), np.array([0.3]), np.array([0.4])])
    assert mean == pytest.approx(0.3) and low < mean < high
    assert quality.interval([np.array([0.3])]) == (0.3, None, None)
    assert ci((0.3, None, None)) == "0.300 (interval unavailable)"
    one_each = {
        "photos": ["astronaut", "gravel"],
        "results": {"bicubic": {"blocks": {"astronaut": 1, "gravel": 1}}},
    }
    assert quality._resampled(one_each).endswith("resampling photos (one block each)")
    one = {"photos": ["astronaut"], "results": {"bicubic": {"blocks": {"astronaut": 1}}}}
    assert quality._resampled(one).startswith("no intervals")
