"""The per-output-directory manifest (``manifest.json``) and the stage directory layout."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mmcorpus-stage/1"
DATA_DIR = "data"  # Pair rows, PAIR_SCHEMA
LEDGER_DIR = "ledger"  # LedgerRow rows, LEDGER_SCHEMA
FILE_KIND_DATA = "data"
FILE_KIND_LEDGER = "ledger"


def shard_name(index: int, num_shards: int, ext: str = "parquet") -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.{ext}"


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, no spaces) used for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


@dataclass
class FileEntry:
    """One output file: path relative to the output directory, kind, row count, size, sha256."""

    path: str
    kind: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """``manifest.json``: what a stage wrote and from what.

    Args:
        stage: the stage that wrote this directory.
        software_version: mmcorpus version.
        config: the resolved stage config (everything that changes outputs).
        config_hash: sha256 of ``canonical_json(config)``.
        input: ``{"kind", "fingerprint", "files"|"manifest_sha256", ...}`` describing the input.
        counts: ``{"inputs", "ledger_rows", "outputs", "by_status": {...}, "by_reason": {"status/reason": n}}``.
        files: every file written, sorted by path.
        extra: stage-specific summary (e.g. pack fill, dedup rounds).
    """

    stage: str
    software_version: str
    config: dict[str, Any]
    config_hash: str
    input: dict[str, Any]
    counts: dict[str, Any]
    files: list[FileEntry]
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        d["files"] = [FileEntry(**f) for f in d.get("files", [])]
        return cls(**d)

    def files_of(self, kind: str) -> list[FileEntry]:
        return [f for f in self.files if f.kind == kind]
