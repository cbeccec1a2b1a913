"""Image filters: decodes at all, allowed format, still image, pixel budget (decompression bombs are rejected
from the header, never decoded), minimum side and aspect ratio after EXIF orientation, and a full decode
(through ``transforms.images``) that catches truncation.

Defaults follow DataComp's basic filter (shorter side ≥ 200 px, aspect ratio ≤ 3) and Pillow's own
decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` = 89,478,485 pixels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from schemas import reasons
from schemas.records import Pair
from transforms import images
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
        reject_animated: reject animated GIF/WebP/APNG (``image_animated``) instead of silently
            training on their first frame.

    Example:
        ImageFilterConfig(min_side=448, max_aspect_ratio=4.0)
    """

    min_side: int | None = 200
    max_aspect_ratio: float | None = 3.0
    max_pixels: int | None = PIL_BOMB_PIXELS
    allowed_formats: tuple[str, ...] | None = ("JPEG", "PNG", "WEBP")
    full_decode: bool = True
    require_image: bool = True
    reject_animated: bool = True

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
        try:
            im = images.open_image(data)
        except Image.DecompressionBombError as e:
            return False, reasons.IMAGE_TOO_MANY_PIXELS, str(e)[:120]
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            foreign = images.sniff_format(data)
            if foreign is not None:
                return False, reasons.IMAGE_FORMAT, f"{foreign} is not a format mmcorpus reads"
            return False, reasons.IMAGE_UNDECODABLE, f"{type(e).__name__}: {str(e)[:100]}"
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                return False, reasons.IMAGE_UNDECODABLE, f"size {w}x{h}"
            if cfg.max_pixels is not None and w * h > cfg.max_pixels:
                return False, reasons.IMAGE_TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > {cfg.max_pixels}"
            head = images.read_header(im)
            if cfg.allowed_formats is not None and head.format not in cfg.allowed_formats:
                return False, reasons.IMAGE_FORMAT, (
                    f"{head.format} is not a format mmcorpus takes here (filter.image.allowed_formats = "
                    f"{', '.join(cfg.allowed_formats)})"
                )
            if head.frames > 1 and cfg.reject_animated:
                return False, reasons.IMAGE_ANIMATED, f"{head.format} with {head.frames} frames: only still images are taken"
            # Size rules see the picture as a viewer shows it: after the EXIF rotation.
            w, h = head.width, head.height
            if cfg.min_side is not None and min(w, h) < cfg.min_side:
                return False, reasons.IMAGE_TOO_SMALL, f"{w}x{h}, shorter side < {cfg.min_side}"
            if cfg.max_aspect_ratio is not None and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
                return False, reasons.IMAGE_ASPECT_RATIO, f"{w}x{h}, aspect {max(w, h) / min(w, h):.2f} > {cfg.max_aspect_ratio}"
        if cfg.full_decode:
            try:
                # Same decoder as dHash, pack and export (orientation, mode conversion); JPEGs at 1/8 scale.
                images.decode(data, max_pixels=cfg.max_pixels, draft_size=(max(1, w // 8), max(1, h // 8)))
            except OSError as e:
                msg = str(e)
                if "truncated" in msg or "broken data stream" in msg:
                    return False, reasons.IMAGE_TRUNCATED, msg[:120]
                return False, reasons.IMAGE_UNDECODABLE, f"{type(e).__name__}: {msg[:100]}"
            except (ValueError, SyntaxError, EOFError) as e:
                return False, reasons.IMAGE_UNDECODABLE, f"{type(e).__name__}: {str(e)[:100]}"
        self._info = (head.format, w, h)
        return True

    def annotate(self, pair: Pair) -> Pair:
        fmt, w, h = self._info
        return pair.replace(
            image_format=fmt, width=w, height=h, image_sha256=hashlib.sha256(pair.image).hexdigest()
        )


def image_filters(cfg: ImageFilterConfig) -> list[BaseFilter]:
    return [ImageFilter(cfg)]
