"""``mmcorpus report RUN_OR_STAGE_DIR --output DIR``: a static, self-contained HTML report of a run.

What it shows, per run (a directory of stage outputs) and per stage (read by its manifest's ``stage``):
    overview   the funnel (in → kept, removed by reason, per stage), the ``stats`` plots, counts per
               ``dataset`` / ``lang`` when the records carry those columns
    samples    per stage and per (status, reason): thumbnails with caption, key, reason and ledger
               detail; every key links to its trace through the whole run (``inspect --key``)
    dedup      sampled clusters and the largest ones, every member side by side with link type and
               distance, the kept representative marked
    rewrite    raw caption, QA pairs and adopted caption side by side, failures with their reason,
               model and prompt version
    packs      per sampled pack a bar of each sample's text and image-placeholder spans, the fill,
               and the pack's images
    other      stages this module does not know get the generic sample section and their manifest

Cost follows the sample, not the corpus: ledgers are scanned in narrow columns (key, status, reason)
row group by row group, samples are the keys with the smallest seeded key hash per group (so a key
sampled at one stage tends to be sampled at the next), and wide columns (images, captions) are read
only from the row groups that hold sampled keys. Same run + seed ⇒ byte-identical files. Every
string goes through Jinja's autoescape; thumbnails are small JPEG files beside the HTML; nothing
loads from the network.

Example:
    mmcorpus report build/demo/photos --output build/demo/report --samples 6 --seed 0
    mmcorpus report build/demo --output build/demo/report --raw-input data/sample/i2d_webdataset
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import io
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines import inspection
from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA, FILE_KIND_LEDGER, MANIFEST_NAME, Manifest, shard_name
from schemas.records import KEPT, STATUSES
from transforms.stage_io import join, read_bytes, read_manifest, shard_of, write_bytes_atomic

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "report")
MARKER = ".mmcorpus-report"  # written into the output dir: a later report may clear it
THUMB_DIR = "thumbs"
# Columns read for a record card; never more (no token ids, no meta blobs).
RECORD_COLUMNS = ("key", "caption", "raw_caption", "qa", "image", "width", "height", "source",
                  "rewrite_model", "prompt_version", "cluster_id", "cluster_size")
PACK_COLUMNS = ("pack_id", "seq_len", "num_tokens", "cu_seqlens", "sample_keys", "images", "image_sample",
                "image_offset", "image_length", "image_width", "image_height", "image_grid_cols", "image_grid_rows")
GROUP_COLUMNS = ("dataset", "lang")
# Link distances the dedup ledger detail may carry ("jaccard 0.82", "hamming=3", {"distance": 0.1}).
_DISTANCE = re.compile(r"\b(jaccard|similarity|distance|dist|hamming)\b\s*[=:]?\s*(-?\d+(?:\.\d+)?)", re.I)
_MAX_DECODE_PIXELS = 89_478_485  # Pillow's bomb limit, as the image filter uses


@dataclass(frozen=True)
class ReportConfig:
    """What the report samples and how it draws thumbnails.

    Args:
        samples: records per (stage, status, reason) group; also sampled dedup clusters and packs.
        seed: sampling seed (same run + seed ⇒ the same report, byte for byte).
        thumb_max_side: longest thumbnail side in pixels.
        thumb_quality: thumbnail JPEG quality (1–95).
        largest_clusters: the largest dedup clusters always shown, besides the sampled ones.
        cluster_members: members shown per cluster (the kept one first, then by key hash).
        stats_rows: rows per stage the ``stats`` plots read (None: every row).
        raw_inputs: the filter stages' raw inputs (directories or files, as given to ``mmcorpus
            filter --input``), to show images and captions of records the filter removed (their only
            copy is there). A ledger ``source`` is looked up in each, first match wins.

    Example:
        >>> ReportConfig(samples=4, thumb_max_side=128).thumb_quality
        75
    """

    samples: int = 6
    seed: int = 0
    thumb_max_side: int = 160
    thumb_quality: int = 75
    largest_clusters: int = 3
    cluster_members: int = 12
    stats_rows: int | None = 10_000
    raw_inputs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if not 16 <= self.thumb_max_side <= 2048:
            raise ValueError("thumb_max_side must be within 16..2048")
        if not 1 <= self.thumb_quality <= 95:
            raise ValueError("thumb_quality must be within 1..95")
        if self.largest_clusters < 0 or self.cluster_members < 2:
            raise ValueError("largest_clusters must be >= 0 and cluster_members >= 2")
        if self.stats_rows is not None and self.stats_rows < 1:
            raise ValueError("stats_rows must be >= 1 or None")


# --- key-hash sampling -------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_POLY = 0x100000001B3  # FNV-1a 64 prime: odd, so the position weights never vanish mod 2^64


def _mix64(z):
    """splitmix64's finaliser (works on Python ints and numpy uint64 arrays alike)."""
    if isinstance(z, int):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        return z ^ (z >> 31)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seed_word(seed: int) -> int:
    return _mix64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64)


def key_hash(key: str, seed: int) -> int:
    """The sampling hash of one key: a polynomial over its UTF-8 bytes, mixed with the seed.
    ``key_hashes`` computes the same numbers for a whole Arrow column at once."""
    h = 0
    w = 1
    for b in key.encode("utf-8"):
        h = (h + (b + 1) * w) & _M64
        w = (w * _POLY) & _M64
    return _mix64(h ^ _seed_word(seed) ^ ((len(key.encode("utf-8")) * 0x9E3779B97F4A7C15) & _M64))


def key_hashes(keys: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """``key_hash`` of every string in ``keys`` (nulls hash as ""), vectorised with numpy."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    arr = pc.cast(keys.fill_null(""), pa.large_binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    total = int(offsets[-1] - offsets[0])
    h = np.zeros(n, dtype=np.uint64)
    if total:
        seg = data[offsets[0]: offsets[-1]].astype(np.uint64) + np.uint64(1)
        maxlen = int(lengths.max())
        with np.errstate(over="ignore"):
            powers = np.ones(maxlen, dtype=np.uint64)
            powers[1:] = np.cumprod(np.full(maxlen - 1, _POLY, dtype=np.uint64))  # wraps mod 2^64
            starts = (offsets[:-1] - offsets[0])
            pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
            contrib = seg * powers[pos]
            nonempty = lengths > 0
            h[nonempty] = np.add.reduceat(contrib, starts[nonempty])
    with np.errstate(over="ignore"):
        h ^= np.uint64(_seed_word(seed))
        h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _mix64(h)


class BottomK:
    """The ``k`` (hash, key) pairs with the smallest hashes seen, per group: a seeded, uniform,
    order-independent sample that never holds more than ``k`` keys per group."""

    def __init__(self, k: int):
        self.k = k
        self.groups: dict[Any, list[tuple[int, str]]] = {}

    def offer(self, group, hashes: np.ndarray, keys: pa.Array) -> None:
        if len(hashes) > self.k:
            idx = np.argpartition(hashes, self.k - 1)[: self.k]
        else:
            idx = np.arange(len(hashes))
        cand = list(zip((int(x) for x in hashes[idx]), keys.take(pa.array(idx)).to_pylist()))
        cur = self.groups.setdefault(group, [])
        self.groups[group] = heapq.nsmallest(self.k, cur + cand)

    def sample(self, group) -> list[str]:
        return [k for _, k in sorted(self.groups.get(group, []))]


# --- reading stage outputs by row group ----------------------------------------------------------


def _open_parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(FileSystems.open(path, compression_type="uncompressed"))


def _row_groups_for_keys(pf: pq.ParquetFile, keys: list[str]) -> list[int]:
    """Row groups whose key statistics may hold any of ``keys`` (stage shards are sorted by key)."""
    names = pf.schema_arrow.names
    if "key" not in names:
        return list(range(pf.num_row_groups))
    col = names.index("key")
    keys = sorted(keys)
    out = []
    for i in range(pf.num_row_groups):
        st = pf.metadata.row_group(i).column(col).statistics
        if st is None or not st.has_min_max:
            out.append(i)
            continue
        lo, hi = st.min, st.max
        j = np.searchsorted(np.array(keys, dtype=object), lo)
        if j < len(keys) and keys[j] <= hi:
            out.append(i)
    return out


def fetch_rows(stage_dir: str, m: Manifest, keys: list[str], columns: tuple[str, ...] = RECORD_COLUMNS) -> dict[str, dict]:
    """Data rows of ``keys`` in a stage output: only the shard file of each key, only the row
    groups whose key range holds it, only ``columns``."""
    files = m.files_of(FILE_KIND_DATA)
    if not files or not keys:
        return {}
    n = m.config.get("num_shards")
    by_file: dict[str, list[str]] = {}
    for key in keys:
        hit = [f.path for f in files if f.path.endswith(shard_name(shard_of(key, n), n))] if isinstance(n, int) and n > 0 else []
        for p in hit or [f.path for f in files]:
            by_file.setdefault(p, []).append(key)
    out: dict[str, dict] = {}
    for rel, ks in sorted(by_file.items()):
        pf = _open_parquet(join(stage_dir, rel))
        if "key" not in pf.schema_arrow.names:  # a later stage's own record layout: no cards from it
            continue
        cols = [c for c in columns if c in pf.schema_arrow.names]
        want = pa.array(sorted(set(ks)), pa.string())
        for rg in _row_groups_for_keys(pf, ks):
            t = pf.read_row_group(rg, columns=cols)
            t = t.filter(pc.is_in(t.column("key"), value_set=want))
            for r in t.to_pylist():
                out.setdefault(r["key"], r)
    return out


@dataclass
class StageScan:
    """What one pass over a stage's ledger (narrow columns) found."""

    groups: list[tuple[str, str, int]]  # (status, reason, count) in display order
    samples: dict[tuple[str, str], list[str]]
    cluster_sizes: Counter = field(default_factory=Counter)  # dedup: duplicates per cluster_id
    cluster_kept: dict[str, str] = field(default_factory=dict)
    cluster_where: dict[str, set] = field(default_factory=dict)  # cluster_id -> {(ledger file, row group)}
    row_groups_read: int = 0  # row groups whose key column was read (the cost of sampling)
    rg_rank: dict[tuple[str, int], int] = field(default_factory=dict)  # seeded order of (ledger file, row group)


# A group with at most RARE_FACTOR * samples rows is sampled from all its rows; a larger one from
# the rows it has in a few row groups picked by a seeded hash (at least CANDIDATE_FACTOR * samples
# candidates), so the key column is read from a bounded number of row groups whatever the corpus.
RARE_FACTOR = 8
CANDIDATE_FACTOR = 4


def scan_ledger(stage_dir: str, m: Manifest, cfg: ReportConfig) -> StageScan:
    """Sample ``cfg.samples`` keys per (status, reason).

    Two steps: status and reason (dictionary-encoded, a few bytes per row) are read for every row
    group to know where each group's rows are; keys are read only from the row groups the sample
    needs, and the sample is the keys with the smallest seeded key hash among the candidates. For
    dedup, ``cluster_id`` of the duplicates is counted too (the largest clusters need every one).
    """
    files = sorted(m.files_of(FILE_KIND_LEDGER), key=lambda f: f.path)
    where: dict[tuple[str, str], list[tuple[str, int, np.ndarray]]] = {}
    sizes: Counter = Counter()
    kept_of: dict[str, str] = {}
    cluster_where: dict[str, set] = {}
    for f in files:
        pf = pq.ParquetFile(FileSystems.open(join(stage_dir, f.path), compression_type="uncompressed"),
                            read_dictionary=["status", "reason"])
        if pf.metadata.num_rows == 0:
            continue
        # one read per file of two dictionary columns; row group boundaries from the footer
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        t = pf.read(columns=["status", "reason"])
        st, rs = t.column("status").combine_chunks(), t.column("reason").combine_chunks()
        if not isinstance(st, pa.DictionaryArray):
            st, rs = st.dictionary_encode(), rs.dictionary_encode()
        si = st.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        ri = rs.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        width = len(rs.dictionary) + 1
        code = si * width + ri
        s_names, r_names = st.dictionary.to_pylist(), rs.dictionary.to_pylist()
        for rg in range(pf.num_row_groups):
            part = code[starts[rg]: starts[rg + 1]]
            for c in np.unique(part):
                idx = np.nonzero(part == c)[0].astype(np.int32)
                where.setdefault((s_names[c // width], r_names[c % width]), []).append((f.path, rg, idx))
        names = pf.schema_arrow.names
        if "cluster_id" in names and "kept_key" in names and "duplicate" in s_names:
            dup = np.nonzero(si == s_names.index("duplicate"))[0]
            if len(dup):
                c = pf.read(columns=["cluster_id", "kept_key"]).take(pa.array(dup))
                c = c.append_column("rg", pa.array(np.searchsorted(starts, dup, side="right") - 1))
                c = c.filter(pc.is_valid(c.column("cluster_id")))
                agg = c.group_by("cluster_id").aggregate([("cluster_id", "count"), ("kept_key", "min")])
                for cid, n, kk in zip(agg.column("cluster_id").to_pylist(), agg.column("cluster_id_count").to_pylist(),
                                      agg.column("kept_key_min").to_pylist()):
                    sizes[cid] += n
                    if kk is not None:
                        kept_of[cid] = min(kept_of.get(cid, kk), kk)
                locs = c.group_by(["cluster_id", "rg"]).aggregate([])
                for cid, rg in zip(locs.column("cluster_id").to_pylist(), locs.column("rg").to_pylist()):
                    cluster_where.setdefault(cid, set()).add((f.path, rg))

    # which rows are candidates: all rows of a rare group, else the rows in the first row groups
    # of a seeded order until there are enough
    # The same (file, row group) names in every stage rank the same, and they hold about the same
    # key range (shards are by key hash, sorted by key): samples of all stages share key ranges.
    order = {loc: key_hash(f"{loc[0]}#{loc[1]}", cfg.seed) for loc in {(p, r) for parts in where.values() for p, r, _ in parts}}
    candidates: dict[tuple[str, str], list[tuple[str, int, np.ndarray]]] = {}
    for group, parts in where.items():
        total = sum(len(i) for _, _, i in parts)
        if total <= RARE_FACTOR * cfg.samples:
            candidates[group] = parts
            continue
        chosen, n = [], 0
        for p, r, i in sorted(parts, key=lambda x: (order[(x[0], x[1])], x[0], x[1])):
            chosen.append((p, r, i))
            n += len(i)
            if n >= CANDIDATE_FACTOR * cfg.samples:
                break
        candidates[group] = chosen
    need: dict[tuple[str, int], list[tuple[tuple[str, str], np.ndarray]]] = {}
    for group, parts in candidates.items():
        for p, r, i in parts:
            need.setdefault((p, r), []).append((group, i))
    bottom = BottomK(cfg.samples)
    open_files: dict[str, pq.ParquetFile] = {}
    for (p, r), items in sorted(need.items()):
        pf = open_files.get(p) or open_files.setdefault(p, _open_parquet(join(stage_dir, p)))
        keys = pf.read_row_group(r, columns=["key"]).column("key").combine_chunks()
        hashes = key_hashes(keys, cfg.seed)
        for group, idx in items:
            bottom.offer(group, hashes[idx], keys.take(pa.array(idx)))

    groups = []
    for name, n in m.counts.get("by_reason", {}).items():
        status, reason = name.split("/", 1)
        groups.append((status, reason, n))
    groups.sort(key=lambda g: (STATUSES.index(g[0]) if g[0] in STATUSES else 9, -g[2], g[1]))
    samples = {(s, r): bottom.sample((s, r)) for s, r, _ in groups}
    return StageScan(groups=groups, samples=samples, cluster_sizes=sizes, cluster_kept=kept_of,
                     cluster_where=cluster_where, row_groups_read=len(need), rg_rank=order)


def cluster_members(stage_dir: str, m: Manifest, clusters: list[str], where: dict[str, set] | None = None,
                    rank: dict | None = None, limit: int | None = None) -> dict[str, list[dict]]:
    """The duplicate ledger rows (key, reason, detail) of ``clusters``, read only from the row
    groups ``where`` says hold them (every row group when not given), in ``rank`` order, stopping
    for a cluster once it has ``limit`` members."""
    want = set(clusters)
    out: dict[str, list[dict]] = {c: [] for c in clusters}
    if not clusters:
        return out
    if where is None:
        locs = [(f.path, rg) for f in sorted(m.files_of(FILE_KIND_LEDGER), key=lambda f: f.path)
                for rg in range(_open_parquet(join(stage_dir, f.path)).num_row_groups)]
    else:
        locs = sorted(set().union(*(where.get(c, set()) for c in clusters)))
    rank = rank or {}
    locs.sort(key=lambda loc: (rank.get(loc, 0), loc))
    files: dict[str, pq.ParquetFile] = {}
    for loc in locs:
        open_ = [c for c in want if (limit is None or len(out[c]) < limit) and (where is None or loc in where.get(c, ()))]
        if not open_:
            continue
        pf = files.get(loc[0]) or files.setdefault(loc[0], _open_parquet(join(stage_dir, loc[0])))
        if "cluster_id" not in pf.schema_arrow.names:
            continue
        t = pf.read_row_group(loc[1], columns=["key", "cluster_id", "status", "reason", "detail"])
        mask = pc.and_(pc.is_in(t.column("cluster_id"), value_set=pa.array(sorted(open_), pa.string())),
                       pc.equal(t.column("status"), "duplicate"))
        for r in t.filter(mask).to_pylist():
            if limit is None or len(out[r["cluster_id"]]) < limit:
                r["_loc"] = loc
                out[r["cluster_id"]].append(r)
    return out


_LINK_KEYS = ("link", "link_type", "rule", "via")
_DISTANCE_KEYS = ("distance", "dist", "hamming", "jaccard", "similarity")


def _key_values(detail: str) -> dict[str, str]:
    """``key=value`` pairs of a dedup detail (``link=near-image hamming=3 kept=k round=1``): the
    dedup stage's own ``parse_detail`` when it has one, else the same split done here."""
    try:
        from transforms.dedup import parse_detail
    except ImportError:  # an older dedup without it
        return dict(part.split("=", 1) for part in detail.split() if "=" in part)
    return parse_detail(detail)


def parse_link(reason: str, detail: str | None) -> dict[str, Any]:
    """Link type and distance of a dedup member from its ledger row, whatever shape the detail has:
    ``key=value`` pairs (``link=near-image hamming=3 ...``), JSON (``{"link": .., "distance": ..}``)
    or free text (``... jaccard 0.82``). The ledger reason is the link type when the detail has none."""
    out: dict[str, Any] = {"link": reason, "distance": None}
    if not detail:
        return out
    try:
        d = json.loads(detail)
    except ValueError:
        d = None
    if isinstance(d, dict):
        for k in _LINK_KEYS:
            if isinstance(d.get(k), str):
                out["link"] = d[k]
                break
        for k in _DISTANCE_KEYS:
            v = d.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out["distance"] = f"{k} {v:g}"
                break
        return out
    kv = _key_values(detail) if "=" in detail else {}
    link = next((kv[k] for k in _LINK_KEYS if kv.get(k)), None)
    if link:
        out["link"] = link
    dist = next(((k, kv[k]) for k in _DISTANCE_KEYS if _DISTANCE.fullmatch(f"{k} {kv.get(k, '')}")), None)
    if dist:
        out["distance"] = f"{dist[0]} {dist[1]}"
        return out
    mt = _DISTANCE.search(detail)
    if mt:
        out["distance"] = f"{mt.group(1).lower()} {mt.group(2)}"
    return out


# --- thumbnails ----------------------------------------------------------------------------------


class Thumbnails:
    """Writes each distinct image once as a small JPEG under ``thumbs/`` (named by content hash)."""

    def __init__(self, out_dir: str, cfg: ReportConfig):
        self.dir = os.path.join(out_dir, THUMB_DIR)
        self.cfg = cfg
        self.done: dict[str, str | None] = {}

    def add(self, image: bytes | None) -> tuple[str | None, str | None]:
        """(relative path, None) or (None, why there is no thumbnail)."""
        if not image:
            return None, "no image"
        digest = hashlib.sha256(image).hexdigest()[:24]
        if digest in self.done:
            rel = self.done[digest]
            return (rel, None) if rel else (None, "image not decodable")
        rel = None
        try:
            rel = self._write(image, digest)
        except Exception:  # hostile or broken bytes: the card says so, the report goes on
            rel = None
        self.done[digest] = rel
        return (rel, None) if rel else (None, "image not decodable")

    def _write(self, image: bytes, digest: str) -> str | None:
        from PIL import Image

        with Image.open(io.BytesIO(image)) as im:
            if im.width * im.height > _MAX_DECODE_PIXELS:
                return None
            side = self.cfg.thumb_max_side
            if im.format == "JPEG":
                im.draft("RGB", (side, side))
            im = im.convert("RGB")
            im.thumbnail((side, side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=self.cfg.thumb_quality, optimize=False, progressive=False)
        rel = f"{THUMB_DIR}/{digest}.jpg"
        os.makedirs(self.dir, exist_ok=True)
        write_bytes_atomic(os.path.join(self.dir, f"{digest}.jpg"), buf.getvalue())
        return rel


# --- raw input (records the filter removed) --------------------------------------------------------


class RawInput:
    """Images and captions of the filters' raw inputs, looked up by a ledger ``source``
    (``shard.tar#NNNNNN:member`` or ``file.parquet#NNNNNNNN``, relative to the input root)."""

    def __init__(self, roots: tuple[str, ...]):
        self.roots = tuple(roots)
        self._tars: dict[str, dict[str, Any]] = {}

    def _path(self, rel: str) -> str | None:
        for root in self.roots:
            if os.path.isdir(root) and os.path.isfile(os.path.join(root, rel)):
                return os.path.join(root, rel)
            if os.path.isfile(root) and os.path.basename(root) == rel:
                return root
        return None

    def get(self, source: str | None) -> dict | None:
        if not self.roots or not source or "#" not in source:
            return None
        rel, _, where = source.partition("#")
        path = self._path(rel)
        if path is None:
            return None
        try:
            if rel.endswith(".tar") and ":" in where:
                return self._tar_member(path, where.split(":", 1)[1])
            if rel.endswith(".parquet") and where.isdigit():
                return self._parquet_row(path, int(where))
        except (OSError, ValueError, KeyError, IndexError, tarfile_error()):
            return None
        return None

    def _tar_member(self, path: str, member: str) -> dict | None:
        import tarfile

        stem = member.rsplit("/", 1)[-1].split(".", 1)[0]
        if path not in self._tars:
            with tarfile.open(path, mode="r:") as tar:
                self._tars[path] = {"index": {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}}
        index = self._tars[path]["index"]
        out: dict[str, Any] = {}
        with open(path, "rb") as f:
            for name, (off, size) in index.items():
                base = name.rsplit("/", 1)[-1]
                if base.split(".", 1)[0] != stem:
                    continue
                ext = base.split(".", 1)[1] if "." in base else ""
                f.seek(off)
                data = f.read(size)
                if ext in ("jpg", "jpeg", "png", "webp"):
                    out["image"] = data
                elif ext == "txt":
                    out["caption"] = data.decode("utf-8", errors="replace")
        return out or None

    def _parquet_row(self, path: str, row: int) -> dict | None:
        pf = _open_parquet(path)
        start = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row < start + n:
                names = pf.schema_arrow.names
                cap = next((c for c in ("caption", "TEXT", "text", "txt") if c in names), None)
                cols = [c for c in (cap, "jpg", "png", "webp") if c and c in names]
                r = pf.read_row_group(rg, columns=cols).slice(row - start, 1).to_pylist()[0]
                return {"caption": r.get(cap) if cap else None,
                        "image": next((r[c] for c in ("jpg", "png", "webp") if r.get(c)), None)}
            start += n
        return None


# --- building the report -------------------------------------------------------------------------


def tarfile_error() -> type[Exception]:
    import tarfile

    return tarfile.TarError


def anchor(kind: str, value: str) -> str:
    """A safe HTML id for any string (keys and cluster ids are hostile input too)."""
    return f"{kind}-" + hashlib.sha1(value.encode("utf-8")).hexdigest()[:16]


def find_runs(path: str) -> list[dict[str, Any]]:
    """``[{"name", "root", "stages": [(stage, dir)]}]``: a stage dir (that stage alone, its run for
    traces), a run dir (its stage dirs), or a directory of runs (every run below it, any depth)."""
    path = path.rstrip("/") or "/"
    if inspection.is_stage_dir(path):
        root = inspection.run_root(path)
        return [{"name": os.path.basename(root) or root, "root": root, "stages": [(read_manifest(path).stage, path)]}]
    stages = inspection.run_stage_dirs(path)
    if stages:
        return [{"name": os.path.basename(path) or path, "root": path, "stages": stages}]
    runs = []
    for root in inspection.find_runs(path):  # every run below, at any depth
        name = root[len(path):].strip("/") or os.path.basename(root)
        runs.append({"name": name, "root": root, "stages": inspection.run_stage_dirs(root)})
    return [r for r in runs if r["stages"]]


def _manifest_sha(stage_dir: str) -> str:
    return hashlib.sha256(read_bytes(join(stage_dir, MANIFEST_NAME))).hexdigest()


class RunReport:
    """Everything the templates need about one run: sampled, fetched and thumbnailed."""

    def __init__(self, run: dict[str, Any], cfg: ReportConfig, thumbs: Thumbnails, out_dir: str):
        self.run, self.cfg, self.thumbs, self.out_dir = run, cfg, thumbs, out_dir
        self.name = run["name"]
        self.id = anchor("run", run["root"])
        self.manifests = {d: read_manifest(d) for _, d in run["stages"]}
        shas = {_manifest_sha(d): d for _, d in inspection.run_stage_dirs(run["root"])}
        self.input_dir = {}
        for _, d in run["stages"]:
            inp = self.manifests[d].input or {}
            self.input_dir[d] = shas.get(inp.get("fingerprint")) if inp.get("kind") == "stage" else None
        self.raw = RawInput(cfg.raw_inputs)
        self._records: dict[tuple[str, str], dict | None] = {}

    # records
    def records(self, stage_dir: str, keys: list[str]) -> None:
        """Load data rows of ``keys`` from ``stage_dir`` into the cache (one read per shard file)."""
        todo = [k for k in keys if (stage_dir, k) not in self._records]
        if not todo:
            return
        rows = fetch_rows(stage_dir, self.manifests.get(stage_dir) or read_manifest(stage_dir), todo)
        for k in todo:
            self._records[(stage_dir, k)] = rows.get(k)

    def record(self, stage_dir: str | None, key: str) -> dict | None:
        return self._records.get((stage_dir, key)) if stage_dir else None

    def where_record(self, stage_dir: str, status: str) -> str | None:
        """Where a record of this stage's (status) group lives: its own data when kept (and the
        stage writes data), else its input stage's data."""
        m = self.manifests[stage_dir]
        if status == KEPT and m.files_of(FILE_KIND_DATA):
            return stage_dir
        return self.input_dir.get(stage_dir)

    def card(self, stage_dir: str, key: str, trace_step: dict | None, status: str, reason: str) -> dict[str, Any]:
        src_dir = self.where_record(stage_dir, status)
        rec = self.record(src_dir, key) if src_dir else None
        step = trace_step or {}
        caption = rec.get("caption") if rec else step.get("caption")
        image = rec.get("image") if rec else None
        note = None
        if rec is None and self.manifests[stage_dir].stage == "filter" and status != KEPT:
            raw = self.raw.get(step.get("source"))
            if raw:
                caption, image = raw.get("caption"), raw.get("image")
            else:
                note = "raw input not given (--raw-input)" if not self.cfg.raw_inputs else "no image in the raw input"
        thumb, why = self.thumbs.add(image)
        card = {
            "key": key, "trace": anchor("key", key), "status": status, "reason": reason,
            "detail": step.get("detail") or "", "caption": caption, "thumb": thumb,
            "no_thumb": note or why, "source": step.get("source") or (rec or {}).get("source") or "",
        }
        if rec:
            if rec.get("raw_caption") is not None and rec.get("raw_caption") != caption:
                card["raw_caption"] = rec["raw_caption"]
            if rec.get("qa"):
                card["qa"] = rec["qa"]
            if rec.get("width"):
                card["size"] = f"{rec['width']}×{rec.get('height')}"
            if rec.get("rewrite_model"):
                card["model"] = rec["rewrite_model"]
                card["prompt_version"] = rec.get("prompt_version")
            if rec.get("cluster_size"):
                card["cluster_size"] = rec["cluster_size"]
        if step.get("model") and "model" not in card:
            card["model"] = step["model"]
            card["prompt_version"] = step.get("prompt_version")
        return card


def _stage_label(stage: str, stage_dir: str) -> str:
    name = stage_dir.rstrip("/").rsplit("/", 1)[-1]
    return stage if name == stage else f"{stage} ({name})"


def _funnel(m: Manifest) -> dict[str, Any]:
    c = m.counts
    inputs = c.get("inputs") or 0
    removed = []
    for name, n in sorted(c.get("by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])):
        status, reason = name.split("/", 1)
        if status != KEPT:
            removed.append({"status": status, "reason": reason, "count": n, "pct": 100.0 * n / inputs if inputs else 0.0})
    kept = c.get("outputs") or 0
    return {"inputs": inputs, "kept": kept, "kept_pct": 100.0 * kept / inputs if inputs else 0.0, "removed": removed,
            "by_status": c.get("by_status", {})}


def _value_counts(stage_dir: str, m: Manifest) -> dict[str, list[tuple[str, int]]]:
    """Counts per ``dataset`` / ``lang`` of the kept records, when the data files have the columns
    (narrow dictionary columns: cheap at any size)."""
    totals: dict[str, Counter] = {}
    for f in sorted(m.files_of(FILE_KIND_DATA), key=lambda f: f.path):
        pf = _open_parquet(join(stage_dir, f.path))
        cols = [c for c in GROUP_COLUMNS if c in pf.schema_arrow.names]
        if not cols:
            return {}
        t = pf.read(columns=cols)
        for c in cols:
            vc = pc.value_counts(t.column(c).combine_chunks())
            cnt = totals.setdefault(c, Counter())
            for v, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                cnt["(none)" if v is None else str(v)] += n
    return {c: sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])) for c, cnt in totals.items()}


def _sample_packs(stage_dir: str, m: Manifest, cfg: ReportConfig) -> list[dict]:
    """``cfg.samples`` packs: Parquet row groups in a seeded order until there are enough candidates,
    then the smallest pack-id hashes; only the chosen packs' row groups (or tar members) are read."""
    files = inspection.pack_files(stage_dir, m)
    bottom = BottomK(cfg.samples)
    where: dict[str, tuple[str, int | None]] = {}
    units: list[tuple[int, str, int | None]] = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        if path.endswith(".tar"):
            units.append((key_hash(name, cfg.seed), path, None))
        else:
            n = _open_parquet(path).num_row_groups
            units.extend((key_hash(f"{name}#{rg}", cfg.seed), path, rg) for rg in range(n))
    seen = 0
    for _, path, rg in sorted(units, key=lambda u: (u[0], u[1], -1 if u[2] is None else u[2])):
        if seen >= CANDIDATE_FACTOR * cfg.samples:
            break
        if rg is None:
            import tarfile

            with FileSystems.open(path, compression_type="uncompressed") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                ids = sorted({m_.name.rsplit("/", 1)[-1].split(".", 1)[0] for m_ in tar.getmembers() if m_.name.endswith(".json")})
            arr = pa.array(ids, pa.string())
        else:
            arr = _open_parquet(path).read_row_group(rg, columns=["pack_id"]).column("pack_id").combine_chunks()
        for i in arr.to_pylist():
            where[i] = (path, rg)
        if len(arr):
            bottom.offer("packs", key_hashes(arr, cfg.seed), arr)
        seen += len(arr)
    chosen = bottom.sample("packs")
    rows: dict[str, dict] = {}
    by_src: dict[tuple[str, int | None], list[str]] = {}
    for pid in chosen:
        by_src.setdefault(where[pid], []).append(pid)
    for (path, rg), pids in sorted(by_src.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        if rg is None:
            rows.update(_tar_packs(path, set(pids)))
        else:
            pf = _open_parquet(path)
            t = pf.read_row_group(rg, columns=[c for c in PACK_COLUMNS if c in pf.schema_arrow.names])
            t = t.filter(pc.is_in(t.column("pack_id"), value_set=pa.array(pids, pa.string())))
            for r in t.to_pylist():
                r["shard"] = path.rsplit("/", 1)[-1]
                rows[r["pack_id"]] = r
    return [rows[p] for p in chosen if p in rows]


def _tar_packs(path: str, ids: set[str]) -> dict[str, dict]:
    import tarfile

    out: dict[str, dict] = {}
    with FileSystems.open(path, compression_type="uncompressed") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            pid, _, ext = base.partition(".")
            if pid not in ids:
                continue
            row = out.setdefault(pid, {"pack_id": pid, "shard": path.rsplit("/", 1)[-1], "_imgs": {}})
            data = tar.extractfile(member).read()
            if ext == "json":
                row.update(json.loads(data))
            elif ext == "cu_seqlens.npy":
                row["cu_seqlens"] = np.load(io.BytesIO(data)).tolist()
            elif ext.endswith(".jpg"):
                row["_imgs"][ext] = data
    for row in out.values():
        imgs = row.pop("_imgs")
        row["images"] = [imgs[k] for k in sorted(imgs)]
    return out


def pack_view(row: dict, thumbs: Thumbnails) -> dict[str, Any]:
    """A pack as bar segments (percent of ``seq_len``): per sample its text and image-placeholder
    spans, then padding; plus its images as thumbnails."""
    cu = row.get("cu_seqlens") or [0]
    width = row.get("seq_len") or (cu[-1] if cu else 0) or 1
    keys = row.get("sample_keys") or []
    spans_by_sample: dict[int, list[tuple[int, int, int]]] = {}
    for i, (s, off, ln) in enumerate(zip(row.get("image_sample") or [], row.get("image_offset") or [], row.get("image_length") or [])):
        spans_by_sample.setdefault(s, []).append((off, off + ln, i))
    segments, samples = [], []
    for j, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        pos = a
        img_tokens = 0
        for lo, hi, i in sorted(spans_by_sample.get(j, [])):
            lo, hi = max(lo, a), min(hi, b)
            if lo > pos:
                segments.append({"kind": "text", "sample": j, "start": pos, "end": lo})
            if hi > lo:
                segments.append({"kind": "image", "sample": j, "start": lo, "end": hi, "image": i})
                img_tokens += hi - lo
            pos = max(pos, hi)
        if b > pos:
            segments.append({"kind": "text", "sample": j, "start": pos, "end": b})
        key = keys[j] if j < len(keys) else "?"
        samples.append({"index": j, "key": key, "trace": anchor("key", key), "tokens": b - a,
                        "image_tokens": img_tokens, "text_tokens": b - a - img_tokens})
    used = cu[-1] - cu[0] if cu else 0
    if width > used:
        segments.append({"kind": "pad", "sample": None, "start": used, "end": width})
    for s in segments:
        s["left"] = f"{100.0 * s['start'] / width:.3f}"
        s["width"] = f"{100.0 * (s['end'] - s['start']) / width:.3f}"
        s["tokens"] = s["end"] - s["start"]
    images = []
    cols, rows_ = row.get("image_grid_cols") or [], row.get("image_grid_rows") or []
    for i, img in enumerate(row.get("images") or []):
        thumb, why = thumbs.add(img)
        sample = (row.get("image_sample") or [])[i] if i < len(row.get("image_sample") or []) else None
        images.append({"index": i, "thumb": thumb, "no_thumb": why, "sample": sample,
                       "size": f"{row['image_width'][i]}×{row['image_height'][i]}" if row.get("image_width") else "",
                       "grid": f"{cols[i]}×{rows_[i]}" if i < len(cols) and i < len(rows_) and cols[i] else "no slices"})
    return {"id": row.get("pack_id"), "shard": row.get("shard"), "seq_len": width, "used": used,
            "fill_pct": 100.0 * used / width, "segments": segments, "samples": samples, "images": images}


def build_run(run: dict[str, Any], cfg: ReportConfig, thumbs: Thumbnails, out_dir: str, stats_png: str | None) -> dict[str, Any]:
    """Sample, fetch, trace and thumbnail one run; returns the template context of the run."""
    rr = RunReport(run, cfg, thumbs, out_dir)
    stage_ctx = []
    scans: dict[str, StageScan] = {}
    traced: set[str] = set()
    clusters_of: dict[str, list[dict]] = {}
    packs_of: dict[str, list[dict]] = {}
    for stage, d in run["stages"]:
        m = rr.manifests[d]
        scan = scans[d] = scan_ledger(d, m, cfg)
        for keys in scan.samples.values():
            traced.update(keys)
        if scan.cluster_sizes:
            ranked = sorted(scan.cluster_sizes.items(), key=lambda kv: (-kv[1], kv[0]))
            largest = [c for c, _ in ranked[: cfg.largest_clusters]]
            rest = pa.array([c for c, _ in ranked[cfg.largest_clusters:]], pa.string())
            sampled = [c for _, c in sorted(zip(key_hashes(rest, cfg.seed).tolist(), rest.to_pylist()))[: cfg.samples]]
            # Members are read in the seeded row-group order, which the other samples come from too:
            # a large cluster's shown members then sit in few row groups, and tracing them is cheap.
            rank = scan.rg_rank
            members = cluster_members(d, m, largest + sampled, scan.cluster_where, rank, cfg.cluster_members - 1)
            chosen = []
            for cid in largest + sampled:
                shown = sorted(members.get(cid, []), key=lambda r: (rank.get(r["_loc"], 0), key_hash(r["key"], cfg.seed), r["key"]))
                kept_key = scan.cluster_kept.get(cid)
                chosen.append({"cluster_id": cid, "size": scan.cluster_sizes[cid] + 1, "kept_key": kept_key,
                               "largest": cid in largest, "dups": shown, "hidden": scan.cluster_sizes[cid] - len(shown)})
                traced.update(r["key"] for r in shown)
                if kept_key:
                    traced.add(kept_key)
            clusters_of[d] = chosen
        if inspection.pack_files(d, m):
            packs_of[d] = _sample_packs(d, m, cfg)
    # The pack ledger's detail names each sample's pack: no need to search every pack shard for it.
    traces = inspection.trace_keys(run["root"], sorted(traced), locate_packs=False) if traced else {}

    # fetch every record the cards show, one pass per (source stage dir)
    need: dict[str, set[str]] = {}
    for stage, d in run["stages"]:
        for (status, _), keys in scans[d].samples.items():
            src = rr.where_record(d, status)
            if src:
                need.setdefault(src, set()).update(keys)
        for c in clusters_of.get(d, []):
            src = rr.input_dir.get(d)
            if src:
                need.setdefault(src, set()).update(r["key"] for r in c["dups"])
            if c["kept_key"]:
                need.setdefault(d, set()).add(c["kept_key"])
    for src, keys in sorted(need.items()):
        rr.records(src, sorted(keys))

    def step_of(key: str, stage_dir: str) -> dict | None:
        for s in (traces.get(key) or {}).get("steps", []):
            if s["dir"] == stage_dir:
                return s
        return None

    for stage, d in run["stages"]:
        m = rr.manifests[d]
        scan = scans[d]
        groups = []
        for status, reason, n in scan.groups:
            keys = scan.samples.get((status, reason), [])
            cards = [rr.card(d, k, step_of(k, d), status, reason) for k in keys]
            groups.append({"id": anchor("grp", f"{d}|{status}|{reason}"), "status": status, "reason": reason,
                           "count": n, "cards": cards})
        ctx: dict[str, Any] = {
            "stage": stage, "label": _stage_label(stage, d), "dir": d, "id": anchor("stage", d),
            "kind": stage if stage in ("filter", "dedup", "rewrite", "pack") else "other",
            "funnel": _funnel(m), "groups": groups, "config_hash": m.config_hash[:12],
            "software_version": m.software_version, "input_label": _stage_label(*next(
                ((s, x) for s, x in run["stages"] if x == rr.input_dir.get(d)), (m.input.get("kind", "?"), m.input.get("kind", "?")))),
            "value_counts": _value_counts(d, m),
            "manifest_extra": json.dumps(m.extra, indent=1, sort_keys=True, ensure_ascii=False, default=str)[:4000],
        }
        if d in clusters_of:
            views = []
            for c in clusters_of[d]:
                members = []
                if c["kept_key"]:
                    k = c["kept_key"]
                    card = rr.card(d, k, step_of(k, d), KEPT, "ok")
                    card.update({"link": "kept representative", "distance": None, "kept": True})
                    members.append(card)
                for r in c["dups"]:
                    card = rr.card(d, r["key"], step_of(r["key"], d), "duplicate", r["reason"])
                    card.update(parse_link(r["reason"], r.get("detail")))
                    card["kept"] = False
                    members.append(card)
                views.append({"id": anchor("cluster", f"{d}|{c['cluster_id']}"), "cluster_id": c["cluster_id"],
                              "size": c["size"], "largest": c["largest"], "members": members, "hidden": c["hidden"]})
            ctx["clusters"] = views
            ctx["clusters_total"] = len(scan.cluster_sizes)
        if stage == "rewrite":
            rw = (m.config.get("rewrite") or {}) if isinstance(m.config, dict) else {}
            ctx["rewrite"] = {"model": rw.get("model"), "prompt_version": rw.get("prompt_version"),
                              "backend": rw.get("backend"), "policy": rw.get("policy")}
        if d in packs_of:
            ctx["packs"] = [pack_view(r, thumbs) for r in packs_of[d]]
            for p in ctx["packs"]:
                for s in p["samples"]:
                    s["traced"] = s["key"] in traces
        stage_ctx.append(ctx)

    trace_views = []
    for key in sorted(traces):
        t = traces[key]
        trace_views.append({"key": key, "id": anchor("key", key), "fate": t["fate"],
                            "steps": [_step_view(s) for s in t["steps"]]})
    return {"name": rr.name, "root": run["root"], "id": rr.id, "stages": stage_ctx, "stats_png": stats_png,
            "traces": trace_views}


_STEP_FIELDS = ("stage", "dir", "status", "reason", "detail", "source", "cluster_id", "kept_key", "model",
                "prompt_version", "caption", "qa", "pack")


def _step_view(step: dict[str, Any]) -> dict[str, Any]:
    """A trace step with every field the template reads (None when the stage did not set it)."""
    view = {k: step.get(k) for k in _STEP_FIELDS}
    view["label"] = _stage_label(step["stage"], step["dir"])
    return view


def _stats_png(run: dict[str, Any], cfg: ReportConfig, out_dir: str, index: int) -> str | None:
    from pipelines import stats

    path = run["stages"][0][1] if len(run["stages"]) == 1 and inspection.is_stage_dir(run["stages"][0][1]) and \
        inspection.run_stage_dirs(run["root"]) != run["stages"] else run["root"]
    try:
        data = stats.collect(path, max_rows=cfg.stats_rows or stats.MAX_ROWS_DEFAULT)
        rel = f"stats-{index:02d}.png"
        stats.plot(data, os.path.join(out_dir, rel))
        return rel
    except UserError:  # nothing to plot
        return None


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,  # every string is hostile web text: escape them all, whatever the file name
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else v
    env.filters["pct"] = lambda v: f"{v:.1f}%"
    return env


def _prepare_output(out_dir: str) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, MARKER)):
            raise UserError(f"{out_dir} exists and is not a report directory: pass an empty or new --output")
        shutil.rmtree(os.path.join(out_dir, THUMB_DIR), ignore_errors=True)
        for name in os.listdir(out_dir):
            if name.endswith((".html", ".png", ".css")):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    write_bytes_atomic(os.path.join(out_dir, MARKER), b"mmcorpus report\n")


def write_report(path: str, out_dir: str, cfg: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Write ``index.html``, ``traces.html``, ``style.css``, the stats PNGs and ``thumbs/`` under
    ``out_dir`` for the run(s) at ``path``; returns a summary (files, thumbnails, sampled keys)."""
    if "://" in out_dir:
        raise UserError("--output must be a local directory (the report is opened from disk)")
    runs = find_runs(path)
    if not runs:
        raise UserError(f"{path} has no {MANIFEST_NAME} and no stage outputs below it: pass a stage output, a run directory "
                        "or a directory of runs")
    _prepare_output(out_dir)
    thumbs = Thumbnails(out_dir, cfg)
    ctx_runs = []
    for i, run in enumerate(runs):
        png = _stats_png(run, cfg, out_dir, i)
        ctx_runs.append(build_run(run, cfg, thumbs, out_dir, png))
    env = _env()
    context = {"title": f"mmcorpus report: {path}", "source": path, "runs": ctx_runs,
               "config": dataclasses.asdict(cfg)}
    for name in ("index.html", "traces.html"):
        html = env.get_template(name + ".j2").render(**context)
        write_bytes_atomic(os.path.join(out_dir, name), html.encode("utf-8"))
    with open(os.path.join(TEMPLATE_DIR, "style.css"), "rb") as f:
        write_bytes_atomic(os.path.join(out_dir, "style.css"), f.read())
    n_thumbs = sum(1 for v in thumbs.done.values() if v)
    return {"index": os.path.join(out_dir, "index.html"), "runs": [r["name"] for r in ctx_runs], "thumbnails": n_thumbs,
            "traced_keys": sum(len(r["traces"]) for r in ctx_runs)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus report", description="Write a static HTML report of a run (open index.html).")
    p.add_argument("dir", help="a stage output, a run directory (stage outputs below it) or a directory of runs")
    p.add_argument("--output", required=True, help="directory to write the report into (new, empty, or an older report)")
    d = ReportConfig()
    p.add_argument("--samples", type=int, default=d.samples, metavar="N", help=f"records per stage and reason, clusters, packs (default {d.samples})")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default 0)")
    p.add_argument("--thumb-max-side", "--thumb_max_side", dest="thumb_max_side", type=int, default=d.thumb_max_side,
                   help=f"longest thumbnail side in pixels (default {d.thumb_max_side})")
    p.add_argument("--thumb-quality", "--thumb_quality", dest="thumb_quality", type=int, default=d.thumb_quality,
                   help=f"thumbnail JPEG quality (default {d.thumb_quality})")
    p.add_argument("--largest-clusters", "--largest_clusters", dest="largest_clusters", type=int, default=d.largest_clusters,
                   help=f"largest dedup clusters always shown (default {d.largest_clusters})")
    p.add_argument("--stats-rows", "--stats_rows", dest="stats_rows", type=int, default=d.stats_rows,
                   help=f"rows per stage the stats plots read (default {d.stats_rows:,})")
    p.add_argument("--raw-input", "--raw_input", dest="raw_inputs", action="append", default=[], metavar="PATH",
                   help="a filter's raw input (as given to `mmcorpus filter --input`; repeatable): shows the records "
                        "the filter removed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.dir.rstrip("/") or "/"
    inspection._require_dir(path)
    try:
        cfg = ReportConfig(samples=args.samples, seed=args.seed, thumb_max_side=args.thumb_max_side,
                           thumb_quality=args.thumb_quality, largest_clusters=args.largest_clusters,
                           stats_rows=args.stats_rows, raw_inputs=tuple(args.raw_inputs))
    except ValueError as e:
        raise UserError(str(e)) from None
    out = write_report(path, args.output, cfg)
    print(f"report: {out['index']} ({len(out['runs'])} run(s), {out['thumbnails']} thumbnails, "
          f"{out['traced_keys']} traced keys). Open it in a browser, or share it: python -m http.server -d {args.output}")
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "report")
