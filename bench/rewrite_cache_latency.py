"""Rewrite throughput with the response cache on a slow filesystem: cache I/O on the event loop (as it
was) against cache I/O in a thread pool (as it is), as a share of the ideal C/L.

The stand-in server runs in its own process with latency L and at most C answers in progress (ideal
rate C/L). The rewrite DoFn (``transforms.rewrite.RewriteBatchFn``, real client, real cache code) runs
here with C requests in flight and its cache on ``slowmem://``: fsspec's ``memory://`` filesystem with
an added latency per call, standing in for an object store. "on the loop" is the code before this
change (a lookup = ``exists`` + read, then a write, each blocking the event loop); "thread pool" is
the current code. Cold: every caption is a miss (lookup, request, store); warm: every caption a hit.

    .venv/bin/python -m bench.rewrite_cache_latency            # C=16, L=100 ms, fs 20 ms, 640 captions
    .venv/bin/python -m bench.rewrite_cache_latency --quick    # 160 captions

``section()`` returns the markdown section (for ``bench.run_all``).
"""

from __future__ import annotations

import argparse
import time
import uuid

import fsspec
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from fsspec.implementations.memory import MemoryFileSystem

from bench.rewrite_throughput import StandInProcess
from rewriter import prompts
from rewriter.cache import ResponseCache
from rewriter.client import Completion
from schemas.records import Pair
from transforms.rewrite import RewriteBatchFn, RewriteConfig

COMMAND = "python -m bench.rewrite_cache_latency"
TITLE = "Rewrite cache on a slow filesystem"


class SlowMemoryFileSystem(MemoryFileSystem):
    """``memory://`` with ``latency_s`` added to every call that would be a round trip to a store."""

    protocol = "slowmem"
    latency_s = 0.02

    def _wait(self):
        time.sleep(self.latency_s)

    def cat_file(self, path, *args, **kwargs):
        self._wait()
        return super().cat_file(path, *args, **kwargs)

    def pipe_file(self, path, *args, **kwargs):
        self._wait()
        return super().pipe_file(path, *args, **kwargs)

    def exists(self, path, **kwargs):
        self._wait()
        return super().exists(path, **kwargs)


fsspec.register_implementation("slowmem", SlowMemoryFileSystem, clobber=True)


class OnLoopCacheFn(RewriteBatchFn):
    """The code before the change: every cache call blocks the event loop, and a lookup is two
    round trips (``exists``, then a read), as Beam's ``FileSystems`` path does."""

    async def _lookup(self, keys):
        return {}

    async def _answer(self, key, caption, entry):
        if self._cache is not None:
            fs, path = self._cache._fs, self._cache.path(key)
            entry = self._cache.get(key) if fs.exists(path) else None
            if entry is not None:
                self._cache_hits += 1
                return Completion.from_entry(entry)
        completion = await self._backend.complete(caption)
        if self._cache is not None:
            entry = completion.to_entry()
            entry.update(model=self._model, prompt_version=prompts.PROMPT_VERSION, params=self._params)
            self._cache.put(key, entry)
        return completion


def run_fn(fn_cls, cfg: RewriteConfig, captions: list[str]) -> tuple[float, int, int]:
    """(wall seconds, outcomes, cache hits) for all captions through one DoFn instance."""
    fn = fn_cls(cfg)
    fn.setup()
    try:
        fn.start_bundle()
        pairs = [Pair(key=f"k{i}", caption=c, needs_rewrite=True) for i, c in enumerate(captions)]
        out = []
        t = time.perf_counter()
        for i in range(0, len(pairs), cfg.batch_size):
            out.extend(fn.process(pairs[i:i + cfg.batch_size], GlobalWindow(), MIN_TIMESTAMP))
        out.extend(fn.finish_bundle())
        dt = time.perf_counter() - t
        assert len(out) == len(pairs), (len(out), len(pairs))
        return dt, len(out), fn._cache_hits
    finally:
        fn.teardown()


def measure(n: int = 640, concurrency: int = 16, latency: float = 0.1, fs_latency: float = 0.02) -> list[dict]:
    SlowMemoryFileSystem.latency_s = fs_latency
    ideal = concurrency / latency
    rows = []
    with StandInProcess(latency, concurrency) as srv:
        def cfg(cache_dir):
            return RewriteConfig(endpoint=srv.base_url, model="bench", cache_dir=cache_dir, concurrency=concurrency,
                                 batch_size=4 * concurrency, timeout_s=60, max_retries=0)

        # distinct captions per run, so "cold" really misses everything
        def captions(tag):
            return [f"a photo of {tag} item {i} on a wooden table" for i in range(n)]

        dt, k, _ = run_fn(RewriteBatchFn, cfg(None), captions("nocache"))
        rows.append({"cache": "none", "code": "-", "state": "-", "seconds": dt, "rate": k / dt})
        for code, cls in (("on the loop (before)", OnLoopCacheFn), ("thread pool (now)", RewriteBatchFn)):
            root = f"slowmem://bench-{uuid.uuid4().hex}"
            tag = code.split()[0]
            dt, k, hits = run_fn(cls, cfg(root), captions(tag))
            rows.append({"cache": f"slowmem {fs_latency * 1000:.0f} ms", "code": code, "state": "cold", "seconds": dt,
                         "rate": k / dt, "hits": hits})
            dt, k, hits = run_fn(cls, cfg(root), captions(tag))
            assert hits == n, hits
            rows.append({"cache": f"slowmem {fs_latency * 1000:.0f} ms", "code": code, "state": "warm", "seconds": dt,
                         "rate": k / dt, "hits": hits})
    for r in rows:
        r["share"] = r["rate"] / ideal
    return rows


def section(quick: bool = False) -> str:
    """The markdown section: a table and the command that produced it."""
    n, c, lat, fs_lat = (160 if quick else 640), 16, 0.1, 0.02
    rows = measure(n=n, concurrency=c, latency=lat, fs_latency=fs_lat)
    lines = [
        f"`{COMMAND}{' --quick' if quick else ''}`: {n} captions, C = {c} in flight, stand-in latency "
        f"L = {lat * 1000:.0f} ms (ideal C/L = {c / lat:.0f} req/s), cache on `slowmem://` "
        f"(`memory://` + {fs_lat * 1000:.0f} ms per call). Cold: every caption a miss; warm: every caption a hit.",
        "",
        "| cache | cache I/O | state | seconds | captions/s | share of C/L |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['code']} | {r['state']} | {r['seconds']:.2f} | {r['rate']:.0f} | {r['share']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="160 captions instead of 640")
    args = p.parse_args(argv)
    print(section(quick=args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
