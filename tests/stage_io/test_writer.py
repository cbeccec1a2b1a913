"""The shard writer: external sort gives the same bytes as an in-memory sort, row groups are bounded by
rows and bytes, checksums match the files, and its own peak memory does not grow with the shard."""

from __future__ import annotations

import functools
import hashlib
import random

import pyarrow.parquet as pq
import pytest

from schemas import reasons
from schemas.records import KEPT, REJECTED, Outcome, Pair
from transforms import stage_io
from transforms.stage_io import WriteShardFn


def _pair(i: int, image_bytes: int = 0, source: str | None = None) -> Pair:
    rng = random.Random(i)
    return Pair(
        key=f"k{i:06d}", caption=f"caption number {i}", url=f"http://example.com/{i}.jpg",
        image=rng.randbytes(image_bytes) if image_bytes else None, source=source or f"in.parquet#{i}",
    )


def _outcomes(n: int, image_bytes: int = 0) -> list[Outcome]:
    out = []
    for i in range(n):
        p = _pair(i, image_bytes)
        out.append(Outcome.kept(p) if i % 5 else Outcome.dropped(p, REJECTED, reasons.CAPTION_TOO_SHORT_WORDS, "3 words"))
    return out


def _write(tmp_path, name: str, outcomes, **kw) -> stage_io.ShardResult:
    fn = WriteShardFn(str(tmp_path / name), "filter", 4, spill_dir=str(tmp_path), **kw)
    fn.setup()
    (result,) = list(fn.process((1, outcomes)))
    return result


def _files(tmp_path, name: str) -> dict[str, bytes]:
    root = tmp_path / name
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_external_sort_spills_and_writes_the_same_bytes_whatever_the_order(tmp_path, monkeypatch):
    outcomes = _outcomes(3000)
    # a second kept record under an existing key, read later from another file: a duplicate_key row
    dup = Outcome.kept(_pair(7, source="other.parquet#0").replace(caption="another caption"))
    outcomes.append(dup)
    runs = []
    real = stage_io._write_run
    monkeypatch.setattr(stage_io, "_write_run", lambda entries, path: (runs.append(path), real(entries, path)))

    a = _write(tmp_path, "a", list(outcomes))  # default buffer: all in memory
    assert runs == []
    shuffled = list(outcomes)
    random.Random(1).shuffle(shuffled)
    b = _write(tmp_path, "b", shuffled, sort_buffer_bytes=20_000)  # ~60 sorted runs merged from disk
    assert len(runs) >= 20
    assert _files(tmp_path, "a") == _files(tmp_path, "b")
    monkeypatch.setattr(stage_io, "MERGE_FANIN", 4)  # runs merged in groups first: still the same bytes
    _write(tmp_path, "c", shuffled, sort_buffer_bytes=20_000)
    assert _files(tmp_path, "a") == _files(tmp_path, "c")
    assert a.counts == b.counts == {"kept/ok": 2400, "rejected/caption_too_short_words": 600, "rejected/duplicate_key": 1}

    data = pq.read_table(tmp_path / "a" / "data" / "part-00001-of-00004.parquet")
    keys = data.column("key").to_pylist()
    assert keys == sorted(f"k{i:06d}" for i in range(3000) if i % 5)
    assert data.column("caption").to_pylist()[keys.index("k000007")] == "caption number 7"
    ledger = pq.read_table(tmp_path / "a" / "ledger" / "part-00001-of-00004.parquet").to_pylist()
    assert len(ledger) == 3001
    (row,) = [r for r in ledger if r["reason"] == "duplicate_key"]
    assert (row["key"], row["source"], row["detail"]) == ("k000007", "other.parquet#0", "key first seen at in.parquet#7")


def test_file_entries_match_the_bytes_on_disk(tmp_path):
    result = _write(tmp_path, "a", _outcomes(500))
    assert [f.path for f in result.files] == ["data/part-00001-of-00004.parquet", "ledger/part-00001-of-00004.parquet"]
    for f in result.files:
        raw = (tmp_path / "a" / f.path).read_bytes()
        assert (f.bytes, f.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
        assert f.rows == pq.ParquetFile(tmp_path / "a" / f.path).metadata.num_rows
    assert [p.name for p in (tmp_path / "a" / "data").iterdir()] == ["part-00001-of-00004.parquet"]  # no temp left


def test_no_data_file_when_nothing_is_kept(tmp_path):
    outcomes = [o for o in _outcomes(50) if o.status != KEPT]
    result = _write(tmp_path, "a", outcomes)
    assert [f.kind for f in result.files] == ["ledger"]
    assert not (tmp_path / "a" / "data").exists()


def test_data_row_groups_close_by_rows_and_by_bytes(tmp_path, monkeypatch):
    # 100 kept records of 40 KB images: 32 MiB per row group would hold them all; 1,024 rows too.
    # With the byte cap at 1 MB, a group closes once its records' counted bytes reach 1 MB: a record
    # counts image + caption + meta + 256, about 40,275 bytes, so the 25th record closes each group.
    outcomes = [Outcome.kept(_pair(i, 40_000)) for i in range(100)]
    monkeypatch.setattr(stage_io, "DATA_ROW_GROUP_BYTES", 1_000_000)
    _write(tmp_path, "a", outcomes)
    meta = pq.ParquetFile(tmp_path / "a" / "data" / "part-00001-of-00004.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [25, 25, 25, 25]


def _lazy(n: int, image_bytes: int):
    for i in range(n):
        yield Outcome.kept(_pair(i, image_bytes))


@pytest.mark.parametrize("image_bytes", [20_000])
def test_writer_peak_memory_does_not_grow_with_the_shard(tmp_path, monkeypatch, image_bytes):
    """Peak of the write step itself (tracemalloc + Arrow pool) for a 10 MB and a 40 MB shard: flat,
    and far below the shard. The old writer (sort every Outcome, one table, one bytes blob) held ~3x."""
    peaks = {}
    monkeypatch.setattr(stage_io, "DATA_ROW_GROUP_BYTES", 1_000_000)  # both shards span many row groups
    monkeypatch.setattr(stage_io, "MERGE_FANIN", 4)  # and both merge at most 4 runs at once (5 and 20 runs)
    monkeypatch.setattr(stage_io, "LEDGER_ROW_GROUP_ROWS", 256)  # and span several ledger row groups
    for n in (500, 2000):
        fn = WriteShardFn(str(tmp_path / f"n{n}"), "filter", 1, sort_buffer_bytes=2_000_000, measure_memory=True,
                          spill_dir=str(tmp_path))
        fn.setup()
        seen = []
        fn._peak = type("D", (), {"update": lambda self, v: seen.append(v)})()
        list(fn.process((0, _lazy(n, image_bytes))))
        peaks[n] = seen[0]
    shard_bytes = 2000 * image_bytes
    assert peaks[2000] < 1.3 * peaks[500], peaks
    assert peaks[2000] < shard_bytes / 4, peaks


def _batches(n: int, per: int = 500):
    """The writer's input as WriteStageOutput hands it over: marshal-packed batches of encoded outcomes."""
    outcomes = [Outcome.kept(_pair(i, 0)) for i in range(n)]
    return [stage_io._packed(stage_io.encode_batch(outcomes[i:i + per])) for i in range(0, n, per)]


def test_writer_own_peak_leaves_out_other_threads(tmp_path):
    """A Dask worker's communication thread deserialises other tasks' inputs while a shard is written;
    tracemalloc counts every thread. Here a second thread holds 200 MB for the whole write: the process
    peak sees it, the writer's own figure must not (it was the whole-process peak before: Dask shards read
    up to 36x their DirectRunner figure). Alone, the own figure must be most of the process peak."""
    import json
    import threading

    held: list[bytes] = []
    allocated, finished = threading.Event(), threading.Event()

    def other_thread():
        held.extend(bytes(100_000) + bytes([i % 256]) for i in range(2_000))  # 200 MB
        allocated.set()
        finished.wait()
        held.clear()

    def feed(batches, with_thread):
        for i, b in enumerate(batches):
            if i == 0 and with_thread:  # the write has started (the probe is on): the other thread allocates now
                threading.Thread(target=other_thread, daemon=True).start()
                assert allocated.wait(60)
            yield b

    batches = _batches(20_000)
    lines = {}
    for name, with_thread in (("alone", False), ("beside", True)):  # `finished` stays clear until "beside" ends
        log = tmp_path / f"{name}.jsonl"
        fn = WriteShardFn(str(tmp_path / name), "filter", 1, measure_memory=str(log), spill_dir=str(tmp_path), batched=True)
        fn.setup()
        list(fn.process((0, feed(batches, with_thread))))
        if with_thread:
            finished.set()  # the other thread lets go only now, after the write
        lines[name] = json.loads(log.read_text())
    alone, beside = lines["alone"], lines["beside"]
    assert alone["records"] == beside["records"] == 20_000
    mb = 1e6
    # the other thread's 200 MB shows in the process peak ...
    assert 195 * mb < beside["process_peak_bytes"] - alone["process_peak_bytes"] < 215 * mb, (alone, beside)
    # ... not in the writer's own figure, which stays what it is alone
    assert abs(beside["peak_bytes"] - alone["peak_bytes"]) < 0.05 * alone["peak_bytes"], (alone, beside)
    assert alone["peak_bytes"] < 50 * mb
    # alone, the own figure is nearly all of the process peak (the sums are taken where the writer holds most)
    assert 0.85 * alone["process_peak_bytes"] <= alone["peak_bytes"] <= alone["process_peak_bytes"], alone


# A fresh process writes one shard without the probe and measures it independently: tracemalloc's peak
# (every Python allocation, one frame) and the Arrow pool's peak, each as growth over the write.
_TRUE_PEAK = r"""
import json, sys, tempfile, tracemalloc
import pyarrow as pa
from schemas.records import Outcome
from tests.stage_io.test_writer import _pair
from transforms.stage_io import WriteShardFn

n, image_bytes = int(sys.argv[1]), int(sys.argv[2])
outcomes = (Outcome.kept(_pair(i, image_bytes)) for i in range(n))
d = tempfile.mkdtemp()
fn = WriteShardFn(d + "/out", "filter", 1, spill_dir=d)
fn.setup()
pool = pa.default_memory_pool()
pool_base, pool_max = pool.bytes_allocated(), pool.max_memory()
tracemalloc.start(1)
base = tracemalloc.get_traced_memory()[0]
(result,) = list(fn.process((0, outcomes)))
traced_peak = tracemalloc.get_traced_memory()[1] - base
tracemalloc.stop()
assert pool.max_memory() > pool_max  # the write reached a new pool peak: its growth is measured
print(json.dumps({"traced_peak": traced_peak, "pool_peak": pool.max_memory() - pool_base,
                  "rows": sum(f.rows for f in result.files if f.kind == "data")}))
"""


@functools.lru_cache(maxsize=None)  # one fresh process per input, shared by the tests below
def _true_peak(n: int, image_bytes: int) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _TRUE_PEAK, str(n), str(image_bytes)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_writer_own_peak_counts_what_arrow_holds_while_writing(tmp_path):
    """600 records of 30 KB incompressible images: one 18 MB row group. While it is written, Arrow hands
    the sink the image pages as new bytes objects (under pyarrow's frame) and its pool holds the table
    and the encoded and compressed pages. The own figure missed both (about 0.3 of the true peak, and
    below the pool's peak alone), the process figure the pool's part. The true peak is measured in a
    fresh process that only writes, without the probe: tracemalloc's peak and the pool's peak, each over
    the whole write. The writer's peak lies between the larger of the two (each is held at some moment)
    and their sum (their moments may differ)."""
    import json

    n, image_bytes = 600, 30_000
    true = _true_peak(n, image_bytes)
    assert true["rows"] == n
    log = tmp_path / "peak.jsonl"
    fn = WriteShardFn(str(tmp_path / "out"), "filter", 1, measure_memory=str(log), spill_dir=str(tmp_path))
    fn.setup()
    list(fn.process((0, (Outcome.kept(_pair(i, image_bytes)) for i in range(n)))))
    line = json.loads(log.read_text())
    low, high = max(true["traced_peak"], true["pool_peak"]), true["traced_peak"] + true["pool_peak"]
    assert low <= line["peak_bytes"] <= 1.05 * high, (line, true)
    assert low <= line["process_peak_bytes"] <= 1.05 * high, (line, true)


def test_writer_holds_under_three_row_groups_while_writing_images():
    """Arrow closes a page only between batches of ``PARQUET_WRITE_BATCH_ROWS`` rows: at its default
    batch (1,024 rows) a 600-image row group was one 18 MB page, encoded as a dictionary and then again
    plain, and the write held 6.8 row groups (traced + pool, 121.8 MB). In batches of 32 the pages are
    about 1 MB, and the whole write holds under 3 row groups (the rows while the table is built, then
    the table and a page or two)."""
    n, image_bytes = 600, 30_000
    true = _true_peak(n, image_bytes)
    group = n * image_bytes
    assert true["traced_peak"] + true["pool_peak"] < 3 * group, true


def test_writer_lets_go_of_the_rows_before_arrow_writes_them():
    """The row tuples of a row group are freed once their table is built, before the write (an exhausted
    ``zip(*rows)`` kept every row alive through it): the Python peak of a one-row-group shard is the
    group once (the bytes Arrow hands the sink, or the sort buffer) plus small change, not twice."""
    n, image_bytes = 600, 30_000
    true = _true_peak(n, image_bytes)
    group = n * image_bytes
    assert true["traced_peak"] < 1.25 * group, true


@pytest.mark.parametrize("measure", [False, True])
def test_writer_bytes_are_unchanged(tmp_path, measure):
    """Two row groups of 30 KB images (1,024 + 176 rows) and the ledger, measured or not: the same bytes
    (digests recorded once from the writer with 32-row Arrow batches, not computed here; the data file's
    changed from 3078b37's 90453d7a… only by those batches, its ledger did not), and every image reads back."""
    fn = WriteShardFn(str(tmp_path / "out"), "filter", 1, measure_memory=measure, spill_dir=str(tmp_path))
    fn.setup()
    (result,) = list(fn.process((0, (Outcome.kept(_pair(i, 30_000)) for i in range(1200)))))
    got = {f.path: (f.bytes, f.sha256, hashlib.sha256((tmp_path / "out" / f.path).read_bytes()).hexdigest())
           for f in result.files}
    assert got == {
        "data/part-00000-of-00001.parquet": (36026368, "e105c1a85492c3148d946d4f0ecf725b1cfc62b450c2ab6ca5036324c4841d78",
                                             "e105c1a85492c3148d946d4f0ecf725b1cfc62b450c2ab6ca5036324c4841d78"),
        "ledger/part-00000-of-00001.parquet": (7468, "493bb2e6ffcdb3e0ae6d9b7bd165c474070669d0cfc8db74ae103af836261632",
                                               "493bb2e6ffcdb3e0ae6d9b7bd165c474070669d0cfc8db74ae103af836261632"),
    }
    import pyarrow.parquet as pq

    data = pq.ParquetFile(tmp_path / "out" / "data" / "part-00000-of-00001.parquet")
    assert [data.metadata.row_group(i).num_rows for i in range(data.num_row_groups)] == [1024, 176]
    images = dict(zip(*data.read(columns=["key", "image"]).to_pydict().values()))
    assert images == {f"k{i:06d}": random.Random(i).randbytes(30_000) for i in range(1200)}


def test_writer_own_peak_leaves_out_a_thread_that_allocates_during_the_write(tmp_path, monkeypatch):
    """The reverted "write window" fix added the process's growth while Arrow writes a row group, and on
    Dask it caught the communication thread deserialising meanwhile. Here a second thread allocates 100 MB
    exactly while the sink is handed the image column chunk, and holds it to the end of the write: the
    process peak grows by it, the own figure (the writer's traces + the bytes its sink was handed + the
    pool) stays what it is alone."""
    import json
    import threading

    from storage import files

    real_write = files.HashingSink.write
    state = {"beside": False, "started": False}
    held: list[bytes] = []
    allocated, finished = threading.Event(), threading.Event()

    def other_thread():
        held.extend(bytes(100_000) + bytes([i % 256]) for i in range(1_000))  # 100 MB
        allocated.set()
        finished.wait()
        held.clear()

    def write(self, data):
        if state["beside"] and not state["started"] and len(data) > 500_000:  # image pages (about 1 MB each)
            state["started"] = True
            threading.Thread(target=other_thread, daemon=True).start()
            assert allocated.wait(60)
        return real_write(self, data)

    monkeypatch.setattr(files.HashingSink, "write", write)
    lines = {}
    for name in ("alone", "beside"):
        state["beside"] = name == "beside"
        log = tmp_path / f"{name}.jsonl"
        fn = WriteShardFn(str(tmp_path / name), "filter", 1, measure_memory=str(log), spill_dir=str(tmp_path))
        fn.setup()
        list(fn.process((0, (Outcome.kept(_pair(i, 30_000)) for i in range(600)))))
        lines[name] = json.loads(log.read_text())
    finished.set()
    alone, beside = lines["alone"], lines["beside"]
    assert state["started"]
    mb = 1e6
    # the process peak holds the other thread's 100 MB (beside what the writer held at that moment, which
    # is less than its own peak: the rows are freed by then) ...
    assert 100 * mb <= beside["process_peak_bytes"] < alone["process_peak_bytes"] + 110 * mb, (alone, beside)
    # ... the own figure does not
    assert abs(beside["peak_bytes"] - alone["peak_bytes"]) < 0.05 * alone["peak_bytes"], (alone, beside)
    # alone, the own figure is the process peak: nothing the writer holds is left out
    assert 0.95 * alone["process_peak_bytes"] <= alone["peak_bytes"] <= alone["process_peak_bytes"], alone
