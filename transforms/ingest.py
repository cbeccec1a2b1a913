"""Ingest: read img2dataset output (webdataset tars + status parquet, or parquet with image bytes) and
metadata-only tables (parquet, csv/tsv, jsonl) as Beam sources that split across workers.

Every input record becomes either a ``Pair`` (to be filtered) or an ``Outcome`` that is already a
ledger row (download failures, broken tars, unreadable rows, hostile or oversized members, bad UTF-8
in any text field, captions that are not text). The rules are in docs/inputs.md.
Work is split into units — one tar shard, one parquet row group, one csv/jsonl file — that are
spread over workers with a Reshuffle, so a directory of img2dataset shards reads in parallel.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import lzma
import os
import posixpath
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas.errors import InputSchemaError, UserError
from schemas.manifest import MANIFEST_NAME
from schemas.records import ERROR, REJECTED, Outcome, Pair
from transforms.keys import is_safe_key, record_key, record_key_prefix, safe_key, text_record_key

FORMATS = ("auto", "webdataset", "i2d-parquet", "table", "stage")
TABLE_EXTS = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
# Member extensions taken as the sample's image, in this order. Formats the image filter does not
# accept (gif, bmp, ...) are still handed to it, so the ledger names the format instead of calling
# the image missing.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl", "jp2", "ico")
# Members that are never the image (img2dataset writes txt/json; webdataset users add labels).
TEXT_EXTS = ("txt", "json", "cls", "md", "html")
I2D_IMAGE_COLUMNS = ("jpg", "png", "webp")
SUCCESS = "success"
# Tar shards read (Python's tarfile detects the compression from the magic bytes) ...
TAR_EXTS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# ... and tar shards recognised but not readable here: each becomes a tar_unreadable ledger row.
UNSUPPORTED_TAR_EXTS = (".tar.zst", ".tar.zstd", ".tzst", ".tar.lz4", ".tar.lz", ".tar.br")
# A member larger than this is skipped unread (``member_too_large``): no web image is this big, and
# reading it would put the whole member into a worker's memory.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
# How many bytes at each end of a file go into its fingerprint, next to size and mtime.
FINGERPRINT_EDGE_BYTES = 1 << 20
FINGERPRINT_MODES = ("stat", "content")
# csv's default field limit (128 KiB) would turn a long caption into a crash; the caption filter
# rejects it with a reason instead.
csv.field_size_limit(min(sys.maxsize, 1 << 31 - 1))


@dataclass(frozen=True)
class InputSpec:
    """Where and how to read the input of the first stage.

    Args:
        path: a file, a directory, or a glob (local or a Beam filesystem URL).
        format: ``auto`` (detect), ``webdataset`` (img2dataset tars + sibling status parquet),
            ``i2d-parquet`` (img2dataset parquet output with an image column), ``table`` (metadata:
            parquet, csv, tsv, jsonl), ``stage`` (a finished mmcorpus stage directory).
        url_col, caption_col: column names (or 0-based indexes for header-less csv/tsv), like
            img2dataset's ``--url_col`` / ``--caption_col``.
        key_col: column holding a key; default ``key`` when present, else keys are hashed.
        header: csv/tsv header handling: ``auto`` (names → header, indexes → none), ``yes``, ``no``.
        max_member_bytes: tar members larger than this are skipped unread (``member_too_large``).

    Example:
        InputSpec("data/sample/cc3m_val_captions_8k.tsv", format="table", caption_col="0", url_col="1")
    """

    path: str
    format: str = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    key_col: str | None = None
    header: str = "auto"
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def __post_init__(self):
        if self.max_member_bytes < 1:
            raise ValueError("max_member_bytes must be >= 1")
        if self.format not in FORMATS:
            raise ValueError(f"input format must be one of {FORMATS}, not {self.format!r}")
        if self.header not in ("auto", "yes", "no"):
            raise ValueError(f"header must be auto, yes or no, not {self.header!r}")

    def to_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


@dataclass(frozen=True)
class ResolvedInput:
    """An input after detection on the driver: its format, root, and files."""

    spec: InputSpec
    format: str
    root: str
    files: tuple[str, ...]

    def rel(self, path: str) -> str:
        return relpath(path, self.root)


def relpath(path: str, root: str) -> str:
    if path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1 :]
    return posixpath.basename(path)


def _match(pattern: str) -> list[str]:
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def tar_stem(path: str) -> str | None:
    """``a/00000`` for ``a/00000.tar`` / ``.tar.gz`` / ... (also unsupported compressions); None if not a tar."""
    for ext in TAR_EXTS + UNSUPPORTED_TAR_EXTS:
        if path.endswith(ext):
            return path[: -len(ext)]
    return None


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith(".") for part in relpath(path, root).split("/"))


def _is_dir(path: str) -> bool:
    if "://" in path:
        return path.endswith("/")
    return os.path.isdir(path)


def _parquet_columns(path: str) -> list[str]:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return pq.ParquetFile(f).schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        # A file named .parquet that is not one (or is cut short) stops the run before any work.
        raise InputSchemaError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:120]}); replace it or move it out of the input"
        ) from None


def resolve_input(spec: InputSpec) -> ResolvedInput:
    """Find the input files and the format; raise ``UserError`` naming the path when there is nothing usable."""
    path = spec.path.rstrip("/") if not spec.path.endswith("://") else spec.path
    if _is_dir(path):
        root = path
        if FileSystems.exists(f"{path}/{MANIFEST_NAME}") and spec.format in ("auto", "stage"):
            return ResolvedInput(spec, "stage", root, ())
        # Recursive, so two img2dataset runs copied side by side (run1/, run2/) read as one input.
        files = [p for p in _match(f"{path}/**") if not _hidden(p, root)]
        if not files:
            raise UserError(
                f"input directory {spec.path!r} has no files (hidden files are ignored): "
                "point --input at the img2dataset output or metadata table"
            )
    else:
        files = _match(path)
        root = posixpath.dirname(path) if any(c in path for c in "*?[") else posixpath.dirname(path)
        while any(c in root for c in "*?["):
            root = posixpath.dirname(root)
    if not files:
        raise UserError(f"no input files found at {spec.path!r}: pass a file, a directory or a glob")
    bad_names = [f for f in files if has_surrogates(f)]
    if bad_names:
        # Every ledger row names its file; Arrow cannot store a name that is not UTF-8.
        shown = _raw_bytes(bad_names[0]).decode("utf-8", "backslashreplace")
        raise UserError(
            f"{shown}: file name is not UTF-8 ({len(bad_names)} such file(s)); rename it, "
            "e.g. convmv -f latin1 -t utf8 --notest DIR -r"
        )
    fmt = spec.format
    tars = [f for f in files if tar_stem(f) is not None]
    if fmt == "auto":
        if tars:
            fmt = "webdataset"
        else:
            parquets = [f for f in files if f.endswith(".parquet")]
            if parquets and "status" in (cols := _parquet_columns(parquets[0])) and any(
                c in cols for c in I2D_IMAGE_COLUMNS
            ):
                fmt = "i2d-parquet"
            else:
                fmt = "table"
    if fmt == "webdataset":
        # Shards are the tars plus status parquets that have no tar (a shard whose downloads all failed).
        stems_with_tar = {tar_stem(f) for f in tars}
        status_only = [f for f in files if f.endswith(".parquet") and f[: -len(".parquet")] not in stems_with_tar]
        files = sorted(tars + status_only)
        if not files:
            raise UserError(f"{spec.path}: no .tar shards found for --input-format webdataset")
    elif fmt == "i2d-parquet":
        files = [f for f in files if f.endswith(".parquet")]
    elif fmt == "table":
        files = [f for f in files if f.endswith(TABLE_EXTS)]
        if not files:
            raise UserError(f"{spec.path}: no .parquet/.csv/.tsv/.jsonl files found")
    return ResolvedInput(spec, fmt, root, tuple(files))


def _parquet_footer(f, size: int) -> bytes:
    """The Parquet footer (FileMetaData: schema, row groups, per-column statistics) and its length word."""
    if size < 12:
        return b""
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        return b""
    n = int.from_bytes(tail[:4], "little")
    if n + 8 > size:
        return b""
    f.seek(size - 8 - n)
    return f.read(n + 8)


def fingerprint(resolved: ResolvedInput, mode: str = "stat") -> dict[str, Any]:
    """Input description for the manifest, so a changed input makes the stage run again.

    ``stat`` (default): per file its relative name, size, modification time, a sha256 over its first
    and last MiB and, for Parquet, over its footer (row-group offsets and per-column min/max/null
    statistics). Any in-place edit changes the mtime (local disks, GCS, S3 rewrite the object), so
    this catches an edit in the middle that keeps the size, and reads ~2 MiB per file whatever the
    input size. ``content``: a sha256 over every byte (streamed, 8 MiB at a time) for inputs whose
    mtimes cannot be trusted (``cp -p``/``touch -r``/``rsync -t`` of different content); it reads the
    whole input on the driver (measured in docs/inputs.md).
    """
    if mode not in FINGERPRINT_MODES:
        raise ValueError(f"fingerprint mode must be one of {FINGERPRINT_MODES}, not {mode!r}")
    entries = []
    h = hashlib.sha256()
    for path in resolved.files:
        md = FileSystems.match([path])[0].metadata_list[0]
        size = md.size_in_bytes
        mtime = _mtime_ns(path, md)
        rel = resolved.rel(path)
        entry: dict[str, Any] = {"path": rel, "bytes": size, "mtime_ns": mtime}
        with FileSystems.open(path, compression_type="uncompressed") as f:
            if mode == "content":
                full = hashlib.sha256()
                while chunk := f.read(8 << 20):
                    full.update(chunk)
                entry["sha256"] = full.hexdigest()
            else:
                head = f.read(FINGERPRINT_EDGE_BYTES)
                tail = b""
                if size > 2 * FINGERPRINT_EDGE_BYTES:
                    f.seek(size - FINGERPRINT_EDGE_BYTES)
                    tail = f.read()
                entry["edge_sha256"] = hashlib.sha256(head + tail).hexdigest()
                if path.endswith(".parquet"):
                    entry["footer_sha256"] = hashlib.sha256(_parquet_footer(f, size)).hexdigest()
        entries.append(entry)
        h.update((json.dumps(entry, sort_keys=True) + "\n").encode())
    return {"kind": resolved.format, "fingerprint_mode": mode, "fingerprint": h.hexdigest(), "files": entries}


def _mtime_ns(path: str, md) -> int:
    if "://" not in path:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            pass
    return int(round((md.last_updated_in_seconds or 0) * 1e9))


# --- column checks (driver-side preflight and worker-side) --------------------------------------


def _col_index(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def check_table_columns(path: str, columns: list[str], spec: InputSpec) -> None:
    missing = [c for c in (spec.caption_col, spec.url_col) if c not in columns]
    if missing:
        raise InputSchemaError(
            f"{path}: column(s) {missing} not found; the file has {columns[:20]}. "
            f"Name the right ones with --caption-col/--url-col (e.g. --caption-col TEXT --url-col URL)."
        )


# Excel and Notepad save "UTF-8" csv with a byte-order mark; utf-8-sig drops it, so the first column
# is "url", not "\ufeffurl". Bytes that are not UTF-8 stay as surrogates and become ledger rows.
CSV_ENCODING = "utf-8-sig"


def _check_not_utf16(path: str, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputSchemaError(
            f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); mmcorpus reads UTF-8: "
            f"re-encode it, e.g. iconv -f UTF-16 -t UTF-8 IN > OUT"
        )


def _csv_dialect(path: str) -> dict[str, Any]:
    if path.endswith(".tsv"):
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": ","}


def _csv_has_header(path: str, first_row: list[str], spec: InputSpec) -> bool:
    idx = [_col_index(spec.caption_col), _col_index(spec.url_col)]
    if spec.header == "yes":
        return True
    if spec.header == "no":
        if None in idx:
            raise InputSchemaError(f"{path}: with --no-header, --caption-col and --url-col must be column indexes (0, 1, ...)")
        return False
    if None not in idx:
        return False
    return True


def preflight(resolved: ResolvedInput, max_files: int = 1000) -> None:
    """Check required columns on the driver, so a wrong column stops the run before any work,
    with the file named. Workers check again (files beyond ``max_files``)."""
    spec = resolved.spec
    for path in resolved.files[:max_files]:
        if resolved.format == "webdataset":
            stem = tar_stem(path)
            status = path if stem is None else stem + ".parquet"
            if status.endswith(".parquet") and FileSystems.exists(status):
                _parquet_columns(status)  # img2dataset's status file must be readable
        elif resolved.format == "table":
            if path.endswith(".parquet"):
                check_table_columns(path, _parquet_columns(path), spec)
            elif path.endswith((".csv", ".tsv")):
                with FileSystems.open(path, compression_type="uncompressed") as f:
                    _check_not_utf16(path, f.read(4))
                    f.seek(0)
                    text = io.TextIOWrapper(f, encoding=CSV_ENCODING, errors="surrogateescape", newline="")
                    first = next(csv.reader(text, **_csv_dialect(path)), None)
                if first is None:
                    continue
                if _csv_has_header(path, first, spec):
                    check_table_columns(path, first, spec)
                else:
                    need = max(_col_index(spec.caption_col), _col_index(spec.url_col))
                    if len(first) <= need:
                        raise InputSchemaError(
                            f"{path}: first row has {len(first)} column(s) but --caption-col/--url-col ask for index {need}"
                        )
        elif resolved.format == "i2d-parquet":
            cols = _parquet_columns(path)
            if not any(c in cols for c in I2D_IMAGE_COLUMNS) or "key" not in cols:
                raise InputSchemaError(
                    f"{path}: not img2dataset parquet output (needs 'key' and one of {I2D_IMAGE_COLUMNS}); "
                    "use --input-format table for metadata tables"
                )


# --- reading units ---------------------------------------------------------------------------


def src(rel: str, row_no: int) -> str:
    """Source of a table row; zero-padded so string order is file order (first occurrence wins ties)."""
    return f"{rel}#{row_no:08d}"


def _meta_json(d: dict[str, Any]) -> str:
    if not d:  # most metadata tables have no extra columns: json.dumps({}) is "{}"
        return "{}"
    return json.dumps(d, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))


# Lone surrogates: undecodable bytes kept by surrogateescape (csv, tar names), or a JSON "\\ud800"
# escape. Arrow refuses them, so a record carrying one must become a ledger row before the writer.
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogates(value: str) -> bool:
    return _SURROGATE.search(value) is not None


def _raw_bytes(value: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate outside the escape range (from a JSON \\u escape)
        return value.encode("utf-8", "surrogatepass")


def _clean_caption(value: Any) -> tuple[str | None, str | None]:
    """(caption, problem reason) from a raw cell: bytes must be UTF-8; surrogates mean the bytes were
    not; anything but text (numbers, lists, structs) is refused, never ``str()``-ed into a caption."""
    if value is None:
        return None, reasons.CAPTION_MISSING
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, reasons.CAPTION_INVALID_UTF8
    if not isinstance(value, str):
        return None, reasons.CAPTION_NOT_TEXT
    if has_surrogates(value):
        return None, reasons.CAPTION_INVALID_UTF8
    return value, None


def _describe_bad(value: Any) -> str:
    if isinstance(value, str):
        value = _raw_bytes(value)
    if isinstance(value, bytes):
        return f"{len(value)} bytes, starts {value[:40]!r}"
    return f"{type(value).__name__}: {repr(value)[:80]}"


def _bad_text_field(fields: dict[str, Any]) -> str | None:
    """Detail naming the first field (url, key, meta column) that holds text that is not UTF-8."""
    # Per-record fast path: plain text fields and names with no surrogate anywhere cannot be named.
    if all(type(v) is str or v is None for v in fields.values()) and all(type(n) is str for n in fields):
        if not has_surrogates("".join(fields) + "".join(v for v in fields.values() if v is not None)):
            return None
    for name in sorted(fields, key=str):
        value = fields[name]
        if value is None or isinstance(value, (int, float, bool, bytes)):
            text = ""  # cannot hold a surrogate (bytes are rendered as their repr)
        else:
            text = value if isinstance(value, str) else _meta_json({"v": value})
        if has_surrogates(str(name)) or has_surrogates(text):
            return f"field {str(name)[:40]!r}: {_describe_bad(value if isinstance(value, str) else text)}"[:200]
    return None


class ReadInputUnitFn(beam.DoFn):
    """Reads one unit (a tar shard, a parquet row group, a csv/jsonl file) into Pairs and Outcomes."""

    def __init__(self, resolved: ResolvedInput):
        self.resolved = resolved
        self.spec = resolved.spec

    def setup(self):
        self.records = Metrics.counter("mmcorpus.ingest", "records")

    def process(self, unit):
        kind, path, arg = unit
        rel = self.resolved.rel(path)
        if kind == "tar":
            it = self._read_webdataset(path, rel, arg)
        elif kind == "i2d-rowgroup":
            it = self._read_i2d_parquet(path, rel, arg)
        elif kind == "table-rowgroup":
            it = self._read_table_parquet(path, rel, arg)
        elif kind == "csv":
            it = self._read_csv(path, rel)
        elif kind == "jsonl":
            it = self._read_jsonl(path, rel)
        else:
            raise ValueError(f"unknown unit kind {kind}")
        n = 0
        try:
            for item in it:
                n += 1
                yield item
        finally:  # one counter update per unit, not per record
            if n:
                self.records.inc(n)

    # --- metadata tables ---
    def _table_record(self, rel: str, row_no: int, url: Any, caption: Any, key: Any, meta: dict) -> Pair | Outcome:
        source = src(rel, row_no)
        cap, problem = _clean_caption(caption)
        url_s = None if url is None else str(url)
        key_s = safe_key(str(key), rel, str(row_no)) if key is not None else record_key(rel, url_s, cap if cap is not None else _describe_bad(caption))
        if problem is not None:
            detail = "" if problem == reasons.CAPTION_MISSING else _describe_bad(caption)
            return Outcome(key=key_s, status=REJECTED, reason=problem, detail=detail, source=source)
        key_text = None if key is None else str(key)
        if not meta and url_s is not None and not has_surrogates(f"{self.spec.url_col}key{url_s}{key_text or ''}"):
            bad = None  # caption-only tables: no surrogate in the names or values, so none to name (~1 µs a record)
        else:
            bad = _bad_text_field({self.spec.url_col: url_s, "key": key_text, **meta})
        if bad is not None:
            return Outcome(key=key_s, status=REJECTED, reason=reasons.FIELD_INVALID_UTF8, detail=bad, source=source)
        if not url_s:
            return Outcome(key=key_s, status=REJECTED, reason=reasons.URL_MISSING, detail="", source=source)
        return Pair(key=key_s, url=url_s, caption=cap, source=source, meta=_meta_json(meta))

    def _key_col(self, columns: list[str]) -> str | None:
        if self.spec.key_col:
            return self.spec.key_col
        return "key" if "key" in columns else None

    def _read_table_parquet(self, path: str, rel: str, rg: int) -> Iterator[Pair | Outcome]:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            pf = pq.ParquetFile(f)
            check_table_columns(path, pf.schema_arrow.names, self.spec)
            offset = sum(pf.metadata.row_group(i).num_rows for i in range(rg))
            table = pf.read_row_group(rg)
        key_col = self._key_col(table.column_names)
        others = [c for c in table.column_names if c not in (self.spec.url_col, self.spec.caption_col, key_col)]
        if self._text_only(table, key_col, others):
            yield from self._read_text_columns(rel, offset, table)
            return
        if len(set(table.column_names)) != len(table.column_names):  # repeated names: row dicts keep the last
            rows = table.to_pylist()
            cols = {c: [r[c] for r in rows] for c in table.column_names}
            del rows
        else:  # column by column: the same values as the row dicts of to_pylist(), without a dict per row
            cols = {c: table.column(c).to_pylist() for c in table.column_names}
        del table
        urls, captions = cols[self.spec.url_col], cols[self.spec.caption_col]
        keys = cols.get(key_col) if key_col else None
        other_cols = [(c, cols[c]) for c in others]
        for i in range(len(urls)):
            yield self._table_record(
                rel, offset + i, urls[i], captions[i], keys[i] if keys is not None else None,
                {c: col[i] for c, col in other_cols},
            )

    def _text_only(self, table: pa.Table, key_col: str | None, others: list[str]) -> bool:
        """A caption-only table (the common metadata table): url and caption columns of Arrow string
        type, no key column, no other columns, no repeated names. Its values are str (valid UTF-8,
        so without surrogates) or None: no field can need ``_bad_text_field``."""
        names = table.column_names
        return (
            key_col is None and not others and len(set(names)) == len(names)
            and not has_surrogates(self.spec.url_col)
            and all(pa.types.is_string(t) or pa.types.is_large_string(t)
                    for t in (table.schema.field(self.spec.url_col).type, table.schema.field(self.spec.caption_col).type))
        )

    def _read_text_columns(self, rel: str, offset: int, table: pa.Table) -> Iterator[Pair | Outcome]:
        """``_table_record`` for each row of a ``_text_only`` table, without its per-record checks where
        they cannot fail: a row with a caption and a url is a Pair keyed by ``text_record_key`` (the
        same key as ``record_key``); any other row goes through ``_table_record`` (same outcome)."""
        urls = table.column(self.spec.url_col).to_pylist()
        captions = table.column(self.spec.caption_col).to_pylist()
        del table
        prefix = record_key_prefix(rel)
        for i, (url, cap) in enumerate(zip(urls, captions), offset):
            if cap is None or not url:
                yield self._table_record(rel, i, url, cap, None, {})
                continue
            yield Pair(key=text_record_key(prefix, url, cap), url=url, caption=cap, source=f"{rel}#{i:08d}", meta="{}")

    def _read_csv(self, path: str, rel: str) -> Iterator[Pair | Outcome]:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            text = io.TextIOWrapper(f, encoding=CSV_ENCODING, errors="surrogateescape", newline="")
            reader = csv.reader(text, **_csv_dialect(path))
            header: list[str] | None = None
            row_no = -1
            for row_no, row in enumerate(reader):
                if row_no == 0 and _csv_has_header(path, row, self.spec):
                    check_table_columns(path, row, self.spec)
                    header = row
                    continue
                if header is not None:
                    if len(row) != len(header):
                        yield Outcome(
                            key=record_key(rel, str(row_no), None), status=ERROR, reason=reasons.ROW_UNREADABLE,
                            detail=f"{len(row)} fields, header has {len(header)}", source=src(rel, row_no),
                        )
                        continue
                    rec = dict(zip(header, row))
                    key_col = self._key_col(header)
                    meta = {k: v for k, v in rec.items() if k not in (self.spec.url_col, self.spec.caption_col, key_col)}
                    yield self._table_record(
                        rel, row_no, rec[self.spec.url_col], rec[self.spec.caption_col], rec.get(key_col) if key_col else None, meta
                    )
                else:
                    ci, ui = _col_index(self.spec.caption_col), _col_index(self.spec.url_col)
                    if len(row) <= max(ci, ui):
                        yield Outcome(
                            key=record_key(rel, str(row_no), None), status=ERROR, reason=reasons.ROW_UNREADABLE,
                            detail=f"{len(row)} fields, need index {max(ci, ui)}", source=src(rel, row_no),
                        )
                        continue
                    meta = {str(i): v for i, v in enumerate(row) if i not in (ci, ui)}
                    yield self._table_record(rel, row_no, row[ui], row[ci], None, meta)

    def _read_jsonl(self, path: str, rel: str) -> Iterator[Pair | Outcome]:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            for row_no, raw in enumerate(f):
                if not raw.strip():
                    continue
                source = src(rel, row_no)
                try:
                    # utf-8-sig: a leading byte-order mark (Excel, Notepad) is not part of the first record
                    line = raw.decode("utf-8-sig" if row_no == 0 else "utf-8")
                except UnicodeDecodeError:
                    yield Outcome(
                        key=record_key(rel, str(row_no), None), status=REJECTED, reason=reasons.CAPTION_INVALID_UTF8,
                        detail=_describe_bad(raw), source=source,
                    )
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    yield Outcome(
                        key=record_key(rel, str(row_no), None), status=ERROR, reason=reasons.ROW_UNREADABLE,
                        detail=f"{type(e).__name__}: {str(e)[:100]}", source=source,
                    )
                    continue
                if row_no == 0 and self.spec.caption_col not in rec and self.spec.url_col not in rec:
                    check_table_columns(path, list(rec), self.spec)
                key_col = self._key_col(list(rec))
                meta = {k: v for k, v in rec.items() if k not in (self.spec.url_col, self.spec.caption_col, key_col)}
                yield self._table_record(
                    rel, row_no, rec.get(self.spec.url_col), rec.get(self.spec.caption_col), rec.get(key_col) if key_col else None, meta
                )

    # --- img2dataset parquet output ---
    def _read_i2d_parquet(self, path: str, rel: str, rg: int) -> Iterator[Pair | Outcome]:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            pf = pq.ParquetFile(f)
            offset = sum(pf.metadata.row_group(i).num_rows for i in range(rg))
            table = pf.read_row_group(rg)
        image_col = next(c for c in I2D_IMAGE_COLUMNS if c in table.column_names)
        for i, row in enumerate(table.to_pylist()):
            yield self._i2d_record(rel, offset + i, row, row.get(image_col))

    def _i2d_record(self, rel: str, row_no: int, row: dict, image: bytes | None, source: str | None = None) -> Pair | Outcome:
        source = source or src(rel, row_no)
        raw_key = row.get("key")
        key = safe_key(None if raw_key is None else str(raw_key), rel, str(row_no))
        status = row.get("status")
        if status is not None and status != SUCCESS:
            return Outcome(
                key=key, status=ERROR, reason=reasons.DOWNLOAD_FAILED,
                detail=f"{status}: {row.get('error_message') or ''}", source=source,
            )
        cap, problem = _clean_caption(row.get("caption"))
        if problem is not None:
            detail = "" if problem == reasons.CAPTION_MISSING else _describe_bad(row.get("caption"))
            return Outcome(key=key, status=REJECTED, reason=problem, detail=detail, source=source)
        skip = {"key", "caption", "url", "status", "error_message", "width", "height", "jpg", "png", "webp", "txt", "json"}
        meta = {k: v for k, v in row.items() if k not in skip}
        return Pair(
            key=key, url=row.get("url"), caption=cap, image=image, source=source, meta=_meta_json(meta),
        )

    # --- img2dataset webdataset output ---
    def _read_webdataset(self, path: str, rel: str, status_path: str | None) -> Iterator[Pair | Outcome]:
        status_rows: dict[str, dict] = {}
        if status_path is not None:
            with FileSystems.open(status_path, compression_type="uncompressed") as f:
                for row in pq.read_table(f).to_pylist():
                    status_rows[str(row.get("key"))] = row
        status_rel = self.resolved.rel(status_path) if status_path else None
        seen: set[str] = set()
        failure: tuple[str, str] | None = None  # (reason, detail) if the tar broke
        if tar_stem(path) is not None:
            for item in self._iter_tar(path, rel):
                if isinstance(item, _TarBroken):
                    failure = (item.reason, item.detail)
                    break
                if isinstance(item, Outcome):
                    seen.add(item.key)
                    yield item
                    continue
                key, members, first_name = item
                seen.add(key)
                yield self._tar_sample(rel, key, members, first_name, status_rows.get(key))
        # Rows of the status file that never showed up in the tar: failed downloads, or lost to a broken tar.
        for key, row in sorted(status_rows.items()):
            if key in seen:
                continue
            source = f"{status_rel}#key={key}"
            if row.get("status") != SUCCESS:
                yield self._i2d_record(status_rel, 0, row, None, source=source)
            elif failure is not None:
                yield Outcome(key=safe_key(key, status_rel), status=ERROR, reason=reasons.MISSING_FROM_TAR,
                              detail=f"tar ended early ({failure[0]})", source=source)
            else:
                yield Outcome(key=safe_key(key, status_rel), status=ERROR, reason=reasons.MISSING_FROM_TAR,
                              detail="status says success but the tar has no such sample", source=source)

    def _iter_tar(self, path: str, rel: str):
        """Yields (key, {ext: bytes | _Skipped}, first_member_name) per sample, Outcomes for hostile
        members, and a final ``_TarBroken`` if the tar is broken. Members are never written to disk,
        and one larger than ``max_member_bytes`` is never read (stream mode skips its blocks)."""
        current_key: str | None = None
        current: dict[str, bytes | _Skipped] = {}
        held = 0  # bytes of the sample in hand
        first_name = ""
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        limit = self.spec.max_member_bytes

        def cut(where: str, exc: BaseException | str):
            text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc)[:80]}"
            return Outcome(key=safe_key(None, rel, where), status=ERROR, reason=reasons.TAR_TRUNCATED,
                           detail=f"{where}: {text}", source=f"{rel}:{where[:200]}")

        unsupported = next((e for e in UNSUPPORTED_TAR_EXTS if path.endswith(e)), None)
        if unsupported is not None:
            detail = f"{unsupported} compression is not read by mmcorpus: decompress to .tar (or recompress as .tar.gz)"
            yield Outcome(key=safe_key(None, rel, "tar"), status=ERROR, reason=reasons.TAR_UNREADABLE, detail=detail, source=rel)
            yield _TarBroken(reasons.TAR_UNREADABLE, detail)
            return
        with FileSystems.open(path, compression_type="uncompressed") as f:
            try:
                # "r|*": stream mode (bounded memory, no seeks) with gzip/bz2/xz detected from the magic.
                tf = tarfile.open(fileobj=f, mode="r|*")
            except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
                yield Outcome(key=safe_key(None, rel, "tar"), status=ERROR, reason=reasons.TAR_UNREADABLE,
                              detail=f"{type(e).__name__}: {str(e)[:120]}", source=rel)
                yield _TarBroken(reasons.TAR_UNREADABLE, str(e)[:120])
                return
            try:
                for ordinal, member in enumerate(tf):
                    name = member.name
                    bad_utf8 = has_surrogates(name)
                    shown = _raw_bytes(name).decode("utf-8", "backslashreplace") if bad_utf8 else name
                    unsafe = _unsafe_member_name(member)
                    if unsafe:
                        yield Outcome(key=safe_key(None, rel, shown), status=REJECTED, reason=reasons.UNSAFE_MEMBER_NAME,
                                      detail=f"{unsafe}: {shown[:120]!r}", source=f"{rel}:{shown[:200]}")
                        continue
                    if member.isdir():
                        continue  # directories: structure, not records
                    stem, _, ext = posixpath.basename(shown).partition(".")
                    skipped: _Skipped | None = None
                    kind = _unsafe_member_type(member)
                    if kind is not None:
                        skipped = _Skipped(reasons.UNSAFE_MEMBER_TYPE, f"{shown[:120]!r} is a {kind}: never followed or read")
                    elif bad_utf8:
                        skipped = _Skipped(reasons.MEMBER_NAME_INVALID_UTF8, f"member name is not UTF-8: {_raw_bytes(name)[:80]!r}")
                    elif member.size > limit:
                        skipped = _Skipped(reasons.MEMBER_TOO_LARGE, f"{shown[:120]!r} is {member.size} bytes > max_member_bytes {limit}")
                    if skipped is not None:
                        data: bytes | _Skipped = skipped
                    else:
                        try:
                            data = tf.extractfile(member).read()
                        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
                            # The member's data is cut: its sample is lost; the sample before it is whole.
                            if current_key is not None and current_key != stem:
                                yield current_key, current, first_name
                            out = cut(shown, e)
                            out.key = safe_key(stem, rel, shown)
                            yield out
                            yield _TarBroken(reasons.TAR_TRUNCATED, str(e)[:120])
                            return
                    if stem != current_key:
                        if current_key is not None:
                            yield current_key, current, first_name
                        current_key, current, first_name = stem, {}, f"{ordinal:06d}:{shown}"
                        held = 0
                    if isinstance(data, bytes):
                        held += len(data)
                        if held > limit:
                            # Many members under one key (.a1, .a2, ...) must not add up past the cap
                            # either: drop what is held, keep only the verdict.
                            data = _Skipped(reasons.MEMBER_TOO_LARGE, f"sample {stem[:80]!r}: members add up to more than max_member_bytes {limit}")
                            current = {}
                    current[ext.lower()] = data
                # tarfile's stream mode ends silently at a header cut short; a complete archive has its
                # end-of-archive blocks after the last member.
                # (by content, not name: a gzipped tar named .tar is compressed too)
                plain = getattr(tf.fileobj, "comptype", "tar") == "tar"
                total = size if plain else _stream_length(tf)
            except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
                # The next header (or the compressed stream) is corrupt: the sample in hand is complete.
                if current_key is not None:
                    yield current_key, current, first_name
                yield cut(f"after {first_name or 'start'}", e)
                yield _TarBroken(reasons.TAR_TRUNCATED, str(e)[:120])
                return
            if current_key is not None:
                yield current_key, current, first_name
            if tf.offset + 2 * tarfile.BLOCKSIZE > total:
                yield cut(f"after {first_name or 'start'}", "no end-of-archive marker (file cut inside a header)")
                yield _TarBroken(reasons.TAR_TRUNCATED, "no end-of-archive marker")

    def _tar_sample(self, rel: str, stem: str, members: dict[str, bytes | _Skipped], first_name: str, status_row: dict | None):
        source = f"{rel}#{first_name}"
        key = safe_key(stem, rel)
        skipped = next((m for _, m in sorted(members.items()) if isinstance(m, _Skipped)), None)
        if skipped is not None:
            return Outcome(key=key, status=REJECTED, reason=skipped.reason, detail=skipped.detail, source=source)
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    meta = {"json": meta}
            except (UnicodeDecodeError, ValueError):
                meta = {"json_unreadable": True}
        if not is_safe_key(stem):
            meta["original_key"] = stem
        url = meta.get("url") or (status_row or {}).get("url")
        if "txt" in members:
            cap, problem = _clean_caption(members["txt"])
        else:
            cap, problem = _clean_caption(meta.get("caption", (status_row or {}).get("caption")))
        if problem is not None:
            raw = members.get("txt") if "txt" in members else meta.get("caption")
            detail = "" if problem == reasons.CAPTION_MISSING else _describe_bad(raw)
            return Outcome(key=key, status=REJECTED, reason=problem, detail=detail, source=source)
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            # An unknown extension (.mp4, .svg, ...): hand its bytes to the image filter, which names
            # the format, rather than calling the image missing.
            image = next((m for e, m in sorted(members.items()) if e not in TEXT_EXTS), None)
        for drop in ("caption", "url", "key", "status", "error_message", "width", "height"):
            meta.pop(drop, None)
        url = None if url is None else str(url)
        bad = _bad_text_field({"url": url, **meta})
        if bad is not None:
            return Outcome(key=key, status=REJECTED, reason=reasons.FIELD_INVALID_UTF8, detail=bad, source=source)
        return Pair(key=key, url=url, caption=cap, image=image, source=source, meta=_meta_json(meta))


@dataclass(frozen=True)
class _TarBroken:
    reason: str
    detail: str


@dataclass(frozen=True)
class _Skipped:
    """A member that was not read (link, device, non-UTF-8 name, too large): its sample becomes a ledger row."""

    reason: str
    detail: str


def _stream_length(tf: tarfile.TarFile) -> int:
    """Uncompressed length of a compressed tar read in stream mode: what was consumed plus the rest
    (the end-of-archive padding, normally a few KiB), read in bounded chunks."""
    stream = tf.fileobj
    total = stream.tell()
    while chunk := stream.read(1 << 20):
        total += len(chunk)
    return total


def _unsafe_member_name(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return "absolute path"
    if ".." in name.split("/"):
        return "parent-directory component"
    return None


def _unsafe_member_type(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"symlink to {member.linkname[:80]!r}"
    if member.islnk():
        return f"hardlink to {member.linkname[:80]!r}"
    if member.isdev() or member.isfifo():
        return "device or fifo"
    if not member.isfile():
        return "special member"
    return None


class ExpandUnitsFn(beam.DoFn):
    """(path) -> units of work: ('tar', path, status_parquet|None), ('*-rowgroup', path, i), ('csv'|'jsonl', path, None)."""

    def __init__(self, resolved: ResolvedInput):
        self.resolved = resolved

    def process(self, path: str):
        fmt = self.resolved.format
        if fmt == "webdataset":
            stem = tar_stem(path)
            if stem is not None:
                status = stem + ".parquet"
                yield ("tar", path, status if FileSystems.exists(status) else None)
            else:  # a status parquet without a tar
                yield ("tar", path, path)
        elif path.endswith(".parquet"):
            kind = "i2d-rowgroup" if fmt == "i2d-parquet" else "table-rowgroup"
            with FileSystems.open(path, compression_type="uncompressed") as f:
                n = pq.ParquetFile(f).num_row_groups
            for i in range(n):
                yield (kind, path, i)
        elif path.endswith((".csv", ".tsv")):
            yield ("csv", path, None)
        else:
            yield ("jsonl", path, None)


class ReadPairs(beam.PTransform):
    """Read raw inputs into ``Pair`` records, plus ``Outcome`` ledger rows for records that are
    unusable before any filter runs.

    Args:
        resolved: the output of ``resolve_input(InputSpec(...))`` (detection runs on the driver).

    Example:
        resolved = resolve_input(InputSpec("shards/", format="webdataset"))
        records = p | ReadPairs(resolved)
    """

    def __init__(self, resolved: ResolvedInput):
        super().__init__()
        if resolved.format == "stage":
            raise ValueError("stage inputs are read with transforms.stage_io.ReadStage")
        self.resolved = resolved

    def expand(self, pbegin):
        return (
            pbegin
            | "InputFiles" >> beam.Create(list(self.resolved.files))
            | "Units" >> beam.ParDo(ExpandUnitsFn(self.resolved))
            | "SpreadUnits" >> beam.Reshuffle()
            | "ReadUnits" >> beam.ParDo(ReadInputUnitFn(self.resolved))
        )
