"""Stage output (data shards + ledger + manifest) and stage input, shared by every stage.

Every stage ends in ``WriteStageOutput``: it takes one ``Outcome`` per input record, shards them by
a hash of the key, sorts each shard by key, writes the kept records to ``data/`` and one ledger row
per outcome to ``ledger/`` (same shard numbering), then writes ``manifest.json`` last. Because each
shard's content is a pure function of its records, reruns are byte-identical whatever order the
runner delivered elements in.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas.manifest import (
    DATA_DIR,
    FILE_KIND_DATA,
    FILE_KIND_LEDGER,
    LEDGER_DIR,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    config_hash,
    shard_name,
)
from schemas.records import (
    KEPT,
    LEDGER_SCHEMA,
    PAIR_SCHEMA,
    REJECTED,
    STATUSES,
    LedgerRow,
    Outcome,
    Pair,
    ledger_to_table,
)

# Rows per Parquet row group: small enough to stream, large enough to compress well.
DATA_ROW_GROUP_ROWS = 1024
LEDGER_ROW_GROUP_ROWS = 16384
PARQUET_COMPRESSION = "zstd"


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmcorpus")
    except Exception:  # not installed (running from a bare checkout)
        return "0+unknown"


def shard_of(key: str, num_shards: int) -> int:
    """Stable shard index of a key (sha1 based: Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % num_shards


def join(*parts: str) -> str:
    """Join path parts for local paths and URLs (gs://, s3://) alike."""
    if "://" in parts[0]:
        return posixpath.join(*parts)
    return os.path.join(*parts)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path`` and rename it into place."""
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{directory}/.tmp-{name}-{uuid.uuid4().hex}"
    if "://" not in path:
        os.makedirs(directory, exist_ok=True)
    with FileSystems.create(tmp) as f:
        f.write(data)
    try:
        FileSystems.rename([tmp], [path])
    except Exception:
        # Some filesystems refuse to rename over an existing file: delete the stale one first.
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def table_to_parquet_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=row_group_rows,
        compression=PARQUET_COMPRESSION,
        write_statistics=True,
        store_schema=True,
    )
    return buf.getvalue()


@dataclass
class ShardResult:
    """What writing one shard produced: its files and its ledger counts."""

    files: list[FileEntry]
    counts: dict[str, int] = field(default_factory=dict)  # "status/reason" -> n


def _sort_key(o: Outcome) -> tuple:
    # Kept first among equal keys, so a duplicate key never displaces a kept record by accident;
    # then source position, then the rest for a total order.
    return (o.key, o.status != KEPT, o.source, o.status, o.reason, o.detail)


class WriteShardFn(beam.DoFn):
    """Writes one shard's data file and ledger file; resolves duplicate keys."""

    def __init__(self, output_dir: str, stage: str, num_shards: int, write_data: bool = True):
        self.output_dir = output_dir
        self.stage = stage
        self.num_shards = num_shards
        self.write_data = write_data

    def setup(self):
        self._counters: dict[str, Any] = {}

    def _inc(self, name: str, n: int = 1) -> None:
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = Metrics.counter(f"mmcorpus.{self.stage}", name)
        c.inc(n)

    def process(self, element: tuple[int, Iterable[Outcome]]):
        shard, outcomes = element
        outcomes = sorted(outcomes, key=_sort_key)
        kept: list[Pair] = []
        ledger: list[LedgerRow] = []
        first_source: dict[str, str] = {}
        for o in outcomes:
            if o.status not in STATUSES:
                raise ValueError(f"bad status {o.status!r} for key {o.key!r}")
            reasons.check_reason(o.reason)
            if o.status == KEPT and self.write_data:
                if o.pair is None:
                    raise ValueError(f"kept outcome without a record for key {o.key!r}")
                if o.key in first_source:
                    o = Outcome(
                        key=o.key,
                        status=REJECTED,
                        reason=reasons.DUPLICATE_KEY,
                        detail=f"key first seen at {first_source[o.key]}",
                        source=o.source or o.pair.source,
                    )
                else:
                    first_source[o.key] = o.pair.source
                    kept.append(o.pair)
            ledger.append(o.ledger_row(self.stage))
        counts = Counter(f"{r.status}/{r.reason}" for r in ledger)
        self._inc("total", len(ledger))
        for name, n in counts.items():
            status, reason = name.split("/", 1)
            self._inc(KEPT if status == KEPT else f"{status}_{reason}", n)

        files = []
        name = shard_name(shard, self.num_shards)
        if kept:
            table = pa.Table.from_pylist([p.to_row() for p in kept], schema=PAIR_SCHEMA)
            files.append(self._write(FILE_KIND_DATA, f"{DATA_DIR}/{name}", table, DATA_ROW_GROUP_ROWS))
        table = ledger_to_table(ledger)
        files.append(self._write(FILE_KIND_LEDGER, f"{LEDGER_DIR}/{name}", table, LEDGER_ROW_GROUP_ROWS))
        yield ShardResult(files=files, counts=dict(counts))

    def _write(self, kind: str, rel: str, table: pa.Table, row_group_rows: int) -> FileEntry:
        data = table_to_parquet_bytes(table, row_group_rows)
        write_bytes_atomic(join(self.output_dir, rel), data)
        return FileEntry(path=rel, kind=kind, rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def summarize_counts(shard_counts: Iterable[dict[str, int]], inputs: int) -> dict[str, Any]:
    by_reason: Counter = Counter()
    for c in shard_counts:
        by_reason.update(c)
    by_status: Counter = Counter()
    for name, n in by_reason.items():
        by_status[name.split("/", 1)[0]] += n
    ledger_rows = sum(by_reason.values())
    return {
        "inputs": inputs,
        "ledger_rows": ledger_rows,
        "outputs": by_status.get(KEPT, 0),
        "by_status": {s: by_status.get(s, 0) for s in STATUSES},
        "by_reason": dict(sorted(by_reason.items())),
    }


class WriteManifestFn(beam.DoFn):
    def __init__(self, output_dir: str, stage: str, config: dict, input_info: dict):
        self.output_dir = output_dir
        self.stage = stage
        self.config = config
        self.input_info = input_info

    def process(self, _, results: list[ShardResult], inputs: int, extra: dict, other_files: list[FileEntry]):
        files = sorted([f for r in results for f in r.files] + list(other_files), key=lambda f: f.path)
        counts = summarize_counts((r.counts for r in results), inputs)
        manifest = Manifest(
            stage=self.stage,
            software_version=software_version(),
            config=self.config,
            config_hash=config_hash(self.config),
            input=self.input_info,
            counts=counts,
            files=files,
            extra=extra,
        )
        write_bytes_atomic(join(self.output_dir, MANIFEST_NAME), manifest.to_json().encode("utf-8"))
        yield manifest


def _merge_dicts(dicts: Iterable[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


class WriteStageOutput(beam.PTransform):
    """Write a stage's outcomes as data shards, ledger shards and ``manifest.json``.

    Args:
        output_dir: the stage output directory (local path or a Beam filesystem URL).
        stage: stage name written into every ledger row and the manifest.
        config: the resolved stage config (JSON-able); hashed into the manifest.
        input_info: description and fingerprint of the input (see ``fingerprint_files``).
        num_shards: number of key-hash shards; pick so a shard is a few hundred MB at most.
        extra: optional ``{name: PCollection}`` of single values merged into ``manifest.extra``.
        write_data: False for stages whose outputs are not Pair rows (pack): kept outcomes then need
            no ``pair`` and only the ledger is written here.
        files: optional PCollection of ``FileEntry`` for files the stage wrote itself (e.g. pack
            shards, index.json); they are listed in the manifest with the data and ledger files.

    Returns the PCollection holding the one ``Manifest`` written.

    Example:
        outcomes | WriteStageOutput("out/filter", "filter", cfg, info, num_shards=16)
    """

    def __init__(
        self,
        output_dir: str,
        stage: str,
        config: dict,
        input_info: dict,
        num_shards: int = 8,
        extra: dict[str, beam.PCollection] | None = None,
        write_data: bool = True,
        files: beam.PCollection | None = None,
    ):
        super().__init__()
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        self.output_dir = output_dir
        self.stage = stage
        self.config = config
        self.input_info = input_info
        self.num_shards = num_shards
        self.extra = extra or {}
        self.write_data = write_data
        self.files = files

    def expand(self, outcomes):
        n = self.num_shards
        inputs = outcomes | "CountInputs" >> beam.combiners.Count.Globally()
        results = (
            outcomes
            | "ShardByKey" >> beam.Map(lambda o: (shard_of(o.key, n), o))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShardFn(self.output_dir, self.stage, n, self.write_data))
        )
        pipeline = outcomes.pipeline
        extras = [
            pc | f"Extra_{name}" >> beam.Map(lambda v, name=name: {name: v}) for name, pc in sorted(self.extra.items())
        ]
        if extras:
            extra = extras | "FlattenExtras" >> beam.Flatten() | "MergeExtras" >> beam.CombineGlobally(_merge_dicts)
        else:
            extra = pipeline | "NoExtras" >> beam.Create([{}])
        other_files = self.files if self.files is not None else pipeline | "NoOtherFiles" >> beam.Create([])
        return (
            pipeline
            | "ManifestTrigger" >> beam.Create([None])
            | "WriteManifest"
            >> beam.ParDo(
                WriteManifestFn(self.output_dir, self.stage, self.config, self.input_info),
                results=beam.pvalue.AsList(results),
                inputs=beam.pvalue.AsSingleton(inputs),
                extra=beam.pvalue.AsSingleton(extra),
                other_files=beam.pvalue.AsList(other_files),
            )
        )


# --- reading a stage output ------------------------------------------------------------------


def read_manifest(stage_dir: str) -> Manifest:
    path = join(stage_dir, MANIFEST_NAME)
    if not FileSystems.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {stage_dir} is not a finished mmcorpus stage output "
            "(a stage writes manifest.json last; rerun the stage that should have produced it)"
        )
    return Manifest.from_json(read_bytes(path).decode("utf-8"))


def stage_input_info(stage_dir: str) -> dict[str, Any]:
    """Input description of a stage that reads another stage's output: the manifest's hash."""
    raw = read_bytes(join(stage_dir, MANIFEST_NAME))
    m = Manifest.from_json(raw.decode("utf-8"))
    return {
        "kind": "stage",
        "stage": m.stage,
        "fingerprint": hashlib.sha256(raw).hexdigest(),
        "records": m.counts["outputs"],
    }


class ExpandRowGroupsFn(beam.DoFn):
    """(path) -> (path, row_group) for every row group: the unit of parallel reading."""

    def process(self, path: str):
        with FileSystems.open(path, compression_type="uncompressed") as f:
            n = pq.ParquetFile(f).num_row_groups
        for i in range(n):
            yield path, i


class ReadPairRowGroupFn(beam.DoFn):
    def process(self, unit: tuple[str, int]):
        path, rg = unit
        with FileSystems.open(path, compression_type="uncompressed") as f:
            table = pq.ParquetFile(f).read_row_group(rg)
        for row in table.to_pylist():
            yield Pair.from_row(row)


class ReadStage(beam.PTransform):
    """Read the kept records (``Pair``) of a finished stage output directory, split by row group.

    Only files listed in the manifest are read, and each is checked against its recorded size.
    """

    def __init__(self, stage_dir: str):
        super().__init__()
        self.stage_dir = stage_dir
        manifest = read_manifest(stage_dir)
        self.paths = []
        for entry in manifest.files_of(FILE_KIND_DATA):
            path = join(stage_dir, entry.path)
            if not FileSystems.exists(path):
                raise FileNotFoundError(f"{path} is listed in {stage_dir}/{MANIFEST_NAME} but missing")
            self.paths.append(path)

    def expand(self, pbegin):
        return (
            pbegin
            | "DataFiles" >> beam.Create(self.paths or [])
            | "RowGroups" >> beam.ParDo(ExpandRowGroupsFn())
            | "Spread" >> beam.Reshuffle()
            | "ReadRows" >> beam.ParDo(ReadPairRowGroupFn())
        )


def read_table(stage_dir: str, kind: str = FILE_KIND_DATA, columns: list[str] | None = None) -> pa.Table:
    """Read all files of one kind of a stage output into one table (for small outputs, tests, the CLI)."""
    manifest = read_manifest(stage_dir)
    schema = PAIR_SCHEMA if kind == FILE_KIND_DATA else LEDGER_SCHEMA
    tables = []
    for entry in manifest.files_of(kind):
        with FileSystems.open(join(stage_dir, entry.path), compression_type="uncompressed") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(tables)
