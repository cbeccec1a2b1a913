"""Image filters: exact reasons for corrupt, empty, bomb, small, skewed and foreign-format images."""

import hashlib
import io
import sys
import pathlib

import pytest
from PIL import Image

from schemas import reasons
from schemas.records import Pair
from transforms.filter_base import run_filters
from transforms.image_filters import ImageFilterConfig, image_filters

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fixtures"))
from make_bad_inputs import GOOD, jpeg, png_bomb_header  # noqa: E402

CHAIN = image_filters(ImageFilterConfig())


def encode(w, h, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def check(image, chain=CHAIN):
    return run_filters(Pair(key="k", caption="c", image=image), chain)


@pytest.mark.parametrize(
    "image, expected",
    [
        (None, reasons.IMAGE_MISSING),
        (b"", reasons.IMAGE_EMPTY),
        (b"definitely not an image", reasons.IMAGE_UNDECODABLE),
        (GOOD[: len(GOOD) // 2], reasons.IMAGE_TRUNCATED),
        (png_bomb_header(30000, 30000), reasons.IMAGE_TOO_MANY_PIXELS),
        (png_bomb_header(10000, 9000), reasons.IMAGE_TOO_MANY_PIXELS),
        (encode(150, 400, "PNG"), reasons.IMAGE_TOO_SMALL),
        (encode(1000, 250, "JPEG"), reasons.IMAGE_ASPECT_RATIO),
        (encode(300, 300, "GIF"), reasons.IMAGE_FORMAT),
        (encode(300, 300, "BMP"), reasons.IMAGE_FORMAT),
    ],
)
def test_image_reasons(image, expected):
    _, reason, _ = check(image)
    assert reason == expected


def test_kept_image_is_annotated():
    data = jpeg(320, 240, 7)
    pair, reason, _ = check(data)
    assert reason is None
    assert (pair.image_format, pair.width, pair.height) == ("JPEG", 320, 240)
    assert pair.image_sha256 == hashlib.sha256(data).hexdigest()


def test_caption_only_records_skip_image_rules():
    chain = image_filters(ImageFilterConfig(require_image=False))
    pair, reason, _ = check(None, chain)
    assert reason is None and pair.width is None


def test_bomb_is_refused_before_decoding(monkeypatch):
    def boom(self, *a, **k):
        raise AssertionError("a decompression bomb must never be decoded")

    monkeypatch.setattr(Image.Image, "load", boom)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", boom)
    _, reason, detail = check(png_bomb_header(30000, 30000))
    assert reason == reasons.IMAGE_TOO_MANY_PIXELS


def test_bad_config():
    with pytest.raises(ValueError):
        ImageFilterConfig(max_aspect_ratio=0.5)


def test_undecodable_detail_has_no_object_address_so_reruns_match():
    # PIL names the stream it could not read ("<_io.BytesIO object at 0x7f...>"): a per-run address that
    # would make two runs' ledgers differ. The ledger detail must not carry it.
    from schemas.records import Outcome, Pair as P
    from transforms.image_filters import ImageFilter

    f = ImageFilter(ImageFilterConfig())
    details = []
    for _ in range(2):
        pair = P(key="k1", image=b"not an image at all" * 10)
        ok, reason, detail = f.check(pair)
        assert (ok, reason) == (False, "image_undecodable")
        details.append(Outcome.dropped(pair, "rejected", reason, detail).ledger_row("filter").detail)
    assert details[0] == details[1] == "UnidentifiedImageError: cannot identify image file <_io.BytesIO object>"
