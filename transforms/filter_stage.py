"""The filter stage's read step: each unit of raw input (a Parquet row group, a tar shard, a csv/jsonl file) is read, tagged with its source, filtered and flagged in one DoFn."""

from __future__ import annotations

from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.filter_base import BaseFilter, filter_record, kept_outcome
from transforms.ingest import ExpandUnitsFn, ReadInputUnitFn, ResolvedInput
from transforms.sources import tag_record
from transforms.stage_io import encode_kept, encode_outcome

# Outcomes per batch (``stage_io.encode_batch``) that ReadAndFilter emits, and the record bytes (image + caption) at which a
# batch closes earlier: the per-element costs of the runner are paid once per batch, and a worker holds
# at most one batch beyond the unit it reads.
BATCH_RECORDS = 1024
BATCH_BYTES = 16 * 1024 * 1024


class ReadAndFilterFn(ReadInputUnitFn):
    """``ReadInputUnitFn`` + ``tag_record`` + ``filter_record`` fused: the records of a unit never
    leave this step as Pairs, only as Outcomes. On the DirectRunner every step costs a few µs per
    element and every extra Pair copy a few more; the filters themselves cost ~30 µs a caption.

    Args:
        resolved: the resolved input (``transforms.ingest.resolve_input``).
        filters: the filter chain (caption filters, then image filters).
        flaggers: quality flaggers run on kept records.
        tag: apply ``tag_record(record, name, license)`` (named sources or a configured licence).
        name, license: the source's name and configured licence.
        batch_records: 0 to emit each ``Outcome`` alone; otherwise emit batches (``encode_batch``) of
            at most this many outcomes, closed early once their records hold ``batch_bytes`` (image + caption).
    """

    def __init__(self, resolved: ResolvedInput, filters: Sequence[BaseFilter], flaggers: Sequence = (),
                 tag: bool = False, name: str | None = None, license: str | None = None,
                 batch_records: int = 0, batch_bytes: int = BATCH_BYTES):
        super().__init__(resolved)
        if batch_records < 0 or batch_bytes < 1:
            raise ValueError("batch_records must be >= 0 and batch_bytes >= 1")
        self.filters = list(filters)
        self.flaggers = list(flaggers)
        self.tag, self.name, self.license = tag, name, license
        self.batch_records, self.batch_bytes = batch_records, batch_bytes

    def setup(self):
        super().setup()
        self.errors = Metrics.counter("mmcorpus.filter", "errors")

    def process(self, unit):
        if not self.batch_records:
            yield from self._outcomes(unit)
            return
        filters, flaggers, errors = self.filters, self.flaggers, self.errors
        max_records, max_bytes = self.batch_records, self.batch_bytes
        batch: list = []
        size = 0
        kept_bytes = [0]

        def kept(pair, flags):
            # a kept record goes straight to its writer entry (no Pair copy, no Outcome object)
            kept_bytes[0] += len(pair.image or b"") + len(pair.caption or "")
            entry = encode_kept(pair, flags)
            return entry if entry is not None else encode_outcome(kept_outcome(pair, flags))

        for item in self._records(unit):
            r = filter_record(item, filters, flaggers, errors, kept)
            if type(r) is tuple:
                batch.append(r)
            else:
                batch.append(encode_outcome(r))
                if r.pair is not None:
                    size += len(r.pair.image or b"") + len(r.pair.caption or "")
            if len(batch) >= max_records or size + kept_bytes[0] >= max_bytes:
                yield batch
                batch, size, kept_bytes[0] = [], 0, 0
        if batch:
            yield batch

    def _records(self, unit):
        if not self.tag:
            return super().process(unit)
        return (tag_record(item, self.name, self.license) for item in super().process(unit))

    def _outcomes(self, unit):
        filters, flaggers, errors = self.filters, self.flaggers, self.errors
        for item in self._records(unit):
            yield filter_record(item, filters, flaggers, errors)


class ReadAndFilter(beam.PTransform):
    """Raw input → one ``Outcome`` per record (kept with flags, or rejected/error with a reason):
    the units are spread over workers, then each is read and filtered in one step. The outcomes come
    as batches of up to ``BATCH_RECORDS`` (``stage_io.encode_batch``; ``WriteStageOutput`` takes them).

    Args:
        resolved, filters, flaggers, tag, name, license: as for ``ReadAndFilterFn``.

    Example:
        outcomes = p | ReadAndFilter(resolve_input(InputSpec("captions.parquet")), caption_filters(cfg))
    """

    def __init__(self, resolved: ResolvedInput, filters: Sequence[BaseFilter], flaggers: Sequence = (),
                 tag: bool = False, name: str | None = None, license: str | None = None):
        super().__init__()
        if resolved.format == "stage":
            raise ValueError("stage inputs are read with transforms.stage_io.ReadStage")
        self.resolved = resolved
        self.fn = ReadAndFilterFn(resolved, filters, flaggers, tag, name, license, batch_records=BATCH_RECORDS)

    def expand(self, pbegin):
        return (
            pbegin
            | "InputFiles" >> beam.Create(list(self.resolved.files))
            | "Units" >> beam.ParDo(ExpandUnitsFn(self.resolved))
            | "SpreadUnits" >> beam.Reshuffle()
            | "ReadAndFilter" >> beam.ParDo(self.fn)
        )
