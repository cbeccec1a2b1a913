"""The 18-photo dedup case: every bundled photo resized many times, each copy with its own real caption, captions bridging photos.

Issue 10 measured it: 18 distinct photos (data/sample/cc_images), each resized about 220 times to
random sizes and aspect ratios, each copy carrying its own real CC3M caption, and a few captions
shared (exactly or with a one-word edit) between copies of different photos. One transitive
closure over caption and image edges collapses the 18 photos into one cluster; the right answer
is 18 kept records. Used by tests/dedup/test_photos.py and bench/dedup_quality.py.

Ground truth lives in each Pair's ``meta`` (``{"photo": i, "copy": j}``), written by this builder,
never by the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import random

from schemas.records import Pair

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
BOILERPLATE = "Stock Photo"  # put on the first copy of every photo: 18 records share it


def _captions(n: int, seed: int) -> list[str]:
    """``n`` real CC3M captions, distinct after lower-casing and dropping non-alphanumerics."""
    seen: set[str] = set()
    out: list[str] = []
    with open(SAMPLE / "cc3m_val_captions_8k.tsv", encoding="utf-8") as f:
        rows = [line.split("\t")[0].strip() for line in f]
    random.Random(seed).shuffle(rows)
    for cap in rows:
        folded = "".join(ch for ch in cap.lower() if ch.isalnum())
        if cap and folded not in seen and len(cap.split()) >= 4:
            seen.add(folded)
            out.append(cap)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct captions in the sample; asked for {n}")


def photo_pairs(copies: int = 220, seed: int = 7, bridges: bool = True, boilerplate: bool = True) -> list[Pair]:
    """``18 * copies`` Pairs. Per photo: copy 0 is the photo itself; copy 1 has copy 0's exact bytes
    (an exact-image duplicate); the others are resized to a random width (96–640 px) and aspect
    ratio (0.75–1.33 of the photo's) and re-encoded as JPEG at a random quality. About a third are
    flagged ``needs_rewrite``. With ``bridges``, photo i's copy 2 carries the caption of photo
    i+1's copy 3 exactly and its copy 4 carries photo i+1's copy 5 caption plus one word, so
    caption links chain all 18 photos. With ``boilerplate``, copy 0 of every photo is captioned
    ``BOILERPLATE``. Keys are random hex strings (key order is unrelated to photos)."""
    from PIL import Image

    rng = random.Random(seed)
    paths = sorted((SAMPLE / "cc_images").glob("*.jpg"))
    assert len(paths) == 18, paths
    caps = _captions(18 * copies, seed)
    pairs: list[Pair] = []
    for i, path in enumerate(paths):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            photo = im.convert("RGB")
        for j in range(copies):
            if j <= 1:
                img, w, h = data, photo.width, photo.height
            else:
                w = rng.randint(96, 640)
                aspect = rng.uniform(0.75, 1.33) * photo.width / photo.height
                h = max(48, round(w / aspect))
                buf = io.BytesIO()
                photo.resize((w, h), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=rng.randint(60, 95))
                img = buf.getvalue()
            key = hashlib.sha1(f"{seed}-{i}-{j}".encode()).hexdigest()[:16]
            pairs.append(
                Pair(
                    key=key, caption=caps[i * copies + j], image=img, image_format="JPEG", width=w, height=h,
                    image_sha256=hashlib.sha256(img).hexdigest(), source=f"photos#{i}-{j}",
                    meta=json.dumps({"copy": j, "photo": i}, sort_keys=True),
                    needs_rewrite=rng.random() < 1 / 3, quality_flags=[],
                )
            )
    for p in pairs:
        if p.needs_rewrite:
            p.quality_flags = ["caption_repetitive"]
    by = {(p.meta_dict()["photo"], p.meta_dict()["copy"]): p for p in pairs}
    if bridges and copies >= 6:
        for i in range(17):
            by[(i, 2)].caption = by[(i + 1, 3)].caption
            by[(i, 4)].caption = by[(i + 1, 5)].caption + " today"
    if boilerplate:
        for i in range(18):
            by[(i, 0)].caption = BOILERPLATE
    return pairs


def truth(pair: Pair) -> int:
    """The photo a Pair was made from."""
    return pair.meta_dict()["photo"]
