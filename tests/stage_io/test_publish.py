"""publish: staged files move to their final names, manifest last; a listed file that is neither staged
nor complete under its final name stops the publish before anything moves."""

from __future__ import annotations

import hashlib
import logging

import pytest

from schemas.manifest import FileEntry, Manifest
from storage.staging import STAGING_NAME, publish


def _stage(out, files: dict[str, bytes], listed: dict[str, bytes] | None = None) -> None:
    for rel, data in files.items():
        p = out / STAGING_NAME / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    entries = [FileEntry(rel, "data", 1, len(d), hashlib.sha256(d).hexdigest()) for rel, d in sorted((listed or files).items())]
    m = Manifest(stage="t", software_version="0", config={}, config_hash="h", input={}, counts={}, files=entries)
    (out / STAGING_NAME / "manifest.json").write_text(m.to_json())


def test_publish_moves_files_then_the_manifest(tmp_path):
    _stage(tmp_path, {"data/a.parquet": b"aaa", "ledger/a.parquet": b"bb"})
    m = publish(str(tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "data/a.parquet", "ledger/a.parquet", "manifest.json"]
    assert (tmp_path / "data/a.parquet").read_bytes() == b"aaa" and [f.path for f in m.files] == ["data/a.parquet", "ledger/a.parquet"]


def test_missing_or_short_files_stop_the_publish_before_anything_moves(tmp_path):
    _stage(tmp_path, {"data/a.parquet": b"aaa"}, listed={"data/a.parquet": b"aaa", "data/b.parquet": b"bbbb"})
    with pytest.raises(RuntimeError, match=r"data/b.parquet is listed in the staged manifest but was not written"):
        publish(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "data").exists()
    (tmp_path / STAGING_NAME / "data/a.parquet").write_bytes(b"a")  # torn
    (tmp_path / "data").mkdir()
    (tmp_path / "data/b.parquet").write_bytes(b"bbbb")
    with pytest.raises(RuntimeError, match=r"a.parquet has 1 bytes, the staged manifest says 3"):
        publish(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()


def test_a_file_a_stage_wrote_under_its_final_name_is_kept_with_a_warning(tmp_path, caplog):
    _stage(tmp_path, {"ledger/a.parquet": b"bb"}, listed={"ledger/a.parquet": b"bb", "data/own.tar": b"tar!"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data/own.tar").write_bytes(b"tar!")
    with caplog.at_level(logging.WARNING, logger="mmcorpus"):
        publish(str(tmp_path))
    assert (tmp_path / "manifest.json").exists() and (tmp_path / "ledger/a.parquet").read_bytes() == b"bb"
    assert "data/own.tar was written outside" in caplog.text and "not crash-safe" in caplog.text
