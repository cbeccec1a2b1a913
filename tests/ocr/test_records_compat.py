"""Pair gained ``ocr`` and ``safety`` at the end: files written before still read."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import PAIR_SCHEMA, Pair


def test_older_files_without_the_new_columns_still_read():
    assert PAIR_SCHEMA.names[-2:] == ["ocr", "safety"]
    old_schema = pa.schema([f for f in PAIR_SCHEMA if f.name not in ("ocr", "safety")])
    row = {name: None for name in old_schema.names} | {"key": "k1", "caption": "a cat", "source": "f#0", "meta": "{}",
                                                       "quality_flags": [], "needs_rewrite": False}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), buf)
    back = pq.read_table(io.BytesIO(buf.getvalue())).to_pylist()[0]
    p = Pair.from_row(back)
    assert (p.key, p.caption, p.ocr, p.safety) == ("k1", "a cat", None, None)
    assert Pair.from_row(p.to_row()) == p
