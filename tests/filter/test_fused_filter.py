"""The filter stage's fused step (read + tag + filter + flag in one DoFn) gives exactly the outcomes of
the separate steps, and the shard writer's encoded shuffle writes exactly the bytes of the Outcome path."""

from __future__ import annotations

import hashlib
import pathlib
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.records import Pair
from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
from transforms.filter_base import ApplyFiltersFn, with_fields
from transforms.filter_stage import ReadAndFilterFn
from transforms.image_filters import ImageFilterConfig, image_filters
from transforms.ingest import ExpandUnitsFn, InputSpec, ReadInputUnitFn, resolve_input
from transforms.sources import tag_record
from transforms.stage_io import WriteShardFn, encode_outcome

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
CAPTIONS = [
    "a brown dog running on a sandy beach", "DSC_2481.JPG", "一只白色的小狗睡在沙发上", "sale sale sale sale",
    "Stock Photo - a red barn in a field of wheat 12345678", "猫", "the the cat sat on a mat near the door",
    "ein Hund läuft am Strand entlang", "図書館で本を読む女の子", None, "", "click here", "a photo of a bridge at night",
]


def _table(tmp_path) -> str:
    n = len(CAPTIONS)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({
        "url": [f"http://img.example/{i}.jpg" if i != 5 else None for i in range(n)],
        "caption": pa.array(CAPTIONS, pa.string()),
        "license": ["cc-by" if i % 2 else None for i in range(n)],
    }), path, row_group_size=5)
    return str(path)


def _chain(cfg: CaptionFilterConfig):
    return caption_filters(cfg) + image_filters(ImageFilterConfig(require_image=False)), [CaptionQualityFlagger(cfg)]


@pytest.mark.parametrize("tag", [None, ("web", None), (None, "cc0")])
@pytest.mark.parametrize("languages", [None, ("en", "zh")])
def test_fused_step_equals_read_then_tag_then_filter(tmp_path, tag, languages):
    path = _table(tmp_path)
    resolved = resolve_input(InputSpec(path=path))
    units = list(ExpandUnitsFn(resolved).process(path))
    assert len(units) == 3  # three row groups
    cfg = CaptionFilterConfig(languages=languages)
    filters, flaggers = _chain(cfg)
    read, apply = ReadInputUnitFn(resolved), ApplyFiltersFn(filters, flaggers)
    read.setup()
    apply.setup()
    name, lic = tag or (None, None)
    expected = []
    for unit in units:
        for rec in read.process(unit):
            if tag:
                rec = tag_record(rec, name, lic)
            expected.extend(apply.process(rec))
    fused = ReadAndFilterFn(resolved, *_chain(cfg), tag=tag is not None, name=name, license=lic)
    fused.setup()
    got = [o for unit in units for o in fused.process(unit)]
    assert got == expected
    # the same pickled bytes too: the shard writer breaks ties on them
    assert [pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL) for o in got] == \
           [pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL) for o in expected]
    statuses = sorted((o.status, o.reason) for o in got)
    assert len(got) == len(CAPTIONS) and ("kept", "ok") in statuses and ("rejected", "url_missing") in statuses


def test_with_fields_is_replace_without_the_init():
    p = Pair(key="k", url="u", caption="a dog on a beach", quality_flags=["short"], meta='{"a":1}')
    q = with_fields(p, quality_flags=["watermark"], needs_rewrite=True, lang="en", lang_score=0.97)
    assert q == p.replace(quality_flags=["watermark"], needs_rewrite=True, lang="en", lang_score=0.97)
    assert list(q.__dict__) == list(p.__dict__)  # field order kept: same pickled bytes as replace()
    assert pickle.dumps(q) == pickle.dumps(p.replace(quality_flags=["watermark"], needs_rewrite=True, lang="en", lang_score=0.97))
    assert p.quality_flags == ["short"] and p.lang is None  # the input is untouched


def test_writer_writes_the_same_bytes_from_encoded_entries(tmp_path):
    path = _table(tmp_path)
    resolved = resolve_input(InputSpec(path=path))
    fused = ReadAndFilterFn(resolved, *_chain(CaptionFilterConfig()))
    fused.setup()
    outcomes = [o for unit in ExpandUnitsFn(resolved).process(path) for o in fused.process(unit)]
    outcomes += [outcomes[0]]  # a duplicate key: resolved the same way on both paths

    def write(name, items):
        fn = WriteShardFn(str(tmp_path / name), "filter", 1, spill_dir=str(tmp_path))
        fn.setup()
        (result,) = fn.process((0, items))
        return {f.path: f.sha256 for f in result.files}, result.counts

    plain = write("plain", list(reversed(outcomes)))
    encoded = write("encoded", [encode_outcome(o) for o in outcomes])
    assert plain == encoded
    files, counts = encoded
    assert counts["rejected/duplicate_key"] == 1 and sum(counts.values()) == len(outcomes)
    for rel, sha in files.items():
        assert hashlib.sha256((tmp_path / "encoded" / rel).read_bytes()).hexdigest() == sha
