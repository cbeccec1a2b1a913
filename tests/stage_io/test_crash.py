"""SIGKILL the driver of filter, dedup and pack while it writes (real subprocesses): nothing appears under
a final name, the rerun takes over the dead run's lock and writes the same bytes as an uninterrupted
run. A second run into a directory a live run holds refuses and names it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from storage.lock import LOCK_NAME
from storage.staging import STAGING_NAME

CAPTIONS = 3000
SHARDS = "16"


def _env() -> dict[str, str]:
    env = dict(os.environ, MMCORPUS_PROGRESS="0", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _cmd(stage: str, inp: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / f"{stage}.py"), "--input", inp, "--output", str(out),
            "--num-shards", SHARDS, *extra]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _final_names(root: Path) -> list[str]:
    """Everything in an output directory outside the staging area and the lock file."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in (STAGING_NAME, LOCK_NAME)
    )


def _kill_while_writing(cmd: list[str], out: Path) -> list[str]:
    """Start ``cmd``; SIGKILL it as soon as its first output file is staged. Returns the staged files.
    A run that finishes before the kill lands (a very fast machine) is retried with a fresh directory."""
    for _ in range(3):
        subprocess.run(["rm", "-rf", str(out)], check=True)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        staging = out / STAGING_NAME
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if staging.is_dir() and any(p.is_file() for p in staging.rglob("*")):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    pytest.fail("the stage finished every time before it could be killed mid-write")


@pytest.fixture(scope="module")
def captions(tmp_path_factory, sample_dir=REPO / "data" / "sample") -> str:
    tsv = tmp_path_factory.mktemp("in") / "captions.tsv"
    lines = (sample_dir / "cc3m_val_captions_8k.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    tsv.write_text("".join(lines[:CAPTIONS]), encoding="utf-8")
    return str(tsv)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, captions) -> tuple[Path, Path]:
    """An uninterrupted filter run (the reference), during which a second run into its directory refused."""
    root = tmp_path_factory.mktemp("filter")
    ref = root / "ref"
    cmd = _cmd("filter", captions, ref, "--caption-col", "0", "--url-col", "1")
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ref / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    # Pause the first run while it holds the lock, so the second surely starts while it runs.
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert (
        f"mmcorpus filter: error: {ref} is in use by a running mmcorpus filter run "
        f"(pid {first.pid} on host {socket.gethostname()}, started "
    ) in second.stderr
    assert not (ref / LOCK_NAME).exists() and not (ref / STAGING_NAME).exists()
    return root, ref


def _crash_and_rerun(cmd: list[str], out: Path, ref: Path) -> None:
    staged = _kill_while_writing(cmd, out)
    assert staged, "killed before anything was staged"
    assert "manifest.json" not in staged  # killed before the end of the pipeline
    assert _final_names(out) == []  # nothing under a final name: no manifest, no data/ledger/pack file
    assert (out / LOCK_NAME).exists()  # the dead run's lock is left behind ...
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over a stale lock" in rerun.stderr  # ... and taken over: its pid is gone on this host
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want) and got == want
    assert not (out / STAGING_NAME).exists() and not (out / LOCK_NAME).exists()


def test_filter_killed_mid_write_reruns_to_the_same_bytes(filtered, captions):
    root, ref = filtered
    _crash_and_rerun(_cmd("filter", captions, root / "crash", "--caption-col", "0", "--url-col", "1"), root / "crash", ref)


def test_dedup_killed_mid_write_reruns_to_the_same_bytes(filtered, tmp_path):
    _, filter_out = filtered
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd("dedup", str(filter_out), ref), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _crash_and_rerun(_cmd("dedup", str(filter_out), tmp_path / "crash"), tmp_path / "crash", ref)


def test_pack_killed_mid_write_reruns_to_the_same_bytes(filtered, tmp_path):
    _, filter_out = filtered
    extra = ("--seq-len", "256", "--max-packs-per-shard", "8", "--format", "webdataset")
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd("pack", str(filter_out), ref, *extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(list((ref / "data").glob("packs-*.tar"))) > 10  # many pack shards: the kill lands among them
    _crash_and_rerun(_cmd("pack", str(filter_out), tmp_path / "crash", *extra), tmp_path / "crash", ref)
