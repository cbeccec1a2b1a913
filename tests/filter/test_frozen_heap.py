"""`mmcorpus filter` runs its pipeline with the pre-existing heap frozen out of the cyclic GC's full
scans (``pipelines.filter.frozen_heap``), collects what the run makes, and restores the GC after."""

from __future__ import annotations

import gc
import json
import weakref

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import filter as filter_stage


class _Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture(autouse=True)
def _no_frozen_heap_left():
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_run_freezes_the_heap_only_while_the_pipeline_runs(tmp_path, monkeypatch):
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"url": [f"http://img.example/{i}.jpg" for i in range(7)],
                             "caption": [f"a brown dog number {i} running on a sandy beach" for i in range(7)]}), table)
    real_run_stage, seen = filter_stage.run_stage, []

    def run_stage(**kw):
        seen.append(gc.get_freeze_count())
        return real_run_stage(**kw)

    monkeypatch.setattr(filter_stage, "run_stage", run_stage)
    before = len(gc.get_objects())
    args, beam_args = filter_stage.parser().parse_known_args(
        ["--input", str(table), "--output", str(tmp_path / "out"), "--direct_num_workers", "1"])
    filter_stage.run(args, beam_args)
    assert len(seen) == 1 and seen[0] >= before // 2  # the heap that existed was frozen during the run
    assert gc.get_freeze_count() == 0  # and handed back to the GC after it
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 7 and manifest["counts"]["outputs"] == 7


def test_cycles_made_during_the_run_are_still_collected():
    with filter_stage.frozen_heap():
        assert gc.get_freeze_count() > 0
        ref = weakref.ref(_Cycle())
        assert ref() is not None
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0


def test_a_caller_frozen_heap_or_disabled_gc_is_left_alone():
    gc.freeze()
    frozen = gc.get_freeze_count()
    with filter_stage.frozen_heap():
        pass
    assert gc.get_freeze_count() == frozen  # not unfrozen under the caller
    gc.unfreeze()
    gc.disable()
    try:
        with filter_stage.frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
