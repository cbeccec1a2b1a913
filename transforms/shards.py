"""The pack stage's Beam building blocks: per-sample token accounting, per-partition packing, and the
Parquet / WebDataset shard sinks with their ``index.json``.

Flow: prepare (tokens, resized JPEG) -> plan (per key-hash partition, on lengths only: sort by key,
pack, assign packs to shard rolls by count and estimated bytes) -> join samples to their slots by key
-> group by shard -> render and write each shard (``packs-00000.ext``, numbered over the partitions in
order) -> ``index.json``.
Planning holds only the samples' lengths (~350 B per sample as Python objects) and writing only one shard's
samples plus one row group of rendered packs (docs/scale.md), so memory is bounded;
and because every decision is made on key-sorted input, the bytes written depend only on the input
records and the config, never on Beam's element order.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from schemas import packed as S
from schemas import reasons
from schemas.manifest import FileEntry
from schemas.records import ERROR, KEPT, REASON_OK, REJECTED, Outcome, Pair
from transforms.packing import Item, PackingConfig, pack_items
from storage.files import PARQUET_WRITE_BATCH_ROWS, HashingSink, rename_over
from transforms.stage_io import join, shard_of, write_bytes_atomic
from transforms.tokens import StageProfile, TextTokenizer, prepare_image, sample_tokens


@dataclass(frozen=True)
class ShardConfig:
    """How pack shards are laid out.

    Args:
        format: ``parquet`` (one row per pack) or ``webdataset`` (one tar member group per pack).
        partitions: key-hash partitions planned independently (parallelism of the planning step;
            a worker holds one partition's lengths, about 100 bytes per sample).
        max_packs_per_shard: roll to a new shard after this many packs.
        max_shard_bytes: ... or once a shard holds about this many bytes.
        row_group_packs: packs per Parquet row group (the reader's streaming unit).

    Example:
        >>> ShardConfig(format="webdataset", max_packs_per_shard=1000).format
        'webdataset'
    """

    format: str = S.FORMAT_PARQUET
    partitions: int = 4
    max_packs_per_shard: int = 2048
    max_shard_bytes: int = 256 * 1024 * 1024
    row_group_packs: int = 64

    def __post_init__(self):
        if self.format not in S.FORMATS:
            raise ValueError(f"format must be one of {S.FORMATS}, not {self.format!r}")
        if min(self.partitions, self.max_packs_per_shard, self.max_shard_bytes, self.row_group_packs) < 1:
            raise ValueError("partitions, max_packs_per_shard, max_shard_bytes and row_group_packs must be >= 1")


TOKEN_TYPECODE = "i"  # token ids and labels as int32 arrays (4 B each; IGNORE_INDEX is -100)


@dataclass(slots=True)
class PreparedSample:
    """One sample ready to pack: its tokens and its resized image.

    Tokens and labels are stored as int32 ``array``s (lists are converted): a pack shard's samples sit in
    one worker until the shard is written, and a Python list costs about 36 B per token (a pointer and
    an int object, per list, after every pickle round trip) against 4 B here. Measured on 45-token
    caption samples after unpickling: 4.2 KB per sample as lists, 0.86 KB as arrays, against the roll
    estimate's 0.6 KB (``approx_pack_bytes``), so a caption-only roll held about 7 times its estimate."""

    key: str
    source: str
    input_ids: array
    labels: array
    image: bytes | None = None
    width: int = 0
    height: int = 0
    grid: tuple[int, int] | None = None
    image_length: int = 0
    slices: int = 0
    image_offset: int = 0  # where the image span starts within the sample (SFT: after the prompt header)

    def __post_init__(self):
        if not isinstance(self.input_ids, array):
            self.input_ids = array(TOKEN_TYPECODE, self.input_ids)
        if not isinstance(self.labels, array):
            self.labels = array(TOKEN_TYPECODE, self.labels)

    def __reduce__(self):  # a flat tuple with the tokens as bytes: 3x faster than the default for slots
        return _unpickle_sample, (self.key, self.source, self.input_ids.tobytes(), self.labels.tobytes(), self.image,
                                  self.width, self.height, self.grid, self.image_length, self.slices, self.image_offset)

    def item(self, safe_cut: bool = True) -> Item:
        n_img = 1 if self.image is not None else 0
        return Item(len(self.input_ids), n_img, self.slices, (self.image_length + 1) if safe_cut else 1)

    def meta(self) -> "SampleMeta":
        return SampleMeta(self.key, self.source, self.item(), len(self.image or b""))


def _unpickle_sample(key, source, ids: bytes, labels: bytes, *rest) -> PreparedSample:
    a, b = array(TOKEN_TYPECODE), array(TOKEN_TYPECODE)
    a.frombytes(ids)
    b.frombytes(labels)
    return PreparedSample(key, source, a, b, *rest)


class SampleMeta(NamedTuple):
    """What planning needs of a sample: no tokens, no image, so a partition of millions fits in memory."""

    key: str
    source: str
    item: Item
    image_bytes: int


class Slot(NamedTuple):
    """Where a sample goes: shard (partition, roll), pack number in the partition, position, tokens taken."""

    partition: int
    roll: int
    pack: int
    position: int
    take: int
    source: str


class PrepareSampleFn(beam.DoFn):
    """Pair -> PreparedSample (main) or a rejected/error Outcome (tagged ``REJECTED``).

    Args:
        profile: the stage profile (image size, slicing, q).
        tokenizer_files: the tokenizer's files (``TextTokenizer.files_of``), rebuilt in ``setup``.
        packing: the packing config (a sample longer than ``seq_len`` is rejected up front).
        require_image: reject caption-only samples (``pack_no_image``) instead of packing them as text.
    """

    REJECTED = "rejected"

    def __init__(self, profile: StageProfile, tokenizer_files: dict[str, bytes], packing: PackingConfig, require_image: bool = False):
        self.profile = profile
        self.tokenizer_files = tokenizer_files
        self.packing = packing
        self.require_image = require_image

    def setup(self):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="mmcorpus-tok-")
        self.tok = TextTokenizer.from_files(self.tokenizer_files, self._tmp.name)
        self.ids = self.tok.special_ids()
        self.total = Metrics.counter("mmcorpus.pack", "total")
        self.rejected = {}

    def teardown(self):
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()

    def _reject(self, pair: Pair, reason: str, detail: str, status: str = REJECTED):
        c = self.rejected.get(reason)
        if c is None:
            c = self.rejected[reason] = Metrics.counter("mmcorpus.pack", f"{status}_{reason}")
        c.inc()
        return beam.pvalue.TaggedOutput(self.REJECTED, Outcome.dropped(pair, status, reason, detail))

    def process(self, pair: Pair):
        self.total.inc()
        try:
            out = self._prepare(pair)
        except Exception as e:  # dead letter: unexpected, keep the record in the ledger
            out = self._reject(pair, reasons.exception_reason(e), "", status=ERROR)
        yield out  # outside the try: a downstream failure must not turn into a second outcome

    def _prepare(self, pair: Pair):
        image = None
        w = h = 0
        grid = None
        if pair.image:
            try:
                image, w, h = prepare_image(pair.image, self.profile)
            except Exception as e:  # PIL raises many types for bad bytes; all mean "cannot decode"
                return self._reject(pair, reasons.PACK_IMAGE_UNDECODABLE, type(e).__name__)
            grid = self.profile.grid(w, h)
        elif self.require_image:
            return self._reject(pair, reasons.PACK_NO_IMAGE, "caption-only sample and require_image is set")
        toks = sample_tokens(
            self.tok.encode(pair.caption or ""), image is not None, grid, self.profile.query_num, self.ids, self.tok.newline_ids
        )
        sample = PreparedSample(
            key=pair.key, source=pair.source, input_ids=toks.input_ids, labels=toks.labels, image=image,
            width=w, height=h, grid=grid, image_length=toks.image_length, slices=toks.slices,
        )
        why = self.packing.fits_alone(sample.item())
        if why == "too_long":
            return self._reject(pair, reasons.PACK_TOO_LONG, f"{len(toks)} tokens > seq_len {self.packing.seq_len}")
        if why == "too_many_images":
            return self._reject(pair, reasons.PACK_TOO_MANY_IMAGES, f"{toks.slices} slices exceed the per-pack limit")
        return sample


# --- rendering one pack ------------------------------------------------------------------------


def render_pack(pid: str, seq_len: int, members: list[tuple[PreparedSample, int]]) -> dict[str, Any]:
    """The PACK_SCHEMA row of one pack from its samples and the tokens taken of each."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    cu = [0]
    row: dict[str, Any] = {f: [] for f in S.PACK_IMAGE_FIELDS}
    row[S.IMAGES] = []
    keys, truncated = [], 0
    for i, (s, take) in enumerate(members):
        if s.image is not None:
            row[S.IMAGES].append(s.image)
            row[S.IMAGE_SAMPLE].append(i)
            row[S.IMAGE_OFFSET].append(len(input_ids) + s.image_offset)
            row[S.IMAGE_LENGTH].append(s.image_length)
            row[S.IMAGE_WIDTH].append(s.width)
            row[S.IMAGE_HEIGHT].append(s.height)
            row[S.IMAGE_GRID_COLS].append(s.grid[0] if s.grid else 0)
            row[S.IMAGE_GRID_ROWS].append(s.grid[1] if s.grid else 0)
        input_ids += s.input_ids[:take]
        labels += s.labels[:take]
        position_ids += range(take)
        cu.append(cu[-1] + take)
        keys.append(s.key)
        truncated += len(s.input_ids) - take
    row.update(
        {
            S.PACK_ID: pid,
            S.SEQ_LEN: seq_len,
            S.NUM_TOKENS: len(input_ids),
            S.NUM_SAMPLES: len(members),
            S.INPUT_IDS: input_ids,
            S.LABELS: labels,
            S.POSITION_IDS: position_ids,
            S.CU_SEQLENS: cu,
            S.SAMPLE_KEYS: keys,
            S.TRUNCATED_TOKENS: truncated,
        }
    )
    return row


def _approx_bytes(row: dict[str, Any]) -> int:
    return approx_pack_bytes(row[S.NUM_TOKENS], sum(len(b) for b in row[S.IMAGES]), row[S.NUM_SAMPLES])


def approx_pack_bytes(tokens: int, image_bytes: int, samples: int) -> int:
    """Stored size estimate of a pack (3 int32 arrays + JPEGs + keys), known before encoding."""
    return 12 * tokens + image_bytes + 64 * samples


# --- shard encoders --------------------------------------------------------------------------------


_COMPRESSION = {name: "zstd" for name in S.PACK_SCHEMA.names}
_COMPRESSION[S.IMAGES] = "none"  # JPEG does not compress further
# write_batch_size: see storage.files.PARQUET_WRITE_BATCH_ROWS (a pack's image list counts per image: a
# 64-pack row group of 20 x 30 KB images held 59.5 MiB of Arrow pool while written at the default, 21.5 here)
_PARQUET_OPTIONS = dict(compression=_COMPRESSION, use_dictionary=False, write_statistics=False, store_schema=True,
                        write_batch_size=PARQUET_WRITE_BATCH_ROWS)


def parquet_shard_bytes(rows: list[dict[str, Any]], row_group_packs: int) -> bytes:
    table = pa.Table.from_pylist(rows, schema=S.PACK_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_packs, **_PARQUET_OPTIONS)
    return buf.getvalue()


def _npy(values: list[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype="<i4"), allow_pickle=False)
    return buf.getvalue()


def wds_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The (name, bytes) members of one pack in a WebDataset tar, in a fixed order."""
    key = row[S.PACK_ID]
    out = [(f"{key}.{ext}", _npy(row[name])) for name, ext in S.WDS_ARRAY_EXTS.items()]
    meta = {k: v for k, v in row.items() if k not in S.WDS_ARRAY_EXTS and k != S.IMAGES}
    out.append((f"{key}.{S.WDS_EXT_META}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")))
    out += [(f"{key}.{S.wds_image_ext(i)}", img) for i, img in enumerate(row[S.IMAGES])]
    return out


def _add_members(tar: tarfile.TarFile, row: dict[str, Any]) -> None:
    for name, data in wds_members(row):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = S.WDS_TAR_MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def tar_shard_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            _add_members(tar, row)
    return buf.getvalue()


@dataclass
class ShardInfo:
    """One written pack shard: what index.json and the manifest record about it."""

    path: str  # relative to the stage output dir
    shard: int  # global shard number (file name)
    partition: int
    roll: int
    packs: int
    samples: int
    tokens: int
    images: int
    truncated_tokens: int
    bytes: int
    sha256: str
    row_groups: list[int] = field(default_factory=list)

    def file_entry(self) -> FileEntry:
        return FileEntry(path=self.path, kind=S.FILE_KIND_PACK, rows=self.packs, bytes=self.bytes, sha256=self.sha256)


def write_one_shard(
    rows: Iterable[dict[str, Any]], output_dir: str, shard: int, partition: int, roll: int, cfg: ShardConfig
) -> ShardInfo:
    """Encode ``rows`` (packs in order) as shard number ``shard`` and return its info. The file is
    streamed (Parquet: one row group of ``row_group_packs`` packs at a time; tar: member by member) to a
    temporary name, hashed as it is written, then renamed into place; ``rows`` may be a generator, so
    only one row group of rendered packs is held at a time. Same bytes as ``parquet_shard_bytes`` /
    ``tar_shard_bytes`` of the same rows."""
    rel = f"{S.PACK_DIR}/{S.pack_shard_name(shard, cfg.format)}"
    path = join(output_dir, rel)
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{directory}/.tmp-{name}-{uuid.uuid4().hex}"
    totals = {"packs": 0, "samples": 0, "tokens": 0, "images": 0, "truncated_tokens": 0}
    groups: list[int] = []

    def counted(rows_in):
        for r in rows_in:
            totals["packs"] += 1
            totals["samples"] += r[S.NUM_SAMPLES]
            totals["tokens"] += r[S.NUM_TOKENS]
            totals["images"] += len(r[S.IMAGES])
            totals["truncated_tokens"] += r[S.TRUNCATED_TOKENS]
            yield r

    with HashingSink(tmp) as sink:
        if cfg.format == S.FORMAT_PARQUET:
            writer = pq.ParquetWriter(sink, S.PACK_SCHEMA, **_PARQUET_OPTIONS)
            batch: list[dict[str, Any]] = []
            for row in counted(rows):
                batch.append(row)
                if len(batch) == cfg.row_group_packs:
                    writer.write_table(pa.Table.from_pylist(batch, schema=S.PACK_SCHEMA), row_group_size=len(batch))
                    groups.append(len(batch))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=S.PACK_SCHEMA), row_group_size=len(batch))
                groups.append(len(batch))
            writer.close()
        else:
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for row in counted(rows):
                    _add_members(tar, row)
                    tar.members.clear()  # TarFile keeps every TarInfo it wrote; writing never reads them
    rename_over(tmp, path)
    return ShardInfo(
        path=rel, shard=shard, partition=partition, roll=roll, packs=totals["packs"], samples=totals["samples"],
        tokens=totals["tokens"], images=totals["images"], truncated_tokens=totals["truncated_tokens"],
        bytes=sink.size, sha256=sink.hexdigest(), row_groups=groups,
    )


def write_shards(rows: Iterable[dict[str, Any]], output_dir: str, partition: int, cfg: ShardConfig) -> Iterator[ShardInfo]:
    """Write rows to rolling shards of one partition in one process (bench, small jobs); shard = roll."""
    roller = ShardRoller(cfg)
    batch: list[dict[str, Any]] = []
    batch_roll = 0
    for row in rows:
        roll = roller.roll_of(_approx_bytes(row))
        if batch and roll != batch_roll:
            yield write_one_shard(batch, output_dir, batch_roll, partition, batch_roll, cfg)
            batch = []
        batch.append(row)
        batch_roll = roll
    if batch:
        yield write_one_shard(batch, output_dir, batch_roll, partition, batch_roll, cfg)


class ShardRoller:
    """Assigns consecutive packs to shard rolls: a new roll after ``max_packs_per_shard`` packs or
    once a roll holds about ``max_shard_bytes``. Sizes are estimated before encoding, so the plan
    step can decide rolls without the images."""

    def __init__(self, cfg: ShardConfig):
        self.cfg = cfg
        self.current = 0
        self.count = 0
        self.bytes = 0

    def roll_of(self, approx_bytes: int) -> int:
        if self.count and (self.count >= self.cfg.max_packs_per_shard or self.bytes >= self.cfg.max_shard_bytes):
            self.current, self.count, self.bytes = self.current + 1, 0, 0
        self.count += 1
        self.bytes += approx_bytes
        return self.current


class PlanPartitionFn(beam.DoFn):
    """(partition, [SampleMeta]) -> (key, Slot) per packed sample (main) and one Outcome per sample
    (tagged ``OUTCOMES``: kept with its pack id, or ``duplicate_key`` for a second record with a key).
    Samples are sorted by key first, so the plan does not depend on Beam's element order."""

    OUTCOMES = "outcomes"
    ROLLS = "rolls"  # (partition, number of shard rolls): numbers the shards globally

    def __init__(self, packing: PackingConfig, shards: ShardConfig):
        self.packing = packing
        self.shards = shards

    def setup(self):
        self.packs = Metrics.counter("mmcorpus.pack", "packs")
        self.kept = Metrics.counter("mmcorpus.pack", KEPT)
        self.dups = Metrics.counter("mmcorpus.pack", f"{REJECTED}_{reasons.DUPLICATE_KEY}")

    def process(self, element: tuple[int, Iterable[SampleMeta]]):
        partition, metas = element
        unique: list[SampleMeta] = []
        for m in sorted(metas, key=lambda m: (m.key, m.source, m.item, m.image_bytes)):
            if unique and unique[-1].key == m.key:
                self.dups.inc()
                yield beam.pvalue.TaggedOutput(self.OUTCOMES, Outcome(
                    key=m.key, status=REJECTED, reason=reasons.DUPLICATE_KEY,
                    detail=f"key first seen at {unique[-1].source}", source=m.source,
                ))
                continue
            unique.append(m)
        roller = ShardRoller(self.shards)
        items = [m.item for m in unique]
        for n, pack in enumerate(pack_items(items, self.packing)):
            pid = S.pack_id(partition, n)
            tokens = sum(take for _, take in pack)
            roll = roller.roll_of(approx_pack_bytes(tokens, sum(unique[i].image_bytes for i, _ in pack), len(pack)))
            self.packs.inc()
            for pos, (i, take) in enumerate(pack):
                m = unique[i]
                cut = f", truncated to {take} of {m.item.length} tokens" if take < m.item.length else ""
                self.kept.inc()
                yield beam.pvalue.TaggedOutput(
                    self.OUTCOMES, Outcome(key=m.key, status=KEPT, reason=REASON_OK, detail=f"pack {pid}{cut}", source=m.source)
                )
                yield m.key, Slot(partition, roll, n, pos, take, m.source)
        yield beam.pvalue.TaggedOutput(self.ROLLS, (partition, roller.current + 1 if roller.count else 0))


def _join_slot(element: tuple[str, dict[str, list]]):
    """(key, {"sample": [...], "slot": [...]}) -> ((partition, roll), (pack, position, take, sample))."""
    key, groups = element
    for slot in groups["slot"]:
        matches = [s for s in groups["sample"] if s.source == slot.source]
        sample = min(matches, key=lambda s: (s.input_ids, s.image or b""))  # same key and source: pick one, deterministically
        yield (slot.partition, slot.roll), (slot.pack, slot.position, slot.take, sample)


class WriteShardFn(beam.DoFn):
    """((partition, roll), [(pack, position, take, sample)]) -> the ShardInfo of the shard written.
    Holds one shard's samples (at most about ``max_shard_bytes``, as the runner's group) and renders
    packs lazily, so the encoder holds one row group of rendered packs at a time."""

    def __init__(self, output_dir: str, packing: PackingConfig, shards: ShardConfig):
        self.output_dir = output_dir
        self.packing = packing
        self.shards = shards

    def setup(self):
        self.written = Metrics.counter("mmcorpus.pack", "shards")

    def process(self, element, rolls: dict[int, int]):
        (partition, roll), members = element
        shard = sum(n for p, n in rolls.items() if p < partition) + roll
        by_pack: dict[int, list] = {}
        for pack, pos, take, sample in members:
            by_pack.setdefault(pack, []).append((pos, take, sample))

        def rows():  # rendered lazily: the writer holds one row group of rendered packs at a time
            for pack in sorted(by_pack):
                ordered = sorted(by_pack[pack], key=lambda x: x[0])
                yield render_pack(S.pack_id(partition, pack), self.packing.seq_len, [(s, take) for _, take, s in ordered])

        self.written.inc()
        yield write_one_shard(rows(), self.output_dir, shard, partition, roll, self.shards)


def summarize_shards(infos: list[ShardInfo], seq_len: int) -> dict[str, Any]:
    packs = sum(i.packs for i in infos)
    tokens = sum(i.tokens for i in infos)
    return {
        "packed_samples": sum(i.samples for i in infos),
        "packs": packs,
        "pack_tokens": tokens,
        "pack_fill": round(tokens / (packs * seq_len), 6) if packs else 0.0,
        "truncated_tokens": sum(i.truncated_tokens for i in infos),
        "pack_images": sum(i.images for i in infos),
        "pack_shards": len(infos),
    }


class WriteIndexFn(beam.DoFn):
    """Writes ``data/index.json`` (shards in partition/roll order, with counts and sha256); yields its FileEntry."""

    def __init__(self, output_dir: str, header: dict[str, Any]):
        self.output_dir = output_dir
        self.header = header

    def process(self, _, infos: list[ShardInfo]):
        infos = sorted(infos, key=lambda i: i.shard)
        shards = []
        for i in infos:
            d = asdict(i)
            d["path"] = i.path.split("/", 1)[1]  # relative to index.json's directory
            shards.append(d)
        index = dict(self.header, format=S.INDEX_FORMAT, totals=summarize_shards(infos, self.header["seq_len"]))
        index[S.INDEX_SHARDS] = shards
        data = (json.dumps(index, sort_keys=True, indent=1) + "\n").encode("utf-8")
        rel = f"{S.PACK_DIR}/{S.INDEX_NAME}"
        write_bytes_atomic(join(self.output_dir, rel), data)
        yield FileEntry(path=rel, kind=S.FILE_KIND_INDEX, rows=len(shards), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


class PackSamples(beam.PTransform):
    """Pairs -> packed shards + index.json; returns ``{"outcomes", "files", "summary"}``.

    Args:
        output_dir: the stage output directory; shards go to ``data/``.
        profile: stage profile (image size, slicing, q).
        packing: sequence length, algorithm, window, per-pack limits.
        shards: shard format and layout.
        tokenizer_path: local tokenizer path (None: the bundled one).
        require_image: reject caption-only samples instead of packing them as text.
        prepare: the DoFn that turns a Pair into a ``PreparedSample`` (tagging rejects
            ``PrepareSampleFn.REJECTED``); default ``PrepareSampleFn`` (caption pretraining). ``sft pack``
            passes ``transforms.sft_pack.PrepareSftFn`` (chat template, assistant-only labels).
        header_extra: extra ``index.json`` fields.

    Example:
        pairs | PackSamples("out/pack", StageProfile.for_stage(2), PackingConfig(seq_len=2048), ShardConfig())
    """

    def __init__(self, output_dir: str, profile: StageProfile, packing: PackingConfig, shards: ShardConfig,
                 tokenizer_path: str | None = None, require_image: bool = False,
                 prepare: beam.DoFn | None = None, header_extra: dict[str, Any] | None = None):
        super().__init__()
        self.prepare = prepare
        self.header_extra = header_extra or {}
        self.output_dir = output_dir
        self.profile = profile
        self.packing = packing
        self.shards = shards
        self.tokenizer_path = tokenizer_path
        self.require_image = require_image

    def expand(self, pairs):
        tok = TextTokenizer(self.tokenizer_path)  # fail fast (UserError) before the pipeline runs
        files = TextTokenizer.files_of(self.tokenizer_path)
        header = {
            "pack_format": self.shards.format,
            "seq_len": self.packing.seq_len,
            "stage_profile": asdict(self.profile),
            "algorithm": self.packing.algorithm,
            "tokens": tok.special_ids(),
            "ignore_index": S.IGNORE_INDEX,
            **self.header_extra,
        }
        parts = self.shards.partitions
        prepare = self.prepare or PrepareSampleFn(self.profile, files, self.packing, self.require_image)
        prepared = pairs | "Prepare" >> beam.ParDo(prepare).with_outputs(PrepareSampleFn.REJECTED, main="samples")
        samples = prepared.samples
        plan = (
            samples
            | "Meta" >> beam.Map(lambda s: (shard_of(s.key, parts), s.meta()))
            | "GroupPartitions" >> beam.GroupByKey()
            | "Plan" >> beam.ParDo(PlanPartitionFn(self.packing, self.shards)).with_outputs(
                PlanPartitionFn.OUTCOMES, PlanPartitionFn.ROLLS, main="slots"
            )
        )
        infos = (
            {"sample": samples | "ByKey" >> beam.Map(lambda s: (s.key, s)), "slot": plan.slots}
            | "JoinSlots" >> beam.CoGroupByKey()
            | "ToShards" >> beam.FlatMap(_join_slot)
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(
                WriteShardFn(self.output_dir, self.packing, self.shards), rolls=beam.pvalue.AsDict(plan[PlanPartitionFn.ROLLS])
            )
        )
        outcomes = (prepared[PrepareSampleFn.REJECTED], plan[PlanPartitionFn.OUTCOMES]) | "AllOutcomes" >> beam.Flatten()
        index = (
            pairs.pipeline
            | "IndexTrigger" >> beam.Create([None])
            | "WriteIndex" >> beam.ParDo(WriteIndexFn(self.output_dir, header), infos=beam.pvalue.AsList(infos))
        )
        files = (infos | "ShardEntries" >> beam.Map(ShardInfo.file_entry), index) | "AllFiles" >> beam.Flatten()
        seq_len = self.packing.seq_len
        summary = (
            pairs.pipeline
            | "SummaryTrigger" >> beam.Create([None])
            | "Summarize" >> beam.Map(lambda _, infos: summarize_shards(infos, seq_len), infos=beam.pvalue.AsList(infos))
        )
        return {"outcomes": outcomes, "files": files, "summary": summary}
