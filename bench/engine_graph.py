"""The Dask engine's task graph at corpus-scale partition counts: tasks, driver CPU and memory to build it.

    python -m bench.engine_graph                      # P = 1,100 and 2,200, every stage
    python -m bench.engine_graph --partitions 500,2000 --stages dedup

At 200M records the default partition count is 200,000,000 / 20,000 (``--dask_partition_records``) =
10,000. A graph's size does not depend on the records: the stages read their input through a Reshuffle
into P partitions, so a few thousand records give the graph of any corpus at that P. Each stage runs
once on the DirectRunner (2,000 pairs, bench.scale's input), then, in a fresh process per (stage, P),
its pipeline is translated by the Dask engine (``pipelines.engines.translate_pipeline``, the code a real
run calls before submitting) without a cluster, and the process reports the task count, the CPU
seconds of the translation and the driver's resident memory before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = "Dask engine graph size at corpus-scale partition counts"
STAGES = ("filter", "dedup", "rewrite", "pack")
PAIRS = 2_000
_PARTITIONS_ENV = "MMCORPUS_BENCH_GRAPH_PARTITIONS"
_RESULT_ENV = "MMCORPUS_BENCH_GRAPH_RESULT"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _GraphBuilt(Exception):
    """Raised by ``GraphOnly`` once the graph is measured: nothing is submitted or written."""


def _graph_only_runner():
    from pipelines import engines

    class GraphOnly(engines.DaskRunner):
        """Translate the pipeline as the Dask engine does, at the partition count from the environment,
        record the graph's size, and stop."""

        def run_pipeline(self, pipeline, options):
            partitions = int(os.environ[_PARTITIONS_ENV])
            rss0, t0 = _rss(), time.process_time()
            translator, _ = engines.translate_pipeline(pipeline, options, threads=partitions)
            seconds = time.process_time() - t0
            kinds: dict[str, int] = {}
            for key in translator.graph.dsk:
                kind = str(key[0] if isinstance(key, tuple) else key).split(":", 1)[0]
                kinds[kind] = kinds.get(kind, 0) + 1
            with open(os.environ[_RESULT_ENV], "w") as f:
                json.dump({"partitions": translator.partitions, "tasks": len(translator.graph.dsk),
                           "transforms": len(translator.pcolls), "cpu_s": seconds, "rss_before": rss0,
                           "rss_after": _rss(), "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           "kinds": kinds}, f)
            raise _GraphBuilt()

    return GraphOnly


def __getattr__(name):  # Beam resolves --runner bench.engine_graph.GraphOnly by attribute
    if name == "GraphOnly":
        return _graph_only_runner()
    raise AttributeError(name)


def _stage_argv(stage: str, root: str, cfg: str, output: str) -> list[str]:
    from bench.scale import stage_argv

    argv = stage_argv(stage, root, cfg, [])
    i = argv.index("--output")
    return [*argv[:i + 1], output, *argv[i + 2:]]


def prepare(root: str) -> str:
    """bench.scale's input of PAIRS pairs, and each stage's output on the DirectRunner (the next
    stage's input). Returns the stage config's path."""
    from bench.scale import CONFIG, stage_argv, write_input

    write_input(os.path.join(root, "input"), PAIRS, 0.02)
    cfg = os.path.join(root, "bench-scale.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    env = dict(os.environ, MMCORPUS_PROGRESS="0")
    for stage in STAGES:
        subprocess.run([sys.executable, "-m", "pipelines.cli", *stage_argv(stage, root, cfg, [])], check=True,
                       cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return cfg


def measure(stage: str, partitions: int, root: str, cfg: str) -> dict:
    """The graph of ``stage`` at ``partitions``, translated in a fresh process."""
    result = os.path.join(root, f"graph-{stage}-{partitions}.json")
    argv = [*_stage_argv(stage, root, cfg, os.path.join(root, "graph-out", stage)), "--runner", "bench.engine_graph.GraphOnly"]
    env = dict(os.environ, MMCORPUS_PROGRESS="0", **{_PARTITIONS_ENV: str(partitions), _RESULT_ENV: result})
    code = ("import sys\nfrom bench import engine_graph\nfrom pipelines import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept engine_graph._GraphBuilt:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if not os.path.exists(result):
        raise RuntimeError(f"bench.engine_graph: {stage} at P = {partitions} did not build its graph "
                           f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(result) as f:
        return json.load(f)


def run(partitions: list[int], stages: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-engine-graph-") as root:
        cfg = prepare(root)
        rows = [dict(measure(stage, p, root, cfg), stage=stage) for stage in stages for p in partitions]
    return {"rows": rows, "partitions": partitions}


def to_markdown(res: dict, command: str) -> str:
    from pipelines import engines

    ps = res["partitions"]
    out = [f"`{command}`", "",
           f"Each stage's pipeline as the Dask engine translates it (no cluster, nothing run), on {PAIRS:,} "
           "pairs: the graph depends on P, not on the records. Shuffles of more than "
           f"{engines.DEFAULT_MAX_BRANCH} partitions run in hops (docs/operations.md).", "",
           "| stage | P | hops per shuffle | tasks | tasks / P | build CPU s | driver RSS growth MiB | driver peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|"]
    by_stage: dict[str, list[dict]] = {}
    for r in res["rows"]:
        by_stage.setdefault(r["stage"], []).append(r)
        hops = engines._hops(r["partitions"], r["partitions"], engines.DEFAULT_MAX_BRANCH)
        out.append(f"| {r['stage']} | {r['partitions']:,} | {hops} | {r['tasks']:,} | {r['tasks'] / r['partitions']:,.0f} | "
                   f"{r['cpu_s']:.1f} | {(r['rss_after'] - r['rss_before']) / 2**20:,.0f} | {r['maxrss'] / 2**20:,.0f} |")
    if len(ps) >= 2:
        lo, hi = ps[0], ps[-1]
        out += ["", f"Growth from P = {lo:,} to P = {hi:,} ({hi / lo:.0f}× the partitions), per stage: "]
        for stage, rows in by_stage.items():
            a = next(r for r in rows if r["partitions"] == lo)
            b = next(r for r in rows if r["partitions"] == hi)
            grow_a, grow_b = a["rss_after"] - a["rss_before"], b["rss_after"] - b["rss_before"]
            out.append(f"- {stage}: tasks ×{b['tasks'] / a['tasks']:.2f}, build CPU ×{b['cpu_s'] / max(a['cpu_s'], 1e-9):.2f}, "
                       f"driver RSS growth ×{grow_b / max(grow_a, 1):.2f} "
                       f"({grow_b / b['tasks']:,.0f} bytes per task at P = {hi:,}).")
    return "\n".join(out) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", default="1100,2200", help="partition counts P, comma-separated")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages, comma-separated")
    ap.add_argument("--quick", action="store_true", help="P = 50 and 200")
    return ap


def section(quick: bool = False, argv: list[str] | None = None) -> str:
    """Markdown for BENCHMARKS.md, measured now."""
    args = _parser().parse_args(argv or [])
    partitions = "50,200" if quick or args.quick else args.partitions
    command = f"python -m bench.engine_graph --partitions {partitions} --stages {args.stages}"
    res = run([int(p) for p in partitions.split(",")], [s.strip() for s in args.stages.split(",") if s.strip()])
    return to_markdown(res, command)


def main(argv: list[str] | None = None) -> int:
    print(section(argv=argv), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
