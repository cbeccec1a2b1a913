"""dHash on real sample images: stable under re-encoding and resizing, far apart across images;
pigeonhole banding never misses a pair within the Hamming threshold."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from transforms import phash as ph


def _reencode(data: bytes, size=None, fmt="JPEG", quality=70) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, fmt, quality=quality)
        return buf.getvalue()


def test_dhash_survives_reencoding_and_resizing(sample_dir):
    paths = sorted((sample_dir / "cc_images").glob("*.jpg"))[:8]
    hashes = []
    for p in paths:
        data = p.read_bytes()
        h = ph.dhash(data)
        hashes.append(h)
        with Image.open(p) as im:
            w, hgt = im.size
        assert ph.hamming(h, ph.dhash(_reencode(data, quality=40))) <= 4
        assert ph.hamming(h, ph.dhash(_reencode(data, size=(w // 2, hgt // 2), fmt="PNG"))) <= 4
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert ph.hamming(hashes[i], hashes[j]) > 10


def test_dhash_raises_on_garbage():
    with pytest.raises(Exception):
        ph.dhash(b"not an image")


@pytest.mark.parametrize("k", [0, 3, 4, 8])
def test_pigeonhole_banding(k):
    widths = ph.chunk_widths(k)
    assert sum(widths) == 64 and len(widths) == k + 1
    rng = random.Random(k)
    for _ in range(300):
        a = rng.getrandbits(64)
        flips = rng.sample(range(64), rng.randint(0, k))
        b = a
        for f in flips:
            b ^= 1 << f
        assert set(ph.band_keys(a, k)) & set(ph.band_keys(b, k)), "pair within k bits shares no chunk"


def test_flat_images_are_low_detail(sample_dir):
    def png(color, size):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, "PNG")
        return buf.getvalue()

    assert ph.is_low_detail(ph.dhash(png("white", (32, 32))))
    assert ph.is_low_detail(ph.dhash(png((200, 200, 200), (50, 40))))
    for p in sorted((sample_dir / "cc_images").glob("*.jpg"))[:8]:
        assert not ph.is_low_detail(ph.dhash(p.read_bytes()))
