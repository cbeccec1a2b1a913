"""`mmcorpus stats` reads a stage's files once, in record batches of the columns it needs: `--max-rows`
caps every panel at exactly that many rows, and Arrow memory stays bounded by a batch, not by the
stage. Stage directories are written here with pyarrow (data, ledger, manifest) so their contents
and the expected numbers are known by construction."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import stats
from schemas.manifest import FILE_KIND_DATA, FILE_KIND_LEDGER, MANIFEST_NAME, FileEntry, Manifest, shard_name
from schemas.records import LEDGER_SCHEMA, PAIR_SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Separators str.split() treats as whitespace, some of them outside ASCII.
SEPARATORS = (" ", "\t", "  ", "\u3000", "\xa0", " \n ")
LANGS = ("en", "zh", "ja")


def _caption(words: int, i: int) -> str:
    sep = SEPARATORS[i % len(SEPARATORS)]
    text = sep.join(f"w{i}.{j}" for j in range(words))  # unique words: no caption repeats
    return f" {text}\t" if i % 4 == 0 else text  # leading and trailing whitespace on some


# Row i of the fixture, by construction: its caption has i % 7 + 1 words; every fifth row has a
# raw_caption of i % 3 + 10 words; its language cycles en, zh, ja (null every 11th row); its
# cluster_size is i % 4.
def _words(i: int) -> int:
    return i % 7 + 1


def _raw_words(i: int) -> int | None:
    return i % 3 + 10 if i % 5 == 0 else None


def _lang(i: int) -> str | None:
    return None if i % 11 == 0 else LANGS[i % 3]


def _write_stage(stage_dir: str, stage: str, files: list[list[int]], ledger: list[dict] | None = None,
                 cluster_size=lambda i: i % 4, row_group_size: int = 1000) -> str:
    """A finished stage output: one data file per list of row numbers, one ledger file, a manifest."""
    os.makedirs(os.path.join(stage_dir, "data"))
    os.makedirs(os.path.join(stage_dir, "ledger"))
    entries = []
    for n, rows in enumerate(files):
        cols = {name: [None] * len(rows) for name in PAIR_SCHEMA.names}
        cols["key"] = [f"k{i:07d}" for i in rows]
        cols["caption"] = [_caption(_words(i), i) for i in rows]
        cols["raw_caption"] = [None if _raw_words(i) is None else _caption(_raw_words(i), i + 1) for i in rows]
        cols["lang"] = [_lang(i) for i in rows]
        cols["cluster_size"] = [cluster_size(i) for i in rows]
        path = f"data/{shard_name(n, len(files))}"
        pq.write_table(pa.table(cols, schema=PAIR_SCHEMA), os.path.join(stage_dir, path), row_group_size=row_group_size)
        entries.append(FileEntry(path=path, kind=FILE_KIND_DATA, rows=len(rows), bytes=0, sha256=""))
    ledger = ledger if ledger is not None else [
        {"key": f"k{i:07d}", "stage": stage, "status": "kept", "reason": "ok"} for rows in files for i in rows]
    path = f"ledger/{shard_name(0, 1)}"
    pq.write_table(pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA), os.path.join(stage_dir, path))
    entries.append(FileEntry(path=path, kind=FILE_KIND_LEDGER, rows=len(ledger), bytes=0, sha256=""))
    kept = sum(len(rows) for rows in files)
    manifest = Manifest(stage=stage, software_version="test", config={}, config_hash="", input={"kind": "test"},
                        counts={"inputs": len(ledger), "ledger_rows": len(ledger), "outputs": kept,
                                "by_status": {"kept": kept}, "by_reason": {"kept/ok": kept}},
                        files=entries)
    with open(os.path.join(stage_dir, MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())
    return stage_dir


@pytest.fixture(scope="module")
def dedup_stage(tmp_path_factory):
    # Two data files of 3,000 rows, row groups of 1,000.
    return _write_stage(str(tmp_path_factory.mktemp("stats") / "dedup"), "dedup",
                        [list(range(0, 3000)), list(range(3000, 6000))])


@pytest.mark.parametrize("max_rows", [6000, 4321, 1000, 2, 1])
def test_every_panel_reads_exactly_the_first_max_rows(dedup_stage, max_rows):
    # 4321 ends inside the second file and inside a row group; every panel counts the same rows.
    rows = range(max_rows)
    panels = stats.collect(dedup_stage, max_rows=max_rows)["panels"]
    assert panels["caption_words"] == {
        "before dedup": [_raw_words(i) or _words(i) for i in rows],
        "after dedup": [_words(i) for i in rows],
    }
    langs = collections.Counter(_lang(i) for i in rows if _lang(i) is not None)
    if langs:  # most frequent first
        assert panels["languages"] == {"after dedup": dict(sorted(langs.items(), key=lambda kv: (-kv[1], kv[0])))}
        assert list(panels["languages"]["after dedup"]) == sorted(langs, key=lambda c: (-langs[c], c))
    else:  # row 0 has no language
        assert "languages" not in panels
    assert panels["cluster_sizes"] == sorted(i % 4 for i in rows if i % 4 > 1)


def test_word_counts_agree_with_str_split_on_every_unicode_space():
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert len(spaces) == 29
    rng = random.Random(7)
    alphabet = spaces + list("ab草é\u200b\x00") + ["\U0001F600"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(20_000)] + [None, ""]
    assert stats._word_counts(pa.array(texts, pa.string())) == [len(t.split()) for t in texts if t is not None]


def test_cluster_sizes_fall_back_to_the_ledger_streamed(tmp_path):
    # Data without cluster_size above 1 (as written before dedup recorded it): sizes come from the
    # duplicates per cluster_id in the ledger, plus the kept representative; "" and null are no cluster.
    ledger = [{"key": f"k{i:07d}", "stage": "dedup", "status": "kept", "reason": "ok"} for i in range(4)]
    ledger += [{"key": f"d{i}", "stage": "dedup", "status": "duplicate", "reason": "near_duplicate", "cluster_id": cid}
               for i, cid in enumerate(["c1", "c1", "c1", "c2", "", None, "c3"])]
    ledger += [{"key": "r0", "stage": "dedup", "status": "rejected", "reason": "caption_too_short", "cluster_id": "c2"}]
    d = _write_stage(str(tmp_path / "dedup"), "dedup", [list(range(4))], ledger=ledger, cluster_size=lambda i: 1)
    assert stats.collect(d)["panels"]["cluster_sizes"] == [2, 2, 4]


def test_each_data_file_is_opened_at_most_twice(dedup_stage, monkeypatch):
    # Once for the panels, once by inspection.dataset_counts (the source datasets' names, shared with
    # `inspect`); the language, caption and cluster columns used to be three separate reads.
    opened: collections.Counter = collections.Counter()
    real_open = FileSystems.open

    def counting_open(path, *a, **k):
        opened[os.path.relpath(path, dedup_stage)] += 1
        return real_open(path, *a, **k)

    monkeypatch.setattr(FileSystems, "open", staticmethod(counting_open))
    stats.collect(dedup_stage)
    assert {p: n for p, n in opened.items() if p.startswith("data/")} == {
        "data/part-00000-of-00002.parquet": 2, "data/part-00001-of-00002.parquet": 2}


ARROW_PEAK = textwrap.dedent("""
    import json, sys
    import pyarrow as pa
    from pipelines import stats
    data = stats.collect(sys.argv[1])
    print(json.dumps({"peak": pa.default_memory_pool().max_memory(), "backend": pa.default_memory_pool().backend_name,
                      "n": len(data["panels"]["caption_words"]["after dedup"])}))
""")


def _arrow_peak(tmp_path, n: int) -> tuple[int, int]:
    """(Arrow's peak allocation in a fresh process running ``stats.collect`` on one data file of n
    rows, the bytes of that file's caption and raw_caption columns)."""
    d = _write_stage(str(tmp_path / f"n{n}" / "dedup"), "dedup", [list(range(n))], row_group_size=8192)
    f = pq.ParquetFile(os.path.join(d, "data", shard_name(0, 1)))
    assert f.schema_arrow.names[2] == "caption" and f.schema_arrow.names[12] == "raw_caption"
    column_bytes = sum(f.metadata.row_group(g).column(c).total_uncompressed_size
                       for g in range(f.num_row_groups) for c in (2, 12))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", ARROW_PEAK, d], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == n
    return out["peak"], column_bytes


def test_arrow_memory_is_bounded_by_a_batch_not_by_the_stage(tmp_path):
    # One data file of 50,000 rows, then of 400,000 (row groups of 8,192 rows, as a streamed writer
    # leaves them). Measured: the whole-column reads stats used to do peaked at 35 MB for 400k rows
    # (8.6 MB at 100k: linear); batches of BATCH_ROWS rows peak at about 4 MB at both sizes.
    small, _ = _arrow_peak(tmp_path, 50_000)
    big, column_bytes = _arrow_peak(tmp_path, 400_000)
    assert column_bytes > 25_000_000
    assert big <= 1.5 * small, (small, big)
    assert big < column_bytes / 4, (big, column_bytes)
