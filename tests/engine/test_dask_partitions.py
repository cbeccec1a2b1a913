"""The Dask engine's partition count by default follows the input's bytes / --target-shard-bytes (a
partition holds about one shard), --dask_npartitions overrides it, and outputs stay byte-identical to the
DirectRunner's (real `dask scheduler` + two `dask worker` processes)."""

from __future__ import annotations

import logging
import re

import pytest

from engine.conftest import REPO, tree
from pipelines import cli
from transforms.stage_io import read_manifest

pytestmark = pytest.mark.slow

ROWS = REPO / "tests" / "fixtures" / "bad_inputs" / "tables" / "rows.jsonl"
# 1,049,173 bytes: 200,000-byte shards make ceil(1049173 / 200000) = 6 of them, more than the 2 threads.
TARGET = "200000"


def _partitions(caplog) -> list[int]:
    """The engine's "N partitions per shuffle" of every Dask run logged so far."""
    return [int(m.group(1)) for r in caplog.records
            if (m := re.search(r"Dask engine: .* (\d+) partitions per shuffle", r.getMessage()))]


def test_partitions_follow_target_shard_bytes_and_override(dask_cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmcorpus")
    assert ROWS.stat().st_size == 1_049_173  # the expected counts below are worked out from this size
    dask = ["--runner", "dask", "--dask-address", dask_cluster.address]
    common = ["filter", "--input", str(ROWS), "--target-shard-bytes", TARGET]

    assert cli.main([*common, "--output", str(tmp_path / "direct")]) == 0
    assert _partitions(caplog) == []  # the DirectRunner gets no Dask partition flag

    assert cli.main([*common, "--output", str(tmp_path / "dask"), *dask]) == 0
    assert _partitions(caplog) == [6]  # not the cluster's 2 threads
    assert tree(tmp_path / "dask") == tree(tmp_path / "direct")  # every byte, the manifest included
    assert {f.path.rsplit("-of-", 1)[1] for f in read_manifest(str(tmp_path / "dask")).files} == {"00006.parquet"}

    # --dask_npartitions still wins, and the default target (512 MiB) leaves the cluster's threads.
    assert cli.main([*common, "--output", str(tmp_path / "dask3"), *dask, "--dask_npartitions", "3"]) == 0
    assert cli.main(["filter", "--input", str(ROWS), "--output", str(tmp_path / "dask-default"), *dask]) == 0
    assert _partitions(caplog) == [6, 3, 2]
    assert tree(tmp_path / "dask3") == tree(tmp_path / "direct")
