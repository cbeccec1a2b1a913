"""Pack-test inputs built from the bundled sample data: real photos, real captions, a few bad rows."""

from __future__ import annotations

import hashlib
import json
import pathlib

from schemas.records import Pair

SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "data" / "sample"


def sample_pairs(captions_only: int = 40) -> list[Pair]:
    """26 real image pairs, ``captions_only`` CC3M captions without image, one undecodable image and
    one caption far longer than any test seq_len."""
    pairs = []
    for folder, listing in (("cc_images", "pairs.jsonl"), ("skimage_pairs", "captions.jsonl")):
        for line in (SAMPLE / folder / listing).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            data = (SAMPLE / folder / rec["image"]).read_bytes()
            key = "img" + hashlib.sha1(rec["image"].encode()).hexdigest()[:12]
            pairs.append(Pair(key=key, caption=rec["caption"], image=data, source=f"{folder}/{rec['image']}"))
    lines = (SAMPLE / "cc3m_val_captions_8k.tsv").read_text(encoding="utf-8").splitlines()[:captions_only]
    for i, line in enumerate(lines):
        cap = line.split("\t", 1)[0]
        pairs.append(Pair(key=f"cap{i:05d}", caption=cap, source=f"cc3m#{i}"))
    pairs.append(Pair(key="badimage0001", caption="a broken image", image=b"\x89PNG not really", source="bad#0"))
    pairs.append(Pair(key="toolong00001", caption=" ".join(["word"] * 5000), source="long#0"))
    return pairs


def make_input_dir(output_dir: str, pairs: list[Pair], stage: str = "rewrite") -> str:
    """A finished stage output holding ``pairs`` (all kept), a rewrite output by default."""
    from helpers import make_stage_dir

    return make_stage_dir(output_dir, pairs, stage=stage, num_shards=2)
