"""Legacy mode's features stay in their extract batches; fewer transforms per run; sketch ids by row hash equal np.unique's grouping."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.records import Pair
from transforms.dedup import LEGACY, DedupConfig, Deduplicate, row_ids


def test_legacy_feature_errors_become_error_outcomes():
    good = [Pair(key="g1", caption="same caption here"), Pair(key="g2", caption="Same caption, here!"),
            Pair(key="g3", caption="a different caption entirely")]
    bad = [Pair(key="bad", caption=12345), Pair(key="bad2", caption=["x"])]  # not str: normalisation raises
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(good + bad) | Deduplicate(DedupConfig(mode=LEGACY))
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.extra.get("kept_key"))),
            equal_to([("bad", "error", "exception_AttributeError", None),
                      ("bad2", "error", "exception_AttributeError", None),
                      ("g1", "kept", "ok", "g1"), ("g2", "duplicate", "exact-caption", "g1"),
                      ("g3", "kept", "ok", None)]),
        )


def test_legacy_batch_of_errors_only():
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create([Pair(key="bad", caption=7)]) | Deduplicate(DedupConfig(mode=LEGACY))
        assert_that(outcomes | beam.Map(lambda o: (o.key, o.status)), equal_to([("bad", "error")]))


class _Count(beam.pipeline.PipelineVisitor):
    def __init__(self):
        self.labels: list[str] = []

    def visit_transform(self, node):
        self.labels.append(node.full_label)


def _labels(cfg: DedupConfig) -> list[str]:
    p = beam.Pipeline()
    _ = p | beam.Create([Pair(key="a", caption="x")]) | "Dedup" >> Deduplicate(cfg)
    v = _Count()
    p.visit(v)
    return v.labels


def test_legacy_features_cross_as_batches_not_records():
    # one BatchElements (the pairs'), no per-record error filter or re-batching of features
    def batching(labels):  # of records or features (BatchEdges batch the image rules' edges)
        return [x for x in labels if x.endswith("/ParDo(_GlobalWindowsBatchingDoFn)") and "/BatchEdges" not in x]

    legacy = _labels(DedupConfig(mode=LEGACY))
    assert batching(legacy) == ["Dedup/Batch/ParDo(_GlobalWindowsBatchingDoFn)"]
    assert not [x for x in legacy if "WithoutErrors" in x or "/Errors" in x or "RankBatches" in x or "BatchForBuckets" in x]
    strict = _labels(DedupConfig())
    # strict too: only the records the caption cap counts leave one by one, and are batched again after the cap
    assert batching(strict) == ["Dedup/Batch/ParDo(_GlobalWindowsBatchingDoFn)",
                                "Dedup/CappedBatches/ParDo(_GlobalWindowsBatchingDoFn)"]
    assert not [x for x in strict if "WithoutErrors" in x or "/Errors" in x or "ErrorByKey" in x or "BatchForBuckets" in x
                or "MemberBatches" in x or "ToCap" in x or "NotCapped" in x]


def test_fewer_transforms_per_run():
    # the fixed cost per run is mostly Beam building, translating and running every transform: the components
    # rounds spread their blocks inside SmallStar (one Spread in all), their stats are summed by one global
    # combine, and legacy's rule bits join the ranks (no RuleBits group of their own)
    for cfg in (DedupConfig(), DedupConfig(mode=LEGACY)):
        labels = _labels(cfg)
        assert [x for x in labels if "Spread" in x and x.startswith("Dedup/Components/")] == ["Dedup/Components/R0Spread"]
        assert not [x for x in labels if "StatValues" in x or "SumStats" in x or "KeyStats" in x]
        assert "Dedup/Components/AllRounds/CombinePerKey/GroupByKey" in labels
        assert len([x for x in labels if "SmallStar" in x]) == cfg.max_rounds
        # the report's counts: one global combine each (no per-key combine + ToDict, no map per assignment)
        assert not [x for x in labels if "CountRules" in x or "RoundOf" in x or "CountRounds" in x]
    legacy = _labels(DedupConfig(mode=LEGACY))
    assert "Dedup/RuleBits" in legacy  # the spread (a ParDo); its items go into JoinRank
    assert not [x for x in legacy if x.startswith("Dedup/RuleBits/")]


def test_row_ids_equal_exactly_for_equal_rows():
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, size=(40, 13), dtype=np.uint8)  # 13 bytes: padded to two 8-byte words
    mat = base[rng.integers(0, 40, size=500)]
    mat[7, 12] ^= 1  # differs from its source row in the last (padded) byte only
    ids = row_ids(mat)
    by_bytes: dict[bytes, set[int]] = {}
    for i, r in enumerate(mat):
        by_bytes.setdefault(r.tobytes(), set()).add(int(ids[i]))
    assert all(len(s) == 1 for s in by_bytes.values())  # equal rows, one id
    assert len({next(iter(s)) for s in by_bytes.values()}) == len(by_bytes)  # different rows, different ids
    assert row_ids(np.zeros((0, 128), dtype=np.uint8)).shape == (0,)
    assert row_ids(np.zeros((3, 128), dtype=np.uint8)).tolist() == [0, 0, 0]


def test_legacy_key_read_twice_one_copy_failing():
    # the failing copy's error is the key's decision (every copy of it becomes that error row), while its good
    # copy still ranks in its cluster: "a" is the cluster's representative, "b" its exact-caption duplicate
    pairs = [Pair(key="a", caption="same caption here"), Pair(key="a", caption=123),
             Pair(key="b", caption="Same caption, here!"), Pair(key="c", caption=["x"])]
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig(mode=LEGACY))
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.extra.get("kept_key"))),
            equal_to([("a", "error", "exception_AttributeError", None), ("a", "error", "exception_AttributeError", None),
                      ("b", "duplicate", "exact-caption", "a"), ("c", "error", "exception_AttributeError", None)]),
        )


def test_strict_key_read_twice_one_copy_failing():
    # strict mode: the same outcomes as legacy's (the failing copy's error is the key's decision; its good copy is
    # still the representative its duplicate points to), with no decision join by key
    pairs = [Pair(key="a", caption="same caption here"), Pair(key="a", caption=123),
             Pair(key="b", caption="Same caption, here!"), Pair(key="c", caption=["x"])]
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig())
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.extra.get("kept_key"))),
            equal_to([("a", "error", "exception_AttributeError", None), ("a", "error", "exception_AttributeError", None),
                      ("b", "duplicate", "exact-caption", "a"), ("c", "error", "exception_AttributeError", None)]),
        )


def test_strict_key_read_twice_one_copy_overused():
    # k2's first copy loses the caption cap (limit 1); its second copy (another caption, k1's image bytes) is in the
    # pass and an exact-image duplicate of k1: the overuse is k2's decision (both copies), k1 stays the kept
    # representative of a cluster of two
    pairs = [Pair(key="k1", caption="stock photo", image=b"img1"), Pair(key="k2", caption="stock photo", image=b"img2"),
             Pair(key="k2", caption="other words", image=b"img1")]
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig(max_pairs_per_caption=1))
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.extra.get("kept_key"), o.pair.cluster_size if o.pair else None)),
            equal_to([("k1", "kept", "ok", "k1", 2), ("k2", "duplicate", "caption_overused", "k1", None),
                      ("k2", "duplicate", "caption_overused", "k1", None)]),
        )
