"""Shard writer memory at two corpus sizes: the write step's own peak (tracemalloc + Arrow pool, reported
by the stage as the Beam distribution ``mmcorpus.<stage>/writer_peak_bytes``) with a fixed
``--target-shard-bytes`` and with a fixed shard count, beside the whole process's peak (tracemalloc + the
same Arrow pool samples; the DirectRunner runs nothing else during a write, so it is the true peak), and
against a whole-shard-in-memory writer (the design before issue 9: sort every Outcome, one Arrow table,
one Parquet byte string) on the same shard.

    .venv/bin/python -m bench.writer_memory                       # 2,000 and 8,000 records, about 1-2 minutes
    .venv/bin/python -m bench.writer_memory --records 5000 --factor 4 --target 64MiB
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc

import apache_beam as beam
import pyarrow as pa

from pipelines.runner import MEASURE_WRITER_MEMORY_ENV, parse_size, run_stage
from schemas import reasons
from schemas.records import REJECTED, Outcome, Pair, pairs_to_table
from transforms.stage_io import DATA_ROW_GROUP_ROWS, _sort_key, shard_of, table_to_parquet_bytes

MB = 1024 * 1024


def make_outcome(i: int, mean_image_bytes: int) -> Outcome:
    """Record ``i``: random (incompressible) image bytes of 0.5-1.5x the mean size; every 10th rejected."""
    rng = random.Random(i)
    image = rng.randbytes(rng.randint(mean_image_bytes // 2, mean_image_bytes * 3 // 2))
    pair = Pair(key=f"{rng.getrandbits(64):016x}", caption=f"synthetic caption {i} " * 3, image=image,
                url=f"http://example.com/{i}.jpg", source=f"bench#{i}")
    if i % 10 == 0:
        return Outcome.dropped(pair, REJECTED, reasons.CAPTION_TOO_SHORT_WORDS, "bench")
    return Outcome.kept(pair)


def run_writer(records: int, mean_image_bytes: int, workdir: str, target: int | None, num_shards: int | None) -> dict:
    """Run a real stage (DirectRunner) whose outcomes are generated on the workers; return its writer peaks."""
    out = os.path.join(workdir, f"out-{records}-{target}-{num_shards}")
    input_bytes = records * mean_image_bytes
    log = out + ".peaks.jsonl"  # a line per shard: own and whole-process peak
    os.environ[MEASURE_WRITER_MEMORY_ENV] = log
    t0 = time.monotonic()
    try:
        result = run_stage(
            stage="bench", output_dir=out, config={"bench": "writer_memory", "records": records},
            input_info={"kind": "bench", "fingerprint": f"{records}-{mean_image_bytes}", "bytes": input_bytes},
            build=lambda p: p | beam.Create(range(records)) | beam.Map(make_outcome, mean_image_bytes),
            beam_args=[], num_shards=num_shards, force=True, target_shard_bytes=target or 1,
        )
    finally:
        os.environ.pop(MEASURE_WRITER_MEMORY_ENV, None)
    peaks = result.writer_peak_bytes or {}
    data = [f for f in result.manifest.files if f.kind == "data"]
    shutil.rmtree(out, ignore_errors=True)
    with open(log, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {
        "records": records, "input_mb": input_bytes / MB, "shards": result.manifest.config["num_shards"],
        "largest_shard_mb": max(f.bytes for f in data) / MB, "peak_max_mb": peaks.get("max", 0) / MB,
        "peak_mean_mb": peaks.get("mean", 0) / MB,
        "process_max_mb": max(line["process_peak_bytes"] for line in lines) / MB,
        "own_share": min(line["peak_bytes"] / line["process_peak_bytes"] for line in lines), "seconds": time.monotonic() - t0,
    }


class _PoolSampledBuffer(io.BytesIO):
    """A BytesIO that keeps the Arrow pool's largest growth over ``base`` seen at its writes."""

    def __init__(self, base: int):
        super().__init__()
        self.base, self.pool_peak = base, 0

    def write(self, b) -> int:
        self.pool_peak = max(self.pool_peak, pa.total_allocated_bytes() - self.base)
        return super().write(b)


def whole_shard_peak(records: int, mean_image_bytes: int, num_shards: int) -> float:
    """Peak (MB) of the old write step on shard 0 of the same outcomes: everything sorted and encoded in memory."""
    outcomes = [o for o in (make_outcome(i, mean_image_bytes) for i in range(records)) if shard_of(o.key, num_shards) == 0]
    base = pa.total_allocated_bytes()
    tracemalloc.start()
    ordered = sorted(outcomes, key=_sort_key)
    table = pairs_to_table(o.pair for o in ordered if o.pair is not None and o.status == "kept")
    arrow = pa.total_allocated_bytes() - base
    # through a buffer that samples the pool at each write Arrow hands it (when the pool holds the
    # encoded and compressed pages), as the streaming writer's probe does
    buf = _PoolSampledBuffer(base)
    data = table_to_parquet_bytes(table, DATA_ROW_GROUP_ROWS, buf)
    arrow = max(arrow, buf.pool_peak, pa.total_allocated_bytes() - base)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del data, table, ordered
    return (peak + arrow) / MB


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.writer_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000, help="records of the small corpus")
    ap.add_argument("--factor", type=int, default=4, help="the large corpus has this many times more")
    ap.add_argument("--image-bytes", type=int, default=30_000, help="mean image bytes per record")
    ap.add_argument("--target", type=parse_size, default=parse_size("16MiB"), help="--target-shard-bytes")
    ap.add_argument("--fixed-shards", type=int, default=2, help="shard count of the fixed-count rows")
    return ap


def markdown(argv: list[str]) -> str:
    """The command line and the table, measured now."""
    args = _parser().parse_args(argv)
    sizes = (args.records, args.records * args.factor)
    workdir = tempfile.mkdtemp(prefix="mmcorpus-bench-writer-")
    rows = []
    try:
        for mode in ("target", "fixed"):
            for n in sizes:
                r = run_writer(n, args.image_bytes, workdir, args.target if mode == "target" else None,
                               None if mode == "target" else args.fixed_shards)
                r["mode"] = f"--target-shard-bytes {args.target // MB}MiB" if mode == "target" else f"--num-shards {args.fixed_shards}"
                r["old_mb"] = whole_shard_peak(n, args.image_bytes, r["shards"])
                rows.append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = [f"`python -m bench.writer_memory {' '.join(argv)}`".replace(" `", "`"), "",
           "| sharding | records | input MB | shards | largest data shard MB | writer peak max MB | mean MB "
           "| process peak max MB | own / process (lowest shard) | whole-shard writer peak MB (shard 0) | stage s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['records']:,} | {r['input_mb']:.1f} | {r['shards']} | {r['largest_shard_mb']:.1f} "
                   f"| {r['peak_max_mb']:.1f} | {r['peak_mean_mb']:.1f} | {r['process_max_mb']:.1f} | {r['own_share']:.2f} "
                   f"| {r['old_mb']:.1f} | {r['seconds']:.1f} |")
    out.append("")
    for mode in ("target", "fixed"):
        a, b = [r for r in rows if r["mode"].startswith("--target" if mode == "target" else "--num")]
        out.append(f"- {a['mode']}: writer peak ratio {b['records'] // a['records']}x records = "
                   f"{b['peak_max_mb'] / a['peak_max_mb']:.2f} (whole-shard writer: {b['old_mb'] / a['old_mb']:.2f})")
    return "\n".join(out) + "\n"


TITLE = "Shard writer memory"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (bench.run_all); quick: 500 and 2,000 records."""
    return markdown(["--records", "500"] if quick else [])


def main(argv: list[str] | None = None) -> int:
    print(markdown(list(argv if argv is not None else sys.argv[1:])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
