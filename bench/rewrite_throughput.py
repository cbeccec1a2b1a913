"""Rewrite client throughput against the stand-in server: achieved requests/s as a share of C/L, speed-up over
a one-request-at-a-time client, the whole RewriteCaptions stage on the DirectRunner, and cache-hit replay.

The stand-in runs in its own process (``python -m rewriter.standin``) with a fixed latency L and at most C
answers in progress, so the ideal rate is C/L; the client runs here with C requests in flight.

    .venv/bin/python -m bench.rewrite_throughput                  # default grid + stage run
    .venv/bin/python -m bench.rewrite_throughput --quick          # smaller grid, no stage run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from rewriter.client import ClientConfig, RewriteClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StandInProcess:
    """The stand-in server in a child process (so its CPU does not compete with the client's GIL)."""

    def __init__(self, latency: float, max_concurrency: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewriter.standin", "--latency", str(latency), "--max-concurrency", str(max_concurrency)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"stand-in did not start: {line!r}")
        self.base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def close(self):
        self.proc.stdin.close()  # the stand-in serves until its stdin closes
        self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def _drive(base_url: str, n: int, concurrency: int) -> tuple[float, int, float, float]:
    """(wall seconds, most in flight, client CPU ms per request, mean request round trip) for n requests."""
    client = RewriteClient(ClientConfig(endpoint=base_url, model="bench", concurrency=concurrency, timeout_s=30),
                           api_key="sk-bench")
    captions = [f"a photo of bench item {i} on a table" for i in range(n)]
    await client.complete("warm up the connection pool")
    busy0 = client.stats.busy_seconds
    t, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(client.complete(c) for c in captions))
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    await client.aclose()
    assert all(r.finish_reason == "stop" for r in results)
    return dt, client.stats.max_in_flight, 1000 * cpu / n, (client.stats.busy_seconds - busy0) / n


def bench_client(latency: float, concurrency: int, waves: int) -> dict:
    n = concurrency * waves
    with StandInProcess(latency, concurrency) as srv:
        load = os.getloadavg()[0]
        dt, in_flight, cpu_ms, round_trip = asyncio.run(_drive(srv.base_url, n, concurrency))
        n_seq = min(n, 20, max(3, int(5 / max(latency, 1e-3))))  # about 5 s of one-at-a-time requests
        dt_seq, _, _, _ = asyncio.run(_drive(srv.base_url, n_seq, 1))
    rps, rps_seq = n / dt, n_seq / dt_seq
    ideal = concurrency / latency if latency else float("nan")
    return {
        "L_s": latency, "C": concurrency, "requests": n, "rps": round(rps, 1), "ideal_rps": round(ideal, 1),
        "fraction_of_C_over_L": round(rps / ideal, 3), "sequential_rps": round(rps_seq, 2),
        "speedup_vs_sequential": round(rps / rps_seq, 1), "max_in_flight": in_flight,
        "client_cpu_ms_per_request": round(cpu_ms, 2),
        # share of the C slots' time with a request outstanding: the client's own efficiency
        "slot_utilisation": round(round_trip * n / (concurrency * dt), 3),
        # what the stand-in really took per request (> L when its process is starved of CPU)
        "mean_round_trip_s": round(round_trip, 3), "load_avg_1m": round(load, 1),
    }


def bench_stage(latency: float, concurrency: int, n: int) -> dict:
    """RewriteCaptions in a DirectRunner pipeline: wall time of the openai-backend run, minus the same
    pipeline with the offline backend (Beam start-up, read, write: the fixed cost) for the request phase."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from rewrite.stage_fixture import make_stage_dir

    from pipelines import rewrite as rewrite_cli
    from schemas.records import Pair

    os.environ.setdefault("MMCORPUS_PROGRESS", "0")
    tmp = tempfile.mkdtemp(prefix="bench-rewrite-")
    pairs = [Pair(key=f"k{i:06d}", caption=f"a photo of bench item {i} on a table", needs_rewrite=True) for i in range(n)]
    inp = make_stage_dir(os.path.join(tmp, "in"), pairs, num_shards=4)
    common = ["--input", inp, "--policy", "all", "--num-shards", "4", "--batch-size", str(8 * concurrency)]

    t = time.perf_counter()
    rewrite_cli.main(common + ["--output", os.path.join(tmp, "offline"), "--backend", "offline-template"])
    t_offline = time.perf_counter() - t
    with StandInProcess(latency, concurrency) as srv:
        args = common + ["--endpoint", srv.base_url, "--model", "bench", "--concurrency", str(concurrency),
                         "--cache-dir", os.path.join(tmp, "cache")]
        t = time.perf_counter()
        rewrite_cli.main(args + ["--output", os.path.join(tmp, "openai")])
        t_openai = time.perf_counter() - t
        t = time.perf_counter()
        rewrite_cli.main(args + ["--output", os.path.join(tmp, "replay")])  # every answer cached
        t_replay = time.perf_counter() - t
    request_phase = max(1e-9, t_openai - t_offline)
    ideal = concurrency / latency
    return {
        "records": n, "L_s": latency, "C": concurrency, "wall_openai_s": round(t_openai, 2),
        "wall_offline_s": round(t_offline, 2), "wall_cache_replay_s": round(t_replay, 2),
        "stage_rps_incl_startup": round(n / t_openai, 1),
        "request_phase_rps": round(n / request_phase, 1),
        "fraction_of_C_over_L": round(n / request_phase / ideal, 3),
    }


TITLE = "Rewrite client throughput against the stand-in"
GRID = [(0.1, 1), (0.1, 8), (0.1, 32), (0.5, 64), (1.0, 128), (2.0, 256), (0.0, 64)]
QUICK_GRID = [(0.1, 8), (0.5, 32)]


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: the client grid and (full run) the whole stage."""
    grid = QUICK_GRID if quick else GRID
    rows = [bench_client(latency, c, waves=(4 if quick else 20) if latency <= 0.5 else 10) for latency, c in grid]
    lines = ["`python -m bench.rewrite_throughput" + (" --quick`" if quick else "`") + " (the stand-in in its own process with a "
             "fixed latency L and at most C answers in progress: the ideal rate is C/L; the client here keeps C requests in flight)", "",
             "\"Slot utilisation\" is the share of the C slots' time with a request outstanding (the client's own efficiency); "
             "\"mean round trip\" is what the stand-in really took per request, above L when its process is short of CPU; "
             "the 1-at-a-time baseline is the same client with one request in flight, measured in the same run.", "",
             "| L (s) | C | requests | achieved req/s | C/L | fraction of C/L | slot utilisation | mean round trip (s) "
             "| 1-at-a-time req/s | speed-up | client CPU ms/req | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal, frac = (r["ideal_rps"], r["fraction_of_C_over_L"]) if r["L_s"] > 0 else ("–", "–")  # L = 0: no ideal rate
        lines.append(f"| {r['L_s']} | {r['C']} | {r['requests']} | {r['rps']} | {ideal} | {frac} | "
                     f"{r['slot_utilisation']} | {r['mean_round_trip_s']} | {r['sequential_rps']} | {r['speedup_vs_sequential']}x | "
                     f"{r['client_cpu_ms_per_request']} | {r['load_avg_1m']} |")
    if not quick:
        st = bench_stage(0.5, 64, 2000)
        lines += ["", f"Whole stage (DirectRunner, {st['records']:,} records, L = {st['L_s']} s, C = {st['C']}): openai backend "
                  f"{st['wall_openai_s']} s, offline template {st['wall_offline_s']} s, cache replay {st['wall_cache_replay_s']} s; "
                  f"request phase {st['request_phase_rps']} req/s = **{st['fraction_of_C_over_L']} of C/L**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid, skip the stage run")
    p.add_argument("--stage-records", type=int, default=2000)
    args = p.parse_args(argv)
    # LLM answers take seconds (80 output tokens at 30-60 tokens/s per sequence), so the realistic rows
    # are the long-latency ones; L=0 measures the client's own ceiling (requests/s one process can drive).
    grid = QUICK_GRID if args.quick else GRID
    rows = []
    for latency, c in grid:
        row = bench_client(latency, c, waves=20 if latency <= 0.5 else 10)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| L (s) | C | requests | achieved req/s | C/L | fraction of C/L | slot utilisation | mean round trip (s) "
          "| 1-at-a-time req/s | speed-up | client CPU ms/req | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L_s']} | {r['C']} | {r['requests']} | {r['rps']} | {r['ideal_rps']} | "
              f"{r['fraction_of_C_over_L']} | {r['slot_utilisation']} | {r['mean_round_trip_s']} | "
              f"{r['sequential_rps']} | {r['speedup_vs_sequential']}x | {r['client_cpu_ms_per_request']} | "
              f"{r['load_avg_1m']} |")
    if not args.quick:
        stage = bench_stage(0.5, 64, args.stage_records)
        print("\nstage:", json.dumps(stage))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
