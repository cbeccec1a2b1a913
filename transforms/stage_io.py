"""Stage output (data shards + ledger + manifest) and stage input, shared by every stage.

Every stage ends in ``WriteStageOutput``: it takes one ``Outcome`` per input record (alone, or in a
batch from ``encode_batch``), shards them by a hash of the key, sorts each shard by key, writes the
kept records to ``data/`` and one ledger row per outcome to ``ledger/`` (same shard numbering), then
writes ``manifest.json`` last. Because each
shard's content is a pure function of its records, reruns are byte-identical whatever order the
runner delivered elements in. A shard writer's memory does not grow with its shard (external sort,
row groups streamed); see docs/scale.md. Plain file I/O lives in ``storage.files`` and is re-exported
here for existing callers.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import marshal
import operator
import os
import pickle
import tempfile
import threading
import tracemalloc
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

import apache_beam as beam
import numpy as np
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
    LEDGER_EXTRA_FIELDS,
    LEDGER_FIELDS,
    LEDGER_SCHEMA,
    PAIR_FIELDS,
    PAIR_SCHEMA,
    REASON_OK,
    REJECTED,
    STATUSES,
    Outcome,
    Pair,
    truncate_detail,
)
from storage.files import (  # noqa: F401  (re-exported: callers import these from here)
    PARQUET_COMPRESSION,
    PARQUET_WRITE_BATCH_ROWS,
    HashingSink,
    join,
    read_bytes,
    read_manifest,
    read_table,
    rename_over,
    software_version,
    stage_input_info,
    table_to_parquet_bytes,
    write_bytes_atomic,
)

# Beam distribution (namespace ``mmcorpus.<stage>``) with each shard write's own peak memory.
WRITER_PEAK_METRIC = "writer_peak_bytes"

# Rows per Parquet row group: small enough to stream, large enough to compress well. A data row group
# also closes once it holds about DATA_ROW_GROUP_BYTES, so image-heavy shards stream in bounded pieces.
DATA_ROW_GROUP_ROWS = 1024
DATA_ROW_GROUP_BYTES = 32 * 1024 * 1024
LEDGER_ROW_GROUP_ROWS = 16384
# Outcomes a shard writer sorts in memory before it spills a sorted run to local disk.
SORT_BUFFER_BYTES = 64 * 1024 * 1024
# Bookkeeping per buffered outcome beyond its pickled bytes (sort-key tuple, list slot).
_ENTRY_OVERHEAD = 256
# Sorted runs merged at once, and the read buffer of each: merging holds MERGE_FANIN x (buffer + one
# record); more runs than that are first merged in groups into longer runs.
MERGE_FANIN = 64
_RUN_READ_BUFFER = 64 * 1024


def shard_of(key: str, num_shards: int) -> int:
    """Stable shard index of a key (sha1 based: Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % num_shards


@dataclass
class ShardResult:
    """What writing one shard produced: its files and its ledger counts."""

    files: list[FileEntry]
    counts: dict[str, int] = field(default_factory=dict)  # "status/reason" -> n


def _sort_key(o: Outcome) -> tuple:
    # Kept first among equal keys, so a duplicate key never displaces a kept record by accident;
    # then source position, then the rest for a total order.
    return (o.key, o.status != KEPT, o.source, o.status, o.reason, o.detail)


# --- external sort: bounded memory whatever the shard's size --------------------------------------
# An entry is (sort key, encoded outcome); see ``encode_outcome``. The order is (sort key, pickled bytes
# of the outcome), a total order, so the bytes written never depend on the order the runner delivered
# elements in. Entries are sorted and merged by the record key alone (a sort on plain strings, several
# times faster than on the whole tuples), then each run of equal keys, rare, gets the full order
# (``_order_equal_keys``).


def _record_key(entry: tuple[tuple, bytes]) -> str:
    return entry[0][0]


def _write_run(entries: list[tuple[tuple, bytes]], path: str) -> None:
    entries.sort(key=_record_key)
    with open(path, "wb") as f:
        for e in entries:
            pickle.dump(e, f, protocol=pickle.HIGHEST_PROTOCOL)


def _read_run(path: str) -> Iterator[tuple[tuple, bytes]]:
    with open(path, "rb", buffering=_RUN_READ_BUFFER) as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


_OUTCOME_HEAD = operator.attrgetter("key", "status", "reason", "detail", "source", "extra")
# Index of Pair.source in a row of PAIR_FIELDS values.
_PAIR_SOURCE = PAIR_FIELDS.index("source")
# First byte of every pickle of protocol >= 2 (PROTO opcode); a marshal dump never starts with it.
_PICKLE_PROTO = 0x80


# Exact types marshal stores as themselves. marshal writes any other object with the buffer protocol
# (numpy scalars, bytearray, memoryview) as bytes, silently: such values are pickled instead.
_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))
_CONTAINERS = frozenset((list, dict))


_PAIR_LISTS = tuple(PAIR_FIELDS.index(n) for n in ("quality_flags", "qa"))  # list[str], list[dict[str, str]]
_PAIR_SCALARS = operator.itemgetter(*(i for i in range(len(PAIR_FIELDS)) if i not in _PAIR_LISTS))


def _plain_container(v) -> bool:
    """A list of scalars or of plain dicts, or a dict of str to scalars."""
    if type(v) is dict:
        return not v or (all(type(k) is str for k in v) and _SCALARS.issuperset(map(type, v.values())))
    if type(v) is list:
        if _SCALARS.issuperset(map(type, v)):  # the common case (also an empty list), in one C loop
            return True
        return all(type(x) in _SCALARS or (type(x) is dict and _plain_container(x)) for x in v)
    return False


def _marshal_safe(head: tuple, values: tuple | None) -> bool:
    """Whether an outcome's head (key, status, reason, detail, source, extra) and its Pair's values
    hold only what marshal stores as itself: ``_SCALARS``, and plain containers where a Pair and
    ``Outcome.extra`` have them. (Checked with sets of types: a few hundred ns a record.)"""
    if not (_SCALARS.issuperset(map(type, head[:5])) and _plain_container(head[5])):
        return False
    if values is None:
        return True
    if not _SCALARS.issuperset(map(type, _PAIR_SCALARS(values))):
        return False
    for i in _PAIR_LISTS:
        v = values[i]
        if v is not None and not _plain_container(v):
            return False
    return True


def encode_outcome(o: Outcome) -> tuple[tuple, bytes]:
    """The sort entry of an outcome: (sort key, encoded outcome). ``WriteStageOutput`` shuffles these
    instead of ``Outcome`` objects: a runner then moves one bytes value per record (the DirectRunner
    encodes and decodes every shuffled element twice; an Outcome with its Pair is ~20 Python objects),
    and the shard writer sorts them as they are.

    An ``Outcome`` holding a plain ``Pair`` (or none) is encoded as the ``marshal`` dump of its values
    ``(key, status, reason, detail, source, extra, Pair values in PAIR_FIELDS order | None)``: about
    four times cheaper to make and to read back than a pickle, and without the field names (a smaller
    entry, so a shard's sort spills later). marshal is only read back by the same code in the same
    pipeline (its format is tied to the Python version, like the SDK's own). Anything else (subclasses,
    numpy values, other types) is pickled, as before; ``_decode`` tells the two apart."""
    key = _sort_key(o)
    if type(o) is Outcome and (o.pair is None or type(o.pair) is Pair):
        head = _OUTCOME_HEAD(o)
        values = None if o.pair is None else _PAIR_VALUES(o.pair)
        if _marshal_safe(head, values):
            return key, marshal.dumps((*head, values))
    return key, pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)


_FLAGS = PAIR_FIELDS.index("quality_flags")
assert PAIR_FIELDS[_FLAGS + 1] == "needs_rewrite", PAIR_FIELDS
_BEFORE_FLAGS = operator.attrgetter(*PAIR_FIELDS[:_FLAGS])
_AFTER_FLAGS = operator.attrgetter(*PAIR_FIELDS[_FLAGS + 2:])
_QA_AFTER = PAIR_FIELDS.index("qa") - _FLAGS - 2


def encode_kept(pair: Pair, flags: list[str]) -> tuple[tuple, bytes] | None:
    """``encode_outcome(Outcome.kept(p))`` where ``p`` is ``pair`` with ``quality_flags=flags`` and
    ``needs_rewrite=bool(flags)``, made from the pair's values without building ``p`` and the Outcome
    (the filter stage's hot path); None unless ``pair`` is a plain ``Pair`` with marshal-safe values
    (the caller then encodes the Outcome itself)."""
    if type(pair) is not Pair:
        return None
    before, after = _BEFORE_FLAGS(pair), _AFTER_FLAGS(pair)
    values = (*before, flags, bool(flags), *after)
    key, source = pair.key, pair.source
    head = (key, KEPT, REASON_OK, "", source, {})
    # No qa and every other value a scalar: marshal-safe as _marshal_safe would find, in three C loops
    # over the types; anything else gets _marshal_safe's checks of each field.
    if not (after[_QA_AFTER] is None and _SCALARS.issuperset(map(type, before))
            and _SCALARS.issuperset(map(type, after)) and _SCALARS.issuperset(map(type, flags))) and not _marshal_safe(head, values):
        return None
    return (key, False, source, KEPT, REASON_OK, ""), marshal.dumps((*head, values))


def _decode(blob: bytes) -> tuple:
    """``encode_outcome``'s bytes -> (key, status, reason, detail, source, extra, pair) where pair is a
    tuple of PAIR_FIELDS values, None, or (pickled outcomes) the outcome's own pair object."""
    if blob[0] == _PICKLE_PROTO:
        o = pickle.loads(blob)
        return (*_OUTCOME_HEAD(o), o.pair)
    return marshal.loads(blob)


def _outcome_of(blob: bytes) -> Outcome:
    """The ``Outcome`` an encoded entry was made from (equal fields, same field order)."""
    if blob[0] == _PICKLE_PROTO:
        return pickle.loads(blob)
    key, status, reason, detail, source, extra, pair = marshal.loads(blob)
    if pair is not None:
        pair = Pair(**dict(zip(PAIR_FIELDS, pair)))
    return Outcome(key=key, status=status, reason=reason, pair=pair, detail=detail, source=source, extra=extra)


# --- decisions: a record's fate decided apart from the record ---------------------------------------
# A stage whose verdict on a record is made by a join (dedup) can hand the writer its records as kept
# outcomes and, separately, one ``Decision`` per record whose fate differs. Decision entries cross the
# writer's shard shuffle next to the records (same key, same shard), sort right before their key's
# outcomes, and are applied as the shard is written: no whole-record join before the writer, and the
# writer's memory stays that of its sort buffer.

# First byte of an encoded decision (pickles start with 0x80, marshal dumps of a tuple with 0x28/0x29/0xa8/0xa9).
_DECISION_TAG = 0x01


class Decision(NamedTuple):
    """How a record's outcome is replaced in ``WriteStageOutput(..., decisions=...)``.

    The outcome(s) with ``key`` get ``status``, ``reason``, ``detail`` and ledger ``extra`` from the
    decision; a kept decision also sets the record's fields named in ``updates`` (e.g. ``cluster_id``),
    any other status drops the record from ``data/`` (ledger row only, as ``Outcome.dropped``).
    Values are plain (str, int, float, bool, None; ``extra`` and ``updates`` dicts keyed by str)."""

    key: str
    status: str
    reason: str
    detail: str = ""
    extra: dict | None = None
    updates: dict | None = None


def encode_decision(d: Decision) -> tuple[tuple, bytes]:
    """The shuffle entry of a decision: ``((key,), tag + marshal dump)``; ValueError for values marshal
    would not store as themselves."""
    values = (d.status, d.reason, d.detail, d.extra or {}, d.updates or {})
    if type(d.key) is not str or not set(map(type, values[:3])) <= {str} or not all(
        _plain_container(v) for v in values[3:]
    ):
        raise ValueError(f"decision for key {d.key!r}: status/reason/detail must be str and extra/updates plain dicts")
    unknown = set(values[4]) - set(PAIR_FIELDS)
    if unknown:
        raise ValueError(f"decision for key {d.key!r} updates unknown record fields {sorted(unknown)}")
    return (d.key,), bytes((_DECISION_TAG,)) + marshal.dumps(values)


def decided_outcome(pair: Pair, d: Decision | None) -> Outcome:
    """The ``Outcome`` the writer makes of a record read as ``Outcome.kept(pair)`` and its decision (None:
    kept as it is) — for a stage that applies decisions itself instead of in the writer."""
    if d is None:
        return Outcome.kept(pair)
    if d.status == KEPT:
        return Outcome(key=pair.key, status=KEPT, reason=d.reason, pair=pair.replace(**d.updates) if d.updates else pair,
                       detail=d.detail, source=pair.source, extra=dict(d.extra or {}))
    return Outcome.dropped(pair, d.status, d.reason, d.detail, **(d.extra or {}))


def _is_decision(entry: tuple[tuple, bytes]) -> bool:
    return entry[1][0] == _DECISION_TAG


def _full_order(entry: tuple[tuple, bytes]) -> tuple:
    # Decisions first (by their bytes: two of one key are refused by the writer anyway), then outcomes,
    # pickled from the decoded outcome: the same bytes as pickling the outcome that was encoded (same
    # field values and order), whatever the encoding of the entry.
    if _is_decision(entry):
        return (0, entry[1])
    return 1, entry[0], pickle.dumps(_outcome_of(entry[1]), protocol=pickle.HIGHEST_PROTOCOL)


def _order_equal_keys(entries: Iterator[tuple[tuple, bytes]]) -> Iterator[tuple[tuple, bytes]]:
    """Entries sorted by record key, with each run of equal keys put in (sort key, pickled outcome)
    order: the writer's total order. Runs of equal keys are duplicates (the same key read twice); they
    are rare and short, so they alone are decoded and pickled."""
    group: list[tuple[tuple, bytes]] = []
    for entry in entries:
        if group and entry[0][0] != group[0][0][0]:
            if len(group) > 1:
                _order_group(group)
            yield from group
            group = []
        group.append(entry)
    if len(group) > 1:
        _order_group(group)
    yield from group


def _order_group(group: list[tuple[tuple, bytes]]) -> None:
    """Sort a run of equal keys in place by ``_full_order``; a decision with its one record (the usual run
    of ``WriteStageOutput(decisions=...)``) only puts the decision first, without decoding the record."""
    if len(group) == 2 and _is_decision(group[0]) != _is_decision(group[1]):
        if _is_decision(group[1]):
            group.reverse()
        return
    group.sort(key=_full_order)


def _sorted_entries(outcomes: Iterable[Outcome | tuple[tuple, bytes]], spill_dir: str,
                    buffer_bytes: int = SORT_BUFFER_BYTES, probe: _MemoryProbe | None = None) -> Iterator[tuple[tuple, bytes]]:
    """Entries of ``outcomes`` in the writer's order, holding at most about ``buffer_bytes`` of them in
    memory: full buffers are sorted and spilled to ``spill_dir`` as runs, then merged lazily. ``probe``
    is sampled where the buffer is fullest (before a spill, at the end of the input)."""
    buf: list[tuple[tuple, bytes]] = []
    size = 0
    runs: list[str] = []
    for o in outcomes:
        if type(o) is tuple and type(o[0]) is tuple:  # an entry as encoded (the usual case): used as it is
            entry = o
        else:
            entry = encode_outcome(o) if isinstance(o, Outcome) else (tuple(o[0]), o[1])
        buf.append(entry)
        size += len(entry[1]) + _ENTRY_OVERHEAD
        if size >= buffer_bytes:
            if probe is not None:
                probe.sample()
            runs.append(os.path.join(spill_dir, f"run-{len(runs):05d}"))
            _write_run(buf, runs[-1])
            buf, size = [], 0
    if probe is not None:
        probe.sample()
    if not runs:  # everything fit: no disk round trip

        def released(items):
            for i in range(len(items)):
                entry, items[i] = items[i], None  # release as we go
                yield entry

        buf.sort(key=_record_key)
        yield from _order_equal_keys(released(buf))
        return
    if buf:
        runs.append(os.path.join(spill_dir, f"run-{len(runs):05d}"))
        _write_run(buf, runs[-1])
        buf = []
    n = len(runs)
    while len(runs) > MERGE_FANIN:  # bound the open runs: merge the oldest into one longer run
        group, runs = runs[:MERGE_FANIN], runs[MERGE_FANIN:]
        merged = os.path.join(spill_dir, f"run-{n:05d}")
        n += 1
        with open(merged, "wb") as f:
            for entry in heapq.merge(*(_read_run(r) for r in group), key=_record_key):
                pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
        for r in group:
            os.remove(r)
        runs.append(merged)
    yield from _order_equal_keys(heapq.merge(*(_read_run(r) for r in runs), key=_record_key))


def sorted_outcomes(outcomes: Iterable[Outcome | tuple[tuple, bytes]], spill_dir: str,
                    buffer_bytes: int = SORT_BUFFER_BYTES) -> Iterator[Outcome]:
    """``outcomes`` in (sort key, pickled outcome) order, holding at most about ``buffer_bytes`` of them
    in memory (see ``_sorted_entries``). Items are ``Outcome`` objects or their ``encode_outcome``
    entries (same order, same bytes)."""
    for _, blob in _sorted_entries(outcomes, spill_dir, buffer_bytes):
        yield _outcome_of(blob)


class _MemoryProbe:
    """Peak memory of one write step: the writer's own Python allocations (tracemalloc) plus Arrow's
    pool. Off by default: tracemalloc slows allocation.

    tracemalloc counts every thread of the process. On the DirectRunner only the writer runs during a
    write, but a Dask worker's communication thread keeps receiving and deserialising other tasks'
    inputs meanwhile. So the figure is "own": at the points where the writer holds the most (a full
    sort buffer before it spills, the end of its input, a row group built, a row group written) the
    live traces allocated in this module are summed, and ``peak`` is the largest such sum plus the
    Arrow pool's largest growth at the same points. While a row group is written, Arrow hands the sink
    each page as one new bytes object, allocated under pyarrow's frame (``PARQUET_WRITE_BATCH_ROWS``
    rows of a column at most): the sink reports each write's size and the pool at that moment (``on_write``, in the
    writing thread only), and the sum after the write adds the largest one. During ``write_table`` this
    module allocates and frees nothing, so that sum plus the largest write is what the writer held at
    it. ``process_peak`` is tracemalloc's peak of the whole process plus the same pool growth (an upper
    bound; on the DirectRunner it is the writer's true peak, which the tests hold ``peak`` against). A
    sum is taken only when the process as a whole could hold more than the largest own figure so far
    (else it cannot be a new maximum), so a quiet process pays almost nothing.
    """

    _NFRAME = 1  # the allocating frame only: 4 frames make the measured write ~2.3x slower
    _lock = threading.Lock()
    _active = 0  # probes open in this process: tracemalloc runs while any is

    def __init__(self, on: bool):
        self.on = on
        self.arrow_peak = 0
        self.own_peak = 0
        self.samples = 0  # own sums taken (each walks every live trace)
        self.peak = self.process_peak = 0
        self._write_bytes = 0  # the largest sink write since the last sample (held by Arrow's frame)

    def __enter__(self):
        if self.on:
            self._arrow_base = pa.total_allocated_bytes()
            self._process_peak = 0
            with _MemoryProbe._lock:
                if _MemoryProbe._active == 0:
                    tracemalloc.start(self._NFRAME)
                _MemoryProbe._active += 1
        return self

    def on_write(self, nbytes: int) -> None:
        """The sink was handed ``nbytes`` (``HashingSink``, called in the writing thread while the bytes
        are held): the pool at this moment holds the table and Arrow's encoded and compressed pages."""
        if self.on:
            self.arrow_peak = max(self.arrow_peak, pa.total_allocated_bytes() - self._arrow_base)
            self._write_bytes = max(self._write_bytes, nbytes)

    def sample(self, own: bool = True) -> None:
        """A point where the writer may hold its most: a sort buffer full, the end of the input, a row
        group built, a row group written (the largest sink write since the last sample is added to the
        sum). ``own=False``: the Arrow pool only (a point that cannot hold more Python memory than an
        earlier one)."""
        if not self.on:
            return
        written, self._write_bytes = self._write_bytes, 0
        self.arrow_peak = max(self.arrow_peak, pa.total_allocated_bytes() - self._arrow_base)
        current, peak = tracemalloc.get_traced_memory()
        # the own sum is at most ``current`` (every trace), so below the largest figure it cannot win
        if own and current + written > self.own_peak:
            # the sum's own temporaries (arrays over every trace) are not the writer's: the process
            # peak is kept from before it and restarted after it
            self._process_peak = max(self._process_peak, peak)
            self.own_peak = max(self.own_peak, _own_traced_bytes() + written)
            self.samples += 1
            tracemalloc.reset_peak()

    def __exit__(self, *exc):
        if self.on:
            self.sample()
            self.process_peak = max(self._process_peak, tracemalloc.get_traced_memory()[1]) + self.arrow_peak
            self.peak = self.own_peak + self.arrow_peak
            with _MemoryProbe._lock:
                _MemoryProbe._active -= 1
                if _MemoryProbe._active == 0:
                    tracemalloc.stop()


def _own_traced_bytes(module_file: str = __file__) -> int:
    """Bytes of the live tracemalloc traces with a frame in ``module_file`` (the allocating frame, at
    ``_MemoryProbe._NFRAME`` = 1)."""
    traces = tracemalloc._get_traces()  # (domain, size, traceback, total frames); what take_snapshot reads
    if not traces:
        return 0
    # tracebacks are shared tuples, so the test runs once per distinct traceback, not per trace
    tbs = list(map(operator.itemgetter(2), traces))
    ids = np.fromiter(map(id, tbs), dtype=np.int64, count=len(tbs))
    sizes = np.fromiter(map(operator.itemgetter(1), traces), dtype=np.int64, count=len(traces))
    del traces
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    own = np.fromiter((any(f[0] == module_file for f in tbs[i]) for i in first.tolist()), dtype=bool, count=len(first))
    return int(sizes[own[inverse]].sum())


class _StreamingParquet:
    """One Parquet file written row group by row group to a temporary name beside its final one,
    hashed as it is written, renamed into place on ``close``."""

    def __init__(self, output_dir: str, rel: str, schema: pa.Schema, max_rows: int, max_bytes: int | None, probe: _MemoryProbe):
        self.rel = rel
        self.path = join(output_dir, rel)
        directory, name = self.path.rsplit("/", 1) if "/" in self.path else (".", self.path)
        self.tmp = f"{directory}/.tmp-{name}-{uuid.uuid4().hex}"
        self.schema = schema
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.probe = probe
        self.rows: list[tuple] = []  # values in schema order
        self.pending_bytes = 0
        self.total_rows = 0
        self.flushes = 0
        self.sink: HashingSink | None = None
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: tuple, approx_bytes: int = 0) -> None:
        self.rows.append(row)
        self.pending_bytes += approx_bytes
        if len(self.rows) >= self.max_rows or (self.max_bytes is not None and self.pending_bytes >= self.max_bytes):
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        self._open()
        # column by column from the row tuples: the same table as ``from_pylist`` over row dicts (same
        # Parquet bytes), without a dict per row or a per-column lookup in every one
        columns = zip(*self.rows)
        table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, self.schema)], schema=self.schema)
        # the exhausted zip still holds the iterators of every row but the first, so every row's values:
        # let go of it, or the rows stay alive through the write beside their table and its pages
        del columns
        # the rows and their table both held: a row group's most before the write. Own sums at a file's
        # 1st, 2nd, 4th, 8th... row group: the sort buffer only shrinks after the first, and a row group
        # is bounded
        self.flushes += 1
        own = self.flushes & (self.flushes - 1) == 0
        self.probe.sample(own=own)
        self.total_rows += len(self.rows)
        self.rows, self.pending_bytes = [], 0
        self.writer.write_table(table, row_group_size=table.num_rows)
        # Arrow handed the sink each column chunk as a new bytes object, now freed; this module
        # allocated nothing meanwhile, so the sum now plus the largest write is what the write held
        self.probe.sample(own=own)
        del table

    def _open(self) -> None:
        if self.writer is None:
            self.sink = HashingSink(self.tmp, on_write=self.probe.on_write if self.probe.on else None)
            self.writer = pq.ParquetWriter(
                self.sink, self.schema, compression=PARQUET_COMPRESSION, write_statistics=True, store_schema=True,
                write_batch_size=PARQUET_WRITE_BATCH_ROWS,
            )

    def close(self, kind: str) -> FileEntry:
        self._flush()
        self._open()  # a file with no rows is still a valid Parquet file
        self.writer.close()
        self.sink.close()
        rename_over(self.tmp, self.path)
        return FileEntry(path=self.rel, kind=kind, rows=self.total_rows, bytes=self.sink.size, sha256=self.sink.hexdigest())

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
                self.sink.close()
            finally:
                if FileSystems.exists(self.tmp):
                    FileSystems.delete([self.tmp])


_PAIR_VALUES = operator.attrgetter(*PAIR_FIELDS)


_LEDGER_EXTRA = frozenset(LEDGER_EXTRA_FIELDS)
# A ledger row is written as (key, stage, status, reason, detail, source, *extra columns).
assert LEDGER_FIELDS == ("key", "stage", "status", "reason", "detail", "source", *LEDGER_EXTRA_FIELDS), LEDGER_FIELDS
_IMAGE, _CAPTION, _RAW_CAPTION, _META = (PAIR_FIELDS.index(n) for n in ("image", "caption", "raw_caption", "meta"))


def _pair_values(pair) -> tuple:
    """A record's data row: PAIR_FIELDS values (``_decode`` gives a tuple, or a pickled outcome's pair)."""
    return pair if type(pair) is tuple else _PAIR_VALUES(pair)


def _ledger_values(stage: str, key: str, status: str, reason: str, detail: str, source: str, extra: dict) -> tuple:
    """``Outcome.ledger_row(stage)``'s values in LEDGER_FIELDS order, without building the objects."""
    if detail != "":  # kept records have none: skip the regex
        detail = truncate_detail(detail)
    if extra:
        unknown = set(extra) - _LEDGER_EXTRA
        if unknown:
            raise ValueError(f"unknown ledger columns in Outcome.extra: {sorted(unknown)}")
        return (key, stage, status, reason, detail, source, *(extra.get(n) for n in LEDGER_EXTRA_FIELDS))
    return (key, stage, status, reason, detail, source, None, None, None, None)


def _updated(pair, updates: dict):
    """A decoded record (PAIR_FIELDS values, or a pickled outcome's pair) with ``updates`` applied."""
    if type(pair) is tuple:
        values = list(pair)
        for name, v in updates.items():
            values[_FIELD_INDEX[name]] = v
        return tuple(values)
    return pair.replace(**updates)


_FIELD_INDEX = {n: i for i, n in enumerate(PAIR_FIELDS)}


def _pair_bytes(v: tuple) -> int:
    return len(v[_IMAGE] or b"") + len(v[_CAPTION] or "") + len(v[_RAW_CAPTION] or "") + len(v[_META] or "") + 256


class WriteShardFn(beam.DoFn):
    """Writes one shard's data file and ledger file; resolves duplicate keys; applies decision entries
    (``Decision``, sorted just before their key's outcomes) to the outcomes of their key.

    Memory does not grow with the shard: outcomes are sorted through ``sorted_outcomes`` (in-memory
    buffer of ``sort_buffer_bytes``, sorted runs spilled to local disk beyond it) and streamed into
    Parquet one row group at a time (``DATA_ROW_GROUP_ROWS`` rows or ``DATA_ROW_GROUP_BYTES``).
    With ``measure_memory`` the step's own peak (its tracemalloc traces + Arrow pool: ``_MemoryProbe``) is
    reported as the Beam distribution ``mmcorpus.<stage>/writer_peak_bytes``; when ``measure_memory`` is a
    path, each shard also appends ``{"stage", "shard", "records", "peak_bytes", "process_peak_bytes",
    "samples"}`` as a JSON line to that (local or shared) file, for runners whose results carry no metrics.
    """

    def __init__(self, output_dir: str, stage: str, num_shards: int, write_data: bool = True,
                 sort_buffer_bytes: int = SORT_BUFFER_BYTES, measure_memory: bool | str = False,
                 spill_dir: str | None = None, batched: bool = False):
        self.output_dir = output_dir
        self.stage = stage
        self.num_shards = num_shards
        self.write_data = write_data
        self.sort_buffer_bytes = sort_buffer_bytes
        self.measure_memory = measure_memory
        self.spill_dir = spill_dir
        self.batched = batched  # the group holds lists of entries (WriteStageOutput's shuffle)

    def setup(self):
        self._counters: dict[str, Any] = {}
        self._peak = Metrics.distribution(f"mmcorpus.{self.stage}", WRITER_PEAK_METRIC)

    def _inc(self, name: str, n: int = 1) -> None:
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = Metrics.counter(f"mmcorpus.{self.stage}", name)
        c.inc(n)

    def process(self, element: tuple[int, Iterable[Outcome | tuple[tuple, bytes]]]):
        shard, outcomes = element
        if self.batched:
            outcomes = (entry for entries in outcomes for entry in _unpacked(entries))
        with _MemoryProbe(bool(self.measure_memory)) as probe, tempfile.TemporaryDirectory(
            prefix="mmcorpus-sort-", dir=self.spill_dir
        ) as tmp:
            result = self._write(shard, _sorted_entries(outcomes, tmp, self.sort_buffer_bytes, probe), probe)
        if self.measure_memory:
            self._peak.update(int(probe.peak))
            if isinstance(self.measure_memory, str):
                line = {"stage": self.stage, "shard": shard, "records": sum(result.counts.values()), "peak_bytes": int(probe.peak),
                        "process_peak_bytes": int(probe.process_peak), "samples": probe.samples}
                with open(self.measure_memory, "a", encoding="utf-8") as f:  # one short append per shard
                    f.write(json.dumps(line, sort_keys=True) + "\n")
        yield result

    def _write(self, shard: int, entries: Iterator[tuple[tuple, bytes]], probe: _MemoryProbe) -> ShardResult:
        name = shard_name(shard, self.num_shards)
        data = _StreamingParquet(self.output_dir, f"{DATA_DIR}/{name}", PAIR_SCHEMA, DATA_ROW_GROUP_ROWS, DATA_ROW_GROUP_BYTES, probe)
        ledger = _StreamingParquet(self.output_dir, f"{LEDGER_DIR}/{name}", LEDGER_SCHEMA, LEDGER_ROW_GROUP_ROWS, None, probe)
        counts: Counter = Counter()
        last_kept: tuple[str, str] | None = None  # (key, source) of the last kept record: sorted by key
        decision: tuple | None = None  # (key, values, applied) of the last decision: it sorts before its outcomes
        try:
            for skey, blob in entries:
                if blob[0] == _DECISION_TAG:
                    dkey = skey[0]
                    if decision is not None and decision[0] == dkey:
                        raise ValueError(f"two decisions for key {dkey!r} in shard {shard}")
                    if decision is not None and not decision[2]:
                        raise ValueError(f"decision for key {decision[0]!r} has no record in shard {shard}")
                    decision = (dkey, marshal.loads(blob[1:]), False)
                    continue
                # the outcome's fields, read from its encoded entry (no Outcome/Pair objects rebuilt)
                key, status, reason, detail, source, extra, pair = _decode(blob)
                if decision is not None:
                    if decision[0] == key:
                        status, reason, detail, extra, updates = decision[1]
                        if status == KEPT and updates and pair is not None:
                            pair = _updated(pair, updates)
                        decision = (key, decision[1], True)
                    elif not decision[2]:
                        raise ValueError(f"decision for key {decision[0]!r} has no record in shard {shard}")
                    else:
                        decision = None
                if status not in STATUSES:
                    raise ValueError(f"bad status {status!r} for key {key!r}")
                reasons.check_reason(reason)
                if not source and pair is not None:
                    source = pair[_PAIR_SOURCE] if type(pair) is tuple else pair.source
                if status == KEPT and self.write_data:
                    if pair is None:
                        raise ValueError(f"kept outcome without a record for key {key!r}")
                    values = _pair_values(pair)
                    if last_kept is not None and last_kept[0] == key:
                        status, reason, detail, extra = REJECTED, reasons.DUPLICATE_KEY, f"key first seen at {last_kept[1]}", {}
                    else:
                        last_kept = (key, values[_PAIR_SOURCE])
                        data.add(values, _pair_bytes(values))
                counts[f"{status}/{reason}"] += 1
                ledger.add(_ledger_values(self.stage, key, status, reason, detail, source, extra))
            if decision is not None and not decision[2]:
                raise ValueError(f"decision for key {decision[0]!r} has no record in shard {shard}")
            files = []
            if data.total_rows or data.rows:
                files.append(data.close(FILE_KIND_DATA))
            files.append(ledger.close(FILE_KIND_LEDGER))
        except BaseException:
            data.abort()
            ledger.abort()
            raise
        self._inc("total", sum(counts.values()))
        for key, n in counts.items():
            status, reason = key.split("/", 1)
            self._inc(KEPT if status == KEPT else f"{status}_{reason}", n)
        return ShardResult(files=files, counts=dict(counts))


def encode_batch(outcomes: Iterable[Outcome]) -> list[tuple[tuple, bytes]]:
    """A batch of outcomes for ``WriteStageOutput``: the plain list of their ``encode_outcome`` entries.

    A stage step that makes many outcomes at once may emit these instead of one ``Outcome`` per
    element: the writer counts, shards and writes each entry exactly as if its outcome had come
    alone, and a runner pays its per-element costs (and its size sampling, which encodes an element)
    once per batch. The batch is a plain list of tuples and bytes so that runners encode it with
    their fast primitive coder, never by pickling objects. Keep batches bounded (records and bytes):
    a worker holds one while it is built."""
    return [encode_outcome(o) for o in outcomes]


def record_count(item: Outcome | list) -> int:
    """Records an element of a stage's outcomes stands for: a batch (``encode_batch``) its length."""
    return len(item) if type(item) is list else 1


def _shard_entries(item, num_shards):
    """(shard, [encode_outcome entries]) for an Outcome, or for each shard a batch touches.
    (No type annotations: Beam would choose its shuffle coder from them.)"""
    if type(item) is not list:
        return [(shard_of(item.key, num_shards), [encode_outcome(item)])]
    if num_shards == 1 and item:  # every key's shard is 0: the batch as it is, no hashing
        return [(0, _packed(item))]
    by_shard: dict[int, list] = {}
    for entry in item:
        entries = by_shard.get(s := shard_of(entry[0][0], num_shards))
        if entries is None:
            entries = by_shard[s] = []
        entries.append(entry)
    return [(s, _packed(entries)) for s, entries in sorted(by_shard.items())]


_BLOB = operator.itemgetter(1)
_FIRST = operator.itemgetter(0)


def _packed(entries: list) -> list | bytes:
    """A shard's part of a batch as it crosses the shuffle: one marshal dump of the entries when none
    is a pickle (a marshal-encoded outcome's sort key holds only the plain values ``_marshal_safe``
    checked), so the runner encodes and decodes one bytes value instead of each entry's tuples
    (DirectRunner: ~1 µs an entry); else the list as it is. ``WriteShardFn`` unpacks (``_unpacked``)."""
    if _PICKLE_PROTO in set(map(_FIRST, map(_BLOB, entries))):
        return entries
    return marshal.dumps(entries)


def _unpacked(entries: list | bytes) -> list:
    return marshal.loads(entries) if type(entries) is bytes else entries


def _shard_decisions(item, num_shards):
    """(shard, [encode_decision entries]) for a ``Decision``, or for each shard a list of entries touches."""
    if type(item) is list:
        return _shard_entries(item, num_shards)
    return [(shard_of(item.key, num_shards), [encode_decision(item)])]


class _CountRecordsFn(beam.CombineFn):
    """Number of outcomes, a batch counting for its length."""

    def create_accumulator(self):
        return 0

    def add_input(self, n, item):
        return n + record_count(item)

    def merge_accumulators(self, counts):
        return sum(counts)

    def extract_output(self, n):
        return n


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

    The input PCollection holds ``Outcome``s, batches of them (``encode_batch``), or both.

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
        sort_buffer_bytes: outcomes a shard writer sorts in memory before spilling sorted runs to
            local disk (``spill_dir``, default the system temp dir); does not change the bytes written.
        measure_memory: report each shard write's own peak memory as the Beam distribution
            ``mmcorpus.<stage>/writer_peak_bytes`` (tracemalloc + Arrow pool; slows the write); a path
            also gets one JSON line per shard (see ``WriteShardFn``).
        spill_dir: local directory for sorted runs (needs up to one shard of free space).
        decisions: optional PCollection of ``Decision``s, or of lists of their ``encode_decision``
            entries: each replaces the outcome(s) of its key (see ``Decision``), applied per shard as it
            is written (decision entries ride the shard shuffle and sort just before their key). A
            decision whose key has no outcome, or two decisions for one key, fail the shard write
            with a ValueError naming the key; a decision applies to every outcome of its key.

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
        sort_buffer_bytes: int = SORT_BUFFER_BYTES,
        measure_memory: bool | str = False,
        spill_dir: str | None = None,
        decisions: beam.PCollection | None = None,
    ):
        super().__init__()
        self.decisions = decisions
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        if sort_buffer_bytes < 1:
            raise ValueError("sort_buffer_bytes must be >= 1")
        self.sort_buffer_bytes = sort_buffer_bytes
        self.measure_memory = measure_memory
        self.spill_dir = spill_dir
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
        # elements are Outcomes or batches; a batch crosses the shuffle as one list per shard it touches
        inputs = outcomes | "CountInputs" >> beam.CombineGlobally(_CountRecordsFn())
        entries = outcomes | "ShardByKey" >> beam.FlatMap(_shard_entries, n)
        if self.decisions is not None:
            decided = self.decisions | "ShardDecisions" >> beam.FlatMap(_shard_decisions, n)
            entries = (entries, decided) | "WithDecisions" >> beam.Flatten()
        results = (
            entries
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(
                WriteShardFn(self.output_dir, self.stage, n, self.write_data, self.sort_buffer_bytes,
                             self.measure_memory, self.spill_dir, batched=True)
            )
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
