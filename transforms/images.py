"""The one image decoder: header facts without decoding, and a bounded decode to 8-bit RGB with EXIF orientation applied.

Every stage that looks at pixels (the image filter, dHash, pack's ``prepare_image``, the MiniCPM-V
export) decodes through here, so they all see the same picture. The rules (docs/inputs.md):

* **Orientation.** The EXIF orientation tag (JPEG APP1, PNG ``eXIf``, WebP ``EXIF``) is applied to
  the pixels; sizes reported by ``read_header`` are the oriented ones. An unreadable EXIF block
  (a broken APP segment) counts as "no orientation": the pixels are still used.
* **Modes.** ``RGB`` stays; ``L``/``1``/``YCbCr``/``LAB``/``HSV`` convert with Pillow's matrices;
  anything with alpha (``RGBA``, ``LA``, ``PA``, palette or grey/RGB with a ``transparency`` entry)
  is composited on white; ``CMYK`` goes through its embedded ICC profile to sRGB when there is one
  (naive inversion otherwise, or when the profile is unreadable); 16-bit ``I;16*`` and ``I`` are
  scaled from 0..65535 to 0..255 (rounded); ``F`` is clipped to 0..255.
* **Bounds.** Nothing is decoded beyond ``max_pixels`` (checked from the header); JPEGs can be
  decoded at a reduced scale with ``draft_size`` (libjpeg DCT scaling, never more pixels than needed).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
WHITE = (255, 255, 255)
# EXIF orientation -> the transpose that makes the picture upright (EXIF 2.32, tag 0x0112).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class TooManyPixels(ValueError):
    """The header declares more pixels than the caller allows; nothing was decoded."""


@dataclass(frozen=True)
class Header:
    """What the header says, before any pixel is decoded.

    Args:
        format: Pillow format name (``JPEG``, ``PNG``, ...).
        width, height: size after EXIF orientation (what a viewer shows).
        mode: Pillow mode of the stored pixels (``RGB``, ``CMYK``, ``I;16``, ...).
        orientation: EXIF orientation 1..8 (1 when absent or unreadable).
        frames: number of frames (> 1: animated GIF / WebP / APNG).
    """

    format: str | None
    width: int
    height: int
    mode: str
    orientation: int
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# Containers Pillow (as installed) does not open, by their magic bytes, so the ledger can name them.
_FOREIGN_MAGIC = (
    (4, (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypmif1", b"ftypmsf1"), "HEIC"),
    (4, (b"ftypavif", b"ftypavis"), "AVIF"),
    (0, (b"\xff\x0a", b"\x00\x00\x00\x0cJXL "), "JPEG XL"),
    (0, (b"%PDF",), "PDF"),
    (0, (b"<svg", b"<?xml"), "SVG/XML"),
    (0, (b"\x00\x00\x00\x0cjP  ",), "JPEG 2000"),
    (4, (b"ftypmp4", b"ftypisom", b"ftypqt"), "MP4 video"),
)


def sniff_format(data: bytes) -> str | None:
    """Name of a known image/media container that Pillow cannot open here, from its magic bytes."""
    for offset, magics, name in _FOREIGN_MAGIC:
        if any(data[offset : offset + len(m)] == m for m in magics):
            return name
    return None


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` on bytes with Pillow's bomb *warning* silenced (our own ``max_pixels`` decides);
    Pillow's hard ``DecompressionBombError`` (2× its limit) still raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when there is no EXIF, or it is broken (pixels stay usable)."""
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a corrupt APP1/eXIf block: Pillow raises many types; the pixels are still fine
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def frame_count(im: Image.Image) -> int:
    try:
        return int(getattr(im, "n_frames", 1) or 1)
    except Exception:  # a GIF whose later frames are corrupt: the count is unknown but > 1
        return 2


def read_header(im: Image.Image) -> Header:
    """Header facts; an MPO (a camera JPEG with an embedded preview or depth map after the primary
    picture) is reported as the JPEG it is, with one frame: the extra pictures are not an animation."""
    w, h = im.size
    o = orientation(im)
    if o in _SWAPS_SIDES:
        w, h = h, w
    if im.format == "MPO":
        return Header(format="JPEG", width=w, height=h, mode=im.mode, orientation=o, frames=1)
    return Header(format=im.format, width=w, height=h, mode=im.mode, orientation=o, frames=frame_count(im))


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        from PIL import ImageCms

        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
            if out is not None:
                return out
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unreadable or non-CMYK profile: fall back to the profile-less conversion below
    return im.convert("RGB")


def _scale_16_bit(im: Image.Image) -> Image.Image:
    a = np.asarray(im).astype(np.int64)
    a = np.clip(a, 0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Explicit conversion of a loaded image to 8-bit RGB (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        return _composite_on_white(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _SIXTEEN_BIT:
        return _scale_16_bit(im)
    if mode == "F":
        a = np.clip(np.asarray(im), 0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def decode(
    data: bytes,
    *,
    max_pixels: int | None = None,
    draft_size: tuple[int, int] | None = None,
    gray: bool = False,
) -> Image.Image:
    """Decode to an upright 8-bit ``RGB`` (or ``L`` with ``gray``) image.

    Args:
        data: encoded image bytes.
        max_pixels: raise ``TooManyPixels`` (nothing decoded) when the header declares more.
        draft_size: for JPEG, decode at the smallest DCT scale that still covers this (upright) size.
        gray: return ``L`` (a greyscale JPEG draft then decodes the luma channel only).

    Raises whatever Pillow raises on bytes it cannot decode.

    Example:
        im = decode(jpeg_bytes, max_pixels=89_478_485)  # upright RGB
    """
    im = open_image(data)
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise TooManyPixels(f"{w}x{h} = {w * h} pixels > {max_pixels}")
    o = orientation(im)
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        dw, dh = draft_size
        if o in _SWAPS_SIDES:
            dw, dh = dh, dw
        # A greyscale draft of a YCbCr JPEG decodes the luma channel only; CMYK keeps its mode.
        im.draft("L" if gray and im.mode in ("L", "RGB") else "RGB", (max(1, dw), max(1, dh)))
    im.load()
    if gray and im.mode == "L" and "transparency" not in im.info:
        out = im
    else:
        out = to_rgb(im)
        if gray:
            out = out.convert("L")
    if o in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[o])
    return out
