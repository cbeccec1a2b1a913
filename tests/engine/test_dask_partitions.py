"""The Dask engine's partition count by default follows the input's bytes / --target-shard-bytes (a
partition holds about one shard), --dask_npartitions overrides it, and outputs stay byte-identical to the
DirectRunner's (real `dask scheduler` + two `dask worker` processes)."""

from __future__ import annotations

import collections
import logging
import re

import pytest

from engine.conftest import REPO, tree
from pipelines import cli
from transforms.stage_io import read_manifest

pytestmark = pytest.mark.slow

ROWS = REPO / "tests" / "fixtures" / "bad_inputs" / "tables" / "rows.jsonl"
# 1,049,173 bytes: 200,000-byte shards make ceil(1049173 / 200000) = 6 of them, more than the 2 threads.
TARGET = "200000"


def _partitions(caplog) -> list[int]:
    """The engine's "N partitions per shuffle" of every Dask run logged so far."""
    return [int(m.group(1)) for r in caplog.records
            if (m := re.search(r"Dask engine: .* (\d+) partitions per shuffle", r.getMessage()))]


def test_partitions_follow_target_shard_bytes_and_override(dask_cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmcorpus")
    assert ROWS.stat().st_size == 1_049_173  # the expected counts below are worked out from this size
    dask = ["--runner", "dask", "--dask-address", dask_cluster.address]
    common = ["filter", "--input", str(ROWS), "--target-shard-bytes", TARGET]

    assert cli.main([*common, "--output", str(tmp_path / "direct")]) == 0
    assert _partitions(caplog) == []  # the DirectRunner gets no Dask partition flag

    assert cli.main([*common, "--output", str(tmp_path / "dask"), *dask]) == 0
    assert _partitions(caplog) == [6]  # not the cluster's 2 threads
    assert tree(tmp_path / "dask") == tree(tmp_path / "direct")  # every byte, the manifest included
    assert {f.path.rsplit("-of-", 1)[1] for f in read_manifest(str(tmp_path / "dask")).files} == {"00006.parquet"}

    # --dask_npartitions still wins, and the default target (512 MiB) leaves the cluster's threads.
    assert cli.main([*common, "--output", str(tmp_path / "dask3"), *dask, "--dask_npartitions", "3"]) == 0
    assert cli.main(["filter", "--input", str(ROWS), "--output", str(tmp_path / "dask-default"), *dask]) == 0
    assert _partitions(caplog) == [6, 3, 2]
    assert tree(tmp_path / "dask3") == tree(tmp_path / "direct")


def _min_partitions(argv: list[str], input_info: dict) -> int | None:
    from pipelines.engines import LocalDaskOptions
    from pipelines.runner import beam_options, bound_dask_partitions

    opts = beam_options(argv)
    bound_dask_partitions(opts, 64 * 2**20, input_info)
    return opts.view_as(LocalDaskOptions).dask_min_partitions


def test_partitions_also_bounded_by_records():
    """Small records: bytes alone would leave 1,000,000 records in 2 partitions (the dedup stage's
    workers then passed their 4 GiB memory limit at 250k records in bench.scale); the records bound
    gives ceil(1,000,000 / 20,000) = 50, and --dask_partition_records changes it."""
    dask = ["--runner", "dask", "--dask-workers", "1"]  # options only: no cluster starts
    small = {"bytes": 100 * 2**20, "records": 1_000_000}
    assert _min_partitions(dask, small) == 50
    assert _min_partitions([*dask, "--dask_partition_records", "300000"], small) == 4  # ceil(1e6 / 3e5)
    # bytes win when records are big: 640 MiB of 1,000 records at a 64 MiB target
    assert _min_partitions(dask, {"bytes": 640 * 2**20, "records": 1_000}) == 10
    # inputs that do not say how many records they hold (raw files): bytes only
    assert _min_partitions(dask, {"bytes": 100 * 2**20}) == 2
    assert _min_partitions(["--runner", "direct"], small) is None  # other runners: untouched
    with pytest.raises(Exception, match="--dask_partition_records 0: must be at least 1"):
        _min_partitions([*dask, "--dask_partition_records", "0"], small)
    with pytest.raises(Exception, match="--dask_max_branch 1: must be at least 2"):
        _min_partitions([*dask, "--dask_max_branch", "1", "--dask_npartitions", "4"], small)


def _graph_of(pipeline, partitions: int, max_branch: int | None = None):
    """The Dask engine's task graph for ``pipeline`` at ``partitions`` per shuffle (no cluster needed)."""
    from apache_beam.runners.dask.overrides import dask_overrides

    from pipelines import engines

    pipeline.replace_all(dask_overrides())
    uses = engines._Uses()
    pipeline.visit(uses)
    translator = engines._Translator({}, partitions=partitions, uses=uses.uses,
                                     max_branch=max_branch or engines.DEFAULT_MAX_BRANCH)
    pipeline.visit(translator)
    return translator


def test_graph_is_exact_and_builds_in_linear_time():
    """One Create of 3 elements -> GroupByKey at P = 4: 1 create partition, 1 split, 1 x 4 buckets and
    4 merges, counted by hand (no pickled DoFn: the one ParDo Beam's Dask overrides put into a
    GroupByKey, ReifyWindows, is passed through by the engine). Then 12 chained CoGroupByKeys at P = 60 (about 42,000 tasks, the shape of dedup's rounds at
    1.2M records): building that graph took minutes when it was made of dask.delayed calls (quadratic:
    each call merged and culled the graph so far); as one dict it takes seconds."""
    import time as _time

    import apache_beam as beam

    p = beam.Pipeline()
    _ = p | beam.Create([("a", 1), ("b", 2), ("a", 3)]) | beam.GroupByKey()
    kinds = collections.Counter(key[0].split(":", 1)[0] for key in _graph_of(p, 4).graph.dsk)
    assert kinds == {"create": 1, "group-split": 1, "group-bucket": 4, "group-merge": 4}

    p = beam.Pipeline()
    pcoll = p | beam.Create([(i % 7, i) for i in range(100)])
    for r in range(12):
        pcoll = ({"x": pcoll, "y": pcoll} | f"Join{r}" >> beam.CoGroupByKey()
                 | f"Flat{r}" >> beam.FlatMap(lambda kv: [(kv[0], v) for v in kv[1]["x"]]))
    t0 = _time.process_time()
    tasks = len(_graph_of(p, 60, max_branch=60).graph.dsk)  # one-stage shuffles
    seconds = _time.process_time() - t0
    assert tasks > 11 * 60 * 60  # every join after the first: a 60 x 60 all-to-all of buckets
    assert seconds < 60, f"building {tasks:,} tasks took {seconds:.0f} s of CPU"


def test_shuffle_of_more_partitions_than_max_branch_runs_in_hops():
    """Two GroupByKeys at P = 10: the second has 10 input partitions. One stage: 10 splits, 10 x 10
    buckets, 10 merges (120 tasks). With --dask_max_branch 3, three hops of 3 branches (3 ** 2 < 10 <=
    3 ** 3), counted by hand. Hop 1: each split is cut into 3 blocks of outputs (sizes 4, 3, 3): 30
    slices; splits join in ranges of 3 (3, 3, 3, 1): 4 x 3 regroups. Hop 2: each of those 12 holders is
    cut in 3 again (4 -> 2, 1, 1; 3 -> 1, 1, 1): 36 slices; the 4 ranges join in 2 (3, 1), over 9 blocks:
    18 regroups. Last hop: each output takes one piece from each of the 2 ranges: 20 pieces; 10 merges.
    The first GroupByKey (one input partition) stays one stage: 1 split, 10 buckets, 10 merges. At P = 50
    (1M records in bench.scale) a shuffle is 2,600 tasks in one stage; in two hops of 8 branches (7
    ranges of up to 8 splits, 8 blocks of 6 or 7 outputs): 50 + 50 x 8 + 7 x 8 + 7 x 50 + 50 = 906."""
    import apache_beam as beam

    def kinds(partitions, max_branch):
        p = beam.Pipeline()
        _ = (p | beam.Create([("a", 1), ("b", 2), ("a", 3)]) | "G1" >> beam.GroupByKey()
             | beam.Map(lambda kv: (kv[1][0], kv[0])) | "G2" >> beam.GroupByKey())
        return collections.Counter((key[0].split(":")[1].split("/")[0], key[0].split(":")[0])
                                   for key in _graph_of(p, partitions, max_branch).graph.dsk
                                   if key[0].startswith("group-"))

    one = {("G1", "group-split"): 1, ("G1", "group-bucket"): 10, ("G1", "group-merge"): 10}
    assert kinds(10, 32) == {**one, ("G2", "group-split"): 10, ("G2", "group-bucket"): 100, ("G2", "group-merge"): 10}
    assert kinds(10, 3) == {**one, ("G2", "group-split"): 10, ("G2", "group-slice"): 66, ("G2", "group-regroup"): 30,
                            ("G2", "group-piece"): 20, ("G2", "group-merge"): 10}
    g2 = {k: n for (label, k), n in kinds(50, None).items() if label == "G2"}
    assert g2 == {"group-split": 50, "group-slice": 400, "group-regroup": 56, "group-piece": 350,
                  "group-merge": 50}, g2


@pytest.mark.parametrize("inputs,outputs,max_branch,hops", [
    (10, 10, 3, 3), (7, 7, 2, 3), (50, 50, 32, 2), (33, 33, 32, 2), (30, 10, 3, 4), (10, 30, 3, 4),
    (100, 37, 4, 4), (64, 64, 2, 6), (5, 200, 2, 8), (2, 200, 2, 1), (200, 5, 32, 1), (200, 32, 32, 2), (32, 2000, 32, 3),
    (1024, 40, 32, 2), (1025, 40, 32, 3),
])
def test_multi_hop_shuffle_delivers_every_bucket_in_split_order(inputs, outputs, max_branch, hops):
    """Whatever the shape, output j of a shuffle receives bucket j of every split, in split order (the
    order the merge depends on for identical bytes): split i's bucket j here is the pickled pair
    (i, j), and the graph runs on dask's synchronous scheduler. ``hops`` is the least h with
    max_branch ** h >= the larger side; 1 when inputs x outputs <= max_branch ** 2 or a side is at most 2
    (worked out by hand). 32 inputs into 2,000 outputs: 64,000 buckets in one stage, three hops here."""
    import pickle

    from dask.local import get_sync

    from pipelines import engines

    assert engines._hops(inputs, outputs, max_branch) == hops
    if hops == 1:
        return
    translator = engines._Translator({}, partitions=outputs, uses={}, max_branch=max_branch)
    g = translator.graph
    splits = [g.data(("split", i), tuple(pickle.dumps((i, j)) for j in range(outputs))) for i in range(inputs)]
    pieces = translator._multi_hop("L", "group", splits, outputs, hops)
    merged = get_sync(g.dsk, [g.task(("out", j), engines._apply_merge, list, 0, *pieces[j]) for j in range(outputs)])
    for j, buckets in enumerate(merged):
        assert buckets == [(i, j) for i in range(inputs)]


def test_shuffle_of_200m_records_default_partitions_is_three_hops():
    """At 200M records the default P is 200,000,000 / 20,000 = 10,000. With the default max_branch 32
    (32 ** 2 < 10,000 <= 32 ** 3) a shuffle is three hops of 22 branches (21 ** 3 < 10,000 <= 22 ** 3),
    counted by hand: 10,000 x 22 slices; 455 ranges (454 of 22 splits, one of 12) x 22 blocks regrouped;
    10,010 holders x 22 slices; 21 ranges (20 of 22 earlier ranges, one of 15) x 484 blocks regrouped;
    21 x 10,000 pieces: 690,394 tasks with the 10,000 splits and 10,000 merges, against 2,030,000 in two
    hops of 100 and 10^8 in one. The graph builds in seconds."""
    import time as _time

    from pipelines import engines

    translator = engines._Translator({}, partitions=10_000, uses={}, max_branch=engines.DEFAULT_MAX_BRANCH)
    g = translator.graph
    t0 = _time.process_time()
    splits = [g.data(("split", i), None) for i in range(10_000)]
    pieces = translator._multi_hop("L", "group", splits, 10_000, engines._hops(10_000, 10_000, 32))
    for j, p in enumerate(pieces):
        g.task(("merge", j), engines._apply_merge, list, 0, *p)
    seconds = _time.process_time() - t0
    kinds = collections.Counter(key[0].split(":")[0] for key in g.dsk)
    assert kinds == {"split": 10_000, "group-slice": 220_000 + 220_220, "group-regroup": 10_010 + 10_164,
                     "group-piece": 210_000, "merge": 10_000}, kinds
    assert sum(kinds.values()) == 690_394
    assert {len(p) for p in pieces} == {21}  # each output merges one piece per final range
    assert seconds < 120, f"building {len(g.dsk):,} tasks took {seconds:.0f} s of CPU"


def test_global_combine_shuffles_into_one_bucket_per_partition():
    """A CombineGlobally has one key, so its shuffle needs one bucket per input partition and one merge,
    not P x P buckets: at P = 8, after a GroupByKey (8 partitions), Count.Globally makes 8 splits, 8
    buckets and 1 merge (counted by hand), while a Count.PerKey beside it keeps 8 x 8 buckets. And
    the ten rounds of connected components' stats are summed by ONE global combine (``AllRounds``, per
    round inside it): dedup's graph at P = 50 holds no P x P stats shuffle and no combine per round."""
    import apache_beam as beam

    p = beam.Pipeline()
    grouped = p | beam.Create([("a", 1), ("b", 2), ("a", 3)]) | beam.GroupByKey()
    _ = grouped | "Global" >> beam.combiners.Count.Globally()
    _ = grouped | "PerKey" >> beam.combiners.Count.PerKey()
    kinds = collections.Counter(
        (key[0].split(":")[0], key[0].split(":")[1].split("/")[0]) for key in _graph_of(p, 8).graph.dsk
        if key[0].startswith("combine-"))
    assert kinds == {
        ("combine-fn", "Global"): 1, ("combine-split", "Global"): 8, ("combine-bucket", "Global"): 8, ("combine-merge", "Global"): 1,
        ("combine-fn", "PerKey"): 1, ("combine-split", "PerKey"): 8, ("combine-bucket", "PerKey"): 64, ("combine-merge", "PerKey"): 8,
    }

    from transforms.components import BlockConnectedComponents

    p = beam.Pipeline()
    _ = p | beam.Create([]) | BlockConnectedComponents(partitions=4)
    buckets = collections.Counter(key[0].split(":")[1] for key in _graph_of(p, 50).graph.dsk
                                  if key[0].startswith("combine-bucket"))
    assert not [label for label in buckets if "SumStats" in label or "StatValues" in label], buckets
    stats = {label: n for label, n in buckets.items() if "AllRounds" in label}
    assert len(stats) == 1 and set(stats.values()) == {50}, stats


def test_shuffle_buckets_cross_as_bytes_dask_sizes_exactly():
    """A split's buckets are pickled byte strings: dask's sizeof of them is their length (its sizeof of a
    list samples 10 items and extrapolates, which refused a 1M-record dedup task as "7.54 GiB of input"
    on a 4 GiB worker), and the merge gets back exactly the groups an unpickled shuffle makes."""
    import sys as _sys

    from dask.sizeof import sizeof

    from pipelines import engines

    items = [("big", "x" * 1_000_000)] + [(f"k{i}", "y") for i in range(99)]
    buckets = engines._pickled_split(engines._split_by_key, items, (), 3)
    assert len(buckets) == 3 and all(type(b) is bytes for b in buckets)
    assert sizeof(buckets) == _sys.getsizeof(buckets) + sum(len(b) for b in buckets)  # no sampling
    assert 1_000_000 < sum(len(b) for b in buckets) < 1_002_000  # the one big value, once
    merged = [engines._apply_merge(engines._merge_groups, 0, b) for b in buckets]
    plain = [engines._merge_groups([b]) for b in engines._split_by_key(items, (), 3)]
    assert merged == plain
    assert sorted(k for part in merged for k, _ in part) == sorted(k for k, _ in items)


def test_dask_sizes_uneven_lists_exactly():
    """dask's own size of a list samples 10 random items and extrapolates: one 8 MB block among 999
    small ones came out near 0 or near 800 MB, at random (bench.scale was refused a task at 12.19 GiB).
    With the engine imported, the size is the sum over the items (up to 256 of a task's result), every
    time; longer lists of alike records, and lists nested in them, are sampled evenly."""
    from dask.sizeof import sizeof

    import sys as _sys

    import pipelines.engines  # noqa: F401  (installs the engine's sizing, as in every worker)

    big = b"x" * 8_000_000
    items = [b"y" * 10 for _ in range(255)]
    items.insert(100, big)
    for seq in (items, tuple(items)):
        for _ in range(20):
            assert 8_000_000 <= sizeof(seq) <= 8_000_000 + 20_000
    records = [(f"key-{i:08d}", "a caption of some words " * 3) for i in range(100_000)]
    exact = sum(sizeof(r) for r in records)
    assert 0.97 * exact <= sizeof(records) <= 1.03 * exact + 1_000_000
    # a GroupByKey merge's output: (key, [values]) groups; sized from 256 groups, 16 values of each
    groups = [(f"key-{i:08d}", [("v" * 40, i, b"b" * 100)] * (1 + i % 40)) for i in range(20_000)]
    exact = sum(_sys.getsizeof(g) + _sys.getsizeof(g[0]) + _sys.getsizeof(g[1]) + len(g[1]) * (
        _sys.getsizeof(g[1][0]) + _sys.getsizeof("v" * 40) + _sys.getsizeof(g[1][0][1]) + _sys.getsizeof(b"b" * 100))
        for g in groups)
    assert 0.8 * exact <= sizeof(groups) <= 1.25 * exact
    # the stage writer's input: (shard, [packed batches]) with a few large batches (images) among many
    # small ones; sampling 4 of them refused a write at 5.48 GiB on 4 GiB workers (bench.scale, 400k):
    # lists of flat values are summed exactly at any depth and length
    batches = [b"c" * 2_000] * 5_000
    for i in range(0, 5_000, 500):
        batches[i + 7] = b"i" * 3_000_000  # 10 image batches, none at a stride-sampled position
    shard = [(3, batches)]
    exact = _sys.getsizeof(batches) + 4_990 * 2_000 + 10 * 3_000_000  # dask sizes bytes by their length
    assert exact <= sizeof(shard) <= exact + 1_000, (sizeof(shard), exact)


_HELD: list = []


def _fragment_heap(n: int = 400_000, size: int = 1_000) -> int:
    """On a worker: allocate ``n`` byte strings of ``size`` (glibc's heap: above pymalloc's 512 B), keep
    one in 100 and free the rest, so about 400 MB is free but stays in the process's RSS (a live string
    every 100 KB pins the heap). Returns the RSS then."""
    import psutil

    blobs = [b"x" * size for _ in range(n)]
    _HELD.extend(blobs[::100])
    del blobs
    return psutil.Process().memory_info().rss


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_workers_give_freed_memory_back_before_a_stage(dask_cluster, tmp_path):
    """Workers outlive a stage, and a stage's freed objects leave their heaps fragmented: after the 1M
    dedup of bench.scale each worker still held 2.1-2.3 GiB of RSS, counted against the next stage's
    memory limit. The engine trims every worker's heap before a stage runs: about 400 MB freed on each
    worker here must leave its RSS (without the trim it stays: the test was seen failing that way)."""
    from distributed import Client

    with Client(dask_cluster.address, timeout=30) as client:
        fragmented = client.run(_fragment_heap)
    assert cli.main(["filter", "--input", str(ROWS), "--output", str(tmp_path / "out"),
                     "--runner", "dask", "--dask-address", dask_cluster.address]) == 0
    with Client(dask_cluster.address, timeout=30) as client:
        after = client.run(_rss)
    assert set(after) == set(fragmented)
    for worker, rss in fragmented.items():
        assert rss - after[worker] > 250 * 2**20, (worker, rss, after[worker])


def test_a_graph_past_the_task_warning_is_warned_about_before_submitting(monkeypatch, caplog):
    """A stage whose graph passes ``TASKS_WARNING`` tasks gets one WARNING naming the count, the partitions
    and the flags that shrink it; under the threshold, none. (bench.engine_graph measures real stages:
    dedup at P = 2,200 is about 4M tasks.)"""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import engines

    def translate(threshold):
        monkeypatch.setattr(engines, "TASKS_WARNING", threshold)
        caplog.clear()
        p = beam.Pipeline()
        _ = p | beam.Create([("a", 1), ("b", 2)]) | beam.GroupByKey()
        with caplog.at_level(logging.WARNING, logger="mmcorpus"):
            translator, _ = engines.translate_pipeline(p, PipelineOptions([]), threads=4)
        return len(translator.graph.dsk), [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    tasks, warnings = translate(10**9)
    assert tasks > 10 and warnings == []
    tasks, warnings = translate(10)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"Dask engine: {tasks:,} tasks at 4 partitions per shuffle: about ")
    assert "--dask_partition_records" in warnings[0] and "--dask_npartitions" in warnings[0]


def test_a_window_other_than_the_global_one_is_refused_by_name():
    """The engine groups by key alone in the global window (Beam's ReifyWindows step is passed through),
    so a WindowInto(FixedWindows) stops the translation with the transform's name; a WindowInto of the
    global window translates."""
    import apache_beam as beam
    from apache_beam.transforms import window

    p = beam.Pipeline()
    _ = p | beam.Create([("a", 1)]) | "Global" >> beam.WindowInto(window.GlobalWindows()) | beam.GroupByKey()
    assert _graph_of(p, 4).graph.dsk
    p = beam.Pipeline()
    _ = p | beam.Create([("a", 1)]) | "Fixed" >> beam.WindowInto(window.FixedWindows(10)) | beam.GroupByKey()
    with pytest.raises(NotImplementedError, match=r"the Dask engine cannot run 'Fixed' \(WindowInto\).*global window"):
        _graph_of(p, 4)
