"""The Dask engine's task results cross between workers as one pickle (not record by record) and, on a
worker, are kept out of the cyclic garbage collector's scans until the next stage (no cluster needed:
distributed's own serialisation, the engine's task functions, this process's gc)."""

from __future__ import annotations

import gc
import pickle

import pytest
from distributed.protocol import deserialize, serialize, to_serialize

from pipelines import engines
from schemas.records import Pair

N = 2_000


def _pairs(n: int = N) -> list:
    return [Pair(key=f"{i:06d}", caption=f"caption {i}", image=bytes([i % 256]) * 40) for i in range(n)]


def _results() -> dict:
    """One result of each task kind that a worker may hold and send: a materialised chain, a
    Flatten / side input concatenation, a GroupByKey's merged output partition."""
    pairs = _pairs()
    bucket = pickle.dumps([(p.key[-1], p) for p in pairs], protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "materialize": engines._materialize(pairs, ()),
        "concat": engines._concat_parts(((), ()), pairs[:1000], pairs[1000:]),
        "merge": engines._apply_merge(engines._merge_groups, 0, bucket),
    }


@pytest.mark.parametrize("kind", ["materialize", "concat", "merge"])
def test_task_result_is_sent_as_one_pickle(kind):
    result = _results()[kind]
    assert len(result) == {"materialize": N, "concat": N, "merge": 10}[kind]
    # What Worker.get_data does with a result another worker asked for. A plain list went element by
    # element: one header and one frame per record (2,000 here), and as many pickle calls each way.
    header, frames = serialize(to_serialize(result))
    assert len(frames) == 1
    back = deserialize(header, frames)
    assert back == result
    assert list(back) == list(result)


def test_worker_freezes_held_results_and_unfreezes_before_a_stage():
    gc.collect()
    assert gc.get_freeze_count() == 0
    try:
        # Outside a worker (the driver, tests): nothing is frozen.
        plain = engines._materialize(_pairs(), ())
        assert gc.get_freeze_count() == 0
        assert any(o is plain for o in gc.get_objects())

        engines._trim_memory()  # what the driver runs on every worker before a stage
        held = engines._materialize(_pairs(), ())
        frozen = gc.get_freeze_count()
        assert frozen >= N  # the result's records (and everything else alive) are out of the scans
        assert not any(o is held for o in gc.get_objects())
        assert not any(o is held[0] for o in gc.get_objects())
        del held

        engines._trim_memory()  # the next stage: everything frozen is back under the collector
        assert gc.get_freeze_count() == 0
    finally:
        engines._FREEZE_RESULTS = False
        gc.unfreeze()
