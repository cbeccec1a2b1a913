"""Every stage on a real Dask cluster (a `dask scheduler` and two `dask worker` processes): outputs
byte-identical to the DirectRunner's, bad input accounted for the same way, a worker SIGKILLed mid-stage,
the local-cluster and flag paths, and the runner semantics Beam's own Dask runner gets wrong."""

from __future__ import annotations

import collections
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import apache_beam as beam
import psutil
import pytest

from engine.conftest import REPO, manifest_files, tree, worker_env
from pipelines import cli
from schemas.manifest import MANIFEST_NAME
from transforms.stage_io import read_manifest, read_table

FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_bad_inputs import EXPECTED, EXPECTED_EXTRA  # noqa: E402

pytestmark = pytest.mark.slow


def on_dask(cluster, alias: bool = True) -> list[str]:
    """The engine flags, in the short spelling or in Beam's own."""
    if alias:
        return ["--runner", "dask", "--dask-address", cluster.address]
    return ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner", f"--dask_client_address={cluster.address}"]


def run(command: str, *argv: str) -> None:
    assert cli.main([command, *argv]) == 0


def assert_identical(direct, dask) -> None:
    assert manifest_files(dask) == manifest_files(direct)
    assert tree(dask) == tree(direct)  # every file, manifest included, and no stray temporary file


def captions(n: int, start: int = 0) -> list[str]:
    with open(REPO / "data" / "sample" / "cc3m_val_captions_8k.tsv", encoding="utf-8", newline="") as f:
        rows = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return list(dict.fromkeys(rows))[start:start + n]


def rewrite_input(path: str, caps: list[str]) -> str:
    from helpers import make_stage_dir
    from schemas.records import Pair

    pairs = [Pair(key=f"k{i:04d}", caption=c, needs_rewrite=True, quality_flags=["x"], source=f"in.tsv#{i}")
             for i, c in enumerate(caps)]
    return make_stage_dir(path, pairs, stage="dedup", num_shards=2)


# --- the runner's semantics ----------------------------------------------------------------------


class _SplitFn(beam.DoFn):
    def process(self, x):
        yield x if x % 2 == 0 else beam.pvalue.TaggedOutput("odd", x)


class _HoldUntilFinishFn(beam.DoFn):
    """Emits nothing in process, everything in finish_bundle (as BatchElements does with its last batch)."""

    def start_bundle(self):
        self.held = []

    def process(self, x):
        self.held.append(x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for x in self.held:
            yield WindowedValue(x, 0, [GlobalWindow()])


class _WriteFn(beam.DoFn):
    def __init__(self, path):
        self.path = path

    def process(self, _, values, total):
        with open(self.path, "w") as f:
            json.dump({"values": sorted(values), "total": total}, f)
        yield 1


def test_runner_keeps_tagged_and_finish_bundle_outputs_and_runs_every_sink(dask_cluster, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.engines import translate

    opts = PipelineOptions(translate(on_dask(dask_cluster)))
    with beam.Pipeline(options=opts) as p:
        nums = p | beam.Create(list(range(100)))
        evens, odds = nums | "Split" >> beam.ParDo(_SplitFn()).with_outputs("odd", main="even")
        held = odds | beam.Reshuffle() | "Hold" >> beam.ParDo(_HoldUntilFinishFn())
        total = evens | beam.CombineGlobally(sum)
        _ = (p | "One" >> beam.Create([None])
             | "WriteOdds" >> beam.ParDo(_WriteFn(str(tmp_path / "odds.json")), beam.pvalue.AsList(held),
                                         beam.pvalue.AsSingleton(total)))
        # A second, independent sink: Beam's Dask runner computes only the last transform's bag.
        _ = (evens | beam.Map(lambda x: (x % 3, x)) | beam.GroupByKey()
             | beam.Map(lambda kv, d=str(tmp_path): pathlib.Path(d, f"group{kv[0]}.json").write_text(
                 json.dumps(sorted(kv[1])))))
    doc = json.loads((tmp_path / "odds.json").read_text())
    assert doc == {"values": list(range(1, 100, 2)), "total": 2450}
    for r in range(3):
        assert json.loads((tmp_path / f"group{r}.json").read_text()) == [x for x in range(0, 100, 2) if x % 3 == r]


# --- stages: byte-identical to the DirectRunner --------------------------------------------------


def test_filter_bad_inputs_same_ledger_as_direct(dask_cluster, tmp_path):
    wds = str(FIXTURES / "bad_inputs" / "webdataset")
    run("filter", "--input", wds, "--output", str(tmp_path / "direct"))
    run("filter", "--input", wds, "--output", str(tmp_path / "dask"), *on_dask(dask_cluster))
    assert_identical(tmp_path / "direct", tmp_path / "dask")
    # Every record ends as exactly the row the corpus was built to produce, on Dask too.
    ledger = read_table(str(tmp_path / "dask"), "ledger").to_pylist()
    by_key = collections.defaultdict(list)
    for r in ledger:
        by_key[r["key"]].append((r["status"], r["reason"]))
    for key, expected in EXPECTED.items():
        assert expected in by_key[key], (key, by_key[key])
    assert len(ledger) == len(EXPECTED) + sum(EXPECTED_EXTRA.values())

    rows = str(FIXTURES / "bad_inputs" / "tables" / "rows.jsonl")
    run("filter", "--input", rows, "--output", str(tmp_path / "direct-rows"))
    run("filter", "--input", rows, "--output", str(tmp_path / "dask-rows"), *on_dask(dask_cluster))
    assert_identical(tmp_path / "direct-rows", tmp_path / "dask-rows")
    got = sorted((r["source"].split("#")[1], r["status"], r["reason"])
                 for r in read_table(str(tmp_path / "dask-rows"), "ledger").to_pylist())
    assert [g[1:] for g in got] == [
        ("kept", "ok"), ("rejected", "caption_invalid_utf8"), ("error", "row_unreadable"),
        ("rejected", "caption_missing"), ("rejected", "caption_empty"), ("rejected", "caption_too_long_chars"),
        ("error", "row_unreadable"), ("rejected", "duplicate_key"), ("rejected", "caption_control_chars"),
        ("rejected", "url_missing"),
    ]


def test_dedup_planted_groups_identical_with_beams_own_flags(dask_cluster, tmp_path, sample_dir):
    from tests.dedup.stage_fixture import write_pairs
    from tests.dedup.test_stage import planted_pairs

    pairs, expected = planted_pairs(sample_dir)
    inp = write_pairs(str(tmp_path / "in"), pairs)
    run("dedup", "--input", inp, "--output", str(tmp_path / "direct"), "--num-shards", "3")
    run("dedup", "--input", inp, "--output", str(tmp_path / "dask"), "--num-shards", "3",
        *on_dask(dask_cluster, alias=False))
    assert_identical(tmp_path / "direct", tmp_path / "dask")
    # every shuffle of 7 partitions in three hops (2 ** 2 < 7 <= 2 ** 3 for max branch 2)
    run("dedup", "--input", inp, "--output", str(tmp_path / "dask-hops"), "--num-shards", "3",
        *on_dask(dask_cluster), "--dask_npartitions", "7", "--dask_max_branch", "2")
    assert_identical(tmp_path / "direct", tmp_path / "dask-hops")
    ledger = read_table(str(tmp_path / "dask"), "ledger").to_pylist()
    assert {r["key"]: (r["status"], r["reason"], r["kept_key"]) for r in ledger} == expected
    assert read_manifest(str(tmp_path / "dask")).extra["dedup"]["components"]["converged"] is True


def test_dedup_legacy_transitive_identical(dask_cluster, tmp_path, sample_dir):
    # legacy mode's features cross as batches beside a tagged error output (ExtractFeatureBatchesFn)
    from tests.dedup.stage_fixture import write_pairs
    from tests.dedup.test_stage import LEGACY_EXPECTED, planted_pairs

    pairs, _ = planted_pairs(sample_dir)
    inp = write_pairs(str(tmp_path / "in"), pairs)
    cfg = tmp_path / "legacy.toml"
    cfg.write_text('[dedup]\nmode = "legacy-transitive"\n')
    run("dedup", "--input", inp, "--output", str(tmp_path / "direct"), "--num-shards", "3", "--config", str(cfg))
    run("dedup", "--input", inp, "--output", str(tmp_path / "dask"), "--num-shards", "3", "--config", str(cfg),
        *on_dask(dask_cluster))
    assert_identical(tmp_path / "direct", tmp_path / "dask")
    ledger = read_table(str(tmp_path / "dask"), "ledger").to_pylist()
    assert {r["key"]: (r["status"], r["reason"], r["kept_key"]) for r in ledger} == LEGACY_EXPECTED


FAULTS = ("http_500", "malformed_json", "truncated")


def planned(seed: int, caption: str, rate: float, max_retries: int) -> tuple[str, int]:
    """(ledger reason, requests) the stand-in's fault plan implies for one caption."""
    from rewriter.standin import fault_for

    for attempt in range(max_retries + 1):
        fault = fault_for(seed, caption, attempt, rate, FAULTS)
        if fault in ("http_429", "http_500"):
            continue
        reason = {None: "ok", "malformed_json": "rewrite_invalid_json", "malformed_body": "rewrite_invalid_json",
                  "truncated": "rewrite_truncated"}[fault]
        return reason, attempt + 1
    return "rewrite_exhausted_retries", max_retries + 1


def test_rewrite_with_injected_faults_identical(dask_cluster, tmp_path):
    from rewriter.standin import StandInServer

    caps = captions(60)
    inp = rewrite_input(str(tmp_path / "in"), caps)
    faults = FAULTS
    outs = {}
    for name, extra in (("direct", []), ("dask", on_dask(dask_cluster))):
        # A fresh server per run: faults depend on each caption's attempt number at that server.
        with StandInServer(latency_s=0.01, fault_rate=0.25, faults=faults, seed=2, retry_after_s=1) as srv:
            outs[name] = tmp_path / name
            run("rewrite", "--input", inp, "--output", str(outs[name]), "--endpoint", srv.base_url,
                "--model", "rw-test", "--policy", "all", "--cache-dir", str(tmp_path / f"cache-{name}"),
                "--max-retries", "1", "--timeout", "20", "--batch-size", "8", "--concurrency", "4", *extra)
            asked = collections.Counter(srv.captions_seen())
        outs[name + "-asked"] = asked
    plan = {f"k{i:04d}": planned(2, c, 0.25, 1) for i, c in enumerate(caps)}
    for name in ("direct", "dask"):
        ledger = read_table(str(outs[name]), "ledger").to_pylist()
        assert sorted(r["key"] for r in ledger) == sorted(plan)  # one row per record
        assert {r["key"]: r["reason"] for r in ledger} == {k: v[0] for k, v in plan.items()}, name
        assert outs[name + "-asked"] == collections.Counter({c: plan[f"k{i:04d}"][1] for i, c in enumerate(caps)})
    assert len({v[0] for v in plan.values()}) == 4  # every outcome is exercised (ok, json, truncated, retries)
    assert_identical(outs["direct"], outs["dask"])


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_pack_identical(dask_cluster, tmp_path, fmt):
    from pack.fixtures import make_input_dir, sample_pairs

    inp = make_input_dir(str(tmp_path / "rewrite"), sample_pairs())
    flags = ["--stage", "3", "--seq-len", "2048", "--partitions", "2", "--max-packs-per-shard", "2", "--format", fmt]
    run("pack", "--input", inp, "--output", str(tmp_path / "direct"), *flags)
    run("pack", "--input", inp, "--output", str(tmp_path / "dask"), *flags, *on_dask(dask_cluster))
    assert_identical(tmp_path / "direct", tmp_path / "dask")
    kinds = collections.Counter(f.kind for f in read_manifest(str(tmp_path / "dask")).files)
    assert kinds["ledger"] >= 1 and sum(kinds.values()) > kinds["ledger"]  # pack shards were written too


# --- flags ---------------------------------------------------------------------------------------


def test_flag_errors_name_the_fix(tmp_path, capsys):
    rows = str(FIXTURES / "bad_inputs" / "tables" / "rows.jsonl")
    base = ["filter", "--input", rows, "--output", str(tmp_path / "o")]
    assert cli.main(base + ["--dask-workers", "2"]) == 2
    assert "--dask-workers only applies to the Dask engine: add --runner dask" in capsys.readouterr().err
    assert cli.main(base + ["--runner", "dask", "--dask-workers", "2", "--dask-address", "tcp://127.0.0.1:1"]) == 2
    assert "drop one of the two" in capsys.readouterr().err
    from engine.conftest import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"
    assert cli.main(base + ["--runner", "dask", "--dask-address", dead]) == 2
    err = capsys.readouterr().err
    assert f"no Dask scheduler answers at {dead}" in err and "dask scheduler --port" in err
    assert cli.main(base + ["--runner", "dask", "--dask-workers", "0"]) == 2
    assert "--dask-workers must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()


def test_local_cluster_runs_and_stops(tmp_path):
    """No address: `--dask-workers 2` starts a local cluster for the run, and nothing of it outlives it."""
    rows = str(FIXTURES / "bad_inputs" / "tables" / "rows.jsonl")
    run("filter", "--input", rows, "--output", str(tmp_path / "direct"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "filter", "--input", rows, "--output", str(tmp_path / "local"),
         "--runner", "dask", "--dask-workers", "2"],
        cwd=str(REPO), env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    seen: set[int] = set()
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            seen |= {c.pid for c in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    out = proc.stdout.read().decode()
    assert proc.returncode == 0, out[-3000:]
    assert len(seen) >= 2  # the local workers were separate processes
    time.sleep(1)
    assert [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    assert_identical(tmp_path / "direct", tmp_path / "local")


# --- a worker dies mid-stage ---------------------------------------------------------------------


def test_worker_sigkill_mid_rewrite_completes_identical_and_resumes_from_cache(dask_cluster, tmp_path):
    """SIGKILL one worker process while rewrite is half done. What happens (measured): the scheduler
    moves the dead worker's tasks to the other worker, its nanny starts a new worker, the stage
    completes with exit 0 and byte-identical output, and the re-run tasks take every answer that
    was already cached from the cache: the server is asked again only for answers in flight."""
    from rewriter.cache import ResponseCache
    from rewriter.standin import StandInServer

    caps = captions(80, start=100)
    inp = rewrite_input(str(tmp_path / "in"), caps)
    flags = ["--model", "rw-test", "--policy", "all", "--batch-size", "8", "--concurrency", "2", "--timeout", "30"]
    with StandInServer(latency_s=0.02) as srv:
        run("rewrite", "--input", inp, "--output", str(tmp_path / "direct"), "--endpoint", srv.base_url,
            "--cache-dir", str(tmp_path / "cache-direct"), *flags)

    cache_dir = tmp_path / "cache"
    with StandInServer(latency_s=0.25) as srv:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "rewrite", "--input", inp, "--output", str(tmp_path / "dask"),
             "--endpoint", srv.base_url, "--cache-dir", str(cache_dir), *flags, *on_dask(dask_cluster)],
            cwd=str(REPO), env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while srv.responses_sent < len(caps) // 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the stage finished before the kill; slow the stand-in down"
        from distributed import Client

        with Client(dask_cluster.address, timeout=30) as client:
            busy = [w for w, tasks in client.processing().items() if tasks]
            pids = client.run(os.getpid)
        victim = pids[busy[0] if busy else sorted(pids)[0]]  # both hold a rewrite partition at this point
        os.kill(victim, signal.SIGKILL)
        n_at_kill = len(srv.seen)
        cache = ResponseCache(str(cache_dir))
        from rewriter import prompts
        from rewriter.cache import cache_key

        params = {"max_tokens": 256, "temperature": 0.0}
        cached_at_kill = {c for c in caps if cache.get(cache_key("rw-test", prompts.PROMPT_VERSION, c, params))}
        out, _ = proc.communicate(timeout=600)
        after_kill = srv.captions_seen()[n_at_kill:]
        asked = collections.Counter(srv.captions_seen())

    assert proc.returncode == 0, out.decode()[-3000:]
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    assert 0 < len(cached_at_kill) < len(caps)
    assert not set(after_kill) & cached_at_kill  # nothing already cached was asked again
    assert set(asked) == set(caps) and max(asked.values()) <= 2  # only in-flight answers were asked twice
    assert_identical(tmp_path / "direct", tmp_path / "dask")
    dask_cluster.wait_for_workers(2)  # the nanny restarted the killed worker


# --- a real model server -------------------------------------------------------------------------


@pytest.mark.vllm
def test_rewrite_against_real_vllm_identical(dask_cluster, tmp_path, sample_dir):
    """The rewrite stage on Dask against a real vLLM server (CPU build, tiny random model made here):
    the same ledger and the same bytes as the DirectRunner's run against the same server."""
    python = os.environ.get("MMCORPUS_VLLM_PYTHON")
    if not python or not os.path.exists(python):
        pytest.fail("MMCORPUS_VLLM_PYTHON must name the vLLM venv's python (`make test` sets it)", pytrace=False)
    from rewriter.serving import ServeConfig, VLLMServer
    from rewriter.tiny import make_tiny_model, read_texts

    model = make_tiny_model(str(tmp_path / "model"), read_texts(str(sample_dir / "cc3m_val_captions_8k.tsv"), 2000))
    cfg = ServeConfig(model=model, served_model_name="rewriter", python=python, max_model_len=512,
                      log_path=str(tmp_path / "vllm.log"))
    inp = rewrite_input(str(tmp_path / "in"), captions(12, start=300))
    flags = ["--model", "rewriter", "--policy", "all", "--max-tokens", "48", "--batch-size", "4", "--concurrency", "2",
             "--timeout", "120"]
    with VLLMServer(cfg) as server:
        run("rewrite", "--input", inp, "--output", str(tmp_path / "direct"), "--endpoint", server.base_url,
            "--cache-dir", str(tmp_path / "cache-direct"), *flags)
        run("rewrite", "--input", inp, "--output", str(tmp_path / "dask"), "--endpoint", server.base_url,
            "--cache-dir", str(tmp_path / "cache-dask"), *flags, *on_dask(dask_cluster))
    ledger = read_table(str(tmp_path / "dask"), "ledger").to_pylist()
    assert sorted(r["key"] for r in ledger) == [f"k{i:04d}" for i in range(12)]
    assert all(r["model"] == "rewriter" for r in ledger)
    assert_identical(tmp_path / "direct", tmp_path / "dask")
