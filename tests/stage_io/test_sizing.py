"""Shard counts follow the input's bytes (--target-shard-bytes); --num-shards overrides."""

from __future__ import annotations

import argparse
import os

import pytest

from pipelines.runner import DEFAULT_TARGET_SHARD_BYTES, ledger_only_input_info, parse_size, resolve_num_shards
from schemas.errors import UserError
from storage.files import read_manifest, stage_input_info


def test_parse_size():
    assert [parse_size(s) for s in ("536870912", "512MiB", "512M", "512mb", "1G", "1.5k", "64KiB")] == [
        536870912, 536870912, 536870912, 536870912, 1073741824, 1536, 65536,
    ]
    assert DEFAULT_TARGET_SHARD_BYTES == 536870912
    for bad in ("", "12 parsecs", "-5M", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_resolve_num_shards():
    mib = 1 << 20
    assert resolve_num_shards(None, 512 * mib, {"bytes": 0}) == 1
    assert resolve_num_shards(None, 512 * mib, {"bytes": 512 * mib}) == 1
    assert resolve_num_shards(None, 512 * mib, {"bytes": 512 * mib + 1}) == 2
    assert resolve_num_shards(None, 100, {"files": [{"bytes": 250}, {"bytes": 120}]}) == 4
    assert resolve_num_shards(7, 100, {"bytes": 10**9}) == 7
    assert ledger_only_input_info({"records": 1000, "bytes": 10**12}) == {"bytes": 256_000}
    assert resolve_num_shards(None, 100, {"files": ["a.jsonl", "b.jsonl"]}) == 1  # names without sizes
    with pytest.raises(UserError, match="--num-shards 0"):
        resolve_num_shards(0, 100, {"bytes": 1})


def _shards(out) -> set[str]:
    return {f.path.rsplit("-of-", 1)[1] for f in read_manifest(str(out)).files if f.kind in ("data", "ledger")}


def test_filter_and_dedup_size_their_shards_from_their_input(tmp_path, sample_dir):
    from pipelines import dedup, filter as filter_stage

    tsv = tmp_path / "captions.tsv"  # the first 2,000 CC3M captions
    lines = (sample_dir / "cc3m_val_captions_8k.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    tsv.write_text("".join(lines[:2000]), encoding="utf-8")
    target = os.path.getsize(tsv) // 3 + 1  # the raw file is 3 targets, just under
    argv = ["--input", str(tsv), "--caption-col", "0", "--url-col", "1", "--output", str(tmp_path / "f"),
            "--target-shard-bytes", str(target)]
    filter_stage.run(*filter_stage.parser().parse_known_args(argv))
    m = read_manifest(str(tmp_path / "f"))
    assert m.config["num_shards"] == 3 and _shards(tmp_path / "f") == {"00003.parquet"}
    assert len(m.files) == 6

    data_bytes = sum(e.stat().st_size for e in (tmp_path / "f" / "data").iterdir())
    assert stage_input_info(str(tmp_path / "f"))["bytes"] == data_bytes
    dedup.run(["--input", str(tmp_path / "f"), "--output", str(tmp_path / "d"), "--target-shard-bytes", str(data_bytes // 2 - 1)])
    assert read_manifest(str(tmp_path / "d")).config["num_shards"] == 3  # 2 targets and a bit

    # pack writes only its ledger through the stage writer: sized from 256 B per input record
    from pipelines import pack

    records = m.counts["outputs"]
    pack.run(["--input", str(tmp_path / "f"), "--output", str(tmp_path / "p"), "--seq-len", "512",
              "--target-shard-bytes", str(records * 256 // 4 + 1)])
    pm = read_manifest(str(tmp_path / "p"))
    assert pm.config["num_shards"] == 4 and _shards(tmp_path / "p") == {"00004.parquet"}


@pytest.mark.parametrize("setting", ["1", "path"])
def test_writer_peak_is_reported_per_shard(tmp_path, monkeypatch, setting):
    import json

    import apache_beam as beam

    from pipelines.runner import MEASURE_WRITER_MEMORY_ENV, run_stage
    from schemas.records import Outcome, Pair

    log = tmp_path / "peaks.jsonl"
    monkeypatch.setenv(MEASURE_WRITER_MEMORY_ENV, "1" if setting == "1" else str(log))
    pairs = [Pair(key=f"k{i:04d}", caption=f"caption {i}", source=f"t#{i}") for i in range(300)]
    result = run_stage(
        stage="bench", output_dir=str(tmp_path / "out"), config={}, input_info={"kind": "test", "fingerprint": "x"},
        build=lambda p: p | beam.Create(pairs) | beam.Map(lambda pair: Outcome.kept(pair)), beam_args=[], num_shards=3, force=True,
    )
    peaks = result.writer_peak_bytes
    assert peaks["shards"] == 3 and 0 < peaks["min"] <= peaks["mean"] <= peaks["max"] < 50 * 2**20
    if setting == "path":
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert sorted(x["shard"] for x in lines) == [0, 1, 2] and sum(x["records"] for x in lines) == 300
        assert max(x["peak_bytes"] for x in lines) == peaks["max"]
