"""What the filter stage's input fingerprint costs: ``stat`` vs ``content`` mode on a large input.

    .venv/bin/python -m bench.input_fingerprint --gib 10 --dir /tmp/fp-bench   # writes, measures, deletes

Writes ``--files`` shards of random bytes (``--gib`` GiB in all) plus one small Parquet file, then times
``transforms.ingest.fingerprint`` in both modes, once with the files evicted from the page cache
(``posix_fadvise DONTNEED``, per file: no privileges needed, nothing else evicted) and once warm.
The directory is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq

from transforms.ingest import InputSpec, ResolvedInput, fingerprint

BLOCK = 64 << 20


def write_input(root: pathlib.Path, gib: float, files: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    per_file = int(gib * (1 << 30)) // files
    block = bytearray(os.urandom(BLOCK))
    paths = []
    for i in range(files):
        p = root / f"{i:05d}.tar"
        with open(p, "wb") as f:
            left = per_file
            n = 0
            while left > 0:
                block[:8] = (i * 1_000_003 + n).to_bytes(8, "little")  # every block differs
                f.write(block[: min(left, BLOCK)])
                left -= BLOCK
                n += 1
        paths.append(str(p))
    pq.write_table(pa.table({"caption": ["a"] * 1000, "url": ["u"] * 1000}), root / "meta.parquet")
    paths.append(str(root / "meta.parquet"))
    return sorted(paths)


def evict(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(gib: float, files: int, directory: str) -> dict:
    """Write the input, time both fingerprint modes cold and warm, delete the input."""
    root = pathlib.Path(directory)
    t0 = time.perf_counter()
    try:
        paths = write_input(root, gib, files)
        write_s = time.perf_counter() - t0
        resolved = ResolvedInput(InputSpec(str(root)), "webdataset", str(root), tuple(paths))
        total = sum(os.path.getsize(p) for p in paths)
        result = {"bytes": total, "files": len(paths), "write_s": round(write_s, 2)}
        for mode in ("stat", "content"):
            for cache in ("cold", "warm"):
                if cache == "cold":
                    evict(paths)
                t = time.perf_counter()
                fingerprint(resolved, mode)
                dt = time.perf_counter() - t
                result[f"{mode}_{cache}_s"] = round(dt, 3)
                result[f"{mode}_{cache}_MBps"] = round(total / dt / 1e6, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


TITLE = "Input fingerprint"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (bench.run_all), measured now; quick: 0.05 GiB in 2 files."""
    gib, files = (0.05, 2) if quick else (10.0, 10)
    r = measure(gib, files, "/tmp/mmcorpus-fingerprint-bench")
    lines = [f"`python -m bench.input_fingerprint --gib {gib:g} --files {files}` ({r['files']} files, {r['bytes'] / 2**30:.2f} GiB; "
             "cold = evicted from the page cache with posix_fadvise)", "",
             "| mode | page cache | seconds | MB/s |", "|---|---|---|---|"]
    for mode in ("stat", "content"):
        for cache in ("cold", "warm"):
            lines.append(f"| {mode} | {cache} | {r[f'{mode}_{cache}_s']} | {r[f'{mode}_{cache}_MBps']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=10.0)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/mmcorpus-fingerprint-bench")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.gib, args.files, args.dir), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
