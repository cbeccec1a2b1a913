"""The dedup stage as Beam transforms: duplicate edges per rule (exact caption / image bytes,
MinHash LSH captions, dHash images), connected components, and clusters in which every member is
within the threshold of its kept representative.

Two modes (``DedupConfig.mode``):

``strict`` (default) — rules of one kind never meet in one closure:
    pairs ─ ExtractFeatures ─┬─ records WITH an image: CapCaptions (GroupByKey caption digest; the
                             │    first ``max_pairs_per_caption`` keys by key order stay, the rest are
                             │    ``caption_overused``) → image edges only (exact sha256, dHash chunks)
                             └─ records WITHOUT an image (caption-only metadata pass): caption edges
                                  only (exact normalised caption, MinHash LSH)
    edges ─ ConnectedComponents → candidate clusters (never mixed: the two node sets are disjoint)
    AssignRepresentatives, max_split_rounds rounds: per component, the best-ranked unassigned member is a
        representative; every unassigned member within the threshold of it (same sha256 or dHash
        Hamming <= max_hamming_to_kept; same caption or estimated Jaccard >= min_jaccard_to_kept) is its
        duplicate; the rest go to the next round. Members left after the last round are their own
        representatives (kept). So no chain A~B~C puts A and C together unless C is close to the kept A.
    error ⋈ assignment ⋈ caption cap → one ``Decision`` per record whose outcome is not "kept as read";
        the records themselves go straight to the writer, which applies each decision in its shard
        (``WriteStageOutput(decisions=...)``: one whole-record shuffle), or ``Deduplicate`` joins them

``legacy-transitive`` — the first wave's behaviour: every rule's edges in ONE graph, a whole connected
    component is one cluster (A exact-caption B, B near-image C ⇒ {A, B, C}); no caption cap, no split.
    Its edges travel as blocks too (``BlockConnectedComponents``), and a removed record's rule bits are
    OR-ed per key partition from the same blocks, in the join that meets the labels and the ranks
    (``_ranks_by_root``; ``RuleBitsOfBlocks`` is the same OR as a transform of its own).

Keep policy (smallest rank wins; a total order, so reruns keep the same record):
    strict, image clusters: ``(needs_rewrite, -width*height, key)`` — a caption that needs no
    rewrite, then the larger resolution, then key order; caption clusters:
    ``(needs_rewrite, -distinct caption words, -normalised caption length, key)``.
    legacy: ``(no image, -width*height, -distinct caption words, -caption length, key)``.
    With ``source_priority`` (cross-source runs) the dataset's position in that list comes right
    after the image flag, before everything else.

Ledger (strict): a removed record has ``cluster_id`` (from its representative's key), ``kept_key``,
the rule that ties it to the representative as reason, and a ``key=value`` detail naming the link
and its distance to the representative (``parse_detail`` reads it back), e.g.
``link=near-image hamming=3 kept=00001234 round=1``.

Scale: every step is a shuffle keyed by something small, combiners fold huge groups (best rank,
first K keys), and the DoFns after a group-by stream its members once, holding one representative
(or K keys) — never all keys of a group in a list. The caption rules' bucket entries and the edges
are the exception by design: they cross their shuffles as blocks (a batch's entries per bucket
partition; edge blocks per node partition; legacy rule bits per key partition), and a step holds one
partition, whose size ``bucket_partitions`` bounds from the record count (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import tomllib
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas.errors import UserError
from schemas.records import DUPLICATE, ERROR, KEPT, REASON_OK, Outcome, Pair
from transforms import minhash as mh
from transforms import phash as ph
from transforms.components import BlockConnectedComponents, LabelBlocksFn, block_labels, key_ids
from transforms.stage_io import Decision, decided_outcome, encode_batch

STRICT = "strict"
LEGACY = "legacy-transitive"
MODES = (STRICT, LEGACY)

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
        mode: ``strict`` (default: image rules on records with images, caption rules only on records
            without one, every cluster member within the threshold of its representative) or
            ``legacy-transitive`` (every rule's edges in one transitive closure; see the module doc).
        exact_caption: drop records whose normalised captions (``minhash.normalize_caption``) match.
        exact_image: drop records whose image bytes have the same sha256.
        near_caption_threshold: Jaccard threshold of caption shingle sets for MinHash LSH.
        shingle: ``word`` or ``char`` shingles; ``ngram``: their length. The defaults (character
            5-grams) were chosen with ``python -m bench.dedup_quality --sweep`` on the real sample
            captions (docs/dedup.md, "Why character 5-grams"): they catch more realistic edits than
            word 2/3-grams at the same precision, and merge fewer distinct captions than word 1-grams
            or char 3/4-grams.
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
        max_pairs_per_caption: strict mode, records with an image: at most this many records (the
            first by key order) may carry the same normalised caption; the rest are removed as
            ``caption_overused`` (boilerplate such as "stock photo" or "image"). None: no cap.
        max_split_rounds: strict mode: representative rounds per connected component; members
            still unassigned after the last round are kept as their own representatives.
        max_hamming_to_kept: strict mode: an image cluster member must be within this dHash
            Hamming distance of its kept representative. Edges use ``near_image_max_hamming``
            (it sets the pigeonhole chunks, so it must stay small); resized copies of one photo
            drift up to about 5 bits from its largest copy, distinct photos differ in about 32
            (17 at least among the bundled ones), so 8 keeps copies together and photos apart.
        source_priority: dataset names, most preferred first: the keep policy ranks a record by its
            ``dataset``'s position here before anything else (unlisted datasets and records without
            one come after every listed one). Empty: no source preference (ranks as before).
        min_jaccard_to_kept: strict mode: a caption cluster member (no image) must have an
            estimated Jaccard of at least this with its kept representative (the same bar as
            ``verify_min_jaccard`` by default: a 128-slot estimate of J = 0.7 is noisy).

    Example:
        >>> cfg = DedupConfig(near_caption_threshold=0.8, near_image_max_hamming=None)
        >>> cfg.lsh_params()
        (9, 13)
    """

    mode: str = STRICT
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
    max_pairs_per_caption: int | None = 10
    max_split_rounds: int = 4
    max_hamming_to_kept: int = 8
    min_jaccard_to_kept: float = 0.6
    source_priority: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.source_priority, list):
            object.__setattr__(self, "source_priority", tuple(self.source_priority))
        if len(set(self.source_priority)) != len(self.source_priority):
            raise ValueError(f"source_priority names a dataset twice: {list(self.source_priority)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_pairs_per_caption is not None and self.max_pairs_per_caption < 1:
            raise ValueError("max_pairs_per_caption must be >= 1 or None")
        if self.max_split_rounds < 1:
            raise ValueError("max_split_rounds must be >= 1")
        if not 0 <= self.max_hamming_to_kept <= 32:
            raise ValueError("max_hamming_to_kept must be in [0, 32] (of 64 dHash bits)")
        nh = self.near_image_max_hamming
        if nh is not None and self.max_hamming_to_kept < nh:
            raise ValueError(f"max_hamming_to_kept ({self.max_hamming_to_kept}) must be >= near_image_max_hamming ({nh})")
        if not 0.0 < self.min_jaccard_to_kept <= 1.0:
            raise ValueError("min_jaccard_to_kept must be in (0, 1]")
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


_NONE_ABLE = ("near_caption_threshold", "bands", "rows", "verify_min_jaccard", "near_image_max_hamming",
              "max_pairs_per_caption")


class Features(NamedTuple):
    """What dedup needs of one record (the image bytes stay behind in the main PCollection)."""

    key: str
    caption_digest: str | None
    image_sha256: str | None
    rank: tuple
    signature: bytes | None  # MinHash, little-endian uint32
    dhash: int | None
    error: str | None = None
    has_image: bool = False


class Member(NamedTuple):
    """What the representative rounds need of one clustered record (no signature, no image)."""

    key: str
    rank: tuple
    image_sha256: str | None
    dhash: int | None
    caption_digest: str | None
    sketch: bytes | None  # b-bit MinHash sketch (captions without an image only)


def has_image(pair: Pair) -> bool:
    return pair.image is not None or pair.image_sha256 is not None


def keep_rank(pair: Pair, normalized: str, mode: str = STRICT, source_priority: tuple[str, ...] = ()) -> tuple:
    """Sort key of the keep policy; the smallest rank in a cluster is kept (see the module doc).
    With ``source_priority`` the record's dataset position is inserted right after the image/no-image
    flag (``rank[0]`` keeps meaning "no image", which ``link_to_representative`` reads)."""
    if source_priority:
        prio = source_priority.index(pair.dataset) if pair.dataset in source_priority else len(source_priority)
        base = keep_rank(pair, normalized, mode)
        return (base[0], prio) + base[1:]
    with_image = has_image(pair)
    pixels = (pair.width or 0) * (pair.height or 0)
    words = len(set(normalized.split())) if normalized else 0
    if mode == LEGACY:
        return (0 if with_image else 1, -pixels, -words, -len(normalized), pair.key)
    rewrite = 1 if pair.needs_rewrite else 0
    if with_image:
        return (0, rewrite, -pixels, 0, 0, pair.key)
    return (1, rewrite, 0, -words, -len(normalized), pair.key)


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
        to_hash: list[str] = []  # per row: its normalised caption when it gets a signature, else ""
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
                # Strict mode never links an image record by its caption: no signature to compute.
                wants_sig = cfg.near_caption_threshold is not None and (cfg.mode == LEGACY or not has_image(pair))
                rows.append(
                    dict(
                        key=pair.key,
                        caption_digest=mh.caption_digest(norm) if norm else None,
                        image_sha256=image_sha(pair),
                        rank=keep_rank(pair, norm, cfg.mode, cfg.source_priority),
                        dhash=dh,
                        has_image=has_image(pair),
                    )
                )
                to_hash.append(norm if wants_sig else "")
            except Exception as exc:  # dead letter: the record becomes an `error` outcome
                self.errors.inc()
                yield Features(pair.key, None, None, (), None, None, reasons.exception_reason(exc))
        sigs = counts = None
        if cfg.near_caption_threshold is not None and rows:
            # the batch's shingle hashes at once (minhash.shingle_hashes): the signatures of mh.shingles
            flat, counts = mh.shingle_hashes(to_hash, cfg.shingle, cfg.ngram)
            sigs = self.hasher.signatures_from_hashes(flat, counts)
        for i, row in enumerate(rows):
            sig = mh.sig_to_bytes(sigs[i]) if sigs is not None and counts[i] else None
            yield Features(signature=sig, **row)


class ExtractFeatureBatchesFn(ExtractFeaturesFn):
    """``ExtractFeaturesFn`` that keeps the batch: its records' Features without an error as one list
    (main output; nothing for a batch of failures only) and ``(key, error)`` of each failed record
    (``ERRORS``). Legacy mode's bucket and rank steps read whole batches: no per-record element passes
    the error filters and two re-batching steps (the records, their features and the outputs are those
    of ``ExtractFeaturesFn``)."""

    ERRORS = "errors"

    def process(self, batch: list[Pair]):
        ok = []
        for f in super().process(batch):
            if f.error is None:
                ok.append(f)
            else:
                yield beam.pvalue.TaggedOutput(self.ERRORS, (f.key, f.error))
        if ok:
            yield ok


class ExtractStrictBatchesFn(ExtractFeaturesFn):
    """Strict mode's ``ExtractFeaturesFn``: a batch's error-free Features that the caption cap does not touch as
    ONE list (main output; nothing when none), each Features the cap may remove (``capped``: a record with an
    image and a caption, when ``cap`` is set) on its own on ``CAPPED`` (the cap shuffles them by caption), and
    ``(key, error)`` of each failed record on ``ERRORS``. The rest of the strict steps read the lists: no
    per-record element passes the cap's filters, a flatten and two re-batching steps."""

    ERRORS = "errors"
    CAPPED = "capped"

    def __init__(self, cfg: DedupConfig, cap: bool):
        super().__init__(cfg)
        self.cap = cap

    def process(self, batch: list[Pair]):
        rest = []
        for f in super().process(batch):
            if f.error is not None:
                yield beam.pvalue.TaggedOutput(self.ERRORS, (f.key, f.error))
            elif self.cap and _capped(f):
                yield beam.pvalue.TaggedOutput(self.CAPPED, f)
            else:
                rest.append(f)
        if rest:
            yield rest


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
        if self.similar is None:
            # Exact rule: every member is identical, so any star connects the group; a star from
            # the first member seen streams the group (a caption repeated a million times is never
            # held as a list). Components depend only on connectivity, so the result is the same
            # in any iteration order.
            first = None
            n = 0
            for key, _ in members:
                if first is None:
                    first = key
                elif key != first:
                    n += 1
                    yield (key, first, self.rule)
            self.edges.inc(n)
            return
        members = list(members)
        if len(members) > self.cfg.max_compare:
            self.big.inc()
        out = link_bucket(members, self.similar, self.cfg.max_compare)
        self.edges.inc(len(out))
        for a, b in out:
            yield (a, b, self.rule)


def min_matching_slots(width: int, threshold: float) -> int:
    """Smallest number of equal 8-bit slots (of ``width``) whose ``bbit_jaccard`` reaches ``threshold``,
    evaluated with the same float operations as ``minhash.bbit_jaccard`` (so the comparison is exact)."""
    for c in range(width + 1):
        match = float(c) / float(width)
        if max(0.0, (match - 1.0 / 256.0) / (1.0 - 1.0 / 256.0)) >= threshold:
            return c
    return width + 1


def link_sketch_bucket(members: Iterable[tuple[str, bytes]], min_count: int, max_compare: int) -> list[tuple[str, str]]:
    """``link_bucket(members, similar, max_compare)`` for b-bit sketch payloads with
    ``similar(a, b) = bbit_jaccard(a, b) >= t``, where ``min_count = min_matching_slots(len, t)``:
    the same edges in the same order, each member compared with the first ``max_compare`` distinct
    sketches in one numpy call instead of one Python call per pair."""
    items = sorted(set(members), key=lambda kv: kv[0])
    if len(items) < 2:
        return []
    import numpy as np

    edges: list[tuple[str, str]] = []
    first_with: dict[bytes, str] = {}
    keys: list[str] = []
    mat = None
    nd = 0
    for key, payload in items:
        if payload in first_with:
            if first_with[payload] != key:
                edges.append((key, first_with[payload]))
            continue
        x = np.frombuffer(payload, dtype=np.uint8)
        if nd:
            counts = np.count_nonzero(mat[:nd] == x, axis=1)
            for i in np.flatnonzero(counts >= min_count).tolist():
                edges.append((key, keys[i]))
        first_with[payload] = key
        if nd < max_compare:
            if mat is None:
                mat = np.empty((max_compare, len(x)), dtype=np.uint8)
            mat[nd] = x
            keys.append(key)
            nd += 1
    return edges


@beam.typehints.with_output_types(tuple[str, str])
class LinkEdgesFn(LinkBucketFn):
    """Strict mode's linking: (bucket, [(key, payload)]) → the bucket's edges as normalised
    ``(larger key, smaller key)`` pairs, ready for ``ConnectedComponents(normalized=True)``, and
    ``(rule, edges found)`` per bucket with edges as the ``counts`` output (the report's per-rule
    candidate-edge counts, repeats across bands included, as ``LinkBucketFn`` + counting gave).

    The same pair found in several LSH bands is sent on once while it is in a bounded set of recently
    sent pairs (``SEEN_LIMIT``, cleared when full): the components depend on the set of edges only,
    so repeats are pure cost (a near-duplicate pair collides in most of the 14 bands)."""

    COUNTS = "counts"
    SEEN_LIMIT = 200_000

    def setup(self):
        super().setup()
        self.seen: set[tuple[str, str]] = set()
        self.min_count = None
        if self.rule == reasons.NEAR_CAPTION and self.cfg.verify_min_jaccard is not None:
            self.min_count = {}

    def _edges(self, members):
        if self.similar is None:
            first = None
            for key, _ in members:
                if first is None:
                    first = key
                elif key != first:
                    yield key, first
            return
        members = list(members)
        if len(members) < 2:
            return
        if len(members) > self.cfg.max_compare:
            self.big.inc()
        if self.min_count is not None:
            width = len(members[0][1])
            mc = self.min_count.get(width)
            if mc is None:
                mc = self.min_count[width] = min_matching_slots(width, self.cfg.verify_min_jaccard)
            yield from link_sketch_bucket(members, mc, self.cfg.max_compare)
        else:
            yield from link_bucket(members, self.similar, self.cfg.max_compare)

    def process(self, element):
        _, members = element
        seen = self.seen
        n = 0
        for a, b in self._edges(members):
            n += 1
            e = (a, b) if a > b else (b, a)
            if e in seen:
                continue
            if len(seen) >= self.SEEN_LIMIT:
                seen.clear()
            seen.add(e)
            yield e
        if n:
            self.edges.inc(n)
            yield beam.pvalue.TaggedOutput(self.COUNTS, (self.rule, n))


def _caption_rules_apply(f: Features, mode: str) -> bool:
    """Strict mode links captions only between records without an image (the metadata pass)."""
    return mode == LEGACY or not f.has_image


def _exact_key(rule: str, mode: str):
    if rule == reasons.EXACT_CAPTION:
        return lambda f: [(f.caption_digest, (f.key, None))] if f.caption_digest and _caption_rules_apply(f, mode) else []
    return lambda f: [(f.image_sha256, (f.key, None))] if f.image_sha256 else []


# --- bucket blocks: a batch's bucket entries cross the shuffle as a few byte blocks -------------------
# One (bucket, (key, payload)) element per record and LSH band (14 per caption by default) was most of
# the stage's shuffled elements. A batch of features instead becomes one block per bucket partition:
# the bucket ids as uint64 columns, record indices, the records' keys and payloads (b-bit sketches).
# The linking step regroups a partition's entries into exactly the buckets the per-entry GroupByKey made
# (same members), so the edges, the components and every output byte are unchanged.

_BLOCK_ID = np.dtype("<u8")
_BLOCK_REC = np.dtype("<u4")


def bucket_partitions(records: int | None, entries_per_record: int) -> int:
    """Bucket partitions for ``records`` input records with ``entries_per_record`` bucket entries each:
    one per ``BUCKET_ENTRIES_PER_PARTITION`` entries (a linking step holds one partition), at least 1;
    ``DEFAULT_BUCKET_PARTITIONS`` when the record count is unknown."""
    if records is None:
        return DEFAULT_BUCKET_PARTITIONS
    return max(1, -(-records * max(1, entries_per_record) // BUCKET_ENTRIES_PER_PARTITION))


BUCKET_ENTRIES_PER_PARTITION = 2_000_000
DEFAULT_BUCKET_PARTITIONS = 16


def _block(keys: list[str], ids: np.ndarray, recs: np.ndarray, payload: np.ndarray | None) -> tuple:
    """(keys, bucket ids (n×k uint64, little-endian bytes), k, record indices into keys, payload rows)."""
    return (tuple(keys), ids.astype(_BLOCK_ID, copy=False).tobytes(), ids.shape[1],
            recs.astype(_BLOCK_REC, copy=False).tobytes(), b"" if payload is None else payload.tobytes())


def _blocks_by_partition(keys: list[str], ids: np.ndarray, recs: np.ndarray, payload: np.ndarray | None,
                         partitions: int):
    """Split one batch's entries (bucket ids ``ids``, record ``recs``) into ``(partition, block)``;
    an entry's partition is its last id column modulo ``partitions``."""
    if len(recs) == 0:
        return
    part = (ids[:, -1] % np.uint64(partitions)).astype(np.int64)
    for p in np.unique(part).tolist():
        sel = np.flatnonzero(part == p)
        used, local = np.unique(recs[sel], return_inverse=True)
        yield p, _block([keys[i] for i in used.tolist()], ids[sel], local, None if payload is None else payload[used])


def _partition_runs(blocks: Iterable[tuple]):
    """A partition's blocks as (keys, record index per entry sorted by bucket id, start and end of
    every bucket with at least two entries, payload matrix or None); None when there are no entries."""
    keys: list[str] = []
    ids, recs, pays = [], [], []
    width = 0
    for bkeys, bids, bk, brecs, bpay in blocks:
        if not bkeys:
            continue
        width = len(bpay) // len(bkeys)
        recs.append(np.frombuffer(brecs, dtype=_BLOCK_REC).astype(np.int64) + len(keys))
        ids.append(np.frombuffer(bids, dtype=_BLOCK_ID).reshape(-1, bk))
        pays.append(bpay)
        keys.extend(bkeys)
    if not keys:
        return None
    ids_a = np.concatenate(ids)
    recs_a = np.concatenate(recs)
    del ids, recs
    order = np.lexsort(ids_a.T[::-1])
    ids_a = ids_a[order]
    recs_a = recs_a[order]
    change = np.flatnonzero(np.any(ids_a[1:] != ids_a[:-1], axis=1)) + 1
    del ids_a, order
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [len(recs_a)]))
    multi = ends - starts >= 2
    mat = np.frombuffer(b"".join(pays), dtype=np.uint8).reshape(len(keys), width) if width else None
    return keys, recs_a, starts[multi], ends[multi], mat


def buckets_of_blocks(blocks: Iterable[tuple]) -> Iterator[list[tuple[str, bytes | None]]]:
    """The buckets with at least two entries in a partition's blocks, each as ``[(key, payload)]``
    (payload None when the blocks carry none), in bucket-id order."""
    runs = _partition_runs(blocks)
    if runs is None:
        return
    keys, recs_a, starts, ends, mat = runs
    for s, e in zip(starts.tolist(), ends.tolist()):
        rs = recs_a[s:e].tolist()
        if mat is None:
            yield [(keys[r], None) for r in rs]
        else:
            yield [(keys[r], mat[r].tobytes()) for r in rs]


def row_ids(mat: np.ndarray) -> np.ndarray:
    """One id per row of a 2-D uint8 matrix, equal exactly for equal rows (``np.unique(axis=0)``'s inverse
    up to numbering): rows hashed to 64 bits and grouped by hash, checked byte for byte (a collision
    falls back to ``np.unique(axis=0)``, which sorts the rows as bytes and is 10x slower)."""
    n, w = mat.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pad = (-w) % 8
    words = np.ascontiguousarray(np.pad(mat, ((0, 0), (0, pad))) if pad else mat).view("<u8")
    h = np.zeros(n, dtype=np.uint64)
    for c in range(words.shape[1]):
        h ^= words[:, c]
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    if np.array_equal(mat, mat[first[inv]]):
        return inv
    return np.unique(mat, axis=0, return_inverse=True)[1].reshape(-1)


LINK_CHUNK_PAIRS = 1 << 18  # sketch comparisons per numpy call in link_sketch_blocks (~100 MB of temporaries)


def link_sketch_blocks(blocks: Iterable[tuple], min_count: int, max_compare: int,
                       chunk_pairs: int = LINK_CHUNK_PAIRS) -> Iterator[tuple[list[tuple[str, str]], int, int]]:
    """Every bucket of a partition's blocks linked as ``link_sketch_bucket`` links it, all buckets at once:
    yields ``(edges, found, big)`` chunks — ``edges`` the distinct normalised ``(larger, smaller)`` key
    pairs of the chunk, ``found`` how many edges ``link_sketch_bucket`` returns for the chunk's buckets
    (repeats included), ``big`` its buckets with more than ``max_compare`` entries.

    Buckets whose keys are distinct (nearly all) are linked in numpy: a member whose sketch an earlier
    member (key order) holds links to the first holder only; the first holders, at distinct position d,
    are compared with those at positions 0 … min(d, max_compare) − 1, as ``link_sketch_bucket`` does.
    Buckets holding a key twice go through ``link_sketch_bucket`` itself."""
    runs = _partition_runs(blocks)
    if runs is None:
        return
    keys, recs, starts, ends, mat = runs
    if len(starts) == 0:
        return
    uniq, (krank,) = key_ids(keys)
    pid = row_ids(mat)  # equal sketches, equal ids (only grouping by it matters below)
    lens = ends - starts
    big = int(np.count_nonzero(lens > max_compare))
    first = np.concatenate(([0], np.cumsum(lens)[:-1]))
    run_of = np.repeat(np.arange(len(starts)), lens)
    ent = recs[np.repeat(starts - first, lens) + np.arange(int(lens.sum()))]  # records of the buckets, bucket by bucket
    # members of every bucket in key order
    order = np.lexsort((krank[ent], run_of))
    ent = ent[order]
    same_run = run_of[1:] == run_of[:-1]
    complex_run = np.zeros(len(starts), dtype=bool)  # a key twice in one bucket: link_sketch_bucket itself
    complex_run[run_of[1:][same_run & (krank[ent][1:] == krank[ent][:-1])]] = True
    all_ent, all_first = ent, first
    pos = np.arange(len(ent)) - first[run_of]
    # A repeated sketch links to the first member (key order) holding it and is compared with nothing; only
    # first holders are compared, the one at distinct position d with those at distinct positions
    # < min(d, max_compare) — link_sketch_bucket's rules.
    pe = pid[ent]
    o = np.lexsort((pos, pe, run_of))
    head = np.ones(len(o), dtype=bool)
    head[1:] = (run_of[o][1:] != run_of[o][:-1]) | (pe[o][1:] != pe[o][:-1])
    first_pos = np.empty_like(pos)
    first_pos[o] = pos[o][head][np.cumsum(head) - 1]
    simple = ~complex_run[run_of]
    repeat = simple & (first_pos != pos)
    rep_a, rep_b = ent[repeat], ent[first[run_of[repeat]] + first_pos[repeat]]
    keep = simple & ~repeat
    ent, run_of = ent[keep], run_of[keep]
    first = np.concatenate(([0], np.cumsum(np.bincount(run_of, minlength=len(starts)))[:-1]))
    pos = np.arange(len(ent)) - first[run_of]
    cnt = np.minimum(pos, max_compare)
    cum = np.cumsum(cnt)
    done = 0
    lo_e = 0
    total = int(cum[-1]) if len(cum) else 0
    while done < total:
        hi_e = int(np.searchsorted(cum, done + max(chunk_pairs, max_compare), side="right"))
        hi_e = max(hi_e, lo_e + 1)
        c = cnt[lo_e:hi_e]
        n = int(c.sum())
        jj = np.repeat(np.arange(lo_e, hi_e), c)
        step = np.arange(n) - np.repeat(np.cumsum(c) - c, c)
        ii = first[run_of[jj]] + step
        a, b = ent[ii], ent[jj]
        hit = np.count_nonzero(mat[a] == mat[b], axis=1) >= min_count
        a, b = krank[a[hit]], krank[b[hit]]
        codes = np.unique(np.maximum(a, b) * len(uniq) + np.minimum(a, b))
        hi_k, lo_k = np.divmod(codes, len(uniq))
        yield list(zip(uniq[hi_k].tolist(), uniq[lo_k].tolist())), int(hit.sum()), 0
        done += n
        lo_e = hi_e
    if len(rep_a):
        a, b = krank[rep_a], krank[rep_b]
        codes = np.unique(np.maximum(a, b) * len(uniq) + np.minimum(a, b))
        hi_k, lo_k = np.divmod(codes, len(uniq))
        yield list(zip(uniq[hi_k].tolist(), uniq[lo_k].tolist())), len(rep_a), 0
    for r in np.flatnonzero(complex_run).tolist():
        rs = all_ent[all_first[r]: all_first[r] + lens[r]].tolist()
        edges = link_sketch_bucket([(keys[x], mat[x].tobytes()) for x in rs], min_count, max_compare)
        yield sorted({(a, b) if a > b else (b, a) for a, b in edges}), len(edges), 0
    if big:
        yield [], 0, big


class BucketBlocksFn(beam.DoFn):
    """Batch of Features → ``(partition, block)`` of its bucket entries for one caption rule:
    ``exact-caption`` (bucket = normalised-caption digest) or ``near-caption`` (bucket = (LSH band,
    band digest), payload = the b-bit sketch when ``verify_min_jaccard`` is set). Same records as the
    per-entry keys of ``CandidateEdges`` (strict mode: records without an image only)."""

    def __init__(self, rule: str, cfg: DedupConfig, partitions: int):
        self.rule = rule
        self.cfg = cfg
        self.partitions = partitions

    def setup(self):
        self.blocks = Metrics.counter("mmcorpus.dedup", f"bucket_blocks_{self.rule}")
        self.entries = Metrics.counter("mmcorpus.dedup", f"bucket_entries_{self.rule}")

    def process(self, batch: list[Features]):
        cfg = self.cfg
        mode = cfg.mode
        if self.rule == reasons.EXACT_CAPTION:
            fs = [f for f in batch if f.caption_digest and _caption_rules_apply(f, mode)]
            if not fs:
                return
            ids = np.frombuffer(b"".join(bytes.fromhex(f.caption_digest) for f in fs), dtype=">u8").reshape(-1, 2)
            recs = np.arange(len(fs), dtype=np.int64)
            payload = None
        else:
            fs = [f for f in batch if f.signature is not None and _caption_rules_apply(f, mode)]
            if not fs:
                return
            bands, rows = cfg.lsh_params()
            sigs = np.frombuffer(b"".join(f.signature for f in fs), dtype="<u4").reshape(len(fs), -1)
            digests = mh.band_digests(sigs, bands, rows)
            band = np.broadcast_to(np.arange(bands, dtype=np.uint64), digests.shape)
            ids = np.stack((band.ravel(), digests.ravel()), axis=1)
            recs = np.repeat(np.arange(len(fs), dtype=np.int64), bands)
            payload = (sigs & np.uint32(0xFF)).astype(np.uint8) if cfg.verify_min_jaccard is not None else None
        keys = [f.key for f in fs]
        self.entries.inc(len(recs))
        for p, block in _blocks_by_partition(keys, ids.astype(np.uint64), recs, payload, self.partitions):
            self.blocks.inc()
            yield p, block


class _LinkBlocks:
    """Mixin for a bucket-linking DoFn: ``(partition, blocks)`` → its parent's ``process`` on every
    bucket with at least two entries (a one-entry bucket links nothing)."""

    def process(self, element):
        _, blocks = element
        for members in buckets_of_blocks(blocks):
            yield from super().process((None, members))


@beam.typehints.with_output_types(Any)
class LinkEdgeBlocksFn(_LinkBlocks, LinkEdgesFn):
    """``LinkEdgesFn`` over a partition's bucket blocks (strict mode), emitting edge blocks
    ``(larger keys, smaller keys)`` for ``BlockConnectedComponents`` and ``(rule, n)`` once per
    partition. With b-bit verification every bucket of the partition is linked in numpy
    (``link_sketch_blocks``: the same edges, each distinct edge of a chunk once)."""

    def process(self, element):
        total = 0
        if self.min_count is None:
            edges = set()
            for x in super().process(element):
                if isinstance(x, beam.pvalue.TaggedOutput):
                    total += x.value[1]
                else:
                    edges.add(x)
            if edges:
                edges = sorted(edges)
                yield tuple(e[0] for e in edges), tuple(e[1] for e in edges)
        else:
            _, blocks = element
            blocks = list(blocks)
            width = next((len(b[4]) // len(b[0]) for b in blocks if b[0]), 0)
            if not width:
                return
            mc = self.min_count.get(width)
            if mc is None:
                mc = self.min_count[width] = min_matching_slots(width, self.cfg.verify_min_jaccard)
            for edges, found, big in link_sketch_blocks(blocks, mc, self.cfg.max_compare):
                total += found
                if big:
                    self.big.inc(big)
                if edges:
                    yield tuple(e[0] for e in edges), tuple(e[1] for e in edges)
            if total:
                self.edges.inc(total)
        if total:
            yield beam.pvalue.TaggedOutput(self.COUNTS, (self.rule, total))


def _edge_block(edges: list[tuple[str, str]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(e[0] for e in edges), tuple(e[1] for e in edges)


class LinkBucketBlocksFn(_LinkBlocks, LinkBucketFn):
    """``LinkBucketFn`` over a partition's bucket blocks (legacy mode)."""


class CandidateEdges(beam.PTransform):
    """Features → ``(key, other_key, rule)`` edges of every enabled rule (strict mode: caption
    rules only between records without an image).

    Args:
        cfg: the dedup config.
        compact: return ``(edges, counts)`` instead: normalised ``(larger, smaller)`` key pairs
            (repeats mostly dropped, see ``LinkEdgesFn``) and ``(rule, n)`` candidate-edge counts.
        rules: (with ``compact`` and ``partitions``) return ``(edges, counts, rule_blocks)``, where
            ``rule_blocks`` holds ``(rule bit, edge block)`` for every edge block (legacy mode's
            per-key rule bits, ``RuleBitsOfBlocks``).
        partitions: when set, the caption rules' bucket entries cross their shuffle as byte blocks,
            one per batch of features and bucket partition (``BucketBlocksFn``), instead of one
            element per record and band; a linking step holds one partition's entries
            (``bucket_partitions`` picks the count from the record count). Same edges. With
            ``compact`` the edges then come out as edge blocks ``(larger keys, smaller keys)`` for
            ``BlockConnectedComponents``.
        batched: (needs ``partitions``) the input holds lists of Features (``ExtractFeatureBatchesFn``),
            not one element per record: the bucket blocks are made per input list, the image rules' keys
            per record of it. Same edges.

    Example:
        edges = features | CandidateEdges(DedupConfig())
    """

    def __init__(self, cfg: DedupConfig, compact: bool = False, partitions: int | None = None, rules: bool = False,
                 batched: bool = False):
        super().__init__()
        if partitions is not None and partitions < 1:
            raise ValueError("partitions must be >= 1 or None")
        if rules and not (compact and partitions is not None):
            raise ValueError("rules needs compact=True and partitions")
        if batched and partitions is None:
            raise ValueError("batched needs partitions")
        self.cfg = cfg
        self.compact = compact
        self.partitions = partitions
        self.rules = rules
        self.batched = batched

    def _per_record(self, fn):
        """``fn`` (Features → iterable) over this transform's input elements (a record, or a list of them)."""
        if not self.batched:
            return fn
        return lambda batch: [x for f in batch for x in fn(f)]

    def _link(self, rule, blocks: bool = False):
        if not self.compact:
            return beam.ParDo((LinkBucketBlocksFn if blocks else LinkBucketFn)(rule, self.cfg))
        fn = (LinkEdgeBlocksFn if blocks else LinkEdgesFn)(rule, self.cfg)
        return beam.ParDo(fn).with_outputs(LinkEdgesFn.COUNTS, main="edges")

    def _blocks(self, batches, rule):
        return (
            batches
            | f"Blocks_{rule}" >> beam.ParDo(BucketBlocksFn(rule, self.cfg, self.partitions))
            | f"Group_{rule}" >> beam.GroupByKey()
            | f"Link_{rule}" >> self._link(rule, blocks=True)
        )

    def expand(self, features):
        cfg = self.cfg
        parts = []
        block_parts: set[int] = set()  # parts whose edges come out as edge blocks already
        batches = None
        if self.batched:
            batches = features
        elif self.partitions is not None and (cfg.exact_caption or cfg.near_caption_threshold is not None):
            batches = features | "BatchForBuckets" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        part_rules: list[str] = []  # the rule of each part
        for rule, on in ((reasons.EXACT_CAPTION, cfg.exact_caption), (reasons.EXACT_IMAGE, cfg.exact_image)):
            if on:
                part_rules.append(rule)
            if on and batches is not None and rule == reasons.EXACT_CAPTION:
                block_parts.add(len(parts))
                parts.append(self._blocks(batches, rule))
            elif on:
                parts.append(
                    features
                    | f"Key_{rule}" >> beam.FlatMap(self._per_record(_exact_key(rule, cfg.mode)))
                    | f"Group_{rule}" >> beam.GroupByKey()
                    | f"Link_{rule}" >> self._link(rule)
                )
        if cfg.near_caption_threshold is not None:
            part_rules.append(reasons.NEAR_CAPTION)
        if cfg.near_image_max_hamming is not None:
            part_rules.append(reasons.NEAR_IMAGE)
        if cfg.near_caption_threshold is not None and batches is not None:
            block_parts.add(len(parts))
            parts.append(self._blocks(batches, reasons.NEAR_CAPTION))
        elif cfg.near_caption_threshold is not None:
            bands, rows = cfg.lsh_params()
            carry = cfg.verify_min_jaccard is not None

            mode = cfg.mode

            def bucket_near_caption(f: Features):
                if f.signature is None or not _caption_rules_apply(f, mode):
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
                | "Link_near-caption" >> self._link(rule)
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
                | "Bands_near-image" >> beam.FlatMap(self._per_record(bucket_near_image))
                | "Group_near-image" >> beam.GroupByKey()
                | "Link_near-image" >> self._link(rule)
            )
        if not self.compact:
            if not parts:
                return features.pipeline | "NoEdges" >> beam.Create([])
            return parts | "FlattenEdges" >> beam.Flatten()
        if not parts:
            none = (features.pipeline | "NoEdges" >> beam.Create([]), features.pipeline | "NoCounts" >> beam.Create([]))
            return none + (features.pipeline | "NoRuleBlocks" >> beam.Create([]),) if self.rules else none
        if self.partitions is not None:  # edge blocks for BlockConnectedComponents
            blocks = []
            for i, part in enumerate(parts):
                if i in block_parts:
                    blocks.append(part.edges)
                else:
                    blocks.append(
                        part.edges
                        | f"BatchEdges{i}" >> beam.BatchElements(min_batch_size=64, max_batch_size=65536)
                        | f"EdgeBlocks{i}" >> beam.Map(_edge_block)
                    )
            edges = blocks | "FlattenEdges" >> beam.Flatten()
            counts = [part[LinkEdgesFn.COUNTS] for part in parts] | "FlattenCounts" >> beam.Flatten()
            if not self.rules:
                return edges, counts
            rule_blocks = [
                blk | f"RuleBit{i}" >> beam.Map(lambda b, bit=RULE_BITS[rule]: (bit, b))
                for i, (blk, rule) in enumerate(zip(blocks, part_rules))
            ] | "FlattenRuleBlocks" >> beam.Flatten()
            return edges, counts, rule_blocks
        edges = [part.edges for part in parts] | "FlattenEdges" >> beam.Flatten()
        counts = [part[LinkEdgesFn.COUNTS] for part in parts] | "FlattenCounts" >> beam.Flatten()
        return edges, counts


class _SpreadRuleBitsFn(beam.DoFn):
    """``(rule bit, edge block)`` → ``(key partition, (rule bit, the block's distinct keys there))``."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def process(self, element):
        bit, (hi, lo) = element
        keys = set(hi)
        keys.update(lo)
        q = self.partitions
        by_part: dict[int, list[str]] = {}
        for k in keys:
            by_part.setdefault(zlib.crc32(k.encode("utf-8")) % q if q > 1 else 0, []).append(k)
        for part, ks in by_part.items():
            yield part, (bit, tuple(ks))


def _rule_bits(items) -> dict[str, int]:
    """A key partition's ``(rule bit, keys)`` items → ``{key: OR of its bits}``."""
    bits: dict[str, int] = {}
    get = bits.get
    for bit, keys in items:
        for k in keys:
            bits[k] = get(k, 0) | bit
    return bits


def _or_rule_bits(element):
    """A key partition's ``(rule bit, keys)`` items → ``(key, OR of its bits)`` per key."""
    _, items = element
    yield from _rule_bits(items).items()


class RuleBitsOfBlocks(beam.PTransform):
    """``(rule bit, edge block)`` → ``(key, OR of the rule bits of every edge touching it)``: what a per-edge
    ``(key, bit)`` + ``CombinePerKey`` gives, with the keys crossing one shuffle a block per key partition.

    Args:
        partitions: key partitions of the shuffle (a step holds one partition's keys).
    """

    def __init__(self, partitions: int):
        super().__init__()
        self.partitions = partitions

    def expand(self, rule_blocks):
        return (
            rule_blocks
            | "Spread" >> beam.ParDo(_SpreadRuleBitsFn(self.partitions))
            | "Group" >> beam.GroupByKey()
            | "Or" >> beam.FlatMap(_or_rule_bits)
        )


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


def _key_partition(key: str, q: int) -> int:
    """A key's partition of ``q`` (crc32 of its UTF-8 bytes, as ``transforms.components``)."""
    return zlib.crc32(key.encode("utf-8")) % q if q > 1 else 0


class RankBlocksFn(beam.DoFn):
    """Legacy mode: batch of Features → ``(key partition, ((key, rank, caption digest, sha256), ...))`` per
    partition the batch touches (partition: crc32 of the key, as ``transforms.components``)."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def process(self, batch: list[Features]):
        q = self.partitions
        out: dict[int, list[tuple]] = {}
        for f in batch:
            part = zlib.crc32(f.key.encode("utf-8")) % q if q > 1 else 0
            out.setdefault(part, []).append((f.key, f.rank, f.caption_digest, f.image_sha256))
        for part, members in out.items():
            yield part, tuple(members)


def _ranks_by_root(element):
    """``_members_by_root`` for ``RankBlocksFn`` blocks, with the key partition's rule bits (``rules``:
    ``_SpreadRuleBitsFn`` items of the same key partitions) → ``(root, (rank, key, caption digest, sha256,
    OR of the rule bits of the edges touching the key))``. The bits meet the ranks here, in the partition
    that already holds the labels, instead of crossing a shuffle of their own and the decision join as one
    element per key."""
    _, groups = element
    bits = _rule_bits(groups["rules"])
    for root, (key, rank, digest, sha) in _members_by_root(element):
        yield root, (rank, key, digest, sha, bits.get(key, 0))


@beam.typehints.with_output_types(tuple[Any, Any])
class RankByRootFn(beam.DoFn):
    """Legacy mode, one key partition ``{labels, members (RankBlocksFn), rules (_SpreadRuleBitsFn), errors:
    [(key, error)]}`` → ``(root, (rank, key, caption digest, sha256, rule bits, error or None))`` for every
    member on an edge (``_ranks_by_root`` plus the key's first feature error, for a key read twice) and, on
    the ``decisions`` output, the error ``Decision`` of every failed key that is no such member. Every key
    thus gets its decision from exactly one step, without a decision join by key."""

    DECISIONS = "decisions"

    def setup(self):
        self.errors = Metrics.counter("mmcorpus.dedup", "errors")

    def process(self, element):
        _, groups = element
        errors: dict[str, str] = {}
        for key, error in groups["errors"]:
            errors.setdefault(key, error)
        get = errors.get
        members = set()
        for root, t in _ranks_by_root(element):
            if errors:
                members.add(t[1])
            yield root, t + (get(t[1]),)
        for key, error in errors.items():
            if key not in members:
                self.errors.inc()
                yield beam.pvalue.TaggedOutput(self.DECISIONS, _error_decision(key, error))


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


class _DecisionsFn(beam.DoFn):
    """Shared counters of the decision steps (per decided key). The writer counts every ledger row by
    status and reason (``mmcorpus.dedup/kept``, ``duplicate_<reason>``, ...), so these count only what
    it cannot tell: cluster representatives, and records whose features failed."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def setup(self):
        self.kept = Metrics.counter("mmcorpus.dedup", "kept_in_clusters")
        self.errors = Metrics.counter("mmcorpus.dedup", "errors")

    def _count(self, d: Decision) -> Decision:
        if d.status == KEPT:
            self.kept.inc()
        elif d.status == ERROR:
            self.errors.inc()
        return d


def _error_decision(key: str, error: str) -> Decision:
    return Decision(key, ERROR, error, "dedup features failed")


def _kept_in_cluster(key: str, cid: str, size: int) -> Decision:
    return Decision(key, KEPT, REASON_OK, extra={"cluster_id": cid, "kept_key": key},
                    updates={"cluster_id": cid, "cluster_size": size})


class LegacySummaryDecisionsFn(_DecisionsFn):
    """Legacy mode: ``(root, {members: RankByRootFn tuples, summary: [(best member, size)]})`` → the ``Decision``
    of every member from its own error, digest, sha256 and rule bits: error, kept representative (cluster
    fields set) or duplicate (``reason_for``)."""

    def process(self, element):
        root, groups = element
        (best, size), = list(groups["summary"])
        s = ClusterSummary(cluster_id_of(root), best[1], size, best[2], best[3])
        for _, key, digest, sha, bits, error in groups["members"]:
            if error is not None:
                yield self._count(_error_decision(key, error))
            elif s.kept_key == key:
                yield self._count(_kept_in_cluster(key, s.cluster_id, s.size))
            else:
                reason = reason_for(digest, sha, s, bits, self.cfg)
                detail = f"cluster of {s.size}, kept {s.kept_key}; linked by {','.join(rule_names(bits))}"
                yield self._count(Decision(key, DUPLICATE, reason, detail,
                                           extra={"cluster_id": s.cluster_id, "kept_key": s.kept_key}))


# A batch of records goes to the writer as encoded batches (stage_io.encode_batch) of at most this many
# records, closed earlier once they hold this many bytes of image + caption (a bounded element).
KEPT_BATCH_RECORDS = 1024
KEPT_BATCH_BYTES = 16 * 1024 * 1024


def _kept_batches(pairs: list[Pair]):
    """A batch of pairs → ``encode_batch`` lists of their ``Outcome.kept`` (bounded by records and bytes)."""
    batch, size = [], 0
    for p in pairs:
        batch.append(Outcome.kept(p))
        size += len(p.image or b"") + len(p.caption or "")
        if len(batch) >= KEPT_BATCH_RECORDS or size >= KEPT_BATCH_BYTES:
            yield encode_batch(batch)
            batch, size = [], 0
    if batch:
        yield encode_batch(batch)


def _apply_decisions(element):
    """key ⋈ (pairs, decision) → one ``Outcome`` per pair (``decided_outcome``)."""
    _, groups = element
    decisions = list(groups["decision"])
    if len(decisions) > 1:
        raise ValueError(f"two decisions for key {decisions[0].key!r}")
    d = decisions[0] if decisions else None
    for pair in groups["pairs"]:
        yield decided_outcome(pair, d)


# --- strict mode -------------------------------------------------------------------------------

OVERUSED_LINK = "caption-overused"


class Assignment(NamedTuple):
    """Where one clustered record ended: ``kept_key`` is its representative (itself for a
    representative, whose ``size`` counts it and its duplicates); ``rule``/``metric``/``value``
    say how it is tied to the representative; ``round`` is the representative round (0-based;
    ``max_split_rounds`` for a member left unassigned and kept as its own representative); ``override``
    is the record's decision when it is not the assignment's (``_override``: its feature error or caption
    overuse, for a key read twice)."""

    key: str
    kept_key: str
    rule: str | None
    metric: str | None
    value: float | int | None
    round: int
    size: int = 0
    override: tuple | None = None


class Overuse(NamedTuple):
    first_key: str
    pairs: int
    limit: int


def member_of(f: Features) -> Member:
    sketch = None
    if f.signature is not None and not f.has_image:
        sketch = mh.bbit_sketch(mh.sig_from_bytes(f.signature))
    return Member(f.key, f.rank, f.image_sha256, f.dhash, f.caption_digest, sketch)


def link_to_representative(m: Member, rep: Member, cfg: DedupConfig) -> tuple[str, str, float | int] | None:
    """``(rule, metric, value)`` when ``m`` is within the threshold of ``rep``, else None.

    Images: the same sha256 (``exact-image``, Hamming 0) or dHash Hamming distance at most
    ``max_hamming_to_kept`` (``near-image``). Captions (records without an image): the same
    normalised caption (``exact-caption``, Jaccard 1) or a Jaccard estimated from the two b-bit
    sketches of at least ``min_jaccard_to_kept`` (``near-caption``). Only enabled rules count.
    """
    if m.rank[0] == 0:  # a record with an image
        if cfg.exact_image and m.image_sha256 is not None and m.image_sha256 == rep.image_sha256:
            return reasons.EXACT_IMAGE, "hamming", 0
        if cfg.near_image_max_hamming is not None and m.dhash is not None and rep.dhash is not None:
            d = ph.hamming(m.dhash, rep.dhash)
            if d <= cfg.max_hamming_to_kept:
                return reasons.NEAR_IMAGE, "hamming", d
        return None
    if cfg.exact_caption and m.caption_digest is not None and m.caption_digest == rep.caption_digest:
        return reasons.EXACT_CAPTION, "jaccard", 1.0
    if cfg.near_caption_threshold is not None and m.sketch is not None and rep.sketch is not None:
        j = mh.bbit_jaccard(m.sketch, rep.sketch)
        if j >= cfg.min_jaccard_to_kept:
            return reasons.NEAR_CAPTION, "jaccard", round(j, 3)
    return None


def format_detail(a: Assignment) -> str:
    """Ledger detail of a removed record, ``key=value`` separated by spaces (``parse_detail``)."""
    return f"link={a.rule} {a.metric}={a.value} kept={a.kept_key} round={a.round}"


def parse_detail(detail: str) -> dict[str, str]:
    """Read a strict-mode dedup ledger detail back: ``{"link": "near-image", "hamming": "3", ...}``.

    Example:
        >>> parse_detail("link=near-caption jaccard=0.81 kept=k1 round=0")["jaccard"]
        '0.81'
    """
    return dict(part.split("=", 1) for part in detail.split() if "=" in part)


class _FirstKeysFn(beam.CombineFn):
    """Per caption digest: (records carrying it, its ``k`` smallest keys). Bounded by ``k``."""

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return (0, [])

    def add_input(self, acc, key):
        n, keys = acc
        return (n + 1, heapq.nsmallest(self.k, [*keys, key]))

    def merge_accumulators(self, accs):
        n, keys = 0, []
        for c, ks in accs:
            n += c
            keys = heapq.nsmallest(self.k, [*keys, *ks])
        return (n, keys)

    def extract_output(self, acc):
        return acc


class CapCaptionFn(beam.DoFn):
    """(digest, {first: [(n, K smallest keys)], members: features}) → features of the first K
    records by key order (main) and ``(key, Overuse)`` for the rest. Streams the members."""

    OVERUSED = "overused"

    def __init__(self, limit: int):
        self.limit = limit

    def setup(self):
        self.overused = Metrics.counter("mmcorpus.dedup", f"duplicate_{reasons.CAPTION_OVERUSED}")

    def process(self, element):
        _, groups = element
        n, first = next(iter(groups["first"]))
        allowed = frozenset(first)
        for f in groups["members"]:
            if n <= self.limit or f.key in allowed:
                yield f
            else:
                self.overused.inc()
                yield beam.pvalue.TaggedOutput(self.OVERUSED, (f.key, Overuse(min(first), n, self.limit)))


def _capped(f: Features) -> bool:
    """Whether the caption cap (strict mode) counts this record: it has an image and a caption."""
    return f.has_image and f.caption_digest is not None


class CapCaptions(beam.PTransform):
    """Features → (features of records still in the pass, ``(key, Overuse)`` of removed records).

    Records with an image and a caption: at most ``limit`` records (the first by key order) may
    share one normalised caption. Other records pass through untouched.

    Args:
        limit: ``DedupConfig.max_pairs_per_caption``.
        only_capped: the input holds only records the cap counts (``_capped``): no filters, and the first
            output holds the capped records still in the pass only.
    """

    def __init__(self, limit: int, only_capped: bool = False):
        super().__init__()
        self.limit = limit
        self.only_capped = only_capped

    def expand(self, features):
        if self.only_capped:
            capped, rest = features, None
        else:
            capped = features | "ToCap" >> beam.Filter(_capped)
            rest = features | "NotCapped" >> beam.Filter(lambda f: not _capped(f))
        first = (
            capped
            | "DigestKey" >> beam.Map(lambda f: (f.caption_digest, f.key))
            | "FirstKeys" >> beam.CombinePerKey(_FirstKeysFn(self.limit))
        )
        res = (
            {"first": first, "members": capped | "ByDigest" >> beam.Map(lambda f: (f.caption_digest, f))}
            | "JoinFirst" >> beam.CoGroupByKey()
            | "Cap" >> beam.ParDo(CapCaptionFn(self.limit)).with_outputs(CapCaptionFn.OVERUSED, main="kept")
        )
        if rest is None:
            return res.kept, res[CapCaptionFn.OVERUSED]
        kept = (res.kept, rest) | "StillIn" >> beam.Flatten()
        return kept, res[CapCaptionFn.OVERUSED]


class _BestMemberFn(beam.CombineFn):
    """Per component: the member with the smallest keep rank."""

    def create_accumulator(self):
        return None

    def add_input(self, best, m):
        return m if best is None or m[1] < best[1] else best  # [1]: the rank of a Member or its plain tuple

    def merge_accumulators(self, accs):
        best = None
        for m in accs:
            if m is not None and (best is None or m[1] < best[1]):
                best = m
        return best

    def extract_output(self, best):
        return best


class AssignRoundFn(beam.DoFn):
    """(root, {best: [rep], members: [Member]}) → an ``Assignment`` for the representative and for
    every member within the threshold of it; ``(root, Member)`` of the others as ``rest``. Members may
    arrive as plain tuples of ``Member``'s fields (they cross the shuffles without pickling).

    Holds one representative and a counter; the members are streamed once."""

    REST = "rest"

    def __init__(self, cfg: DedupConfig, round_index: int):
        self.cfg = cfg
        self.round_index = round_index

    def setup(self):
        self.split = Metrics.counter("mmcorpus.dedup", "members_not_within_threshold")

    def process(self, element):
        root, groups = element
        best = next(iter(groups["best"]))
        rep = Member._make(best[:_MEMBER_FIELDS])
        size = 1
        for t in groups["members"]:
            if t[0] == rep.key:
                continue
            m = Member._make(t[:_MEMBER_FIELDS])
            link = link_to_representative(m, rep, self.cfg)
            if link is None:
                self.split.inc()
                yield beam.pvalue.TaggedOutput(self.REST, (root, t))
                continue
            size += 1
            yield Assignment(m.key, rep.key, *link, self.round_index, 0, _override_of(t))
        yield Assignment(rep.key, rep.key, None, None, None, self.round_index, size, _override_of(best))


class AssignRepresentatives(beam.PTransform):
    """``(root, Member)`` of connected components → one ``Assignment`` per member, every member
    within the threshold of its representative (see ``AssignRoundFn``), in ``rounds`` rounds
    unrolled into the pipeline; members left after the last round are their own representatives.

    Args:
        cfg: the dedup config (thresholds, ``max_split_rounds``).
    """

    def __init__(self, cfg: DedupConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, members):
        rounds = self.cfg.max_split_rounds
        assigned = []
        for r in range(rounds):
            best = members | f"S{r}Best" >> beam.CombinePerKey(_BestMemberFn())
            res = (
                {"best": best, "members": members}
                | f"S{r}Join" >> beam.CoGroupByKey()
                | f"S{r}Assign" >> beam.ParDo(AssignRoundFn(self.cfg, r)).with_outputs(AssignRoundFn.REST, main="assigned")
            )
            assigned.append(res.assigned)
            members = res[AssignRoundFn.REST]
        assigned.append(
            members | "LeftOver" >> beam.Map(
                lambda rm: Assignment(rm[1][0], rm[1][0], None, None, None, rounds, 1, _override_of(rm[1])))
        )
        return assigned | "AllAssigned" >> beam.Flatten()


class MemberBlocksFn(beam.DoFn):
    """Batch of Features → ``(key partition, (Member fields as plain tuples, ...))`` per partition the batch
    touches (partition: crc32 of the key, as ``transforms.components``); sketches computed for the batch at once."""

    def __init__(self, partitions: int):
        self.partitions = partitions

    def process(self, batch: list[Features]):
        sketched = [i for i, f in enumerate(batch) if f.signature is not None and not f.has_image]
        sketches: list[bytes | None] = [None] * len(batch)
        if sketched:
            sigs = np.frombuffer(b"".join(batch[i].signature for i in sketched), dtype="<u4").reshape(len(sketched), -1)
            rows = (sigs & np.uint32(0xFF)).astype(np.uint8)  # minhash.bbit_sketch of every row
            for i, row in zip(sketched, rows):
                sketches[i] = row.tobytes()
        q = self.partitions
        out: dict[int, list[tuple]] = {}
        for f, sk in zip(batch, sketches):
            part = zlib.crc32(f.key.encode("utf-8")) % q if q > 1 else 0
            out.setdefault(part, []).append((f.key, f.rank, f.image_sha256, f.dhash, f.caption_digest, sk))
        for part, members in out.items():
            yield part, tuple(members)


def _members_by_root(element):
    """A key partition's ``{labels: LabelBlocksFn blocks, members: MemberBlocksFn blocks}`` → ``(root, member
    tuple)`` for every member on an edge (the first one of a key read twice)."""
    _, groups = element
    labels = block_labels(groups["labels"])
    if not labels:
        return
    done = set()
    for block in groups["members"]:
        for t in block:
            root = labels.get(t[0])
            if root is not None and t[0] not in done:
                done.add(t[0])
                yield root, t


_MEMBER_FIELDS = len(Member._fields)


def _override_of(t: tuple) -> tuple | None:
    """The override a member tuple carries after ``Member``'s fields (``StrictMembersByRootFn``), or None."""
    return t[_MEMBER_FIELDS] if len(t) > _MEMBER_FIELDS else None


def _override_decision(key: str, override: tuple) -> Decision:
    """``("error", exception reason)`` or ``("overused", Overuse fields)`` → the record's Decision."""
    kind, value = override
    if kind == ERROR:
        return _error_decision(key, value)
    o = Overuse(*value)
    detail = f"link={OVERUSED_LINK} pairs={o.pairs} max={o.limit} kept={o.first_key}"
    return Decision(key, DUPLICATE, reasons.CAPTION_OVERUSED, detail, extra={"kept_key": o.first_key})


@beam.typehints.with_output_types(tuple[Any, Any])
class StrictMembersByRootFn(beam.DoFn):
    """Strict mode, one key partition ``{labels, members (MemberBlocksFn), errors: [(key, error)], overused:
    [(key, Overuse)]}`` → ``(root, member tuple + (override,))`` for every member on an edge (``_members_by_root``;
    override: its key's first feature error, else its first caption overuse, else None — a key read twice) and,
    on ``decisions``, the Decision of every failed or overused key that is no such member. With the override
    riding the member through the representative rounds, each key's decision comes from its ``Assignment``
    alone (``StrictAssignmentDecisionsFn``): no decision join by key."""

    DECISIONS = "decisions"

    def setup(self):
        self.errors = Metrics.counter("mmcorpus.dedup", "errors")

    def process(self, element):
        _, groups = element
        overrides: dict[str, tuple] = {}
        for key, error in groups["errors"]:
            if key not in overrides:
                overrides[key] = (ERROR, error)
        for key, o in groups["overused"]:
            if key not in overrides:
                overrides[key] = ("overused", tuple(o))
        get = overrides.get
        members = set()
        for root, t in _members_by_root(element):
            if overrides:
                members.add(t[0])
            yield root, t + (get(t[0]),)
        for key, override in overrides.items():
            if key not in members:
                if override[0] == ERROR:
                    self.errors.inc()
                yield beam.pvalue.TaggedOutput(self.DECISIONS, _override_decision(key, override))


class StrictAssignmentDecisionsFn(_DecisionsFn):
    """``Assignment`` → the record's ``Decision`` (strict mode): its override, a kept representative of a cluster
    or a duplicate; nothing for a record kept as it is (a component member every other member split away from)."""

    def process(self, a: Assignment):
        key = a.key
        if a.override is not None:
            yield self._count(_override_decision(key, a.override))
        elif a.kept_key == key and a.size <= 1:
            return
        elif a.kept_key == key:
            yield self._count(_kept_in_cluster(key, cluster_id_of(key), a.size))
        else:
            yield self._count(Decision(key, DUPLICATE, a.rule, format_detail(a),
                                       extra={"cluster_id": cluster_id_of(a.kept_key), "kept_key": a.kept_key}))


class _SumByKeyFn(beam.CombineFn):
    """``(key, n)`` elements (or what ``pair_of`` makes of each element) → ``{key: sum of n}``: one global combine
    whose accumulator is bounded by the distinct keys (rules, representative rounds), instead of a per-key
    combine and a ``ToDict`` (twice the transforms, and a map per element before it)."""

    def __init__(self, pair_of=None):
        self.pair_of = pair_of

    def create_accumulator(self):
        return {}

    def add_input(self, acc, item):
        k, n = self.pair_of(item) if self.pair_of is not None else item
        acc[k] = acc.get(k, 0) + n
        return acc

    def merge_accumulators(self, accs):
        out: dict = {}
        for acc in accs:
            for k, n in acc.items():
                out[k] = out.get(k, 0) + n
        return out

    def extract_output(self, acc):
        return acc


class Deduplicate(beam.PTransform):
    """Pairs → one ``Outcome`` per pair (kept representatives and ``duplicate`` rows) plus a report.

    Args:
        cfg: the ``DedupConfig`` (its ``mode`` picks strict or legacy-transitive clustering).
        records: the input's record count (from its manifest), which sizes the bucket and components
            partitions (``bucket_partitions``); None: ``DEFAULT_BUCKET_PARTITIONS``. Changes no output.

        decisions: return ``(records, decisions, report)`` for ``WriteStageOutput(decisions=...)``
            instead of joining them here: ``records`` holds ``Outcome.kept(pair)`` of every pair (in
            ``encode_batch`` batches),
            ``decisions`` one ``Decision`` per record whose outcome differs (errors, duplicates, kept
            representatives of clusters); the writer applies them per shard. Same output bytes, one
            whole-record shuffle (the writer's) instead of two.

    Returns ``(outcomes, report)`` where ``report`` is a single-value PCollection (dict with the
    mode, the LSH parameters, edges per rule, the connected-components rounds and, in strict
    mode, the representative rounds and the caption cap) for ``manifest.extra``.

    Example:
        outcomes, report = pairs | Deduplicate(DedupConfig(near_image_max_hamming=None))
    """

    def __init__(self, cfg: DedupConfig, records: int | None = None, decisions: bool = False):
        super().__init__()
        self.cfg = cfg
        self.decisions = decisions
        bands, _ = cfg.lsh_params()
        self.partitions = bucket_partitions(records, bands + 1)

    def expand(self, pairs):
        cfg = self.cfg
        batches = pairs | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        if cfg.mode == LEGACY:
            # features stay in their batches (lists without errors): legacy's bucket and rank steps read batches
            res = batches | "ExtractFeatures" >> beam.ParDo(ExtractFeatureBatchesFn(cfg)).with_outputs(
                ExtractFeatureBatchesFn.ERRORS, main="ok"
            )
            decisions, edges, cc_report, extra = self._legacy(res.ok, res[ExtractFeatureBatchesFn.ERRORS])
        else:
            # features in their batches (lists without errors); records the caption cap counts leave one by one
            cap = cfg.max_pairs_per_caption is not None
            res = batches | "ExtractFeatures" >> beam.ParDo(ExtractStrictBatchesFn(cfg, cap)).with_outputs(
                ExtractStrictBatchesFn.ERRORS, ExtractStrictBatchesFn.CAPPED, main="ok"
            )
            decisions, edges, cc_report, extra = self._strict(
                pairs, res.ok, res[ExtractStrictBatchesFn.CAPPED] if cap else None, res[ExtractStrictBatchesFn.ERRORS]
            )
        bands, rows = cfg.lsh_params()
        # ``edges``: the (rule, n) counts of CandidateEdges(compact=True)
        edge_counts = edges | "EdgeCountsDict" >> beam.CombineGlobally(_SumByKeyFn())
        mode = cfg.mode

        def report_of(cc, counts, extra):
            out = {
                "mode": mode,
                "lsh_bands": bands,
                "lsh_rows": rows,
                "candidate_edges": dict(sorted(counts.items())),
                "components": cc,
            }
            out.update(extra)
            return out

        report = cc_report | "Report" >> beam.Map(
            report_of, counts=beam.pvalue.AsSingleton(edge_counts), extra=beam.pvalue.AsSingleton(extra)
        )
        if self.decisions:
            return batches | "Records" >> beam.FlatMap(_kept_batches), decisions, report
        outcomes = (
            {
                "pairs": pairs | "PairsByKey" >> beam.Map(lambda p: (p.key, p)),
                "decision": decisions | "DecisionByKey" >> beam.Map(lambda d: (d.key, d)),
            }
            | "JoinAll" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(_apply_decisions)
        )
        return outcomes, report

    def _legacy(self, ok_batches, errors):
        cfg = self.cfg
        # Edges as blocks (each rule's distinct normalised edges), the components on blocks, and every
        # clustered key's rule bits from the same blocks: the edge set, the labels and the bits are
        # those of the per-edge path (components and OR-ed bits depend on the set of edges only).
        edges, edge_counts, rule_blocks = ok_batches | "CandidateEdges" >> CandidateEdges(
            cfg, compact=True, partitions=self.partitions, rules=True, batched=True
        )
        q = self.partitions
        final, cc_report = edges | "Components" >> BlockConnectedComponents(cfg.max_rounds, q, label_blocks=True)
        # Ranks meet their component's labels and their rule bits (RuleBitsOfBlocks' items) per key partition,
        # as blocks (only what the decision needs: never the signature or the image); only records on an edge
        # come out.
        member_ranks = (
            {
                "labels": final | "LabelBlocks" >> beam.ParDo(LabelBlocksFn(q)),
                "members": ok_batches | "RankBlocks" >> beam.ParDo(RankBlocksFn(q)),
                "rules": rule_blocks | "RuleBits" >> beam.ParDo(_SpreadRuleBitsFn(q)),
                "errors": errors | "PartitionOfErrors" >> beam.Map(lambda ke, q=q: (_key_partition(ke[0], q), ke)),
            }
            | "JoinRank" >> beam.CoGroupByKey()
            | "RankByRoot" >> beam.ParDo(RankByRootFn()).with_outputs(RankByRootFn.DECISIONS, main="members")
        )
        summary = member_ranks.members | "BestPerCluster" >> beam.CombinePerKey(_BestAndCountFn())
        # each member's decision is made with its cluster's summary (no join by key after it: a failed key's
        # error travels with its member tuple, a failed key on no edge got its decision in RankByRoot)
        decisions = (
            (
                {"members": member_ranks.members, "summary": summary}
                | "JoinSummary" >> beam.CoGroupByKey()
                | "Decisions" >> beam.ParDo(LegacySummaryDecisionsFn(cfg)),
                member_ranks[RankByRootFn.DECISIONS],
            )
            | "AllDecisions" >> beam.Flatten()
        )
        extra = ok_batches.pipeline | "NoStrictReport" >> beam.Create([{}])
        return decisions, edge_counts, cc_report, extra

    def _strict(self, pairs, ok_batches, capped, errors):
        """``ok_batches``: lists of error-free Features the cap does not count; ``capped``: Features it counts, one
        by one (None without a cap)."""
        cfg = self.cfg
        if capped is not None:
            kept, overused = capped | "CapCaptions" >> CapCaptions(cfg.max_pairs_per_caption, only_capped=True)
            kept_batches = kept | "CappedBatches" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
            in_pass = (ok_batches, kept_batches) | "InPass" >> beam.Flatten()
        else:
            in_pass, overused = ok_batches, pairs.pipeline | "NoCap" >> beam.Create([])
        edges, edge_counts = in_pass | "CandidateEdges" >> CandidateEdges(
            cfg, compact=True, partitions=self.partitions, batched=True)
        q = self.partitions
        final, cc_report = edges | "Components" >> BlockConnectedComponents(cfg.max_rounds, q, label_blocks=True)
        # Members (a 128-byte sketch at most, no signature) meet their component's labels per key partition,
        # as blocks: only records on an edge come out, as (root, plain tuple of Member's fields).
        members = (
            {
                "labels": final | "LabelBlocks" >> beam.ParDo(LabelBlocksFn(q)),
                "members": in_pass | "MemberBlocks" >> beam.ParDo(MemberBlocksFn(q)),
                "errors": errors | "PartitionOfErrors" >> beam.Map(lambda ke, q=q: (_key_partition(ke[0], q), ke)),
                "overused": overused | "PartitionOfOverused" >> beam.Map(lambda ko, q=q: (_key_partition(ko[0], q), ko)),
            }
            | "JoinRoot" >> beam.CoGroupByKey()
            | "MemberByRoot" >> beam.ParDo(StrictMembersByRootFn()).with_outputs(StrictMembersByRootFn.DECISIONS,
                                                                                 main="members")
        )
        assigned = members.members | "Representatives" >> AssignRepresentatives(cfg)
        # each key's decision from its assignment (its override first) or, for a failed or overused key on no
        # edge, from MemberByRoot: no join by key
        decisions = (
            assigned | "Decisions" >> beam.ParDo(StrictAssignmentDecisionsFn(cfg)),
            members[StrictMembersByRootFn.DECISIONS],
        ) | "AllDecisions" >> beam.Flatten()
        rounds = cfg.max_split_rounds
        per_round = (
            assigned
            | "RoundsDict" >> beam.CombineGlobally(_SumByKeyFn(lambda a: (a.round, 1)))
        )
        n_overused = overused | "CountOverused" >> beam.combiners.Count.Globally()
        extra = per_round | "StrictReport" >> beam.Map(
            lambda counts, n: {
                "representative_rounds": {
                    "max_split_rounds": rounds,
                    "members_per_round": [counts.get(r, 0) for r in range(rounds)],
                    "kept_unassigned_after_last_round": counts.get(rounds, 0),
                },
                "caption_overused": n,
            },
            n=beam.pvalue.AsSingleton(n_overused),
        )
        return decisions, edge_counts, cc_report, extra

