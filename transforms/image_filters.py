"""Image filters: decodes at all, allowed format, pixel budget (decompression bombs are rejected from
the header, never decoded), minimum side, aspect ratio, and a full decode that catches truncation.

Defaults follow DataComp's basic filter (shorter side ≥ 200 px, aspect ratio ≤ 3) and Pillow's own
decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` = 89,478,485 pixels).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from schemas import reasons
from schemas.records import Pair
from transforms.filter_base import BaseFilter

PIL_BOMB_PIXELS = 89_478_485


@dataclass(frozen=True)
class ImageFilterConfig:
    """Image thresholds. ``None`` switches a check off.

    Args:
        min_side: reject when the shorter side is below this (DataComp basic: 200).
        max_aspect_ratio: reject when long side / short side exceeds this (DataComp basic: 3).
        max_pixels: reject when width × height exceeds this, read from the header (bomb guard).
        allowed_formats: Pillow format names to accept.
        full_decode: decode every image to catch truncated or corrupt data (JPEGs are decoded at
            reduced scale with ``draft``, which still reads the whole stream).
        require_image: for image inputs (tars, img2dataset parquet) a record without image bytes is
            rejected; caption-only metadata inputs set this False.

    Example:
        ImageFilterConfig(min_side=448, max_aspect_ratio=4.0)
    """

    min_side: int | None = 200
    max_aspect_ratio: float | None = 3.0
    max_pixels: int | None = PIL_BOMB_PIXELS
    allowed_formats: tuple[str, ...] | None = ("JPEG", "PNG", "WEBP")
    full_decode: bool = True
    require_image: bool = True

    def __post_init__(self):
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError("max_aspect_ratio must be >= 1")
        if self.min_side is not None and self.min_side < 1:
            raise ValueError("min_side must be >= 1")


class ImageFilter(BaseFilter):
    """One pass over the image bytes: header checks first (cheap, and bombs never get decoded),
    then a full decode. Annotates the kept pair with format, width, height and sha256."""

    name = "image"

    def __init__(self, cfg: ImageFilterConfig):
        self.cfg = cfg

    def applies_to(self, pair: Pair) -> bool:
        return pair.image is not None or self.cfg.require_image

    def check(self, pair: Pair):
        cfg = self.cfg
        data = pair.image
        if data is None:
            return False, reasons.IMAGE_MISSING, "no image bytes"
        if len(data) == 0:
            return False, reasons.IMAGE_EMPTY, "0 bytes"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as e:
                return False, reasons.IMAGE_TOO_MANY_PIXELS, str(e)[:120]
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                return False, reasons.IMAGE_UNDECODABLE, f"{type(e).__name__}: {str(e)[:100]}"
            w, h = im.size
            if w <= 0 or h <= 0:
                return False, reasons.IMAGE_UNDECODABLE, f"size {w}x{h}"
            if cfg.max_pixels is not None and w * h > cfg.max_pixels:
                return False, reasons.IMAGE_TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > {cfg.max_pixels}"
            if cfg.allowed_formats is not None and im.format not in cfg.allowed_formats:
                return False, reasons.IMAGE_FORMAT, f"{im.format}"
            if cfg.min_side is not None and min(w, h) < cfg.min_side:
                return False, reasons.IMAGE_TOO_SMALL, f"{w}x{h}, shorter side < {cfg.min_side}"
            if cfg.max_aspect_ratio is not None and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
                return False, reasons.IMAGE_ASPECT_RATIO, f"{w}x{h}, aspect {max(w, h) / min(w, h):.2f} > {cfg.max_aspect_ratio}"
            if cfg.full_decode:
                try:
                    if im.format == "JPEG":
                        im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                    im.load()
                except OSError as e:
                    msg = str(e)
                    if "truncated" in msg or "broken data stream" in msg:
                        return False, reasons.IMAGE_TRUNCATED, msg[:120]
                    return False, reasons.IMAGE_UNDECODABLE, f"{type(e).__name__}: {msg[:100]}"
                except (ValueError, SyntaxError, EOFError) as e:
                    return False, reasons.IMAGE_UNDECODABLE, f"{type(e).__name__}: {str(e)[:100]}"
            self._info = (im.format, w, h)
        return True

    def annotate(self, pair: Pair) -> Pair:
        fmt, w, h = self._info
        return pair.replace(
            image_format=fmt, width=w, height=h, image_sha256=hashlib.sha256(pair.image).hexdigest()
        )


def image_filters(cfg: ImageFilterConfig) -> list[BaseFilter]:
    return [ImageFilter(cfg)]
