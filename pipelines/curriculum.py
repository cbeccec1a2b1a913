"""A three-stage curriculum's plan (sources list, per-run mixture) and what it built, for the DAG and the demo.

The curriculum is: filter over every source (``--input NAME=PATH``) → dedup across them (the sources'
order is the ``source_priority``) → rewrite → ``select --stage 1|2|3`` (stage 2 re-selects against
stage 1, stage 3 against stage 2 and adds the OCR stage's output as one more source) → ``pack
--stage N`` per selection. This module only plans and summarises; the stages are the usual commands.

Example (a sources file; relative paths are relative to the file)::

    [sources.cc3m]                 # listed first: preferred when dedup keeps one of a duplicate pair
    path = "../sample/cc3m_val_captions_8k.tsv"
    caption_col = "0"
    url_col = "1"
    license = "Conceptual Captions terms"
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from typing import Any

from schemas.errors import UserError

# Keys of one source: where it is plus the filter's per-source settings ([sources.NAME] of its config).
SOURCE_KEYS = ("path", "format", "license", "caption_col", "url_col", "key_col", "header")
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")  # the rule of transforms.sources (--input NAME=DIR)
STAGE_PROFILES = (1, 2, 3)


def load_sources(spec: Any, base_dir: str, where: str) -> list[dict[str, Any]]:
    """The sources of a curriculum, in priority order: ``[{"name", "path", ...settings}]``.

    Args:
        spec: ``{name: {path, format?, license?, caption_col?, url_col?, key_col?, header?}}`` (a dict,
            its JSON text, or a TOML document with a ``[sources]`` table).
        base_dir: relative ``path`` values are resolved against it (URLs such as ``gs://`` are kept).
        where: names the spec in error messages (a file, or the DAG param).
    """
    if isinstance(spec, str):
        spec = json.loads(spec)
    if isinstance(spec, dict) and set(spec) == {"sources"}:
        spec = spec["sources"]
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{where}: expected a non-empty table of sources, name -> {{path = ..., ...}}")
    out = []
    for name, settings in spec.items():
        if not SOURCE_NAME.match(name):
            raise UserError(f"{where}: source name {name!r} must be 1-32 letters, digits or _")
        if not isinstance(settings, dict):
            raise UserError(f"{where}: sources.{name} must be a table, got {settings!r}")
        unknown = sorted(set(settings) - set(SOURCE_KEYS))
        if unknown:
            raise UserError(f"{where}: sources.{name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(SOURCE_KEYS)})")
        path = settings.get("path")
        if not path:
            raise UserError(f"{where}: sources.{name}.path is missing")
        if "://" not in path:
            path = os.path.normpath(os.path.join(base_dir, path))
            if not os.path.exists(path):
                raise UserError(f"{where}: sources.{name}.path {path} does not exist")
        out.append({**{k: str(v) for k, v in settings.items()}, "name": name, "path": path})
    return out


def load_sources_file(path: str) -> list[dict[str, Any]]:
    """``load_sources`` of a TOML file (relative paths relative to the file)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"sources file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"sources file {path} is not valid TOML: {e}") from None
    return load_sources(doc, os.path.dirname(os.path.abspath(path)), path)


def filter_inputs(sources: list[dict[str, Any]]) -> list[str]:
    """The filter's ``--input NAME=PATH`` values."""
    return [f"{s['name']}={s['path']}" for s in sources]


def stage_config(sources: list[dict[str, Any]]) -> dict[str, Any]:
    """The filter/dedup config: ``[sources.NAME]`` settings and ``[dedup] source_priority`` = list order."""
    table = {}
    for s in sources:
        settings = {("input_format" if k == "format" else k): v for k, v in s.items() if k not in ("name", "path")}
        if settings:
            table[s["name"]] = settings
    return {"sources": table, "dedup": {"source_priority": [s["name"] for s in sources]}}


def run_mix(doc: dict[str, Any], earlier: dict[int, str], stage2_overlap: str | None = None) -> dict[str, Any]:
    """A mix config for one curriculum run: ``[select.stage2] earlier`` = this run's stage-1
    selection and ``[select.stage3] earlier`` = its stage-2 one (whatever the file said), and
    stage 2's ``overlap`` from ``stage2_overlap`` when given (``disjoint`` | ``allow``)."""
    out = copy.deepcopy(doc)
    select = out.setdefault("select", {})
    if not isinstance(select, dict):
        raise UserError("mix config: [select] must be a table")
    for stage, path in earlier.items():
        select.setdefault(f"stage{stage}", {})["earlier"] = path
    if stage2_overlap:
        if stage2_overlap not in ("disjoint", "allow"):
            raise UserError(f"stage2_overlap must be disjoint or allow, not {stage2_overlap!r}")
        select.setdefault("stage2", {})["overlap"] = stage2_overlap
    return out


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v, ensure_ascii=False)  # a JSON string or number is a valid TOML one
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise UserError(f"cannot write {v!r} to TOML")


def dump_toml(doc: dict[str, Any]) -> str:
    """TOML text of a document of tables, strings, numbers, booleans and lists (what these configs hold)."""
    lines: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and (scalars or not node):
            lines.append(f"[{prefix}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in node.items():
            if isinstance(v, dict):
                table(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    table("", doc)
    return "\n".join(lines) + "\n"


def write_toml(doc: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump_toml(doc))
    return path


def stage_summary(select_dir: str, pack_dir: str) -> dict[str, Any]:
    """What one curriculum stage holds: pairs selected (and replicas), the pack's samples, tokens,
    packs and fill, and the achieved shares per dataset and language (from mixture.json)."""
    from transforms.stage_io import read_manifest

    sel, pack = read_manifest(select_dir), read_manifest(pack_dir)
    mix, x = sel.extra.get("mixture", {}), pack.extra

    def shares(axis: str) -> dict[str, float]:
        return {k: row.get("achieved_pct") for k, row in (mix.get(axis) or {}).items() if row.get("achieved")}

    return {
        "stage": mix.get("stage"), "profile": (pack.config.get("profile") or {}).get("stage"),
        "select_dir": select_dir, "pack_dir": pack_dir,
        "pairs": mix.get("selected"), "target_pairs": mix.get("target_pairs"), "replicas": mix.get("replicas"),
        "shortfall": mix.get("shortfall"), "overlap": (mix.get("earlier") or {}).get("overlap"),
        "packed_samples": x.get("packed_samples"), "tokens": x.get("pack_tokens"), "packs": x.get("packs"),
        "fill": x.get("pack_fill"), "by_dataset": shares("by_dataset"), "by_lang": shares("by_lang"),
        "by_text_rich": shares("by_text_rich"),
    }
