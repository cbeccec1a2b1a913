"""Large-star / small-star connected components on the DirectRunner: exact labels and round report."""

from __future__ import annotations

import random

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.components import ConnectedComponents, summarize_rounds


def _graph():
    rng = random.Random(11)
    # a path of 40 nodes whose keys are in random order (the hard case for min-label propagation),
    # a star of 5, a triangle, and duplicate / reversed / self-loop edges.
    path = [f"p{rng.randrange(10**6):06d}-{i}" for i in range(40)]
    edges = [(path[i], path[i + 1]) for i in range(39)]
    edges += [("s0", f"s{i}") for i in range(1, 5)] + [("t1", "t2"), ("t2", "t3"), ("t3", "t1")]
    edges += [(b, a) for a, b in edges[:5]] + [("t1", "t1")]
    expected = [(n, min(path)) for n in path] + [(f"s{i}", "s0") for i in range(5)]
    expected += [(t, "t1") for t in ("t1", "t2", "t3")]
    return edges, expected


def test_components_exact_labels_and_convergence():
    edges, expected = _graph()
    with TestPipeline() as p:
        labels, report = p | beam.Create(edges) | ConnectedComponents(max_rounds=10)
        assert_that(labels, equal_to(expected), label="labels")
        assert_that(
            report | beam.Map(lambda r: (r["converged"], 1 <= r["rounds"] < 10, r["edges_per_round"][-1])),
            equal_to([(True, True, len(expected) - 3)]),  # converged to stars: nodes - components
            label="report",
        )


def test_round_limit_is_reported_and_every_node_still_labelled():
    path = [f"n{i:03d}" for i in range(64)]
    rng = random.Random(2)
    rng.shuffle(path)
    edges = [(path[i], path[i + 1]) for i in range(63)]
    with TestPipeline() as p:
        labels, report = p | beam.Create(edges) | ConnectedComponents(max_rounds=2)
        assert_that(labels | beam.Map(lambda kv: kv[0]), equal_to(path), label="all nodes")
        assert_that(report | beam.Map(lambda r: r["converged"]), equal_to([False]), label="not converged")


def test_summarize_rounds():
    assert summarize_rounds([], 5)["rounds"] == 0
    r = summarize_rounds([(0, (9, 1)), (1, (5, 2)), (2, (5, 2)), (3, (5, 2))], 4)
    assert r == {"max_rounds": 4, "rounds": 2, "converged": True, "edges_per_round": [9, 5, 5, 5]}
    r = summarize_rounds([(0, (9, 1)), (1, (5, 2))], 2)
    assert r["converged"] is False and r["rounds"] == 2


def test_star_steps_read_a_neighbourhood_twice_and_accept_one_shot_iterators():
    from transforms.components import LargeStarFn, SmallStarFn

    class Twice:
        """Grouped values a runner pages: iterable any number of times, never a set or a list."""

        def __init__(self, items):
            self.items = items
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(self.items)

    hub = Twice(["b", "c", "a", "d", "c"])  # a repeated neighbour, as round 0 edges may have
    assert sorted(LargeStarFn().process(("a0", hub))) == [("b", "a"), ("c", "a"), ("c", "a"), ("d", "a")]
    assert hub.passes == 2
    one_shot = iter(["b", "c", "a", "d"])
    assert sorted(LargeStarFn().process(("a0", one_shot))) == [("b", "a"), ("c", "a"), ("d", "a")]
    out = list(SmallStarFn(3).process(("z", iter(["m", "k", "p"]))))
    edges = sorted(e for e in out if not isinstance(e, beam.pvalue.TaggedOutput))
    stats = [e.value for e in out if isinstance(e, beam.pvalue.TaggedOutput)]
    assert edges == [("m", "k"), ("p", "k"), ("z", "k")]
    assert len(stats) == 1 and stats[0][0] == 3 and stats[0][1][0] == 3
