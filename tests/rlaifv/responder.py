"""RLAIF-V test helpers: the bundled photos as Pair records, and a deterministic stand-in responder.

The responder is ``rewriter.standin.rlaifv_respond`` (described there).
"""

from __future__ import annotations

import json
import pathlib

from rewriter.standin import rlaifv_respond as respond  # noqa: F401 (re-exported for the tests)

REPO = pathlib.Path(__file__).resolve().parents[2]
PHOTOS = REPO / "data" / "sample" / "skimage_pairs"


def photo_pairs():
    from schemas.records import Pair

    out = []
    for line in (PHOTOS / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        stem = r["image"].rsplit(".", 1)[0].replace("_", "-")
        out.append(Pair(key=stem, caption=r["caption"], image=(PHOTOS / r["image"]).read_bytes(),
                        source=f"skimage_pairs/{r['image']}"))
    return sorted(out, key=lambda p: p.key)

