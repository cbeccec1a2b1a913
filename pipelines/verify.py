"""`mmcorpus verify DIR`: check a stage output's invariants and checksums; exit 1 when one fails.

Checks: the manifest parses; every listed file exists with its size and sha256; no unlisted
files in data/ or ledger/; ledger rows = inputs (and = the previous stage's outputs for stage
inputs); kept ledger rows = output rows; reason counts recomputed from the ledger match the
manifest; every reason is in the vocabulary; output keys are unique and each has a kept ledger row.

Built for any corpus size: files are checksummed ``--jobs`` at a time, the ledger and data keys are
streamed in Arrow batches, and the key checks hold at most ``--partition-keys`` keys in memory
(more are hash-partitioned to temporary files), so peak memory does not grow with the number of keys.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import reasons
from schemas.errors import UserError
from schemas.manifest import DATA_DIR, FILE_KIND_DATA, FILE_KIND_LEDGER, LEDGER_DIR, MANIFEST_NAME, Manifest
from schemas.records import KEPT
from transforms.stage_io import join, read_bytes

# Checksums read this much per call: big blocks keep hashlib (which releases the GIL above 2 KiB)
# busy in every thread instead of in Python call overhead.
READ_BLOCK = 8 << 20
# Rows per Arrow batch when streaming the key/status/reason columns of a ledger or data file.
BATCH_ROWS = 1 << 16
# At most this many keys are held in memory for the key checks; more are hash-partitioned to
# temporary Arrow files and checked one partition at a time, so memory does not grow with the corpus.
DEFAULT_PARTITION_KEYS = 1 << 20
EXAMPLES = 5  # keys named in a failed check's detail


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _sha256_of(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with FileSystems.open(path, compression_type="uncompressed") as f:
        while chunk := f.read(READ_BLOCK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _check_file(stage_dir: str, entry) -> str | None:
    """None when the file is present with its manifest size and sha256, else what is wrong."""
    path = join(stage_dir, entry.path)
    if not FileSystems.exists(path):
        return f"{entry.path} missing"
    size, sha = _sha256_of(path)
    if size != entry.bytes:
        return f"{entry.path}: {size} bytes, manifest says {entry.bytes}"
    if sha != entry.sha256:
        return f"{entry.path}: sha256 {sha[:12]}…, manifest says {entry.sha256[:12]}…"
    return None


def checksum_files(stage_dir: str, entries: list, jobs: int = 1) -> list[str]:
    """What is wrong with the listed files (missing, size, sha256), in manifest order; ``jobs``
    files are read at once by threads."""
    if jobs == 1 or len(entries) <= 1:
        results = [_check_file(stage_dir, e) for e in entries]
    else:
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="verify-sha256") as pool:
            results = list(pool.map(lambda e: _check_file(stage_dir, e), entries))
    return [r for r in results if r is not None]


def _batches(path: str, columns: list[str]):
    """Stream ``columns`` of a Parquet file batch by batch (never the whole file)."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False)


def _num_rows(path: str) -> int:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.ParquetFile(f).metadata.num_rows


_POWERS: dict[int, np.ndarray] = {}


def _powers(n: int) -> np.ndarray:
    size = 64
    while size < n:
        size *= 2
    if size not in _POWERS:
        mult, x, out = 0x100000001B3, 1, []
        for _ in range(size):
            out.append(x)
            x = (x * mult) % (1 << 64)
        _POWERS[size] = np.array(out, dtype=np.uint64)
    return _POWERS[size]


def partition_of(keys: pa.Array, parts: int) -> np.ndarray:
    """Partition index in [0, parts) of every string in ``keys``: a polynomial hash over all of a
    key's bytes (vectorised with numpy, no Python object per key), so equal keys always meet in
    the same partition and any key layout (zero-padded counters, hex digests) spreads evenly."""
    keys = keys.cast(pa.large_string())
    n = len(keys)
    _, off_buf, data_buf = keys.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64)[keys.offset : keys.offset + n + 1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buf, dtype=np.uint8)[lo:hi].astype(np.uint64) if data_buf is not None and hi > lo else None
    h = np.zeros(n, dtype=np.uint64)
    lengths = np.diff(offsets)
    if data is not None:
        starts = offsets[:-1] - lo
        pos = np.arange(hi - lo, dtype=np.int64) - np.repeat(starts, lengths)
        contrib = (data + np.uint64(1)) * _powers(int(lengths.max()))[pos]
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(contrib, starts[nonempty])
    # murmur3's 64-bit finaliser: the low bits (what % parts sees) depend on every input bit
    h ^= lengths.astype(np.uint64)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return (h % np.uint64(parts)).astype(np.int64)


_SPILL_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("data", pa.bool_())])


class KeyCheck:
    """Output keys unique, and every output key with a kept ledger row, in bounded memory.

    Keys arrive in Arrow batches from the data files and from the kept rows of the ledger. When
    at most ``partition_keys`` keys are expected, they stay in memory; otherwise every key goes to
    one of ``ceil(expected / partition_keys)`` hash partitions spilled to Arrow IPC files in a
    temporary directory, and each partition is checked alone with pyarrow's hash kernels
    (``value_counts``, ``is_in``). Equal keys always land in the same partition, so the per-partition
    answers add up to the global one. Memory: a few times ``partition_keys`` keys, whatever the corpus.

    Args:
        expected_keys: upper bound on the keys that will be added (data rows + ledger rows).
        partition_keys: most keys held in memory at once.
        tmp_dir: where spill files go (a fresh directory below it, removed by ``close``).
    """

    def __init__(self, expected_keys: int, partition_keys: int = DEFAULT_PARTITION_KEYS, tmp_dir: str | None = None):
        if partition_keys < 1:
            raise ValueError(f"partition_keys must be >= 1, got {partition_keys}")
        self.parts = max(1, -(-expected_keys // partition_keys))
        self.flush_keys = max(1, min(partition_keys, 1 << 18))
        self.buffers: list[list[pa.RecordBatch]] = [[] for _ in range(self.parts)]
        self.buffered = 0
        self.spill_dir = tempfile.mkdtemp(prefix="mmcorpus-verify-", dir=tmp_dir) if self.parts > 1 else None
        self.writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        self.data_rows = 0

    def add(self, keys: pa.Array, data: bool) -> None:
        if data:
            self.data_rows += len(keys)
        if not len(keys):
            return
        batch = pa.RecordBatch.from_arrays([keys.cast(pa.string()), pa.array(np.full(len(keys), data))], schema=_SPILL_SCHEMA)
        if self.parts == 1:
            self.buffers[0].append(batch)
            return
        part = partition_of(keys, self.parts)
        order = np.argsort(part, kind="stable")
        batch = batch.take(pa.array(order))
        bounds = np.searchsorted(part[order], np.arange(self.parts + 1))
        for p in range(self.parts):
            if bounds[p + 1] > bounds[p]:
                self.buffers[p].append(batch.slice(bounds[p], bounds[p + 1] - bounds[p]))
        self.buffered += len(keys)
        if self.buffered >= self.flush_keys:
            self._flush()

    def _flush(self) -> None:
        for p, batches in enumerate(self.buffers):
            if not batches:
                continue
            w = self.writers.get(p)
            if w is None:
                w = self.writers[p] = ipc.new_stream(os.path.join(self.spill_dir, f"part-{p:05d}.arrow"), _SPILL_SCHEMA)
            w.write_table(pa.Table.from_batches(batches, _SPILL_SCHEMA))
            self.buffers[p] = []
        self.buffered = 0

    def _partitions(self):
        if self.parts == 1:
            yield pa.Table.from_batches(self.buffers[0], _SPILL_SCHEMA)
            self.buffers[0] = []
            return
        self._flush()
        for w in self.writers.values():
            w.close()
        for p in sorted(self.writers):
            with pa.memory_map(os.path.join(self.spill_dir, f"part-{p:05d}.arrow")) as src:
                yield ipc.open_stream(src).read_all()

    def result(self) -> tuple[list[str], int, list[str], int]:
        """(first duplicate output keys, how many, first output keys without a kept ledger row, how many)."""
        dups: list[str] = []
        missing: list[str] = []
        n_dups = n_missing = 0
        for t in self._partitions():
            is_data = t.column("data")
            out_keys = t.column("key").filter(is_data)
            kept_keys = t.column("key").filter(pc.invert(is_data)).combine_chunks()
            if not len(out_keys):
                continue
            counts = pc.value_counts(out_keys)
            values, n = counts.field("values"), counts.field("counts")
            d = values.filter(pc.greater(n, 1))
            m = values.filter(pc.invert(pc.is_in(values, value_set=kept_keys)))
            n_dups += len(d)
            n_missing += len(m)
            dups = sorted(dups + _smallest(d))[:EXAMPLES]
            missing = sorted(missing + _smallest(m))[:EXAMPLES]
            del t, counts, values, n, d, m, out_keys, kept_keys
        return dups, n_dups, missing, n_missing

    def close(self) -> None:
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # already closed by _partitions
                pass
        if self.spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _smallest(keys: pa.Array) -> list[str]:
    return keys.take(pc.sort_indices(keys))[:EXAMPLES].to_pylist() if len(keys) else []


def _ledger_counts(batch: pa.RecordBatch, counts: Counter) -> None:
    """Add the batch's rows per ``status/reason`` to ``counts`` (a few entries: the vocabulary)."""
    t = pa.Table.from_batches([batch]).group_by(["status", "reason"]).aggregate([([], "count_all")])
    for status, reason, n in zip(*(t.column(c).to_pylist() for c in ("status", "reason", "count_all"))):
        counts[f"{status}/{reason}"] += n


def _examples(keys: list[str], total: int) -> str:
    text = ", ".join(keys)
    return text + (f" (and {total - len(keys):,} more)" if total > len(keys) else "")


def verify(stage_dir: str, jobs: int = 1, partition_keys: int = DEFAULT_PARTITION_KEYS, tmp_dir: str | None = None) -> list[Check]:
    """Check one stage output directory; see the module docstring for the checks.

    Args:
        stage_dir: a finished stage output (local path or a URL Beam's FileSystems can open).
        jobs: files checksummed at the same time (threads; hashlib releases the GIL on big blocks).
        partition_keys: most keys held in memory by the key checks (see ``KeyCheck``).
        tmp_dir: where the key checks spill partitions when there are more keys than that.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    checks: list[Check] = []
    mpath = join(stage_dir, MANIFEST_NAME)
    if not FileSystems.exists(mpath):
        raise UserError(f"{mpath} not found: not a finished stage output (the manifest is written last)")
    try:
        m = Manifest.from_json(read_bytes(mpath).decode("utf-8"))
    except (ValueError, TypeError, KeyError) as e:
        return [Check("manifest parses", False, f"{type(e).__name__}: {e}")]
    checks.append(Check("manifest parses", True, f"stage {m.stage}, config {m.config_hash[:12]}"))

    # files: present, right size, right checksum, nothing unlisted
    bad = checksum_files(stage_dir, m.files, jobs)
    checks.append(Check("files match checksums", not bad, "; ".join(bad[:5]) or f"{len(m.files)} files"))
    listed = {e.path for e in m.files}
    unlisted = []
    for sub in (DATA_DIR, LEDGER_DIR):
        for md in FileSystems.match([join(stage_dir, sub, "*")])[0].metadata_list:
            rel = md.path[len(stage_dir.rstrip("/")) + 1 :]
            if rel not in listed:
                unlisted.append(rel)
    checks.append(Check("no unlisted files", not unlisted, ", ".join(sorted(unlisted)[:5]) or "ok"))
    if bad:
        return checks

    ledger_files = [join(stage_dir, e.path) for e in m.files_of(FILE_KIND_LEDGER)]
    data_files = [join(stage_dir, e.path) for e in m.files_of(FILE_KIND_DATA)]
    check_keys = bool(data_files) or "packed_samples" not in m.extra  # pack stages (pack, sft_pack) write packs, not rows
    keys = None
    if check_keys:
        # The manifest's row counts were just confirmed by checksum, but read them from the files'
        # footers anyway: the bound must hold for a manifest that lies.
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="verify-footers") as pool:
            expected = sum(pool.map(_num_rows, ledger_files + data_files))
        keys = KeyCheck(expected, partition_keys, tmp_dir)
    try:
        # ledger: counts by status/reason (a vocabulary-sized Counter), kept keys to the key check
        ledger_counts: Counter = Counter()
        ledger_rows = 0
        for path in ledger_files:
            for batch in _batches(path, ["key", "status", "reason"]):
                ledger_rows += batch.num_rows
                _ledger_counts(batch, ledger_counts)
                if keys is not None:
                    keys.add(batch.column("key").filter(pc.equal(batch.column("status"), KEPT)), data=False)
        c = m.counts
        checks.append(Check(
            "inputs = ledger rows",
            ledger_rows == c["inputs"] == c["ledger_rows"],
            f"inputs {c['inputs']}, ledger rows {ledger_rows} (manifest says {c['ledger_rows']})",
        ))
        from_stages = m.input.get("kind") == "stage" or (
            m.input.get("kind") == "sources"
            and all(s.get("kind") == "stage" for s in (m.input.get("sources") or {}).values())
        )
        if from_stages:
            prev = m.input.get("records")
            # select's upsampled replicas have one kept ledger row each on top of one row per input record
            made = int((m.extra.get("mixture") or {}).get("replicas") or 0)
            checks.append(Check("inputs = previous stage outputs", prev is not None and prev + made == c["inputs"],
                                f"previous outputs {prev}, inputs {c['inputs']}" + (f" ({made} replicas)" if made else "")))
        checks.append(Check(
            "reason counts match ledger",
            dict(ledger_counts) == c["by_reason"],
            "ok" if dict(ledger_counts) == c["by_reason"] else f"ledger {dict(ledger_counts)} vs manifest {c['by_reason']}",
        ))
        unknown = sorted({r.split("/", 1)[1] for r in ledger_counts} - reasons.ALL)
        unknown = [u for u in unknown if not u.startswith(reasons.EXCEPTION_PREFIX)]
        checks.append(Check("reasons in vocabulary", not unknown, ", ".join(unknown) or "ok"))

        kept = sum(n for k, n in ledger_counts.items() if k.startswith(KEPT + "/"))
        if keys is not None:
            for path in data_files:
                for batch in _batches(path, ["key"]):
                    keys.add(batch.column("key"), data=True)
            n_data = keys.data_rows
            checks.append(Check("kept = outputs", kept == n_data == c["outputs"], f"kept {kept}, output rows {n_data}, manifest {c['outputs']}"))
            dups, n_dups, missing, n_missing = keys.result()
            checks.append(Check("output keys unique", not n_dups, _examples(dups, n_dups) or "ok"))
            checks.append(Check("every output has a kept ledger row", not n_missing, _examples(missing, n_missing) or "ok"))
        else:
            packed = m.extra.get("packed_samples")
            checks.append(Check("kept = packed samples", kept == packed == c["outputs"], f"kept {kept}, packed {packed}"))
    finally:
        if keys is not None:
            keys.close()
    return checks


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcorpus verify", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="stage output directories")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("--jobs", "-j", type=int, default=_cpus(), help="files checksummed in parallel (default: usable CPUs)")
    p.add_argument("--partition-keys", type=int, default=DEFAULT_PARTITION_KEYS,
                   help="most keys held in memory by the key checks; more spill to --tmp-dir in hash partitions")
    p.add_argument("--tmp-dir", help="where key partitions spill (default: the system temp directory)")
    args = p.parse_args(argv)
    if args.partition_keys < 1:
        raise UserError(f"--partition-keys must be at least 1, got {args.partition_keys}")
    all_ok = True
    report = {}
    for d in args.dirs:
        checks = verify(d, jobs=args.jobs, partition_keys=args.partition_keys, tmp_dir=args.tmp_dir)
        ok = all(ch.ok for ch in checks)
        all_ok &= ok
        report[d] = {"ok": ok, "checks": [ch.__dict__ for ch in checks]}
        if not args.json:
            from rich.console import Console
            from rich.markup import escape
            from rich.table import Table

            t = Table(title=f"verify {escape(d)}: {'OK' if ok else 'FAILED'}", title_justify="left")
            t.add_column("check")
            t.add_column("result")
            t.add_column("detail")
            for ch in checks:
                t.add_row(ch.name, "[green]ok[/green]" if ch.ok else "[red]FAIL[/red]", escape(ch.detail))
            Console().print(t)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if all_ok else 1


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "verify")
