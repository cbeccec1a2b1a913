"""Typed records (Pair, LedgerRow) and their Arrow schemas: the only place column names live."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

# --- statuses --------------------------------------------------------------------------------
KEPT = "kept"
REJECTED = "rejected"
DUPLICATE = "duplicate"
ERROR = "error"
STATUSES = (KEPT, REJECTED, DUPLICATE, ERROR)

# Reason written on every `kept` ledger row.
REASON_OK = "ok"

# Longest `detail` stored in a ledger row: a 1 MB caption must never be copied into the ledger.
MAX_DETAIL_CHARS = 300

QA_TYPE = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))


@dataclass
class Pair:
    """One image–caption sample as it moves between stages.

    Args:
        key: stable sample key (no dots, no slashes); see ``transforms.keys``.
        url: where the image came from (metadata only, never fetched by mmcorpus).
        caption: the caption text the next stage should use (after rewriting: the adopted answer).
        image: encoded image bytes, or None in the caption-only metadata pass.
        image_format: PIL format name (``JPEG``, ``PNG``, ``WEBP``) once the image filter decoded it.
        width, height: image size in pixels, when known.
        image_sha256: hex sha256 of ``image`` (exact image dedup), when an image is present.
        source: where the record was read from, relative to the input root (``file#row`` or ``file:member``).
        meta: canonical JSON (sorted keys) of extra source metadata, e.g. img2dataset's ``.json``.
        quality_flags: why a kept caption should be rewritten (empty: caption is fine).
        needs_rewrite: ``bool(quality_flags)``; what the rewrite stage selects on.
        raw_caption: the caption before the rewrite stage replaced it (None before rewriting).
        qa: question–answer pairs produced by the rewriter, as ``[{"question": .., "answer": ..}]``.
        rewrite_model, prompt_version: provenance of the rewrite.
        cluster_id, cluster_size: set by dedup on the kept representative of a duplicate cluster.
        dataset: the source name given as ``--input NAME=DIR`` (None for an unnamed single input).
        license: the record's licence, from img2dataset metadata or the source's configured value.
        replica: set by ``select`` on an upsampled copy (1, 2, ...); None on an original record.
        lang: the caption's language as the filter stage identified it (ISO 639-1, ``und`` when
            undetermined; None in files written before language identification existed).
        lang_score: confidence of ``lang`` in [0, 1].
        ocr: canonical JSON of the OCR stage's result (boxes, texts, scores, text-area ratio, chars,
            ``text_rich``); None before the OCR stage.
        safety: canonical JSON of the safety flags (NSFW score, PII rules, watermark, LAION metadata).

    Example:
        >>> p = Pair(key="abc123", url=None, caption="a dog on a beach")
        >>> Pair.from_row(p.to_row()) == p
        True
    """

    key: str
    url: str | None = None
    caption: str | None = None
    image: bytes | None = None
    image_format: str | None = None
    width: int | None = None
    height: int | None = None
    image_sha256: str | None = None
    source: str = ""
    meta: str = "{}"
    quality_flags: list[str] = field(default_factory=list)
    needs_rewrite: bool = False
    raw_caption: str | None = None
    qa: list[dict[str, str]] | None = None
    rewrite_model: str | None = None
    prompt_version: str | None = None
    cluster_id: str | None = None
    cluster_size: int | None = None
    # --- sources and selection (issue 13) ---
    dataset: str | None = None
    license: str | None = None
    replica: int | None = None
    # --- language (issue 11) ---
    lang: str | None = None
    lang_score: float | None = None
    # --- image models (OCR stage, issue 12) ---
    ocr: str | None = None
    safety: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Pair":
        kwargs = {name: row[name] for name in PAIR_FIELDS if name in row}
        if kwargs.get("quality_flags") is None:
            kwargs["quality_flags"] = []
        if kwargs.get("meta") is None:
            kwargs["meta"] = "{}"
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "Pair":
        return dataclasses.replace(self, **changes)

    def meta_dict(self) -> dict[str, Any]:
        return json.loads(self.meta or "{}")


PAIR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_sha256", pa.string()),
        pa.field("source", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("quality_flags", pa.list_(pa.string())),
        pa.field("needs_rewrite", pa.bool_()),
        pa.field("raw_caption", pa.string()),
        pa.field("qa", QA_TYPE),
        pa.field("rewrite_model", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("cluster_id", pa.string()),
        pa.field("cluster_size", pa.int64()),
        # --- sources and selection (issue 13) ---
        pa.field("dataset", pa.string()),
        pa.field("license", pa.string()),
        pa.field("replica", pa.int32()),
        pa.field("lang", pa.string()),
        pa.field("lang_score", pa.float64()),
        # --- image models (OCR stage, issue 12) ---
        pa.field("ocr", pa.string()),
        pa.field("safety", pa.string()),
    ]
)
PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(Pair))
assert PAIR_FIELDS == tuple(PAIR_SCHEMA.names), "Pair and PAIR_SCHEMA disagree"


@dataclass
class LedgerRow:
    """What one stage decided about one input record. Exactly one per input record per stage.

    Args:
        key: the sample key (a synthetic safe key when the input had none or a hostile one).
        stage: ``filter``, ``dedup``, ``rewrite``, ``pack``.
        status: one of ``kept | rejected | duplicate | error``.
        reason: from the fixed vocabulary in ``schemas.reasons`` (``ok`` for kept rows).
        detail: short human-readable context (truncated to ``MAX_DETAIL_CHARS``; never secrets).
        source: where the record came from (``file#row`` / ``file:member``).
        cluster_id, kept_key: dedup columns.
        model, prompt_version: rewrite columns.
    """

    key: str
    stage: str
    status: str
    reason: str
    detail: str = ""
    source: str = ""
    cluster_id: str | None = None
    kept_key: str | None = None
    model: str | None = None
    prompt_version: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "LedgerRow":
        return cls(**{name: row[name] for name in LEDGER_FIELDS if name in row})


LEDGER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("source", pa.string()),
        pa.field("cluster_id", pa.string()),
        pa.field("kept_key", pa.string()),
        pa.field("model", pa.string()),
        pa.field("prompt_version", pa.string()),
    ]
)
LEDGER_FIELDS = tuple(f.name for f in dataclasses.fields(LedgerRow))
assert LEDGER_FIELDS == tuple(LEDGER_SCHEMA.names), "LedgerRow and LEDGER_SCHEMA disagree"

# Extra ledger columns a stage may set through ``Outcome.extra``.
LEDGER_EXTRA_FIELDS = ("cluster_id", "kept_key", "model", "prompt_version")


# Object addresses in exception texts (PIL: "cannot identify image file <_io.BytesIO object at 0x7f...>")
# differ from run to run; a ledger must not.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def truncate_detail(text: str) -> str:
    """Shorten free text for the ledger, keeping it valid UTF-8, single-line and free of per-run
    object addresses (so reruns stay byte-identical)."""
    text = _ADDRESS.sub("", text.replace("\n", " ").replace("\r", " "))
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 20] + f"...[{len(text)} chars]"
    return text


@dataclass
class Outcome:
    """What a stage transform emits for each input record; ``WriteStageOutput`` turns it into
    a data row (when kept) and exactly one ledger row.

    Args:
        key: sample key.
        status: ``kept | rejected | duplicate | error``.
        reason: vocabulary reason (``ok`` when kept).
        pair: the record to write; required when kept, optional otherwise (never written).
        detail: short context for the ledger.
        source: ``file#row`` of the input record (taken from ``pair.source`` when omitted).
        extra: stage ledger columns (``cluster_id``, ``kept_key``, ``model``, ``prompt_version``).
    """

    key: str
    status: str
    reason: str
    pair: Pair | None = None
    detail: str = ""
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def kept(cls, pair: Pair, **extra: str) -> "Outcome":
        return cls(key=pair.key, status=KEPT, reason=REASON_OK, pair=pair, source=pair.source, extra=extra)

    @classmethod
    def dropped(cls, pair: Pair, status: str, reason: str, detail: str = "", **extra: str) -> "Outcome":
        return cls(key=pair.key, status=status, reason=reason, detail=detail, source=pair.source, extra=extra)

    def ledger_row(self, stage: str) -> LedgerRow:
        unknown = set(self.extra) - set(LEDGER_EXTRA_FIELDS)
        if unknown:
            raise ValueError(f"unknown ledger columns in Outcome.extra: {sorted(unknown)}")
        return LedgerRow(
            key=self.key,
            stage=stage,
            status=self.status,
            reason=self.reason,
            detail=truncate_detail(self.detail),
            source=self.source or (self.pair.source if self.pair else ""),
            **self.extra,
        )


def pairs_to_table(pairs: Iterable[Pair]) -> pa.Table:
    rows = [p.to_row() for p in pairs]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def ledger_to_table(rows: Iterable[LedgerRow]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in rows], schema=LEDGER_SCHEMA)


def table_to_pairs(table: pa.Table) -> list[Pair]:
    return [Pair.from_row(r) for r in table.to_pylist()]
