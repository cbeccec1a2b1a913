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
from collections import Counter, defaultdict
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
    target_pairs: int
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

    def effective_salt(self) -> str:
        return self.salt or f"stage{self.stage}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "target_pairs": self.target_pairs, "weights": dict(self.weights),
            "quotas": dict(self.quotas), "languages": dict(self.languages),
            "text_rich_share": self.text_rich_share, "on_short": self.on_short, "min_side": self.min_side,
            "allow_upscale": self.allow_upscale, "salt": self.effective_salt(), "earlier": self.earlier,
            "overlap": self.overlap,
        }


_KEYS = {"target_pairs", "weights", "quotas", "languages", "text_rich_share", "on_short", "min_side",
         "allow_upscale", "salt", "earlier", "overlap"}


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
    if weights and quotas:
        raise UserError(f"{sect}: set weights or quotas, not both")
    target = table.get("target_pairs")
    if quotas:
        qsum = sum(v for _, v in quotas)
        if target is not None and target != qsum:
            raise UserError(f"{sect} target_pairs: {target} differs from the quotas' sum {qsum}; drop one")
        target = qsum
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise UserError(f"{sect} target_pairs: must be an integer >= 1, got {target!r}")
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
        stage=stage, target_pairs=target, weights=weights, quotas=quotas, languages=languages,
        text_rich_share=None if rich is None else float(rich), on_short=on_short, min_side=min_side,
        allow_upscale=bool(table.get("allow_upscale", False)), salt=str(table.get("salt", "")),
        earlier=earlier, overlap=overlap,
    )


def check_names(cfg: SelectConfig, datasets: Iterable[str], pool_records: int | None, where: str) -> None:
    """Driver-side checks before any work: known dataset names, a target the pool can give."""
    known = sorted(set(datasets))
    for key, table in (("weights", cfg.weights), ("quotas", cfg.quotas)):
        unknown = sorted(n for n, _ in table if n not in known)
        if unknown:
            raise UserError(f"{where} {key}: unknown source name(s) {unknown}; the input holds {known}")
    if cfg.on_short != "upsample" and pool_records is not None and cfg.target_pairs > pool_records:
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
    v = getattr(pair, "text_rich", None)
    if v is not None:
        return bool(v)
    return bool(pair.meta_dict().get("text_rich")) if pair.meta and "text_rich" in pair.meta else False


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
    """Per axis (0 dataset, 1 lang, 2 text_rich): value -> target pairs, for the constrained axes."""
    out: dict[int, dict[Any, int]] = {}
    if cfg.quotas:
        out[0] = dict(cfg.quotas)
    elif cfg.weights:
        out[0] = apportion(cfg.target_pairs, dict(cfg.weights))
    if cfg.languages:
        out[1] = apportion(cfg.target_pairs, dict(cfg.languages))
    if cfg.text_rich_share is not None:
        out[2] = apportion(cfg.target_pairs, {True: cfg.text_rich_share, False: 1 - cfg.text_rich_share})
    return out


def cell_targets(cfg: SelectConfig, pool: dict[tuple, int]) -> dict[tuple, int]:
    """Integer target per cell: the pool raked (iterative proportional fitting) to the configured
    marginals, scaled to ``target_pairs`` and rounded by largest remainder. Cells with no pool get 0."""
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
    reachable = cfg.target_pairs
    if margins:  # a marginal whose values have no pool at all cannot be reached: give what can be
        reachable = min(reachable, round(total))
    return apportion(reachable, m)


class CellPlan(NamedTuple):
    target: int
    pool: int
    base: int  # copies every eligible record of the cell gets
    cut: int  # hash bucket of the boundary (-1: none)
    need: int  # extra copies to hand out inside the cut bucket, by hash order
    shortfall: int


def make_plan(cfg: SelectConfig, hist: dict[tuple, int]) -> dict[tuple, CellPlan]:
    """``hist``: ``(cell, bucket) -> records``. Returns the plan of every cell with a pool."""
    per_cell: dict[tuple, Counter] = defaultdict(Counter)
    for (cell, bucket), n in hist.items():
        per_cell[tuple(cell)][bucket] += n
    pool = {c: sum(b.values()) for c, b in per_cell.items()}
    targets = cell_targets(cfg, pool)
    plan = {}
    for cell in sorted(per_cell):
        n, t = pool[cell], targets.get(cell, 0)
        shortfall = 0
        if t > n and cfg.on_short != "upsample":
            shortfall, t = t - n, n
        base, rem = divmod(t, n)
        cut, need = -1, 0
        if rem:
            cum = 0
            for b in sorted(per_cell[cell]):
                if cum + per_cell[cell][b] >= rem:
                    cut, need = b, rem - cum
                    break
                cum += per_cell[cell][b]
        plan[cell] = CellPlan(t, n, base, cut, need, shortfall)
    return plan


# --- Beam pieces ---------------------------------------------------------------------------------


class Candidate(NamedTuple):
    cell: tuple
    h: int
    in_earlier: bool
    pair: Pair


class _AnnotateFn(beam.DoFn):
    """(pair, in_earlier) -> ineligible Outcome (tag ``out``) or Candidate (main)."""

    def __init__(self, cfg: SelectConfig):
        self.cfg = cfg

    def setup(self):
        self.errors = Metrics.counter("mmcorpus.select", "errors_annotate")

    def process(self, item):
        pair, in_earlier = item
        try:
            why = eligibility(pair, self.cfg, in_earlier)
            if why is not None:
                yield beam.pvalue.TaggedOutput("out", Outcome.dropped(pair, REJECTED, why[0], why[1]))
                return
            yield Candidate(cell_of(pair), key_hash(self.cfg.effective_salt(), pair.key), in_earlier, pair)
        except Exception as exc:  # dead letter: one bad record never stops the stage
            self.errors.inc()
            yield beam.pvalue.TaggedOutput(
                "out", Outcome.dropped(pair, "error", reasons.exception_reason(exc), type(exc).__name__)
            )


def emit_copies(c: Candidate, copies: int) -> Iterable[Outcome]:
    if copies == 0:
        yield Outcome.dropped(c.pair, REJECTED, reasons.NOT_SELECTED, f"cell={'/'.join(map(str, c.cell))}")
        return
    yield Outcome.kept(c.pair)
    for i in range(1, copies):
        yield Outcome.kept(c.pair.replace(key=replica_key(c.pair.key, i), replica=i))


class _DecideFn(beam.DoFn):
    """Candidate -> its outcomes, or (cell, Candidate) on the ``boundary`` tag for the cut bucket."""

    def process(self, c: Candidate, plan: dict):
        p = plan[c.cell]
        b = bucket_of(c.h)
        if b == p.cut:
            yield beam.pvalue.TaggedOutput("boundary", (c.cell, c))
            return
        yield from emit_copies(c, p.base + (1 if b < p.cut else 0))


def _decide_boundary(element, plan: dict):
    cell, cands = element
    p = plan[cell]
    for i, c in enumerate(sorted(cands, key=lambda c: (c.h, c.pair.key))):
        yield from emit_copies(c, p.base + (1 if i < p.need else 0))


class _MergeCounts(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, kv):
        k, v = kv
        acc[k] = acc.get(k, 0) + v
        return acc

    def merge_accumulators(self, accs):
        out: dict = {}
        for a in accs:
            for k, v in a.items():
                out[k] = out.get(k, 0) + v
        return out

    def extract_output(self, acc):
        return acc


def _pct(n: int, d: int) -> float | None:
    return round(100.0 * n / d, 4) if d else None


def mixture_report(cfg: SelectConfig, plan: dict, achieved: dict, dropped: dict) -> dict[str, Any]:
    """Target vs achieved per dataset, per language, per text-rich flag and per rule; replicas and overlap."""
    margins = marginal_targets(cfg, {})
    sel_total = sum(v for k, v in achieved.items() if k[0] == "cell")
    axes = {}
    for axis, name in ((0, "dataset"), (1, "lang"), (2, "text_rich")):
        rows: dict[str, dict[str, Any]] = {}
        values = {c[axis] for c in plan} | set(margins.get(axis, {}))
        for v in sorted(values, key=str):
            got = sum(n for k, n in achieved.items() if k[0] == "cell" and k[1][axis] == v)
            pool = sum(p.pool for c, p in plan.items() if c[axis] == v)
            row = {"pool": pool, "achieved": got, "achieved_pct": _pct(got, sel_total)}
            if axis in margins:
                t = margins[axis].get(v, 0)
                row |= {"target": t, "target_pct": _pct(t, cfg.target_pairs), "shortfall": max(0, t - got)}
            rows[str(v).lower() if axis == 2 else str(v)] = row
        axes[name] = rows
    rules = {r: n for r, n in sorted(dropped.items())}
    return {
        "stage": cfg.stage,
        "salt": cfg.effective_salt(),
        "target_pairs": cfg.target_pairs,
        "selected": sel_total,
        "replicas": achieved.get(("replicas",), 0),
        "shortfall": max(0, cfg.target_pairs - sel_total),
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
             "replicas_per_record": p.base, "shortfall": p.shortfall}
            for c, p in sorted(plan.items())
        ],
    }


def _achieved_keys(o: Outcome, earlier_keys: frozenset | None = None):
    if o.status != "kept" or o.pair is None:
        if o.reason in (reasons.NOT_ELIGIBLE, reasons.IN_EARLIER_SELECTION, reasons.NOT_SELECTED):
            yield ("drop", o.reason), 1
        return
    yield ("cell", cell_of(o.pair)), 1
    if o.pair.replica:
        yield ("replicas",), 1


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
            flagged = pairs | "NoEarlier" >> beam.Map(lambda p: (p, False))
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
        annotated = flagged | "Eligibility" >> beam.ParDo(_AnnotateFn(cfg)).with_outputs("out", main="cand")
        cands = annotated.cand
        hist = (
            cands
            | "CellBucket" >> beam.Map(lambda c: ((c.cell, bucket_of(c.h)), 1))
            | "CountBuckets" >> beam.CombineGlobally(_MergeCounts())
        )
        plan = hist | "Plan" >> beam.Map(lambda h: make_plan(cfg, h))
        decided = cands | "Decide" >> beam.ParDo(_DecideFn(), plan=beam.pvalue.AsSingleton(plan)).with_outputs(
            "boundary", main="out"
        )
        boundary = (
            decided.boundary
            | "GroupBoundary" >> beam.GroupByKey()
            | "DecideBoundary" >> beam.FlatMap(_decide_boundary, plan=beam.pvalue.AsSingleton(plan))
        )
        outcomes = (annotated.out, decided.out, boundary) | "AllOutcomes" >> beam.Flatten()
        overlap = (
            cands
            | "InEarlier" >> beam.Filter(lambda c: c.in_earlier)
            | "KeyOfEarlier" >> beam.Map(lambda c: (c.pair.key, c))
        )
        kept_keys = outcomes | "KeptOriginals" >> beam.FlatMap(
            lambda o: [(o.key, 1)] if o.status == "kept" and o.pair is not None and not o.pair.replica else []
        )
        overlap_n = (
            {"cand": overlap, "kept": kept_keys}
            | "JoinOverlap" >> beam.CoGroupByKey()
            | "OverlapHits" >> beam.FlatMap(lambda kv: [(("overlap",), 1)] if kv[1]["cand"] and kv[1]["kept"] else [])
        )
        counts = (
            (outcomes | "AchievedKeys" >> beam.FlatMap(_achieved_keys), overlap_n)
            | "FlattenCounts" >> beam.Flatten()
            | "CountAchieved" >> beam.CombineGlobally(_MergeCounts())
        )
        report = counts | "Report" >> beam.Map(
            lambda acc, plan: mixture_report(
                cfg, plan, acc, {k[1]: v for k, v in acc.items() if k[0] == "drop"}
            ),
            plan=beam.pvalue.AsSingleton(plan),
        )
        files = report | "WriteMixture" >> beam.ParDo(_WriteMixtureFn(self.output_dir))
        return outcomes, report, files
