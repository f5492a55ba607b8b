"""Tests for adadiff.imageio (loading, checking and saving images) and adadiff.stepmap."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from adadiff.errors import InputImageError, OutputPathError
from adadiff.imageio import (
    LoadedImage,
    bicubic_rows,
    bicubic_upscale,
    check_output_path,
    check_output_size,
    decode_image_bytes,
    exif_fits,
    fill_transparent,
    flatten_on_white,
    has_gray_channels,
    load_image,
    remove_stale_temps,
    save_image,
    to_rgb_array,
    upscale_alpha,
    write_bytes_atomic,
)
from adadiff.stepmap import render_step_map, save_step_map

RNG = np.random.default_rng(1234)


def _rgb_u8(height: int = 12, width: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _write(path: Path, array: np.ndarray, **kwargs: object) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _png_with_size(path: Path, width: int, height: int) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # Signature (8) + IHDR length (4) + b"IHDR" (4), then width and height; CRC covers type+data.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def _reread(path: Path) -> Image.Image:
    """Fully decoded copy of a written file, with the file closed again."""
    with Image.open(path) as image:
        image.load()
        copy = image.copy()
        copy.format = image.format
    return copy


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def test_rgb_png_round_trip_values(tmp_path: Path) -> None:
    pixels = _rgb_u8()
    src = _write(tmp_path / "in.png", pixels)
    loaded = load_image(src)
    assert isinstance(loaded, LoadedImage)
    assert loaded.rgb.dtype == np.float32
    assert loaded.rgb.shape == (12, 16, 3)
    assert loaded.alpha is None
    assert loaded.bit_depth == 8
    assert not loaded.grayscale
    assert loaded.source_mode == "RGB"
    np.testing.assert_allclose(loaded.rgb, pixels / 255.0, atol=1e-7)

    out = save_image(tmp_path / "out.png", loaded.rgb)
    assert out == (tmp_path / "out.png").resolve()
    np.testing.assert_array_equal(np.asarray(_reread(out)), pixels)


@pytest.mark.parametrize(
    ("suffix", "fmt", "atol"),
    [(".jpg", "JPEG", 0.2), (".webp", "WEBP", 0.2), (".tif", "TIFF", 1e-7)],
)
def test_other_formats_load(tmp_path: Path, suffix: str, fmt: str, atol: float) -> None:
    pixels = np.full((20, 30, 3), (200, 100, 50), dtype=np.uint8)
    src = _write(tmp_path / f"in{suffix}", pixels, format=fmt)
    loaded = load_image(src)
    assert loaded.rgb.shape == (20, 30, 3)
    assert loaded.rgb.dtype == np.float32
    assert loaded.rgb.min() >= 0.0 and loaded.rgb.max() <= 1.0
    np.testing.assert_allclose(loaded.rgb, pixels / 255.0, atol=atol)


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, size=(9, 7), dtype=np.uint8)
    loaded = load_image(_write(tmp_path / "gray.png", gray))
    assert loaded.grayscale
    assert loaded.bit_depth == 8
    assert loaded.rgb.shape == (9, 7, 3)
    for c in range(3):
        np.testing.assert_allclose(loaded.rgb[:, :, c], gray / 255.0, atol=1e-7)


def test_16bit_grayscale_full_precision_and_saved_back(tmp_path: Path) -> None:
    values = np.full((6, 5), 40000, dtype=np.uint16)
    values[0, 0] = 1  # invisible at 8 bits
    values[-1, -1] = 65535
    loaded = load_image(_write(tmp_path / "g16.png", values))
    assert loaded.bit_depth == 16
    assert loaded.grayscale
    assert loaded.source_mode.startswith("I")
    assert abs(float(loaded.rgb[2, 2, 1]) - 40000 / 65535) < 1e-6
    assert abs(float(loaded.rgb[0, 0, 0]) - 1 / 65535) < 1e-6
    assert loaded.rgb[-1, -1, 2] == pytest.approx(1.0)

    for suffix in (".png", ".tif"):
        out = save_image(tmp_path / f"back{suffix}", loaded.rgb, bit_depth=16, grayscale=True)
        with Image.open(out) as reread:
            assert reread.mode.startswith("I;16")
            np.testing.assert_array_equal(np.asarray(reread), values)

    eight = save_image(tmp_path / "eight.png", loaded.rgb, bit_depth=8, grayscale=True)
    assert _reread(eight).mode == "L"


def test_16bit_grayscale_big_endian_array(tmp_path: Path) -> None:
    values = np.full((4, 4), 40000, dtype=">u2")
    image = Image.fromarray(values)
    assert image.mode == "I;16B"
    rgb = to_rgb_array(image)
    assert abs(float(rgb[0, 0, 0]) - 40000 / 65535) < 1e-6


def test_an_in_memory_mode_i_image_of_8bit_levels_is_refused(tmp_path: Path) -> None:
    """``convert("I")`` of an "L" image holds 0..255, which read as 16-bit came back black."""
    gray = Image.fromarray(np.array([[0, 100, 255]], np.uint8))
    with pytest.raises(InputImageError, match='convert it to "L"'):
        to_rgb_array(gray.convert("I"))
    # the message's way out, and an in-memory "I" image that is plainly 16-bit
    np.testing.assert_allclose(to_rgb_array(gray.convert("I").convert("L")), to_rgb_array(gray))
    wide = Image.fromarray(np.array([[0, 40000]], np.int32))
    assert wide.mode == "I" and to_rgb_array(wide)[0, 1, 0] == pytest.approx(40000 / 65535)
    # a mode "I" file stays 16-bit, however dark
    dark = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    dark.save(tmp_path / "dark.tif")
    with Image.open(tmp_path / "dark.tif") as opened:
        assert opened.mode == "I"
        assert to_rgb_array(opened)[0, 2, 0] == pytest.approx(255 / 65535)
    assert load_image(tmp_path / "dark.tif").rgb[0, 2, 0] == pytest.approx(255 / 65535)


def test_rgba_alpha_kept_through_load_upscale_and_save(tmp_path: Path) -> None:
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., :3] = _rgb_u8(8, 10)
    rgba[..., 3] = np.linspace(0, 255, 10, dtype=np.uint8)[None, :]
    loaded = load_image(_write(tmp_path / "rgba.png", rgba))
    assert loaded.alpha is not None
    assert loaded.alpha.shape == (8, 10)
    np.testing.assert_allclose(loaded.alpha, rgba[..., 3] / 255.0, atol=1e-7)
    visible = rgba[..., 3] > 0  # colour under fully transparent pixels is filled (next test)
    np.testing.assert_allclose(loaded.rgb[visible], rgba[..., :3][visible] / 255.0, atol=1e-7)

    big_alpha = upscale_alpha(loaded.alpha, 4)
    assert big_alpha.shape == (32, 40)
    assert big_alpha.dtype == np.float32
    assert big_alpha.min() >= 0.0 and big_alpha.max() <= 1.0
    big_rgb = bicubic_upscale(loaded.rgb, 4)

    out = save_image(tmp_path / "out.png", big_rgb, big_alpha)
    with Image.open(out) as reread:
        assert reread.mode == "RGBA"
        assert reread.size == (40, 32)
        saved_alpha = np.asarray(reread)[..., 3]
    assert saved_alpha[:, 0].max() < 40 and saved_alpha[:, -1].min() > 215

    jpeg = save_image(tmp_path / "out.jpg", big_rgb, big_alpha)
    assert _reread(jpeg).mode == "RGB"
    # flattened onto white: each pixel is its colour over white by its alpha (JPEG's loss aside)
    expected = flatten_on_white(big_rgb, big_alpha).astype(np.float64)
    with Image.open(jpeg) as reread:
        written = np.asarray(reread, dtype=np.float64)
    unflattened = np.round(np.clip(big_rgb, 0, 1) * 255)
    assert np.abs(written - expected).mean() < np.abs(written - unflattened).mean() / 4
    levels = flatten_on_white((big_rgb * 65535).astype(np.uint16), big_alpha)
    assert np.abs(levels.astype(np.float64) - expected).max() <= 1

    gray_alpha = save_image(tmp_path / "ga.png", big_rgb, big_alpha, grayscale=True)
    assert _reread(gray_alpha).mode == "LA"


def test_colour_under_transparent_pixels_is_the_nearest_visible_one(tmp_path: Path) -> None:
    """A red disc on transparent black: the upscaled visible edge must stay red, not darken."""
    yy, xx = np.mgrid[:24, :24]
    disc = (yy - 11.5) ** 2 + (xx - 11.5) ** 2 < 8**2
    rgba = np.zeros((24, 24, 4), dtype=np.uint8)
    rgba[disc] = (220, 30, 20, 255)
    loaded = load_image(_write(tmp_path / "disc.png", rgba))
    assert loaded.alpha is not None
    np.testing.assert_allclose(loaded.rgb[disc], rgba[disc][:, :3] / 255.0, atol=1e-7)
    np.testing.assert_allclose(
        loaded.rgb[~disc],
        np.tile([220 / 255, 30 / 255, 20 / 255], (int((~disc).sum()), 1)),
        atol=1e-6,
    )
    big_rgb, big_alpha = bicubic_upscale(loaded.rgb, 4), upscale_alpha(loaded.alpha, 4)
    edge = (big_alpha > 0.05) & (big_alpha < 0.95)
    assert edge.sum() > 20
    assert big_rgb[edge][:, 0].min() > 0.8  # unfilled, the black would pull these below 0.6


def test_fill_transparent_takes_the_nearest_colour_and_leaves_visible_pixels():
    rgb = np.zeros((5, 9, 3), dtype=np.float32)
    alpha = np.zeros((5, 9), dtype=np.float32)
    rgb[:, :2], alpha[:, :2] = (1.0, 0.0, 0.0), 1.0  # red on the left
    rgb[:, -2:], alpha[:, -2:] = (0.0, 0.0, 1.0), 0.5  # half-transparent blue on the right
    filled = fill_transparent(rgb, alpha)
    np.testing.assert_array_equal(filled[:, :2], rgb[:, :2])
    np.testing.assert_array_equal(filled[:, -2:], rgb[:, -2:])
    np.testing.assert_allclose(filled[:, 2], np.tile([1.0, 0.0, 0.0], (5, 1)))  # next to red
    np.testing.assert_allclose(filled[:, 6], np.tile([0.0, 0.0, 1.0], (5, 1)))  # next to blue
    assert filled.dtype == np.float32
    hidden = np.zeros_like(alpha)
    np.testing.assert_array_equal(fill_transparent(rgb, hidden), rgb)  # nothing visible: as is
    # visible pixels keep their exact values at any opacity (not colour * alpha / alpha)
    soft = RNG.random((9, 9), dtype=np.float32)
    soft[::2] = 0.0
    noisy = RNG.random((9, 9, 3), dtype=np.float32)
    np.testing.assert_array_equal(fill_transparent(noisy, soft)[soft > 0], noisy[soft > 0])


def test_an_animation_is_read_from_its_first_frame_and_counted(tmp_path: Path) -> None:
    frames = [
        Image.new("RGB", (8, 6), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))
    ]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    loaded = load_image(path)
    assert loaded.frames == 3
    assert loaded.rgb[0, 0, 0] > 0.7 and loaded.rgb[0, 0, 1] < 0.1
    assert load_image(_write(tmp_path / "still.png", _rgb_u8())).frames == 1


def test_palette_with_transparency_keeps_alpha(tmp_path: Path) -> None:
    image = Image.new("P", (6, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=1)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.alpha is not None
    assert loaded.alpha[0, 0] == 0.0 and loaded.alpha[1, 1] == 1.0
    np.testing.assert_allclose(loaded.rgb[1, 1], [1.0, 0.0, 0.0])


def _float_rgb_tiff(width: int, height: int) -> bytes:
    """An uncompressed 32-bit float RGB TIFF (what numpy-based tools write; Pillow has no mode
    for it), built by hand so the test needs no TIFF writer."""
    pixels = np.linspace(0, 1, width * height * 3, dtype="<f4").tobytes()
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value or offset
        (256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, 0), (259, 3, 1, 1),
        (262, 3, 1, 2), (273, 4, 1, 0), (277, 3, 1, 3), (278, 3, 1, height),
        (279, 4, 1, len(pixels)), (284, 3, 1, 1), (339, 3, 3, 0),
    ]  # fmt: skip
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size
    formats_at, data_at = bits_at + 6, bits_at + 12
    values = {258: bits_at, 273: data_at, 339: formats_at}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = values.get(tag, value)
        packed = (
            struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        )
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    extra = struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + extra + pixels


def test_a_float_rgb_tiff_is_refused_naming_its_layout(tmp_path: Path) -> None:
    path = tmp_path / "render.tif"
    path.write_bytes(_float_rgb_tiff(4, 3))
    with pytest.raises(InputImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "is a TIFF of 32-bit float RGB, 3 samples per pixel" in message
    assert "8- or 16-bit integer TIFF or PNG" in message and "convert it to" not in message
    not_tiff = tmp_path / "notes.tif"
    not_tiff.write_bytes(b"plain text, not a TIFF")
    with pytest.raises(InputImageError, match="not an image Pillow can read"):
        load_image(not_tiff)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white in the stored orientation
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.rgb.shape == (40, 20, 3)
    # Stored left half ends up on top after a clockwise rotation.
    assert loaded.rgb[:15].mean() > 0.9 and loaded.rgb[25:].mean() < 0.1


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_camera_exif_is_kept_without_orientation_or_layout(tmp_path: Path, suffix: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0132] = "2020:01:01 10:00:00"  # DateTime
    exif[0x0112] = 6
    sub = exif.get_ifd(0x8769)  # the Exif sub-IFD: a capture time and the pixel size
    sub[0x9003], sub[0xA002], sub[0xA003] = "2020:01:01 10:00:00", 24, 16
    src = tmp_path / f"cam{suffix}"
    Image.fromarray(_rgb_u8(16, 24)).save(src, exif=exif)
    kept = Image.Exif()
    kept.load(load_image(src).exif)
    assert kept[0x010F] == "Canon" and kept[0x0132] == "2020:01:01 10:00:00"
    # applied to the pixels; a TIFF's size and strip tags describe the input file only
    assert 0x0112 not in kept and 256 not in kept and 273 not in kept
    kept_sub = kept.get_ifd(0x8769)  # the input's pixel size is not the output's
    assert 0xA002 not in kept_sub and 0xA003 not in kept_sub
    if suffix != ".tif":  # Pillow's TIFF writer does not store the Exif sub-IFD at all
        assert kept_sub.get(0x9003) == "2020:01:01 10:00:00"


def test_jpeg_gets_an_exif_up_to_its_segment_limit_and_none_past_it(tmp_path: Path) -> None:
    def exif_of(comment_length: int) -> bytes:
        exif = Image.Exif()
        exif[0x9286] = "x" * comment_length  # UserComment
        return exif.tobytes()

    fits, too_long = exif_of(60_000), exif_of(70_000)
    assert exif_fits("o.jpg", fits) and not exif_fits("o.jpg", too_long)
    assert exif_fits("o.png", too_long) and exif_fits("o.webp", too_long)
    for exif, kept in ((fits, True), (too_long, False)):
        save_image(tmp_path / "o.jpg", _rgb_u8(16, 24), exif=exif)
        with Image.open(tmp_path / "o.jpg") as img:
            assert (0x9286 in img.getexif()) == kept


def test_a_tiffs_profile_xmp_and_photoshop_data_stay_out_of_the_exif(tmp_path: Path) -> None:
    from PIL import ImageCms, TiffImagePlugin

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = srgb[:16] + b"CMYK" + srgb[20:] + bytes(70_000)  # a large print profile
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x010F] = "Scanner"
    tags[700] = b'<x:xmpmeta><rdf:Description tiff:Orientation="1"/></x:xmpmeta>'  # XMP
    tags.tagtype[700] = 1
    tags[34377] = b"8BIM" + bytes(1000)  # Photoshop image resources
    tags.tagtype[34377] = 7
    pixels = RNG.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    Image.fromarray(pixels, "CMYK").save(tmp_path / "scan.tif", tiffinfo=tags, icc_profile=cmyk)
    loaded = load_image(tmp_path / "scan.tif")
    kept = Image.Exif()
    kept.load(loaded.exif)
    assert kept[0x010F] == "Scanner"
    assert not {700, 34377, 34675} & set(kept)  # no CMYK profile on RGB pixels by the back door
    # a JPEG holds at most 64 KB of EXIF: the 70 KB profile must not make the write fail
    save_image(tmp_path / "o.jpg", loaded.rgb, icc_profile=loaded.icc_profile, exif=loaded.exif)
    with Image.open(tmp_path / "o.jpg") as img:
        assert "icc_profile" not in img.info and img.getexif()[0x010F] == "Scanner"
    # a YCbCr TIFF's subsampling and reference levels describe its pixels, not RGB output's
    Image.fromarray(pixels[:, :, :3], "YCbCr").save(tmp_path / "ycc.tif", tiffinfo=tags)
    kept.load(load_image(tmp_path / "ycc.tif").exif)
    assert 530 not in kept and 532 not in kept and kept[0x010F] == "Scanner"


def test_a_profile_of_another_colour_space_is_not_embedded(tmp_path: Path) -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = srgb[:16] + b"CMYK" + srgb[20:]  # a CMYK input's profile, as its header says
    rgb = np.full((4, 4, 3), 0.5, np.float32)
    for profile, kept in ((srgb, True), (cmyk, False)):
        save_image(tmp_path / "o.png", rgb, icc_profile=profile)
        with Image.open(tmp_path / "o.png") as img:
            assert (img.info.get("icc_profile") == profile) is kept
    gray = srgb[:16] + b"GRAY" + srgb[20:]
    save_image(tmp_path / "g.png", rgb, icc_profile=gray, grayscale=True)
    with Image.open(tmp_path / "g.png") as img:
        assert img.mode in ("L", "I;16") and img.info.get("icc_profile") == gray
    save_image(tmp_path / "c.png", rgb, icc_profile=gray)  # gray profile, colour pixels
    with Image.open(tmp_path / "c.png") as img:
        assert "icc_profile" not in img.info
    save_image(tmp_path / "g.webp", rgb, icc_profile=gray, grayscale=True)  # WebP stores RGB
    with Image.open(tmp_path / "g.webp") as img:
        assert img.mode == "RGB" and "icc_profile" not in img.info


def test_webp_is_written_at_the_jpeg_quality(tmp_path: Path) -> None:
    rgb = RNG.random((64, 64, 3), dtype=np.float32)
    save_image(tmp_path / "o.webp", rgb)
    default = io.BytesIO()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(default, format="WEBP")
    ours = load_image(tmp_path / "o.webp").rgb
    theirs = np.asarray(Image.open(default), np.float32) / 255
    assert np.abs(ours - rgb).mean() < np.abs(theirs - rgb).mean()  # closer than quality 80


def test_input_file_is_not_modified(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "rot.jpg"
    Image.fromarray(_rgb_u8(16, 24)).save(src, exif=exif)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    mtime = src.stat().st_mtime_ns
    load_image(src)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert src.stat().st_mtime_ns == mtime
    assert _files(tmp_path) == ["rot.jpg"]


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match=r"nope\.png.*not found"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match="is a folder"):
        load_image(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputImageError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(InputImageError, match=r"notes\.png is not an image"):
        load_image(tmp_path / "notes.png")


def test_a_postscript_file_is_never_handed_to_ghostscript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import EpsImagePlugin

    def run_ghostscript(*args: object, **kwargs: object) -> None:
        raise _Decoded("Ghostscript would run on the input")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", run_ghostscript)
    src = tmp_path / "upload.png"  # PostScript is a program, whatever the file is named
    src.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    with pytest.raises(InputImageError, match=r"upload\.png is not an image"):
        load_image(src)


def test_truncated_png(tmp_path: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    buf = io.BytesIO()
    Image.fromarray(_rgb_u8(64, 64)).save(buf, format="PNG")
    data = buf.getvalue()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputImageError, match=r"cut\.png.*truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


class _Decoded(BaseException):
    """Raised if pixel data is decoded; BaseException so that no handler under test eats it."""


def test_gigantic_header_is_refused_before_decoding_and_names_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _png_with_size(tmp_path / "huge.png", 100_000, 100_000)
    pillow_limit = Image.MAX_IMAGE_PIXELS

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise _Decoded(f"{self.size} would be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InputImageError, match="--max-pixels") as info:
        load_image(src)
    message = str(info.value)
    assert "huge.png" in message
    assert "10,000,000,000" in message and "16,000,000" in message
    assert "\n" not in message
    assert pillow_limit == Image.MAX_IMAGE_PIXELS


def test_header_over_user_limit_below_pillow_limit(tmp_path: Path) -> None:
    src = _png_with_size(tmp_path / "wide.png", 5000, 4000)
    with pytest.raises(InputImageError, match=r"5000x4000.*--max-pixels") as info:
        load_image(src)
    assert "20,000,000" in str(info.value) and "16,000,000" in str(info.value)
    small = _write(tmp_path / "small.png", _rgb_u8(10, 10))
    with pytest.raises(InputImageError, match="--max-pixels"):
        load_image(small, max_pixels=99)
    assert load_image(small, max_pixels=100).rgb.shape == (10, 10, 3)
    for limit in (0, -1):  # a caller's bug, not the image's fault
        with pytest.raises(ValueError, match="max_pixels must be at least 1"):
            load_image(small, max_pixels=limit)
        with pytest.raises(ValueError, match="max_pixels must be at least 1"):
            decode_image_bytes(small.read_bytes(), "small.png", max_pixels=limit)


def test_max_pixels_is_the_limit_over_pillows_bomb_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow warns over MAX_IMAGE_PIXELS (~89M) and refuses over twice that; scaled down here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    src = _write(tmp_path / "bomb.png", _rgb_u8(10, 15))  # 150 pixels: Pillow only warns
    with pytest.raises(InputImageError, match=r"--max-pixels 150 if you have the memory"):
        load_image(src, max_pixels=149)
    assert load_image(src, max_pixels=150).rgb.shape == (10, 15, 3)  # as the error advised
    big = _write(tmp_path / "big.png", _rgb_u8(15, 15))  # 225: over what Pillow opens at all
    with pytest.raises(InputImageError, match=r"big\.png.*over the 200 pixels Pillow") as info:
        load_image(big, max_pixels=149)
    assert "raise" not in str(info.value)  # a larger --max-pixels would not help
    with pytest.raises(InputImageError, match=r"big\.png.*decompression-bomb safety limit"):
        load_image(big, max_pixels=1000)
    with pytest.raises(InputImageError, match=r"big\.png.*decompression-bomb safety limit"):
        load_image(big, max_pixels=225)  # exactly its size: within the user's limit


# ------------------------------------------------------------------------------------------
# Output paths and saving
# ------------------------------------------------------------------------------------------


def test_check_output_path_ok(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.png", _rgb_u8())
    assert check_output_path(src, tmp_path / "out.JPG") == (tmp_path / "out.JPG").resolve()


def test_check_output_path_missing_folder(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.png", _rgb_u8())
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(src, tmp_path / "missing" / "out.png")


def test_check_output_path_same_as_input(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.png", _rgb_u8())
    with pytest.raises(OutputPathError, match="is the input file"):
        check_output_path(src, tmp_path / "sub" / ".." / "in.png")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputPathError, match="is the input file"):
        check_output_path(src, tmp_path / "sub" / ".." / "in.png")


def test_check_output_path_bad_suffix(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.png", _rgb_u8())
    with pytest.raises(OutputPathError, match=r"\.png \.jpg \.jpeg \.webp \.tif \.tiff"):
        check_output_path(src, tmp_path / "out.bmp")
    with pytest.raises(OutputPathError, match="no suffix"):
        check_output_path(src, tmp_path / "out")


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    rgb = _rgb_u8().astype(np.float32) / 255.0
    for name in ("a.png", "b.jpg", "c.jpeg", "d.webp", "e.tif", "f.tiff"):
        save_image(tmp_path / name, rgb)
    save_image(tmp_path / "a.png", rgb)  # overwriting an existing file
    assert _files(tmp_path) == ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.tif", "f.tiff"]
    assert _reread(tmp_path / "b.jpg").format == "JPEG"
    assert _reread(tmp_path / "d.webp").format == "WEBP"
    assert _reread(tmp_path / "f.tiff").format == "TIFF"


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    target = folder / "out.png"
    shutil.rmtree(folder)
    with pytest.raises(OutputPathError, match=r"out\.png"):
        save_image(target, np.zeros((4, 4, 3), dtype=np.float32))
    assert not folder.exists()
    assert _files(tmp_path) == []


def test_save_error_during_encode_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(self: Image.Image, fp: io.BufferedWriter, **kwargs: object) -> None:
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_written)
    existing = tmp_path / "out.png"
    existing.write_bytes(b"old contents")
    with pytest.raises(OutputPathError, match=r"out\.png.*disk full"):
        save_image(existing, np.zeros((4, 4, 3), dtype=np.float32))
    assert _files(tmp_path) == ["out.png"]
    assert existing.read_bytes() == b"old contents"


def test_save_rounds_and_clips(tmp_path: Path) -> None:
    rgb = np.array([[[-0.5, 0.5, 1.7]]], dtype=np.float32)
    out = save_image(tmp_path / "px.png", rgb)
    np.testing.assert_array_equal(np.asarray(_reread(out))[0, 0], [0, 128, 255])


# ------------------------------------------------------------------------------------------
# Arrays and resizing
# ------------------------------------------------------------------------------------------


def test_bicubic_upscale_constant_and_shape() -> None:
    rgb = np.empty((5, 7, 3), dtype=np.float32)
    rgb[...] = [0.2, 0.5, 0.9]
    up = bicubic_upscale(rgb, 4)
    assert up.shape == (20, 28, 3)
    assert up.dtype == np.float32
    for c, value in enumerate((0.2, 0.5, 0.9)):
        np.testing.assert_allclose(up[:, :, c], value, atol=1e-6)


def test_bicubic_upscale_keeps_float_precision() -> None:
    rgb = np.full((4, 4, 3), 40000 / 65535, dtype=np.float32)
    rgb[0, 0] = 1.0
    up = bicubic_upscale(rgb, 4)
    assert up.min() >= 0.0 and up.max() <= 1.0
    # Far from the bright pixel the value must keep more precision than 8 bits would give.
    assert abs(float(up[-1, -1, 0]) - 40000 / 65535) < 1e-5


def test_to_rgb_array_variants() -> None:
    u8 = _rgb_u8(3, 4)
    np.testing.assert_allclose(to_rgb_array(u8), u8 / 255.0, atol=1e-7)
    u16 = np.full((3, 4), 65535, dtype=np.uint16)
    assert to_rgb_array(u16).shape == (3, 4, 3) and to_rgb_array(u16).min() == 1.0
    rgba = np.concatenate([u8, np.zeros((3, 4, 1), np.uint8)], axis=2)
    np.testing.assert_allclose(to_rgb_array(rgba), u8 / 255.0, atol=1e-7)
    floats = np.full((3, 4, 3), 1.5)
    assert to_rgb_array(floats).dtype == np.float32 and to_rgb_array(floats).max() == 1.0
    pil = Image.fromarray(rgba)
    np.testing.assert_allclose(to_rgb_array(pil), u8 / 255.0, atol=1e-7)
    with pytest.raises(InputImageError, match="shape"):
        to_rgb_array(np.zeros((3, 4, 2), np.uint8))
    with pytest.raises(InputImageError, match="dtype"):
        to_rgb_array(np.zeros((3, 4), np.int64))
    with pytest.raises(InputImageError, match="NaN"):
        to_rgb_array(np.full((3, 4), np.nan))


# ------------------------------------------------------------------------------------------
# Step map
# ------------------------------------------------------------------------------------------


def _grid_boxes(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    return [
        (y, x, y + tile, x + tile)
        for y in range(0, max(1, height - tile + stride), stride)
        for x in range(0, max(1, width - tile + stride), stride)
    ]


def test_step_map_size_limit() -> None:
    image = RNG.random((1500, 2400, 3), dtype=np.float32)
    boxes = _grid_boxes(1500, 2400, 512, 448)
    steps = [10 + 3 * k for k in range(len(boxes))]
    exits = ["saturated" if k % 3 == 0 else "t0" for k in range(len(boxes))]
    picture = render_step_map(image, boxes, steps, exits, max_side=256)
    assert picture.mode == "RGB"
    assert picture.width <= 256
    map_height = round(1500 * 256 / 2400)
    assert map_height < picture.height <= map_height + 120


def test_a_thumbnail_step_map_is_drawn_big_enough_to_read() -> None:
    image = RNG.random((3, 50, 3), dtype=np.float32)  # a 12x200 output strip, as 4x of 3x50
    boxes = [(0, 0, 3, 25), (0, 25, 3, 50)]
    picture = np.asarray(render_step_map(image, boxes, [5, 9], ["t0", "saturated"]))
    # the map's width grows to 256 px (then the legend's white rows follow); each tile's half
    # of it is painted, not left white
    assert picture.shape[1] >= 256
    top = picture[:15]
    assert (top[:, :256].min(axis=2) < 250).mean() > 0.9
    assert not np.array_equal(top[7, 64], top[7, 192])  # two tiles, two colours


def test_step_map_single_tile_and_equal_steps(tmp_path: Path) -> None:
    image = np.full((40, 60, 3), 0.5, dtype=np.float32)
    one = render_step_map(image, [(0, 0, 64, 64)], [30], ["t0"])
    assert one.height > 40
    boxes = _grid_boxes(40, 60, 20, 16)
    same = render_step_map(image, boxes, [25] * len(boxes), ["t0"] * len(boxes))
    assert same.height > 40
    n = len(boxes)
    out = save_step_map(tmp_path / "map.png", image, boxes, [25] * n, ["saturated"] * n)
    assert out.exists() and _files(tmp_path) == ["map.png"]


def test_step_map_colours_follow_steps() -> None:
    image = np.full((64, 128, 3), 0.5, dtype=np.float32)
    boxes = [(0, 0, 64, 64), (0, 64, 64, 128)]
    picture = np.asarray(render_step_map(image, boxes, [10, 50], ["t0", "saturated"]))
    # drawn at twice the size: the map's long side grows to 256 px
    few = picture[112, 16].astype(int)
    many = picture[112, 144].astype(int)
    assert np.abs(few - many).sum() > 60
    # The saturated tile (right) has a marked corner, the other does not.
    assert not np.array_equal(picture[2, 130], picture[112, 144])
    assert np.array_equal(picture[4, 4], picture[112, 16])


def test_step_map_rejects_mismatched_lengths() -> None:
    image = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="equal lengths"):
        render_step_map(image, [(0, 0, 8, 8)], [1, 2], ["t0"])
    with pytest.raises(ValueError, match="exit kinds"):
        render_step_map(image, [(0, 0, 8, 8)], [1], ["done"])


def test_step_map_refuses_no_tiles_and_a_tiny_size() -> None:
    image = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="at least one tile"):
        render_step_map(image, [], [], [])
    with pytest.raises(ValueError, match="max_side must be at least 16, got 15"):
        render_step_map(image, [(0, 0, 8, 8)], [1], ["t0"], max_side=15)


def test_step_colours_clamp_to_the_ends_of_the_ramp() -> None:
    from adadiff.stepmap import step_colours

    ends = step_colours(np.array([0.0, 1.0]))
    np.testing.assert_array_equal(step_colours(np.array([-0.5, 1.5])), ends)


def test_step_map_caption_counts_the_tiles_that_exited_early() -> None:
    from adadiff.stepmap import _caption

    assert _caption(np.array([10, 20, 30]), np.array([True, False, False])) == (
        "steps per tile (min 10, median 20, max 30; 1 of 3 tiles exited early)"
    )


def test_a_small_max_side_keeps_the_map_in_proportion() -> None:
    """Below the 256 px minimum, max_side wins for both sides: 40x60 at 64 is 43x64, not a
    square of 64 px."""
    image = np.full((40, 60, 3), 0.5, dtype=np.float32)
    picture = np.asarray(render_step_map(image, [(0, 0, 40, 60)], [7], ["t0"], max_side=64))
    assert picture.shape[1] == 64
    assert (picture[42] < 250).any() and (picture[43:48] == 255).all()  # the legend's margin


def test_step_map_cells_have_borders_both_ways() -> None:
    image = np.full((128, 64, 3), 0.5, dtype=np.float32)
    stacked = [(0, 0, 64, 64), (64, 0, 128, 64)]
    side_by_side = [(x, y, x2, y2) for y, x, y2, x2 in stacked]
    for img, boxes, across in ((image, stacked, 0), (image.transpose(1, 0, 2), side_by_side, 1)):
        picture = np.asarray(render_step_map(img, boxes, [25, 25], ["t0", "t0"])).astype(int)
        # drawn at twice the size: the cells meet at pixel 128 of the long side
        inside, border = (120, 20), (128, 20)
        if across:
            inside, border = inside[::-1], border[::-1]
        assert (picture[border] > picture[inside] + 30).all()


def test_step_map_cells_follow_tiles_clipped_to_the_image() -> None:
    """A tile that reaches past the edge is centred on its part inside the image: here the
    second tile's cell starts at 48 (halfway between 32 and 64), not at 64."""
    image = np.full((64, 96, 3), 0.5, dtype=np.float32)
    wide = [(0, 0, 64, 64), (0, 32, 64, 160)]
    tall = [(x, y, x2, y2) for y, x, y2, x2 in wide]
    for img, boxes, across in ((image, wide, 0), (image.transpose(1, 0, 2), tall, 1)):
        picture = np.asarray(render_step_map(img, boxes, [10, 50], ["t0", "t0"]))
        # drawn 8/3 times the size: 56 is map pixel 150
        first, second, near = (40, 20), (40, 230), (40, 150)
        if across:
            first, second, near = first[::-1], second[::-1], near[::-1]
        assert np.array_equal(picture[near], picture[second])
        assert not np.array_equal(picture[near], picture[first])


def test_a_name_near_the_file_system_limit_is_written_atomically(tmp_path: Path) -> None:
    name = "x" * 245 + ".png"  # the temporary file's name must fit in 255 bytes too
    written = save_image(tmp_path / name, _rgb_u8().astype(np.float32) / 255.0)
    assert written.name == name
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_premultiplied_gray_and_big_endian_arrays_are_read():
    from adadiff.imageio import to_rgb_array

    la = Image.new("La", (4, 3), (200, 255))
    assert to_rgb_array(la).shape == (3, 4, 3)
    big = np.full((2, 2), 65535, dtype=">u2")
    np.testing.assert_allclose(to_rgb_array(big), 1.0)


def test_a_damaged_tiff_is_not_named_a_layout(tmp_path: Path) -> None:
    """A TIFF header with no readable first directory (a partial download) is a damaged file,
    not a pixel layout Pillow lacks."""
    cases = {
        "header-only.tif": b"II*\x00\x08\x00\x00\x00",
        "empty-dir.tif": b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        "garbage.tif": b"II*\x00\x08\x00\x00\x00" + bytes(range(7, 64)),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputImageError) as caught:
            load_image(path)
        assert "not an image Pillow can read" in str(caught.value), name
        assert "a TIFF of" not in str(caught.value)


def test_a_float_array_in_minus_one_to_one_is_refused() -> None:
    """[-1, 1] data (the usual diffusion normalisation) clipped to [0, 1] turns its dark half
    black without a word; slight undershoot (a resize's ringing) is still clipped."""
    ramp = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    with pytest.raises(InputImageError, match=r"\(array \+ 1\) / 2"):
        to_rgb_array(ramp)
    assert to_rgb_array(np.full((3, 4), -0.05)).min() == 0.0


# ------------------------------------------------------------------------------------------
# What mutation testing found unchecked
# ------------------------------------------------------------------------------------------


def test_a_float_image_is_read_at_the_scale_its_brightest_value_names(tmp_path: Path) -> None:
    """0..1, 0..255 and 0..65535 float data each read black to white, white included: at
    exactly 1.0 or 255.0 a strict bound took the next scale up and the image came out dark."""
    for top, scale in ((1.0, 1.0), (255.0, 255.0), (65535.0, 65535.0), (1000.0, 65535.0)):
        values = np.array([[0.0, top / 2, top]], dtype=np.float32)
        Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
        loaded = load_image(tmp_path / "f.tif")
        assert loaded.float_scale == scale
        np.testing.assert_allclose(loaded.rgb[0, :, 0], values[0] / scale)
    # NaN reads black and an infinity white, not NaN pixels handed to the model
    values = np.array([[np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "nan.tif").rgb[0, :, 0], [0, 1, 0, 0.5])


def test_a_16bit_gray_png_keeps_its_transparent_key(tmp_path: Path) -> None:
    levels = np.array([[0, 1000, 65535], [1000, 30000, 1000]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "key.png", transparency=1000)
    loaded = load_image(tmp_path / "key.png")
    assert loaded.bit_depth == 16 and loaded.alpha is not None
    np.testing.assert_array_equal(loaded.alpha, [[1, 0, 1], [0, 1, 0]])
    # the key's colour is hidden: filled from its visible neighbours, not kept
    assert loaded.rgb[0, 1, 0] != pytest.approx(1000 / 65535)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = _rgb_u8(6, 10)
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as img:
        want = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(load_image(tmp_path / "o.png").rgb, want)


def test_a_file_that_is_not_regular_and_empty_bytes_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match="is not a regular file"):
        load_image("/dev/null")
    with pytest.raises(InputImageError, match=r"photo\.png is empty \(0 bytes\)"):
        decode_image_bytes(b"", "photo.png")


def test_an_array_with_alpha_gets_the_visible_colour_under_its_hidden_pixels() -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # red, visible; black, hidden, on the right
    rgb = to_rgb_array(rgba)
    np.testing.assert_array_equal(rgb[:, 3:], np.ones((4, 3, 1)) * [1.0, 0.0, 0.0])
    with pytest.raises(InputImageError, match="non-empty image"):
        to_rgb_array(np.zeros((4, 0, 3), np.uint8))
    with pytest.raises(InputImageError, match="reaches 2"):
        to_rgb_array(np.full((2, 2, 3), 2.0, np.float32))


def test_bicubic_rows_are_the_rows_of_the_whole_upscale() -> None:
    rgb = RNG.random((23, 9, 3), dtype=np.float32)
    whole = bicubic_upscale(rgb, 4)
    for y0, y1 in ((0, 1), (5, 37), (37, 41), (41, 92), (90, 92)):
        np.testing.assert_array_equal(bicubic_rows(rgb, 4, y0, y1), whole[y0:y1])
    for y0, y1 in ((5, 5), (-1, 4), (0, 93)):
        with pytest.raises(ValueError, match=r"are not inside 0\.\.92"):
            bicubic_rows(rgb, 4, y0, y1)
    with pytest.raises(ValueError, match="factor must be a positive integer"):
        upscale_alpha(np.ones((2, 2), np.float32), True)


def test_an_output_larger_than_its_format_holds_is_refused_either_way() -> None:
    check_output_size("out.webp", 16383, 16383)
    for width, height in ((16384, 10), (10, 16384)):
        with pytest.raises(OutputPathError, match="WEBP holds at most 16383 px"):
            check_output_size("out.webp", width, height)
    check_output_size("out.png", 70000, 10)


def test_a_link_to_the_input_or_a_folder_is_no_output(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.png", _rgb_u8())
    os.link(src, tmp_path / "hard.png")
    with pytest.raises(OutputPathError, match="is the input file"):
        check_output_path(src, tmp_path / "hard.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputPathError, match="is a folder; give a file name"):
        check_output_path(src, tmp_path / "dir.png")


def test_stale_temps_go_and_only_those(tmp_path: Path) -> None:
    old = tmp_path / ".out.0123456789ab.tmp.png"
    young = tmp_path / ".new.0123456789ab.tmp.png"
    other = tmp_path / ".notes.tmp"
    for path in (old, young, other):
        path.write_bytes(b"x")
    (tmp_path / ".dir.0123456789ab.tmp").mkdir()
    link = tmp_path / ".link.0123456789ab.tmp"  # a link is never a temp this module made
    link.symlink_to(other)
    for path in (old, other, link):
        os.utime(path, (time.time() - 1000, time.time() - 1000), follow_symlinks=False)
    assert remove_stale_temps(tmp_path, 600) == [old]
    assert _files(tmp_path) == [
        ".dir.0123456789ab.tmp",
        ".link.0123456789ab.tmp",
        ".new.0123456789ab.tmp.png",
        ".notes.tmp",
    ]


def test_writing_through_a_link_or_over_it(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_bytes(b"old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_bytes_atomic(tmp_path / "link.json", b"one")
    assert (tmp_path / "real.json").read_bytes() == b"one"
    write_bytes_atomic(tmp_path / "link.json", b"two", follow_links=False)
    assert not (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "link.json").read_bytes() == b"two"
    assert (tmp_path / "real.json").read_bytes() == b"one"


def test_integer_levels_are_rounded_to_8_bits_and_hidden_pixels_flatten_to_white(
    tmp_path: Path,
) -> None:
    levels = np.full((1, 2, 3), 25900, dtype=np.uint16)  # 100.78 of 255
    out = save_image(tmp_path / "px.png", levels)
    assert np.asarray(_reread(out))[0, 0, 0] == 101
    gray = save_image(tmp_path / "g.png", levels, grayscale=True)
    assert np.asarray(_reread(gray))[0, 0] == 101
    rgb = np.zeros((1, 3, 3), dtype=np.float32)
    alpha = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(flatten_on_white(rgb, alpha)[0, :, 0], [255, 128, 0])
    alpha16 = np.array([[0, 32767, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(flatten_on_white(rgb, alpha16)[0, :, 0], [255, 128, 0])


def test_save_refuses_a_bit_depth_or_alpha_that_does_not_fit(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="bit_depth must be 8 or 16"):
        save_image(tmp_path / "a.png", rgb, bit_depth=12)
    with pytest.raises(ValueError, match=r"alpha shape \(3, 2\) does not match"):
        save_image(tmp_path / "b.png", rgb, np.ones((3, 2), np.float32))
    assert _files(tmp_path) == []


def test_16_bits_only_where_the_format_and_alpha_allow(tmp_path: Path) -> None:
    """A 16-bit gray input written as JPEG or WebP is 8-bit gray; with alpha it stays 8-bit
    gray + alpha (Pillow has no 16-bit gray + alpha), keeping the transparency."""
    rgb = np.full((2, 3, 3), 0.5, dtype=np.float32)
    alpha = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    for name in ("g.jpg", "g.webp"):
        assert _reread(save_image(tmp_path / name, rgb, bit_depth=16, grayscale=True)).mode in (
            "L",
            "RGB",
        )
    kept = _reread(save_image(tmp_path / "ga.png", rgb, alpha, bit_depth=16, grayscale=True))
    assert kept.mode == "LA"
    np.testing.assert_array_equal(np.asarray(kept)[:, :, 1], alpha * 255)
    assert _reread(save_image(tmp_path / "g.png", rgb, bit_depth=16, grayscale=True)).mode in (
        "I;16",
        "I",
    )


def test_jpeg_is_written_at_quality_95(tmp_path: Path) -> None:
    rgb = _rgb_u8(16, 16)
    with Image.open(save_image(tmp_path / "o.jpg", rgb)) as ours:
        tables = ours.quantization
    expected = io.BytesIO()
    Image.fromarray(rgb).save(expected, format="JPEG", quality=95)
    assert tables == Image.open(expected).quantization


def test_an_exif_exactly_at_the_jpeg_limit_fits() -> None:
    assert exif_fits("o.jpg", b"x" * 65533) and not exif_fits("o.jpg", b"x" * 65534)
    assert exif_fits("o.png", b"x" * 65534) and exif_fits("o.jpg", None)


def test_gray_channels_are_equal_to_half_an_8bit_level() -> None:
    rgb = np.full((1, 2, 2, 3), 0.5, dtype=np.float32)
    assert has_gray_channels(rgb).tolist() == [True]
    rgb[0, 0, 0, 1] += 1 / 255
    assert has_gray_channels(rgb).tolist() == [False]


def test_an_output_folder_that_refuses_files_fails_before_the_upscale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adadiff.imageio as imageio

    def refuse(target: Path) -> tuple[int, Path]:
        raise PermissionError(13, "Permission denied")

    src = _write(tmp_path / "in.png", _rgb_u8())
    monkeypatch.setattr(imageio, "_open_temp", refuse)
    with pytest.raises(OutputPathError, match=r"out\.png: cannot write in .*Permission denied"):
        check_output_path(src, tmp_path / "out.png")


def test_a_file_without_metadata_carries_none(tmp_path: Path) -> None:
    loaded = load_image(_write(tmp_path / "plain.png", _rgb_u8()))
    assert loaded.exif is None and loaded.icc_profile is None
