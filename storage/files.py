"""Plain file I/O on local paths and Beam filesystem URLs (gs://, s3://): join, atomic writes, reads,
manifests and small table reads. No Beam transforms here, so ``rewriter/`` and ``transforms/`` can both use it."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import uuid
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas.manifest import FILE_KIND_DATA, MANIFEST_NAME, Manifest
from schemas.records import LEDGER_SCHEMA, PAIR_SCHEMA

PARQUET_COMPRESSION = "zstd"
# Rows Arrow encodes per batch; it closes a data page only between batches. At its default (1,024), a
# column of 30 KB images is one 30 MB page per 1,024 rows, dictionary-encoded first and then re-encoded
# plain: during the write Arrow held about 4.7x the row group (an 18 MB group of 600 images: 64 MiB of
# pool growth, 0.12 s of CPU). 32 rows per batch make pages of about 1 MB of such images (12 MiB, 0.013 s);
# caption columns still page at the 1 MiB data page size, at the same CPU (docs/scale.md, the bound).
PARQUET_WRITE_BATCH_ROWS = 32


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmcorpus")
    except Exception:  # not installed (running from a bare checkout)
        return "0+unknown"


def is_remote(path: str) -> bool:
    return "://" in path


def join(*parts: str) -> str:
    """Join path parts for local paths and URLs (gs://, s3://) alike."""
    if is_remote(parts[0]):
        return posixpath.join(*parts)
    return os.path.join(*parts)


def makedirs_for(path: str) -> None:
    """Create the parent directory of a local path (object stores need none)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path`` and rename it into place."""
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{directory}/.tmp-{name}-{uuid.uuid4().hex}"
    if not is_remote(path):
        os.makedirs(directory, exist_ok=True)
    with FileSystems.create(tmp) as f:
        f.write(data)
    rename_over(tmp, path)


def rename_over(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, replacing ``dst`` if it exists."""
    makedirs_for(dst)
    try:
        FileSystems.rename([src], [dst])
    except Exception:
        # Some filesystems refuse to rename over an existing file: delete the stale one first.
        if FileSystems.exists(dst):
            FileSystems.delete([dst])
        FileSystems.rename([src], [dst])


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def delete_tree(path: str) -> None:
    """Delete a directory (or prefix on an object store) and everything under it; absent is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    found = FileSystems.match([join(path, "**")])[0].metadata_list
    if found:
        FileSystems.delete(sorted(m.path for m in found))


def table_to_parquet_bytes(table: pa.Table, row_group_rows: int, buf: io.BytesIO | None = None) -> bytes:
    """The Parquet file of ``table`` as bytes; written through ``buf`` if given (a bench samples memory there)."""
    buf = io.BytesIO() if buf is None else buf
    pq.write_table(
        table,
        buf,
        row_group_size=row_group_rows,
        compression=PARQUET_COMPRESSION,
        write_statistics=True,
        store_schema=True,
    )
    return buf.getvalue()


class HashingSink:
    """A write-only binary file that hashes and counts the bytes passing through to ``path``
    (opened with ``FileSystems.create``): a shard's sha256 and size without holding its bytes.

    ``on_write(nbytes)``, if given, is called in the writing thread with each write's size while its
    bytes are held: as a Parquet sink, Arrow hands over each page (``PARQUET_WRITE_BATCH_ROWS`` rows of
    a column, at most; about 1 MB of 30 KB images) as one new ``bytes`` object, which the shard writer's
    memory probe counts."""

    def __init__(self, path: str, on_write: Callable[[int], None] | None = None):
        makedirs_for(path)
        self.path = path
        self._f = FileSystems.create(path)
        self._sha = hashlib.sha256()
        self.size = 0
        self.closed = False
        self.on_write = on_write

    def write(self, data) -> int:
        # pyarrow's Python sink passes a new bytes object, which bytes() returns as it is (no copy);
        # anything else (a memoryview, a pyarrow Buffer) is copied once, so no file object keeps a view
        # of a buffer its owner may reuse
        data = bytes(data)
        if self.on_write is not None:
            self.on_write(len(data))
        self._sha.update(data)
        self._f.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self.closed = True

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- reading a stage output ------------------------------------------------------------------


def read_manifest(stage_dir: str) -> Manifest:
    path = join(stage_dir, MANIFEST_NAME)
    if not FileSystems.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {stage_dir} is not a finished mmcorpus stage output "
            "(a stage writes manifest.json last; rerun the stage that should have produced it)"
        )
    return Manifest.from_json(read_bytes(path).decode("utf-8"))


def stage_input_info(stage_dir: str) -> dict[str, Any]:
    """Input description of a stage that reads another stage's output: the manifest's hash, and the
    bytes of its data files (what output shard counts are sized from)."""
    raw = read_bytes(join(stage_dir, MANIFEST_NAME))
    m = Manifest.from_json(raw.decode("utf-8"))
    return {
        "kind": "stage",
        "stage": m.stage,
        "fingerprint": hashlib.sha256(raw).hexdigest(),
        "records": m.counts["outputs"],
        "bytes": sum(f.bytes for f in m.files_of(FILE_KIND_DATA)),
    }


def input_bytes(input_info: dict[str, Any]) -> int:
    """Bytes of a stage's input from its ``input_info``: the stage input's data files, or the raw files."""
    if "bytes" in input_info:
        return int(input_info["bytes"] or 0)
    # raw inputs list {"path", "bytes", ...} per file; inputs that list bare names count as 0 (one shard)
    return sum(int(f.get("bytes") or 0) for f in input_info.get("files") or [] if isinstance(f, dict))


def read_table(stage_dir: str, kind: str = FILE_KIND_DATA, columns: list[str] | None = None) -> pa.Table:
    """Read all files of one kind of a stage output into one table (for small outputs, tests, the CLI)."""
    manifest = read_manifest(stage_dir)
    schema = PAIR_SCHEMA if kind == FILE_KIND_DATA else LEDGER_SCHEMA
    tables = []
    for entry in manifest.files_of(kind):
        with FileSystems.open(join(stage_dir, entry.path), compression_type="uncompressed") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(tables)
