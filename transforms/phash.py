"""Perceptual image hashes (64-bit dHash) and their pigeonhole banding for near-image dedup.

No Beam import. dHash (Krawetz, "Kind of Like That", 2013): grayscale, resize to 9×8, one bit per
horizontally adjacent pixel pair (left brighter than right). Re-encoding, resizing and small edits
move only a few bits; unrelated images differ in about half of them.
"""

from __future__ import annotations

import numpy as np

HASH_BITS = 64


def dhash(image_bytes: bytes) -> int:
    """64-bit difference hash of encoded image bytes (raises on undecodable images).

    Example:
        >>> from PIL import Image; import io
        >>> buf = io.BytesIO(); Image.new("RGB", (32, 32), "white").save(buf, "PNG")
        >>> dhash(buf.getvalue())
        0
    """
    from PIL import Image

    from transforms.images import decode

    # The upright, converted picture (EXIF orientation, alpha on white, CMYK via ICC) that the filter
    # checked and pack stores; JPEG draft mode decodes at 1/2..1/8 scale, a large speed-up for 9x8.
    small = decode(image_bytes, draft_size=(64, 64), gray=True).resize((9, 8), Image.Resampling.BILINEAR)
    px = np.asarray(small, dtype=np.int16)
    bits = (px[:, :-1] > px[:, 1:]).reshape(-1)
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


# A flat or smoothly graded image (blank banner, solid product background) hashes to (almost) all
# zeros or all ones; such hashes say nothing about the picture and would merge unrelated images.
MIN_DETAIL_BITS = 5


def is_low_detail(h: int) -> bool:
    """True when fewer than ``MIN_DETAIL_BITS`` bits are set, or fewer than that many are clear."""
    ones = h.bit_count()
    return ones < MIN_DETAIL_BITS or HASH_BITS - ones < MIN_DETAIL_BITS


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def chunk_widths(max_hamming: int) -> list[int]:
    """Split the 64 bits into ``max_hamming + 1`` near-equal chunks (pigeonhole principle: two
    hashes within ``max_hamming`` bits agree exactly on at least one chunk)."""
    k = max_hamming + 1
    base, extra = divmod(HASH_BITS, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def band_keys(h: int, max_hamming: int) -> list[bytes]:
    """Bucket keys, one per chunk: 1-byte chunk index + the chunk's bits (8 bytes)."""
    keys = []
    shift = HASH_BITS
    for i, w in enumerate(chunk_widths(max_hamming)):
        shift -= w
        value = (h >> shift) & ((1 << w) - 1)
        keys.append(bytes([i]) + value.to_bytes(8, "big"))
    return keys
