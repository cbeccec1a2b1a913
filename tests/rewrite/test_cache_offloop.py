"""Rewrite-cache I/O never runs on the client's event loop: on a slow fsspec filesystem (``memory://``
plus a delay per call), every cache call runs on a cache thread, a batch's lookups overlap, and the
whole run takes far less than the cache calls would one after another. Real Beam pipeline, real
client against the stand-in server. A second pass answers everything from that cache."""

from __future__ import annotations

import threading
import time
import uuid

import apache_beam as beam
import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from rewriter.cache import ResponseCache
from rewriter.standin import StandInServer
from schemas.records import Pair
from transforms.rewrite import RewriteCaptions, RewriteConfig

DELAY_S = 0.1
N = 48


class RecordingSlowFS(MemoryFileSystem):
    """``memory://`` + ``DELAY_S`` per call, recording (thread name, start, end) of every call."""

    protocol = "slowrec"
    calls: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def _slow(self, fn, *a, **kw):
        t0 = time.monotonic()
        time.sleep(DELAY_S)
        try:
            return fn(*a, **kw)
        finally:
            with self.lock:
                RecordingSlowFS.calls.append((threading.current_thread().name, t0, time.monotonic()))

    def cat_file(self, path, *a, **kw):
        return self._slow(super().cat_file, path, *a, **kw)

    def pipe_file(self, path, *a, **kw):
        return self._slow(super().pipe_file, path, *a, **kw)

    def exists(self, path, **kw):
        return self._slow(super().exists, path, **kw)


fsspec.register_implementation("slowrec", RecordingSlowFS, clobber=True)


def _max_overlap(calls) -> int:
    edges = sorted([(s, 1) for _, s, _ in calls] + [(e, -1) for _, _, e in calls])
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


def _run(srv, cache_dir: str, out) -> tuple[float, dict[str, str]]:
    cfg = RewriteConfig(endpoint=srv.base_url, model="rw-test", policy="all", cache_dir=cache_dir, concurrency=8,
                        batch_size=N, cache_threads=16, timeout_s=30)
    pairs = [Pair(key=f"k{i:02d}", caption=f"a red kite number {i} over a green hill") for i in range(N)]
    t0 = time.monotonic()
    with beam.Pipeline(argv=["--direct_running_mode=in_memory", "--direct_num_workers=1"]) as p:
        _ = (p | beam.Create(pairs) | RewriteCaptions(cfg) | beam.Map(lambda o: f"{o.key} {o.status}/{o.reason}")
             | beam.io.WriteToText(str(out), shard_name_template=""))
    seconds = time.monotonic() - t0
    return seconds, dict(line.split() for line in out.read_text().splitlines())


def test_cache_calls_run_on_cache_threads_in_parallel(tmp_path):
    root = f"slowrec://cache-{uuid.uuid4().hex}"
    RecordingSlowFS.calls = []
    with StandInServer(latency_s=0.05) as srv:
        seconds, got = _run(srv, root, tmp_path / "cold.txt")
        assert got == {f"k{i:02d}": "kept/ok" for i in range(N)}
        assert len(srv.seen) == N
        cold_calls = list(RecordingSlowFS.calls)
        # one lookup (a single round trip on fsspec) and one store per caption
        assert len(cold_calls) == 2 * N
        assert {name.split("_")[0] for name, _, _ in cold_calls} == {"rewrite-cache"}
        assert _max_overlap(cold_calls) >= 4
        # On the loop, the 2N calls of DELAY_S would run one after another (9.6 s from the first lookup
        # to the last store); generous bound for a busy box.
        span = max(e for _, _, e in cold_calls) - min(s for _, s, _ in cold_calls)
        assert span < 2 * N * DELAY_S * 0.5, (span, seconds)

        RecordingSlowFS.calls = []
        seconds_warm, got = _run(srv, root, tmp_path / "warm.txt")
        assert got == {f"k{i:02d}": "kept/ok" for i in range(N)} and len(srv.seen) == N  # no new request
        assert len(RecordingSlowFS.calls) == N and _max_overlap(RecordingSlowFS.calls) >= 4
    assert len([k for k in RecordingSlowFS.store if root.split("://")[1] in k]) == N
    assert ResponseCache(root).get("0" * 64) is None
