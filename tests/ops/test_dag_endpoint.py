"""The DAG's rewrite branch against a real model endpoint: a local vLLM server (CPU build, tiny random
model made here) stands where the GPU fleet would be; `choose_rewrite` finds it healthy and the run
rewrites through it instead of the offline template."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from schemas.manifest import MANIFEST_NAME

pytestmark = [pytest.mark.airflow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def vllm_endpoint(tmp_path_factory, sample_dir):
    python = os.environ.get("MMCORPUS_VLLM_PYTHON")
    if not python or not os.path.exists(python):
        pytest.fail("MMCORPUS_VLLM_PYTHON must name the vLLM venv's python (`make test` sets it)", pytrace=False)
    from rewriter.serving import ServeConfig, VLLMServer
    from rewriter.tiny import make_tiny_model, read_texts

    work = tmp_path_factory.mktemp("endpoint")
    model = make_tiny_model(str(work / "model"), read_texts(str(sample_dir / "cc3m_val_captions_8k.tsv"), 2000))
    cfg = ServeConfig(model=model, served_model_name="rewriter", python=python, max_model_len=512,
                      log_path=str(work / "vllm.log"))
    with VLLMServer(cfg) as server:
        yield server.base_url, model


def test_healthy_endpoint_takes_the_rewrite_endpoint_branch(vllm_endpoint, tmp_path, sample_dir):
    base_url, model_dir = vllm_endpoint
    home, runs = tmp_path / "airflow_home", tmp_path / "runs"
    env = dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"), MMCORPUS_INPUT=str(sample_dir / "i2d_webdataset"),
               MMCORPUS_OUTPUT_ROOT=str(runs), MMCORPUS_NUM_SHARDS="2", MMCORPUS_PROGRESS="0")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    conf = {"rewrite_endpoint": base_url, "rewrite_model": "rewriter"}
    out = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "mmcorpus_corpus", "-c", json.dumps(conf)],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    import sqlite3

    db = sqlite3.connect(str(home / "airflow.db"))
    run_id, state = db.execute("SELECT run_id, state FROM dag_run ORDER BY id DESC LIMIT 1").fetchone()
    states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE run_id=?", (run_id,)).fetchall())
    assert state == "success"
    assert (states["rewrite_endpoint"], states["rewrite_offline"], states["no_rewrite"]) == ("success", "skipped", "skipped")
    (run_dir,) = [runs / d for d in os.listdir(runs)]
    rewrite = json.loads((run_dir / "rewrite" / MANIFEST_NAME).read_text())
    assert (rewrite["config"]["rewrite"]["backend"], rewrite["config"]["rewrite"]["model"]) == ("openai", "rewriter")
    # The served weights' identity, read from vLLM's GET /v1/models (`root`), keys config and cache.
    assert rewrite["config"]["rewrite"]["model_revision"] == model_dir
    assert "rewrite_fallback" not in rewrite["config"]
    events = dict(db.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                             "WHERE e.source_run_id=?", (run_id,)).fetchall())
    assert [json.loads(events[n])["rewrite"] for n in ("mmcorpus/rewrite", "mmcorpus/pack", "mmcorpus/verified")] == [
        "endpoint"] * 3
    ledger = [r for f in sorted((run_dir / "rewrite" / "ledger").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(ledger) == rewrite["counts"]["inputs"] > 0
    # Every record the policy selected went to the served model: its ledger row names it, whatever
    # the (random) model answered; the others are kept unchanged as rewrite_skipped.
    asked = [r for r in ledger if r["reason"] != "rewrite_skipped"]
    assert asked and all(r["model"] == "rewriter" for r in asked)
