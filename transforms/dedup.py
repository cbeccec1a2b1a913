"""The dedup stage as Beam transforms: exact (caption, image) + near (MinHash LSH captions, dHash
images) duplicate edges, one connected-components clustering over all of them, and a deterministic
keep policy per cluster.

Flow (every arrow is a shuffle keyed by something small; no step sees the whole corpus):

    pairs ─ ExtractFeatures ─┬─ exact caption: GroupByKey(normalised-caption digest) → star edges
                             ├─ exact image:   GroupByKey(image sha256)              → star edges
                             ├─ near caption:  GroupByKey(LSH band, band hash)       → verified edges
                             └─ near image:    GroupByKey(dHash chunk)               → Hamming-checked edges
    all edges ─ ConnectedComponents (large-star/small-star) → (key, root)
    (key, root) ⋈ keep-rank → CombinePerKey(min rank) per root → kept key, cluster size
    pairs ⋈ cluster membership ⋈ incident rules → one Outcome per input record

Composition of rules: all edges go into ONE graph, so a record linked to a cluster by any rule joins
it (A exact-caption B, B near-image C ⇒ {A, B, C}). The ledger reason of a removed record R whose
cluster keeps K is: ``exact-image`` if R and K have the same image bytes; else ``exact-caption`` if
their normalised captions are equal; else the strongest near rule on an edge touching R
(``near-image`` before ``near-caption``); else (R only reached the cluster through an exact edge to
another removed record) the exact rule of that edge. The detail names every rule touching R.

Keep policy (smallest rank wins, total order so reruns keep the same record):
``(no image, -width*height, -distinct caption words, -normalised caption length, key)`` — prefer a
record with an image, then the higher resolution, then the more informative caption, then the
smaller key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas.errors import UserError
from schemas.records import DUPLICATE, ERROR, Outcome, Pair
from transforms import minhash as mh
from transforms import phash as ph
from transforms.components import ConnectedComponents

# Rule bits: higher value = stronger rule when naming a removed record's reason.
RULE_BITS = {
    reasons.NEAR_CAPTION: 1,
    reasons.NEAR_IMAGE: 2,
    reasons.EXACT_CAPTION: 4,
    reasons.EXACT_IMAGE: 8,
}


@dataclass(frozen=True)
class DedupConfig:
    """Every dedup setting (TOML section ``[dedup]``). ``None`` switches a rule off (in TOML: ``false``).

    Args:
        exact_caption: drop records whose normalised captions (``minhash.normalize_caption``) match.
        exact_image: drop records whose image bytes have the same sha256.
        near_caption_threshold: Jaccard threshold of caption shingle sets for MinHash LSH.
        shingle: ``word`` or ``char`` shingles; ``ngram``: their length. The defaults (character
            5-grams) were chosen with ``bench/dedup_quality.py`` on the real sample captions (see
            BENCHMARKS.md): they catch more realistic edits than word 2/3-grams at the same
            precision, and merge fewer distinct captions than word 1-grams or char 3/4-grams.
        num_perm, seed: MinHash signature length and datasketch seed.
        bands, rows: LSH banding; None picks them with datasketch's ``_optimal_param`` for the
            threshold and the two weights below.
        fp_weight, fn_weight: weights of false-positive / false-negative probability in that search.
        verify_min_jaccard: keep a candidate edge only when the Jaccard estimated from the two
            signatures reaches this value (None: every band collision is an edge and no sketch
            is shuffled). The estimate uses the lowest 8 bits of each of the ``num_perm`` slots
            (b-bit minwise hashing, Li & König 2010): a 128-byte sketch instead of 512 bytes in
            every LSH bucket, corrected for the 1/256 chance that two different slots agree.
        max_compare: in one LSH / dHash bucket, compare each member with at most this many earlier
            distinct members (bounds the work in giant buckets).
        near_image_max_hamming: dHash Hamming distance (of 64 bits) for near-image duplicates.
        max_rounds: connected-components rounds unrolled into the pipeline.

    Example:
        >>> cfg = DedupConfig(near_caption_threshold=0.8, near_image_max_hamming=None)
        >>> cfg.lsh_params()
        (9, 13)
    """

    exact_caption: bool = True
    exact_image: bool = True
    near_caption_threshold: float | None = 0.7
    shingle: str = mh.CHAR
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    bands: int | None = None
    rows: int | None = None
    fp_weight: float = 0.5
    fn_weight: float = 0.5
    verify_min_jaccard: float | None = 0.6
    max_compare: int = 64
    near_image_max_hamming: int | None = 4
    max_rounds: int = 10

    def __post_init__(self):
        if self.shingle not in mh.SHINGLE_KINDS:
            raise ValueError(f"shingle must be one of {mh.SHINGLE_KINDS}, got {self.shingle!r}")
        if self.ngram < 1:
            raise ValueError("ngram must be >= 1")
        if self.num_perm < 2:
            raise ValueError("num_perm must be >= 2")
        t = self.near_caption_threshold
        if t is not None and not 0.0 < t < 1.0:
            raise ValueError("near_caption_threshold must be in (0, 1) or None")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            raise ValueError(f"bands*rows must be in [1, num_perm={self.num_perm}]")
        v = self.verify_min_jaccard
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError("verify_min_jaccard must be in [0, 1] or None")
        if self.max_compare < 1:
            raise ValueError("max_compare must be >= 1")
        h = self.near_image_max_hamming
        if h is not None and not 0 <= h <= 15:
            raise ValueError("near_image_max_hamming must be in [0, 15] or None (64-bit dHash)")
        if self.max_rounds < 2:
            raise ValueError("max_rounds must be >= 2")

    def lsh_params(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        if self.near_caption_threshold is None:
            return 0, 0
        return mh.optimal_bands(self.near_caption_threshold, self.num_perm, self.fp_weight, self.fn_weight)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lsh_bands"], d["lsh_rows"] = self.lsh_params()
        return d

    @classmethod
    def from_toml(cls, path: str) -> "DedupConfig":
        """Read the ``[dedup]`` table of a TOML file (missing table: defaults)."""
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"--config {path}: file not found; pass an existing TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {path}: not valid TOML ({e}); fix the file") from None
        section = doc.get("dedup", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise UserError(f"--config {path}: unknown keys in [dedup]: {unknown}; valid keys: {sorted(known)}")
        # TOML has no null: `false` switches off a setting whose off value is None.
        section = {k: (None if v is False and k in _NONE_ABLE else v) for k, v in section.items()}
        try:
            return cls(**section)
        except (TypeError, ValueError) as e:
            raise UserError(f"--config {path}: bad [dedup] settings: {e}") from None


_NONE_ABLE = ("near_caption_threshold", "bands", "rows", "verify_min_jaccard", "near_image_max_hamming")


class Features(NamedTuple):
    """What dedup needs of one record (the image bytes stay behind in the main PCollection)."""

    key: str
    caption_digest: str | None
    image_sha256: str | None
    rank: tuple
    signature: bytes | None  # MinHash, little-endian uint32
    dhash: int | None
    error: str | None = None


def keep_rank(pair: Pair, normalized: str) -> tuple:
    """Sort key of the keep policy; the smallest rank in a cluster is kept."""
    has_image = pair.image is not None or pair.image_sha256 is not None
    pixels = (pair.width or 0) * (pair.height or 0)
    words = len(set(normalized.split())) if normalized else 0
    return (0 if has_image else 1, -pixels, -words, -len(normalized), pair.key)


def image_sha(pair: Pair) -> str | None:
    if pair.image_sha256:
        return pair.image_sha256
    if pair.image is not None:
        return hashlib.sha256(pair.image).hexdigest()
    return None


class ExtractFeaturesFn(beam.DoFn):
    """Batch of Pairs → Features (normalised-caption digest, image sha256, keep rank, MinHash
    signature, dHash). A record whose features cannot be computed gets ``error`` set (exception
    type only) and becomes an ``error`` outcome; an undecodable or flat image (``phash.is_low_detail``)
    only loses its dHash (exact-image dedup still applies to it)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def setup(self):
        self.hasher = mh.MinHasher(self.cfg.num_perm, self.cfg.seed)
        self.total = Metrics.counter("mmcorpus.dedup", "total")
        self.undecodable = Metrics.counter("mmcorpus.dedup", "phash_undecodable")
        self.low_detail = Metrics.counter("mmcorpus.dedup", "phash_low_detail")
        self.errors = Metrics.counter("mmcorpus.dedup", "errors_features")

    def process(self, batch: list[Pair]):
        cfg = self.cfg
        rows: list[dict] = []
        shingle_lists: list[list[str]] = []
        for pair in batch:
            self.total.inc()
            try:
                norm = mh.normalize_caption(pair.caption)
                dh = None
                if cfg.near_image_max_hamming is not None and pair.image:
                    try:
                        dh = ph.dhash(pair.image)
                    except Exception:  # undecodable image: no near-image rule for it, still deduped otherwise
                        self.undecodable.inc()
                    if dh is not None and ph.is_low_detail(dh):
                        self.low_detail.inc()  # flat image: its dHash would match every other flat image
                        dh = None
                sh = mh.shingles(norm, cfg.shingle, cfg.ngram) if cfg.near_caption_threshold is not None else []
                rows.append(
                    dict(
                        key=pair.key,
                        caption_digest=mh.caption_digest(norm) if norm else None,
                        image_sha256=image_sha(pair),
                        rank=keep_rank(pair, norm),
                        dhash=dh,
                    )
                )
                shingle_lists.append(sh)
            except Exception as exc:  # dead letter: the record becomes an `error` outcome
                self.errors.inc()
                yield Features(pair.key, None, None, (), None, None, reasons.exception_reason(exc))
        sigs = self.hasher.signatures(shingle_lists) if cfg.near_caption_threshold is not None else None
        for i, row in enumerate(rows):
            sig = mh.sig_to_bytes(sigs[i]) if sigs is not None and shingle_lists[i] else None
            yield Features(signature=sig, **row)


def link_bucket(members: Iterable[tuple[str, Any]], similar, max_compare: int) -> list[tuple[str, str]]:
    """Edges inside one LSH bucket.

    ``similar`` None: a star from the smallest key. Otherwise members are taken in key order;
    members with an identical payload are linked to the first one holding it; every other member is
    compared with up to ``max_compare`` earlier distinct payloads and linked to each that is similar.
    """
    items = sorted(set(members), key=lambda kv: kv[0])
    if len(items) < 2:
        return []
    if similar is None:
        root = items[0][0]
        return [(k, root) for k, _ in items[1:] if k != root]
    edges = []
    first_with: dict[Any, str] = {}
    distinct: list[tuple[str, Any]] = []
    for key, payload in items:
        if payload in first_with:
            if first_with[payload] != key:
                edges.append((key, first_with[payload]))
            continue
        for other_key, other in distinct[:max_compare]:
            if similar(payload, other):
                edges.append((key, other_key))
        first_with[payload] = key
        distinct.append((key, payload))
    return edges


class LinkBucketFn(beam.DoFn):
    """(bucket, [(key, payload)]) → (key, other, rule) edges; counts buckets and edges."""

    def __init__(self, rule: str, cfg: DedupConfig):
        self.rule = rule
        self.cfg = cfg

    def setup(self):
        self.edges = Metrics.counter("mmcorpus.dedup", f"edges_{self.rule}")
        self.big = Metrics.counter("mmcorpus.dedup", f"buckets_over_max_compare_{self.rule}")
        cfg = self.cfg
        if self.rule == reasons.NEAR_CAPTION and cfg.verify_min_jaccard is not None:
            t = cfg.verify_min_jaccard

            def similar(a: bytes, b: bytes) -> bool:
                return mh.bbit_jaccard(a, b) >= t

            self.similar = similar
        elif self.rule == reasons.NEAR_IMAGE:
            h = cfg.near_image_max_hamming
            self.similar = lambda a, b: ph.hamming(a, b) <= h
        else:
            self.similar = None

    def process(self, element):
        _, members = element
        members = list(members)
        if len(members) > self.cfg.max_compare:
            self.big.inc()
        out = link_bucket(members, self.similar, self.cfg.max_compare)
        self.edges.inc(len(out))
        for a, b in out:
            yield (a, b, self.rule)


def _exact_key(rule: str):
    if rule == reasons.EXACT_CAPTION:
        return lambda f: [(f.caption_digest, (f.key, None))] if f.caption_digest else []
    return lambda f: [(f.image_sha256, (f.key, None))] if f.image_sha256 else []


class CandidateEdges(beam.PTransform):
    """Features → ``(key, other_key, rule)`` edges of every enabled rule.

    Args:
        cfg: the dedup config.

    Example:
        edges = features | CandidateEdges(DedupConfig())
    """

    def __init__(self, cfg: DedupConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, features):
        cfg = self.cfg
        parts = []
        for rule, on in ((reasons.EXACT_CAPTION, cfg.exact_caption), (reasons.EXACT_IMAGE, cfg.exact_image)):
            if on:
                parts.append(
                    features
                    | f"Key_{rule}" >> beam.FlatMap(_exact_key(rule))
                    | f"Group_{rule}" >> beam.GroupByKey()
                    | f"Link_{rule}" >> beam.ParDo(LinkBucketFn(rule, cfg))
                )
        if cfg.near_caption_threshold is not None:
            bands, rows = cfg.lsh_params()
            carry = cfg.verify_min_jaccard is not None

            def bucket_near_caption(f: Features):
                if f.signature is None:
                    return
                sig = mh.sig_from_bytes(f.signature)
                # Verification carries a 1-byte-per-slot (b-bit) sketch, not the 4-byte signature.
                payload = mh.bbit_sketch(sig) if carry else None
                for bk in mh.band_keys(sig, bands, rows):
                    yield bk, (f.key, payload)

            rule = reasons.NEAR_CAPTION
            parts.append(
                features
                | "Bands_near-caption" >> beam.FlatMap(bucket_near_caption)
                | "Group_near-caption" >> beam.GroupByKey()
                | "Link_near-caption" >> beam.ParDo(LinkBucketFn(rule, cfg))
            )
        if cfg.near_image_max_hamming is not None:
            h = cfg.near_image_max_hamming

            def bucket_near_image(f: Features):
                if f.dhash is None:
                    return
                for bk in ph.band_keys(f.dhash, h):
                    yield bk, (f.key, f.dhash)

            rule = reasons.NEAR_IMAGE
            parts.append(
                features
                | "Bands_near-image" >> beam.FlatMap(bucket_near_image)
                | "Group_near-image" >> beam.GroupByKey()
                | "Link_near-image" >> beam.ParDo(LinkBucketFn(rule, cfg))
            )
        if not parts:
            return features.pipeline | "NoEdges" >> beam.Create([])
        return parts | "FlattenEdges" >> beam.Flatten()


def cluster_id_of(root: str) -> str:
    """Stable cluster id: derived from the cluster's smallest key."""
    return "dc" + hashlib.blake2b(root.encode("utf-8"), digest_size=8).hexdigest()


class ClusterSummary(NamedTuple):
    cluster_id: str
    kept_key: str
    size: int
    kept_caption_digest: str | None
    kept_image_sha256: str | None


class _BestAndCountFn(beam.CombineFn):
    """Per cluster root: (smallest keep rank with its features, member count)."""

    def create_accumulator(self):
        return (None, 0)

    def add_input(self, acc, item):
        best, n = acc
        return (item if best is None or item[0] < best[0] else best, n + 1)

    def merge_accumulators(self, accs):
        best, n = None, 0
        for b, c in accs:
            n += c
            if b is not None and (best is None or b[0] < best[0]):
                best = b
        return (best, n)

    def extract_output(self, acc):
        return acc


def _members_with_summary(element):
    root, groups = element
    summaries = list(groups["summary"])
    (best, size), = summaries
    rank, key, digest, sha = best
    summary = ClusterSummary(cluster_id_of(root), key, size, digest, sha)
    for member in groups["members"]:
        yield member, summary


def _rank_of_member(element):
    key, groups = element
    roots = list(groups["root"])
    feats = list(groups["features"])
    if not roots or not feats:
        return
    f = feats[0]
    yield roots[0], (f.rank, f.key, f.caption_digest, f.image_sha256)


def rule_names(bits: int) -> list[str]:
    return [r for r, b in sorted(RULE_BITS.items(), key=lambda kv: -kv[1]) if bits & b]


def reason_for(pair_digest: str | None, pair_sha: str | None, summary: ClusterSummary, bits: int, cfg: DedupConfig) -> str:
    """Ledger reason of a removed record (see the module docstring)."""
    if cfg.exact_image and pair_sha is not None and pair_sha == summary.kept_image_sha256:
        return reasons.EXACT_IMAGE
    if cfg.exact_caption and pair_digest is not None and pair_digest == summary.kept_caption_digest:
        return reasons.EXACT_CAPTION
    for rule in (reasons.NEAR_IMAGE, reasons.NEAR_CAPTION, reasons.EXACT_IMAGE, reasons.EXACT_CAPTION):
        if bits & RULE_BITS[rule]:
            return rule
    raise ValueError(f"record in a cluster without any edge (rule bits {bits})")


class DecideFn(beam.DoFn):
    """key ⋈ (pairs, features, cluster summary, incident rule bits) → one Outcome per pair."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def setup(self):
        self.kept = Metrics.counter("mmcorpus.dedup", "kept")
        self.dups = {r: Metrics.counter("mmcorpus.dedup", f"duplicate_{r}") for r in RULE_BITS}
        self.errors = Metrics.counter("mmcorpus.dedup", "errors")

    def process(self, element):
        key, groups = element
        pairs = list(groups["pairs"])
        feats = list(groups["features"])
        summaries = list(groups["summary"])
        bits = 0
        for b in groups["rules"]:
            bits |= b
        f = feats[0] if feats else None
        for pair in pairs:
            if f is not None and f.error:
                self.errors.inc()
                yield Outcome.dropped(pair, ERROR, f.error, "dedup features failed")
                continue
            if not summaries:
                self.kept.inc()
                yield Outcome.kept(pair)
                continue
            s = summaries[0]
            if s.kept_key == key:
                self.kept.inc()
                yield Outcome.kept(pair.replace(cluster_id=s.cluster_id, cluster_size=s.size), cluster_id=s.cluster_id, kept_key=key)
                continue
            reason = reason_for(f.caption_digest, f.image_sha256, s, bits, self.cfg)
            self.dups[reason].inc()
            detail = f"cluster of {s.size}, kept {s.kept_key}; linked by {','.join(rule_names(bits))}"
            yield Outcome.dropped(pair, DUPLICATE, reason, detail, cluster_id=s.cluster_id, kept_key=s.kept_key)


def _edge_counts(edges):
    return edges | "RuleOf" >> beam.Map(lambda e: e[2]) | "CountRules" >> beam.combiners.Count.PerElement()


class Deduplicate(beam.PTransform):
    """Pairs → one ``Outcome`` per pair (kept representatives and ``duplicate`` rows) plus a report.

    Args:
        cfg: the ``DedupConfig``.

    Returns ``(outcomes, report)`` where ``report`` is a single-value PCollection (dict with the
    LSH parameters, edges per rule and the connected-components rounds) for ``manifest.extra``.

    Example:
        outcomes, report = pairs | Deduplicate(DedupConfig(near_image_max_hamming=None))
    """

    def __init__(self, cfg: DedupConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pairs):
        cfg = self.cfg
        features = (
            pairs
            | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
            | "ExtractFeatures" >> beam.ParDo(ExtractFeaturesFn(cfg))
        )
        ok_features = features | "WithoutErrors" >> beam.Filter(lambda f: f.error is None)
        edges = ok_features | "CandidateEdges" >> CandidateEdges(cfg)
        labels, cc_report = (edges | "Pairs" >> beam.Map(lambda e: (e[0], e[1]))) | "Components" >> ConnectedComponents(
            cfg.max_rounds
        )
        rules = (
            edges
            | "RuleBits" >> beam.FlatMap(lambda e: [(e[0], RULE_BITS[e[2]]), (e[1], RULE_BITS[e[2]])])
            | "OrRuleBits" >> beam.CombinePerKey(lambda bits: _or_all(bits))
        )
        # Joins carry only what the decision needs: never the signature or the image.
        features_by_key = features | "FeaturesByKey" >> beam.Map(lambda f: (f.key, f._replace(signature=None, dhash=None)))
        member_ranks = (
            {"root": labels, "features": features_by_key}
            | "JoinRank" >> beam.CoGroupByKey()
            | "RankByRoot" >> beam.FlatMap(_rank_of_member)
        )
        summary = member_ranks | "BestPerCluster" >> beam.CombinePerKey(_BestAndCountFn())
        members = labels | "MemberByRoot" >> beam.Map(lambda kv: (kv[1], kv[0]))
        membership = (
            {"members": members, "summary": summary}
            | "JoinSummary" >> beam.CoGroupByKey()
            | "SummaryPerMember" >> beam.FlatMap(_members_with_summary)
        )
        outcomes = (
            {
                "pairs": pairs | "PairsByKey" >> beam.Map(lambda p: (p.key, p)),
                "features": features_by_key,
                "summary": membership,
                "rules": rules,
            }
            | "JoinAll" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(DecideFn(cfg))
        )
        bands, rows = cfg.lsh_params()
        edge_counts = _edge_counts(edges) | "EdgeCountsDict" >> beam.combiners.ToDict()
        report = (
            cc_report
            | "Report"
            >> beam.Map(
                lambda cc, counts: {
                    "lsh_bands": bands,
                    "lsh_rows": rows,
                    "candidate_edges": dict(sorted(counts.items())),
                    "components": cc,
                },
                counts=beam.pvalue.AsSingleton(edge_counts),
            )
        )
        return outcomes, report


def _or_all(bits: Iterable[int]) -> int:
    out = 0
    for b in bits:
        out |= b
    return out
