"""Per-stage selection: draw a controlled mixture (sources × languages × text-rich share) by key hash.

How a record is decided, with no global sort:
    1. eligibility: the stage rule (stage 2: shorter side >= ``min_side`` unless ``allow_upscale``)
       and, for a disjoint re-selection, "not in the named earlier selection" (a join by key);
    2. every eligible record gets a cell ``(dataset, lang, text_rich)`` and a 64-bit hash of
       ``salt + key``; pass one counts records per (cell, top 16 hash bits) — a bounded histogram;
    3. the driver-free plan step turns those counts into per-cell targets (raking the pool to the
       configured marginals, largest-remainder rounding to the exact total) and per-cell thresholds:
       a record whose hash bucket is below the cut bucket is taken ``base + 1`` times, above it
       ``base`` times; only the records in the one cut bucket per cell (about n / 65536 of them) are
       grouped and ordered by hash to take exactly the remainder. ``base`` > 0 only when upsampling.
Counts are therefore exact, and the outcome of a record depends only on its hash and its cell's
counts: reruns are byte-identical on every runner.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA, FileEntry
from schemas.records import REJECTED, Outcome, Pair
from transforms.keys import safe_key
from transforms.tokens import QUERY_NUMS, StageProfile, TextTokenizer, image_token_count
from transforms.stage_io import ExpandRowGroupsFn, join, read_manifest, write_bytes_atomic

FILE_KIND_MIXTURE = "mixture"
MIXTURE_NAME = "mixture.json"
ON_SHORT = ("report", "upsample")
OVERLAP = ("disjoint", "allow")
BUCKET_BITS = 16
NO_DATASET = "(none)"  # records of an unnamed single input
NO_LANG = "und"  # records without a `lang` field (language ID not run)
RAKING_ROUNDS = 1000


@dataclass(frozen=True)
class SelectConfig:
    """One stage's selection (TOML ``[select]`` merged with ``[select.stageN]``).

    Args:
        stage: 1, 2 or 3 (MiniCPM-V's training stages).
        target_pairs: pairs to select (replicas included when upsampling).
        weights: ``{dataset: share}`` summing to 1; or ``quotas``: ``{dataset: pairs}`` (then
            ``target_pairs`` is their sum). Neither: datasets in proportion to their eligible pool.
        languages: ``{lang: share}`` summing to 1, a second mixing axis (records' ``lang`` field;
            records without one count as ``und``).
        text_rich_share: share of text-rich / OCR records (stage 3), None = no constraint.
        on_short: ``report`` (a cell short of its target gives what it has; the shortfall is in
            mixture.json) or ``upsample`` (whole replicas plus a hash-chosen remainder, marked
            ``replica`` = 1, 2, ... and counted).
        min_side: shorter image side required (None = no rule; stage 2 defaults to 448).
        allow_upscale: stage 2 takes smaller images too (the trainer upscales them).
        salt: hash salt; default ``stage{N}`` so each stage draws differently.
        earlier: a previous ``select`` output to re-select against; ``overlap`` ``disjoint``
            excludes its records, ``allow`` lets them be drawn again (overlap is measured either way).
    """

    stage: int
    target_pairs: int | None
    weights: tuple[tuple[str, float], ...] = ()
    quotas: tuple[tuple[str, int], ...] = ()
    languages: tuple[tuple[str, float], ...] = ()
    text_rich_share: float | None = None
    on_short: str = "report"
    min_side: int | None = None
    allow_upscale: bool = False
    salt: str = ""
    earlier: str | None = None
    overlap: str = "disjoint"
    target_tokens: int | None = None
    query_num: int = 96
    tokenizer: str | None = None

    def __post_init__(self):
        if (self.target_pairs is None) == (self.target_tokens is None):
            raise ValueError("set exactly one of target_pairs and target_tokens")

    @property
    def by_tokens(self) -> bool:
        """The target, weights, quotas and shares are in tokens (the pack stage's accounting)."""
        return self.target_tokens is not None

    @property
    def target(self) -> int:
        """The target in its unit (pairs, or tokens with ``target_tokens``)."""
        return self.target_tokens if self.target_tokens is not None else self.target_pairs

    @property
    def unit(self) -> str:
        return "tokens" if self.by_tokens else "pairs"

    def effective_salt(self) -> str:
        return self.salt or f"stage{self.stage}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "target_pairs": self.target_pairs, "weights": dict(self.weights),
            "quotas": dict(self.quotas), "languages": dict(self.languages),
            "text_rich_share": self.text_rich_share, "on_short": self.on_short, "min_side": self.min_side,
            "allow_upscale": self.allow_upscale, "salt": self.effective_salt(), "earlier": self.earlier,
            "overlap": self.overlap,
        } | ({"target_tokens": self.target_tokens, "query_num": self.query_num,
              "tokenizer": self.tokenizer} if self.by_tokens else {})


_KEYS = {"target_pairs", "target_tokens", "weights", "quotas", "languages", "text_rich_share", "on_short",
         "min_side", "allow_upscale", "salt", "earlier", "overlap", "query_num", "tokenizer"}


def _shares(where: str, key: str, table: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(table, dict) or not table:
        raise UserError(f"{where} {key}: must be a non-empty table of name = share")
    for name, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise UserError(f"{where} {key}.{name}: share must be a number >= 0, got {v!r}")
    total = sum(table.values())
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{where} {key}: shares sum to {total:g}, they must sum to 1")
    return tuple(sorted((str(k), float(v)) for k, v in table.items()))


def load_select_config(doc: dict[str, Any], stage: int, where: str = "config") -> SelectConfig:
    """Build the stage's config from a parsed TOML document; any bad key exits 2 naming it."""
    if stage not in (1, 2, 3):
        raise UserError(f"--stage must be 1, 2 or 3, got {stage}")
    base = doc.get("select")
    if not isinstance(base, dict):
        raise UserError(f"{where}: no [select] table; see docs/selection.md for an example mix.toml")
    table = {k: v for k, v in base.items() if not k.startswith("stage")}
    override = base.get(f"stage{stage}", {})
    if not isinstance(override, dict):
        raise UserError(f"{where} [select.stage{stage}] must be a table")
    for both in (("target_pairs", "target_tokens"), ("weights", "quotas")):
        for name, t in (("[select]", base), (f"[select.stage{stage}]", override)):
            if all(k in t for k in both):
                raise UserError(f"{where} {name}: set {both[0]} or {both[1]}, not both")
        if any(k in override for k in both):  # a stage's target / split replaces the default's, whatever its kind
            for k in both:
                table.pop(k, None)
    table.update(override)
    sect = f"{where} [select.stage{stage}]" if override else f"{where} [select]"
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise UserError(f"{sect}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    weights = _shares(sect, "weights", table["weights"]) if "weights" in table else ()
    languages = _shares(sect, "languages", table["languages"]) if "languages" in table else ()
    quotas: tuple[tuple[str, int], ...] = ()
    if "quotas" in table:
        q = table["quotas"]
        if not isinstance(q, dict) or not q:
            raise UserError(f"{sect} quotas: must be a non-empty table of name = pairs")
        for name, v in q.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{sect} quotas.{name}: must be an integer >= 0, got {v!r}")
        quotas = tuple(sorted((str(k), int(v)) for k, v in q.items()))
    unit_key = "target_tokens" if "target_tokens" in table else "target_pairs"
    target = table.get(unit_key)
    if quotas:  # quotas are in the target's unit: pairs, or tokens with target_tokens
        qsum = sum(v for _, v in quotas)
        if target is not None and target != qsum:
            raise UserError(f"{sect} {unit_key}: {target} differs from the quotas' sum {qsum}; drop one")
        target = qsum
    if target is None:
        raise UserError(f"{sect}: no target; set target_pairs (pairs) or target_tokens (tokens, the pack "
                        "stage's accounting)")
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise UserError(f"{sect} {unit_key}: must be an integer >= 1, got {target!r}")
    query_num = table.get("query_num", 96)
    if query_num not in QUERY_NUMS or isinstance(query_num, bool):
        raise UserError(f"{sect} query_num: must be one of {list(QUERY_NUMS)}, got {query_num!r}")
    tokenizer = table.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise UserError(f"{sect} tokenizer: must be the path of a tokenizer.json or a tokenizer directory")
    for k in ("query_num", "tokenizer"):
        if k in table and unit_key != "target_tokens":
            raise UserError(f"{sect} {k}: only used with target_tokens (token accounting); drop it")
    on_short = table.get("on_short", "report")
    if on_short not in ON_SHORT:
        raise UserError(f"{sect} on_short: must be one of {list(ON_SHORT)}, got {on_short!r}")
    overlap = table.get("overlap", "disjoint")
    if overlap not in OVERLAP:
        raise UserError(f"{sect} overlap: must be one of {list(OVERLAP)}, got {overlap!r}")
    rich = table.get("text_rich_share")
    if rich is not None and (isinstance(rich, bool) or not isinstance(rich, (int, float)) or not 0 <= rich <= 1):
        raise UserError(f"{sect} text_rich_share: must be a number in [0, 1], got {rich!r}")
    min_side = table.get("min_side", 448 if stage == 2 else None)
    if min_side is False:
        min_side = None
    if min_side is not None and (isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1):
        raise UserError(f"{sect} min_side: must be a positive integer or false, got {min_side!r}")
    earlier = table.get("earlier")
    if earlier is not None and not isinstance(earlier, str):
        raise UserError(f"{sect} earlier: must be the path of an earlier select output")
    return SelectConfig(
        stage=stage, target_pairs=None if unit_key == "target_tokens" else target,
        target_tokens=target if unit_key == "target_tokens" else None, query_num=query_num, tokenizer=tokenizer,
        weights=weights, quotas=quotas, languages=languages,
        text_rich_share=None if rich is None else float(rich), on_short=on_short, min_side=min_side,
        allow_upscale=bool(table.get("allow_upscale", False)), salt=str(table.get("salt", "")),
        earlier=earlier, overlap=overlap,
    )


def check_names(cfg: SelectConfig, datasets: Iterable[str], pool_records: int | None, where: str,
                langs: Iterable[str] | None = None) -> None:
    """Driver-side checks before any work: known dataset (and language) names, a target the pool can give."""
    known = sorted(set(datasets))
    for key, table in (("weights", cfg.weights), ("quotas", cfg.quotas)):
        unknown = sorted(n for n, _ in table if n not in known)
        if unknown:
            raise UserError(f"{where} {key}: unknown source name(s) {unknown}; the input holds {known}")
    if langs is not None and cfg.languages:
        known_langs = sorted(set(langs))
        unknown = sorted(n for n, share in cfg.languages if n not in known_langs and share > 0)
        if unknown:
            raise UserError(f"{where} languages: no input record has language {unknown}; the input holds "
                            f"{known_langs} (records without a lang count as {NO_LANG!r})")
    if not cfg.by_tokens and cfg.on_short != "upsample" and pool_records is not None and cfg.target_pairs > pool_records:
        raise UserError(
            f"{where} target_pairs: {cfg.target_pairs} is larger than the input's {pool_records} records "
            "and on_short is not 'upsample'; lower target_pairs or set on_short = \"upsample\""
        )


# --- per-record pieces ---------------------------------------------------------------------------


def key_hash(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogatepass")).digest()[:8], "big")


def bucket_of(h: int) -> int:
    return h >> (64 - BUCKET_BITS)


def lang_of(pair: Pair) -> str:
    return getattr(pair, "lang", None) or NO_LANG


def is_text_rich(pair: Pair) -> bool:
    """The OCR stage's verdict (``Pair.ocr`` JSON, key ``text_rich``); records the OCR stage has not
    seen (``ocr`` None) or could not read count as not text-rich."""
    if not pair.ocr:
        return False
    try:
        return bool(json.loads(pair.ocr).get("text_rich"))
    except (ValueError, AttributeError):
        return False


class TokenCounter:
    """The pack stage's per-sample token count without packing (``transforms.shards.PrepareSampleFn``):
    caption tokens with the tokenizer + eos, plus the image placeholder span of the stage's pack profile
    (stages 1/2: ``q + 2``; stage 3: overview + slices from the image's upright header size, as
    ``transforms.tokens.prepare_image`` sizes it). Only the image header is read, never the pixels.

    Args:
        stage: the pack profile's stage (1, 2 or 3).
        query_num: q, query tokens per image / slice.
        tokenizer_files: ``TextTokenizer.files_of(path)``; rebuilt by ``setup`` on the worker.
    """

    def __init__(self, stage: int, query_num: int, tokenizer_files: dict[str, bytes]):
        self.profile = StageProfile.for_stage(stage, query_num)
        self.tokenizer_files = tokenizer_files
        self.tok = None

    def setup(self) -> None:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="mmcorpus-seltok-")
        self.tok = TextTokenizer.from_files(self.tokenizer_files, self._tmp.name)
        self.newline = len(self.tok.newline_ids)

    def teardown(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()

    def count(self, pair: Pair) -> int:
        n = len(self.tok.encode(pair.caption or "")) + 1  # + eos
        if not pair.image:
            return n  # pack packs caption-only samples as text (unless --require-image)
        grid = None
        if self.profile.slicing:
            from transforms import images

            with images.open_image(pair.image) as probe:
                head = images.read_header(probe)
            grid = self.profile.grid(*self.profile.stored_size(head.width, head.height))
        return n + image_token_count(grid, self.profile.query_num, self.newline)


def cell_of(pair: Pair) -> tuple[str, str, bool]:
    return (pair.dataset or NO_DATASET, lang_of(pair), is_text_rich(pair))


def eligibility(pair: Pair, cfg: SelectConfig, in_earlier: bool) -> tuple[str, str] | None:
    """``(reason, detail)`` when the record may not be drawn at this stage, else None."""
    if in_earlier and cfg.overlap == "disjoint":
        return reasons.IN_EARLIER_SELECTION, f"earlier={cfg.earlier}"
    if cfg.min_side is not None and not cfg.allow_upscale:
        if pair.width is None or pair.height is None:
            return reasons.NOT_ELIGIBLE, f"rule=min_side min_side={cfg.min_side} size=unknown"
        side = min(pair.width, pair.height)
        if side < cfg.min_side:
            return reasons.NOT_ELIGIBLE, f"rule=min_side min_side={cfg.min_side} side={side}"
    return None


def replica_key(key: str, i: int) -> str:
    return safe_key(f"{key}-r{i}", key, str(i))


# --- the plan: per-cell targets and thresholds ---------------------------------------------------


def apportion(total: int, shares: dict[Any, float]) -> dict[Any, int]:
    """Largest-remainder rounding of ``total * share`` (ties by sorted name): sums exactly to total."""
    s = sum(shares.values())
    if s <= 0:
        return {k: 0 for k in shares}
    raw = {k: total * v / s for k, v in shares.items()}
    out = {k: math.floor(v) for k, v in raw.items()}
    left = total - sum(out.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), str(k)))[:left]:
        out[k] += 1
    return out


def marginal_targets(cfg: SelectConfig, pool: dict[tuple, int]) -> dict[int, dict[Any, int]]:
    """Per axis (0 dataset, 1 lang, 2 text_rich): value -> target (in ``cfg.unit``), for the constrained axes."""
    out: dict[int, dict[Any, int]] = {}
    if cfg.quotas:
        out[0] = dict(cfg.quotas)
    elif cfg.weights:
        out[0] = apportion(cfg.target, dict(cfg.weights))
    if cfg.languages:
        out[1] = apportion(cfg.target, dict(cfg.languages))
    if cfg.text_rich_share is not None:
        out[2] = apportion(cfg.target, {True: cfg.text_rich_share, False: 1 - cfg.text_rich_share})
    return out


def cell_targets(cfg: SelectConfig, pool: dict[tuple, int]) -> dict[tuple, int]:
    """Integer target per cell (in ``cfg.unit``): the pool (pairs or tokens) raked (iterative
    proportional fitting) to the configured marginals, scaled to the target and rounded by largest
    remainder. Cells with no pool get 0."""
    cells = sorted(c for c, n in pool.items() if n > 0)
    if not cells:
        return {}
    m = {c: float(pool[c]) for c in cells}
    margins = marginal_targets(cfg, pool)
    for _ in range(RAKING_ROUNDS):
        for axis, targets in sorted(margins.items()):
            sums: dict[Any, float] = defaultdict(float)
            for c in cells:
                sums[c[axis]] += m[c]
            for c in cells:
                v = c[axis]
                t = targets.get(v, 0)
                m[c] *= t / sums[v] if sums[v] > 0 else 0.0
        worst = 0.0  # after a full round: how far every marginal still is from its target
        for axis, targets in margins.items():
            for v, t in targets.items():
                if any(c[axis] == v for c in cells):
                    worst = max(worst, abs(sum(m[c] for c in cells if c[axis] == v) - t))
        if worst < 1e-6:
            break
    total = sum(m.values())
    if total <= 0:
        return {c: 0 for c in cells}
    reachable = cfg.target
    if margins:  # a marginal whose values have no pool at all cannot be reached: give what can be
        reachable = min(reachable, round(total))
    return apportion(reachable, m)


class CellPlan(NamedTuple):
    target: int  # in cfg.unit (pairs or tokens)
    pool: int  # eligible records
    base: int  # copies every eligible record of the cell gets
    cut: int  # hash bucket of the boundary (-1: none)
    need: int  # pairs / tokens still to hand out inside the cut bucket, by hash order
    shortfall: int  # in cfg.unit
    pool_w: int = 0  # the pool in cfg.unit (= pool when counting pairs)


def make_plan(cfg: SelectConfig, hist: dict[tuple, Any]) -> dict[tuple, CellPlan]:
    """``hist``: ``(cell, bucket) -> records`` or ``-> (records, weight)`` (weight: tokens with a
    token target, else records). Returns the plan of every cell with a pool.

    A cell with target ``t`` and pool weight ``P`` gives every record ``t // P`` copies and hands out
    the remainder ``t mod P`` as one more copy to the records in hash order: every bucket below the
    cut bucket, then inside the cut bucket a hash-ordered prefix (``prefix_length``)."""
    per_cell: dict[tuple, dict[int, list[int]]] = defaultdict(dict)
    for (cell, bucket), v in hist.items():
        n, w = (v, v) if isinstance(v, int) else v
        acc = per_cell[tuple(cell)].setdefault(bucket, [0, 0])
        acc[0] += n
        acc[1] += w
    pool = {c: sum(a[1] for a in b.values()) for c, b in per_cell.items()}
    targets = cell_targets(cfg, pool)
    plan = {}
    for cell in sorted(per_cell):
        n = sum(a[0] for a in per_cell[cell].values())
        pw, t = pool[cell], targets.get(cell, 0)
        shortfall = 0
        if t > pw and cfg.on_short != "upsample":
            shortfall, t = t - pw, pw
        base, rem = divmod(t, pw)
        cut, need = -1, 0
        if rem:
            cum = 0
            for b in sorted(per_cell[cell]):
                w = per_cell[cell][b][1]
                if cum + w >= rem:
                    cut, need = b, rem - cum
                    break
                cum += w
        plan[cell] = CellPlan(t, n, base, cut, need, shortfall, pw)
    return plan


def prefix_length(weights: list[int], need: int) -> int:
    """How many of ``weights`` (in hash order) to take so their sum is closest to ``need`` (the shorter
    prefix on a tie). With unit weights that is exactly ``need``; with tokens the cell misses its
    target by at most half of one record's tokens."""
    cum = 0
    for i, w in enumerate(weights):
        if cum + w >= need:
            return i + 1 if cum + w - need < need - cum else i
        cum += w
    return len(weights)


# --- Beam pieces ---------------------------------------------------------------------------------


class Candidate(NamedTuple):
    cell: tuple
    h: int
    in_earlier: bool
    pair: Pair
    w: int = 1  # the record's weight in cfg.unit: 1 pair, or its tokens


class _AnnotateFn(beam.DoFn):
    """Pair or (pair, in_earlier) -> ineligible Outcome (tag ``out``) or Candidate (main)."""

    def __init__(self, cfg: SelectConfig, tokenizer_files: dict[str, bytes] | None = None):
        self.cfg = cfg
        self.counter = TokenCounter(cfg.stage, cfg.query_num, tokenizer_files) if cfg.by_tokens else None

    def setup(self):
        self.errors = Metrics.counter("mmcorpus.select", "errors_annotate")
        if self.counter is not None:
            self.counter.setup()

    def teardown(self):
        if self.counter is not None:
            self.counter.teardown()

    def process(self, item):
        pair, in_earlier = (item, False) if isinstance(item, Pair) else item
        try:
            why = eligibility(pair, self.cfg, in_earlier)
            if why is not None:
                yield beam.pvalue.TaggedOutput("out", Outcome.dropped(pair, REJECTED, why[0], why[1]))
                return
            w = self.counter.count(pair) if self.counter is not None else 1
            cand = Candidate(cell_of(pair), key_hash(self.cfg.effective_salt(), pair.key), in_earlier, pair, w)
        except Exception as exc:  # dead letter: one bad record never stops the stage
            self.errors.inc()
            yield beam.pvalue.TaggedOutput(
                "out", Outcome.dropped(pair, "error", reasons.exception_reason(exc), type(exc).__name__)
            )
            return
        yield cand


def emit_copies(decided: tuple[Candidate, int]) -> Iterable[Outcome]:
    c, copies = decided
    if copies == 0:
        yield Outcome.dropped(c.pair, REJECTED, reasons.NOT_SELECTED, f"cell={'/'.join(map(str, c.cell))}")
        return
    yield Outcome.kept(c.pair)
    for i in range(1, copies):
        yield Outcome.kept(c.pair.replace(key=replica_key(c.pair.key, i), replica=i))


def tally(decided: tuple[Candidate, int]) -> tuple[tuple, tuple[int, int, int, int, int]]:
    """One count element per decision, for mixture.json: ``(cell, (pairs, weight, replicas, overlap,
    not_selected))`` (``unpack_tallies`` turns the per-cell sums into the report's keys)."""
    c, copies = decided
    if copies == 0:
        return ("tally", c.cell), (0, 0, 0, 0, 1)
    # overlap: drawn again although an earlier selection holds it (overlap = "allow")
    return ("tally", c.cell), (copies, copies * c.w, copies - 1, int(c.in_earlier), 0)


def unpack_tallies(acc: dict) -> dict:
    """The combined counts with per-cell tallies spread into the report's keys."""
    out: dict = {k: v for k, v in acc.items() if k[0] != "tally"}
    for k, v in acc.items():
        if k[0] != "tally":
            continue
        cell = k[1]
        pairs, w, replicas, overlap, dropped = v
        if pairs:
            out[("cell", cell)] = out.get(("cell", cell), 0) + pairs
            out[("cell_w", cell)] = out.get(("cell_w", cell), 0) + w
        for key, n in ((("replicas",), replicas), (("overlap",), overlap), (("drop", reasons.NOT_SELECTED), dropped)):
            if n:
                out[key] = out.get(key, 0) + n
    return out


class _DecideFn(beam.DoFn):
    """Candidate -> (Candidate, copies), or (cell, Candidate) on the ``boundary`` tag for the cut bucket."""

    def process(self, c: Candidate, cuts: dict):
        base, cut, _ = cuts[c.cell]
        b = bucket_of(c.h)
        if b == cut:
            yield beam.pvalue.TaggedOutput("boundary", (c.cell, c))
            return
        yield c, base + (1 if b < cut else 0)


def _decide_boundary(element, cuts: dict):
    cell, cands = element
    base, _, need = cuts[cell]
    ordered = sorted(cands, key=lambda c: (c.h, c.pair.key))
    k = prefix_length([c.w for c in ordered], need)
    for i, c in enumerate(ordered):
        yield c, base + (1 if i < k else 0)


def plan_cuts(plan: dict) -> dict:
    """``cell -> (base, cut, need)`` as plain tuples: the per-record decision's side input, kept
    small and flat (Beam's side-input cache measures its deep size on every read)."""
    return {cell: (p.base, p.cut, p.need) for cell, p in plan.items()}


def _ineligible_keys(o: Outcome):
    if o.reason in (reasons.NOT_ELIGIBLE, reasons.IN_EARLIER_SELECTION):
        yield ("drop", o.reason), 1


class _MergeCounts(beam.CombineFn):
    """Sums values per key; a value is a number or a tuple of numbers (summed element-wise)."""

    def create_accumulator(self):
        return {}

    @staticmethod
    def _add(a, b):
        if a is None:
            return b
        return tuple(x + y for x, y in zip(a, b)) if isinstance(b, (tuple, list)) else a + b

    def add_input(self, acc, kv):
        k, v = kv
        acc[k] = self._add(acc.get(k), v)
        return acc

    def merge_accumulators(self, accs):
        out: dict = {}
        for a in accs:
            for k, v in a.items():
                out[k] = self._add(out.get(k), v)
        return out

    def extract_output(self, acc):
        return acc


def _pct(n: int, d: int) -> float | None:
    return round(100.0 * n / d, 4) if d else None


def mixture_report(cfg: SelectConfig, plan: dict, achieved: dict, dropped: dict) -> dict[str, Any]:
    """Target vs achieved per dataset, per language, per text-rich flag and per rule; replicas and
    overlap. ``achieved`` holds the tallies (``tally``): pairs and weight per cell. With a token
    target, targets and shortfalls are in tokens (``*_tokens``) and pairs are reported beside them."""
    margins = marginal_targets(cfg, {})
    tok = cfg.by_tokens
    sel_total = sum(v for k, v in achieved.items() if k[0] == "cell")
    sel_w = sum(v for k, v in achieved.items() if k[0] == "cell_w")
    sfx = "_tokens" if tok else ""
    axes = {}
    for axis, name in ((0, "dataset"), (1, "lang"), (2, "text_rich")):
        rows: dict[str, dict[str, Any]] = {}
        values = {c[axis] for c in plan} | set(margins.get(axis, {}))
        for v in sorted(values, key=str):
            got = sum(n for k, n in achieved.items() if k[0] == "cell" and k[1][axis] == v)
            pool = sum(p.pool for c, p in plan.items() if c[axis] == v)
            row = {"pool": pool, "achieved": got, "achieved_pct": _pct(got, sel_total)}
            got_w = got
            if tok:
                got_w = sum(n for k, n in achieved.items() if k[0] == "cell_w" and k[1][axis] == v)
                row |= {"pool_tokens": sum(p.pool_w for c, p in plan.items() if c[axis] == v),
                        "achieved_tokens": got_w, "achieved_tokens_pct": _pct(got_w, sel_w)}
            if axis in margins:
                t = margins[axis].get(v, 0)
                row |= {f"target{sfx}": t, f"target{sfx}_pct": _pct(t, cfg.target),
                        f"shortfall{sfx}": max(0, t - got_w)}
            rows[str(v).lower() if axis == 2 else str(v)] = row
        axes[name] = rows
    rules = {r: n for r, n in sorted(dropped.items())}
    out = {
        "stage": cfg.stage,
        "salt": cfg.effective_salt(),
        "unit": cfg.unit,
        "target_pairs": cfg.target_pairs,
        "selected": sel_total,
        "replicas": achieved.get(("replicas",), 0),
        "shortfall": None if tok else max(0, cfg.target_pairs - sel_total),
        "on_short": cfg.on_short,
        "by_dataset": axes["dataset"],
        "by_lang": axes["lang"],
        "by_text_rich": axes["text_rich"],
        "rules": {
            "min_side": None if cfg.min_side is None or cfg.allow_upscale else cfg.min_side,
            "allow_upscale": cfg.allow_upscale,
            "not_eligible": rules.get(reasons.NOT_ELIGIBLE, 0),
            "in_earlier_selection": rules.get(reasons.IN_EARLIER_SELECTION, 0),
            "not_selected": rules.get(reasons.NOT_SELECTED, 0),
        },
        "earlier": None if cfg.earlier is None else {
            "path": cfg.earlier, "overlap_policy": cfg.overlap,
            "overlap": achieved.get(("overlap",), 0),
            "overlap_pct": _pct(achieved.get(("overlap",), 0), sel_total - achieved.get(("replicas",), 0)),
        },
        "cells": [
            {"dataset": c[0], "lang": c[1], "text_rich": c[2], "pool": p.pool, "target": p.target,
             "achieved": achieved.get(("cell", c), 0), "replicas_per_record": p.base, "shortfall": p.shortfall}
            | ({"pool_tokens": p.pool_w, "achieved_tokens": achieved.get(("cell_w", c), 0)} if tok else {})
            for c, p in sorted(plan.items())
        ],
    }
    if tok:
        out |= {"target_tokens": cfg.target_tokens, "selected_tokens": sel_w,
                "shortfall_tokens": max(0, cfg.target_tokens - sel_w), "query_num": cfg.query_num,
                "pack_profile_stage": cfg.stage}
    return out


class _WriteMixtureFn(beam.DoFn):
    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def process(self, report: dict):
        data = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8")
        write_bytes_atomic(join(self.output_dir, MIXTURE_NAME), data)
        yield FileEntry(path=MIXTURE_NAME, kind=FILE_KIND_MIXTURE, rows=1, bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest())


class _ReadOriginalKeysFn(beam.DoFn):
    """(path, row_group) -> keys of the original (non-replica) records: two columns, no images."""

    def process(self, unit: tuple[str, int]):
        path, rg = unit
        with FileSystems.open(path, compression_type="uncompressed") as f:
            t = pq.ParquetFile(f).read_row_group(rg, columns=["key", "replica"])
        for key, replica in zip(t.column("key").to_pylist(), t.column("replica").to_pylist()):
            if not replica:
                yield key


class ReadSelectionKeys(beam.PTransform):
    """Keys of an earlier ``select`` output's original records, read row group by row group.

    Args:
        stage_dir: the earlier select output directory.
    """

    def __init__(self, stage_dir: str):
        super().__init__()
        self.paths = [join(stage_dir, e.path) for e in read_manifest(stage_dir).files_of(FILE_KIND_DATA)]

    def expand(self, pbegin):
        return (
            pbegin
            | "DataFiles" >> beam.Create(self.paths)
            | "RowGroups" >> beam.ParDo(ExpandRowGroupsFn())
            | "Spread" >> beam.Reshuffle()
            | "Keys" >> beam.ParDo(_ReadOriginalKeysFn())
        )


class Select(beam.PTransform):
    """Draw one stage's mixture from the eligible records.

    Args:
        cfg: the stage's ``SelectConfig``.
        output_dir: where ``mixture.json`` is written.
        earlier_keys: PCollection of keys of the earlier selection (None: no re-selection policy).

    Returns ``(outcomes, mixture_report, mixture_file_entries)``: one outcome per input record (plus
    one kept outcome per replica), the report dict (single value) and the ``FileEntry`` of mixture.json.
    """

    def __init__(self, cfg: SelectConfig, output_dir: str, earlier_keys: beam.PCollection | None = None):
        super().__init__()
        self.cfg = cfg
        self.output_dir = output_dir
        self.earlier_keys = earlier_keys

    def expand(self, pairs):
        cfg = self.cfg
        if self.earlier_keys is None:
            flagged = pairs  # _AnnotateFn reads a bare Pair as "not in an earlier selection"
        else:
            joined = {
                "pair": pairs | "ByKey" >> beam.Map(lambda p: (p.key, p)),
                "earlier": self.earlier_keys | "EarlierByKey" >> beam.Map(lambda k: (k, True)),
            }
            flagged = (
                joined
                | "JoinEarlier" >> beam.CoGroupByKey()
                | "Flag" >> beam.FlatMap(lambda kv: [(p, bool(kv[1]["earlier"])) for p in kv[1]["pair"]])
            )
        tok_files = TextTokenizer.files_of(self.cfg.tokenizer) if cfg.by_tokens else None
        annotated = flagged | "Eligibility" >> beam.ParDo(_AnnotateFn(cfg, tok_files)).with_outputs("out", main="cand")
        cands = annotated.cand
        hist = (
            cands
            | "CellBucket" >> beam.Map(lambda c: ((c.cell, bucket_of(c.h)), (1, c.w)))
            | "CountBuckets" >> beam.CombineGlobally(_MergeCounts())
        )
        plan = hist | "Plan" >> beam.Map(lambda h: make_plan(cfg, h))
        cuts = plan | "Cuts" >> beam.Map(plan_cuts)
        decided = cands | "Decide" >> beam.ParDo(_DecideFn(), cuts=beam.pvalue.AsSingleton(cuts)).with_outputs(
            "boundary", main="out"
        )
        boundary = (
            decided.boundary
            | "GroupBoundary" >> beam.GroupByKey()
            | "DecideBoundary" >> beam.FlatMap(_decide_boundary, cuts=beam.pvalue.AsSingleton(cuts))
        )
        decisions = (decided.out, boundary) | "AllDecisions" >> beam.Flatten()
        outcomes = (annotated.out, decisions | "Copies" >> beam.FlatMap(emit_copies)) | "AllOutcomes" >> beam.Flatten()
        parts = [annotated.out | "IneligibleKeys" >> beam.FlatMap(_ineligible_keys), decisions | "Tally" >> beam.Map(tally)]
        counts = (
            tuple(parts)
            | "FlattenCounts" >> beam.Flatten()
            | "CountAchieved" >> beam.CombineGlobally(_MergeCounts())
        )
        report = counts | "Unpack" >> beam.Map(unpack_tallies) | "Report" >> beam.Map(
            lambda acc, plan: mixture_report(
                cfg, plan, acc, {k[1]: v for k, v in acc.items() if k[0] == "drop"}
            ),
            plan=beam.pvalue.AsSingleton(plan),
        )
        files = report | "WriteMixture" >> beam.ParDo(_WriteMixtureFn(self.output_dir))
        return outcomes, report, files
