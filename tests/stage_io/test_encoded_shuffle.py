"""The writer's cheaper shuffle: outcomes cross it as marshal-ed values (pickled only when marshal cannot
hold them), the filter stage sends one batch per up to 1,024 records, and the bytes written are those of
the pickling writer (checked-in sha256, measured with the writer before this change)."""

from __future__ import annotations

import hashlib
import json
import pickle
import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from pipelines import progress
from schemas import reasons
from schemas.records import ERROR, REJECTED, Outcome, Pair
from transforms import stage_io
from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
from transforms.filter_stage import BATCH_RECORDS, ReadAndFilter
from transforms.ingest import InputSpec, resolve_input
from transforms.stage_io import WriteShardFn, WriteStageOutput, encode_batch, encode_outcome, sorted_outcomes

# sha256 of the data and ledger files ``_write`` makes from ``_outcomes()``, measured on main at 616f853
# (the writer that pickled every Outcome and built rows with Table.from_pylist): these must not change.
EXPECTED_SHA256 = {
    "data/part-00001-of-00004.parquet": "8529d36a3f9b69524698a485bc6fd1a36ef499177292e4d04fec31d8dac607c6",
    "ledger/part-00001-of-00004.parquet": "c9b0b6b3b53bc8644001f674dae1b98dd900745146a96904192c78e8ed6e9d85",
}


class _SubPair(Pair):
    """A Pair subclass: not marshal-ed (the writer must fall back to pickle)."""


def _outcomes() -> list[Outcome]:
    """Every kind of value a data or ledger row can hold, a duplicate key, extras, long details."""
    rng = random.Random(7)
    out = []
    for i in range(60):
        p = Pair(
            key=f"k{i % 50:04d}", url=f"http://img.example/{i}.jpg", caption=f"caption {i} " + "x" * (i % 7),
            image=rng.randbytes(200) if i % 3 == 0 else None, image_format="JPEG" if i % 3 == 0 else None,
            width=64 if i % 3 == 0 else None, height=48 if i % 3 == 0 else None, source=f"in.parquet#{i:08d}",
            meta='{"a":1}' if i % 4 else "{}", quality_flags=["short"] if i % 5 == 0 else [], needs_rewrite=i % 5 == 0,
            qa=[{"question": "q?", "answer": f"a{i}"}] if i % 6 == 0 else None, cluster_id=f"c{i}" if i % 8 == 0 else None,
            cluster_size=3 if i % 8 == 0 else None, dataset="web" if i % 2 else None, license="cc-by" if i % 2 else None,
            replica=2 if i == 11 else None, lang="en" if i % 2 else "zh", lang_score=0.5 + i / 1000,
        )
        if i % 10 == 1:
            out.append(Outcome.dropped(p, REJECTED, reasons.CAPTION_TOO_SHORT_WORDS, f"line one\nline {i} at 0x7f3a2b1c" + "y" * 700))
        elif i % 10 == 2:
            out.append(Outcome.dropped(p, ERROR, "exception_ValueError", "ValueError"))
        elif i % 10 == 3:
            out.append(Outcome.kept(p, cluster_id=f"c{i}", kept_key=p.key))
        else:
            out.append(Outcome.kept(p))  # keys k0000..k0009 come twice: 8 kept twice, duplicate_key rows
    return out


def _write(tmp_path, name: str, items, **kw) -> stage_io.ShardResult:
    fn = WriteShardFn(str(tmp_path / name), "filter", 4, spill_dir=str(tmp_path), **kw)
    fn.setup()
    (result,) = fn.process((1, items))
    return result


def _sha(tmp_path, name: str) -> dict[str, str]:
    root = tmp_path / name
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))}


def test_written_bytes_are_the_pickling_writers(tmp_path):
    outcomes = _outcomes()
    result = _write(tmp_path, "a", list(reversed(outcomes)))
    assert _sha(tmp_path, "a") == EXPECTED_SHA256
    assert result.counts == {"kept/ok": 40, "rejected/caption_too_short_words": 6, "error/exception_ValueError": 6,
                             "rejected/duplicate_key": 8}
    # the same bytes from encoded entries, from batches, and through a spilling external sort
    _write(tmp_path, "b", [encode_outcome(o) for o in outcomes])
    _write(tmp_path, "c", [encode_batch(outcomes[:25]), encode_batch(outcomes[25:])], batched=True)
    _write(tmp_path, "d", outcomes, sort_buffer_bytes=3_000)
    # batches as they cross the shuffle: one marshal dump per shard part (``_packed``)
    packed = [stage_io._packed(encode_batch(outcomes[:25])), stage_io._packed(encode_batch(outcomes[25:]))]
    assert [type(p) for p in packed] == [bytes, bytes]
    _write(tmp_path, "e", packed, batched=True)
    assert _sha(tmp_path, "b") == _sha(tmp_path, "c") == _sha(tmp_path, "d") == _sha(tmp_path, "e") == EXPECTED_SHA256
    ledger = pq.read_table(tmp_path / "a" / "ledger" / "part-00001-of-00004.parquet").to_pylist()
    (row,) = [r for r in ledger if r["key"] == "k0003" and r["reason"] == "ok"]
    assert (row["cluster_id"], row["kept_key"]) == ("c3", "k0003")


def test_outcomes_are_marshalled_and_anything_else_pickled():
    plain = Outcome.kept(Pair(key="a", caption="c", source="s#1", quality_flags=["x"], qa=[{"question": "q", "answer": "a"}]))
    key, blob = encode_outcome(plain)
    assert key == ("a", False, "s#1", "kept", "ok", "")
    assert blob[0] != 0x80  # not a pickle
    assert stage_io._decode(blob)[:6] == ("a", "kept", "ok", "", "s#1", {})
    sub = Outcome.kept(_SubPair(key="b", caption="c", source="s#2"))
    numpy_width = Outcome.kept(Pair(key="c", caption="c", source="s#3", width=np.int32(7)))
    for o in (sub, numpy_width):
        _, blob = encode_outcome(o)
        assert blob[:2] == b"\x80\x05" and pickle.loads(blob) == o
    for o in (plain, sub, numpy_width):  # what the tie order pickles is the outcome's own pickle
        assert pickle.dumps(stage_io._outcome_of(encode_outcome(o)[1]), protocol=5) == pickle.dumps(o, protocol=5)


def test_equal_sort_keys_are_ordered_by_pickled_outcome(tmp_path):
    # same key, status, source, reason and detail; different records: the total order is the pickled bytes
    same = [Outcome.kept(Pair(key="k", caption=f"caption {c}", source="in#0")) for c in ("b", "a", "c", "aa")]
    others = [Outcome.kept(Pair(key=k, caption="x", source=f"in#{k}")) for k in ("j", "l")]
    others.append(Outcome(key="k", status=REJECTED, reason=reasons.CAPTION_TOO_SHORT_WORDS, source="in#0"))
    expected = [o.pair.caption for o in sorted(same, key=lambda o: pickle.dumps(o, protocol=5))]
    for buffer in (stage_io.SORT_BUFFER_BYTES, 500):  # in memory, and through spilled runs
        got = list(sorted_outcomes(others + same, str(tmp_path), buffer))
        assert [o.key for o in got] == ["j", "k", "k", "k", "k", "k", "l"]
        assert got[5] == others[2]  # kept before rejected
        assert [o.pair.caption for o in got[1:5]] == expected


class _CountElementsFn(beam.DoFn):
    def __init__(self):
        self.elements = Metrics.counter("test", "elements")

    def process(self, element):
        self.elements.inc()
        yield element


def test_filter_step_sends_one_element_per_batch(tmp_path):
    # 2,500 records in row groups of 1,100: units of 1,100 / 1,100 / 300 records -> batches of
    # 1,024 + 76, 1,024 + 76, 300: five elements where one Outcome per record made 2,500
    n = 2_500
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": [f"http://x/{i}" for i in range(n)],
                             "caption": [f"a small brown dog number {i} runs on the beach" for i in range(n)]}),
                   path, row_group_size=1_100)
    assert BATCH_RECORDS == 1024
    cfg = CaptionFilterConfig()
    resolved = resolve_input(InputSpec(path=str(path)))
    p = beam.Pipeline(argv=["--direct_num_workers", "1"])
    outcomes = p | ReadAndFilter(resolved, caption_filters(cfg), [CaptionQualityFlagger(cfg)])
    counted = outcomes | beam.ParDo(_CountElementsFn())
    _ = counted | WriteStageOutput(str(tmp_path / "out"), "filter", {}, {}, num_shards=3)
    result = p.run()
    result.wait_until_finish()
    (elements,) = result.metrics().query(MetricsFilter().with_name("elements"))["counters"]
    assert elements.committed == 5
    (records,) = result.metrics().query(MetricsFilter().with_name("records"))["counters"]
    assert records.committed == n  # ingest still counts every record
    keys = pq.read_table(tmp_path / "out" / "ledger").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == n  # every record once in the ledger
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert counts["inputs"] == counts["ledger_rows"] == n


def test_progress_ticks_a_batch_by_its_length():
    ticks = []
    progress._TICKERS["t"] = ticks.append
    try:
        fn = progress.ReportProgressFn("t")
        batch = encode_batch(_outcomes()[:3])
        assert list(fn.process(batch)) == [batch]
        assert list(fn.process(_outcomes()[0])) == [_outcomes()[0]]
    finally:
        del progress._TICKERS["t"]
    assert ticks == [3, 1]
