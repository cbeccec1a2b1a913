"""Bucket entries and edges cross the dedup stage's shuffles as blocks: same buckets, same edges, same
components and report as the per-element paths, and far fewer shuffled elements."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from bench.dedup_data import synthetic_captions
from schemas.records import Pair
from transforms.components import BlockConnectedComponents, ConnectedComponents, LabelBlocksFn, block_labels
from transforms.dedup import (
    DEFAULT_BUCKET_PARTITIONS,
    LEGACY,
    RULE_BITS,
    DedupConfig,
    Deduplicate,
    Features,
    MemberBlocksFn,
    RuleBitsOfBlocks,
    _members_by_root,
    member_of,
    _blocks_by_partition,
    bucket_partitions,
    buckets_of_blocks,
    link_sketch_blocks,
    link_sketch_bucket,
    min_matching_slots,
)


def _records(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """Keys with sketches drawn around a few bases (so buckets link), a repeated key with another
    sketch and a repeated sketch under another key (the cases the numpy path hands back)."""
    bases = [bytes(rng.randrange(256) for _ in range(128)) for _ in range(6)]
    out = []
    for i in range(n):
        b = bytearray(rng.choice(bases))
        for _ in range(rng.choice([0, 5, 20, 40, 60, 128])):
            b[rng.randrange(128)] = rng.randrange(256)
        out.append((f"k{rng.randrange(10**6):07d}", bytes(b)))
    out.append((out[3][0], out[4][1]))  # same key as record 3, another sketch
    out.append(("dup-sketch", out[5][1]))  # same sketch as record 5, another key
    return out


def _entries(rng: random.Random, records, bands: int, buckets_per_band: int) -> list[tuple[int, int, int]]:
    """(band, bucket digest, record index): each record in one bucket per band; a few huge buckets."""
    out = []
    for r in range(len(records)):
        for b in range(bands):
            digest = 7 if b == 0 and r % 3 == 0 else rng.randrange(buckets_per_band)  # band 0: a bucket of n/3
            out.append((b, digest, r))
    return out


def _blocks(records, entries, batch: int, partitions: int):
    """The blocks ``BucketBlocksFn`` would send: per batch of records, one block per partition."""
    by_part = defaultdict(list)
    for lo in range(0, len(records), batch):
        sel = [e for e in entries if lo <= e[2] < lo + batch]
        if not sel:
            continue
        keys = [k for k, _ in records[lo: lo + batch]]
        ids = np.array([[b, d] for b, d, _ in sel], dtype=np.uint64)
        recs = np.array([r - lo for _, _, r in sel], dtype=np.int64)
        payload = np.frombuffer(b"".join(s for _, s in records[lo: lo + batch]), dtype=np.uint8).reshape(-1, 128)
        for p, block in _blocks_by_partition(keys, ids, recs, payload, partitions):
            by_part[p].append(block)
    return by_part


def test_blocks_regroup_the_exact_buckets_and_link_them_like_link_sketch_bucket():
    rng = random.Random(11)
    records = _records(rng, 400)
    entries = _entries(rng, records, bands=5, buckets_per_band=40)
    buckets = defaultdict(list)
    for b, d, r in entries:
        buckets[(b, d)].append(records[r])
    for partitions in (1, 3):
        for t, mc in ((0.6, 64), (0.3, 5)):
            need = min_matching_slots(128, t)
            want_edges, want_found, want_big = set(), 0, 0
            for members in buckets.values():
                if len(members) < 2:
                    continue
                want_big += len(members) > mc
                e = link_sketch_bucket(members, need, mc)
                want_found += len(e)
                want_edges |= {(a, b) if a > b else (b, a) for a, b in e}
            by_part = _blocks(records, entries, batch=64, partitions=partitions)
            assert sorted(sorted(m) for p in by_part for m in buckets_of_blocks(by_part[p])) == sorted(
                sorted(m) for m in buckets.values() if len(m) >= 2)
            for chunk in (100, 1 << 18):
                got_edges, got_found, got_big = set(), 0, 0
                for p in by_part:
                    for edges, found, big in link_sketch_blocks(by_part[p], need, mc, chunk_pairs=chunk):
                        assert len(edges) == len(set(edges))
                        assert all(a > b for a, b in edges)
                        got_edges |= set(edges)
                        got_found += found
                        got_big += big
                assert (got_edges, got_found, got_big) == (want_edges, want_found, want_big)
            assert want_found > 1000 and want_big > 0  # the buckets really link, and some exceed max_compare


def _graph(rng: random.Random) -> list[tuple[str, str]]:
    edges = []
    nodes = [f"n{i:04d}" for i in range(300)]
    for i in range(0, 60):  # a long path: needs several rounds
        edges.append((nodes[i + 1], nodes[i]))
    for leaf in nodes[100:140]:  # a star around a large key
        edges.append((nodes[299], leaf) if nodes[299] > leaf else (leaf, nodes[299]))
    for _ in range(200):  # random small components, repeated edges
        a, b = rng.sample(nodes[150:290], 2)
        edges.append((max(a, b), min(a, b)))
    return edges + edges[:30]


def _run_cc(edges, partitions):
    with TestPipeline() as p:
        e = p | beam.Create(edges)
        labels, report = e | ConnectedComponents(6, normalized=True)
        blocks = e | beam.BatchElements(min_batch_size=7, max_batch_size=7) | "ToBlocks" >> beam.Map(
            lambda b: (tuple(x[0] for x in b), tuple(x[1] for x in b)))
        b_labels, b_report = blocks | BlockConnectedComponents(6, partitions)
        assert_that(b_labels, equal_to(_expected_labels(edges)), label="BlockLabels")
        plain = report | "PlainReport" >> beam.Map(lambda r: ("plain", r))
        block = b_report | "BlockReport" >> beam.Map(lambda r: ("blocks", r))
        same = ((plain, block) | beam.Flatten() | beam.combiners.ToList()
                | "Same" >> beam.Map(lambda rs: dict(rs)["plain"] == dict(rs)["blocks"] and dict(rs)["plain"]["rounds"] >= 3))
        assert_that(same, equal_to([True]), label="SameReport")
        assert_that(labels, equal_to(_expected_labels(edges)), label="PlainLabels")


def _expected_labels(edges):
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return sorted((n, find(n)) for n in parent)


def test_block_connected_components_give_the_same_labels_and_report():
    edges = _graph(random.Random(3))
    for partitions in (1, 4):
        _run_cc(edges, partitions)


def test_dedup_shuffles_bucket_blocks_not_one_element_per_band():
    n = 600
    caps, _ = synthetic_captions(n, seed=7)
    pairs = [Pair(key=f"s{i:05d}", caption=c) for i, c in enumerate(caps)]
    cfg = DedupConfig()
    bands, _ = cfg.lsh_params()
    p = TestPipeline()
    outcomes, _ = p | beam.Create(pairs) | Deduplicate(cfg)
    _ = outcomes | beam.Map(lambda o: o.key)
    result = p.run()
    result.wait_until_finish()

    def counter(name):
        res = result.metrics().query(MetricsFilter().with_name(name))["counters"]
        return sum(c.committed for c in res)

    assert counter("bucket_entries_near-caption") == bands * n  # every caption has a signature: 14 entries each
    assert counter("bucket_entries_exact-caption") == n
    batches = math.ceil(n / 64)  # BatchElements' smallest batch is 64 records
    near_blocks = counter("bucket_blocks_near-caption")
    assert 1 <= near_blocks <= batches * DEFAULT_BUCKET_PARTITIONS < bands * n // 5
    assert 1 <= counter("bucket_blocks_exact-caption") <= batches * DEFAULT_BUCKET_PARTITIONS


def test_bucket_partitions_follow_the_record_count():
    assert bucket_partitions(None, 15) == DEFAULT_BUCKET_PARTITIONS
    assert bucket_partitions(0, 15) == 1
    assert bucket_partitions(133_333, 15) == 1  # 1,999,995 entries
    assert bucket_partitions(133_334, 15) == 2
    assert bucket_partitions(200_000_000, 15) == 1500


def test_rule_bits_of_blocks_or_the_rules_of_every_edge_touching_a_key():
    # legacy mode: a key's rule bits are the OR over its edges (both ends), whatever blocks they came in
    rng = random.Random(11)
    keys = [f"k{i:03d}" for i in range(80)]
    edges = []  # (hi, lo, rule)
    for _ in range(300):
        a, b = rng.sample(keys, 2)
        edges.append((max(a, b), min(a, b), rng.choice(sorted(RULE_BITS))))
    edges.append(("k005", "k005", "near-caption"))  # a self loop still marks its key, as the per-edge path did
    expected: dict[str, int] = {}
    for hi, lo, rule in edges:
        for k in (hi, lo):
            expected[k] = expected.get(k, 0) | RULE_BITS[rule]
    blocks = []
    for rule, bit in sorted(RULE_BITS.items()):
        mine = [e for e in edges if e[2] == rule]
        for lo in range(0, len(mine), 17):  # several blocks per rule, repeats across blocks
            chunk = mine[lo:lo + 17] + mine[:3]
            blocks.append((bit, (tuple(e[0] for e in chunk), tuple(e[1] for e in chunk))))
    assert max(expected.values()) == 15 and min(expected.values()) < 15  # every rule, and keys with fewer
    for partitions in (1, 3):
        with TestPipeline() as p:
            bits = p | f"B{partitions}" >> beam.Create(blocks) | RuleBitsOfBlocks(partitions)
            assert_that(bits, equal_to(sorted(expected.items())))



def test_members_meet_their_labels_per_key_partition():
    # strict mode: the last round's edge blocks label their nodes per key partition (smallest offer, as the
    # per-node MinLabel did), and only members on an edge come out, as (root, Member's fields)
    edges = _graph(random.Random(4))
    want = dict(_expected_labels(edges))
    rng = np.random.default_rng(1)
    feats = []
    for i in range(320):  # nodes n0000..n0299 (not all on an edge) and 20 keys never on one
        sig = rng.integers(0, 2**32, 128, dtype=np.uint32).astype("<u4").tobytes()
        feats.append(Features(f"n{i:04d}", f"d{i}", None, (1, 0, 0, -i, -i, f"n{i:04d}"), sig if i % 9 else None, None))
    with TestPipeline() as p:
        # star edges of the converged graph, as the last round leaves them
        final = [(k, r) for k, r in sorted(want.items()) if k != r]
        blocks = p | "Final" >> beam.Create([(tuple(k for k, _ in final[i:i + 13]), tuple(r for _, r in final[i:i + 13]))
                                             for i in range(0, len(final), 13)])
        for q in (1, 3):
            labels = blocks | f"L{q}" >> beam.ParDo(LabelBlocksFn(q))
            members = p | f"F{q}" >> beam.Create([feats[i:i + 50] for i in range(0, 320, 50)]) | f"M{q}" >> beam.ParDo(MemberBlocksFn(q))
            out = ({"labels": labels, "members": members} | f"J{q}" >> beam.CoGroupByKey()
                   | f"R{q}" >> beam.FlatMap(_members_by_root))
            expected = [(want[f.key], tuple(member_of(f))) for f in feats if f.key in want]
            assert len(expected) == len(want) < 320
            assert_that(out, equal_to(expected), label=f"Members{q}")
    assert block_labels([(("b", "a", "b"), ("a", "a", "0"))]) == {"b": "0", "a": "a"}


def test_repeated_sketches_are_linked_in_numpy_like_link_sketch_bucket(monkeypatch):
    # exact duplicate captions share a sketch: such buckets are linked in numpy (no per-bucket Python call)
    # with link_sketch_bucket's edges and counts; only a key repeated in a bucket still falls back
    import transforms.dedup as dd

    rng = random.Random(21)
    records = _records(rng, 300)[:-2]  # distinct keys
    records = list({k: (k, s) for k, s in records}.values())
    for i in range(0, len(records), 4):  # a quarter of the records repeat an earlier record's sketch
        j = rng.randrange(max(1, i))
        records[i] = (records[i][0], records[j][1])
    entries = _entries(rng, records, bands=5, buckets_per_band=30)
    buckets = defaultdict(list)
    for b, d, r in entries:
        buckets[(b, d)].append(records[r])
    calls = []
    real = dd.link_sketch_bucket
    monkeypatch.setattr(dd, "link_sketch_bucket", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for t, mc in ((0.6, 64), (0.3, 4)):
        need = min_matching_slots(128, t)
        want_edges, want_found = set(), 0
        for members in buckets.values():
            if len(members) >= 2:
                e = real(members, need, mc)
                want_found += len(e)
                want_edges |= {(a, b) if a > b else (b, a) for a, b in e}
        got_edges, got_found = set(), 0
        for part in _blocks(records, entries, batch=64, partitions=2).values():
            for edges, found, _ in link_sketch_blocks(part, need, mc, chunk_pairs=50):
                got_edges |= set(edges)
                got_found += found
        assert (got_edges, got_found) == (want_edges, want_found) and want_found > len(want_edges) > 100
    assert calls == []
