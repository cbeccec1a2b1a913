"""Helpers of the rewriter chain tests."""

from __future__ import annotations

import os

from helpers import make_stage_dir  # noqa: F401  (re-exported for the chain tests)

# A key that must never show up in any output, log or file (the tests grep for it).
SENTINEL_KEY = "sk-mmcorpus-SENTINEL-7f3a9c1e5b"


def files_containing(root: str, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                continue
    return hits
