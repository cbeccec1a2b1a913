"""Scale run: N pairs through filter → dedup → rewrite (offline template) → pack, per engine, with
wall time, CPU seconds, peak RSS of every process and pairs/s/core per stage, and growth ratios.

    .venv/bin/python -m bench.scale                                   # 250k and 1M, every available engine
    .venv/bin/python -m bench.scale --sizes 5000,20000 --engines direct

Input: img2dataset-style Parquet (``key, url, caption, status, jpg``) written deterministically:
captions from ``bench.dedup_data.synthetic_captions`` (30% in planted near-duplicate groups), and a
share of the pairs (``--image-share``, default 2%: 20k at 1M) carrying real image bytes: the bundled
photos of data/sample, cropped at seeded positions, resized to varied sizes and re-encoded at varied
JPEG qualities, so that every image's bytes (and mostly its perceptual hash) differ.

Each stage runs as its own process (``python -m pipelines.cli STAGE ...``). A sampler thread reads
the peak RSS (VmHWM, every 0.2 s) of that process, its children and, on Dask, the scheduler and
worker processes this script started. CPU seconds are the stage process tree's own rusage
(``os.wait4``) plus the Dask processes' CPU-time deltas. pairs/s/core = the stage's input records /
its CPU seconds.

Engines: ``direct`` (Beam DirectRunner, in-memory, one process) and ``dask`` (a real local cluster:
``dask scheduler`` + ``dask worker --nworkers 2 --nthreads 1 --memory-limit M`` as separate processes,
stages run with ``--runner dask --dask-address``). Dask is used only when this checkout's stages
understand ``--runner dask`` (see ``dask_supported``).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "sample")
TITLE = "Scale: filter → dedup → rewrite → pack"
STAGES = ("filter", "dedup", "rewrite", "pack")
LONG_SIDES = (128, 160, 224, 256, 320, 384, 448, 512, 640, 800)
QUALITIES = (55, 60, 65, 70, 75, 80, 85, 90, 95)
ROWS_PER_FILE = 50_000
CONFIG = """# bench.scale: the input carries caption-only rows beside image rows
[filter.image]
require_image = false
"""


# --- input -------------------------------------------------------------------------------------


def _photos():
    """The bundled photos, decoded once (RGB)."""
    from PIL import Image

    paths = sorted(glob.glob(os.path.join(SAMPLE, "cc_images", "*.jpg")) + glob.glob(os.path.join(SAMPLE, "skimage_pairs", "*.[pj][np]g")))
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def image_variant(photos, i: int) -> bytes:
    """Image ``i``: a seeded crop (45–100% of each side) of one bundled photo, a mirror half of the
    time, resized to one of LONG_SIDES and JPEG-encoded at one of QUALITIES. Deterministic in ``i``."""
    from PIL import Image, ImageOps

    rng = random.Random(i)
    im = photos[i % len(photos)]
    w, h = im.size
    cw, ch = max(16, int(w * rng.uniform(0.45, 1.0))), max(16, int(h * rng.uniform(0.45, 1.0)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    side = rng.choice(LONG_SIDES)
    scale = side / max(cw, ch)
    crop = crop.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=rng.choice(QUALITIES))
    return buf.getvalue()


def write_input(directory: str, n: int, image_share: float, seed: int = 0) -> dict:
    """img2dataset-style Parquet files of ``n`` pairs; every ``1/image_share``-th pair has a JPEG."""
    from bench.dedup_data import synthetic_captions

    os.makedirs(directory, exist_ok=True)
    captions, _groups = synthetic_captions(n, seed=seed)
    every = max(1, round(1 / image_share)) if image_share > 0 else 0
    photos = _photos() if every else []
    images = image_bytes = 0
    for f, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        hi = min(n, lo + ROWS_PER_FILE)
        jpg = []
        for i in range(lo, hi):
            if every and i % every == 0:
                b = image_variant(photos, i // every)
                images += 1
                image_bytes += len(b)
                jpg.append(b)
            else:
                jpg.append(None)
        t = pa.table({
            "key": [f"{i:09d}" for i in range(lo, hi)],
            "url": [f"http://img.example/{i}.jpg" for i in range(lo, hi)],
            "caption": captions[lo:hi],
            "status": ["success"] * (hi - lo),
            "jpg": pa.array(jpg, pa.binary()),
        })
        pq.write_table(t, os.path.join(directory, f"{f:05d}.parquet"), row_group_size=5_000)
    return {"pairs": n, "images": images, "image_bytes": image_bytes}


# --- measuring processes -----------------------------------------------------------------------


def _hwm(pid: int) -> int | None:
    """VmHWM (peak RSS of the process's own address space since exec) in bytes, on Linux. Monotonic,
    so sampling it misses at most the growth of a process's last moments."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (``echo 5 > /proc/PID/clear_refs``, our own processes)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Peak RSS per process (by role) of a process tree plus extra processes, sampled every ``period`` s."""

    def __init__(self, root_pid: int | None, extra: dict[str, int], period: float = 0.2):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid) if root_pid else None
        self.extra = {name: psutil.Process(pid) for name, pid in extra.items()}
        self.peaks: dict[str, int] = {}
        self.period = period
        self._stop = threading.Event()
        self._cpu0 = {p.pid: self._cpu(p) for p in self._extra_tree()}
        # Dask processes live across stages: reset their VmHWM so each stage reports its own peak.
        self._fresh_peak = {p.pid: _reset_hwm(p.pid) for p in self._extra_tree()}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _extra_tree(self) -> list:
        out = []
        for p in self.extra.values():
            out.append(p)
            try:
                out += p.children(recursive=True)
            except self.psutil.Error:
                pass
        return out

    def _cpu(self, p) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except self.psutil.Error:
            return 0.0

    def _sample(self) -> None:
        procs: dict[str, object] = {}
        if self.root is not None:
            procs["driver"] = self.root
            try:
                for c in self.root.children(recursive=True):
                    procs[f"driver child {c.pid}"] = c
            except self.psutil.Error:
                pass
        for name, p in self.extra.items():
            procs[name] = p
            try:
                for c in p.children(recursive=True):
                    procs[f"{name} child {c.pid}"] = c
            except self.psutil.Error:
                pass
        for name, p in procs.items():
            # VmHWM unless it is a long-lived process whose peak could not be reset (then sampled RSS)
            rss = _hwm(p.pid) if self._fresh_peak.get(p.pid, True) else None
            if rss is None:
                try:
                    rss = p.memory_info().rss
                except self.psutil.Error:
                    continue
            self.peaks[name] = max(self.peaks.get(name, 0), rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def stop(self) -> tuple[dict[str, int], dict[str, float]]:
        """(peak RSS bytes per process, CPU seconds since start per extra process, its children included)."""
        self._stop.set()
        self._thread.join()
        # Dask processes live across stages: count only the CPU they spent since this stage started.
        cpu = {}
        for name, p in self.extra.items():
            tree = [p]
            try:
                tree += p.children(recursive=True)
            except self.psutil.Error:
                pass
            cpu[name] = sum(self._cpu(q) - self._cpu0.get(q.pid, 0.0) for q in tree)
        return self.peaks, cpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaskCluster:
    """``dask scheduler`` and ``dask worker --nworkers N --nthreads 1`` as separate processes."""

    def __init__(self, workdir: str, workers: int = 2, memory_limit: str = "4GiB"):
        bindir = os.path.dirname(sys.executable)
        dask = os.path.join(bindir, "dask")
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = {name: open(os.path.join(workdir, f"dask-{name}.log"), "w+") for name in ("scheduler", "workers")}
        self.scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
                                          stdout=self.logs["scheduler"], stderr=subprocess.STDOUT)
        self.workers = subprocess.Popen([dask, "worker", self.address, "--nworkers", str(workers), "--nthreads", "1",
                                         "--memory-limit", memory_limit, "--no-dashboard", "--local-directory", os.path.join(workdir, "dask-local")],
                                        stdout=self.logs["workers"], stderr=subprocess.STDOUT)
        self.n = workers
        self.memory_limit = memory_limit
        self._wait(workers)

    def _wait(self, workers: int, timeout: float = 120) -> None:
        from distributed import Client

        deadline = time.monotonic() + timeout
        while True:
            try:
                with Client(self.address, timeout=5) as c:
                    c.wait_for_workers(workers, timeout=max(1, deadline - time.monotonic()))
                    return
            except Exception:
                if time.monotonic() > deadline or self.scheduler.poll() is not None or self.workers.poll() is not None:
                    raise RuntimeError(f"dask cluster at {self.address} did not come up; see {self.logs['workers'].name}")
                time.sleep(1)

    def pids(self) -> dict[str, int]:
        return {"dask scheduler": self.scheduler.pid, "dask worker": self.workers.pid}

    def events(self) -> dict[str, int]:
        """Counts of memory-pressure lines in the worker log so far: spills, pauses, restarts/deaths."""
        self.logs["workers"].flush()
        with open(self.logs["workers"].name, errors="replace") as f:
            text = f.read()
        return {
            "spill": len(re.findall(r"spill", text, re.I)),
            "paused": len(re.findall(r"Pausing worker", text)),
            "died": len(re.findall(r"(?:Worker process \d+ was killed|exceeded \d+% memory budget|Restarting worker)", text)),
        }

    def close(self) -> None:
        for p in (self.workers, self.scheduler):
            if p.poll() is None:
                p.terminate()
        for p in (self.workers, self.scheduler):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs.values():
            f.close()


_DASK_PROBE = """
from apache_beam.options.pipeline_options import StandardOptions
from pipelines.runner import beam_options
print(beam_options(["--runner", "dask", "--dask-workers", "1"]).view_as(StandardOptions).runner)
"""


def dask_supported() -> bool:
    """Whether this checkout's stages understand ``--runner dask`` (issue 9's alias): their option
    translation then names a real Dask runner class instead of passing the bare word through."""
    out = subprocess.run([sys.executable, "-c", _DASK_PROBE], capture_output=True, text=True, cwd=REPO)
    runner = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    return "dask" in runner.lower() and runner.lower() != "dask"


# --- the run -----------------------------------------------------------------------------------


def stage_argv(stage: str, root: str, cfg: str, extra: list[str]) -> list[str]:
    out = os.path.join(root, "out")
    args = {
        "filter": ["--input", os.path.join(root, "input"), "--input-format", "i2d-parquet"],
        "dedup": ["--input", os.path.join(out, "filter")],
        "rewrite": ["--input", os.path.join(out, "dedup"), "--backend", "offline-template"],
        "pack": ["--input", os.path.join(out, "rewrite"), "--stage", "1", "--seq-len", "2048"],
    }[stage]
    return [stage, *args, "--output", os.path.join(out, stage), "--config", cfg, "--force", *extra]


def run_stage_measured(argv: list[str], extra_pids: dict[str, int], log_path: str, writer_log: str) -> dict:
    env = dict(os.environ, MMCORPUS_PROGRESS="0", MMCORPUS_WRITER_MEMORY=writer_log)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = Sampler(proc.pid, extra_pids)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peaks, extra_cpu = sampler.stop()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            raise RuntimeError(f"mmcorpus {' '.join(argv)} exited {proc.returncode}:\n{f.read()[-3000:]}")
    # Not ru_maxrss: Linux carries the parent's RSS at fork/exec into the child's, and this process is big.
    driver_cpu = ru.ru_utime + ru.ru_stime
    return {"wall_s": wall, "cpu_s": driver_cpu + sum(extra_cpu.values()), "peaks": peaks,
            "cpu_by_process": {"driver": driver_cpu, **extra_cpu}}


def _writer_peaks(path: str, field: str = "peak_bytes") -> list[float]:
    """Per-shard peaks (MiB, in shard order) of the stage writer's memory, from the JSON lines each shard
    write appends to ``$MMCORPUS_WRITER_MEMORY`` (pipelines.runner): ``peak_bytes`` is the writer's own
    (its traced allocations + Arrow pool), ``process_peak_bytes`` the whole process's tracemalloc peak
    over the write (+ Arrow pool). Empty when this checkout's writer wrote none."""
    peaks = []
    if os.path.exists(path):
        with open(path) as f:
            peaks = sorted((d["shard"], d[field] / 2**20) for d in map(json.loads, filter(str.strip, f)) if field in d)
    return [round(p, 2) for _, p in peaks]


def _peak_cell(peaks: list[float], process: list[float] | None = None) -> str:
    if not peaks:
        return "–"
    cell = f"{max(peaks):,.1f} / {statistics.median(peaks):,.1f} ({len(peaks)} shards)"
    if process:
        cell += f"; process {max(process):,.1f} / {statistics.median(process):,.1f}"
    return cell


def _own_share(runs: list[dict], engine: str) -> tuple[float, float, int] | None:
    """(min, median, shards) over every shard of ``engine``'s runs of own peak / whole-process peak."""
    shares = [a / b for run in runs if run["engine"] == engine for r in run["rows"]
              for a, b in zip(r["writer_peaks_mib"], r.get("writer_process_peaks_mib") or []) if b]
    return (min(shares), statistics.median(shares), len(shares)) if shares else None


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}" if a else "–"


def run_engine(engine: str, n: int, root: str, image_share: float, cores_direct: int, stage_extra: list[str],
               memory_limit: str) -> dict:
    from transforms.stage_io import read_manifest

    cfg = os.path.join(root, "bench-scale.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    cluster = None
    try:
        if engine == "dask":
            cluster = DaskCluster(root, workers=2, memory_limit=memory_limit)
            extra, pids, cores = ["--runner", "dask", "--dask-address", cluster.address], cluster.pids(), 2
        else:
            extra, pids, cores = [], {}, cores_direct
        rows = []
        for stage in STAGES:
            writer_log = os.path.join(root, f"{engine}-{stage}-writer.jsonl")
            if os.path.exists(writer_log):
                os.unlink(writer_log)
            r = run_stage_measured(stage_argv(stage, root, cfg, extra + stage_extra), pids, os.path.join(root, f"{engine}-{stage}.log"),
                                   writer_log)
            m = read_manifest(os.path.join(root, "out", stage))
            r.update(stage=stage, engine=engine, n=n, inputs=m.counts["inputs"], outputs=m.counts["outputs"], cores=cores,
                     writer_peaks_mib=_writer_peaks(writer_log),
                     writer_process_peaks_mib=_writer_peaks(writer_log, "process_peak_bytes"), files=len(m.files))
            if cluster is not None:
                r["dask_events"] = cluster.events()
            rows.append(r)
            errors = m.counts.get("by_status", {}).get("error", 0)
            if errors:  # the synthetic input has no record a stage should fail on: a bug, not a figure
                raise RuntimeError(f"bench.scale: {engine} {stage} at {n:,} pairs: {errors:,} error rows in its "
                                   f"ledger ({m.counts.get('by_reason')}); see {os.path.join(root, 'out', stage)}")
            # Progress, one JSON line per stage as it ends (stderr; the section prints only at the end).
            print(f"bench.scale: {json.dumps(r, sort_keys=True)}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", "--json",
                              *[os.path.join(root, "out", s) for s in STAGES]], capture_output=True, text=True, cwd=REPO)
        verify_s = time.perf_counter() - t
        try:
            report = json.loads(out.stdout)
        except ValueError:
            report = {}
        failed = [d for d, r in report.items() if not r["ok"]]
        if failed or len(report) != len(STAGES):
            raise RuntimeError(f"verify failed after the {engine} run at n={n}: {failed or out.stderr[-2000:]}")
        # Every check passed; an abort while the interpreter shuts down (seen once under heavy load:
        # "terminate called without an active exception") is reported, not fatal.
        return {"rows": rows, "verify_s": verify_s, "verify_exit": out.returncode}
    finally:
        if cluster is not None:
            cluster.close()


def run(sizes: list[int], engines: list[str], image_share: float = 0.02, workdir: str | None = None,
        cores_direct: int = 1, stage_extra: list[str] | None = None, memory_limit: str = "4GiB", keep: bool = False) -> dict:
    base = workdir or tempfile.mkdtemp(prefix="bench-scale-")
    results = {"sizes": sizes, "engines": engines, "inputs": {}, "runs": []}
    try:
        for n in sizes:
            root = os.path.join(base, f"n{n}")
            if os.path.exists(root):
                shutil.rmtree(root)
            t = time.perf_counter()
            info = write_input(os.path.join(root, "input"), n, image_share)
            info["seconds"] = time.perf_counter() - t
            results["inputs"][n] = info
            for engine in engines:
                if os.path.exists(os.path.join(root, "out")):
                    shutil.rmtree(os.path.join(root, "out"))
                res = run_engine(engine, n, root, image_share, cores_direct, stage_extra or [], memory_limit)
                results["runs"].append({"engine": engine, "n": n, **res})
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
        results["load_avg"] = os.getloadavg()[0]
        return results
    finally:
        if workdir is None and not keep:
            shutil.rmtree(base, ignore_errors=True)


def _peaks(peaks: dict[str, int]) -> str:
    named = sorted(peaks.items(), key=lambda kv: (not kv[0].startswith("driver"), kv[0]))
    return "; ".join(f"{name} {v / 2**20:,.0f}" for name, v in named if v > 0)


def _cpus(cpu: dict[str, float]) -> str:
    """Only when other processes than the driver took part (Dask): the driver's figure alone is the total."""
    if len(cpu) < 2:
        return "–"
    return "; ".join(f"{name} {v:,.0f}" for name, v in cpu.items())


def to_markdown(res: dict, command: str) -> str:
    lines = [f"`{command}` (load average {res['load_avg']:.1f} at the end; {os.cpu_count()} cores)", ""]
    for n, info in res["inputs"].items():
        lines.append(f"- n = {n:,}: {info['images']:,} pairs with real image bytes ({info['image_bytes'] / 1e6:,.0f} MB of re-encoded "
                     f"bundled photos), the rest caption-only; input written in {info['seconds']:.0f} s.")
    lines += ["", "| engine | pairs | stage | in → out | wall s | CPU s | pairs/s/core | CPU s per process | peak RSS MiB per process | writer peak MiB per shard, own: largest / median; process: largest / median | Dask memory events |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for run in res["runs"]:
        for r in run["rows"]:
            ev = r.get("dask_events")
            ev_s = "–" if ev is None else f"spill {ev['spill']}, paused {ev['paused']}, died {ev['died']}"
            lines.append(f"| {r['engine']} | {r['n']:,} | {r['stage']} | {r['inputs']:,} → {r['outputs']:,} | {r['wall_s']:.1f} | "
                         f"{r['cpu_s']:.1f} | {r['inputs'] / max(r['cpu_s'], 1e-9):,.0f} | {_cpus(r.get('cpu_by_process', {}))} | {_peaks(r['peaks'])} | {_peak_cell(r['writer_peaks_mib'], r.get('writer_process_peaks_mib'))} | {ev_s} |")
        exit_note = "" if run["verify_exit"] == 0 else f", but the verify process exited {run['verify_exit']} after printing its report"
        notes.append(f"- {run['engine']}, {run['n']:,} pairs: `mmcorpus verify` passed every check on all four outputs "
                     f"({run['verify_s']:.1f} s){exit_note}.")
        total_wall = sum(r["wall_s"] for r in run["rows"])
        lines.append(f"| {run['engine']} | {run['n']:,} | **all four** | | **{total_wall:.1f}** | {sum(r['cpu_s'] for r in run['rows']):.1f} | | | | | |")
    lines += ["", *notes]
    sizes = res["sizes"]
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        lines += ["", f"Growth {small:,} → {big:,} pairs (×{big / small:g}; target for ×4: wall ≤ 4.6):", "",
                  "| engine | stage | wall ratio | CPU ratio | peak driver RSS ratio | writer peak ratio: largest shard, median shard (target ≤ 1.3) |",
                  "|---|---|---|---|---|---|"]
        for engine in res["engines"]:
            a = next(r for r in res["runs"] if r["engine"] == engine and r["n"] == small)
            b = next(r for r in res["runs"] if r["engine"] == engine and r["n"] == big)
            for ra, rb in zip(a["rows"], b["rows"]):
                pa_, pb = ra["writer_peaks_mib"], rb["writer_peaks_mib"]
                writer = (f"{_ratio(max(pa_), max(pb))}, {_ratio(statistics.median(pa_), statistics.median(pb))}"
                          if pa_ and pb else "–")
                lines.append(f"| {engine} | {ra['stage']} | {rb['wall_s'] / ra['wall_s']:.2f} | {rb['cpu_s'] / max(ra['cpu_s'], 1e-9):.2f} | "
                             f"{rb['peaks'].get('driver', 0) / max(ra['peaks'].get('driver', 1), 1):.2f} | {writer} |")
            wa, wb = sum(r["wall_s"] for r in a["rows"]), sum(r["wall_s"] for r in b["rows"])
            lines.append(f"| {engine} | **all four** | **{wb / wa:.2f}** | | | |")
    lines += ["", "Writer peak: each shard write's own peak memory, written by the stage writer to `$MMCORPUS_WRITER_MEMORY` "
              "(the harness sets it per stage; measuring slows the writer; a dash: no report). Own = the largest sum, at the points "
              "where the writer holds the most (a full sort buffer, the end of its input, a row group built, a row group "
              "written), of the live tracemalloc traces allocated by the writer's module, plus the largest column chunk "
              "Arrow handed the file sink during that write, plus the Arrow pool's growth. \"process\" = tracemalloc's "
              "peak of the whole process over the write (+ Arrow pool): it also counts other threads, such as a Dask worker's "
              "communication thread receiving and deserialising other tasks' inputs during a write (`--nthreads 1`), so on "
              "Dask it is only an upper bound. The growth ratios use the own figures."]
    share = _own_share(res["runs"], "direct")
    if share:
        lines += ["", f"Check of the own figure where nothing else runs during a write (the DirectRunner's process): own / process "
                     f"peak per shard, over all {share[2]} direct shards of this run: lowest {share[0]:.2f}, median {share[1]:.2f}."]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="250000,1000000", help="pairs per run, comma-separated")
    ap.add_argument("--engines", default="auto", help="direct,dask (auto: direct, plus dask when the stages support it)")
    ap.add_argument("--image-share", type=float, default=0.02, help="share of pairs with real image bytes")
    ap.add_argument("--memory-limit", default="4GiB", help="dask worker --memory-limit")
    ap.add_argument("--target-shard-bytes", default="64MiB", help="passed to every stage (fixed, so writer peaks compare)")
    ap.add_argument("--workdir", help="keep inputs and outputs here (default: a temporary directory, removed)")
    ap.add_argument("--quick", action="store_true", help="2,000 and 8,000 pairs")
    return ap


def _engines(spec: str) -> list[str]:
    if spec == "auto":
        return ["direct", "dask"] if dask_supported() else ["direct"]
    engines = [e.strip() for e in spec.split(",") if e.strip()]
    for e in engines:
        if e not in ("direct", "dask"):
            raise SystemExit(f"bench.scale: unknown engine {e!r} (direct, dask)")
    if "dask" in engines and not dask_supported():
        raise SystemExit("bench.scale: this checkout's stage commands do not accept --runner dask --dask-address yet")
    return engines


def section(quick: bool = False, argv: list[str] | None = None) -> str:
    """Markdown for BENCHMARKS.md, measured now."""
    args = _parser().parse_args(argv or [])
    sizes = "2000,8000" if quick or args.quick else args.sizes
    engines = _engines(args.engines)
    command = (f"python -m bench.scale --sizes {sizes} --engines {','.join(engines)} --image-share {args.image_share} "
               f"--target-shard-bytes {args.target_shard_bytes}")
    if "dask" in engines:
        command += f" --memory-limit {args.memory_limit}"
    res = run([int(s) for s in sizes.split(",")], engines, args.image_share, args.workdir, memory_limit=args.memory_limit,
              keep=bool(args.workdir), stage_extra=["--target-shard-bytes", args.target_shard_bytes])
    return to_markdown(res, command)


def main(argv: list[str] | None = None) -> int:
    print(section(argv=argv), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
