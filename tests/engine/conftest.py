"""A real Dask cluster for the engine tests: `dask scheduler` and `dask worker --nworkers 2` started from
the CLI as separate processes, once per module."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    # The workers import mmcorpus from this checkout, as a cluster node imports its installed copy,
    # and the DoFns this test module defines (pickled by reference) from tests/.
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, MMCORPUS_PROGRESS="0")


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen
    workers: subprocess.Popen
    logs: pathlib.Path

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of its worker process (the child its nanny restarts when it dies)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return client.run(os.getpid)

    def wait_for_workers(self, n: int, timeout_s: float = 180) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=timeout_s)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started: a worker CLI and its nannies/workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def running_cluster(logs: pathlib.Path, scheduler_env: dict | None = None, worker_args: tuple[str, ...] = ()):
    """`dask scheduler` and `dask worker --nworkers 2 --nthreads 1` as separate process groups, logging
    into ``logs``; ``scheduler_env`` adds to the scheduler's environment, ``worker_args`` to the worker
    command. Yields the ``Cluster`` once both workers joined; stops both groups on exit."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = worker_env()
    sched = subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=dict(env, **(scheduler_env or {})), cwd=str(logs), stdout=open(logs / "scheduler.log", "wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    workers = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if sched.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dask scheduler did not start: {(logs / 'scheduler.log').read_text()[-2000:]}")
                time.sleep(0.2)
        workers = subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
             *worker_args, "--local-directory", str(logs / "worker-space")],
            env=env, cwd=str(logs), stdout=open(logs / "workers.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cluster = Cluster(address, sched, workers, logs)
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        if workers is not None:
            _stop(workers)
        _stop(sched)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("dask-logs")) as cluster:
        yield cluster


def tree(root) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    root = pathlib.Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def manifest_files(root) -> list[tuple[str, str, int, int]]:
    from transforms.stage_io import read_manifest

    return [(f.path, f.sha256, f.rows, f.bytes) for f in read_manifest(str(root)).files]
