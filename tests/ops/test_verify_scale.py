"""`mmcorpus verify` at scale: the key checks find planted faults whether the keys stay in memory or
are hash-partitioned to disk, their memory does not grow with the number of keys, and checksums run
in parallel with `--jobs`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.verify_scale import refresh_manifest, synthesize_stage
from pipelines.verify import verify
from schemas.records import LEDGER_SCHEMA, PAIR_SCHEMA

MMCORPUS = [sys.executable, "-m", "pipelines.cli"]
N = 20_000  # ledger rows; the synthesizer keeps 70%
SHARDS = 4


def _failed(checks) -> dict[str, str]:
    return {c.name: c.detail for c in checks if not c.ok}


def _shard(d, sub, i):
    return os.path.join(d, sub, f"part-{i:05d}-of-{SHARDS:05d}.parquet")


def _write(path, table, schema):
    pq.write_table(table.cast(schema), path, compression="zstd")


@pytest.fixture()
def stage(tmp_path):
    d = str(tmp_path / "stage")
    m = synthesize_stage(d, N, num_shards=SHARDS)
    assert m.counts["outputs"] == 14_000 and m.counts["by_reason"] == {
        "kept/ok": 14_000, "rejected/caption_too_short_words": 4_000, "rejected/caption_repetitive": 2_000}
    return d, m


# 997 keys per partition: 34,000 keys spill to 35 partitions on disk; 1M: all in memory.
@pytest.mark.parametrize("partition_keys", [1 << 20, 997])
def test_clean_output_passes(stage, partition_keys):
    d, _ = stage
    checks = verify(d, jobs=2, partition_keys=partition_keys)
    assert _failed(checks) == {}
    assert [c.name for c in checks] == [
        "manifest parses", "files match checksums", "no unlisted files", "inputs = ledger rows",
        "reason counts match ledger", "reasons in vocabulary", "kept = outputs", "output keys unique",
        "every output has a kept ledger row"]
    assert {c.name: c.detail for c in checks}["kept = outputs"] == "kept 14000, output rows 14000, manifest 14000"


@pytest.mark.parametrize("partition_keys", [1 << 20, 997])
def test_a_key_in_two_shards_is_a_duplicate(stage, partition_keys):
    d, m = stage
    # The first output key of shard 3 appears again in shard 0 (data and a kept ledger row), so
    # every count still agrees: only uniqueness across shards can catch it.
    data3 = pq.read_table(_shard(d, "data", 3))
    ledger3 = pq.read_table(_shard(d, "ledger", 3))
    key = data3.column("key")[0].as_py()
    _write(_shard(d, "data", 0), pa.concat_tables([pq.read_table(_shard(d, "data", 0)), data3.slice(0, 1)]), PAIR_SCHEMA)
    lrow = ledger3.filter(pa.compute.equal(ledger3.column("key"), key))
    assert lrow.column("status").to_pylist() == ["kept"]
    _write(_shard(d, "ledger", 0), pa.concat_tables([pq.read_table(_shard(d, "ledger", 0)), lrow]), LEDGER_SCHEMA)
    refresh_manifest(d, inputs=N + 1, ledger_rows=N + 1, outputs=14_001,
                     by_status={"kept": 14_001, "rejected": 6_000},
                     by_reason={**m.counts["by_reason"], "kept/ok": 14_001})
    assert _failed(verify(d, partition_keys=partition_keys)) == {"output keys unique": key}


@pytest.mark.parametrize("partition_keys", [1 << 20, 997])
def test_output_without_kept_ledger_row(stage, partition_keys):
    d, m = stage
    ledger = pq.read_table(_shard(d, "ledger", 2))
    kept_rows = [i for i, s in enumerate(ledger.column("status").to_pylist()) if s == "kept"]
    i1, i2 = kept_rows[10], kept_rows[500]
    keys = sorted(ledger.column("key")[i].as_py() for i in (i1, i2))
    status = ledger.column("status").to_pylist()
    reason = ledger.column("reason").to_pylist()
    for i in (i1, i2):
        status[i], reason[i] = "rejected", "caption_repetitive"
    ledger = ledger.set_column(2, "status", pa.array(status)).set_column(3, "reason", pa.array(reason))
    _write(_shard(d, "ledger", 2), ledger, LEDGER_SCHEMA)
    by_reason = dict(m.counts["by_reason"])
    by_reason["kept/ok"] -= 2
    by_reason["rejected/caption_repetitive"] += 2
    refresh_manifest(d, by_reason=by_reason)
    assert _failed(verify(d, partition_keys=partition_keys)) == {
        "kept = outputs": "kept 13998, output rows 14000, manifest 14000",
        "every output has a kept ledger row": ", ".join(keys),
    }


@pytest.mark.parametrize("partition_keys", [1 << 20, 997])
def test_unknown_reason_and_wrong_counts(stage, partition_keys):
    d, m = stage
    ledger = pq.read_table(_shard(d, "ledger", 1))
    reason = ledger.column("reason").to_pylist()
    i = reason.index("caption_repetitive")
    reason[i] = "made_up_reason"
    _write(_shard(d, "ledger", 1), ledger.set_column(3, "reason", pa.array(reason)), LEDGER_SCHEMA)
    by_reason = dict(m.counts["by_reason"])
    by_reason["rejected/caption_repetitive"] -= 1
    by_reason["rejected/made_up_reason"] = 1
    refresh_manifest(d, by_reason=by_reason)
    assert _failed(verify(d, partition_keys=partition_keys)) == {"reasons in vocabulary": "made_up_reason"}
    by_reason["rejected/made_up_reason"] = 2
    refresh_manifest(d, by_reason=by_reason)
    failed = _failed(verify(d, partition_keys=partition_keys))
    assert set(failed) == {"reasons in vocabulary", "reason counts match ledger"}
    assert "'rejected/made_up_reason': 1" in failed["reason counts match ledger"]
    assert "'rejected/made_up_reason': 2" in failed["reason counts match ledger"]


_MEMORY_CHILD = """
import json, sys, tracemalloc
import pyarrow as pa
from pipelines.verify import verify
tracemalloc.start()
checks = verify(sys.argv[1], jobs=1, partition_keys=int(sys.argv[2]))
print(json.dumps({"ok": all(c.ok for c in checks), "python": tracemalloc.get_traced_memory()[1],
                  "arrow": pa.default_memory_pool().max_memory()}))
"""


def test_memory_does_not_grow_with_the_number_of_keys(tmp_path):
    """Python heap (tracemalloc) + Arrow pool peak of verify at 50k and 250k ledger rows, same shard
    size and partition size: flat. The first implementation kept a Counter of every key (and a
    Python list of every ledger shard), which grows ~5x here."""
    peaks = {}
    for n in (50_000, 250_000):
        d = str(tmp_path / f"s{n}")
        synthesize_stage(d, n, num_shards=n // 12_500)
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, d, "20000"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["ok"]
        peaks[n] = r["python"] + r["arrow"]
    assert peaks[250_000] <= 1.5 * peaks[50_000], peaks


def test_cli_jobs_checksums_in_parallel_and_names_the_bad_file(stage):
    d, m = stage
    ok = subprocess.run([*MMCORPUS, "verify", "--jobs", "2", "--json", d], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    path = _shard(d, "ledger", 3)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    bad = subprocess.run([*MMCORPUS, "verify", "--jobs", "2", "--json", d], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)[d]["checks"]}
    assert checks["files match checksums"]["ok"] is False
    assert checks["files match checksums"]["detail"].startswith("ledger/part-00003-of-00004.parquet: sha256 ")
    refused = subprocess.run([*MMCORPUS, "verify", "--jobs", "0", d], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--jobs must be at least 1, got 0" in refused.stderr
