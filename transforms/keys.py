"""Stable sample keys: img2dataset's key when it is safe, otherwise a short hash of source + url + caption."""

from __future__ import annotations

import hashlib
import re

# Keys become WebDataset member names and file-name parts: no dots (WebDataset splits the
# extension at the first dot), no slashes, nothing a shell or a path join could misread.
SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def is_safe_key(key: str) -> bool:
    return bool(SAFE_KEY.match(key))


def hash_key(*parts: str | None, length: int = 16) -> str:
    """A short hex key from the given parts (None and "" hash differently)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(b"\x01" if p is None else b"\x00" + _utf8(p))
        h.update(b"\x1f")
    return h.hexdigest()[:length]


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # undecodable input bytes hash as those bytes
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\\ud800" escape
        return text.encode("utf-8", "surrogatepass")


def record_key(source_name: str, url: str | None, caption: str | None) -> str:
    """Key for a record that came without one (metadata tables): hash of source + url + caption."""
    return hash_key(source_name, url, caption)


def record_key_prefix(source_name: str) -> bytes:
    """What ``record_key`` hashes before the url: for ``text_record_key``."""
    return b"\x00" + _utf8(source_name) + b"\x1f\x00"


def text_record_key(prefix: bytes, url: str, caption: str) -> str:
    """``record_key(source_name, url, caption)`` for a url and caption that are str without surrogates
    (text read from Arrow string columns), given ``record_key_prefix(source_name)``: the same bytes
    hashed in one update (half the cost of ``hash_key``'s six)."""
    return hashlib.sha256(b"".join((prefix, url.encode(), b"\x1f\x00", caption.encode(), b"\x1f"))).hexdigest()[:16]


def safe_key(candidate: str | None, *fallback_parts: str | None) -> str:
    """``candidate`` when it is a safe key, else a hash of it and ``fallback_parts`` prefixed ``x``."""
    if candidate is not None and is_safe_key(candidate):
        return candidate
    return "x" + hash_key(candidate, *fallback_parts, length=15)
