"""Dedup cost per record against datatrove 0.10.1's MinHash pipeline, same synthetic captions, two sizes, one run.

    .venv/bin/python -m bench.run_all --only dedup_vs_datatrove      # 50k and 200k captions (make bench-env first)
    .venv/bin/python -m bench.dedup_vs_datatrove --sizes 5000,20000  # the same table, other sizes

Ours also runs with ``[dedup] mode = "legacy-transitive"``: datatrove removes every member of a connected
component but one (union-find), our default strict mode only those within the threshold of the kept record,
so that row compares the two at (nearly) equal planted recall (docs/scale.md).

Both tools get the same captions (``bench.dedup_data.synthetic_captions``, 30% in planted near-duplicate
groups): ours as a finished stage output, datatrove as JSON lines split over 2 files. Ours: ``mmcorpus dedup``
with its defaults (in-memory DirectRunner). datatrove: signatures (2 tasks, 2 workers) → buckets (its 14
buckets, 2 workers) → cluster → filter (2 tasks, 2 workers, kept and removed documents written as JSON lines),
once with character 5-grams (``CharShingleSignature`` below, the shingling our stage uses) and once with its
stock English word 5-grams (spaCy tokenizer). datatrove runs in the benchmark-only venv ``.venv-bench``
(``make bench-env``; ``$MMCORPUS_BENCH_PYTHON`` overrides it): it is never a dependency of mmcorpus.

Measured per run, by this process: CPU seconds of the whole process tree (``wait4`` rusage: every worker is
a waited-for descendant), wall seconds, and memory sampled every 0.1 s from /proc: the largest single process's
peak (VmHWM) and the largest sum of RSS over the tree at one moment. Planted recall = removed records of
planted groups / (planted records − planted groups), i.e. of the records a perfect tool removes; precision =
removed records that belong to a planted group / removed records.

This module's top level imports only the standard library: the datatrove child runs it from ``.venv-bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = "Dedup cost per record against datatrove"
SIZES = (50_000, 200_000)
QUICK_SIZES = (2_000, 8_000)
DT_WORKERS = 2
OURS_TRANSITIVE = "mmcorpus dedup, legacy-transitive"


def bench_python() -> str:
    path = os.environ.get("MMCORPUS_BENCH_PYTHON") or os.path.join(REPO, ".venv-bench", "bin", "python")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} not found: run `make bench-env` (datatrove lives in its own benchmark venv)")
    return path


# --- measurement -------------------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``cmd``; CPU seconds of the whole tree (wait4), wall, per-process peak and peak tree sum of RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm: dict[int, int] = {}
    tree_peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total = 0
            for pid in _tree(proc.pid):
                rss = _status_kb(pid, "VmRSS")
                total += rss
                hwm[pid] = max(hwm.get(pid, 0), _status_kb(pid, "VmHWM"), rss)
            tree_peak[0] = max(tree_peak[0], total)
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    # communicate() waited already; the rusage of the finished child tree is in RUSAGE_CHILDREN deltas.
    return {"returncode": proc.returncode, "stdout": out, "stderr": err, "wall_s": wall,
            "max_process_rss_mb": max(hwm.values(), default=0) / 1024, "tree_rss_mb": tree_peak[0] / 1024,
            "processes": len(hwm)}


def measure_cpu(cmd: list[str], **kw) -> dict:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = measure(cmd, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res['returncode']}):\n{res['stderr'][-3000:]}")
    return res


def quality(removed: set[str], keys: list[str], groups: list[int]) -> dict:
    planted = [k for k, g in zip(keys, groups) if g >= 0]
    n_groups = len({g for g in groups if g >= 0})
    planted_set = set(planted)
    hit = len(removed & planted_set)
    return {"removed": len(removed), "recall": hit / max(1, len(planted) - n_groups),
            "precision": hit / max(1, len(removed))}


# --- the two tools -----------------------------------------------------------------------------


def prepare(workdir: str, n: int) -> tuple[str, str, list[str], list[int]]:
    """Synthetic captions as our stage input and as datatrove JSON lines (same keys)."""
    from bench.dedup_data import synthetic_captions, write_caption_stage
    import hashlib

    caps, groups = synthetic_captions(n, seed=n)
    ours_in = write_caption_stage(os.path.join(workdir, "ours-in"), caps)
    keys = [hashlib.sha1(f"synthetic-{i}".encode()).hexdigest()[:16] for i in range(n)]  # write_caption_stage's keys
    dt_in = os.path.join(workdir, "dt-in")
    os.makedirs(dt_in)
    for part in range(DT_WORKERS):
        with open(os.path.join(dt_in, f"part-{part}.jsonl"), "w", encoding="utf-8") as f:
            for i in range(part, n, DT_WORKERS):
                f.write(json.dumps({"id": keys[i], "text": caps[i]}) + "\n")
    return ours_in, dt_in, keys, groups


def run_ours(ours_in: str, out: str, mode: str | None = None) -> tuple[dict, set[str]]:
    """Our stage with its defaults, or with ``[dedup] mode = MODE`` from a config file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), MMCORPUS_PROGRESS="0")
    cmd = [sys.executable, "-m", "pipelines.cli", "dedup", "--input", ours_in, "--output", out]
    if mode is not None:
        cfg = out + ".toml"
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(f'[dedup]\nmode = "{mode}"\n')
        cmd += ["--config", cfg]
    res = measure_cpu(cmd, env=env, cwd=REPO)
    ledger = pq.read_table(os.path.join(out, "ledger"), columns=["key", "status"])
    removed = set(ledger.filter(pc.equal(ledger["status"], "duplicate"))["key"].to_pylist())
    return res, removed


def run_datatrove(dt_in: str, work: str, shingle: str) -> tuple[dict, set[str]]:
    cmd = [bench_python(), "-m", "bench.dedup_vs_datatrove", "--datatrove-child", "--input", dt_in, "--work", work,
           "--shingle", shingle]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = REPO
    res = measure_cpu(cmd, env=env, cwd=REPO)
    removed: set[str] = set()
    rdir = os.path.join(work, "removed")
    for name in sorted(os.listdir(rdir)):
        with open(os.path.join(rdir, name), encoding="utf-8") as f:
            removed.update(json.loads(line)["id"] for line in f)
    return res, removed


def datatrove_child(input_dir: str, work: str, shingle: str) -> None:
    """Runs inside .venv-bench: datatrove's four MinHash steps on ``input_dir``'s JSON lines."""
    import numpy as np
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import simplify_text

    class CharShingleSignature(MinhashDedupSignature):
        """datatrove's signature step with character n-grams of its simplified text (no word tokenizer)."""

        def get_shingles(self, text: str) -> np.ndarray:
            t = simplify_text(text, self.config.norm_config)
            n = self.config.n_grams
            grams = [t[i: i + n] for i in range(max(1, len(t) - n + 1))]
            return np.fromiter((self._hash_func(g) for g in grams), dtype=np.uint64).reshape((-1, 1))

    cfg = MinhashConfig(n_grams=5)
    sig_cls = CharShingleSignature if shingle == "char" else MinhashDedupSignature
    logs = os.path.join(work, "logs")
    files = len([f for f in os.listdir(input_dir) if f.endswith(".jsonl")])

    def run(pipeline, tasks, workers, name):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=os.path.join(logs, name),
                              start_method="fork", skip_completed=False).run()

    reader = lambda: JsonlReader(input_dir, glob_pattern="*.jsonl", compression=None)  # noqa: E731
    run([reader(), sig_cls(output_folder=os.path.join(work, "sigs"), config=cfg)], files, DT_WORKERS, "sigs")
    run([MinhashDedupBuckets(input_folder=os.path.join(work, "sigs"), output_folder=os.path.join(work, "buckets"), config=cfg)],
        cfg.num_buckets, DT_WORKERS, "buckets")
    run([MinhashDedupCluster(input_folder=os.path.join(work, "buckets"), output_folder=os.path.join(work, "remove_ids"),
                             config=cfg)], 1, 1, "cluster")
    run([reader(),
         MinhashDedupFilter(input_folder=os.path.join(work, "remove_ids"),
                            exclusion_writer=JsonlWriter(os.path.join(work, "removed"), compression=None)),
         JsonlWriter(os.path.join(work, "kept"), compression=None)], files, DT_WORKERS, "filter")


# --- the table ---------------------------------------------------------------------------------


def measure_sizes(sizes: tuple[int, ...]) -> list[dict]:
    rows = []
    for n in sizes:
        workdir = tempfile.mkdtemp(prefix=f"dedup-vs-datatrove-{n}-")
        try:
            ours_in, dt_in, keys, groups = prepare(workdir, n)
            for tool, fn in (("mmcorpus dedup (char 5-grams)", lambda: run_ours(ours_in, os.path.join(workdir, "ours-out"))),
                             (OURS_TRANSITIVE, lambda: run_ours(ours_in, os.path.join(workdir, "ours-transitive"),
                                                                "legacy-transitive")),
                             ("datatrove, char 5-grams", lambda: run_datatrove(dt_in, os.path.join(workdir, "dt-char"), "char")),
                             ("datatrove, word 5-grams (stock)", lambda: run_datatrove(dt_in, os.path.join(workdir, "dt-word"), "word"))):
                print(f"dedup_vs_datatrove: {tool}, n={n:,} ...", file=sys.stderr, flush=True)
                res, removed = fn()
                q = quality(removed, keys, groups)
                rows.append({"tool": tool, "n": n, "cpu_s": res["cpu_s"], "wall_s": res["wall_s"],
                             "max_process_rss_mb": res["max_process_rss_mb"], "tree_rss_mb": res["tree_rss_mb"],
                             "processes": res["processes"], **q})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def table(rows: list[dict], sizes: tuple[int, ...]) -> str:
    lines = ["| tool | captions | CPU s (process tree) | CPU ms / record | wall s | largest process peak RSS MiB | "
             "tree RSS MiB (sum, peak) | removed | planted recall | precision |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['n']:,} | {r['cpu_s']:.1f} | {1000 * r['cpu_s'] / r['n']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['max_process_rss_mb']:,.0f} | {r['tree_rss_mb']:,.0f} | {r['removed']:,} | {r['recall']:.3f} | "
                     f"{r['precision']:.3f} |")
    small, big = min(sizes), max(sizes)
    by = {(r["tool"], r["n"]): r for r in rows}
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    ours = tools[0]
    lines += ["", f"Ratios from this run ({big:,} captions; growth = {big:,} / {small:,}, ×{big / small:.0f} the captions):", "",
              "| tool | CPU per record / datatrove char 5-grams | CPU growth | largest-process RSS growth | tree RSS growth |",
              "|---|---|---|---|---|"]
    ref_tool = next(t for t in tools if t.startswith("datatrove, char"))
    ref = by[(ref_tool, big)]
    for t in tools:
        a, b = by[(t, small)], by[(t, big)]
        lines.append(f"| {t} | {b['cpu_s'] / ref['cpu_s']:.2f}× | {b['cpu_s'] / a['cpu_s']:.2f}× | "
                     f"{b['max_process_rss_mb'] / a['max_process_rss_mb']:.2f}× | {b['tree_rss_mb'] / a['tree_rss_mb']:.2f}× |")
    o = by[(ours, big)]
    lines += ["", f"At {big:,} captions our stage spends {o['cpu_s'] / ref['cpu_s']:.2f}× datatrove's (char 5-grams) CPU per "
              f"record at planted recall {o['recall']:.3f} vs {ref['recall']:.3f}."]
    if (OURS_TRANSITIVE, big) in by:
        t = by[(OURS_TRANSITIVE, big)]
        lines[-1] += (f" With `mode = \"legacy-transitive\"` (whole connected components, as datatrove's union-find) it "
                      f"spends {t['cpu_s'] / ref['cpu_s']:.2f}× at recall {t['recall']:.3f}.")
    return "\n".join(lines) + "\n"


def section(quick: bool = False) -> str:
    sizes = QUICK_SIZES if quick else SIZES
    head = (f"`python -m bench.dedup_vs_datatrove --sizes {','.join(map(str, sizes))}` — synthetic captions "
            "(`bench.dedup_data`, 30% in planted groups), our stage with its defaults (in-memory DirectRunner) vs "
            f"datatrove 0.10.1 MinHash (14 buckets × 8 hashes, 5-grams; signatures, buckets, cluster, filter; "
            f"{DT_WORKERS} workers) from `.venv-bench`. CPU = the whole process tree. The machine is shared with other "
            "sessions: absolute seconds are noisy, ratios come from this one run.\n\n")
    return head + table(measure_sizes(sizes), sizes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--datatrove-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--shingle", choices=("char", "word"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.datatrove_child:
        datatrove_child(args.input, args.work, args.shingle)
        return 0
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(section_for(sizes))
    return 0


def section_for(sizes: tuple[int, ...]) -> str:
    return f"`python -m bench.dedup_vs_datatrove --sizes {','.join(map(str, sizes))}`\n\n" + table(measure_sizes(sizes), sizes)


if __name__ == "__main__":
    raise SystemExit(main())
