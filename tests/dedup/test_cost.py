"""The dedup stage's cheaper paths give the same answers as the plain ones: vectorised b-bit bucket
linking, compact edges with per-rule counts, and connected-components rounds skipped after convergence."""

from __future__ import annotations

import random

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import reasons
from transforms import minhash as mh
from transforms.components import ConnectedComponents
from transforms.dedup import DedupConfig, LinkEdgesFn, link_bucket, link_sketch_bucket, min_matching_slots


def _bucket(rng: random.Random, size: int) -> list[tuple[str, bytes]]:
    base = bytes(rng.randrange(256) for _ in range(128))
    members = []
    for _ in range(size):
        b = bytearray(base)
        for _ in range(rng.choice([0, 0, 10, 30, 45, 60, 100])):
            b[rng.randrange(128)] = rng.randrange(256)
        members.append((f"k{rng.randrange(10**6):07d}", bytes(b)))
    return members + members[:2]  # repeated members, as a bucket can receive


def test_min_matching_slots_is_the_exact_bbit_boundary():
    # Hand-derived: J >= 0.6 needs match >= 0.6 + 0.4/256 = 0.6015625, i.e. 77 of 128 slots (76/128 = 0.59375).
    assert min_matching_slots(128, 0.6) == 77
    assert min_matching_slots(128, 0.0) == 0
    assert min_matching_slots(128, 1.0) == 128
    for t in (0.3, 0.6, 0.7, 0.95):
        c = min_matching_slots(128, t)
        a = bytes(128)
        assert mh.bbit_jaccard(a, bytes(c) + b"\x01" * (128 - c)) >= t
        assert mh.bbit_jaccard(a, bytes(c - 1) + b"\x01" * (129 - c)) < t


def test_link_sketch_bucket_gives_link_buckets_edges_in_order():
    rng = random.Random(5)
    checked = 0
    for _ in range(200):
        members = _bucket(rng, rng.randint(1, 120))
        t = rng.choice([0.3, 0.6, 0.7, 0.95])
        budget = rng.choice([1, 3, 64])
        expected = link_bucket(members, lambda a, b, t=t: mh.bbit_jaccard(a, b) >= t, budget)
        assert link_sketch_bucket(members, min_matching_slots(128, t), budget) == expected
        checked += len(expected)
    assert checked > 10_000  # the buckets really link


def test_link_edges_fn_normalises_drops_repeats_and_counts_every_edge():
    cfg = DedupConfig()
    fn = LinkEdgesFn(reasons.NEAR_CAPTION, cfg)
    fn.setup()
    sk = bytes(128)
    other = bytes(100) + b"\x01" * 28  # 100 of 128 slots equal: J = 0.78 >= 0.6
    bucket = [("b", sk), ("a", other), ("c", sk)]
    out = list(fn.process((b"band0", bucket)))
    out += list(fn.process((b"band1", bucket)))  # the same pairs again in another band
    edges = [e for e in out if not isinstance(e, beam.pvalue.TaggedOutput)]
    counts = [e.value for e in out if isinstance(e, beam.pvalue.TaggedOutput)]
    # a < b < c: b links to a (near), c is identical to b (first holder b); both as (larger, smaller), once.
    assert edges == [("b", "a"), ("c", "b")]
    assert counts == [(reasons.NEAR_CAPTION, 2), (reasons.NEAR_CAPTION, 2)]
    exact = LinkEdgesFn(reasons.EXACT_CAPTION, cfg)
    exact.setup()
    out = list(exact.process(("digest", iter([("k2", None), ("k1", None), ("k3", None)]))))
    assert out[:2] == [("k2", "k1"), ("k3", "k2")] and out[2].value == (reasons.EXACT_CAPTION, 2)


def _path_graph():
    rng = random.Random(3)
    path = [f"p{rng.randrange(10**6):06d}-{i}" for i in range(60)]
    edges = [(path[i], path[i + 1]) for i in range(59)] + [("s0", f"s{i}") for i in range(1, 6)]
    expected = [(n, min(path)) for n in path] + [(f"s{i}", "s0") for i in range(6)]
    return edges, expected


_COLLECTED: dict = {}  # the in-memory DirectRunner runs in this process: module-level functions fill it


def _keep(value, name):
    _COLLECTED[name] = value


def _run_components(edges, max_rounds, skip):
    _COLLECTED.clear()
    p = TestPipeline()
    labels, report = p | beam.Create(edges) | ConnectedComponents(max_rounds=max_rounds, skip_converged=skip)
    labels | beam.combiners.ToList() | "KeepLabels" >> beam.Map(lambda x: _keep(sorted(x), "labels"))
    report | "KeepReport" >> beam.Map(_keep, "report")
    result = p.run()
    result.wait_until_finish()
    nodes = result.metrics().query(MetricsFilter().with_name("large_star_nodes"))["counters"]
    return dict(_COLLECTED), sum(c.committed for c in nodes)


def test_rounds_after_convergence_are_skipped_with_the_same_labels_and_report():
    edges, expected = _path_graph()
    skipped, work_skipped = _run_components(edges, 10, True)
    plain, work_plain = _run_components(edges, 10, False)
    assert skipped["labels"] == sorted(expected) == plain["labels"]
    assert skipped["report"] == plain["report"]
    r = plain["report"]["rounds"]
    assert plain["report"]["converged"] and 2 <= r <= 7
    # Rounds 0..r do the work (round r is the one that shows nothing changed); rounds r+1.. only pass edges on.
    _, work_first = _run_components(edges, r + 1, False)
    assert work_skipped == work_first < work_plain


def test_components_without_convergence_are_not_skipped():
    path = [f"n{i:03d}" for i in range(64)]
    random.Random(2).shuffle(path)
    edges = [(path[i], path[i + 1]) for i in range(63)]
    skipped, _ = _run_components(edges, 3, True)
    plain, _ = _run_components(edges, 3, False)
    assert skipped == plain and skipped["report"]["converged"] is False
    assert np.array_equal(sorted(n for n, _ in skipped["labels"]), sorted(path))
