"""Airflow 3 DAG ``mmcorpus_corpus``: filter → dedup → rewrite → pack → verify on a schedule, each
stage a Beam pipeline run by the Beam provider's ``BeamRunPythonPipelineOperator``.

Configuration, highest precedence first: the run's params (``airflow dags trigger -c '{...}'`` or the
UI form), Airflow Variables (``mmcorpus_<name>``), environment variables of the scheduler/DAG
processor (``MMCORPUS_<NAME>``), the defaults below. Names: ``input``, ``input_format``,
``output_root``, ``runner``, ``rewrite_endpoint``, ``rewrite_model``, ``rewrite_fallback``,
``stage_profile``, ``seq_len``, ``pack_format``, ``target_shard_bytes`` (empty: each stage's own
default, 512MiB). Runner options that hold for every
stage (``--project``, ``--region``, ``--temp_location``, ``--setup_file``, ``--flink_master`` ...) come
from ``MMCORPUS_BEAM_OPTIONS``, a JSON object, and go to Beam unchanged.

Each run writes below ``<output_root>/<run id>/<stage>``. Every stage task declares its output as an
Asset (``mmcorpus/<stage>``), and its asset event's ``extra`` carries that run's directory, so other
DAGs can be scheduled on, e.g., ``Asset("mmcorpus/pack")`` and read where the new shards are.

The rewrite stage runs against the model endpoint. When it is not configured or does not answer
``GET <endpoint>/models``, the run fails loudly by default (``rewrite_fallback`` = ``none``): the
``rewrite_endpoint`` task runs anyway, its preflight fails with the reason, and ``pack`` and
``verify`` never run, so no pack asset is published from a corpus that was never rewritten. A
fallback is an explicit choice (``rewrite_fallback`` = ``offline-template``, the deterministic
dry-run rewriter, or ``skip``, pack the dedup output); when taken, it is written into the rewrite
manifest's config (``rewrite_fallback``) and into the ``rewrite``, ``pack`` and ``verified`` asset
events (``extra["rewrite"]``, ``extra["rewrite_fallback_reason"]``).
``verify`` checks every stage output of the run and draws ``<run dir>/stats.png``.
``MMCORPUS_RETRIES`` (default 2) sets every task's retries.
See docs/operations.md.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, Param, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this file
from mmcorpus_common import (  # noqa: E402
    BEAM_OPTIONS, PIPELINES, PY_INTERPRETER, REPO, SHARED_DEFAULTS, asset_root, choose_rewrite_branch,
    drop_empty_options, endpoint_healthy, endpoint_problem, rewrite_decision, safe_run_dir, shared_params,
)

__all__ = ["dag", "endpoint_healthy", "endpoint_problem", "safe_run_dir"]
STAGES = ("filter", "dedup", "rewrite", "pack")

# Defaults: environment of the scheduler / DAG processor, then these.
DEFAULTS = {
    # Default: the bundled real img2dataset webdataset output (photos + two failed downloads).
    "input": os.environ.get("MMCORPUS_INPUT", str(REPO / "data" / "sample" / "i2d_webdataset")),
    "input_format": os.environ.get("MMCORPUS_INPUT_FORMAT", "auto"),
    "stage_profile": os.environ.get("MMCORPUS_STAGE_PROFILE", "2"),
    **SHARED_DEFAULTS,
}
SCHEDULE = os.environ.get("MMCORPUS_SCHEDULE", "@weekly")
RETRIES = int(os.environ.get("MMCORPUS_RETRIES", "2"))
# What choose_rewrite decided, for the stage options and the asset events of the tasks after it.
REWRITE_MODE = "{{ ti.xcom_pull(task_ids='choose_rewrite', key='rewrite') }}"


def setting(name: str) -> str:
    """Template for one setting: the run's param, else Variable ``mmcorpus_<name>``, else the default."""
    return "{{ params.%s or var.value.get('mmcorpus_%s', %r) }}" % (name, name, DEFAULTS[name])


RUN_DIR = "{{ (%s).rstrip('/') }}/{{ safe_run_dir(run_id) }}" % (
    "params.output_root or var.value.get('mmcorpus_output_root', %r)" % DEFAULTS["output_root"]
)


def stage_dir(stage: str) -> str:
    return f"{RUN_DIR}/{stage}"


# Stage outputs as Assets: one per stage; each event's extra holds the run's directory.
ROOT_URI = asset_root(DEFAULTS["output_root"])
ASSETS = {s: Asset(name=f"mmcorpus/{s}", uri=f"{ROOT_URI}/{s}", group="mmcorpus") for s in STAGES}
VERIFIED = Asset(name="mmcorpus/verified", uri=f"{ROOT_URI}/verified", group="mmcorpus")


class StageOperator(BeamRunPythonPipelineOperator):
    """``BeamRunPythonPipelineOperator`` for one mmcorpus stage file that records the run's output
    directory in its Asset event (``extra={"path", "run_id"}``), and for the stages after the rewrite
    decision, how the captions were rewritten (``rewrite``: ``endpoint``, ``offline-template`` or
    ``skip``; ``rewrite_fallback_reason`` when a fallback was taken)."""

    def __init__(self, *, stage: str, output_dir: str, **kwargs):
        super().__init__(outlets=[ASSETS[stage]], **kwargs)
        self.stage = stage
        self.output_dir = output_dir

    template_fields = tuple(BeamRunPythonPipelineOperator.template_fields) + ("output_dir",)

    def execute(self, context):
        drop_empty_options(self.pipeline_options)
        result = super().execute(context)
        extra = {"path": self.output_dir, "run_id": context["run_id"]}
        if self.stage in ("rewrite", "pack"):
            extra.update(rewrite_decision(context["ti"]))
        context["outlet_events"][ASSETS[self.stage]].extra = extra
        return result


def beam_stage(stage: str, options: dict, **kwargs) -> StageOperator:
    """One stage task: ``python pipelines/<stage>.py --output=<run dir>/<stage> <options>``."""
    return StageOperator(
        task_id=kwargs.pop("task_id", stage),
        stage=stage,
        output_dir=stage_dir(stage),
        py_file=str(PIPELINES / f"{stage}.py"),
        py_interpreter=PY_INTERPRETER,
        runner=setting("runner"),
        default_pipeline_options=dict(BEAM_OPTIONS),
        pipeline_options={"output": stage_dir(stage), "target_shard_bytes": setting("target_shard_bytes"), **options},
        **kwargs,
    )


with DAG(
    dag_id="mmcorpus_corpus",
    description="Build a MiniCPM-V style corpus: filter, dedup, rewrite, pack, verify (Apache Beam)",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": RETRIES, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True},
    user_defined_macros={"safe_run_dir": safe_run_dir},
    params={
        "input": Param("", type="string", description="input file/dir/glob (img2dataset output or a metadata table)"),
        "input_format": Param("", type="string", description="auto | webdataset | i2d-parquet | table"),
        **shared_params("output_root", "runner", "rewrite_endpoint", "rewrite_model", "rewrite_fallback"),
        "stage_profile": Param("", type="string", description="pack profile: 1 (224px), 2 (448px), 3 (slicing)"),
        **shared_params("seq_len", "pack_format", "target_shard_bytes"),
    },
    tags=["mmcorpus", "beam"],
    doc_md=__doc__,
) as dag:
    filter_ = beam_stage("filter", {"input": setting("input"), "input_format": setting("input_format")})
    dedup = beam_stage("dedup", {"input": stage_dir("filter")})

    @task.branch(retries=0)
    def choose_rewrite(params=None, ti=None) -> str:
        """Rewrite against the model endpoint when it is configured and healthy; otherwise the
        fallback the run asked for, or (``none``, the default) the endpoint task anyway, which fails."""
        import logging

        from airflow.sdk import Variable

        def get(name: str) -> str:
            return (params or {}).get(name) or Variable.get(f"mmcorpus_{name}", default=DEFAULTS[name])

        return choose_rewrite_branch(get, ti, logging.getLogger("mmcorpus.dag"))

    choose = choose_rewrite()
    rewrite_endpoint = beam_stage(
        "rewrite",
        {"input": stage_dir("dedup"), "endpoint": setting("rewrite_endpoint"), "model": setting("rewrite_model")},
        task_id="rewrite_endpoint",
    )
    rewrite_offline = beam_stage(
        "rewrite",
        {"input": stage_dir("dedup"), "backend": "offline-template",
         "fallback_reason": "{{ ti.xcom_pull(task_ids='choose_rewrite', key='rewrite_fallback_reason') }}"},
        task_id="rewrite_offline",
    )
    no_rewrite = EmptyOperator(task_id="no_rewrite")
    pack = beam_stage(
        "pack",
        {
            "input": RUN_DIR + "/{{ ti.xcom_pull(task_ids='choose_rewrite', key='pack_input') }}",
            "stage": setting("stage_profile"),
            "seq_len": setting("seq_len"),
            "format": setting("pack_format"),
        },
        trigger_rule="none_failed_min_one_success",
    )

    @task(outlets=[VERIFIED], trigger_rule="all_success")
    def verify(run_dir: str, outlet_events=None) -> dict:
        """``mmcorpus verify`` on every stage output of the run (fails the run when one is violated),
        then ``mmcorpus stats`` of the run as ``<run dir>/stats.png``."""
        from pipelines import verify as verify_cmd
        from pipelines.inspection import describe_run

        run = describe_run(run_dir)
        dirs = [s["dir"] for s in run["stages"]]
        if not dirs:
            raise RuntimeError(f"no stage outputs under {run_dir}")
        code = verify_cmd.main(dirs)
        if code != 0:
            raise RuntimeError(f"mmcorpus verify failed (exit {code}) for {dirs}")
        summary = {s["stage"]: {"inputs": s["inputs"], "outputs": s["outputs"]} for s in run["stages"]}
        from airflow.sdk import get_current_context

        decision = rewrite_decision(get_current_context()["ti"])
        # One picture per run for people: `mmcorpus stats <run> --plot <run>/stats.png`.
        from pipelines import stats as stats_cmd

        plot = f"{run_dir.rstrip('/')}/stats.png"
        panels = stats_cmd.plot(stats_cmd.collect(run_dir), plot)
        outlet_events[VERIFIED].extra = {"path": run_dir, "stages": summary, "stats_png": plot, **decision}
        return {"run_dir": run_dir, "stages": summary, "stats_png": plot, "panels": panels}

    verified = verify(RUN_DIR)

    filter_ >> dedup >> choose >> [rewrite_endpoint, rewrite_offline, no_rewrite] >> pack >> verified
