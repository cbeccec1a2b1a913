"""Distributed connected components in Beam: alternating large-star / small-star rounds.

Kiveris et al., "Connected Components in MapReduce and Beyond" (SoCC 2014). Every step is a
``GroupByKey`` on a node id. A node's neighbourhood is read twice (its minimum, then the edges to
emit) and never copied into a set, so a hub — the root of a converged star, whose neighbourhood is
its whole component — costs one key of memory on runners whose grouped values are re-iterable and
paged (Dataflow, Flink); the edges each small-star step receives are made distinct first by a
``Distinct`` (a shuffle on the edge itself). Nodes are string keys ordered as strings; each
component converges to a star around its smallest key (the *root*).

Beam graphs are static, so ``max_rounds`` rounds are unrolled when the pipeline is built. Each round
reports the number and a checksum of the distinct edges it produced; the round after which the edge
set stopped changing is the number of rounds the graph needed (later rounds are no-ops: once a round
has reproduced the one before, the following rounds pass the edges through and copy its stats,
without their shuffles). When the
limit is hit first, ``converged`` is False: every node still gets a label (the smallest key it is
linked to), so a component may be split in two — duplicates kept, never a record lost.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

Edge = tuple[str, str]  # (larger key, smaller key)
_LARGE_STAR_NODES = Metrics.counter("mmcorpus.components", "large_star_nodes")  # resolved per bundle at inc()


def _edge_hash(hi: str, lo: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{hi}\x00{lo}".encode("utf-8"), digest_size=8).digest(), "big")


def _reiterable(values: Iterable[str]) -> Iterable[str]:
    """Grouped values that can be iterated twice: a one-shot iterator is copied into a list (only
    a runner that hands one over pays the memory; Beam's own grouped values are re-iterable)."""
    return list(values) if isinstance(values, Iterator) else values


def normalize_edge(u: str, v: str) -> Edge | None:
    """(larger, smaller) or None for a self loop."""
    if u == v:
        return None
    return (u, v) if u > v else (v, u)


class LargeStarFn(beam.DoFn):
    """Node u with neighbourhood Γ(u): link every neighbour larger than u to m = min(Γ(u) ∪ {u}).
    Counts the nodes it visits (``mmcorpus.components/large_star_nodes``: the work of the rounds)."""

    def process(self, element: tuple[str, Iterable[str]]):
        _LARGE_STAR_NODES.inc()
        u, neighbours = element
        nbrs = _reiterable(neighbours)
        m = min(min(nbrs), u)
        for v in nbrs:  # a repeated neighbour repeats an edge; the Distinct after this step drops it
            if v > u:
                yield (v, m)


class SmallStarFn(beam.DoFn):
    """Node u with its smaller neighbours N (distinct: a ``Distinct`` runs before the group):
    link every node of N ∪ {u} to m = min(N).

    Also emits, as the ``stats`` output, (count, checksum) of the distinct edges it received.
    """

    STATS = "stats"

    def __init__(self, round_index: int):
        self.round_index = round_index

    def process(self, element: tuple[str, Iterable[str]]):
        u, smaller = element
        nbrs = _reiterable(smaller)
        m = min(nbrs)
        yield (u, m)
        checksum, n = 0, 0
        for v in nbrs:
            n += 1
            checksum = (checksum + _edge_hash(u, v)) & 0xFFFFFFFFFFFFFFFF
            if v != m:
                yield (v, m)
        yield beam.pvalue.TaggedOutput(self.STATS, (self.round_index, (n, checksum)))


def _normalized(uv):
    u, v = uv
    if u > v:
        yield (u, v)
    elif v > u:
        yield (v, u)


def _sum_stats(values: Iterable[tuple[int, int]]) -> tuple[int, int]:
    n, c = 0, 0
    for a, b in values:
        n += a
        c = (c + b) & 0xFFFFFFFFFFFFFFFF
    return n, c


def _round_stats(stats, r: int):
    """``(r, summed stats)`` of round r. Every stats element of a round has the key r, so this is a
    global combine, not CombinePerKey: on the Dask engine a global combine's shuffle has one bucket per
    partition instead of P (P x P tasks for one key, ten rounds)."""
    return (
        stats
        | f"R{r}StatValues" >> beam.Values()
        | f"R{r}SumStats" >> beam.CombineGlobally(_sum_stats).without_defaults()
        | f"R{r}KeyStats" >> beam.Map(lambda v, r=r: (r, v))
    )


class _StatsPerRoundFn(beam.CombineFn):
    """Every round's ``(round, (edges, checksum))`` stats elements → ``[(round, summed stats)]`` sorted by round
    (``_sum_stats`` per round): one global combine for all rounds, its accumulator bounded by the rounds."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, item):
        r, (n, c) = item
        a, b = acc.get(r, (0, 0))
        acc[r] = (a + n, (b + c) & 0xFFFFFFFFFFFFFFFF)
        return acc

    def merge_accumulators(self, accs):
        out: dict[int, tuple[int, int]] = {}
        for acc in accs:
            for item in acc.items():
                self.add_input(out, item)
        return out

    def extract_output(self, acc):
        return sorted(acc.items())


def _convergence(prev: list[tuple[int, tuple[int, int]]], r: int) -> dict:
    """From the stats of rounds r-2 and r-1: whether r-1 reproduced r-2, and round r's stats if so."""
    by_round = dict(prev)
    a, b = by_round.get(r - 2, (0, 0)), by_round.get(r - 1, (0, 0))
    converged = a == b
    return {"converged": converged, "copy": (r, b) if converged and (r - 1) in by_round else None}


class _RouteFn(beam.DoFn):
    """Edges of a round: to ``done`` (passed through unchanged) once the graph has converged, else on."""

    DONE = "done"

    def process(self, edge, convergence):
        if convergence["converged"]:
            yield beam.pvalue.TaggedOutput(self.DONE, edge)
        else:
            yield edge


def summarize_rounds(per_round: list[tuple[int, tuple[int, int]]], max_rounds: int) -> dict:
    """Turn per-round (edges, checksum) into the report stored in ``manifest.extra``."""
    stats = dict(per_round)
    edges = [stats.get(r, (0, 0))[0] for r in range(max_rounds)]
    sums = [stats.get(r, (0, 0)) for r in range(max_rounds)]
    rounds = None
    for r in range(1, max_rounds):
        if sums[r] == sums[r - 1]:
            rounds = r  # round r reproduced round r-1: r rounds did all the work
            break
    if not any(edges):
        rounds = 0
    return {
        "max_rounds": max_rounds,
        "rounds": rounds if rounds is not None else max_rounds,
        "converged": rounds is not None,
        "edges_per_round": edges,
    }


class ConnectedComponents(beam.PTransform):
    """Label every node of an undirected graph with the smallest key of its component.

    Args:
        max_rounds: large-star + small-star rounds unrolled into the pipeline (at least 2, so the
            last round can show that nothing changed).
        normalized: the input is already ``(larger, smaller)`` pairs without self loops (skips a
            pass over every edge).

    Input: PCollection of ``(u, v)`` key pairs (any order, duplicates and self loops allowed).
    Output: ``(labels, report)`` — PCollection of ``(node, root)`` for every node on an edge
    (roots included, labelled with themselves), and a single-value PCollection with the dict from
    ``summarize_rounds``.

    Example:
        labels, report = edges | ConnectedComponents(max_rounds=10)
    """

    def __init__(self, max_rounds: int = 10, normalized: bool = False, skip_converged: bool = True):
        super().__init__()
        if max_rounds < 2:
            raise ValueError("max_rounds must be >= 2")
        self.max_rounds = max_rounds
        self.normalized = normalized
        self.skip_converged = skip_converged

    def expand(self, edges):
        if not self.normalized:
            edges = edges | "Normalize" >> beam.FlatMap(_normalized)
        stats = []
        for r in range(self.max_rounds):
            done = None
            if self.skip_converged and r >= 2:
                # Round r-1 reproduced round r-2 (same distinct edges, by count and checksum): every
                # later round is the same fixed point, so its edges pass through and its stats are a
                # copy; only the rounds before convergence pay the shuffles.
                prev = (
                    (stats[r - 2], stats[r - 1])
                    | f"R{r}PrevStats" >> beam.Flatten()
                    | f"R{r}PrevList" >> beam.combiners.ToList()
                    | f"R{r}Converged" >> beam.Map(_convergence, r)
                )
                routed = edges | f"R{r}Route" >> beam.ParDo(_RouteFn(), beam.pvalue.AsSingleton(prev)).with_outputs(
                    _RouteFn.DONE, main="work"
                )
                edges, done = routed.work, routed[_RouteFn.DONE]
                copied = prev | f"R{r}CopyStats" >> beam.FlatMap(lambda c: [c["copy"]] if c["copy"] is not None else [])
            large = (
                edges
                | f"R{r}BothWays" >> beam.FlatMap(lambda e: [e, (e[1], e[0])])
                | f"R{r}GroupNeighbours" >> beam.GroupByKey()
                | f"R{r}LargeStar" >> beam.ParDo(LargeStarFn())
            )
            small = (
                large
                | f"R{r}DistinctEdges" >> beam.Distinct()
                | f"R{r}GroupSmaller" >> beam.GroupByKey()
                | f"R{r}SmallStar" >> beam.ParDo(SmallStarFn(r)).with_outputs(SmallStarFn.STATS, main="edges")
            )
            edges = small.edges
            round_stats = _round_stats(small.stats, r)
            if done is not None:
                edges = (edges, done) | f"R{r}Edges" >> beam.Flatten()
                round_stats = (round_stats, copied) | f"R{r}Stats" >> beam.Flatten()
            stats.append(round_stats)
        max_rounds = self.max_rounds
        report = (
            stats
            | "FlattenStats" >> beam.Flatten()
            | "AllRounds" >> beam.combiners.ToList()
            | "Report" >> beam.Map(lambda per_round: summarize_rounds(sorted(per_round), max_rounds))
        )
        labels = (
            edges
            | "SelfLabels" >> beam.FlatMap(lambda e: [(e[0], e[1]), (e[1], e[1])])
            | "MinLabel" >> beam.CombinePerKey(min)
        )
        return labels, report


# --- the same rounds over edge blocks ------------------------------------------------------------
# An edge block is ``(larger keys, smaller keys)``: two equal-length tuples of strings. Each round moves
# a few blocks per partition through its two shuffles instead of one element per edge and direction;
# inside a partition the large-star and small-star steps run on integer ids in numpy. The labels and the
# report are those of ``ConnectedComponents`` on the same edges (both are functions of the edge set).


def _split(keys: list[str], vals: list[str], by: list[str], partitions: int):
    """``(partition of the by-key, (keys, vals))`` blocks; a key's partition is the crc32 of its UTF-8
    bytes modulo ``partitions`` (stable across processes)."""
    if partitions == 1:
        if keys:
            yield 0, (tuple(keys), tuple(vals))
        return
    part_of = {k: zlib.crc32(k.encode("utf-8")) % partitions for k in set(by)}
    out: dict[int, tuple[list[str], list[str]]] = {}
    for k, v, b in zip(keys, vals, by):
        ks, vs = out.setdefault(part_of[b], ([], []))
        ks.append(k)
        vs.append(v)
    for q in sorted(out):
        yield q, (tuple(out[q][0]), tuple(out[q][1]))


def _concat(blocks) -> tuple[list[str], list[str]]:
    a: list[str] = []
    b: list[str] = []
    for x, y in blocks:
        a.extend(x)
        b.extend(y)
    return a, b


def key_ids(*lists: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dense ids in Python's str order over all ``lists``: the sorted distinct keys (object array) and
    each list's ids (int64)."""
    names = sorted(set().union(*lists))
    index = {k: i for i, k in enumerate(names)}
    get = index.__getitem__
    ids = [np.fromiter(map(get, lst), dtype=np.int64, count=len(lst)) for lst in lists]
    arr = np.empty(len(names), dtype=object)
    arr[:] = names
    return arr, ids


def _block_ids(element):
    """One partition's ``(key, [(a keys, b keys), ...])`` → ``(names, a ids, b ids)`` (``key_ids``), or
    None when it holds no pair."""
    _, blocks = element
    a, b = _concat(blocks)
    if not a:
        return None
    names, (ai, bi) = key_ids(a, b)
    return names, ai, bi


class SpreadBlockFn(beam.DoFn):
    """Edge block → ``(partition of u, (u, neighbour))`` blocks, both directions of every edge."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def process(self, block):
        hi, lo = block
        u = [*hi, *lo]
        yield from _split(u, [*lo, *hi], u, self.partitions)


class LargeStarBlockFn(beam.DoFn):
    """A partition's ``(u, neighbour)`` blocks → ``LargeStarFn``'s edges ``(v, min(Γ(u) ∪ {u}))`` for every
    neighbour v > u, as ``(partition of v, (v, m))`` blocks."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def process(self, element):
        ids = _block_ids(element)
        if ids is None:
            return
        names, ui, ni = ids
        _LARGE_STAR_NODES.inc(len(np.unique(ui)))
        m = np.arange(len(names))
        np.minimum.at(m, ui, ni)  # m[u] = min(u, its neighbours)
        sel = ni > ui
        v = names[ni[sel]].tolist()
        yield from _split(v, names[m[ui[sel]]].tolist(), v, self.partitions)


class SmallStarBlockFn(beam.DoFn):
    """A partition's ``(v, smaller neighbour)`` blocks → ``SmallStarFn``'s edges as one edge block, and
    ``(round, (distinct edges, checksum))`` as the ``stats`` output (the same numbers as ``SmallStarFn``).
    With ``spread`` (node partitions) the block comes out as ``SpreadBlockFn(spread)`` would spread it for
    the next round (one ParDo less per round to build, translate and run)."""

    STATS = "stats"

    def __init__(self, round_index: int, spread: int | None = None):
        self.round_index = round_index
        self.spread = spread

    def process(self, element):
        ids = _block_ids(element)
        if ids is None:
            return
        names, vi, wi = ids
        codes = np.unique(vi.astype(np.int64) * len(names) + wi)
        vi, wi = np.divmod(codes, len(names))
        checksum = 0
        for a, b in zip(names[vi].tolist(), names[wi].tolist()):
            checksum = (checksum + _edge_hash(a, b)) & 0xFFFFFFFFFFFFFFFF
        m = np.full(len(names), len(names), dtype=np.int64)
        np.minimum.at(m, vi, wi)  # m[v] = min of v's smaller neighbours
        nodes = np.unique(vi)
        keep = wi != m[vi]
        hi = np.concatenate((nodes, wi[keep]))
        lo = np.concatenate((m[nodes], m[vi[keep]]))
        hi_keys, lo_keys = names[hi].tolist(), names[lo].tolist()
        if self.spread is None:
            yield (tuple(hi_keys), tuple(lo_keys))
        else:
            u = hi_keys + lo_keys
            yield from _split(u, lo_keys + hi_keys, u, self.spread)
        yield beam.pvalue.TaggedOutput(self.STATS, (self.round_index, (len(codes), checksum)))


class BlockConnectedComponents(beam.PTransform):
    """``ConnectedComponents(max_rounds, normalized=True)`` over edge blocks: the same labels and report.

    Args:
        max_rounds: rounds unrolled into the pipeline (every round runs; a converged round costs a few
            blocks, so nothing is skipped).
        partitions: node partitions per shuffle; a step holds one partition's edges.

        label_blocks: output the last round's edge blocks instead of one ``(node, root)`` per node: the
            labels are then ``block_labels`` of the blocks a node's partition receives (``LabelBlocksFn``).

    Input: PCollection of edge blocks ``(larger keys, smaller keys)`` (repeats allowed, no self loops).
    Output: ``(labels, report)`` as ``ConnectedComponents``.

    Example:
        labels, report = blocks | BlockConnectedComponents(max_rounds=10, partitions=4)
    """

    def __init__(self, max_rounds: int = 10, partitions: int = 1, label_blocks: bool = False):
        super().__init__()
        self.label_blocks = label_blocks
        if max_rounds < 2:
            raise ValueError("max_rounds must be >= 2")
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.max_rounds = max_rounds
        self.partitions = partitions

    def expand(self, blocks):
        q = self.partitions
        stats = []
        spread = blocks | "R0Spread" >> beam.ParDo(SpreadBlockFn(q))
        for r in range(self.max_rounds):
            last = r == self.max_rounds - 1
            small = (
                spread
                | f"R{r}GroupNeighbours" >> beam.GroupByKey()
                | f"R{r}LargeStar" >> beam.ParDo(LargeStarBlockFn(q))
                | f"R{r}GroupSmaller" >> beam.GroupByKey()
                | f"R{r}SmallStar" >> beam.ParDo(SmallStarBlockFn(r, None if last else q)).with_outputs(
                    SmallStarBlockFn.STATS, main="edges")
            )
            spread = small.edges  # spread for round r + 1, or (last round) the edge blocks
            blocks = small.edges
            stats.append(small.stats)
        max_rounds = self.max_rounds
        # One global combine sums every round's stats (per round, as ConnectedComponents' per-round combines do):
        # a combine per round cost ~8 transforms each, built, translated and run for a handful of elements.
        report = (
            stats
            | "FlattenStats" >> beam.Flatten()
            | "AllRounds" >> beam.CombineGlobally(_StatsPerRoundFn())
            | "Report" >> beam.Map(lambda per_round: summarize_rounds(per_round, max_rounds))
        )
        if self.label_blocks:
            return blocks, report
        labels = (
            blocks
            | "SelfLabels" >> beam.FlatMap(lambda b: [kv for hi, lo in zip(*b) for kv in ((hi, lo), (lo, lo))])
            | "MinLabel" >> beam.CombinePerKey(min)
        )
        return labels, report


class LabelBlocksFn(beam.DoFn):
    """Last-round edge block → ``(partition of node, (nodes, candidate labels))``: every edge ``(hi, lo)`` offers
    ``lo`` to both ends (``ConnectedComponents``' labels: each node's smallest such offer)."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def process(self, block):
        hi, lo = block
        u = [*hi, *lo]
        yield from _split(u, [*lo, *lo], u, self.partitions)


def block_labels(blocks: Iterable[tuple[tuple[str, ...], tuple[str, ...]]]) -> dict[str, str]:
    """``LabelBlocksFn``'s ``(nodes, offers)`` blocks of one partition → ``{node: its root}`` (smallest offer)."""
    labels: dict[str, str] = {}
    get = labels.get
    for nodes, offers in blocks:
        for n, o in zip(nodes, offers):
            cur = get(n)
            if cur is None or o < cur:
                labels[n] = o
    return labels
