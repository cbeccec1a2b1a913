"""`mmcorpus verify` at scale: peak RSS at 1M and 10M ledger rows (must not grow with the keys) and
checksum throughput against `sha256sum` over the same files, measured in one run.

    .venv/bin/python -m bench.verify_scale                      # 1M and 10M ledger rows
    .venv/bin/python -m bench.verify_scale --sizes 100000,400000 --quick

The stage outputs are synthesized directly with pyarrow (a filter-stage layout: sorted key shards of
data and ledger, the stage's Parquet settings, a valid manifest; one record in 200 carries 20 KB of
incompressible image bytes), so no Beam run is needed. Each
`verify` runs as its own process (`python -m pipelines.cli verify DIR --json`); its peak RSS comes from
`os.wait4`. Checksum throughput is bytes per CPU-second of one thread (the load-robust figure on a
shared machine) and per wall-second, for `sha256sum` (one process, one core) and for verify's
checksum pass at `--jobs 1` and `--jobs N`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import reasons
from schemas.manifest import DATA_DIR, FILE_KIND_DATA, FILE_KIND_LEDGER, LEDGER_DIR, MANIFEST_NAME, FileEntry, Manifest
from schemas.manifest import config_hash, shard_name
from schemas.records import LEDGER_SCHEMA, PAIR_SCHEMA
from transforms.stage_io import DATA_ROW_GROUP_ROWS, LEDGER_ROW_GROUP_ROWS, table_to_parquet_bytes

COMMAND = "python -m bench.verify_scale"
TITLE = "Verify at scale"
IMAGE_EVERY = 200  # one record in 200 carries 20 KB of incompressible "image" bytes: ~70 MB per 1M rows
# (status, reason, share in percent): a filter-stage mix
MIX = [("kept", reasons.OK, 70), ("rejected", reasons.CAPTION_TOO_SHORT_WORDS, 20), ("rejected", reasons.CAPTION_REPETITIVE, 10)]


def synthetic_keys(index: np.ndarray) -> pa.Array:
    """Distinct 13-digit keys for record numbers (an odd multiplier is a bijection mod 2**40)."""
    mixed = (index.astype(np.uint64) * np.uint64(0x9E3779B1)) % np.uint64(1 << 40)
    return pc.binary_join_element_wise("s", pc.utf8_lpad(pa.array(mixed).cast(pa.string()), 13, "0"), "")


def _status_index(index: np.ndarray) -> np.ndarray:
    """Index into MIX of every record: exactly the MIX shares per 100 consecutive records."""
    r = (index * 37) % 100  # 37 is coprime to 100: a fixed permutation of every block of 100
    edges = np.cumsum([share for _, _, share in MIX])
    return np.searchsorted(edges, r, side="right")


def synthesize_stage(output_dir: str, n: int, num_shards: int | None = None, caption_bytes: int = 60,
                     image_every: int = 0, image_bytes: int = 20_000) -> Manifest:
    """Write a finished filter-stage output of ``n`` ledger rows (70% kept) with pyarrow alone.

    Shards are sorted by key like the stage writer's; data rows carry a caption of about
    ``caption_bytes`` bytes, and every ``image_every``-th record (0: none) ``image_bytes`` of
    incompressible bytes in ``image``, so the files weigh what image data weighs. Memory: one shard.
    """
    num_shards = num_shards or max(4, n // 200_000)
    os.makedirs(os.path.join(output_dir, DATA_DIR), exist_ok=True)
    os.makedirs(os.path.join(output_dir, LEDGER_DIR), exist_ok=True)
    files: list[FileEntry] = []
    by_reason: dict[str, int] = {}
    kept_total = 0
    filler = "a synthetic caption of a photo " * (caption_bytes // 30 + 1)
    for s in range(num_shards):
        index = np.arange(s, n, num_shards, dtype=np.int64)
        keys = synthetic_keys(index)
        order = pc.sort_indices(keys)
        keys = keys.take(order)
        index = index[order.to_numpy()]
        status_i = _status_index(index)
        statuses = np.array([m[0] for m in MIX], dtype=object)[status_i]
        reason_list = np.array([m[1] for m in MIX], dtype=object)[status_i]
        rows = len(index)
        ledger = pa.table({
            "key": keys, "stage": pa.array(["filter"] * rows), "status": pa.array(statuses, pa.string()),
            "reason": pa.array(reason_list, pa.string()),
            "detail": pa.array([""] * rows), "source": pc.binary_join_element_wise("synthetic#", pa.array(index).cast(pa.string()), ""),
            **{f.name: pa.nulls(rows, f.type) for f in LEDGER_SCHEMA if f.name in ("cluster_id", "kept_key", "model", "prompt_version")},
        }).select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)
        kept_mask = status_i == 0
        kept_keys = keys.filter(pa.array(kept_mask))
        k = len(kept_keys)
        cols = {f.name: pa.nulls(k, f.type) for f in PAIR_SCHEMA}
        cols["key"] = kept_keys
        cols["url"] = pc.binary_join_element_wise("http://img.example/", kept_keys, ".jpg", "")
        cols["caption"] = pc.binary_join_element_wise(filler[:caption_bytes], kept_keys, " ")
        cols["source"] = ledger.column("source").filter(pa.array(kept_mask))
        cols["meta"] = pa.array(["{}"] * k)
        cols["quality_flags"] = pa.array([[]] * k, pa.list_(pa.string()))
        cols["needs_rewrite"] = pa.array(np.zeros(k, dtype=bool))
        if image_every:
            kept_index = index[kept_mask]
            rng = np.random.default_rng(s)
            cols["image"] = pa.array([rng.bytes(image_bytes) if i % image_every == 0 else None for i in kept_index.tolist()], pa.binary())
        data = pa.table(cols).select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)
        for idx, (status, reason, _) in enumerate(MIX):
            c = int((status_i == idx).sum())
            if c:
                by_reason[f"{status}/{reason}"] = by_reason.get(f"{status}/{reason}", 0) + c
        kept_total += k
        name = shard_name(s, num_shards)
        for kind, sub, table, rg in ((FILE_KIND_DATA, DATA_DIR, data, DATA_ROW_GROUP_ROWS),
                                     (FILE_KIND_LEDGER, LEDGER_DIR, ledger, LEDGER_ROW_GROUP_ROWS)):
            raw = table_to_parquet_bytes(table, rg)
            with open(os.path.join(output_dir, sub, name), "wb") as f:
                f.write(raw)
            files.append(FileEntry(f"{sub}/{name}", kind, table.num_rows, len(raw), hashlib.sha256(raw).hexdigest()))
    by_status: dict[str, int] = {}
    for k2, v in by_reason.items():
        by_status[k2.split("/")[0]] = by_status.get(k2.split("/")[0], 0) + v
    cfg = {"synthetic": True, "n": n, "num_shards": num_shards}
    m = Manifest(
        stage="filter", software_version="bench", config=cfg, config_hash=config_hash(cfg),
        input={"kind": "synthetic", "fingerprint": f"synthetic-{n}"},
        counts={"inputs": n, "ledger_rows": n, "outputs": kept_total, "by_status": by_status, "by_reason": by_reason},
        files=sorted(files, key=lambda e: e.path),
    )
    with open(os.path.join(output_dir, MANIFEST_NAME), "w") as f:
        f.write(m.to_json())
    return m


def refresh_manifest(output_dir: str, **counts) -> Manifest:
    """Re-record every listed file's size, rows and sha256 (after a test edited a shard on purpose),
    and overwrite the given ``counts`` entries."""
    import pyarrow.parquet as pq

    with open(os.path.join(output_dir, MANIFEST_NAME)) as f:
        m = Manifest.from_json(f.read())
    for e in m.files:
        raw = open(os.path.join(output_dir, e.path), "rb").read()
        e.bytes, e.sha256 = len(raw), hashlib.sha256(raw).hexdigest()
        e.rows = pq.read_metadata(os.path.join(output_dir, e.path)).num_rows
    m.counts.update(counts)
    with open(os.path.join(output_dir, MANIFEST_NAME), "w") as f:
        f.write(m.to_json())
    return m


# Runs a module like `python -m` and, at exit, writes the process's VmHWM (peak RSS of its own address
# space, which starts at exec) to $BENCH_HWM_FILE. ru_maxrss from wait4 is no use here: Linux carries
# the parent's RSS at fork/exec into the child's maxrss, and the bench process is big after synthesis.
_HWM_WRAPPER = """
import atexit, os, runpy, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["BENCH_HWM_FILE"], "w").write(line.split()[1])
atexit.register(_hwm)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run_measured(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall s, CPU s, peak RSS MiB, stdout) of one child process. CPU from its own rusage (os.wait4);
    peak RSS from its VmHWM when ``cmd`` is ``[python, -m, module, ...]`` (else 0)."""
    env = dict(os.environ)
    hwm_file = None
    if len(cmd) > 2 and cmd[0] == sys.executable and cmd[1] == "-m":
        fd, hwm_file = tempfile.mkstemp(prefix="bench-hwm-")
        os.close(fd)
        env["BENCH_HWM_FILE"] = hwm_file
        cmd = [sys.executable, "-c", _HWM_WRAPPER, *cmd[2:]]
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read().decode(errors="replace")  # drained while it runs: no pipe deadlock
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        proc.stderr.close()
        out.seek(0)
        text = out.read().decode()
    rss = 0
    if hwm_file:
        with open(hwm_file) as f:
            content = f.read().strip()
        os.unlink(hwm_file)
        rss = int(content) // 1024 if content else 0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, rss, text


def measure_verify(stage_dir: str, jobs: int, partition_keys: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "verify", stage_dir, "--json", "--jobs", str(jobs)]
    if partition_keys:
        cmd += ["--partition-keys", str(partition_keys)]
    wall, cpu, rss, out = _run_measured(cmd)
    report = json.loads(out)[stage_dir]
    if not report["ok"]:
        raise RuntimeError(f"verify failed on the synthetic output {stage_dir}: {report}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss}


_CHECKSUM_CHILD = """
import json, sys, time
from pipelines.verify import checksum_files
from schemas.manifest import Manifest
d, jobs = sys.argv[1], int(sys.argv[2])
m = Manifest.from_json(open(d + '/manifest.json').read())
t, c = time.perf_counter(), time.process_time()
bad = checksum_files(d, m.files, jobs)
print(json.dumps({'wall': time.perf_counter() - t, 'cpu': time.process_time() - c, 'bad': bad,
                  'bytes': sum(e.bytes for e in m.files)}))
"""


def measure_checksums(stage_dir: str, jobs_levels: list[int], repeats: int = 2) -> list[dict]:
    """sha256sum vs verify's checksum pass over the same files, interleaved, best of ``repeats``."""
    with open(os.path.join(stage_dir, MANIFEST_NAME)) as f:
        m = Manifest.from_json(f.read())
    paths = [os.path.join(stage_dir, e.path) for e in m.files]
    total = sum(e.bytes for e in m.files)
    for p in paths:  # warm the page cache so neither side pays for the disk
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass
    best: dict[str, dict] = {}
    for _ in range(repeats):
        wall, cpu, _, out = _run_measured(["sha256sum", *paths])
        assert len(out.splitlines()) == len(paths)
        _keep_best(best, "sha256sum", 1, wall, cpu)
        for jobs in jobs_levels:
            _, _, _, out = _run_measured([sys.executable, "-c", _CHECKSUM_CHILD, stage_dir, str(jobs)])
            r = json.loads(out)
            if r["bad"]:
                raise RuntimeError(f"checksums disagree: {r['bad'][:3]}")
            _keep_best(best, f"verify --jobs {jobs}", jobs, r["wall"], r["cpu"])
    rows = []
    for name, b in best.items():
        rows.append({"tool": name, "jobs": b["jobs"], "bytes": total, "wall_s": b["wall"], "cpu_s": b["cpu"],
                     "mb_per_cpu_s": total / 1e6 / max(b["cpu"], 1e-9), "mb_per_wall_s": total / 1e6 / b["wall"]})
    base = rows[0]
    for r in rows:
        r["per_core_vs_sha256sum"] = r["mb_per_cpu_s"] / base["mb_per_cpu_s"]
        r["wall_per_job_vs_sha256sum"] = r["mb_per_wall_s"] / r["jobs"] / base["mb_per_wall_s"]
    return rows


def _keep_best(best: dict, name: str, jobs: int, wall: float, cpu: float) -> None:
    if name not in best or wall < best[name]["wall"]:
        best[name] = {"jobs": jobs, "wall": wall, "cpu": cpu}


def run(sizes: list[int], jobs: int, workdir: str | None = None, partition_keys: int | None = None) -> dict:
    root = workdir or tempfile.mkdtemp(prefix="verify-scale-")
    try:
        rows = []
        for n in sizes:
            d = os.path.join(root, f"stage-{n}")
            t = time.perf_counter()
            m = synthesize_stage(d, n, image_every=IMAGE_EVERY)
            gen_s = time.perf_counter() - t
            r = measure_verify(d, jobs, partition_keys)
            r.update(n=n, files=len(m.files), bytes=sum(e.bytes for e in m.files), outputs=m.counts["outputs"], synth_s=gen_s)
            rows.append(r)
        checks = measure_checksums(os.path.join(root, f"stage-{sizes[-1]}"), sorted({1, jobs}))
        return {"verify": rows, "checksums": checks, "rss_ratio": rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"],
                "load_avg": os.getloadavg()[0]}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def section(quick: bool = False, argv: list[str] | None = None) -> str:
    """This bench's BENCHMARKS.md section (markdown), measured now."""
    args = _parser().parse_args(argv or [])
    sizes = [int(s) for s in ("50000,200000" if quick else args.sizes).split(",")]
    cmd = f"{COMMAND} --sizes {','.join(map(str, sizes))} --jobs {args.jobs}" + (" --quick" if quick else "")
    res = run(sizes, args.jobs, partition_keys=args.partition_keys)
    lines = [f"`{cmd}` (load average {res['load_avg']:.1f} on {os.cpu_count()} cores at the end of the run)", "",
             "| ledger rows | output rows | files | MB | verify wall s | verify CPU s | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in res["verify"]:
        lines.append(f"| {r['n']:,} | {r['outputs']:,} | {r['files']} | {r['bytes'] / 1e6:,.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:,} |")
    lines += ["", f"Peak RSS ratio {res['verify'][-1]['n']:,} / {res['verify'][0]['n']:,} rows: **{res['rss_ratio']:.2f}** (target ≤ 1.5).", "",
              f"Checksums over the same {res['checksums'][0]['bytes'] / 1e6:,.0f} MB (page cache warm, best of 2, interleaved):", "",
              "| tool | jobs | wall s | CPU s | MB per CPU-second | MB/s wall | per core vs sha256sum (CPU) | per job vs sha256sum (wall) |",
              "|---|---|---|---|---|---|---|---|"]
    for c in res["checksums"]:
        lines.append(f"| {c['tool']} | {c['jobs']} | {c['wall_s']:.2f} | {c['cpu_s']:.2f} | {c['mb_per_cpu_s']:,.0f} | {c['mb_per_wall_s']:,.0f} "
                     f"| {c['per_core_vs_sha256sum']:.2f} | {c['wall_per_job_vs_sha256sum']:.2f} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000", help="ledger rows, comma-separated")
    ap.add_argument("--jobs", type=int, default=2, help="verify --jobs for the parallel checksum row")
    ap.add_argument("--partition-keys", type=int, help="verify --partition-keys (default: verify's)")
    ap.add_argument("--quick", action="store_true", help="50k and 200k rows (a smoke test)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    print(section(args.quick, argv), end="")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"\n(bench process itself: peak RSS {peak:,} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
