"""Filter throughput: the raw caption filter chain outside Beam vs the whole filter stage on the
DirectRunner (ingest + filters + sharded ledger/data writes + manifest), at 10k and 100k
caption-only records drawn from the bundled real captions (CC3M + LAION-style alt-text).

    .venv/bin/python -m bench.filter_throughput [--sizes 10000 100000]

Prints pairs/s per core for each, the Beam overhead as a ratio (raw / stage), and how the stage's
wall time grows with input size. The machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import random
import resource
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"


def real_captions() -> list[str]:
    with open(SAMPLE / "cc3m_val_captions_8k.tsv", newline="") as f:
        caps = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    caps += pq.read_table(SAMPLE / "img2dataset_sample_1000.parquet").column("TEXT").to_pylist()
    return caps


def make_table(n: int, path: pathlib.Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    caps = real_captions()
    chosen = [rng.choice(caps) for _ in range(n)]
    pq.write_table(
        pa.table({"url": [f"http://img.example/{i}.jpg" for i in range(n)], "caption": chosen}),
        path,
        row_group_size=10_000,
    )


def bench_raw(n: int) -> float:
    """Caption filters + quality flags on Pair objects in a plain loop: pairs/s."""
    from schemas.records import Pair
    from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
    from transforms.filter_base import run_filters
    from transforms.image_filters import ImageFilterConfig, image_filters

    rng = random.Random(1)
    caps = real_captions()
    pairs = [Pair(key=str(i), url=f"http://img.example/{i}.jpg", caption=rng.choice(caps)) for i in range(n)]
    cfg = CaptionFilterConfig()
    chain = caption_filters(cfg) + image_filters(ImageFilterConfig(require_image=False))
    flagger = CaptionQualityFlagger(cfg)
    t0 = time.perf_counter()
    for p in pairs:
        p2, reason, _ = run_filters(p, chain)
        if reason is None:
            flagger(p2)
    return n / (time.perf_counter() - t0)


def bench_stage(n: int, workdir: pathlib.Path) -> tuple[float, float]:
    """Whole filter stage on the DirectRunner: (wall seconds, pairs/s)."""
    from pipelines import filter as filter_stage

    table = workdir / f"captions_{n}.parquet"
    make_table(n, table)
    args, beam_args = filter_stage.parser().parse_known_args(
        ["--input", str(table), "--output", str(workdir / f"out_{n}"), "--force", "--direct_num_workers", "1"]
    )
    t0 = time.perf_counter()
    result = filter_stage.run(args, beam_args)
    dt = time.perf_counter() - t0
    assert result.manifest.counts["inputs"] == n
    return dt, n / dt


TITLE = "Filter throughput"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: raw filters vs the whole stage at two sizes, measured now."""
    import os

    sizes = [2_000, 5_000] if quick else [10_000, 100_000]
    os.environ["MMCORPUS_PROGRESS"] = "0"
    lines = [f"`python -m bench.filter_throughput --sizes {' '.join(map(str, sizes))}` (caption-only records drawn from the "
             "bundled CC3M + LAION-style captions; one process, DirectRunner in-memory mode)", "",
             "| records | raw caption filters + flags (pairs/s, 1 core) | filter stage on DirectRunner (pairs/s) | stage wall s | Beam overhead (raw / stage) |",
             "|---|---|---|---|---|"]
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            raw = bench_raw(n)
            wall, stage = bench_stage(n, pathlib.Path(tmp))
            walls.append(wall)
            lines.append(f"| {n:,} | {raw:,.0f} | {stage:,.0f} | {wall:.1f} | ×{raw / stage:.1f} |")
    lines += ["", f"Stage wall-time ratio {sizes[-1]:,} / {sizes[0]:,} records: {walls[-1] / walls[0]:.1f} "
              f"(linear would be {sizes[-1] / sizes[0]:.0f})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = ap.parse_args(argv)
    import os

    os.environ["MMCORPUS_PROGRESS"] = "0"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            raw = bench_raw(n)
            wall, stage = bench_stage(n, pathlib.Path(tmp))
            rows.append((n, raw, stage, wall))
            print(f"n={n:>7,}: raw filters {raw:>9,.0f} pairs/s | filter stage (DirectRunner) {stage:>7,.0f} pairs/s "
                  f"({wall:6.1f} s) | Beam overhead ×{raw / stage:.1f}", flush=True)
    if len(rows) >= 2:
        (n0, _, _, w0), (n1, _, _, w1) = rows[0], rows[-1]
        print(f"stage wall time ratio {n1:,}/{n0:,} records: {w1 / w0:.1f} (linear would be {n1 / n0:.0f})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:,.0f} MiB; python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
