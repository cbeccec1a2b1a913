"""Dedup speed: MinHash signatures/s against datasketch (same captions, same run), and the whole
dedup stage on the DirectRunner at two synthetic corpus sizes (wall ratio, peak memory, rounds),
with a projection to 200M pairs.

    .venv/bin/python -m bench.dedup_speed                       # signatures + stage at 100k and 1M
    .venv/bin/python -m bench.dedup_speed --sizes 20000,100000  # smaller stage runs
    .venv/bin/python -m bench.dedup_speed --skip-stage          # signatures only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from bench.dedup_data import real_captions, synthetic_captions, write_caption_stage
from transforms import minhash as mh
from transforms.dedup import DedupConfig

TARGET_PAIRS = 200_000_000


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_signatures(repeats: int = 3, shingles: str | None = None, captions: int = 20000) -> dict:
    """Captions/s of signature computation (shingling included) on the real sample captions."""
    from datasketch import MinHash

    cfg = DedupConfig()
    if shingles:
        kind, n = shingles.split(":")
        cfg = DedupConfig(shingle=kind, ngram=int(n))
    caps = real_captions()
    caps = (caps * (captions // len(caps) + 1))[:captions]
    n = len(caps)
    hasher = mh.MinHasher(cfg.num_perm, cfg.seed)

    def shingle_all():
        return [mh.shingles(mh.normalize_caption(c), cfg.shingle, cfg.ngram) for c in caps]

    sh = shingle_all()
    enc = [[s.encode("utf-8") for s in x] for x in sh]

    def ours_full():
        hasher.signatures(shingle_all())

    def ours_hash_only():
        hasher.signatures(sh)

    n_ub = min(5000, n)

    def ds_update_batch():
        for x in enc[:n_ub]:
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
            m.update_batch(x)

    def ds_bulk():
        MinHash.bulk(enc, num_perm=cfg.num_perm, seed=cfg.seed)

    def ds_bulk_crc():
        MinHash.bulk(enc, num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=mh.hash32)

    t_shingle = _best_of(shingle_all, repeats)
    rates = {
        "ours_incl_shingling": n / _best_of(ours_full, repeats),
        "ours_hashing_only": n / _best_of(ours_hash_only, repeats),
        "datasketch_update_batch_sha1": n_ub / _best_of(ds_update_batch, repeats),
        "datasketch_bulk_sha1": n / _best_of(ds_bulk, repeats),
        "datasketch_bulk_crc32": n / _best_of(ds_bulk_crc, repeats),
    }
    rates["shingling_only"] = n / t_shingle
    base_bulk = rates["datasketch_bulk_sha1"]
    base_ub = rates["datasketch_update_batch_sha1"]
    return {
        "captions": n,
        "num_perm": cfg.num_perm,
        "shingles": f"{cfg.shingle} {cfg.ngram}-grams",
        "captions_per_s": {k: round(v) for k, v in rates.items()},
        "ratio_ours_hashing_vs_bulk": round(rates["ours_hashing_only"] / base_bulk, 2),
        "ratio_ours_hashing_vs_update_batch": round(rates["ours_hashing_only"] / base_ub, 2),
        "ratio_ours_incl_shingling_vs_bulk": round(rates["ours_incl_shingling"] / base_bulk, 2),
    }


def run_stage_child(n: int, workdir: str, beam_args: list[str]) -> dict:
    """Generate ``n`` synthetic captions, write them as a stage output, run the dedup stage."""
    from pipelines import dedup
    from transforms.stage_io import read_manifest

    caps, groups = synthetic_captions(n, seed=n)
    inp = write_caption_stage(os.path.join(workdir, "in"), caps)
    out = os.path.join(workdir, "out")
    t = time.perf_counter()
    cpu0 = time.process_time()
    dedup.main(["--input", inp, "--output", out, "--force", "--num-shards", "16"] + beam_args)
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    m = read_manifest(out)
    planted = sum(1 for g in groups if g >= 0)
    n_groups = len({g for g in groups if g >= 0})
    return {
        "n": n,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_rss_mb_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "planted_records": planted,
        "planted_groups": n_groups,
        "kept": m.counts["outputs"],
        "by_reason": m.counts["by_reason"],
        "components": m.extra["dedup"]["components"],
        "lsh": [m.extra["dedup"]["lsh_bands"], m.extra["dedup"]["lsh_rows"]],
        "beam_args": beam_args,
    }


def bench_stage(n: int, beam_args: list[str], keep: bool = False) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"dedup-bench-{n}-")
    try:
        cmd = [sys.executable, "-m", "bench.dedup_speed", "--child", str(n), "--workdir", workdir, *beam_args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"stage run at n={n} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        # CPU seconds of the whole child (data generation included): robust to a loaded machine.
        result["cpu_s_child_total"] = round(
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1
        )
        return result
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


TITLE = "Dedup speed"

_SIG_ROWS = [("ours_incl_shingling", "ours: normalise + shingle + signatures"), ("ours_hashing_only", "ours: signatures only"),
             ("datasketch_bulk_sha1", "datasketch `MinHash.bulk` (sha1)"), ("datasketch_bulk_crc32", "datasketch `MinHash.bulk`, our crc32 hashfunc"),
             ("datasketch_update_batch_sha1", "datasketch `update_batch` (sha1)")]


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: signature rates against datasketch and the whole stage at two sizes."""
    captions, repeats, sizes = (2_000, 1, [2_000, 5_000]) if quick else (20_000, 3, [100_000, 1_000_000])
    sig = bench_signatures(repeats=repeats, captions=captions)
    rate = sig["captions_per_s"]
    lines = [f"Signatures: `python -m bench.dedup_speed --skip-stage` ({sig['captions']:,} real captions, {sig['shingles']}, "
             f"{sig['num_perm']} perms, one core, best of {repeats})", "", "| method | captions/s |", "|---|---|"]
    lines += [f"| {label} | {rate[k]:,} |" for k, label in _SIG_ROWS]
    lines += ["", f"Ratio ours (signatures only) / `bulk`: **{sig['ratio_ours_hashing_vs_bulk']}×**; / `update_batch`: "
              f"{sig['ratio_ours_hashing_vs_update_batch']}×. Signatures alone for 200M captions at this rate: "
              f"{TARGET_PAIRS / rate['ours_incl_shingling'] / 3600:.2f} core-hours.", "",
              f"Whole stage: `python -m bench.dedup_speed --skip-signatures --sizes {','.join(map(str, sizes))}` (synthetic "
              "caption-only corpora with 30% planted duplicate groups, in-memory DirectRunner, 16 shards; CPU and peak RSS "
              "of the stage's own child process)", "",
              "| n | wall s | CPU s (stage) | CPU s (child, incl. data generation) | peak RSS MiB | kept | duplicates by reason | CC rounds |",
              "|---|---|---|---|---|---|---|---|"]
    runs = [bench_stage(n, []) for n in sizes]
    for r in runs:
        dups = ", ".join(f"{k.split('/', 1)[1]} {v:,}" for k, v in sorted(r["by_reason"].items()) if not k.startswith("kept/"))
        comp = r["components"]
        rounds = f"{comp.get('rounds')}, {'converged' if comp.get('converged') else 'NOT converged'}"
        lines.append(f"| {r['n']:,} | {r['wall_s']} | {r['cpu_s']} | {r['cpu_s_child_total']} | {r['peak_rss_mb_self']:,} | "
                     f"{r['kept']:,} | {dups} | {rounds} |")
    small, big = runs[0], runs[-1]
    lines += ["", f"Ratio {big['n']:,} / {small['n']:,}: wall {big['wall_s'] / small['wall_s']:.2f}×, CPU "
              f"{big['cpu_s'] / small['cpu_s']:.2f}× (size ×{big['n'] / small['n']:.0f}). At the larger run's CPU rate, 200M pairs "
              f"are {big['cpu_s'] / big['n'] * TARGET_PAIRS / 3600:.0f} DirectRunner core-hours."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--skip-stage", action="store_true")
    parser.add_argument("--skip-signatures", action="store_true")
    parser.add_argument("--shingles", help="signature bench shingling as kind:n (default: DedupConfig's)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args, beam_args = parser.parse_known_args(argv)
    if args.child:
        print(json.dumps(run_stage_child(args.child, args.workdir, beam_args)))
        return 0
    results: dict = {}
    if not args.skip_signatures:
        results["signatures"] = bench_signatures(shingles=args.shingles)
        print(json.dumps(results["signatures"], indent=2), flush=True)
    if not args.skip_stage:
        sizes = [int(s) for s in args.sizes.split(",")]
        runs = []
        for n in sizes:
            r = bench_stage(n, beam_args)
            runs.append(r)
            print(json.dumps(r), flush=True)
        results["stage"] = runs
        if len(runs) >= 2:
            small, big = runs[0], runs[-1]
            ratio = big["wall_s"] / small["wall_s"]
            per_record_s = big["cpu_s"] / big["n"]
            results["scaling"] = {
                "sizes": [small["n"], big["n"]],
                "wall_ratio": round(ratio, 2),
                "cpu_ratio": round(big["cpu_s"] / small["cpu_s"], 2),
                "size_ratio": big["n"] / small["n"],
                "projected_core_hours_200M_at_directrunner_cpu_rate": round(per_record_s * TARGET_PAIRS / 3600, 1),
            }
            print(json.dumps(results["scaling"]), flush=True)
    if "signatures" in results:
        rate = results["signatures"]["captions_per_s"]["ours_incl_shingling"]
        results["projection_signatures_worker_hours_200M"] = round(TARGET_PAIRS / rate / 3600, 2)
        print(json.dumps({"signature_worker_hours_200M": results["projection_signatures_worker_hours_200M"]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
