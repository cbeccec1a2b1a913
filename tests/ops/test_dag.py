"""The Airflow DAG, for real: DagBag import, structure, and `airflow dags test` runs (sqlite, offline,
DirectRunner) over the bundled photos, asserting on the files every task wrote and on Airflow's own
records of task states and asset events."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from pipelines import verify
from schemas.manifest import MANIFEST_NAME

pytestmark = pytest.mark.airflow

STAGES = ("filter", "dedup", "rewrite", "pack")


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory, sample_dir) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "MMCORPUS_INPUT": str(sample_dir / "i2d_webdataset"),  # real img2dataset output, bundled
        "MMCORPUS_OUTPUT_ROOT": str(tmp_path_factory.mktemp("airflow_runs")),
        # Shards sized by bytes (the DAG passes --target-shard-bytes; it no longer fixes --num-shards).
        "MMCORPUS_TARGET_SHARD_BYTES": "1MiB",
        "MMCORPUS_SEQ_LEN": "512",
        # Configured but unreachable: the branch must notice, never hang; the run fails unless a
        # fallback is asked for (test_endpoint_down_fails_the_rewrite_and_publishes_no_pack).
        "MMCORPUS_REWRITE_ENDPOINT": "http://127.0.0.1:9/v1",
        "MMCORPUS_PROGRESS": "0",
        # Runner options for every stage pass straight through to Beam (as Dataflow/Flink ones would).
        "MMCORPUS_BEAM_OPTIONS": json.dumps({"direct_running_mode": "in_memory", "direct_num_workers": 1}),
    })
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return env


def _airflow_python(env: dict, code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dagbag_imports_without_errors_and_has_the_stage_chain(airflow_env):
    info = _airflow_python(airflow_env, """
        import json
        from airflow.models import DagBag
        from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
        bag = DagBag(dag_folder=%r)
        dag = bag.dags["mmcorpus_corpus"]
        tasks = {t.task_id: t for t in dag.tasks}
        print(json.dumps({
            "errors": {k: str(v) for k, v in bag.import_errors.items()},
            "dags": sorted(bag.dags),
            "catchup": dag.catchup,
            "schedule": str(dag.schedule),
            "retries": {k: t.retries for k, t in tasks.items()},
            "beam": sorted(k for k, t in tasks.items() if isinstance(t, BeamRunPythonPipelineOperator)),
            "py_files": {k: t.py_file for k, t in tasks.items() if isinstance(t, BeamRunPythonPipelineOperator)},
            "downstream": {k: sorted(t.downstream_task_ids) for k, t in tasks.items()},
            "outlets": {k: [a.name for a in t.outlets] for k, t in tasks.items() if t.outlets},
            "params": sorted(dag.params),
        }))
    """ % str(REPO / "dags"))
    assert info["errors"] == {}
    assert info["dags"] == ["mmcorpus_corpus", "mmcorpus_curriculum"]
    assert info["catchup"] is False and info["schedule"] == "@weekly"
    assert info["beam"] == ["dedup", "filter", "pack", "rewrite_endpoint", "rewrite_offline"]
    assert info["py_files"]["filter"] == str(REPO / "pipelines" / "filter.py")
    assert info["py_files"]["rewrite_offline"] == info["py_files"]["rewrite_endpoint"] == str(REPO / "pipelines" / "rewrite.py")
    assert all(os.path.isfile(p) for p in info["py_files"].values())
    assert info["downstream"]["filter"] == ["dedup"]
    assert info["downstream"]["dedup"] == ["choose_rewrite"]
    assert info["downstream"]["choose_rewrite"] == ["no_rewrite", "rewrite_endpoint", "rewrite_offline"]
    assert info["downstream"]["rewrite_offline"] == info["downstream"]["no_rewrite"] == ["pack"]
    assert info["downstream"]["pack"] == ["verify"]
    assert info["outlets"] == {
        "filter": ["mmcorpus/filter"], "dedup": ["mmcorpus/dedup"], "rewrite_endpoint": ["mmcorpus/rewrite"],
        "rewrite_offline": ["mmcorpus/rewrite"], "pack": ["mmcorpus/pack"], "verify": ["mmcorpus/verified"]}
    assert info["retries"]["filter"] == 2
    assert {"input", "output_root", "runner", "rewrite_endpoint", "stage_profile"} <= set(info["params"])


def _dags_test(env: dict, conf: dict | None = None, check: bool = True) -> str:
    cmd = [sys.executable, "-m", "airflow", "dags", "test", "mmcorpus_corpus"]
    if conf:
        cmd += ["-c", json.dumps(conf)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def _last_run(env: dict, expect: str = "success") -> tuple[str, dict[str, str], list[tuple[str, dict]]]:
    db = sqlite3.connect(os.path.join(env["AIRFLOW_HOME"], "airflow.db"))
    run_id, state = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id='mmcorpus_corpus' ORDER BY id DESC LIMIT 1").fetchone()
    assert state == expect
    states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE run_id=?", (run_id,)).fetchall())
    events = [(name, json.loads(extra)) for name, extra in db.execute(
        "SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
        "WHERE e.source_run_id=? ORDER BY e.id", (run_id,)).fetchall()]
    return run_id, states, events


def test_endpoint_down_fails_the_rewrite_and_publishes_no_pack(airflow_env):
    # The default (no rewrite_fallback): the endpoint is down, so the rewrite task fails with the
    # reason, pack and verify never run, and no rewrite/pack/verified asset event is published.
    env = dict(airflow_env, MMCORPUS_RETRIES="0")  # fail now, not after two 5-minute retries
    log = _dags_test(env, check=False)
    run_id, states, events = _last_run(airflow_env, expect="failed")
    assert states == {"filter": "success", "dedup": "success", "choose_rewrite": "success",
                      "rewrite_endpoint": "failed", "rewrite_offline": "skipped", "no_rewrite": "skipped",
                      "pack": "upstream_failed", "verify": "upstream_failed"}
    assert [n for n, _ in events] == ["mmcorpus/filter", "mmcorpus/dedup"]
    run_dir = os.path.join(airflow_env["MMCORPUS_OUTPUT_ROOT"], "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id))
    assert sorted(os.listdir(run_dir)) == ["dedup", "filter"]
    assert ("http://127.0.0.1:9/v1 did not answer GET /models (URLError) and rewrite_fallback is none: the rewrite "
            "task will fail and nothing will be packed") in log
    assert "--endpoint http://127.0.0.1:9/v1 does not answer (ConnectError)" in log  # the stage's own preflight


def test_dags_test_runs_every_stage_and_writes_outputs(airflow_env, sample_dir):
    # The offline template only when the run asks for it: recorded in the manifest and the asset events.
    log = _dags_test(airflow_env, {"rewrite_fallback": "offline-template"})
    run_id, states, events = _last_run(airflow_env)
    assert states == {"filter": "success", "dedup": "success", "choose_rewrite": "success",
                      "rewrite_offline": "success", "rewrite_endpoint": "skipped", "no_rewrite": "skipped",
                      "pack": "success", "verify": "success"}
    run_dir = os.path.join(airflow_env["MMCORPUS_OUTPUT_ROOT"], "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id))
    assert sorted(os.listdir(run_dir)) == sorted(STAGES + ("stats.png",))
    png = Image.open(os.path.join(run_dir, "stats.png"))
    assert json.loads(png.text["Description"])["panels"] == [
        "caption_words", "languages", "ledger_reasons", "cluster_sizes", "tokens_per_sample", "fill_per_pack",
        "images_per_pack"]
    assert png.size == (1280, 1600)
    for stage in STAGES:
        d = os.path.join(run_dir, stage)
        manifest = json.loads(open(os.path.join(d, MANIFEST_NAME)).read())
        assert manifest["stage"] == stage
        for f in manifest["files"]:
            assert os.path.getsize(os.path.join(d, f["path"])) == f["bytes"]
        ledger_rows = sum(pq.read_metadata(os.path.join(d, f["path"])).num_rows for f in manifest["files"] if f["kind"] == "ledger")
        assert ledger_rows == manifest["counts"]["inputs"]
    # Every record of img2dataset's status files went in, failed downloads as errors; each stage
    # read the previous one's output.
    counts = {s: json.loads(open(os.path.join(run_dir, s, MANIFEST_NAME)).read())["counts"] for s in STAGES}
    status = [st for f in sorted((sample_dir / "i2d_webdataset").glob("*.parquet"))
              for st in pq.read_table(f, columns=["status"]).column("status").to_pylist()]
    assert counts["filter"]["inputs"] == len(status)
    assert counts["filter"]["by_status"]["error"] == sum(st != "success" for st in status) > 0
    assert [counts[s]["inputs"] for s in STAGES[1:]] == [counts[s]["outputs"] for s in STAGES[:-1]]
    rewrite_cfg = json.loads(open(os.path.join(run_dir, "rewrite", MANIFEST_NAME)).read())["config"]
    fallback_reason = ("http://127.0.0.1:9/v1 did not answer GET /models (URLError); "
                       "rewrite_fallback=offline-template")
    assert rewrite_cfg["rewrite"]["backend"] == "offline-template"
    assert rewrite_cfg["rewrite_fallback"] == {"backend": "offline-template", "reason": fallback_reason}
    assert verify.main([os.path.join(run_dir, s) for s in STAGES] + ["--json"]) == 0
    # The Beam operator passed the runner and our flags straight through.
    commands = [ln.split("Running command: ", 1)[1] for ln in log.splitlines() if "Running command: " in ln]
    assert [c.split()[1].rsplit("/", 1)[-1] for c in commands] == ["filter.py", "dedup.py", "rewrite.py", "pack.py"]
    for c in commands:
        assert c.split()[2] == "--runner=DirectRunner"
        assert "--direct_running_mode=in_memory" in c.split() and "--direct_num_workers=1" in c.split()
    pack_cmd = commands[-1].split()
    assert f"--output={run_dir}/pack" in pack_cmd and f"--input={run_dir}/rewrite" in pack_cmd
    assert {"--stage=2", "--seq_len=512", "--format=parquet", "--target_shard_bytes=1MiB"} <= set(pack_cmd)
    assert not any("num_shards" in c for c in commands)
    # The filter read the bundled webdataset (tars + status parquets): one shard per MiB of it.
    i2d_bytes = sum(p.stat().st_size for p in (sample_dir / "i2d_webdataset").iterdir() if p.suffix in (".tar", ".parquet"))
    filter_cfg = json.loads(open(os.path.join(run_dir, "filter", MANIFEST_NAME)).read())["config"]
    assert filter_cfg["num_shards"] == -(-i2d_bytes // 2**20) > 1
    # Asset events name this run's directories, so downstream DAGs can find them.
    assert [n for n, _ in events] == ["mmcorpus/filter", "mmcorpus/dedup", "mmcorpus/rewrite", "mmcorpus/pack", "mmcorpus/verified"]
    assert [e["path"] for _, e in events[:4]] == [os.path.join(run_dir, s) for s in STAGES]
    assert events[4][1]["stages"]["pack"]["outputs"] == counts["pack"]["outputs"]
    decision = {"rewrite": "offline-template", "rewrite_fallback_reason": fallback_reason}
    assert "rewrite" not in events[0][1] and "rewrite" not in events[1][1]
    assert [{k: e[k] for k in decision} for _, e in events[2:]] == [decision] * 3


def test_dags_test_without_rewrite_packs_the_dedup_output(airflow_env):
    # Precedence: run params > Airflow Variables > environment. pack_format comes from a Variable,
    # seq_len from the run's params (over MMCORPUS_SEQ_LEN=512), rewrite_fallback from the params.
    airflow = [sys.executable, "-m", "airflow", "variables"]
    subprocess.run(airflow + ["set", "mmcorpus_pack_format", "webdataset"], env=airflow_env, check=True, capture_output=True)
    try:
        _dags_test(airflow_env, {"rewrite_fallback": "skip", "seq_len": "1024"})
    finally:
        subprocess.run(airflow + ["delete", "mmcorpus_pack_format"], env=airflow_env, check=True, capture_output=True)
    run_id, states, events = _last_run(airflow_env)
    assert (states["rewrite_offline"], states["rewrite_endpoint"], states["no_rewrite"]) == ("skipped", "skipped", "success")
    assert states["pack"] == states["verify"] == "success"
    run_dir = os.path.join(airflow_env["MMCORPUS_OUTPUT_ROOT"], "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id))
    assert sorted(os.listdir(run_dir)) == ["dedup", "filter", "pack", "stats.png"]
    pack = json.loads(open(os.path.join(run_dir, "pack", MANIFEST_NAME)).read())
    assert pack["input"]["stage"] == "dedup"
    assert any(f["path"].endswith(".tar") for f in pack["files"])
    assert not any(f["path"].endswith(".parquet") and "packs-" in f["path"] for f in pack["files"])
    index = json.loads(open(os.path.join(run_dir, "pack", "data", "index.json")).read())
    assert (index["seq_len"], index["pack_format"]) == (1024, "webdataset")
    assert "mmcorpus/rewrite" not in [n for n, _ in events]
    pack_event = dict(events)["mmcorpus/pack"]
    assert (pack_event["rewrite"], pack_event["rewrite_fallback_reason"]) == (
        "skip", "http://127.0.0.1:9/v1 did not answer GET /models (URLError); rewrite_fallback=skip")
