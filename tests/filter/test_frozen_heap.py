"""Every stage (`mmcorpus filter` here) runs its pipeline with the pre-existing heap frozen out of the
cyclic GC's full scans (``pipelines.runner.frozen_heap`` in ``run_stage``), collects what the run makes,
and restores the GC after."""

from __future__ import annotations

import gc
import json
import weakref

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import filter as filter_stage
from pipelines import runner


class _Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture(autouse=True)
def _no_frozen_heap_left():
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_a_stage_run_freezes_the_heap_only_while_the_pipeline_runs(tmp_path, monkeypatch):
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"url": [f"http://img.example/{i}.jpg" for i in range(7)],
                             "caption": [f"a brown dog number {i} running on a sandy beach" for i in range(7)]}), table)
    real_run, seen = beam.Pipeline.run, []

    def run(self, *a, **kw):
        seen.append(gc.get_freeze_count())
        return real_run(self, *a, **kw)

    monkeypatch.setattr(beam.Pipeline, "run", run)
    before = len(gc.get_objects())
    args, beam_args = filter_stage.parser().parse_known_args(
        ["--input", str(table), "--output", str(tmp_path / "out"), "--direct_num_workers", "1"])
    filter_stage.run(args, beam_args)
    assert len(seen) == 1 and seen[0] >= before // 2  # the heap that existed was frozen during the run
    assert gc.get_freeze_count() == 0  # and handed back to the GC after it
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 7 and manifest["counts"]["outputs"] == 7


def test_cycles_made_during_the_run_are_still_collected():
    with runner.frozen_heap():
        assert gc.get_freeze_count() > 0
        ref = weakref.ref(_Cycle())
        assert ref() is not None
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0


def test_a_caller_frozen_heap_or_disabled_gc_is_left_alone():
    gc.freeze()
    frozen = gc.get_freeze_count()
    with runner.frozen_heap():
        pass
    # not unfrozen under the caller (an unfreeze empties the permanent generation; a frozen object that
    # another thread releases meanwhile leaves it, so the count may drop by a few, never to 0)
    assert frozen > 1000 and gc.get_freeze_count() > frozen // 2
    gc.unfreeze()
    gc.disable()
    try:
        with runner.frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
