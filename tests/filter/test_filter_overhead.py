"""The filter stage's cheaper per-record path gives exactly the records, keys, reasons and writer entries
of the general path: caption-only tables read column-wise, kept records encoded straight from the Pair,
and each shard's part of a batch crossing the shuffle as one marshal dump."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.records import Outcome, Pair
from transforms import stage_io
from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
from transforms.filter_base import kept_outcome
from transforms.filter_stage import ReadAndFilterFn
from transforms.image_filters import ImageFilterConfig, image_filters
from transforms.ingest import ExpandUnitsFn, InputSpec, ReadInputUnitFn, resolve_input
from transforms.keys import record_key, record_key_prefix, text_record_key
from transforms.stage_io import encode_kept, encode_outcome

ROWS = [  # (url, caption)
    ("http://img.example/0.jpg", "a brown dog running on a sandy beach"),
    ("http://img.example/1.jpg", "一只白色的小狗睡在沙发上"),
    ("http://img.example/2.jpg", "sunset 🌅 over the bay, café terrace"),
    ("http://img.example/3.jpg", None),  # caption_missing
    ("", "an empty url"),  # url_missing
    (None, "no url at all"),  # url_missing
    ("http://img.example/6.jpg", ""),  # an empty caption is still text: the filters reject it
    ("http://img.example/7.jpg", "DSC_2481.JPG"),
]


def _key(rel: str, url: str | None, caption: str) -> str:
    """The documented key of a row without one: sha256 over source, url, caption (None as 0x01), 16 hex."""
    h = hashlib.sha256()
    for part in (rel, url, caption):
        h.update(b"\x01" if part is None else b"\x00" + part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def _write_table(path, **extra) -> str:
    pq.write_table(pa.table({"url": pa.array([u for u, _ in ROWS], pa.string()),
                             "caption": pa.array([c for _, c in ROWS], pa.string()), **extra}), path, row_group_size=3)
    return str(path)


def _read(path: str) -> tuple[ReadInputUnitFn, list]:
    resolved = resolve_input(InputSpec(path=path))
    fn = ReadInputUnitFn(resolved)
    fn.setup()
    return fn, [r for unit in ExpandUnitsFn(resolved).process(path) for r in fn.process(unit)]


def test_caption_only_table_is_read_column_wise_with_the_same_records(tmp_path, monkeypatch):
    path = _write_table(tmp_path / "t.parquet")
    fn, got = _read(path)
    # exact records, keys and reasons, the keys computed here from the documented scheme
    expected = [
        ("pair", _key("t.parquet", ROWS[0][0], ROWS[0][1]), "t.parquet#00000000"),
        ("pair", _key("t.parquet", ROWS[1][0], ROWS[1][1]), "t.parquet#00000001"),
        ("pair", _key("t.parquet", ROWS[2][0], ROWS[2][1]), "t.parquet#00000002"),
        ("caption_missing", _key("t.parquet", ROWS[3][0], "NoneType: None"), "t.parquet#00000003"),
        ("url_missing", _key("t.parquet", "", ROWS[4][1]), "t.parquet#00000004"),
        ("url_missing", _key("t.parquet", None, ROWS[5][1]), "t.parquet#00000005"),
        ("pair", _key("t.parquet", ROWS[6][0], ""), "t.parquet#00000006"),
        ("pair", _key("t.parquet", ROWS[7][0], ROWS[7][1]), "t.parquet#00000007"),
    ]
    assert [("pair" if isinstance(r, Pair) else r.reason, r.key, r.source) for r in got] == expected
    pairs = [r for r in got if isinstance(r, Pair)]
    assert [(p.url, p.caption, p.meta, p.quality_flags) for p in pairs] == [(u, c, "{}", []) for u, c in ROWS if c is not None and u]
    # the general per-record path gives the same objects, to the pickled byte
    general = [fn._table_record("t.parquet", i, u, c, None, {}) for i, (u, c) in enumerate(ROWS)]
    assert got == general
    assert [pickle.dumps(r, protocol=5) for r in got] == [pickle.dumps(r, protocol=5) for r in general]
    # and the column-wise path was the one taken (without it the per-record path is used)
    monkeypatch.setattr(ReadInputUnitFn, "_read_text_columns", None)
    with pytest.raises(TypeError):
        _read(path)


@pytest.mark.parametrize("extra", [
    {"license": pa.array(["cc-by"] * len(ROWS))},  # a metadata column
    {"key": pa.array([f"k{i}" for i in range(len(ROWS))])},  # a key column
])
def test_tables_with_more_columns_keep_the_per_record_path(tmp_path, monkeypatch, extra):
    path = _write_table(tmp_path / "t.parquet", **extra)
    monkeypatch.setattr(ReadInputUnitFn, "_read_text_columns", None)  # never called for these
    _, got = _read(path)
    assert len(got) == len(ROWS)


def test_non_string_url_column_keeps_the_per_record_path(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": pa.array([1, 2], pa.int64()), "caption": pa.array(["a dog", "a cat"])}), path)
    monkeypatch.setattr(ReadInputUnitFn, "_read_text_columns", None)
    _, got = _read(str(path))
    assert [p.url for p in got] == ["1", "2"]  # str()-ed, as before


def test_text_record_key_is_record_key():
    for url, cap in [("http://a/b.jpg", "a dog"), ("", ""), ("http://例え.jp/猫.png", "一只猫 🐈"), ("u", "x" * 5000)]:
        for rel in ("t.parquet", "dir/ü.parquet"):
            assert text_record_key(record_key_prefix(rel), url, cap) == record_key(rel, url, cap) == _key(rel, url, cap)


class _SubPair(Pair):
    pass


def _entry_matches(entry, outcome: Outcome) -> None:
    ref = encode_outcome(outcome)
    assert entry[0] == ref[0]
    assert stage_io._decode(entry[1]) == stage_io._decode(ref[1])
    # the writer breaks ties of equal sort keys on the decoded outcome's pickle: the same bytes
    assert pickle.dumps(stage_io._outcome_of(entry[1]), protocol=5) == pickle.dumps(outcome, protocol=5)


@pytest.mark.parametrize("flags", [[], ["short"], ["repetitive", "watermark"]])
def test_encode_kept_is_the_kept_outcomes_entry(flags):
    plain = Pair(key="k1", url="http://a/1.jpg", caption="a dog", source="t.parquet#00000001", lang="en", lang_score=0.93)
    with_qa = Pair(key="k2", caption="c", source="s#2", qa=[{"question": "q?", "answer": "a"}], cluster_size=3, width=7)
    for pair in (plain, with_qa):
        entry = encode_kept(pair, list(flags))
        assert entry is not None and entry[1][0] != 0x80  # marshal, not a pickle
        _entry_matches(entry, kept_outcome(pair, list(flags)))
    # what marshal cannot hold as itself, and Pair subclasses, are left to encode_outcome (a pickle)
    for pair in (Pair(key="k3", caption="c", lang_score=np.float64(0.5)), _SubPair(key="k4", caption="c"),
                 Pair(key="k5", caption="c", qa="not a list")):
        assert encode_kept(pair, list(flags)) is None
    assert encode_kept(plain, [np.str_("short")]) is None


def _chain():
    cfg = CaptionFilterConfig()
    return caption_filters(cfg) + image_filters(ImageFilterConfig(require_image=False)), [CaptionQualityFlagger(cfg)]


@pytest.mark.parametrize("tag", [None, ("web", "cc0")])
def test_batches_hold_the_entries_of_the_outcomes(tmp_path, tag):
    path = _write_table(tmp_path / "t.parquet")
    resolved = resolve_input(InputSpec(path=path))
    units = list(ExpandUnitsFn(resolved).process(path))
    name, lic = tag or (None, None)
    one = ReadAndFilterFn(resolved, *_chain(), tag=tag is not None, name=name, license=lic)
    batched = ReadAndFilterFn(resolved, *_chain(), tag=tag is not None, name=name, license=lic, batch_records=2)
    one.setup()
    batched.setup()
    outcomes = [o for u in units for o in one.process(u)]
    batches = [b for u in units for b in batched.process(u)]
    assert [len(b) for b in batches] == [2, 1, 2, 1, 2]  # row groups of 3, 3, 2
    entries = [e for b in batches for e in b]
    assert len(entries) == len(outcomes) == len(ROWS)
    for entry, outcome in zip(entries, outcomes):
        _entry_matches(entry, outcome)
    kept = [o for o in outcomes if o.status == "kept"]
    assert kept and all(o.pair.dataset == name for o in kept)


def test_shard_parts_cross_as_one_marshal_dump():
    pairs = [Pair(key=f"k{i}", caption=f"c{i}", source=f"s#{i}") for i in range(40)]
    batch = [encode_outcome(Outcome.kept(p)) for p in pairs]
    ((shard, part),) = stage_io._shard_entries(batch, 1)
    assert shard == 0 and type(part) is bytes and stage_io._unpacked(part) == batch
    parts = stage_io._shard_entries(batch, 3)
    assert [s for s, _ in parts] == [0, 1, 2] and all(type(p) is bytes for _, p in parts)
    assert sorted(e for _, p in parts for e in stage_io._unpacked(p)) == sorted(batch)
    assert all(stage_io.shard_of(e[0][0], 3) == s for s, p in parts for e in stage_io._unpacked(p))
    # a batch holding a pickled entry (a Pair subclass) crosses as the list it is
    mixed = batch + [encode_outcome(Outcome.kept(_SubPair(key="z", caption="c", source="s#z")))]
    ((_, part),) = stage_io._shard_entries(mixed, 1)
    assert part is mixed
