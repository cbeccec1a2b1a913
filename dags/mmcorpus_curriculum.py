"""Airflow 3 DAG ``mmcorpus_curriculum``: one run builds a whole three-stage MiniCPM-V curriculum from a
list of sources, each stage a Beam pipeline run by the Beam provider's ``BeamRunPythonPipelineOperator``::

    plan → filter (every source) → dedup (across sources) → choose_rewrite → rewrite ─┐
    plan → synthdoc → ocr ──────────────────────────────────────────────────────────┐ │
      select1 (stage 1) ─→ select2 (stage 2, vs select1) ─→ select3 (stage 3, vs select2, + ocr)
        pack1 --stage 1        pack2 --stage 2                 pack3 --stage 3
      → verify: every output checked, then the assets mmcorpus/curriculum/stage1..3 (one per pack)

Sources: the run's ``sources`` param, ``{"NAME": {"path": ..., "format", "license", "caption_col",
"url_col", "key_col", "header"}}`` (relative paths from the repository root), else the TOML file of
``sources_config`` (``[sources.NAME]`` tables, paths relative to the file; default: the bundled
samples, ``data/mix/demo_sources.toml``). Their order is dedup's ``source_priority``. The mixture
of each stage is ``mix_config`` (default ``data/mix/demo_mix.toml``, see docs/selection.md); the DAG
points stage 2's ``earlier`` at this run's stage-1 selection and stage 3's at its stage-2 one, and
``stage2_overlap`` (``disjoint`` | ``allow``) overrides stage 2's policy. Stage 3 reads a second
source, ``synthdoc``: ``ocr_pages`` synthetic document pages run through the OCR stage.

Other settings, as in ``mmcorpus_corpus`` (run params > Variables ``mmcorpus_<name>`` > environment
``MMCORPUS_<NAME>`` > defaults): ``output_root``, ``runner``, ``rewrite_endpoint``, ``rewrite_model``,
``rewrite_fallback`` (``none`` fails the run when the endpoint is down), ``seq_len``,
``pack_format``, ``target_shard_bytes`` (empty: the stages' own default), ``ocr_pages``. Runs write
``<output_root>/<run id>/<stage>``; see docs/operations.md.
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
    drop_empty_options, rewrite_decision, safe_run_dir, shared_params,
)

STAGES = (1, 2, 3)
OCR_SOURCE = "synthdoc"  # stage 3's OCR source name, as the mixture's stage-3 weights name it

DEFAULTS = {
    "sources_config": os.environ.get("MMCORPUS_SOURCES_CONFIG", str(REPO / "data" / "mix" / "demo_sources.toml")),
    "mix_config": os.environ.get("MMCORPUS_MIX_CONFIG", str(REPO / "data" / "mix" / "demo_mix.toml")),
    "stage2_overlap": os.environ.get("MMCORPUS_STAGE2_OVERLAP", ""),
    **SHARED_DEFAULTS,
    "ocr_pages": os.environ.get("MMCORPUS_OCR_PAGES", "4"),
}
SCHEDULE = os.environ.get("MMCORPUS_CURRICULUM_SCHEDULE") or None  # default: triggered runs only
RETRIES = int(os.environ.get("MMCORPUS_RETRIES", "2"))


def setting(name: str) -> str:
    """Template for one setting: the run's param, else Variable ``mmcorpus_<name>``, else the default."""
    return "{{ params.%s or var.value.get('mmcorpus_%s', %r) }}" % (name, name, DEFAULTS[name])


RUN_DIR = "{{ (%s).rstrip('/') }}/{{ safe_run_dir(run_id) }}" % (
    "params.output_root or var.value.get('mmcorpus_output_root', %r)" % DEFAULTS["output_root"]
)
POOL_DIR = RUN_DIR + "/{{ ti.xcom_pull(task_ids='choose_rewrite', key='pack_input') }}"


def stage_dir(name: str) -> str:
    return f"{RUN_DIR}/{name}"


ROOT_URI = asset_root(DEFAULTS["output_root"])
# One asset per pack output; verify publishes the three events once every output of the run holds.
CURRICULUM = {n: Asset(name=f"mmcorpus/curriculum/stage{n}", uri=f"{ROOT_URI}/curriculum/stage{n}", group="mmcorpus")
              for n in STAGES}


class CurriculumStageOperator(BeamRunPythonPipelineOperator):
    """``BeamRunPythonPipelineOperator`` for one stage file whose ``--config`` and ``--input`` list come
    from the ``plan`` task: ``config_key`` names the TOML document in plan's XCom (written to a local
    file on the worker that runs the task, so no shared disk is needed) and ``inputs_key`` the list
    of ``--input`` values; a templated list in ``pipeline_options["input"]`` is passed as repeated
    ``--input`` flags too."""

    template_fields = tuple(BeamRunPythonPipelineOperator.template_fields)

    def __init__(self, *, config_key: str | None = None, inputs_key: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config_key = config_key
        self.inputs_key = inputs_key

    def execute(self, context):
        import tempfile

        from pipelines.curriculum import write_toml

        ti = context["ti"]
        drop_empty_options(self.pipeline_options)
        if self.inputs_key:
            self.pipeline_options["input"] = ti.xcom_pull(task_ids="plan", key=self.inputs_key)
        if self.config_key:
            doc = ti.xcom_pull(task_ids="plan", key=self.config_key)
            where = os.path.join(tempfile.gettempdir(), "mmcorpus-curriculum", safe_run_dir(context["run_id"]))
            self.pipeline_options["config"] = write_toml(doc, os.path.join(where, f"{self.task_id}.toml"))
        return super().execute(context)


def beam_stage(task_id: str, stage: str, options: dict, **kwargs) -> CurriculumStageOperator:
    """One stage task: ``python pipelines/<stage>.py --output=<run dir>/<task_id> <options>``."""
    return CurriculumStageOperator(
        task_id=task_id,
        py_file=str(PIPELINES / f"{stage}.py"),
        py_interpreter=PY_INTERPRETER,
        runner=setting("runner"),
        default_pipeline_options=dict(BEAM_OPTIONS),
        pipeline_options={"output": stage_dir(task_id), "target_shard_bytes": setting("target_shard_bytes"), **options},
        **kwargs,
    )


def _get(params, name: str) -> str:
    from airflow.sdk import Variable

    value = (params or {}).get(name)
    return value if value not in (None, "") else Variable.get(f"mmcorpus_{name}", default=DEFAULTS[name])


with DAG(
    dag_id="mmcorpus_curriculum",
    description="Build a three-stage MiniCPM-V curriculum from many sources: filter, dedup, rewrite, OCR, "
                "select x3, pack x3 (Apache Beam)",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": RETRIES, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True},
    user_defined_macros={"safe_run_dir": safe_run_dir},
    params={
        "sources": Param(None, type=["null", "object"], description='{"NAME": {"path": ..., "format": ..., '
                         '"license": ..., "caption_col": ..., "url_col": ..., "header": ...}, ...}; order = dedup '
                         "priority; empty: sources_config"),
        "sources_config": Param("", type="string", description="TOML file of [sources.NAME] tables (path, format, "
                                "license, columns); default: the bundled samples"),
        "mix_config": Param("", type="string", description="TOML file of [select] / [select.stageN] tables"),
        "stage2_overlap": Param("", type="string", description="disjoint | allow (default: the mix config's, "
                                "else disjoint)"),
        **shared_params("output_root", "runner", "rewrite_endpoint", "rewrite_model", "rewrite_fallback", "seq_len",
                        "pack_format", "target_shard_bytes"),
        "ocr_pages": Param("", type="string", description="synthetic document pages OCR'd for stage 3"),
    },
    tags=["mmcorpus", "beam", "curriculum"],
    doc_md=__doc__,
) as dag:

    @task(retries=0)
    def plan(params=None, run_id=None, ti=None) -> dict:
        """Resolve the sources and the mixture before any work; a bad list or config fails the run here,
        naming the key. XCom: ``filter_inputs``, ``stage_config`` (filter/dedup), ``mix`` (select)."""
        import tomllib

        from pipelines import curriculum
        from schemas.errors import UserError
        from transforms.selection import load_select_config

        if (params or {}).get("sources"):
            sources = curriculum.load_sources(params["sources"], str(REPO), "param sources")
        else:
            sources = curriculum.load_sources_file(_get(params, "sources_config"))
        if OCR_SOURCE in {s["name"] for s in sources}:
            raise UserError(f"source name {OCR_SOURCE!r} is reserved for stage 3's OCR data")
        mix_path = _get(params, "mix_config")
        try:
            with open(mix_path, "rb") as f:
                mix_doc = tomllib.load(f)
        except (FileNotFoundError, tomllib.TOMLDecodeError) as e:
            raise UserError(f"mix_config {mix_path}: {e}") from None
        run_dir = f"{_get(params, 'output_root').rstrip('/')}/{safe_run_dir(run_id)}"
        mix = curriculum.run_mix(mix_doc, {2: f"{run_dir}/select1", 3: f"{run_dir}/select2"},
                                 _get(params, "stage2_overlap") or None)
        for n in STAGES:  # the select commands check again, with the data; this catches typos now
            load_select_config(mix, n, where=mix_path)
        ti.xcom_push(key="filter_inputs", value=curriculum.filter_inputs(sources))
        ti.xcom_push(key="stage_config", value=curriculum.stage_config(sources))
        ti.xcom_push(key="mix", value=mix)
        return {"run_dir": run_dir, "sources": [s["name"] for s in sources], "mix_config": mix_path}

    planned = plan()
    filter_ = beam_stage("filter", "filter", {}, inputs_key="filter_inputs", config_key="stage_config")
    dedup = beam_stage("dedup", "dedup", {"input": stage_dir("filter")}, config_key="stage_config")

    @task.branch(retries=0)
    def choose_rewrite(params=None, ti=None) -> str:
        """Rewrite against the model endpoint when it is configured and healthy; otherwise the
        fallback the run asked for, or (``none``, the default) the endpoint task anyway, which fails."""
        import logging

        return choose_rewrite_branch(lambda name: _get(params, name), ti, logging.getLogger("mmcorpus.dag"))

    choose = choose_rewrite()
    rewrite_endpoint = beam_stage(
        "rewrite_endpoint", "rewrite",
        {"input": stage_dir("dedup"), "endpoint": setting("rewrite_endpoint"), "model": setting("rewrite_model")},
    )
    rewrite_endpoint.pipeline_options["output"] = stage_dir("rewrite")
    rewrite_offline = beam_stage(
        "rewrite_offline", "rewrite",
        {"input": stage_dir("dedup"), "backend": "offline-template",
         "fallback_reason": "{{ ti.xcom_pull(task_ids='choose_rewrite', key='rewrite_fallback_reason') }}"},
    )
    rewrite_offline.pipeline_options["output"] = stage_dir("rewrite")
    no_rewrite = EmptyOperator(task_id="no_rewrite")

    # Stage 3's OCR data: synthetic pages with their exact transcription, through the OCR stage.
    synthdoc = beam_stage("synthdoc", "synthdoc", {"n": setting("ocr_pages"), "lang": "en,zh", "seed": "7"})
    ocr = beam_stage("ocr", "ocr", {"input": stage_dir("synthdoc"), "no_safety": True})

    selects, packs = {}, {}
    for n in STAGES:
        inputs = [POOL_DIR] if n < 3 else ["pool=" + POOL_DIR, f"{OCR_SOURCE}={stage_dir('ocr')}"]
        selects[n] = beam_stage(f"select{n}", "select_stage", {"input": inputs, "stage": str(n)}, config_key="mix",
                                trigger_rule="none_failed_min_one_success" if n == 1 else "all_success")
        packs[n] = beam_stage(f"pack{n}", "pack", {"input": stage_dir(f"select{n}"), "stage": str(n),
                                                   "seq_len": setting("seq_len"), "format": setting("pack_format")})

    @task(outlets=list(CURRICULUM.values()), trigger_rule="all_success")
    def verify(run_dir: str, outlet_events=None, ti=None) -> dict:
        """``mmcorpus verify`` on every stage output of the run (fails the run when one is violated),
        then one asset event per pack: its directory, profile, pairs, tokens and shares."""
        import json

        from pipelines import verify as verify_cmd
        from pipelines.curriculum import stage_summary
        from pipelines.inspection import describe_run
        from storage.files import write_bytes_atomic

        run = describe_run(run_dir)
        dirs = [s["dir"] for s in run["stages"]]
        code = verify_cmd.main(dirs)
        if code != 0:
            raise RuntimeError(f"mmcorpus verify failed (exit {code}) for {dirs}")
        decision = rewrite_decision(ti)
        built = {}
        for n in STAGES:
            summary = stage_summary(f"{run_dir}/select{n}", f"{run_dir}/pack{n}")
            built[f"stage{n}"] = summary
            outlet_events[CURRICULUM[n]].extra = {"path": summary["pack_dir"], "run_id": ti.run_id, **summary,
                                                  **decision}
        write_bytes_atomic(f"{run_dir}/curriculum.json", json.dumps(built, indent=2, sort_keys=True).encode())
        return {"run_dir": run_dir, "verified": dirs, **{k: v["pairs"] for k, v in built.items()}}

    verified = verify(RUN_DIR)

    planned >> filter_ >> dedup >> choose >> [rewrite_endpoint, rewrite_offline, no_rewrite] >> selects[1]
    planned >> synthdoc >> ocr >> selects[3]
    selects[1] >> [packs[1], selects[2]]
    selects[2] >> [packs[2], selects[3]]
    selects[3] >> packs[3]
    [packs[1], packs[2], packs[3]] >> verified
