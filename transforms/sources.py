"""Many sources in one run: ``--input NAME=DIR`` parsing, per-source tagging (dataset, licence, key prefix).

Key rule: a record read through a named input gets the key ``NAME-KEY`` (``NAME`` has no ``-``, so
the prefix is unambiguous); img2dataset keys are 9-digit counters that collide across runs, so the
prefix is applied whenever a name is given, not only when a collision is seen. A record that already
carries a ``dataset`` (it was named at an earlier stage) keeps its key and dataset. An unnamed single
``--input DIR`` changes nothing (dataset None, keys as before).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

import apache_beam as beam

from schemas.errors import UserError
from schemas.records import Outcome, Pair
from storage.files import input_bytes
from transforms.keys import safe_key
from transforms.stage_io import ReadStage, read_manifest, stage_input_info

SOURCE_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# img2dataset / LAION metadata columns that carry a licence, in the order they are looked for.
LICENSE_META_KEYS = ("license", "LICENSE", "licence")


@dataclass(frozen=True)
class SourceInput:
    """One ``--input`` value: ``name`` is None for a plain ``--input DIR``."""

    name: str | None
    path: str


def parse_inputs(values: list[str] | None, flag: str = "--input") -> list[SourceInput]:
    """Parse repeated ``--input [NAME=]DIR`` values; several inputs must all be named, names unique."""
    if not values:
        raise UserError(f"{flag} is required: pass --input DIR, or --input NAME=DIR once per source")
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if sep and SOURCE_NAME.match(name):
            out.append(SourceInput(name, path))
        elif sep and "/" not in name and ":" not in name:
            raise UserError(
                f"{flag} {v}: source name {name!r} must be 1-32 letters, digits or '_' (it prefixes keys)"
            )
        else:
            out.append(SourceInput(None, v))
    if len(out) > 1 and any(s.name is None for s in out):
        raise UserError(f"{flag}: with several inputs name each one, e.g. --input cc3m=DIR1 --input laion=DIR2")
    names = [s.name for s in out if s.name]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{flag}: source name(s) {dup} given more than once; names must be unique")
    return out


def prefixed_key(name: str, key: str) -> str:
    """``NAME-KEY``, or a hash key when that would be longer than a safe key may be."""
    return safe_key(f"{name}-{key}", name, key)


def license_from_meta(meta: str) -> str | None:
    try:
        d = json.loads(meta or "{}")
    except ValueError:
        return None
    for k in LICENSE_META_KEYS:
        v = d.get(k)
        if isinstance(v, str) and v:
            return v
    return None


def tag_record(element: Pair | Outcome, name: str | None, license: str | None) -> Pair | Outcome:
    """Set dataset, licence and the key prefix of one record (Pair) or pre-filter outcome."""
    if name is None:
        if isinstance(element, Pair) and element.license is None:
            lic = license_from_meta(element.meta) or license
            return element.replace(license=lic) if lic else element
        return element
    if isinstance(element, Outcome):
        if element.key.startswith(f"{name}-"):
            return element
        pair = element.pair
        if pair is not None and pair.dataset is None:
            pair = pair.replace(key=prefixed_key(name, pair.key), dataset=name)
        return Outcome(
            key=prefixed_key(name, element.key), status=element.status, reason=element.reason, pair=pair,
            detail=element.detail, source=element.source, extra=element.extra,
        )
    if element.dataset is not None:  # named at an earlier stage: keep its key and name
        return element
    lic = element.license or license_from_meta(element.meta) or license
    return element.replace(key=prefixed_key(name, element.key), dataset=name, license=lic)


class TagSourceFn(beam.DoFn):
    """Tag every record of one source (see ``tag_record``).

    Args:
        name: the source name (None: unnamed single input).
        license: the source's configured licence, used when the record's metadata has none.
    """

    def __init__(self, name: str | None, license: str | None = None):
        self.name = name
        self.license = license

    def process(self, element):
        yield tag_record(element, self.name, self.license)


# Per-source settings in ``[sources.NAME]``: the licence, and the filter's input flags for that source.
SOURCE_KEYS = ("license", "input_format", "url_col", "caption_col", "key_col", "header")


def source_settings(doc: dict[str, Any], names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``[sources.NAME]`` tables of a config (``SOURCE_KEYS``); unknown names or keys exit 2."""
    table = doc.get("sources", {}) or {}
    if not isinstance(table, dict):
        raise UserError("[sources] must be a table of [sources.NAME] tables")
    names = set(names)
    unknown = sorted(set(table) - names)
    if unknown:
        raise UserError(f"[sources] names {unknown} are not among the --input names {sorted(names)}")
    out = {}
    for n, t in table.items():
        if not isinstance(t, dict):
            raise UserError(f"[sources.{n}] must be a table")
        bad = sorted(set(t) - set(SOURCE_KEYS))
        if bad:
            raise UserError(f"[sources.{n}]: unknown key(s) {bad}; known: {list(SOURCE_KEYS)}")
        for k, v in t.items():
            if not isinstance(v, str):
                raise UserError(f"[sources.{n}] {k}: must be a string, got {v!r}")
        out[n] = dict(t)
    return out


def combined_input_info(infos: list[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    """One input description for several sources: the single source's own when unnamed and alone."""
    if len(infos) == 1 and infos[0][0] is None:
        return infos[0][1]
    h = hashlib.sha256()
    for name, info in infos:
        h.update(f"{name}\x00{info.get('fingerprint')}\x01".encode())
    records = [info.get("records") for _, info in infos]
    return {
        "kind": "sources",
        "fingerprint": h.hexdigest(),
        "records": sum(records) if all(r is not None for r in records) else None,
        "bytes": sum(input_bytes(info) for _, info in infos),  # sizes the shards (runner.resolve_num_shards)
        "sources": {name: info for name, info in infos},
    }


def stage_inputs(values: list[str] | None, flag: str = "--input") -> tuple[list[SourceInput], dict[str, Any]]:
    """``--input [NAME=]DIR`` values of a stage that reads finished stage outputs: the parsed sources
    and one ``input_info`` for them all. A directory without a manifest exits 2 naming it."""
    sources = parse_inputs(values, flag)
    infos = []
    for src in sources:
        try:
            read_manifest(src.path)
        except FileNotFoundError as e:
            raise UserError(f"{flag} {src.path}: {e}") from None
        infos.append((src.name, stage_input_info(src.path)))
    return sources, combined_input_info(infos)


def read_sources(p, sources: list[SourceInput], label: str = "Read"):
    """Read every source's stage output, tag named ones (``TagSourceFn``) and flatten them into one
    PCollection of ``Pair``. A plain single ``--input DIR`` builds exactly the one ``Read`` step it
    always did."""
    parts = []
    for src in sources:
        tag = "" if len(sources) == 1 and src.name is None else f"_{src.name}"
        pairs = p | f"{label}{tag}" >> ReadStage(src.path)
        if src.name is not None:
            pairs = pairs | f"Tag{tag}" >> beam.ParDo(TagSourceFn(src.name))
        parts.append(pairs)
    return parts[0] if len(parts) == 1 else parts | "Sources" >> beam.Flatten()
