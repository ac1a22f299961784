"""Image intake: decide from the file header whether an image may be decoded at all, then decode it as the
photographer saw it.

One pixel cap for every door an image comes through (training data, web uploads): the header gives the size,
and nothing is decoded when it is over the cap. Pillow's own decompression-bomb error (headers claiming more
than twice ``Image.MAX_IMAGE_PIXELS``) ends in the same message instead of a traceback.

``decode`` turns any file Pillow reads into 8-bit RGB plus an optional alpha mask:
- EXIF orientation is applied (phones store portrait shots as landscape pixels with orientation 6 or 8);
- 16-bit and 32-bit grey (``I;16``, ``I``, ``F``) is rescaled to 0‥255, not clipped (a clip turns it white);
- palette images keep their transparency, CMYK goes through Pillow's CMYK→RGB conversion;
- alpha is composited onto ``background``: rgb' = α·rgb + (1 − α)·background, and returned as the mask.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

# 50 megapixels: a 8,660 × 5,773 photo (every phone camera today) fits; one decoded RGB image then takes ≤ 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000

# EXIF orientations 5–8 turn the image by 90°: width and height swap
_TRANSPOSED = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


class UnusableImage(ValueError):
    """This file cannot be used as an image; the message says why (without the path: callers name the file)."""


def header_size(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) read from the header alone; raises UnusableImage when unreadable or over ``max_pixels``."""
    return probe(path, max_pixels=max_pixels).stored


@dataclass(frozen=True)
class Probe:
    """What the header says: the stored size, the size once EXIF orientation is applied, whether it has alpha."""

    stored: tuple[int, int]
    size: tuple[int, int]
    has_alpha: bool


def probe(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Read the header (no pixel data); raises UnusableImage when unreadable or over ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise UnusableImage(f"{w}×{h} is {w * h / 1e6:.1f} megapixels, over the cap of "
                                        f"{max_pixels / 1e6:g} megapixels (checked before decoding; raise "
                                        f"data.max_pixels to allow it)")
                # the EXIF block read at open (JPEG APP1, WebP, PNG eXIf before the pixels); im.getexif() would
                # decode a whole PNG to look for a late eXIf chunk
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
                orientation = exif.get(_EXIF_ORIENTATION, 1)
                has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    except Image.DecompressionBombError as e:
        raise UnusableImage(f"too many pixels (a decompression bomb?): {e}") from None
    except UnusableImage:
        raise
    except _ERRORS as e:
        raise UnusableImage(f"unreadable or corrupt ({type(e).__name__}: {e})") from None
    return Probe((w, h), (h, w) if orientation in _TRANSPOSED else (w, h), has_alpha)


def parse_colour(text: str) -> tuple[int, int, int]:
    """'white', 'gray', '#808080', 'rgb(0,0,0)' -> (r, g, b); ValueError names the text."""
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(f"{text!r} is not a colour (a name such as 'white' or '#rrggbb')") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth grey -> 8-bit 'L', scaled by the range the mode can hold (16-bit: /257), never clipped."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if a.max(initial=0) <= 1.0 else 65535.0  # float images are 0‥1 or hold 16-bit values
    elif im.mode.startswith("I;16") or a.max(initial=0) > 255:
        top = 65535.0
    else:
        top = 255.0  # a 32-bit 'I' image that only holds 8-bit values
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def decode(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image as displayed, alpha mask 'L' or None): oriented, converted, alpha composited onto
    ``background``. The header is checked against ``max_pixels`` first; raises UnusableImage."""
    probe(path, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
    except _ERRORS as e:
        raise UnusableImage(f"unreadable or corrupt ({type(e).__name__}: {e})") from None
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")  # a palette's (or tRNS chunk's) transparent entries become alpha
    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = im.getchannel("A")
        rgb = im.convert("RGBA").convert("RGB") if im.mode in ("RGBa", "La") else im.convert("RGB")
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, background), alpha)
        if alpha.getextrema() == (255, 255):
            alpha = None  # an alpha channel that is opaque everywhere masks nothing
        return rgb, alpha
    return im.convert("RGB"), None  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions
