"""The filter contract: small filters implement ``check``; the shared base and ``ApplyFiltersFn``
own routing, counting and the dead-letter path."""

from __future__ import annotations

from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas.records import ERROR, REJECTED, Outcome, Pair


class BaseFilter:
    """A filter is a pure rule over one ``Pair``.

    Subclasses set ``name`` and implement ``check(pair)``, returning ``True`` (keep), ``False``
    (reject with ``default_reason``) or ``(False, reason)`` / ``(False, reason, detail)``. A filter may
    also return a modified Pair through ``annotate`` (image filters fill width/height); it never
    touches counters or the ledger.
    """

    name = "filter"
    default_reason = "filtered"

    def check(self, pair: Pair):  # pragma: no cover - interface
        raise NotImplementedError

    def annotate(self, pair: Pair) -> Pair:
        """Return the pair with whatever this filter learned (e.g. image size); default: unchanged."""
        return pair

    def applies_to(self, pair: Pair) -> bool:
        return True

    def __call__(self, pair: Pair) -> tuple[bool, str, str]:
        result = self.check(pair)
        if result is True or result is None:
            return True, "", ""
        if result is False:
            return False, self.default_reason, ""
        ok = bool(result[0])
        reason = result[1] if len(result) > 1 else self.default_reason
        detail = result[2] if len(result) > 2 else ""
        return ok, reason, detail


def with_fields(pair: Pair, **fields) -> Pair:
    """A shallow copy of ``pair`` with ``fields`` set: what ``pair.replace`` gives, without re-running
    the dataclass ``__init__`` over all 25 fields (several µs a record on the filter's hot path)."""
    out = object.__new__(Pair)
    d = pair.__dict__.copy()
    d.update(fields)
    out.__dict__ = d
    return out


def run_filters(pair: Pair, filters: Sequence[BaseFilter]) -> tuple[Pair, str | None, str]:
    """Apply filters in order; return (possibly annotated pair, first rejection reason or None, detail)."""
    for f in filters:
        if not f.applies_to(pair):
            continue
        ok, reason, detail = f(pair)
        if not ok:
            return pair, reasons.check_reason(reason), detail
        pair = f.annotate(pair)
    return pair, None, ""


def kept_outcome(pair: Pair, flags: list[str]) -> Outcome:
    """The outcome of a record that passed the filters with these (sorted) quality flags."""
    return Outcome.kept(with_fields(pair, quality_flags=flags, needs_rewrite=bool(flags)))


def filter_record(item, filters: Sequence[BaseFilter], flaggers: Sequence = (), errors=None, kept=kept_outcome):
    """One record through the filters: ``Outcome`` kept with its quality flags, or rejected with the
    first failing rule's reason. Ingest outcomes (already ledger rows) pass through unchanged; an
    unexpected exception becomes an ``error`` outcome with reason ``exception_<Type>`` (``errors``,
    a Beam counter, counts it): the record is accounted for, never lost. ``kept(pair, flags)`` makes
    the result of a kept record (default ``kept_outcome``; the filter stage's read step makes the
    writer's entry of that outcome straight away)."""
    if isinstance(item, Outcome):
        return item
    pair: Pair = item
    try:
        pair, reason, detail = run_filters(pair, filters)
        if reason is not None:
            return Outcome.dropped(pair, REJECTED, reason, detail)
        flags: list[str] = []
        for flagger in flaggers:
            flags.extend(flagger(pair))
        return kept(pair, sorted(set(flags)) if flags else flags)
    except Exception as e:  # dead letter: accounted for with the exception type only
        if errors is not None:
            errors.inc()
        return Outcome.dropped(pair, ERROR, reasons.exception_reason(e), f"{type(e).__name__}")


class ApplyFiltersFn(beam.DoFn):
    """Pair → Outcome (``filter_record``): kept with quality flags, or rejected with the first
    failing rule's reason; ingest outcomes pass through; exceptions become ``error`` outcomes."""

    def __init__(self, filters: Sequence[BaseFilter], flaggers: Sequence = ()):
        self.filters = list(filters)
        self.flaggers = list(flaggers)

    def setup(self):
        self.errors = Metrics.counter("mmcorpus.filter", "errors")

    def process(self, item):
        yield filter_record(item, self.filters, self.flaggers, self.errors)
