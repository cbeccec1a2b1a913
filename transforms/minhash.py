"""Caption normalisation, shingling and batched MinHash signatures (datasketch-compatible) with LSH banding.

Pure numpy/stdlib code with no Beam import, so it can be unit tested and benchmarked on its own.

Compatibility contract: ``MinHasher(num_perm, seed).signatures(shingle_lists)`` equals, row for row,
``datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=hash32, scheme="affine32")`` updated with
the same shingles (encoded UTF-8). So ``datasketch.LeanMinHash(seed=seed, hashvalues=row,
scheme="affine32")`` gives the same Jaccard estimates as our own ``estimate_jaccard``.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
import zlib
from typing import Iterable, Sequence

import numpy as np

from transforms import lang as lg

SCHEME = "affine32"  # datasketch 2.x default permutation scheme: fmix32, then a*h+b mod 2^32
WORD = "word"
CHAR = "char"
SHINGLE_KINDS = (WORD, CHAR)

_PUNCT_CATEGORIES = ("P", "S")  # Unicode punctuation and symbols fold to a space


class _FoldTable(dict):
    """``str.translate`` table, filled lazily: punctuation/symbol code points -> space, others kept."""

    def __missing__(self, cp: int):
        value = " " if unicodedata.category(chr(cp))[0] in _PUNCT_CATEGORIES else cp
        self[cp] = value
        return value


_FOLD = _FoldTable()


def normalize_caption(text: str | None) -> str:
    """The normal form used by exact-caption dedup and by shingling.

    Steps: Unicode NFKC (full-width letters, digits and punctuation become half-width); for text
    with Han characters, a trailing web credit or stock-site suffix ("…，图片来源：视觉中国", "_千图网")
    is dropped and Traditional characters become Simplified (OpenCC ``t2s``), so 一個男人 and 一个男人
    are one caption; ``casefold()``; every punctuation or symbol character (Unicode categories P*
    and S*, CJK punctuation included) becomes a space; whitespace runs collapse to one space, and
    whitespace next to a CJK character is removed (spacing there is typography, not a word
    boundary); leading/trailing space is stripped. So ``"A Dog -- on the Beach!!"`` and
    ``"a dog on the beach"`` are the same caption, and so are ``"一只猫，在沙发上。"`` and
    ``"一只猫 在沙发上"``, while digits and letters of every script are kept as they are.

    Example:
        >>> normalize_caption("  The DOG, on  the beach!! ")
        'the dog on the beach'
        >>> normalize_caption("一隻貓，在沙發上。 圖片來源：視覺中國")
        '一只猫在沙发上'
    """
    if not text:
        return ""
    cjk = False
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        if lg.HAN.search(text):
            text = lg.strip_zh_credit_suffix(lg.to_simplified(text))
        cjk = lg.CJK.search(text) is not None
    text = text.casefold().translate(_FOLD)
    text = " ".join(text.split())
    return lg.drop_spaces_near_cjk(text) if cjk else text


def caption_digest(normalized: str) -> str:
    """Stable 128-bit hex digest of a normalised caption: the exact-caption group key."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def shingles(normalized: str, kind: str = WORD, n: int = 2) -> list[str]:
    """Distinct shingles of a normalised caption, in first-seen order.

    ``word``: n-grams of whitespace tokens joined by one space; ``char``: n-grams of characters
    (spaces included). A caption shorter than ``n`` units yields one shingle, itself, so short
    captions still get a signature; an empty caption yields none.

    CJK: a caption whose characters are mostly CJK is shingled in character n-grams of length
    ``cjk_ngram(n)`` for ``char`` (one CJK character carries about what 2–3 Latin letters do) and
    of ``round(1.4 n)`` characters for ``word`` (it has no spaces to split words on; a Chinese word
    is about 1.4 characters): docs/bilingual.md has the measurement.

    Example:
        >>> shingles("a dog on the beach", "word", 2)
        ['a dog', 'dog on', 'on the', 'the beach']
    """
    if not normalized:
        return []
    if kind not in SHINGLE_KINDS:
        raise ValueError(f"unknown shingle kind {kind!r}; use one of {SHINGLE_KINDS}")
    if not normalized.isascii() and is_cjk_text(normalized):
        kind, n = CHAR, (cjk_ngram(n) if kind == CHAR else max(1, round(n * CJK_CHARS_PER_WORD)))
    if kind == WORD:
        toks = normalized.split(" ")
        if len(toks) <= n:
            return [normalized]
        if n == 1:
            grams = toks
        else:
            grams = [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    elif kind == CHAR:
        if len(normalized) <= n:
            return [normalized]
        grams = [normalized[i : i + n] for i in range(len(normalized) - n + 1)]
    else:
        raise ValueError(f"unknown shingle kind {kind!r}; use one of {SHINGLE_KINDS}")
    return list(dict.fromkeys(grams))


# Character n-gram length for CJK text: a Latin char 5-gram spans about one word (4.7 letters +
# space); a Chinese word is about 1.4 characters (docs/bilingual.md), so 2 CJK characters span
# about the same, and the planted-edit bench (bench/bilingual.py) picks 2 over 3: a dropped
# character costs 2 of ~15 bigrams but 3 of ~14 trigrams.
CJK_CHARS_PER_LATIN_CHAR = 0.4
CJK_CHARS_PER_WORD = 1.4  # word n-grams become character n-grams of about the same span (2 words → 3)


def cjk_ngram(n: int) -> int:
    """CJK character n-gram length used in place of a Latin character ``n``-gram (5 → 2)."""
    return max(1, round(n * CJK_CHARS_PER_LATIN_CHAR))


def is_cjk_text(normalized: str) -> bool:
    """Mostly CJK: at least half of the non-space characters are Han, Kana or Hangul."""
    cjk = len(lg.CJK.findall(normalized))
    return cjk > 0 and 2 * cjk >= len(normalized) - normalized.count(" ")


def hash32(shingle: bytes | str) -> int:
    """32-bit shingle hash (CRC-32 of the UTF-8 bytes). Pass it as ``hashfunc`` to datasketch.

    CRC-32 is not a good hash on its own, but datasketch's affine32 scheme (and so ours) runs every
    value through the MurmurHash3 ``fmix32`` avalanche before the permutations, which removes its
    linear structure; it is several times cheaper than the default SHA-1 per shingle.
    """
    if isinstance(shingle, str):
        shingle = shingle.encode("utf-8")
    return zlib.crc32(shingle)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) uint32 permutation parameters datasketch's affine32 MinHash draws for ``seed``."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


EMPTY_HASH = np.uint32(0xFFFFFFFF)


class MinHasher:
    """Batched MinHash signatures, bit-identical to datasketch's affine32 scheme with ``hash32``.

    Each caption's (shingles × num_perm) uint32 values are computed and reduced row by row; a chunk
    limit bounds one such matrix to about 32 MB.

    Args:
        num_perm: permutations (signature length).
        seed: datasketch seed for the permutations.

    Example:
        >>> mh = MinHasher(num_perm=64, seed=1)
        >>> sigs = mh.signatures([["a dog", "dog runs"], ["a dog"]])
        >>> sigs.shape
        (2, 64)
    """

    MAX_MATRIX_ELEMS = 8_000_000

    def __init__(self, num_perm: int = 128, seed: int = 1):
        if num_perm < 1:
            raise ValueError("num_perm must be >= 1")
        self.num_perm = num_perm
        self.seed = seed
        self.a, self.b = permutations(num_perm, seed)

    def hash_values(self, hvs: np.ndarray) -> np.ndarray:
        """Permuted values, shape (len(hvs), num_perm)."""
        hv = _fmix32(hvs.astype(np.uint32, copy=False)).reshape(-1, 1)
        return hv * self.a + self.b

    def signatures(self, shingle_lists: Sequence[Iterable[str]]) -> np.ndarray:
        """uint32 signatures, one row per shingle list; an empty list gives all ``0xFFFFFFFF``."""
        crc = zlib.crc32
        counts = np.zeros(len(shingle_lists), dtype=np.int64)
        flat: list[int] = []
        for i, sh in enumerate(shingle_lists):
            before = len(flat)
            flat.extend(crc(s.encode("utf-8")) for s in sh)
            counts[i] = len(flat) - before
        return self.signatures_from_hashes(np.asarray(flat, dtype=np.uint32), counts)

    def signatures_from_hashes(self, flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Signatures from concatenated 32-bit shingle hashes and the number of shingles per row."""
        n = len(counts)
        out = np.full((n, self.num_perm), EMPTY_HASH, dtype=np.uint32)
        if n == 0 or not np.any(counts):
            return out
        hv = _fmix32(np.asarray(flat, dtype=np.uint32)).reshape(-1, 1)
        a, b = self.a, self.b
        # One row at a time: its (shingles x num_perm) values are permuted and reduced while they are in
        # cache. np.minimum.reduceat over a whole batch's matrix (axis 0) was 4x slower: it reduces without
        # SIMD. A row longer than the chunk limit is reduced chunk by chunk (bounded temporaries).
        max_sh = max(1, self.MAX_MATRIX_ELEMS // self.num_perm)
        lo = 0
        for i, c in enumerate(counts.tolist()):
            if not c:
                continue
            row = out[i]
            for s in range(lo, lo + c, max_sh):
                t = hv[s : min(s + max_sh, lo + c)] * a
                t += b
                if s == lo:
                    t.min(axis=0, out=row)
                else:
                    np.minimum(row, t.min(axis=0), out=row)
            lo += c
        return out


def _crc32_table() -> np.ndarray:
    table = np.empty(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[i] = c
    return table


_CRC_TABLE = _crc32_table()  # zlib's CRC-32 (reflected polynomial 0xEDB88320), one byte at a time


def shingle_hashes(normalized: Sequence[str], kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``hash32`` (zlib.crc32 of the UTF-8 bytes) of the shingles of every caption, concatenated, and the
    number of hashes per caption: what ``signatures_from_hashes`` takes. Equal to hashing
    ``shingles(c, kind, n)`` for the signatures it gives (a minimum over the same set of values); an
    ASCII caption longer than ``n`` in ``char`` mode — nearly all captions by default — is hashed in numpy,
    every window at once, its repeated n-grams included, instead of one Python call per shingle."""
    counts = np.zeros(len(normalized), dtype=np.int64)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.uint32)] * len(normalized)
    fast = [i for i, c in enumerate(normalized) if kind == CHAR and len(c) > n and c.isascii()] if n >= 1 else []
    crc = zlib.crc32
    fast_set = set(fast)
    for i, c in enumerate(normalized):
        if i not in fast_set:
            h = np.fromiter((crc(x.encode("utf-8")) for x in shingles(c, kind, n)), dtype=np.uint32)
            parts[i] = h
            counts[i] = len(h)
    if fast:
        lens = np.fromiter((len(normalized[i]) for i in fast), dtype=np.int64, count=len(fast))
        buf = np.frombuffer("".join(normalized[i] for i in fast).encode("ascii"), dtype=np.uint8)
        windows = lens - n + 1
        base = np.concatenate(([0], np.cumsum(lens)[:-1]))
        wstart = np.concatenate(([0], np.cumsum(windows)[:-1]))
        total = int(windows.sum())
        pos = np.repeat(base - wstart, windows) + np.arange(total)
        c = np.full(total, 0xFFFFFFFF, dtype=np.uint32)
        for k in range(n):
            c = _CRC_TABLE[(c ^ buf[pos + k]) & 0xFF] ^ (c >> np.uint32(8))
        c ^= np.uint32(0xFFFFFFFF)
        for j, i in enumerate(fast):
            parts[i] = c[wstart[j]: wstart[j] + windows[j]]
            counts[i] = windows[j]
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
    return flat.astype(np.uint32, copy=False), counts


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature slots (datasketch's ``MinHash.jaccard``)."""
    return float(np.count_nonzero(sig_a == sig_b)) / float(len(sig_a))


def bbit_sketch(sig: np.ndarray) -> bytes:
    """Lowest 8 bits of every signature slot (b-bit minwise hashing with b = 8)."""
    return (sig & np.uint32(0xFF)).astype(np.uint8).tobytes()


def bbit_jaccard(a: bytes, b: bytes) -> float:
    """Jaccard estimate from two 8-bit sketches: P(slot match) = J + (1 - J) / 256, inverted."""
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    match = float(np.count_nonzero(x == y)) / float(len(x))
    return max(0.0, (match - 1.0 / 256.0) / (1.0 - 1.0 / 256.0))


# datasketch.lsh._optimal_param's answers for common settings (threshold, num_perm, fp_weight, fn_weight):
# its search integrates the S-curve for every (bands, rows) split, about 0.5 CPU s per dedup run.
# tests/dedup/test_minhash.py checks every entry against datasketch itself.
KNOWN_BANDS: dict[tuple[float, int, float, float], tuple[int, int]] = {
    (0.5, 128, 0.5, 0.5): (25, 5),
    (0.6, 128, 0.5, 0.5): (18, 7),
    (0.7, 128, 0.5, 0.5): (14, 9),
    (0.75, 128, 0.5, 0.5): (11, 11),
    (0.8, 128, 0.5, 0.5): (9, 13),
    (0.85, 128, 0.5, 0.5): (8, 16),
    (0.9, 128, 0.5, 0.5): (5, 25),
}


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative probability mass of
    the LSH S-curve around ``threshold``: datasketch's own ``MinHashLSH`` parameter search
    (``datasketch.lsh._optimal_param``), called directly so the choice always matches it
    (``KNOWN_BANDS`` holds its answers for common settings)."""
    known = KNOWN_BANDS.get((threshold, num_perm, fp_weight, fn_weight))
    if known is not None:
        return known
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(threshold, num_perm, fp_weight, fn_weight)
    return int(b), int(r)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One bucket key per band: 2-byte band index + 8-byte blake2b of the band's hash values."""
    raw = sig.astype("<u4", copy=False).tobytes()
    width = rows * 4
    return [
        i.to_bytes(2, "big") + hashlib.blake2b(raw[i * width : (i + 1) * width], digest_size=8).digest()
        for i in range(bands)
    ]


def sig_to_bytes(sig: np.ndarray) -> bytes:
    return sig.astype("<u4", copy=False).tobytes()


def sig_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u4")


_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio (odd): the multiplier of band_digests' word mixing


def band_digests(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Bucket ids of every row of ``sigs``: a (len(sigs), bands) uint64 matrix whose entry [i, b] is a 64-bit
    hash of the ``rows`` hash values of band b of row i (the bucket of row i in band b is (b, that value)).

    Equal bands always get equal ids; different bands collide with probability ~2^-64 per pair, as the
    8-byte blake2b digests of ``band_keys`` do (the ids differ from those digests; only the grouping
    matters, and a collision only adds a candidate pair that verification still checks). Computed in
    numpy for all rows and bands at once (a blake2b call per band was ~6 % of a dedup run's CPU)."""
    n = sigs.shape[0]
    words = np.ascontiguousarray(sigs[:, : bands * rows], dtype="<u4").reshape(n, bands, rows).astype(np.uint64)
    h = np.full((n, bands), 0xCBF29CE484222325, dtype=np.uint64)
    for j in range(rows):
        h ^= words[:, :, j]
        h *= _MIX
        h ^= h >> np.uint64(29)
    # splitmix64's finaliser: every output bit depends on every input bit (the low bits pick the partition)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h
