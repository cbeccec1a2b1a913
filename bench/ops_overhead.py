"""Cost of the operations layer: the progress step every stage runs, and how long `inspect`,
`inspect --key` and `stats` take on a stage output, each as a ratio to a baseline in the same run.

    .venv/bin/python -m bench.ops_overhead [--records 100000] [--repeats 3]

1. Progress: a DirectRunner pipeline Create → Map → ParDo(ReportProgressFn) → Count with the live
   display on (rich, rendering to an in-memory console), with the step but no display, and without
   the step (baseline).
2. Inspection: `describe` (manifest only), `trace_key` (one ledger shard per stage, thanks to the
   key-hash sharding) and `stats.collect` on a filter → dedup run of N caption-only records, against a
   plain pyarrow read of all its ledger shards (baseline).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time

import apache_beam as beam


def _pipeline_seconds(n: int, mode: str) -> float:
    from pipelines import progress

    t0 = time.perf_counter()
    ctx = progress.stage_progress("bench", total=n, enabled=(mode == "display")) if mode != "none" else None
    if ctx is not None:
        ctx.__enter__()
    try:
        with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])) as p:
            pc = p | beam.Create(range(n)) | "Work" >> beam.Map(lambda x: x * 2)
            if mode != "none":
                pc = pc | "Progress" >> progress.ReportProgress("bench")
            _ = pc | beam.combiners.Count.Globally()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return time.perf_counter() - t0


def bench_progress(n: int, repeats: int) -> dict[str, float]:
    import rich.console

    # The live display renders to a throw-away console so terminal speed does not enter the numbers.
    real_console = rich.console.Console
    rich.console.Console = lambda *a, **k: real_console(file=io.StringIO(), force_terminal=True, width=120)
    try:
        # Interleaved, best of `repeats`: the machine is shared, so the minimum is the least noisy.
        times: dict[str, list[float]] = {"none": [], "counter": [], "display": []}
        for _ in range(repeats):
            for mode in times:
                times[mode].append(_pipeline_seconds(n, mode))
        out = {mode: min(ts) for mode, ts in times.items()}
    finally:
        rich.console.Console = real_console
    return out


def _make_run(root: str, n: int) -> None:
    from pipelines import dedup
    from pipelines import filter as filter_

    rng = random.Random(0)
    words = "a dog cat red blue car on the beach under sky with tree house man woman child old new".split()
    path = os.path.join(root, "captions.tsv")
    with open(path, "w") as f:
        for i in range(n):
            caption = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
            f.write(f"{caption}\thttp://example.invalid/{i}.jpg\n")
    os.environ["MMCORPUS_PROGRESS"] = "0"
    filter_.main(["--input", path, "--caption-col", "0", "--url-col", "1", "--output", os.path.join(root, "run", "filter"),
                  "--num-shards", "16"])
    dedup.main(["--input", os.path.join(root, "run", "filter"), "--output", os.path.join(root, "run", "dedup"),
                "--num-shards", "16"])


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_inspection(n: int, repeats: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    from pipelines import inspection, stats

    with tempfile.TemporaryDirectory() as root:
        _make_run(root, n)
        run = os.path.join(root, "run")
        ledger_files = [os.path.join(run, s, "ledger", f) for s in ("filter", "dedup")
                        for f in os.listdir(os.path.join(run, s, "ledger"))]
        key = pq.read_table(ledger_files[0], columns=["key"]).column("key")[0].as_py()
        return {
            "baseline_read_ledgers": _timed(lambda: [pq.read_table(f) for f in ledger_files], repeats),
            "describe": _timed(lambda: inspection.describe(os.path.join(run, "dedup")), repeats),
            "trace_key": _timed(lambda: inspection.trace_key(run, key), repeats),
            "stats_collect": _timed(lambda: stats.collect(run), repeats),
            "ledger_rows": sum(pq.read_metadata(f).num_rows for f in ledger_files),
        }


TITLE = "Operations overhead"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: progress step and inspection costs as ratios, measured now."""
    records, repeats = (2_000, 1) if quick else (50_000, 3)
    prog = bench_progress(records, repeats)
    base = prog["none"]
    ins = bench_inspection(records, repeats)
    b = ins["baseline_read_ledgers"]
    lines = [f"`python -m bench.ops_overhead --records {records} --repeats {repeats}` (best of {repeats}, modes interleaved)", "",
             f"Progress step, DirectRunner pipeline `Create → Map → [ReportProgress] → Count` over {records:,} records:", "",
             "| mode | seconds | ratio to no step |", "|---|---|---|",
             f"| no progress step (baseline) | {base:.2f} | 1.000 |",
             f"| step, display off (counter only) | {prog['counter']:.2f} | {prog['counter'] / base:.3f} |",
             f"| step + live rich bar | {prog['display']:.2f} | {prog['display'] / base:.3f} |", "",
             f"Inspection on a filter → dedup run of {records:,} caption-only records ({ins['ledger_rows']:,} ledger rows, "
             f"16 shards per stage), against a plain pyarrow read of all ledger shards of both stages ({b:.3f} s):", "",
             "| command | seconds | ratio |", "|---|---|---|"]
    for k, label in (("describe", "`inspect DIR` (describe)"), ("trace_key", "`inspect RUN --key K` (trace_key)"),
                     ("stats_collect", "`stats RUN` (collect)")):
        lines.append(f"| {label} | {ins[k]:.3f} | ×{ins[k] / b:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    prog = bench_progress(args.records, args.repeats)
    base = prog["none"]
    print(f"progress, {args.records:,} records, DirectRunner, best of {args.repeats} interleaved:")
    print(f"  no progress step   {base:7.2f} s  (baseline)")
    print(f"  step, no display   {prog['counter']:7.2f} s  x{prog['counter'] / base:.3f}")
    print(f"  step + live rich   {prog['display']:7.2f} s  x{prog['display'] / base:.3f}")

    ins = bench_inspection(args.records, args.repeats)
    b = ins["baseline_read_ledgers"]
    print(f"inspection (best of {args.repeats}), filter+dedup run of {args.records:,} records ({ins['ledger_rows']:,} ledger rows, 16 shards):")
    print(f"  pyarrow read of every ledger shard {b:7.3f} s  (baseline)")
    for k in ("describe", "trace_key", "stats_collect"):
        print(f"  {k:<33}  {ins[k]:7.3f} s  x{ins[k] / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
