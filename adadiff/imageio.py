"""Reading and writing images for the 4x super-resolution tool.

Arrays are float32 in [0, 1]: RGB as [H, W, 3], alpha as [H, W]. Files are read with Pillow only,
fully decoded inside a guard that turns every decoding problem into an ``InputImageError``, and
written atomically (temporary file in the target folder, then ``os.replace``).
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from adadiff.errors import InputImageError, OutputPathError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "INPUT_FORMATS",
    "MAX_OUTPUT_SIDE",
    "OUTPUT_FORMATS",
    "LoadedImage",
    "bicubic_rows",
    "bicubic_upscale",
    "check_output_path",
    "check_output_size",
    "decode_image_bytes",
    "encode_image",
    "exif_fits",
    "fill_transparent",
    "flatten_on_white",
    "format_for_path",
    "input_format_names",
    "load_image",
    "save_image",
    "to_rgb_array",
    "upright",
    "upscale_alpha",
    "write_files_atomic",
    "write_pil_atomic",
]

DEFAULT_MAX_PIXELS = 16_000_000
# Rec. 601 luma weights: how gray files are read and written, and gray images made
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
LUMA_601.setflags(write=False)

OUTPUT_FORMATS: Mapping[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

# The image files adadiff reads, by suffix: what upscale-many picks from a folder, and what
# upscale's help and errors name (Pillow decodes every one; only the first frame of a GIF). The
# formats it writes are OUTPUT_FORMATS.
INPUT_FORMATS: Mapping[str, str] = {**OUTPUT_FORMATS, ".gif": "GIF", ".bmp": "BMP"}


def input_format_names() -> str:
    """The readable formats in words, for help texts and errors: "PNG, JPEG, ... or BMP"."""
    names = list(dict.fromkeys("WebP" if f == "WEBP" else f for f in INPUT_FORMATS.values()))
    return f"{', '.join(names[:-1])} or {names[-1]}"


_GRAY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "F"}) | _GRAY16_MODES
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Pillow's decoders signal corrupt data with a variety of exception types.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)
_LOSSY_QUALITY = 95
_ROWS_PER_CHUNK = 512


@dataclass(frozen=True)
class LoadedImage:
    """A decoded input image.

    ``rgb`` is float32 [H, W, 3] in [0, 1] (grayscale replicated to 3 channels); ``alpha`` is
    float32 [H, W] in [0, 1] or None; ``bit_depth`` is 8 or 16; ``source_mode`` is Pillow's mode.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    grayscale: bool
    source_mode: str
    icc_profile: bytes | None = None  # the embedded ICC colour profile, written back out
    exif: bytes | None = None  # EXIF without the orientation tag (orientation is applied)
    frames: int = 1  # an animation's frame count; only the first frame is decoded
    float_scale: float = 1.0  # a float image's values were divided by this (0..255 data)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise InputImageError(f"{path}: file not found; check the input path")
    if path.is_dir():
        raise InputImageError(f"{path} is a folder, not an image; pass the path of an image file")
    if not path.is_file():
        raise InputImageError(f"{path} is not a regular file; pass the path of an image file")
    if path.stat().st_size == 0:
        raise InputImageError(f"{path} is empty (0 bytes); re-export or re-download the image")


def _too_many_pixels(path: Path, width: int, height: int, max_pixels: int) -> InputImageError:
    pixels = width * height
    return InputImageError(
        f"{path}: image is {width}x{height} = {pixels:,} pixels, over the limit of "
        f"{max_pixels:,} input pixels; downscale or crop it, or raise the limit with "
        f"--max-pixels {pixels} if you have the memory"
    )


def _bomb_error(path: Path, exc: Exception, max_pixels: int) -> InputImageError:
    """Pillow refuses to open an image over twice its decompression-bomb limit (~179 M pixels)
    whatever --max-pixels says; a larger --max-pixels cannot help, so it is not suggested."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(match.group(1)) if match else None
    if pixels is None or pixels > max_pixels:
        claimed = f"{pixels:,} pixels" if pixels is not None else "a gigantic size"
        pillow = re.search(r"limit of (\d+) pixels", str(exc))
        most = (
            f"the {int(pillow.group(1)):,} pixels Pillow opens at all"
            if pillow
            else "Pillow's limit"
        )
        return InputImageError(
            f"{path}: image header claims {claimed}, over the limit of {max_pixels:,} input "
            f"pixels (--max-pixels) and over {most}; downscale or split the image, if the size "
            "is real"
        )
    # Within the user's limit but over Pillow's own decompression-bomb guard, which we do not
    # loosen because that would change process-wide state.
    return InputImageError(
        f"{path}: image has {pixels:,} pixels, over Pillow's decompression-bomb safety limit "
        f"({_one_line(exc)}); split or downscale the image before upscaling it"
    )


def _gray16_array(img: Image.Image) -> np.ndarray:
    # "I" (32-bit) is how some TIFF/PNG readers expose 16-bit gray; values beyond 16 bits clip.
    raw = np.asarray(img)
    values: np.ndarray = raw.astype(np.float64) if img.mode == "I" else raw.astype(np.float32)
    return (np.clip(values, 0, 65535) / 65535.0).astype(np.float32)


def _float_gray_array(img: Image.Image) -> tuple[np.ndarray, float]:
    """Gray values in [0, 1] and the scale they were divided by: float files hold 0..1 by
    convention, but numpy and OpenCV often write 0..255 (or 0..65535), which clipping would
    turn white."""
    values = np.asarray(img, dtype=np.float32)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0 if top <= 65535.0 else top
    values = np.nan_to_num(values / scale, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(values, 0.0, 1.0).astype(np.float32), scale


def _key_alpha(img: Image.Image) -> np.ndarray | None:
    # A 16-bit gray PNG can carry a tRNS key value; Pillow cannot convert it to LA at 16 bits.
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return None
    return (np.asarray(img) != key).astype(np.float32)


def fill_transparent(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` with the colour under fully transparent pixels replaced by that of the nearest
    visible ones (a push-pull pyramid of alpha-weighted colour).

    Files often store black or stale colour there; upscaling mixes it into the visible edge
    pixels, which then show a dark or coloured fringe once the soft upscaled alpha reveals them.
    Visible pixels are returned unchanged."""
    hidden = alpha <= 0.0
    if not hidden.any() or hidden.all():
        return rgb
    weight = np.maximum(alpha, 0.0).astype(np.float32)
    colour = rgb.astype(np.float32) * weight[:, :, None]
    levels: list[tuple[np.ndarray, np.ndarray]] = []
    while True:
        levels.append((colour, weight))
        h, w = weight.shape
        if h == 1 and w == 1:
            break
        # sum over 2x2 blocks (zero-padded to even sides, weight 0 adds nothing): next level
        ph, pw = h % 2, w % 2
        weight = np.pad(weight, ((0, ph), (0, pw)))
        colour = np.pad(colour, ((0, ph), (0, pw), (0, 0)))
        weight = weight[0::2, 0::2] + weight[1::2, 0::2] + weight[0::2, 1::2] + weight[1::2, 1::2]
        colour = colour[0::2, 0::2] + colour[1::2, 0::2] + colour[0::2, 1::2] + colour[1::2, 1::2]
    colour, weight = levels[-1]
    filled = colour / np.maximum(weight, 1e-12)[:, :, None]
    for colour, weight in reversed(levels[:-1]):
        h, w = weight.shape
        coarse = np.repeat(np.repeat(filled, 2, axis=0), 2, axis=1)[:h, :w]
        own = colour / np.maximum(weight, 1e-12)[:, :, None]
        filled = np.where((weight > 0)[:, :, None], own, coarse)
    return np.where(hidden[:, :, None], filled, rgb).astype(rgb.dtype)


def _decode_pil(img: Image.Image) -> LoadedImage:
    """Turn a fully loaded Pillow image into float arrays."""
    if img.mode == "La":  # premultiplied gray + alpha: Pillow converts it to LA only
        img = img.convert("LA")
    mode = img.mode
    grayscale = mode in _GRAY_MODES
    if mode in _GRAY16_MODES or mode == "F":
        gray, scale = (_gray16_array(img), 1.0) if mode in _GRAY16_MODES else _float_gray_array(img)
        alpha = _key_alpha(img) if mode in _GRAY16_MODES else None
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        if alpha is not None:
            rgb = fill_transparent(rgb, alpha)
        return LoadedImage(rgb, alpha, 16, True, mode, float_scale=scale)
    if mode in _ALPHA_MODES or img.has_transparency_data:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = np.ascontiguousarray(rgba[:, :, 3])
        rgb = np.ascontiguousarray(fill_transparent(rgba[:, :, :3], alpha))
        return LoadedImage(rgb, alpha, 8, grayscale, mode)
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return LoadedImage(rgb, None, 8, grayscale, mode)


_SAMPLE_KINDS = {1: "integer", 2: "signed integer", 3: "float"}
_PHOTOMETRIC = {0: "grey", 1: "grey", 2: "RGB", 3: "palette", 5: "CMYK", 6: "YCbCr", 8: "Lab"}


def _tiff_layout(fp: BinaryIO) -> str | None:
    """A TIFF's pixel layout in words ("32-bit float RGB, 3 samples per pixel"), or None when
    ``fp`` holds no TIFF whose first directory can be read."""
    try:
        fp.seek(0)
        header = fp.read(8)
        if header[:4] not in (b"II*\x00", b"MM\x00*"):
            return None
        tags = TiffImagePlugin.ImageFileDirectory_v2(header)
        size = fp.seek(0, os.SEEK_END)
        if not 8 <= tags.next < size:
            return None
        fp.seek(tags.next)
        with warnings.catch_warnings():  # a damaged directory is reported below, not warned
            warnings.simplefilter("ignore")
            tags.load(fp)
        if not all(tag in tags for tag in (256, 257, 258)):  # no width, height, bit depth
            return None  # a damaged file, not a layout Pillow lacks
        bits = tags.get(258, (1,))
        kinds = tags.get(339, (1,))
        kind = _SAMPLE_KINDS.get(kinds[0] if isinstance(kinds, tuple) else kinds, "unknown")
        samples = int(tags.get(277, 1))
        colour = _PHOTOMETRIC.get(int(tags.get(262, -1)), "unknown colour")
        depth = bits[0] if isinstance(bits, tuple) else bits
    except _DECODE_ERRORS:
        return None
    return f"{depth}-bit {kind} {colour}, {samples} samples per pixel"


_ORIENTATION = 0x0112
# EXIF orientations that need a transpose (1 is upright; other values are invalid and ignored)
_TURNED = frozenset(range(2, 9))


def upright(img: Image.Image) -> Image.Image:
    """``img`` as it is meant to be seen: its EXIF orientation applied (a camera's portrait
    photo is stored sideways), or ``img`` itself when it has none to apply."""
    if img.getexif().get(_ORIENTATION, 1) not in _TURNED:
        return img
    return ImageOps.exif_transpose(img)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file into float32 arrays, or raise ``InputImageError`` saying why not."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    path = Path(path)
    _check_input_file(path)
    try:
        with path.open("rb") as fp:
            return _decode_stream(fp, path, max_pixels)
    except PermissionError as exc:
        raise InputImageError(f"{path}: permission denied; check the file's permissions") from exc


def decode_image_bytes(
    data: bytes, name: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """``load_image`` for a file's bytes (read elsewhere, e.g. on another machine); ``name``
    only appears in error messages."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    if not data:
        raise InputImageError(f"{name} is empty (0 bytes); it is not an image")
    return _decode_stream(io.BytesIO(data), Path(name), max_pixels)


# Pillow hands an EPS file (whatever its name) to Ghostscript, a PostScript interpreter run as
# a subprocess: an input to upscale must never run a program, so that reader is never tried.
_NEVER_OPENED = frozenset({"EPS"})


def _readers() -> tuple[str, ...]:
    Image.init()  # registers every reader Pillow has
    return tuple(f for f in Image.ID if f not in _NEVER_OPENED)


def _decode_stream(fp: BinaryIO, path: Path, max_pixels: int) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 M pixels; the user's --max-pixels, checked next, is the limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_readers()) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise _too_many_pixels(path, width, height, max_pixels)
                source_mode = img.mode
                frames = int(getattr(img, "n_frames", 1))
                img.load()
                shown = upright(img)
                decoded = _decode_pil(shown)
                metadata = _metadata(img, shown)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(path, exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        layout = _tiff_layout(fp)
        if layout is not None:  # a TIFF whose pixel layout Pillow has no mode for
            why = " (it reads float TIFFs with one channel only)" if "float" in layout else ""
            raise InputImageError(
                f"{path} is a TIFF of {layout}, which Pillow cannot decode{why}; save it as an "
                "8- or 16-bit integer TIFF or PNG, or read it yourself and pass a float array in "
                "[0, 1] to Upscaler.upscale"
            ) from exc
        raise InputImageError(
            f"{path} is not an image Pillow can read; convert it to {input_format_names()}"
        ) from exc
    except PermissionError:
        raise
    except _DECODE_ERRORS as exc:
        raise InputImageError(
            f"{path}: image data is truncated or corrupt ({_one_line(exc)}); "
            "re-export or re-download the image"
        ) from exc
    icc, exif = metadata
    return replace(decoded, source_mode=source_mode, icc_profile=icc, exif=exif, frames=frames)


# Tags that describe the source file's own layout (a TIFF's size, strips, tiles, sample format):
# wrong for a 4x larger output in another format, so they are not carried over.
_LAYOUT_TAGS = frozenset(
    {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 324, 325, 338, 339}
    | {530, 532}  # a YCbCr TIFF's subsampling and reference levels: the output is RGB
)
# Blocks a TIFF keeps among its tags that are no EXIF: its ICC profile (written as the output's
# own profile, and only where it fits), XMP (which repeats the orientation and size), Photoshop's
# image resources and layers. Carried into the output's EXIF they would smuggle in a profile of
# the wrong colour space, and past 64 KB a JPEG cannot hold the EXIF at all.
_SOURCE_DATA_TAGS = frozenset({700, 34377, 34675, 37724})


_EXIF_IFD = 0x8769
_PIXEL_SIZE_TAGS = (0xA002, 0xA003)  # PixelXDimension, PixelYDimension


def _metadata(img: Image.Image, shown: Image.Image) -> tuple[bytes | None, bytes | None]:
    """The ICC profile and the EXIF (orientation dropped: the pixels get it applied). The EXIF
    is read from the file's image, ``img``: the transposed copy ``shown`` loses a TIFF's tags."""
    icc = shown.info.get("icc_profile") or img.info.get("icc_profile") or None
    exif = img.getexif()  # a copy: img's own EXIF stays as it was
    for tag in (_ORIENTATION, *_LAYOUT_TAGS, *_SOURCE_DATA_TAGS):
        exif.pop(tag, None)
    if _EXIF_IFD in exif:  # the Exif sub-IFD's pixel size is the input's, not the output's
        sub = exif.get_ifd(_EXIF_IFD)
        for tag in _PIXEL_SIZE_TAGS:
            sub.pop(tag, None)
    return (icc if isinstance(icc, bytes) else None, exif.tobytes() if len(exif) else None)


def _check_int32_levels(image: Image.Image) -> None:
    """Refuse a mode "I" image made in memory whose values all fit in 0..255: ``convert("I")``
    of an "L" image and ``Image.fromarray`` of an int32 array make those from 8-bit levels,
    which read as 16-bit (as a file's mode "I" is) would come back nearly black."""
    if image.mode != "I" or image.format is not None:  # read from a file: 16-bit gray
        return
    low, high = image.getextrema()  # one band: (min, max) as numbers
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return
    if low >= 0 and 0 < high <= 255:
        raise InputImageError(
            f'a PIL image in mode "I" with values {low}..{high} could hold 8-bit or 16-bit '
            'levels; convert it to "L" (image.convert("L")) if they are 8-bit, or to "I;16" '
            "if they are 16-bit"
        )


def to_rgb_array(image: Any) -> np.ndarray:
    """Convert a PIL image or a numpy array to float32 [H, W, 3] in [0, 1], dropping alpha.
    A PIL image's EXIF orientation is applied, as ``load_image`` does for a file.

    uint8 is scaled by 1/255, uint16 by 1/65535, floats are taken as already in [0, 1] (clipped;
    a float array reaching above 1.5, as 0..255 data does, or below -0.5, as [-1, 1] data does,
    is refused). A PIL image in mode "I" is 16-bit, as a file's is; one made in memory whose
    values all lie in 0..255 is refused as ambiguous (convert it to "L" or "I;16")."""
    return to_rgb_and_gray(image)[0]


def to_rgb_and_gray(image: Any) -> tuple[np.ndarray, bool]:
    """``to_rgb_array`` and whether the image was gray (one channel, or a gray PIL mode).
    Colour under fully transparent pixels is filled from the visible ones, for arrays with an
    alpha channel as for PIL images (``fill_transparent``)."""
    if isinstance(image, Image.Image):
        image.load()
        _check_int32_levels(image)
        decoded = _decode_pil(upright(image))  # as load_image reads a file
        return decoded.rgb, decoded.grayscale
    if not isinstance(image, np.ndarray):
        raise InputImageError(f"expected a PIL.Image or a numpy array, got {type(image).__name__}")
    gray = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)
    rgb = _array_rgb(image)
    if image.ndim == 3 and image.shape[2] == 4:
        rgb = np.ascontiguousarray(fill_transparent(rgb, _unit_values(image[:, :, 3])))
    return rgb, gray


def _array_rgb(image: np.ndarray) -> np.ndarray:
    array = image
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :1] if array.shape[2] == 1 else array[:, :, :3]
    elif array.ndim != 2:
        raise InputImageError(
            f"expected an array of shape HxW, HxWx1, HxWx3 or HxWx4, got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputImageError(f"expected a non-empty image, got shape {image.shape}")
    values = _unit_values(array)
    if values.ndim == 2:
        values = values[:, :, None]
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(values, dtype=np.float32)


def _unit_values(array: np.ndarray) -> np.ndarray:
    """An image array's values as float32 in [0, 1], by its dtype (its shape kept)."""
    if not array.dtype.isnative:  # big-endian data (from a file, or another machine)
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        values = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        values = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputImageError("image array contains NaN or infinite values")
        if float(array.max()) > 1.5:  # 0..255 data: clipped, it would all come out white
            raise InputImageError(
                f"a float image array must hold values in [0, 1]; this one reaches "
                f"{float(array.max()):g}: divide it by 255 (or by its range), or pass uint8"
            )
        if float(array.min()) < -0.5:  # [-1, 1] data: clipped, its dark half would be black
            raise InputImageError(
                f"a float image array must hold values in [0, 1]; this one goes down to "
                f"{float(array.min()):g}: for [-1, 1] data pass (array + 1) / 2"
            )
        values = np.clip(array, 0.0, 1.0).astype(np.float32)
    else:
        raise InputImageError(
            f"unsupported array dtype {array.dtype}; use uint8, uint16 or float in [0, 1]"
        )
    return values


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def _check_factor(factor: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    return int(factor)


def _resize_plane(plane: np.ndarray, factor: int) -> np.ndarray:
    height, width = plane.shape
    src = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    out = src.resize((width * factor, height * factor), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.float32)


def upscale_alpha(alpha: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic resize of an [H, W] alpha plane by ``factor``, clipped to [0, 1]."""
    factor = _check_factor(factor)
    if alpha.ndim != 2:
        raise ValueError(f"alpha must have shape [H, W], got {alpha.shape}")
    return np.clip(_resize_plane(alpha, factor), 0.0, 1.0)


# Input rows beyond a band that its bicubic rows depend on (the kernel reaches 2 input pixels).
_BICUBIC_MARGIN = 3


def bicubic_rows(rgb: np.ndarray, factor: int, y0: int, y1: int) -> np.ndarray:
    """Rows [y0, y1) of ``bicubic_upscale(rgb, factor)``, equal to slicing it, computed from the
    input rows they depend on, so a large upscale never has to be held whole."""
    factor = _check_factor(factor)
    height = rgb.shape[0]
    if not 0 <= y0 < y1 <= height * factor:
        raise ValueError(f"rows [{y0}, {y1}) are not inside 0..{height * factor}")
    a = max(0, y0 // factor - _BICUBIC_MARGIN)
    b = min(height, -(-y1 // factor) + _BICUBIC_MARGIN)
    return bicubic_upscale(rgb[a:b], factor)[y0 - a * factor : y1 - a * factor]


def bicubic_upscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic resize of float32 [H, W, 3] by ``factor`` at full float precision, clipped."""
    factor = _check_factor(factor)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must have shape [H, W, 3], got {rgb.shape}")
    planes = [_resize_plane(rgb[:, :, c], factor) for c in range(3)]
    return np.clip(np.stack(planes, axis=2), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Output paths and writing
# --------------------------------------------------------------------------------------------


def _allowed_suffixes() -> str:
    return " ".join(OUTPUT_FORMATS)


def format_for_path(path: str | Path) -> str:
    """Pillow format name for an output path's suffix, or ``OutputPathError``."""
    suffix = Path(path).suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None:
        shown = suffix or "no suffix"
        raise OutputPathError(f"{path}: cannot write {shown}; use one of {_allowed_suffixes()}")
    return fmt


# The longest side each format's encoder can write (libwebp's and the JPEG standard's limits);
# PNG and TIFF have none that an image under the pixel limit reaches.
MAX_OUTPUT_SIDE: Mapping[str, int] = {"WEBP": 16383, "JPEG": 65500}


def check_output_size(path: str | Path, width: int, height: int) -> None:
    """``OutputPathError`` if ``path``'s format cannot hold a ``width`` x ``height`` image: known
    before the upscale, not after it."""
    fmt = format_for_path(path)
    limit = MAX_OUTPUT_SIDE.get(fmt)
    if limit is not None and max(width, height) > limit:
        raise OutputPathError(
            f"{path}: the output would be {width}x{height} px and {fmt} holds at most {limit} px "
            "on a side; write .png or .tif instead, or downscale the input"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(input_path: str | Path, output_path: str | Path) -> Path:
    """Validate the output path before any work is done; return it resolved."""
    output = Path(output_path).expanduser()
    resolved = output.resolve()
    if resolved.is_dir():
        raise OutputPathError(f"{output} is a folder; give a file name such as out.png")
    format_for_path(output)
    parent = resolved.parent
    if not parent.is_dir():
        raise OutputPathError(
            f"{output}: folder {parent} does not exist; create it first or pick another output"
        )
    source = Path(input_path).expanduser().resolve()
    if resolved == source or _same_file(resolved, source):
        raise OutputPathError(
            f"{output} is the input file; choose a different output path so the input is kept"
        )
    check_writable(resolved, str(output))
    return resolved


def check_writable(target: Path, name: str, advice: str = "pick another output folder") -> None:
    """Create and delete a temporary file beside ``target``, as the final write will: a folder
    that refuses it fails now, before the upscale, not after it. (os.access cannot tell: root
    passes it on read-only mounts and immutable folders.)"""
    try:
        fd, probe = _open_temp(target)
    except OSError as exc:
        raise OutputPathError(
            f"{name}: cannot write in {target.parent} ({exc.strerror or exc}); {advice}"
        ) from exc
    os.close(fd)
    probe.unlink(missing_ok=True)


# The names _open_temp gives: ".{stem}.{12 hex digits}.tmp{suffix}".
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp(\.[^.]+)?")


def remove_stale_temps(folder: Path, older_than: float) -> list[Path]:
    """Remove, in ``folder`` alone, the temporary files that atomic writes cut short by a kill
    or a power loss left behind: named as this module names them and untouched for
    ``older_than`` seconds (a write fills its file within seconds, so a younger one may be
    another process's write under way). Return those removed; a file that cannot be removed
    stays."""
    now = time.time()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _open_temp(target: Path) -> tuple[int, Path]:
    # O_EXCL with mode 0o666 lets the umask decide permissions, unlike mkstemp's fixed 0o600.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # the stem cut short: a name near the file system's 255-byte limit must still fit
        stem = target.stem[:80]
        candidate = target.with_name(f".{stem}.{os.urandom(6).hex()}.tmp{target.suffix}")
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {target}")


Writer = Callable[[BinaryIO], None]


def write_files_atomic(
    files: Sequence[tuple[str | Path, Writer, str]], *, follow_links: bool = True
) -> list[Path]:
    """Write files that belong together (an image, its report, its step map), each given as
    (path, writer, what it is): all go to temporary files first and are moved into place only
    when every one was written, so a full disk or an encoder's refusal leaves all earlier files
    as they were. ``follow_links=False`` replaces a symbolic link itself, not the file it
    names."""
    staged: list[tuple[Path, Path, str]] = []
    try:
        for path, write, what in files:
            target = Path(path).expanduser()
            target = target.resolve() if follow_links else target.parent.resolve() / target.name
            try:
                fd, temp = _open_temp(target)
                staged.append((temp, target, what))
                with os.fdopen(fd, "wb") as fp:
                    write(fp)
                    fp.flush()
                    os.fsync(fp.fileno())
            except (OSError, ValueError) as exc:  # Pillow's encoders raise ValueError too
                kept = "; no output file was changed" if len(files) > 1 else ""
                raise OutputPathError(
                    f"{target}: cannot write the {what} ({_one_line(exc)}){kept}"
                ) from exc
        for temp, target, what in staged:
            try:
                os.replace(temp, target)
            except OSError as exc:
                raise OutputPathError(
                    f"{target}: cannot write the {what} ({_one_line(exc)})"
                ) from exc
    finally:
        for temp, _, _ in staged:
            temp.unlink(missing_ok=True)
    return [target for _, target, _ in staged]


def pil_writer(image: Image.Image, fmt: str, **save_args: Any) -> Writer:
    return lambda fp: image.save(fp, format=fmt, **save_args)


def bytes_writer(data: bytes) -> Writer:
    def write(fp: BinaryIO) -> None:
        fp.write(data)

    return write


def write_pil_atomic(path: str | Path, image: Image.Image, fmt: str, **save_args: Any) -> Path:
    """Save a PIL image atomically: nothing appears at ``path`` unless the save succeeded."""
    return write_files_atomic([(path, pil_writer(image, fmt, **save_args), "image")])[0]


def write_bytes_atomic(path: str | Path, data: bytes, *, follow_links: bool = True) -> Path:
    """Write a file (a report, a manifest) atomically; ``follow_links`` as in
    ``write_files_atomic``."""
    return write_files_atomic([(path, bytes_writer(data), "file")], follow_links=follow_links)[0]


def _to_uint(values: np.ndarray, maximum: int, dtype: type[np.generic]) -> np.ndarray:
    """[0, 1] floats (or uint8 / uint16 levels) as ``dtype`` levels of ``maximum``."""
    if values.dtype == dtype:
        return values
    if np.issubdtype(values.dtype, np.integer):
        scale = maximum / np.iinfo(values.dtype).max
        return np.round(values * np.float32(scale)).astype(dtype)
    return np.round(np.clip(values, 0.0, 1.0) * maximum).astype(dtype)


def gray_output(rgb: np.ndarray) -> np.ndarray:
    """Float [..., 3] as the runtime returns it for a gray input: its Rec. 601 luma in all
    three channels (the model adds faint colour; a gray photo stays gray)."""
    return np.repeat((rgb @ LUMA_601)[..., None], 3, axis=-1)


def has_gray_channels(rgb: np.ndarray) -> np.ndarray:
    """Per image of float [..., H, W, 3] in [0, 1]: whether its three channels are equal, as a
    gray input's are once read (``to_rgb_and_gray`` repeats its one channel), to within half an
    8-bit level: resizing a gray crop in float can leave them 1e-8 apart."""
    spread = np.max(rgb, axis=-1) - np.min(rgb, axis=-1)
    return np.all(spread <= 0.5 / 255, axis=(-2, -1))


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] of float [0, 1] or integer RGB."""
    weights = LUMA_601
    if np.issubdtype(rgb.dtype, np.integer):
        weights = weights / np.float32(np.iinfo(rgb.dtype).max)
    out = np.empty(rgb.shape[:2], dtype=np.float32)
    for y in range(0, rgb.shape[0], _ROWS_PER_CHUNK):  # no full-size float copy of the RGB
        out[y : y + _ROWS_PER_CHUNK] = rgb[y : y + _ROWS_PER_CHUNK].astype(np.float32) @ weights
    return out


def _build_pil(
    rgb: np.ndarray, alpha: np.ndarray | None, *, sixteen_bit_gray: bool, grayscale: bool
) -> Image.Image:
    if sixteen_bit_gray:
        return Image.fromarray(_to_uint(_luma(rgb), 65535, np.uint16))
    if grayscale:
        gray = _to_uint(_luma(rgb), 255, np.uint8)
        if alpha is None:
            return Image.fromarray(gray)
        return Image.fromarray(np.stack([gray, _to_uint(alpha, 255, np.uint8)], axis=2))
    colour = _to_uint(rgb, 255, np.uint8)
    if alpha is None:
        return Image.fromarray(colour)
    rgba = np.concatenate([colour, _to_uint(alpha, 255, np.uint8)[:, :, None]], axis=2)
    return Image.fromarray(rgba)


def save_image(
    path: str | Path,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    bit_depth: int = 8,
    grayscale: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> Path:
    """Write [H, W, 3] (float32 in [0, 1], or uint8 / uint16 levels) and an optional [H, W]
    alpha atomically; return the written path.

    JPEG cannot hold alpha: the image is flattened onto white (``flatten_on_white``). 16-bit
    is written only for grayscale PNG/TIFF without alpha (Pillow has no 16-bit RGB or
    gray+alpha mode, and keeping transparency matters more than the extra precision).
    ``icc_profile`` and ``exif`` (e.g. ``LoadedImage``'s) are embedded where the format holds
    them: PNG, JPEG and WebP take both (a JPEG only an EXIF that ``exif_fits``), TIFF the
    profile.
    """
    writer = image_writer(
        path,
        rgb,
        alpha,
        bit_depth=bit_depth,
        grayscale=grayscale,
        icc_profile=icc_profile,
        exif=exif,
    )
    return write_files_atomic([(path, writer, "image")])[0]


def image_writer(
    path: str | Path,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    bit_depth: int = 8,
    grayscale: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> Writer:
    """What ``save_image`` writes to ``path``, for ``write_files_atomic``."""
    image, fmt, save_args = _encoder_input(
        path, rgb, alpha, bit_depth, grayscale, icc_profile, exif
    )
    return pil_writer(image, fmt, **save_args)


def _encoder_input(
    path: str | Path,
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    bit_depth: int,
    grayscale: bool,
    icc_profile: bytes | None,
    exif: bytes | None,
) -> tuple[Image.Image, str, dict[str, Any]]:
    _check_arrays(rgb, alpha, bit_depth)
    fmt = format_for_path(path)
    image, save_args = _pil_for_format(rgb, alpha, fmt, bit_depth, grayscale)
    save_args |= _metadata_args(fmt, image.mode, icc_profile, exif)
    return image, fmt, save_args


def encode_image(
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    suffix: str = ".png",
    bit_depth: int = 8,
    grayscale: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """The bytes ``save_image`` would write to a file ending in ``suffix``."""
    image, fmt, save_args = _encoder_input(
        f"image{suffix}", rgb, alpha, bit_depth, grayscale, icc_profile, exif
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def _profile_fits(icc_profile: bytes, mode: str) -> bool:
    """Whether an ICC profile's colour space (header bytes 16 to 20) is the written image's: a
    CMYK input's profile on RGB pixels, or a gray one on RGB, would mislabel every colour."""
    space = icc_profile[16:20]
    return space == (b"GRAY" if mode in _GRAY_MODES else b"RGB ")


# A JPEG keeps the EXIF in one APP1 segment, whose length field leaves 65533 bytes (Pillow's
# limit; ICC profiles, by contrast, span several segments). PNG and WebP chunks hold far more.
JPEG_MAX_EXIF = 65533


def exif_fits(path: str | Path, exif: bytes | None) -> bool:
    """Whether ``path``'s format can hold ``exif`` as it is; one that cannot is written without
    it rather than failing after the upscale."""
    return not exif or format_for_path(path) != "JPEG" or len(exif) <= JPEG_MAX_EXIF


def _metadata_args(
    fmt: str, mode: str, icc_profile: bytes | None, exif: bytes | None
) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if fmt == "WEBP":
        mode = "RGB"  # Pillow's WebP encoder stores gray pixels as RGB
    if icc_profile and fmt in ("PNG", "JPEG", "WEBP", "TIFF") and _profile_fits(icc_profile, mode):
        args["icc_profile"] = icc_profile
    if exif and fmt in ("PNG", "JPEG", "WEBP") and (fmt != "JPEG" or len(exif) <= JPEG_MAX_EXIF):
        args["exif"] = exif
    return args


def flatten_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """[H, W, 3] (floats in [0, 1] or integer levels) composited over white by ``alpha``, as
    uint8: what a viewer shows of a transparent image on a white page. A format without alpha
    (JPEG) gets this rather than the colours stored under transparent pixels, which are
    ``fill_transparent``'s smeared neighbours."""
    out = np.empty(rgb.shape, dtype=np.uint8)
    top = np.iinfo(rgb.dtype).max if np.issubdtype(rgb.dtype, np.integer) else 1.0
    a_top = np.iinfo(alpha.dtype).max if np.issubdtype(alpha.dtype, np.integer) else 1.0
    for y in range(0, rgb.shape[0], _ROWS_PER_CHUNK):  # no full-size float copy
        colour = rgb[y : y + _ROWS_PER_CHUNK].astype(np.float32) / np.float32(top)
        a = np.clip(alpha[y : y + _ROWS_PER_CHUNK].astype(np.float32) / np.float32(a_top), 0, 1)
        flat = np.clip(colour, 0.0, 1.0) * a[:, :, None] + (1.0 - a[:, :, None])
        out[y : y + _ROWS_PER_CHUNK] = np.round(flat * 255.0).astype(np.uint8)
    return out


def _check_arrays(rgb: np.ndarray, alpha: np.ndarray | None, bit_depth: int) -> None:
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must have shape [H, W, 3], got {rgb.shape}")
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} does not match image {rgb.shape[:2]}")


def _pil_for_format(
    rgb: np.ndarray, alpha: np.ndarray | None, fmt: str, bit_depth: int, grayscale: bool
) -> tuple[Image.Image, dict[str, Any]]:
    if fmt == "JPEG" and alpha is not None:
        rgb, alpha = flatten_on_white(rgb, alpha), None
    sixteen = bit_depth == 16 and grayscale and fmt in ("PNG", "TIFF") and alpha is None
    image = _build_pil(rgb, alpha, sixteen_bit_gray=sixteen, grayscale=grayscale)
    # lossy formats at the same high quality (Pillow's WebP default, 80, is visibly softer)
    save_args: dict[str, Any] = {"quality": _LOSSY_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    return image, save_args
