"""Report cost against corpus size: `mmcorpus report` on synthetic runs of 100k and 1M records
(filter → dedup → rewrite → pack stage outputs written with pyarrow + manifests, the same layout
the stages write, images ~93% of the data bytes). The report reads samples, not the corpus, so its
time should barely grow: the target is report(1M) / report(100k) <= 1.5.

    .venv/bin/python -m bench.report_scale                          # 100k and 1M (needs ~9 GB of disk)
    .venv/bin/python -m bench.report_scale --sizes 20000,200000     # quicker
    .venv/bin/python -m bench.report_scale --keep DIR               # keep the synthetic runs in DIR

``bench_section()`` returns the BENCHMARKS.md section (markdown) and the command that produced it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from schemas.manifest import FILE_KIND_DATA, FILE_KIND_LEDGER, MANIFEST_NAME, FileEntry, Manifest, config_hash, shard_name
from schemas.records import LEDGER_SCHEMA, PAIR_SCHEMA
from transforms.stage_io import DATA_ROW_GROUP_ROWS, LEDGER_ROW_GROUP_ROWS, shard_of, table_to_parquet_bytes

COMMAND = ".venv/bin/python -m bench.report_scale --sizes 100000,1000000"
NUM_SHARDS = 8
POOL = 1024  # distinct JPEGs: more bytes than zstd's window, so repeats do not compress away
WORDS = ("red", "old", "small", "bright", "wooden", "busy", "quiet", "dog", "car", "street", "beach", "house", "tree",
         "market", "bridge", "river", "table", "child", "window", "garden", "sunset", "train", "mountain", "city")
FILTER_REASONS = (("rejected", "caption_too_short_words", 0.03), ("rejected", "caption_boilerplate", 0.02),
                  ("rejected", "image_too_small", 0.015), ("rejected", "caption_repetitive", 0.005),
                  ("error", "download_failed", 0.01), ("rejected", "image_too_many_pixels", 3e-6))
DEDUP_RATE = 0.05
DEDUP_REASONS = ("exact-caption", "near-caption", "near-image", "exact-image")
REWRITE_FAIL = (("error", "rewrite_invalid_json", 0.01), ("rejected", "rewrite_unfaithful", 0.008))
REWRITE_SHARE = 0.6  # rewritten (kept/ok); the rest kept/rewrite_skipped


def image_pool(seed: int = 0) -> list[bytes]:
    """``POOL`` small noisy JPEGs of 40–80 px (about 2 KB each, like heavily resized web images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(POOL):
        w, h = (int(x) for x in rng.integers(40, 81, size=2))
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
        px = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px, "RGB").save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def _binary(pool_np: list[np.ndarray], idx: np.ndarray) -> pa.Array:
    lens = np.array([len(pool_np[i]) for i in idx], dtype=np.int64)
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    data = np.concatenate([pool_np[i] for i in idx]) if len(idx) else np.zeros(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(idx), [None, pa.py_buffer(offsets), pa.py_buffer(data)]).cast(pa.binary())


def _caption(i: int) -> str:
    h = hashlib.sha1(str(i).encode()).digest()
    return f"a {WORDS[h[0] % 6]} {WORDS[6 + h[1] % 18]} near the {WORDS[6 + h[2] % 18]} in the {WORDS[h[3] % 6]} {WORDS[6 + h[4] % 18]} #{i}"


class RunWriter:
    """Writes one stage output directory (data + ledger shards + manifest) from column arrays."""

    def __init__(self, root: str, pool: list[bytes]):
        self.root = root
        self.pool_np = [np.frombuffer(b, dtype=np.uint8) for b in pool]
        self.pool = pool

    def _write(self, stage_dir: str, rel: str, data: bytes, kind: str, rows: int) -> FileEntry:
        path = os.path.join(stage_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return FileEntry(path=rel, kind=kind, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def stage(self, name: str, stage: str, prev: str | None, keys: np.ndarray, ids: np.ndarray, status: np.ndarray,
              reason: np.ndarray, detail: np.ndarray, extra_ledger: dict[str, np.ndarray], data_cols, write_data: bool = True,
              other_files=(), config_extra: dict | None = None) -> str:
        """``keys``/``ids`` of every input record with its status/reason/detail; ``data_cols(ids)`` gives the
        extra data columns of the kept ones."""
        stage_dir = os.path.join(self.root, name)
        files: list[FileEntry] = list(other_files)
        shard = np.array([shard_of(k, NUM_SHARDS) for k in keys]) if len(keys) else np.zeros(0, int)
        for s in range(NUM_SHARDS):
            sel = np.nonzero(shard == s)[0]
            sel = sel[np.argsort(keys[sel], kind="stable")]
            cols = {"key": keys[sel], "stage": np.full(len(sel), stage, dtype=object), "status": status[sel], "reason": reason[sel],
                    "detail": detail[sel], "source": np.array([f"input.parquet#{i:08d}" for i in ids[sel]], dtype=object)}
            for c in ("cluster_id", "kept_key", "model", "prompt_version"):
                cols[c] = extra_ledger[c][sel] if c in extra_ledger else np.full(len(sel), None, dtype=object)
            ledger = pa.table({c: pa.array(cols[c].tolist(), f.type) for c, f in zip(LEDGER_SCHEMA.names, LEDGER_SCHEMA)},
                              schema=LEDGER_SCHEMA)
            files.append(self._write(stage_dir, f"ledger/{shard_name(s, NUM_SHARDS)}",
                                     table_to_parquet_bytes(ledger, LEDGER_ROW_GROUP_ROWS), FILE_KIND_LEDGER, len(sel)))
            kept = sel[status[sel] == "kept"]
            if write_data and len(kept):
                table = self._data_table(keys[kept], ids[kept], data_cols)
                files.append(self._write(stage_dir, f"data/{shard_name(s, NUM_SHARDS)}",
                                         table_to_parquet_bytes(table, DATA_ROW_GROUP_ROWS), FILE_KIND_DATA, len(kept)))
        by_reason = Counter(f"{a}/{b}" for a, b in zip(status.tolist(), reason.tolist()))
        by_status = Counter(k.split("/", 1)[0] for k in by_reason.elements())
        counts = {"inputs": len(keys), "ledger_rows": len(keys), "outputs": by_status.get("kept", 0),
                  "by_status": {s: by_status.get(s, 0) for s in ("kept", "rejected", "duplicate", "error")},
                  "by_reason": dict(sorted(by_reason.items()))}
        config = {"num_shards": NUM_SHARDS, **(config_extra or {})}
        if prev:
            raw = open(os.path.join(self.root, prev, MANIFEST_NAME), "rb").read()
            inp = {"kind": "stage", "stage": json.loads(raw)["stage"], "fingerprint": hashlib.sha256(raw).hexdigest(),
                   "records": len(keys)}
        else:
            inp = {"kind": "table", "fingerprint": "synthetic", "files": []}
        m = Manifest(stage=stage, software_version="bench", config=config, config_hash=config_hash(config), input=inp,
                     counts=counts, files=sorted(files, key=lambda f: f.path))
        with open(os.path.join(stage_dir, MANIFEST_NAME), "w") as f:
            f.write(m.to_json())
        return stage_dir

    def _data_table(self, keys: np.ndarray, ids: np.ndarray, data_cols) -> pa.Table:
        n = len(keys)
        idx = ids % POOL
        caps = [_caption(int(i)) for i in ids]
        cols = {
            "key": pa.array(keys.tolist(), pa.string()), "url": pa.array([f"http://example.invalid/{i}.jpg" for i in ids], pa.string()),
            "caption": pa.array(caps, pa.string()), "image": _binary(self.pool_np, idx),
            "image_format": pa.array(["JPEG"] * n, pa.string()), "width": pa.array(np.full(n, 64, np.int32)),
            "height": pa.array(np.full(n, 64, np.int32)), "image_sha256": pa.array([None] * n, pa.string()),
            "source": pa.array([f"input.parquet#{i:08d}" for i in ids], pa.string()), "meta": pa.array(["{}"] * n, pa.string()),
            "quality_flags": pa.array([[]] * n, pa.list_(pa.string())), "needs_rewrite": pa.array([False] * n),
        }
        cols.update(data_cols(ids, caps))
        arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in PAIR_SCHEMA]
        return pa.Table.from_arrays([a.cast(f.type) for a, f in zip(arrays, PAIR_SCHEMA)], schema=PAIR_SCHEMA)


def synthesize_run(root: str, n: int, seed: int = 0) -> dict[str, str]:
    """A run directory with filter, dedup, rewrite and pack outputs for ``n`` input records."""
    rng = np.random.default_rng(seed)
    w = RunWriter(root, image_pool(seed))
    ids = np.arange(n, dtype=np.int64)
    keys = np.array([hashlib.sha1(f"k{i}".encode()).hexdigest()[:16] for i in ids], dtype=object)
    none = lambda k: np.full(k, None, dtype=object)  # noqa: E731

    # filter
    status, reason, detail = np.full(n, "kept", dtype=object), np.full(n, "ok", dtype=object), np.full(n, "", dtype=object)
    u = rng.random(n)
    lo = 0.0
    for st, rs, p in FILTER_REASONS:
        sel = (u >= lo) & (u < lo + p)
        if rs == "image_too_many_pixels":
            sel = np.zeros(n, bool)
            sel[rng.choice(n, 3, replace=False)] = True
        status[sel], reason[sel], detail[sel] = st, rs, f"synthetic {rs}"
        lo += p
    out = {"filter": w.stage("filter", "filter", None, keys, ids, status, reason, detail, {}, lambda i, c: {})}
    keep = status == "kept"
    keys, ids = keys[keep], ids[keep]

    # dedup: ~5% duplicates in clusters with a heavy tail (a few hundred-record clusters)
    m = len(keys)
    n_dup = int(m * DEDUP_RATE)
    dup_pos = rng.choice(m, n_dup, replace=False)
    rest = np.setdiff1d(np.arange(m), dup_pos)
    n_clusters = max(1, n_dup // 3)
    reps = rng.choice(rest, n_clusters, replace=False)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 1.1
    cl = rng.choice(n_clusters, n_dup, p=weights / weights.sum())
    status, reason, detail = np.full(m, "kept", dtype=object), np.full(m, "ok", dtype=object), np.full(m, "", dtype=object)
    cluster_id, kept_key = none(m), none(m)
    sizes = np.bincount(cl, minlength=n_clusters) + 1
    cids = np.array([f"dc{hashlib.sha1(f'c{c}'.encode()).hexdigest()[:16]}" for c in range(n_clusters)], dtype=object)
    rs = rng.integers(0, len(DEDUP_REASONS), n_dup)
    for j, (pos, c) in enumerate(zip(dup_pos, cl)):
        status[pos], reason[pos] = "duplicate", DEDUP_REASONS[rs[j]]
        cluster_id[pos], kept_key[pos] = cids[c], keys[reps[c]]
        detail[pos] = f"cluster of {sizes[c]}, kept {keys[reps[c]]}; linked by {DEDUP_REASONS[rs[j]]}"
    rep_of = {int(ids[reps[c]]): (cids[c], int(sizes[c])) for c in range(n_clusters) if sizes[c] > 1}

    def dedup_cols(i, caps):
        return {"cluster_id": pa.array([rep_of.get(int(x), (None, None))[0] for x in i], pa.string()),
                "cluster_size": pa.array([rep_of.get(int(x), (None, None))[1] for x in i], pa.int64())}

    out["dedup"] = w.stage("dedup", "dedup", "filter", keys, ids, status, reason, detail,
                           {"cluster_id": cluster_id, "kept_key": kept_key}, dedup_cols)
    keep = status == "kept"
    keys, ids = keys[keep], ids[keep]

    # rewrite
    m = len(keys)
    status, reason, detail = np.full(m, "kept", dtype=object), np.full(m, "ok", dtype=object), np.full(m, "", dtype=object)
    u = rng.random(m)
    skipped = u >= REWRITE_SHARE
    reason[skipped] = "rewrite_skipped"
    lo = 0.0
    for st, rs_, p in REWRITE_FAIL:
        sel = (u >= lo) & (u < lo + p)
        status[sel], reason[sel], detail[sel] = st, rs_, f"synthetic {rs_}"
        lo += p
    rewritten = {int(x) for x in ids[(status == "kept") & ~skipped]}

    def rewrite_cols(i, caps):
        rw = [int(x) in rewritten for x in i]
        return {"raw_caption": pa.array([c if r else None for c, r in zip(caps, rw)], pa.string()),
                "caption": pa.array([c.capitalize() + "." if r else c for c, r in zip(caps, rw)], pa.string()),
                "qa": pa.array([[{"question": "What does the image show?", "answer": c.capitalize() + "."}] if r else None
                                for c, r in zip(caps, rw)], PAIR_SCHEMA.field("qa").type),
                "rewrite_model": pa.array(["bench-model" if r else None for r in rw], pa.string()),
                "prompt_version": pa.array(["qa-v1" if r else None for r in rw], pa.string())}

    model = np.full(m, "bench-model", dtype=object)
    pv = np.full(m, "qa-v1", dtype=object)
    out["rewrite"] = w.stage("rewrite", "rewrite", "dedup", keys, ids, status, reason, detail,
                             {"model": model, "prompt_version": pv}, rewrite_cols,
                             config_extra={"rewrite": {"model": "bench-model", "prompt_version": "qa-v1", "backend": "openai"}})
    keep = status == "kept"
    keys, ids = keys[keep], ids[keep]

    # pack: 7 samples per pack, shards of 4096 packs, row groups of 64 packs
    order = np.argsort(keys, kind="stable")
    keys, ids = keys[order], ids[order]
    pack_files, per_pack, seq_len = [], 7, 2048
    n_packs = (len(keys) + per_pack - 1) // per_pack
    pack_dir = os.path.join(root, "pack")
    import pyarrow.parquet as pq

    for shard_i, start in enumerate(range(0, n_packs, 4096)):
        rows = []
        for p in range(start, min(n_packs, start + 4096)):
            ks, iz = keys[p * per_pack:(p + 1) * per_pack], ids[p * per_pack:(p + 1) * per_pack]
            lens = [98 + 12 + int(x % 200) for x in iz]
            cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            used = int(cu[-1])
            rows.append({"pack_id": f"p{shard_i:05d}-{p:07d}", "seq_len": seq_len, "num_tokens": used, "num_samples": len(ks),
                         "cu_seqlens": cu.tolist(), "sample_keys": ks.tolist(), "truncated_tokens": 0,
                         "images": [w.pool[int(x) % POOL] for x in iz], "image_sample": list(range(len(ks))),
                         "image_offset": cu[:-1].tolist(), "image_length": [98] * len(ks),
                         "image_width": [64] * len(ks), "image_height": [64] * len(ks),
                         "image_grid_cols": [0] * len(ks), "image_grid_rows": [0] * len(ks)})
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=64, compression="zstd", use_dictionary=False)
        rel = f"data/packs-{shard_i:05d}.parquet"
        pack_files.append(w._write(pack_dir, rel, buf.getvalue(), "pack", len(rows)))
    m = len(keys)
    out["pack"] = w.stage("pack", "pack", "rewrite", keys, ids, np.full(m, "kept", dtype=object), np.full(m, "ok", dtype=object),
                          np.full(m, "", dtype=object), {}, lambda i, c: {}, write_data=False, other_files=pack_files,
                          config_extra={"packing": {"seq_len": seq_len}})
    return out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def time_report(run: str, out: str, repeats: int = 2, samples: int = 6) -> dict:
    """Best wall time of ``mmcorpus report`` in a fresh process (imports included), and its peak RSS."""
    best, rss, cpu = float("inf"), 0, float("inf")
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", (
            "import resource, sys; from pipelines import report; "
            f"report.main([{run!r}, '--output', {out!r}, '--samples', '{samples}']); "
            "u = resource.getrusage(resource.RUSAGE_SELF); "
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) parent
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            "print('RSS', hwm, u.ru_utime + u.ru_stime, file=sys.stderr)")],
            capture_output=True, text=True, check=True)
        best = min(best, time.perf_counter() - t)
        line = next(ln.split() for ln in r.stderr.splitlines() if ln.startswith("RSS "))
        rss, cpu = max(rss, int(line[1])), min(cpu, float(line[2]))
    return {"seconds": best, "cpu_seconds": cpu, "peak_rss_mb": rss / 1024,
            "report_files": sum(len(fs) for _, _, fs in os.walk(out))}


def run(sizes: list[int], keep: str | None = None, repeats: int = 2) -> list[dict]:
    results = []
    base = keep or tempfile.mkdtemp(prefix="mmcorpus-report-bench-")
    try:
        for n in sizes:
            root = os.path.join(base, f"run-{n}")
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            synthesize_run(root, n)
            synth = time.perf_counter() - t
            res = {"records": n, "run_bytes": _dir_bytes(root), "synth_seconds": synth,
                   **time_report(root, os.path.join(base, f"report-{n}"), repeats)}
            results.append(res)
            print(json.dumps(res), flush=True)
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return results


def markdown(results: list[dict], note: str = "") -> str:
    lines = ["| records (input) | run on disk | report wall (s) | report CPU (s) | peak RSS (MB) | files written |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['records']:,} | {r['run_bytes'] / 2**30:.2f} GiB | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['report_files']} |")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        lines.append("")
        lines.append(f"Ratio {b['records']:,} / {a['records']:,} records: wall **{b['seconds'] / a['seconds']:.2f}**, "
                     f"CPU **{b['cpu_seconds'] / a['cpu_seconds']:.2f}** (target <= 1.5).")
    if note:
        lines += ["", note]
    return "\n".join(lines)


def bench_section(sizes: tuple[int, ...] = (100_000, 1_000_000), repeats: int = 2) -> tuple[str, str]:
    """(markdown section for BENCHMARKS.md, the command that reproduces it)."""
    results = run(list(sizes), repeats=repeats)
    head = f"## Report\n\n`{COMMAND}` — `mmcorpus report` (6 samples per stage and reason, seed 0) on synthetic runs\n" \
           "(filter → dedup → rewrite → pack outputs, ~2 KB JPEG per record, images ~93% of the data bytes):\n\n"
    return head + markdown(results), COMMAND


TITLE = "Report"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (bench.run_all), measured now; quick: 2,000 and 8,000 records, one repeat."""
    sizes, repeats = ((2_000, 8_000), 1) if quick else ((100_000, 1_000_000), 3)
    results = run(list(sizes), repeats=repeats)
    cmd = f"python -m bench.report_scale --sizes {','.join(map(str, sizes))} --repeats {repeats}"
    return (f"`{cmd}` — `mmcorpus report` (6 samples per stage and reason, seed 0) on synthetic runs (filter → dedup → "
            "rewrite → pack outputs, ~2 KB JPEG per record, images ~93% of the data bytes):\n\n" + markdown(results) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--keep", help="write the synthetic runs here and keep them")
    args = p.parse_args(argv)
    t0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    results = run([int(s) for s in args.sizes.split(",")], keep=args.keep, repeats=args.repeats)
    print()
    print(markdown(results))
    print(f"\n(report processes: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - t0:.1f} s user CPU in total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
