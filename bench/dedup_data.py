"""Caption sets for the dedup benchmarks: the real sample captions, realistic edits of them, and
synthetic corpora with planted duplicate groups (sizes 2..1000), written as a finished stage output."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.manifest import DATA_DIR, FILE_KIND_DATA, LEDGER_DIR, FILE_KIND_LEDGER, FileEntry, Manifest, config_hash, shard_name
from schemas.records import PAIR_SCHEMA, LEDGER_SCHEMA
from transforms.stage_io import table_to_parquet_bytes, write_bytes_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "sample")

SITE_NAMES = ["| Shutterstock", "- Getty Images", "via Pinterest", "- Etsy", "| eBay", "- Alamy Stock Photo", "on Flickr"]


def real_captions() -> list[str]:
    """Every caption of the bundled samples: cc3m tsv, img2dataset parquet (TEXT), cc_images jsonl."""
    caps: list[str] = []
    with open(os.path.join(SAMPLE, "cc3m_val_captions_8k.tsv"), encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row and row[0].strip():
                caps.append(row[0])
    t = pq.read_table(os.path.join(SAMPLE, "img2dataset_sample_1000.parquet"), columns=["TEXT"])
    caps += [c for c in t.column("TEXT").to_pylist() if c and c.strip()]
    with open(os.path.join(SAMPLE, "cc_images", "pairs.jsonl"), encoding="utf-8") as f:
        for line in f:
            c = json.loads(line).get("caption")
            if c and c.strip():
                caps.append(c)
    return caps


def edit_caption(text: str, rng: random.Random, vocab: list[str]) -> tuple[str, str]:
    """One realistic web alt-text edit; returns (edited, edit name)."""
    words = text.split()
    kind = rng.choice(["site", "number", "case_punct", "swap", "replace", "drop", "prefix", "insert"])
    if kind == "site":
        out = f"{text} {rng.choice(SITE_NAMES)}"
    elif kind == "number":
        nums = re.findall(r"\d+", text)
        if nums:
            out = text.replace(nums[0], str(int(nums[0]) + rng.randint(1, 9)), 1)
        else:
            out = f"{text} {rng.randint(2, 99)}"
    elif kind == "case_punct":
        out = (text.upper() if rng.random() < 0.5 else text.title()) + rng.choice(["!", ".", " ...", " -"])
    elif kind == "swap" and len(words) >= 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        out = " ".join(words)
    elif kind == "replace" and len(words) >= 2:
        words[rng.randrange(len(words))] = rng.choice(vocab)
        out = " ".join(words)
    elif kind == "drop" and len(words) >= 4:
        del words[rng.randrange(len(words))]
        out = " ".join(words)
    elif kind == "prefix":
        out = rng.choice(["Stock photo of ", "Photo: ", "Image of ", "Picture of "]) + text
    else:
        words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
        out = " ".join(words)
        kind = "insert"
    return out, kind


def vocabulary(caps: list[str]) -> list[str]:
    words = sorted({w for c in caps for w in c.lower().split() if w.isalpha()})
    return words


def synthetic_captions(n: int, seed: int = 0, dup_fraction: float = 0.3) -> tuple[list[str], list[int]]:
    """``n`` captions of 5..20 words drawn from the real caption vocabulary, with about
    ``dup_fraction`` of them in planted groups of sizes 2..1000 (log-uniform), each member an
    edit chain from the group's base caption. Returns (captions, group id per caption, -1 = none)."""
    rng = random.Random(seed)
    vocab = vocabulary(real_captions())
    caps: list[str] = []
    groups: list[int] = []
    planted = 0
    gid = 0
    target = int(n * dup_fraction)
    while planted < target:
        size = min(int(round(2 ** rng.uniform(1, 10))), 1000, target - planted)
        if size < 2:
            break
        base = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 20)))
        for _ in range(size):
            text = base
            for _ in range(rng.choice([0, 1, 1, 2])):
                text, _kind = edit_caption(text, rng, vocab)
            caps.append(text)
            groups.append(gid)
        planted += size
        gid += 1
    while len(caps) < n:
        caps.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 20))))
        groups.append(-1)
    order = list(range(len(caps)))
    rng.shuffle(order)
    return [caps[i] for i in order], [groups[i] for i in order]


def write_caption_stage(output_dir: str, captions: list[str], num_shards: int = 16) -> str:
    """Write captions as a finished (caption-only) stage output, without running Beam."""
    shards: list[list[dict]] = [[] for _ in range(num_shards)]
    for i, cap in enumerate(captions):
        key = hashlib.sha1(f"synthetic-{i}".encode()).hexdigest()[:16]
        shards[i % num_shards].append(
            {"key": key, "url": f"http://example.invalid/{i}.jpg", "caption": cap, "source": f"synthetic#{i}", "meta": "{}",
             "quality_flags": [], "needs_rewrite": False}
        )
    files = []
    for s, rows in enumerate(shards):
        rows.sort(key=lambda r: r["key"])
        name = shard_name(s, num_shards)
        for kind, sub, schema, data in (
            (FILE_KIND_DATA, DATA_DIR, PAIR_SCHEMA, rows),
            (FILE_KIND_LEDGER, LEDGER_DIR, LEDGER_SCHEMA,
             [{"key": r["key"], "stage": "filter", "status": "kept", "reason": "ok", "source": r["source"]} for r in rows]),
        ):
            raw = table_to_parquet_bytes(pa.Table.from_pylist(data, schema=schema), 1024)
            write_bytes_atomic(os.path.join(output_dir, sub, name), raw)
            files.append(FileEntry(f"{sub}/{name}", kind, len(data), len(raw), hashlib.sha256(raw).hexdigest()))
    n = len(captions)
    cfg = {"synthetic": True, "n": n}
    m = Manifest(
        stage="filter", software_version="bench", config=cfg, config_hash=config_hash(cfg),
        input={"kind": "synthetic", "fingerprint": f"synthetic-{n}"},
        counts={"inputs": n, "ledger_rows": n, "outputs": n, "by_status": {"kept": n}, "by_reason": {"kept/ok": n}},
        files=files,
    )
    write_bytes_atomic(os.path.join(output_dir, "manifest.json"), m.to_json().encode())
    return output_dir


def code_version() -> str:
    """``git rev-parse --short HEAD`` of the measured code (``+changes`` when the tree differs), or "unknown"."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "bench", "transforms", "pipelines", "schemas"],
                               capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")
