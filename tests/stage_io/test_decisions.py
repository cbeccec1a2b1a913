"""The writer's optional decisions input: a record's fate decided apart from the record (dedup) is applied
in its shard, giving exactly the bytes of writing the decided outcomes; a decision without its record, or
two for one key, stop the write with a message naming the key."""

from __future__ import annotations

import random

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from schemas import reasons
from schemas.records import DUPLICATE, ERROR, KEPT, Outcome, Pair
from storage.files import read_manifest
from transforms import stage_io
from transforms.stage_io import Decision, WriteShardFn, WriteStageOutput, encode_decision, encode_outcome

SHARD, SHARDS = 1, 4


def _pair(i: int, source: str | None = None) -> Pair:
    return Pair(key=f"k{i:05d}", caption=f"caption number {i}", url=f"http://example.com/{i}.jpg",
                source=source or f"in.parquet#{i}")


def _case(n: int = 900):
    """Records (all read as kept), their decisions, and the outcomes written by hand that the decisions
    stand for (what a stage joining them itself emitted)."""
    records, decisions, expected = [], [], []
    for i in range(n):
        p = _pair(i)
        records.append(Outcome.kept(p))
        if i % 7 == 3:  # a duplicate of the representative below it
            rep = f"k{i - 1:05d}"
            detail = f"link=near-caption jaccard=0.8 kept={rep} round=0"
            decisions.append(Decision(p.key, DUPLICATE, reasons.NEAR_CAPTION, detail,
                                      extra={"cluster_id": "dc" + rep, "kept_key": rep}))
            expected.append(Outcome.dropped(p, DUPLICATE, reasons.NEAR_CAPTION, detail, cluster_id="dc" + rep, kept_key=rep))
        elif i % 7 == 2:  # a representative: kept, its cluster fields set in data/
            decisions.append(Decision(p.key, KEPT, "ok", extra={"cluster_id": "dc" + p.key, "kept_key": p.key},
                                      updates={"cluster_id": "dc" + p.key, "cluster_size": 2}))
            expected.append(Outcome.kept(p.replace(cluster_id="dc" + p.key, cluster_size=2), cluster_id="dc" + p.key,
                                         kept_key=p.key))
        elif i % 50 == 0:
            decisions.append(Decision(p.key, ERROR, "exception_AttributeError", "dedup features failed"))
            expected.append(Outcome.dropped(p, ERROR, "exception_AttributeError", "dedup features failed"))
        else:
            expected.append(Outcome.kept(p))
    return records, decisions, expected


def _write(tmp_path, name: str, items, **kw) -> stage_io.ShardResult:
    fn = WriteShardFn(str(tmp_path / name), "dedup", SHARDS, spill_dir=str(tmp_path), **kw)
    fn.setup()
    (result,) = list(fn.process((SHARD, items)))
    return result


def _files(tmp_path, name: str) -> dict[str, bytes]:
    root = tmp_path / name
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_decisions_give_the_bytes_of_the_decided_outcomes(tmp_path):
    records, decisions, expected = _case()
    want = _write(tmp_path, "want", expected)
    items = records + [encode_decision(d) for d in decisions]
    random.Random(5).shuffle(items)
    got = _write(tmp_path, "got", items, sort_buffer_bytes=8_000)  # spilled runs merged: decisions still meet their key
    assert _files(tmp_path, "got") == _files(tmp_path, "want")
    assert got.counts == want.counts == {"kept/ok": 759, "duplicate/near-caption": 129, "error/exception_AttributeError": 12}

    data = pq.read_table(tmp_path / "got" / "data" / "part-00001-of-00004.parquet").to_pylist()
    by_key = {r["key"]: r for r in data}
    assert len(data) == 759 and "k00003" not in by_key and "k00000" not in by_key
    assert (by_key["k00002"]["cluster_id"], by_key["k00002"]["cluster_size"]) == ("dck00002", 2)
    assert (by_key["k00001"]["cluster_id"], by_key["k00001"]["cluster_size"]) == (None, None)
    ledger = {r["key"]: r for r in pq.read_table(tmp_path / "got" / "ledger" / "part-00001-of-00004.parquet").to_pylist()}
    assert len(ledger) == 900
    assert {k: ledger["k00003"][k] for k in ("status", "reason", "detail", "source", "cluster_id", "kept_key")} == {
        "status": "duplicate", "reason": "near-caption", "detail": "link=near-caption jaccard=0.8 kept=k00002 round=0",
        "source": "in.parquet#3", "cluster_id": "dck00002", "kept_key": "k00002"}
    assert (ledger["k00002"]["status"], ledger["k00002"]["cluster_id"], ledger["k00002"]["kept_key"]) == ("kept", "dck00002", "k00002")
    assert (ledger["k00000"]["status"], ledger["k00000"]["reason"]) == ("error", "exception_AttributeError")


def test_a_decision_applies_to_every_record_of_its_key(tmp_path):
    # the same key read twice (two sources): both get the decision; a kept decision keeps the first only
    a, b = _pair(1), _pair(1, source="other.parquet#0").replace(caption="another caption")
    dup = Decision(a.key, DUPLICATE, reasons.EXACT_CAPTION, "d", extra={"kept_key": "k00000"})
    got = _write(tmp_path, "dup", [Outcome.kept(b), encode_decision(dup), Outcome.kept(a), Outcome.kept(_pair(0))])
    assert got.counts == {"kept/ok": 1, "duplicate/exact-caption": 2}
    ledger = pq.read_table(tmp_path / "dup" / "ledger" / "part-00001-of-00004.parquet").to_pylist()
    assert [(r["key"], r["status"], r["source"]) for r in ledger] == [
        ("k00000", "kept", "in.parquet#0"), ("k00001", "duplicate", "in.parquet#1"), ("k00001", "duplicate", "other.parquet#0")]
    keep = Decision(a.key, KEPT, "ok", updates={"cluster_size": 3})
    got = _write(tmp_path, "keep", [Outcome.kept(b), encode_decision(keep), Outcome.kept(a)])
    assert got.counts == {"kept/ok": 1, "rejected/duplicate_key": 1}
    data = pq.read_table(tmp_path / "keep" / "data" / "part-00001-of-00004.parquet").to_pylist()
    assert [(r["key"], r["source"], r["cluster_size"]) for r in data] == [("k00001", "in.parquet#1", 3)]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_decision_without_its_record_stops_the_write(tmp_path, where):
    records = [Outcome.kept(_pair(i)) for i in (10, 20, 30)]
    lonely = {"first": 5, "middle": 15, "last": 35}[where]
    orphan = Decision(f"k{lonely:05d}", DUPLICATE, reasons.EXACT_CAPTION, "d")
    with pytest.raises(ValueError, match=f"decision for key 'k{lonely:05d}' has no record in shard 1"):
        _write(tmp_path, where, records + [encode_decision(orphan)])
    assert not (tmp_path / where / "data" / "part-00001-of-00004.parquet").exists()  # nothing under a final name


def test_two_decisions_for_one_key_stop_the_write(tmp_path):
    p = _pair(1)
    ds = [Decision(p.key, DUPLICATE, reasons.EXACT_CAPTION, "a"), Decision(p.key, DUPLICATE, reasons.NEAR_CAPTION, "b")]
    with pytest.raises(ValueError, match="two decisions for key 'k00001' in shard 1"):
        _write(tmp_path, "two", [Outcome.kept(p)] + [encode_decision(d) for d in ds])


def test_encode_decision_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="unknown record fields"):
        encode_decision(Decision("k", KEPT, "ok", updates={"no_such_field": 1}))
    with pytest.raises(ValueError, match="must be str"):
        encode_decision(Decision("k", KEPT, 3))
    key, blob = encode_decision(Decision("k", KEPT, "ok"))
    assert key == ("k",) and blob[0] == 0x01 and encode_outcome(Outcome.kept(_pair(1)))[1][0] != 0x01


def test_write_stage_output_with_decisions_matches_the_decided_outcomes(tmp_path):
    records, decisions, expected = _case(600)
    for name, outs, decs in (("want", expected, None), ("got", records, decisions)):
        with beam.Pipeline() as p:
            outcomes = p | f"O{name}" >> beam.Create(outs)
            kw = {}
            if decs is not None:  # Decision objects and a list of encoded entries, as a stage may send either
                kw["decisions"] = (
                    (p | "D1" >> beam.Create(decs[::2]),
                     p | "D2" >> beam.Create([[encode_decision(d) for d in decs[1::2]]]))
                    | "Decs" >> beam.Flatten()
                )
            _ = outcomes | WriteStageOutput(str(tmp_path / name), "dedup", {"x": 1}, {"fingerprint": "f"},
                                            num_shards=3, **kw)
    assert _files(tmp_path, "got") == _files(tmp_path, "want")
    m = read_manifest(str(tmp_path / "got"))
    assert (m.counts["inputs"], m.counts["ledger_rows"], m.counts["outputs"]) == (600, 600, 506)
    assert m.counts["by_reason"] == {"duplicate/near-caption": 86, "error/exception_AttributeError": 8, "kept/ok": 506}
