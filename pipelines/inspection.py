"""``mmcorpus inspect DIR``: what a stage output (or a whole run) holds, decoded samples or packs,
and the fate of one sample key across every stage of a run.

(Named ``inspection.py``, not ``inspect.py``: a ``pipelines/inspect.py`` would shadow the standard
library's ``inspect`` for every ``python pipelines/<stage>.py`` run, which puts ``pipelines/`` first
on ``sys.path`` — and Beam, dataclasses and Airflow's Beam operator all rely on those file runs.)

Examples:
    mmcorpus inspect build/demo/filter                 # stage, config hash, counts by reason, files
    mmcorpus inspect build/demo/photos                 # one line per stage of the run
    mmcorpus inspect build/demo                        # every run below it, at any depth
    mmcorpus inspect build/demo/pack --samples 2       # two decoded packs
    mmcorpus inspect build/demo/filter --key 0006400c1c224e19   # its fate in filter, dedup, rewrite, pack
    mmcorpus inspect build/demo/dedup --json           # the same facts for scripts
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from rich.markup import escape

from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA, FILE_KIND_LEDGER, MANIFEST_NAME, Manifest, shard_name
from schemas.records import STATUSES
from transforms.stage_io import join, read_bytes, read_manifest, shard_of

# Pipeline order of the stages; other stage names sort after these, alphabetically.
STAGE_ORDER = ("synthdoc", "filter", "dedup", "ocr", "rewrite", "pack", "rlaifv_generate", "rlaifv_feedback", "rlaifv_pairs")
INDEX_NAME = "index.json"
# A run of image placeholder tokens (e.g. 96 x "<unk>") is shown as one marker.
_PLACEHOLDER_RUN = re.compile(r"(<unk>){2,}")


# --- locating stage outputs --------------------------------------------------------------------


def is_stage_dir(path: str) -> bool:
    return FileSystems.exists(join(path, MANIFEST_NAME))


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def run_root(path: str) -> str:
    """The run directory of a stage output (its parent), or ``path`` itself when it is a run."""
    path = path.rstrip("/")
    if is_stage_dir(path):
        parent = path.rsplit("/", 1)[0] if "/" in path else "."
        return parent
    return path


def run_stage_dirs(path: str) -> list[tuple[str, str]]:
    """``[(stage, dir)]`` of every finished stage output in the run that ``path`` belongs to,
    in pipeline order (filter, dedup, rewrite, pack, then others)."""
    root = run_root(path)
    matches = FileSystems.match([join(root, "*", MANIFEST_NAME)])[0].metadata_list
    found = []
    for m in matches:
        stage_dir = m.path[: -len(MANIFEST_NAME) - 1]
        try:
            stage = read_manifest(stage_dir).stage
        except Exception:  # a torn manifest: not a finished stage output, leave it out
            continue
        found.append((stage, stage_dir))
    return sorted(found, key=lambda s: (_stage_rank(s[0]), s[1]))


def find_runs(path: str) -> list[str]:
    """Every run directory at or below ``path``, at any depth, sorted: the parents of the finished
    stage outputs (directories holding a ``manifest.json``) found below it."""
    path = path.rstrip("/") or "/"
    found = FileSystems.match([join(path, "**", MANIFEST_NAME)])[0].metadata_list
    stage_dirs = {m.path[: -len(MANIFEST_NAME) - 1] for m in found}
    # a manifest below a stage output (none today) belongs to that output, not to a run of its own
    stage_dirs = {d for d in stage_dirs if not any(d.startswith(o + "/") for o in stage_dirs if o != d)}
    return sorted({d.rsplit("/", 1)[0] for d in stage_dirs if "/" in d})


def _require_dir(path: str) -> None:
    if not FileSystems.exists(path) and not FileSystems.match([join(path, "*")])[0].metadata_list:
        raise UserError(f"{path} does not exist: pass a stage output directory (with {MANIFEST_NAME}) or a run directory")


# --- reading -----------------------------------------------------------------------------------


def _read_parquet(path: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(f, columns=columns, filters=filters)


def read_index(stage_dir: str, m: Manifest | None = None) -> dict | None:
    """``index.json`` of a pack output (wherever the manifest lists it), or None."""
    m = m or read_manifest(stage_dir)
    for f in m.files:
        if f.path == INDEX_NAME or f.path.endswith("/" + INDEX_NAME):
            return json.loads(read_bytes(join(stage_dir, f.path)).decode("utf-8"))
    return None


def _file_groups(m: Manifest) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = {}
    for f in m.files:
        g = groups.setdefault(f.kind, {"files": 0, "rows": 0, "bytes": 0})
        g["files"] += 1
        g["rows"] += f.rows
        g["bytes"] += f.bytes
    return dict(sorted(groups.items()))


def pack_files(stage_dir: str, m: Manifest | None = None) -> list[str]:
    """Paths of the pack shards (Parquet or WebDataset tars) of a pack output: the files that are
    neither data, ledger nor the index."""
    m = m or read_manifest(stage_dir)
    return [join(stage_dir, f.path) for f in sorted(m.files, key=lambda f: f.path)
            if f.kind not in (FILE_KIND_DATA, FILE_KIND_LEDGER) and f.path.endswith((".parquet", ".tar"))]


def _first_col(names: list[str], *candidates: str) -> str | None:
    for c in candidates:
        if c in names:
            return c
    return None


def _tar_pack_rows(path: str) -> list[dict]:
    """Packs of one WebDataset shard: the ``.json`` metadata plus the token arrays (``.npy``)."""
    import io
    import tarfile

    import numpy as np

    packs: dict[str, dict] = {}
    with FileSystems.open(path, compression_type="uncompressed") as f:
        with tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                row = packs.setdefault(key, {"pack_id": key, "images": 0})
                data = tar.extractfile(member).read()
                if ext == "json":
                    row.update(json.loads(data))
                elif ext.endswith(".npy"):
                    row[ext[: -len(".npy")]] = np.load(io.BytesIO(data)).tolist()
                elif ext.endswith(".jpg"):
                    row["images"] += 1
    rows = []
    for key in sorted(packs):
        row = packs[key]
        row["num_images"] = row.pop("images")
        rows.append(row)
    return rows


# The pack columns the summaries need: no token ids, no image bytes.
MEASURE_COLUMNS = ("pack_id", "seq_len", "num_tokens", "num_samples", "cu_seqlens", "sample_keys", "image_offset")


def pack_table(stage_dir: str, m: Manifest | None = None, limit: int | None = None,
               columns: tuple[str, ...] | None = None) -> pa.Table | None:
    """All packs of a pack output as one table (the first ``limit`` when given; only ``columns`` of
    Parquet shards when given); WebDataset shards become rows with the same column names as the
    Parquet layout (plus ``num_images``)."""
    tables, n = [], 0
    for path in pack_files(stage_dir, m):
        if path.endswith(".tar"):
            rows = _tar_pack_rows(path)
            t = pa.Table.from_pylist(rows) if rows else None
        elif columns is not None:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                names = pq.ParquetFile(f).schema_arrow.names
            t = _read_parquet(path, columns=[c for c in columns if c in names])
        else:
            t = _read_parquet(path)
        if t is None:
            continue
        tables.append(t)
        n += t.num_rows
        if limit is not None and n >= limit:
            break
    if not tables:
        return None
    t = pa.concat_tables(tables, promote_options="default")
    return t.slice(0, limit) if limit is not None else t


def pack_measures(table: pa.Table, seq_len: int | None) -> dict[str, list]:
    """Per pack: samples, tokens, fill (tokens / seq_len), images; per sample: tokens
    (from ``cu_seqlens``)."""
    names = table.column_names
    out: dict[str, list] = {"sample_tokens": [], "pack_tokens": [], "pack_fill": [], "pack_images": [], "pack_samples": []}
    cus = table.column("cu_seqlens").to_pylist() if "cu_seqlens" in names else [None] * table.num_rows
    if "seq_len" in names:
        widths = table.column("seq_len").to_pylist()
    elif "input_ids" in names:
        widths = pc.list_value_length(table.column("input_ids")).to_pylist()
    else:
        widths = [None] * table.num_rows
    if "num_images" in names:
        imgs = table.column("num_images").to_pylist()
    elif "image_offset" in names:
        imgs = pc.list_value_length(table.column("image_offset")).to_pylist()
    elif "images" in names:
        imgs = pc.list_value_length(table.column("images")).to_pylist()
    else:
        imgs = [None] * table.num_rows
    for cu, width, n_img in zip(cus, widths, imgs):
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])] if cu else []
        used = sum(lengths)
        out["sample_tokens"].extend(lengths)
        out["pack_tokens"].append(used)
        out["pack_samples"].append(len(lengths))
        denom = width or seq_len
        out["pack_fill"].append(used / denom if denom else None)
        out["pack_images"].append(n_img)
    return out


def _seq_len(m: Manifest, index: dict | None) -> int | None:
    for src in (m.extra, m.config, index or {}):
        for k in ("seq_len", "sequence_length"):
            v = src.get(k) if isinstance(src, dict) else None
            if isinstance(v, int):
                return v
        for v in (src.values() if isinstance(src, dict) else []):
            if isinstance(v, dict) and isinstance(v.get("seq_len"), int):
                return v["seq_len"]
    return None


def _summary_stats(values: list) -> dict[str, float] | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    n = len(vals)
    return {"n": n, "min": vals[0], "mean": sum(vals) / n, "median": vals[n // 2], "max": vals[-1]}


def pack_summary(stage_dir: str, m: Manifest) -> dict[str, Any] | None:
    """Packs, tokens, fill and images per pack of a pack output (from its Parquet shards and index)."""
    index = read_index(stage_dir, m)
    table = pack_table(stage_dir, m, columns=MEASURE_COLUMNS)
    if table is None and index is None:
        return None
    out: dict[str, Any] = {"shards": len(pack_files(stage_dir, m)) or len((index or {}).get("shards", []))}
    seq_len = _seq_len(m, index)
    out["seq_len"] = seq_len
    if table is not None:
        meas = pack_measures(table, seq_len)
        out["packs"] = table.num_rows
        out["samples"] = sum(meas["pack_samples"])
        out["tokens"] = sum(meas["pack_tokens"])
        if seq_len:
            out["token_fill"] = out["tokens"] / (seq_len * table.num_rows) if table.num_rows else None
        out["fill_per_pack"] = _summary_stats(meas["pack_fill"])
        out["samples_per_pack"] = _summary_stats(meas["pack_samples"])
        out["images_per_pack"] = _summary_stats(meas["pack_images"])
        out["tokens_per_sample"] = _summary_stats(meas["sample_tokens"])
    if index is not None:
        out["index"] = {k: v for k, v in index.items() if not isinstance(v, (list, dict))}
        if isinstance(index.get("totals"), dict):
            out["index"]["totals"] = index["totals"]
    return out


def describe(stage_dir: str) -> dict[str, Any]:
    """Everything ``inspect`` shows about one stage output, as plain JSON-able data."""
    m = read_manifest(stage_dir)
    counts = m.counts
    by_reason = counts.get("by_reason", {})
    reasons = [
        {"status": k.split("/", 1)[0], "reason": k.split("/", 1)[1] if "/" in k else "", "count": n}
        for k, n in by_reason.items()
    ]
    reasons.sort(key=lambda r: (STATUSES.index(r["status"]) if r["status"] in STATUSES else 9, -r["count"], r["reason"]))
    info: dict[str, Any] = {
        "dir": stage_dir,
        "stage": m.stage,
        "software_version": m.software_version,
        "config_hash": m.config_hash,
        "config": m.config,
        "input": m.input,
        "counts": {
            "inputs": counts.get("inputs"),
            "ledger_rows": counts.get("ledger_rows"),
            "outputs": counts.get("outputs"),
            "by_status": counts.get("by_status", {}),
        },
        "reasons": reasons,
        "files": _file_groups(m),
        "invariants": {
            "inputs_eq_ledger_rows": counts.get("inputs") == counts.get("ledger_rows"),
            "kept_eq_outputs": counts.get("by_status", {}).get("kept") == counts.get("outputs"),
        },
        "extra": m.extra,
    }
    packs = pack_summary(stage_dir, m)
    if packs is not None:
        info["packs"] = packs
    languages = language_counts(stage_dir, m)
    if languages:
        info["languages"] = languages
    by_dataset = dataset_counts(stage_dir, m)
    if by_dataset:
        info["by_dataset"] = by_dataset
    return info


def dataset_counts(stage_dir: str, m: Manifest) -> dict[str, dict[str, int]] | None:
    """Ledger rows per source dataset and status (issue 13), or None for a single unnamed source.
    A ledger row's dataset is its key's ``NAME-`` prefix (``transforms.sources``) when NAME is a
    dataset of the output: one in its data's ``dataset`` column, one a ``select`` mixture or a pack
    (``extra.datasets``, pack shards have no dataset column) lists, or a named ``--input``, so a
    dataset none of whose records was kept still gets its row. Replicas made by ``select`` count as
    kept rows of their dataset."""
    names: set[str] = set()
    for entry in m.files_of("data"):
        try:
            col = _read_parquet(join(stage_dir, entry.path), columns=["dataset"]).column("dataset")
        except (KeyError, ValueError, pa.ArrowInvalid):  # before issue 13, or pack shards: no dataset column
            continue
        names.update(v for v in col.unique().to_pylist() if v is not None)
    names.update((m.extra.get("mixture") or {}).get("by_dataset") or {})
    names.update(m.extra.get("datasets") or [])
    if m.input.get("kind") == "sources":
        names.update(n for n in m.input.get("sources") or {} if n)
    names.discard("(none)")
    if not names:
        return None
    out: dict[str, Counter] = {}
    known = pa.array(sorted(names), pa.string())
    for entry in m.files_of("ledger"):
        # Counted in Arrow a record batch at a time: a ledger has one row per input record (200M at scale).
        with FileSystems.open(join(stage_dir, entry.path), compression_type="uncompressed") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=65_536, columns=["key", "status"]):
                prefix = pc.fill_null(pc.struct_field(pc.extract_regex(batch.column("key"), r"^(?P<p>[^-]*)-"), [0]), "")
                ds = pc.if_else(pc.is_in(prefix, value_set=known), prefix, "(none)")
                pairs = pa.table({"ds": ds, "status": batch.column("status")})
                counts = pairs.group_by(["ds", "status"]).aggregate([([], "count_all")])
                for row in counts.to_pylist():
                    out.setdefault(row["ds"], Counter())[row["status"]] += row["count_all"]
    return {name: dict(sorted(c.items())) for name, c in sorted(out.items())}


def describe_run(path: str) -> dict[str, Any]:
    stages = run_stage_dirs(path)
    return {
        "run": run_root(path),
        "stages": [
            {
                "stage": stage,
                "dir": d,
                "config_hash": (m := read_manifest(d)).config_hash,
                "inputs": m.counts.get("inputs"),
                "outputs": m.counts.get("outputs"),
                "by_status": m.counts.get("by_status", {}),
            }
            for stage, d in stages
        ],
    }


# --- samples -------------------------------------------------------------------------------------


def collapse_placeholders(text: str) -> str:
    """``<image><unk><unk>...</image>`` → ``<image><unk>×96</image>``: readable pack text."""
    return _PLACEHOLDER_RUN.sub(lambda mt: f"<unk>×{len(mt.group(0)) // len('<unk>')}", text)


def _load_tokenizer(m: Manifest):
    """The pack stage's tokenizer (``tokenizers`` JSON) when its config names a readable file,
    else the bundled default one; None when neither loads (then packs show token counts only)."""
    import os

    candidates = []

    def scan(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                scan(v)
            elif "tokenizer" in k and isinstance(v, str) and not any(x in k for x in ("sha", "hash")):
                candidates.append(v)

    scan(m.config)
    try:
        from transforms.tokens import DEFAULT_TOKENIZER

        candidates.append(str(DEFAULT_TOKENIZER))
    except Exception:  # pack dependencies not importable
        pass
    for path in candidates:
        f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(f):
            continue
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(f)
        except Exception:  # not a tokenizers JSON: try the next candidate
            continue
    return None


def sample_records(stage_dir: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` kept records (by key) of a stage output, decoded for people."""
    m = read_manifest(stage_dir)
    rows: list[dict] = []
    for f in sorted(m.files_of(FILE_KIND_DATA), key=lambda f: f.path):
        t = _read_parquet(join(stage_dir, f.path), columns=None)
        rows.extend(t.drop_columns(["image"]).to_pylist())
    rows.sort(key=lambda r: r["key"])
    out = []
    for r in rows[:n]:
        rec = {
            "key": r["key"],
            "caption": r.get("caption"),
            "raw_caption": r.get("raw_caption"),
            "qa": r.get("qa") or [],
            "image": None if r.get("width") is None else f"{r.get('width')}x{r.get('height')} {r.get('image_format') or ''}".strip(),
            "quality_flags": r.get("quality_flags") or [],
            "source": r.get("source"),
        }
        if r.get("cluster_id"):
            rec["cluster"] = {"id": r["cluster_id"], "size": r.get("cluster_size")}
        if r.get("rewrite_model"):
            rec["rewrite"] = {"model": r["rewrite_model"], "prompt_version": r.get("prompt_version")}
        out.append(rec)
    return out


def sample_packs(stage_dir: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` packs of a pack output: keys, sample lengths, images, and the text."""
    m = read_manifest(stage_dir)
    table = pack_table(stage_dir, m, limit=n)
    if table is None:
        return []
    tok = _load_tokenizer(m)
    seq_len = _seq_len(m, read_index(stage_dir, m))
    names = table.column_names
    keys_col = _first_col(names, "sample_keys", "keys", "sample_key")
    out = []
    meas = pack_measures(table, seq_len)
    for i, row in enumerate(table.to_pylist()):
        cu = row.get("cu_seqlens") or []
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        rec: dict[str, Any] = {
            "pack": i,
            "keys": row.get(keys_col) if keys_col else None,
            "sample_tokens": lengths,
            "tokens": sum(lengths),
            "fill": meas["pack_fill"][i],
            "images": meas["pack_images"][i],
        }
        if row.get("image_grid_cols") is not None:
            rec["slice_grids"] = [f"{c}x{r}" for c, r in zip(row["image_grid_cols"], row.get("image_grid_rows") or [])]
        ids = row.get("input_ids")
        if tok is not None and ids:
            texts = []
            for a, b in zip(cu[:-1], cu[1:]):
                texts.append(collapse_placeholders(tok.decode(ids[a:b], skip_special_tokens=False)))
            rec["text"] = texts
        else:
            rec["text"] = None
        out.append(rec)
    return out


# --- tracing keys --------------------------------------------------------------------------------


def _files_by_shard(files, n, keys: list[str], name_of) -> list[tuple[Any, list[str]]]:
    """``[(file entry, keys it may hold)]``: with ``num_shards`` known, each key goes to the file of
    its shard (all files when none matches); otherwise every file is searched for every key."""
    if not (isinstance(n, int) and n > 0):
        return [(f, list(keys)) for f in files]
    out: dict[str, tuple[Any, list[str]]] = {}
    for key in keys:
        want = name_of(shard_of(key, n), n)
        hit = [f for f in files if want in f.path] or files
        for f in hit:
            out.setdefault(f.path, (f, []))[1].append(key)
    return [out[p] for p in sorted(out)]


def _ledger_rows_for_keys(stage_dir: str, m: Manifest, keys: list[str]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    groups = _files_by_shard(m.files_of(FILE_KIND_LEDGER), m.config.get("num_shards"), keys,
                             lambda i, n: f"part-{i:05d}-of-{n:05d}")
    for f, ks in groups:
        for r in _read_parquet(join(stage_dir, f.path), filters=[("key", "in", ks)]).to_pylist():
            rows.setdefault(r["key"], []).append(r)
    return rows


def _ledger_rows_for_key(stage_dir: str, m: Manifest, key: str) -> list[dict]:
    return _ledger_rows_for_keys(stage_dir, m, [key]).get(key, [])


def _data_rows_for_keys(stage_dir: str, m: Manifest, keys: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f, ks in _files_by_shard(m.files_of(FILE_KIND_DATA), m.config.get("num_shards"), keys, shard_name):
        t = _read_parquet(join(stage_dir, f.path), columns=["key", "caption", "raw_caption", "qa", "cluster_id", "cluster_size"],
                          filters=[("key", "in", ks)])
        for r in t.to_pylist():
            out.setdefault(r["key"], r)
    return out


def _data_row_for_key(stage_dir: str, m: Manifest, key: str) -> dict | None:
    return _data_rows_for_keys(stage_dir, m, [key]).get(key)


def _packs_of_keys(stage_dir: str, m: Manifest, keys: list[str]) -> dict[str, dict]:
    """Where each key sits in the packs (first pack holding it), reading ``sample_keys`` once."""
    wanted, out = set(keys), {}
    for path in pack_files(stage_dir, m):
        if path.endswith(".tar"):
            packs = [r.get("sample_keys") or [] for r in _tar_pack_rows(path)]
        else:
            packs = _read_parquet(path, columns=["sample_keys"]).column("sample_keys").to_pylist()
        for i, ks in enumerate(packs):
            for key in wanted.intersection(ks or ()):
                if key not in out:
                    out[key] = {"shard": path.rsplit("/", 1)[-1], "row": i, "position": ks.index(key), "samples_in_pack": len(ks)}
        if len(out) == len(wanted):
            break
    return out


def _pack_of_key(stage_dir: str, m: Manifest, key: str) -> dict | None:
    return _packs_of_keys(stage_dir, m, [key]).get(key)


def trace_keys(path: str, keys: list[str], locate_packs: bool = True) -> dict[str, dict[str, Any]]:
    """``trace_key`` for many keys at once: each stage's ledger, data and pack shards are read once
    for all of them (only the shards and row groups that can hold them), so tracing a sample of a
    large run costs about as much as tracing one key. ``locate_packs=False`` skips finding each
    key's pack (which reads every pack shard's key lists; the pack ledger's detail names the pack)."""
    stages = run_stage_dirs(path)
    if not stages:
        raise UserError(f"no finished stage outputs (*/{MANIFEST_NAME}) under {run_root(path)}: pass a stage output or run directory")
    keys = sorted(set(keys))
    steps: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for stage, d in stages:
        m = read_manifest(d)
        ledger = _ledger_rows_for_keys(d, m, keys) if keys else {}
        kept = [k for k in keys if ledger.get(k) and ledger[k][0].get("status") == "kept"]
        data = _data_rows_for_keys(d, m, kept) if kept else {}
        packs = _packs_of_keys(d, m, kept) if kept and stage == "pack" and locate_packs else {}
        audits = _rlaifv_audits(d, m, kept) if kept and stage.startswith("rlaifv") else {}
        for key in keys:
            rows = ledger.get(key, [])
            step: dict[str, Any] = {"stage": stage, "dir": d}
            if not rows:
                step["status"] = "absent"
                step["reason"] = ""
            else:
                r = rows[0]
                step.update({k: r.get(k) for k in ("status", "reason", "detail", "source", "cluster_id", "kept_key", "model", "prompt_version")})
                step = {k: v for k, v in step.items() if v not in (None, "")}
                if len(rows) > 1:
                    step["ledger_rows"] = len(rows)
                if r.get("status") == "kept":
                    row = data.get(key)
                    if row is not None:
                        step["caption"] = row.get("caption")
                        if row.get("qa"):
                            step["qa"] = row["qa"]
                        if row.get("cluster_size"):
                            step["cluster_size"] = row["cluster_size"]
                    if key in packs:
                        step["pack"] = packs[key]
                    if audits.get(key):
                        step["rlaifv"] = audits[key]
            steps[key].append(step)
    out = {}
    for key in keys:
        final = next((s for s in reversed(steps[key]) if s["status"] != "absent"), None)
        out[key] = {"key": key, "run": run_root(path), "steps": steps[key],
                    "fate": "never seen" if final is None else f"{final['status']} at {final['stage']}" + (
                        f" ({final['reason']})" if final.get("reason") not in (None, "", "ok") else "")}
    return out


def _rlaifv_audits(stage_dir: str, m: Manifest, keys: list[str]) -> dict[str, list[str]]:
    """RLAIF-V stages (issue 15): the audit lines (responses, claims, questions, answers, scores, pairs)
    that each kept key's ``meta`` carries."""
    from schemas.rlaifv import audit_lines

    out: dict[str, list[str]] = {}
    for f, ks in _files_by_shard(m.files_of(FILE_KIND_DATA), m.config.get("num_shards"), keys, shard_name):
        for r in _read_parquet(join(stage_dir, f.path), columns=["key", "meta"], filters=[("key", "in", ks)]).to_pylist():
            out.setdefault(r["key"], audit_lines(r["meta"]))
    return out


def trace_key(path: str, key: str) -> dict[str, Any]:
    """The fate of ``key`` in every stage of the run ``path`` belongs to."""
    return trace_keys(path, [key])[key]


# --- rendering -----------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_describe(info: dict[str, Any], console) -> None:
    from rich.table import Table

    head = Table(show_header=False, box=None, padding=(0, 1))
    head.add_row("stage", f"[bold]{info['stage']}[/bold]")
    head.add_row("dir", escape(info["dir"]))
    head.add_row("config hash", info["config_hash"][:16])
    head.add_row("software", info["software_version"])
    inp = info["input"]
    head.add_row("input", f"{inp.get('kind', '?')}" + (f" ({inp['stage']})" if inp.get("stage") else "")
                 + f", fingerprint {str(inp.get('fingerprint', ''))[:16]}")
    c = info["counts"]
    head.add_row("records", f"{_fmt_num(c['inputs'])} in, {_fmt_num(c['outputs'])} kept")
    bad = [k for k, ok in info["invariants"].items() if not ok]
    head.add_row("invariants", "[green]ok[/green]" if not bad else f"[red]violated: {', '.join(bad)}[/red]")
    if info.get("languages"):
        head.add_row("languages", escape(", ".join(f"{k} {v:,}" for k, v in info["languages"].items())))
    console.print(head)

    t = Table(title="ledger: counts by status and reason")
    t.add_column("status")
    t.add_column("reason")
    t.add_column("count", justify="right")
    t.add_column("share", justify="right")
    total = c.get("ledger_rows") or 0
    for r in info["reasons"]:
        share = f"{100 * r['count'] / total:.1f}%" if total else ""
        t.add_row(r["status"], r["reason"], f"{r['count']:,}", share)
    console.print(t)

    f = Table(title="files")
    f.add_column("kind")
    f.add_column("files", justify="right")
    f.add_column("rows", justify="right")
    f.add_column("bytes", justify="right")
    for kind, g in info["files"].items():
        f.add_row(kind, f"{g['files']:,}", f"{g['rows']:,}", _fmt_bytes(g["bytes"]))
    console.print(f)

    packs = info.get("packs")
    if packs:
        p = Table(title="packs")
        p.add_column("measure")
        p.add_column("value", justify="right")
        for k in ("shards", "packs", "samples", "tokens", "seq_len", "token_fill"):
            if packs.get(k) is not None:
                p.add_row(k.replace("_", " "), f"{packs[k]:.2%}" if k == "token_fill" else _fmt_num(packs[k]))
        for k in ("fill_per_pack", "samples_per_pack", "images_per_pack", "tokens_per_sample"):
            s = packs.get(k)
            if s:
                p.add_row(k.replace("_", " "), f"min {_fmt_num(s['min'])} · mean {_fmt_num(s['mean'])} · max {_fmt_num(s['max'])}")
        console.print(p)

    by_ds = info.get("by_dataset")
    if by_ds:
        d = Table(title="ledger rows by dataset")
        d.add_column("dataset")
        for st in STATUSES:
            d.add_column(st, justify="right")
        for name, c in by_ds.items():
            d.add_row(escape(name), *[f"{c.get(st, 0):,}" for st in STATUSES])
        console.print(d)

    mix = (info.get("extra") or {}).get("mixture")
    if mix:
        tokens = mix.get("unit") == "tokens"
        if tokens:  # a token budget: targets in tokens, pairs beside them
            title = (f"mixture (stage {mix.get('stage')}): {mix.get('selected'):,} pairs, "
                     f"{mix.get('selected_tokens'):,} tokens selected of {mix.get('target_tokens'):,} tokens, "
                     f"{mix.get('replicas'):,} replicas, shortfall {mix.get('shortfall_tokens'):,} tokens")
            cols = ("axis", "value", "pool", "pool tokens", "target tokens", "achieved", "achieved tokens",
                    "target %", "achieved tokens %")
            keys = ("pool", "pool_tokens", "target_tokens", "achieved", "achieved_tokens", "target_tokens_pct",
                    "achieved_tokens_pct")
        else:
            title = (f"mixture (stage {mix.get('stage')}): {mix.get('selected'):,} selected of "
                     f"{mix.get('target_pairs'):,}, {mix.get('replicas'):,} replicas, shortfall {mix.get('shortfall'):,}")
            cols = ("axis", "value", "pool", "target", "achieved", "target %", "achieved %")
            keys = ("pool", "target", "achieved", "target_pct", "achieved_pct")
        x = Table(title=title)
        for col in cols:
            x.add_column(col, justify="left" if col in ("axis", "value") else "right")
        for axis in ("by_dataset", "by_lang", "by_text_rich"):
            for value, row in (mix.get(axis) or {}).items():
                x.add_row(axis[3:], escape(value), *[_fmt_num(row.get(k, "-")) for k in keys])
        console.print(x)
        earlier = mix.get("earlier")
        if earlier:
            console.print(escape(f"re-selection against {earlier['path']} ({earlier['overlap_policy']}): "
                                 f"overlap {earlier['overlap']:,} ({earlier['overlap_pct']}%)"))

    flat = _flatten({k: v for k, v in (info.get("extra") or {}).items() if k != "mixture"})
    if flat:
        e = Table(title="stage extra (manifest)")
        e.add_column("key")
        e.add_column("value", justify="right")
        for k, v in flat:
            e.add_row(escape(k), escape(_fmt_num(v)))
        console.print(e)


def _flatten(d: dict, prefix: str = "", limit: int = 40) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, name + ".", limit))
        elif isinstance(v, list):
            if len(v) <= 6 and all(not isinstance(x, (dict, list)) for x in v):
                out.append((name, ", ".join(map(str, v))))
            else:
                out.append((name, f"[{len(v)} items]"))
        else:
            out.append((name, v))
    return out[:limit]


def render_run(info: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=escape(f"run {info['run']}"))
    for col in ("stage", "in", "kept", "rejected", "duplicate", "error", "config"):
        t.add_column(col, justify="left" if col in ("stage", "config") else "right")
    for s in info["stages"]:
        b = s["by_status"]
        t.add_row(escape(_label(s["stage"], s["dir"])), _fmt_num(s["inputs"]), _fmt_num(s["outputs"]), _fmt_num(b.get("rejected", 0)),
                  _fmt_num(b.get("duplicate", 0)), _fmt_num(b.get("error", 0)), s["config_hash"][:12])
    console.print(t)


def render_samples(samples: list[dict], console) -> None:
    from rich.panel import Panel
    from rich.text import Text

    for s in samples:
        body = Text()
        if "pack" in s:
            body.append(f"{len(s['sample_tokens'])} samples, {s['tokens']:,} tokens", style="bold")
            if s.get("fill") is not None:
                body.append(f", fill {s['fill']:.1%}")
            if s.get("images") is not None:
                body.append(f", {s['images']} images")
            if s.get("slice_grids"):
                body.append(f" (slice grids {', '.join(s['slice_grids'])})")
            body.append("\n")
            for j, n_tok in enumerate(s["sample_tokens"]):
                key = s["keys"][j] if s.get("keys") and j < len(s["keys"]) else "?"
                body.append(f"[{j}] {key} ({n_tok} tokens)", style="cyan")
                if s.get("text"):
                    body.append(f": {s['text'][j]}")
                body.append("\n")
            console.print(Panel(body, title=f"pack {s['pack']}"))
            continue
        body.append(s["caption"] or "", style="bold")
        if s.get("raw_caption") and s["raw_caption"] != s["caption"]:
            body.append(f"\nraw: {s['raw_caption']}", style="dim")
        for qa in s.get("qa") or []:
            body.append(f"\nQ: {qa['question']}\nA: {qa['answer']}")
        meta = [x for x in (s.get("image"), ", ".join(s.get("quality_flags") or []), s.get("source")) if x]
        if s.get("cluster"):
            meta.append(f"cluster {s['cluster']['id']} ×{s['cluster']['size']}")
        if meta:
            body.append("\n" + " · ".join(meta), style="dim")
        console.print(Panel(body, title=s["key"]))


def _label(stage: str, stage_dir: str) -> str:
    """``pack`` or, when the directory is named otherwise, ``pack (pack-wds)``."""
    name = stage_dir.rstrip("/").rsplit("/", 1)[-1]
    return stage if name == stage else f"{stage} ({name})"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def render_trace(trace: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=escape(f"key {trace['key']}: {trace['fate']}"))
    for col in ("stage", "status", "reason", "detail", "caption / where"):
        t.add_column(col, overflow="fold")
    for s in trace["steps"]:
        extra = []
        if s.get("kept_key"):
            extra.append(f"kept: {s['kept_key']}")
        if s.get("cluster_id"):
            extra.append(f"cluster {s['cluster_id']}")
        if s.get("model"):
            extra.append(f"model {s['model']}")
        detail = _short(" · ".join([x for x in [s.get("detail", "")] + extra if x]), 90)
        where = _short(s.get("caption") or "", 70)
        if s.get("pack"):
            p = s["pack"]
            where = f"{p['shard']} row {p['row']}, slot {p['position'] + 1} of {p['samples_in_pack']}"
        style = {"kept": "green", "absent": "dim"}.get(s["status"], "red")
        t.add_row(escape(_label(s["stage"], s["dir"])), f"[{style}]{s['status']}[/{style}]", s.get("reason", ""), escape(detail), escape(where))
    console.print(t)
    for s in trace["steps"]:  # RLAIF-V audit, unwrapped plain lines
        if s.get("rlaifv"):
            console.print(f"RLAIF-V audit at {_label(s['stage'], s['dir'])}:", markup=False, soft_wrap=True)
            for line in s["rlaifv"]:
                console.print("  " + line, markup=False, highlight=False, soft_wrap=True)


# --- command ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus inspect", description="Show what an output directory holds.")
    p.add_argument("dir", help="a stage output directory (with manifest.json), a run directory, or any directory "
                                "holding runs at any depth")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--samples", type=int, default=0, metavar="N", help="also show N decoded samples (or packs)")
    p.add_argument("--key", help="trace one sample key through every stage of the run (exit 1 if no stage saw it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.dir.rstrip("/") or "/"
    _require_dir(path)
    result: dict[str, Any] = {}
    if args.key:
        if not is_stage_dir(path) and not run_stage_dirs(path):
            runs = find_runs(path)
            if runs:
                raise UserError(f"--key follows a sample through one run, and {path} holds {len(runs)} runs: "
                                f"pass one of {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}")
        result["trace"] = trace_key(path, args.key)
    elif is_stage_dir(path):
        result["describe"] = describe(path)
    else:
        # A run (stage outputs right below it) or any directory holding runs, at any depth.
        runs = find_runs(path)
        if not runs:
            raise UserError(f"{path} has no {MANIFEST_NAME} and no stage outputs below it: "
                            "pass a finished stage output directory or a run directory")
        if runs == [path]:
            result["run"] = describe_run(path)
        else:
            result["runs"] = [describe_run(r) for r in runs]
    if args.samples > 0:
        if not is_stage_dir(path):
            raise UserError(f"--samples needs a stage output directory, and {path} has no {MANIFEST_NAME}")
        m = read_manifest(path)
        result["samples"] = sample_packs(path, args.samples) if pack_files(path, m) else sample_records(path, args.samples)

    # --key of a key no stage ever saw exits 1, so scripts can tell "unknown" from "dropped".
    code = 1 if "trace" in result and result["trace"]["fate"] == "never seen" else 0
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")
        return code
    from rich.console import Console

    console = Console()
    if "trace" in result:
        render_trace(result["trace"], console)
    if "describe" in result:
        render_describe(result["describe"], console)
    if "run" in result:
        render_run(result["run"], console)
    for run in result.get("runs", []):
        render_run(run, console)
    if "runs" in result:
        console.print(f"{len(result['runs'])} runs below {escape(path)}")
    if "samples" in result:
        render_samples(result["samples"], console)
    return code


# --- counts by caption language (issue 11) ---------------------------------------------------------
def language_counts(stage_dir: str, m: Manifest | None = None, max_rows: int | None = None) -> dict[str, int]:
    """Kept records per caption language (``lang`` column), most frequent first; empty when the
    data files have no language (written before language identification, or with it off)."""
    from collections import Counter

    m = m or read_manifest(stage_dir)
    counts: Counter = Counter()
    n = 0
    for f in sorted(m.files_of(FILE_KIND_DATA), key=lambda f: f.path):
        if not f.path.endswith(".parquet"):
            continue
        path = join(stage_dir, f.path)
        with FileSystems.open(path, compression_type="uncompressed") as fh:
            if "lang" not in pq.ParquetFile(fh).schema_arrow.names:
                return {}
        col = _read_parquet(path, columns=["lang"]).column("lang").to_pylist()
        counts.update(x for x in col if x is not None)
        n += len(col)
        if max_rows is not None and n >= max_rows:
            break
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
