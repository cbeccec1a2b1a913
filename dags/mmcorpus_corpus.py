"""Airflow 3 DAG ``mmcorpus_corpus``: filter → dedup → rewrite → pack → verify on a schedule, each
stage a Beam pipeline run by the Beam provider's ``BeamRunPythonPipelineOperator``.

Configuration, highest precedence first: the run's params (``airflow dags trigger -c '{...}'`` or the
UI form), Airflow Variables (``mmcorpus_<name>``), environment variables of the scheduler/DAG
processor (``MMCORPUS_<NAME>``), the defaults below. Names: ``input``, ``input_format``,
``output_root``, ``runner``, ``rewrite_endpoint``, ``rewrite_model``, ``rewrite_fallback``,
``stage_profile``, ``seq_len``, ``pack_format``, ``num_shards``. Runner options that hold for every
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

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, Param, task

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"
STAGES = ("filter", "dedup", "rewrite", "pack")

# Defaults: environment of the scheduler / DAG processor, then these.
DEFAULTS = {
    # Default: the bundled real img2dataset webdataset output (photos + two failed downloads).
    "input": os.environ.get("MMCORPUS_INPUT", str(REPO / "data" / "sample" / "i2d_webdataset")),
    "input_format": os.environ.get("MMCORPUS_INPUT_FORMAT", "auto"),
    "output_root": os.environ.get("MMCORPUS_OUTPUT_ROOT", str(REPO / "build" / "airflow-runs")),
    "runner": os.environ.get("MMCORPUS_RUNNER", "DirectRunner"),
    "rewrite_endpoint": os.environ.get("MMCORPUS_REWRITE_ENDPOINT", ""),
    "rewrite_model": os.environ.get("MMCORPUS_REWRITE_MODEL", "rewriter"),
    # No silent fallback: without a healthy endpoint the run fails unless a fallback is asked for.
    "rewrite_fallback": os.environ.get("MMCORPUS_REWRITE_FALLBACK", "none"),
    "stage_profile": os.environ.get("MMCORPUS_STAGE_PROFILE", "2"),
    "seq_len": os.environ.get("MMCORPUS_SEQ_LEN", "2048"),
    "pack_format": os.environ.get("MMCORPUS_PACK_FORMAT", "parquet"),
    "num_shards": os.environ.get("MMCORPUS_NUM_SHARDS", "8"),
}
SCHEDULE = os.environ.get("MMCORPUS_SCHEDULE", "@weekly")
RETRIES = int(os.environ.get("MMCORPUS_RETRIES", "2"))
FALLBACKS = ("none", "offline-template", "skip")
# What choose_rewrite decided, for the stage options and the asset events of the tasks after it.
REWRITE_MODE = "{{ ti.xcom_pull(task_ids='choose_rewrite', key='rewrite') }}"
# The interpreter that runs the stage files: this environment's, where mmcorpus is installed.
PY_INTERPRETER = os.environ.get("MMCORPUS_PYTHON", sys.executable)
# Options for every stage, passed straight to Beam (e.g. Dataflow project/region/temp_location).
BEAM_OPTIONS: dict = json.loads(os.environ.get("MMCORPUS_BEAM_OPTIONS", "{}") or "{}")


def setting(name: str) -> str:
    """Template for one setting: the run's param, else Variable ``mmcorpus_<name>``, else the default."""
    return "{{ params.%s or var.value.get('mmcorpus_%s', %r) }}" % (name, name, DEFAULTS[name])


def safe_run_dir(run_id: str) -> str:
    """Run id → a directory name that is safe on local disks and object stores (no ':' or '+')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


RUN_DIR = "{{ (%s).rstrip('/') }}/{{ safe_run_dir(run_id) }}" % (
    "params.output_root or var.value.get('mmcorpus_output_root', %r)" % DEFAULTS["output_root"]
)


def stage_dir(stage: str) -> str:
    return f"{RUN_DIR}/{stage}"


def _asset_root() -> str:
    root = DEFAULTS["output_root"].rstrip("/")
    return root if "://" in root else "file://" + os.path.abspath(root)


# Stage outputs as Assets: one per stage; each event's extra holds the run's directory.
ASSETS = {s: Asset(name=f"mmcorpus/{s}", uri=f"{_asset_root()}/{s}", group="mmcorpus") for s in STAGES}
VERIFIED = Asset(name="mmcorpus/verified", uri=f"{_asset_root()}/verified", group="mmcorpus")


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
        result = super().execute(context)
        extra = {"path": self.output_dir, "run_id": context["run_id"]}
        if self.stage in ("rewrite", "pack"):
            extra.update(rewrite_decision(context["ti"]))
        context["outlet_events"][ASSETS[self.stage]].extra = extra
        return result


def rewrite_decision(ti) -> dict:
    """``{"rewrite": mode}`` plus ``rewrite_fallback_reason`` when a fallback was taken (from XCom)."""
    mode = ti.xcom_pull(task_ids="choose_rewrite", key="rewrite")
    out = {"rewrite": mode}
    why = ti.xcom_pull(task_ids="choose_rewrite", key="rewrite_fallback_reason")
    if why:
        out["rewrite_fallback_reason"] = why
    return out


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
        pipeline_options={"output": stage_dir(stage), "num_shards": setting("num_shards"), **options},
        **kwargs,
    )


def endpoint_problem(endpoint: str, timeout: float = 5.0) -> str | None:
    """None when an OpenAI-compatible server answers ``GET <endpoint>/models`` with 200, else why not
    (the URL without credentials or query, and the error type or status; never a response body)."""
    if not endpoint:
        return "no rewrite_endpoint configured"
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(endpoint)
    shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
    try:
        with urllib.request.urlopen(endpoint.rstrip("/") + "/models", timeout=timeout) as r:
            return None if r.status == 200 else f"{shown} answered GET /models with HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"{shown} answered GET /models with HTTP {e.code}"
    except Exception as e:  # unreachable, refused, timed out: no GPU endpoint for this run
        return f"{shown} did not answer GET /models ({type(e).__name__})"


def endpoint_healthy(endpoint: str, timeout: float = 5.0) -> bool:
    """True when an OpenAI-compatible server answers ``GET <endpoint>/models`` with 200."""
    return endpoint_problem(endpoint, timeout) is None


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
        "output_root": Param("", type="string", description="runs go to <output_root>/<run id>/<stage>"),
        "runner": Param("", type="string", description="DirectRunner | DataflowRunner | FlinkRunner | SparkRunner"),
        "rewrite_endpoint": Param("", type="string", description="OpenAI-compatible base URL, e.g. http://gpu:8000/v1"),
        "rewrite_model": Param("", type="string", description="served model name"),
        "rewrite_fallback": Param("", type="string", description="when the endpoint is down or not configured: "
                                  "none (default: the rewrite task fails, nothing is packed) | offline-template | skip"),
        "stage_profile": Param("", type="string", description="pack profile: 1 (224px), 2 (448px), 3 (slicing)"),
        "seq_len": Param("", type="string", description="packed sequence length"),
        "pack_format": Param("", type="string", description="parquet | webdataset"),
        "num_shards": Param("", type="string", description="data/ledger shards per stage"),
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

        fallback = get("rewrite_fallback") or "none"
        if fallback not in FALLBACKS:
            raise ValueError(f"rewrite_fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
        problem = endpoint_problem(get("rewrite_endpoint"))
        if problem is None or fallback == "none":
            if problem is not None:
                logging.getLogger("mmcorpus.dag").error(
                    "%s and rewrite_fallback is none: the rewrite task will fail and nothing will be packed; "
                    "fix the endpoint, or rerun with rewrite_fallback=offline-template or skip", problem)
            ti.xcom_push(key="pack_input", value="rewrite")
            ti.xcom_push(key="rewrite", value="endpoint")
            return "rewrite_endpoint"
        reason = f"{problem}; rewrite_fallback={fallback}"
        logging.getLogger("mmcorpus.dag").warning("rewrite fallback: %s", reason)
        ti.xcom_push(key="rewrite", value=fallback)
        ti.xcom_push(key="rewrite_fallback_reason", value=reason)
        if fallback == "skip":
            ti.xcom_push(key="pack_input", value="dedup")
            return "no_rewrite"
        ti.xcom_push(key="pack_input", value="rewrite")
        return "rewrite_offline"

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
