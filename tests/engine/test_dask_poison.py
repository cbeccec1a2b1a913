"""A record that kills its Dask worker every time: the stage ends in distributed's KilledWorker, the CLI
exits 1 with the engine's message and no traceback, publishes nothing, and a rerun without the record into
the same output directory completes byte-identical to the DirectRunner."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from engine.conftest import REPO, manifest_files, running_cluster, tree, worker_env
from pipelines import cli

pytestmark = pytest.mark.slow

PRELOAD = pathlib.Path(__file__).with_name("poison_preload.py")
POISON = "POISON-KILLS-ITS-WORKER"  # the caption marker poison_preload.py reacts to
CAPTIONS = [
    "a brown dog running on a sandy beach", "two children flying a red kite in a park",
    "a bowl of fresh fruit on a wooden table", "an old stone bridge over a quiet river",
    "a cyclist riding down a mountain road at sunset", "a black cat sleeping on a sunny windowsill",
    "a crowded market street with colourful awnings", "a lighthouse on a rocky coast under clouds",
    "a plate of pasta with tomato sauce and basil", "snow covered pine trees along a forest path",
    "a group of friends laughing around a campfire", "a vintage car parked in front of a diner",
]


@pytest.fixture(scope="module")
def poisoned_cluster(tmp_path_factory):
    """`dask scheduler` + `dask worker --nworkers 2 --preload poison_preload.py`, separate processes.
    The scheduler gives up on a task after 2 worker deaths (allowed-failures 1; the default 3 only
    makes the test slower: each death restarts a worker)."""
    with running_cluster(tmp_path_factory.mktemp("dask-poison-logs"),
                         scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"},
                         worker_args=("--preload", str(PRELOAD))) as cluster:
        yield cluster


def write_rows(path: pathlib.Path, captions: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, c in enumerate(captions):
            f.write(json.dumps({"url": f"http://127.0.0.1/{i}.jpg", "caption": c}) + "\n")
    return str(path)


def test_poison_record_ends_in_killed_worker_then_clean_rerun_is_identical(poisoned_cluster, tmp_path):
    clean = write_rows(tmp_path / "clean.jsonl", CAPTIONS)
    poisoned = write_rows(tmp_path / "poisoned.jsonl", CAPTIONS[:5] + [f"a {POISON} caption"] + CAPTIONS[5:])
    out = tmp_path / "dask"
    flags = ["--runner", "dask", "--dask-address", poisoned_cluster.address, "--num-shards", "2"]
    pids_before = set(poisoned_cluster.worker_pids().values())

    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "filter", "--input", poisoned, "--output", str(out), *flags],
                          cwd=str(REPO), env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    # the last thing the person sees, and the only error line: the engine's own message, with
    # distributed's reason inside it, and no Python traceback (MMCORPUS_LOG_LEVEL=DEBUG shows one)
    assert last.startswith("mmcorpus filter: error: Dask engine: a task's workers died repeatedly (Attempted to run task "), last
    assert "on 2 different workers, but all those workers died while running it" in last
    assert last.endswith("the stage did not finish and its output has no manifest. Check the workers' memory limit "
                         "and logs, then rerun the stage"), last
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [last]
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr[-3000:]
    # Nothing was published, nor left behind: no manifest, no data or ledger file, no staging, no lock.
    assert sorted(out.rglob("*")) == []
    # The poison really killed worker processes: their nanny started new ones.
    poisoned_cluster.wait_for_workers(2)
    assert len(pids_before - set(poisoned_cluster.worker_pids().values())) >= 1

    # Without the record, into the same output directory: completes, same bytes as the DirectRunner.
    assert cli.main(["filter", "--input", clean, "--output", str(tmp_path / "direct"), "--num-shards", "2"]) == 0
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "filter", "--input", clean, "--output", str(out), *flags],
                          cwd=str(REPO), env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert manifest_files(out) == manifest_files(tmp_path / "direct")
    assert tree(out) == tree(tmp_path / "direct")
