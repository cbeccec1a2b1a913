"""Helpers shared by the mmcorpus DAGs (no DAG here): run directories, the rewrite endpoint check, Beam settings."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"
FALLBACKS = ("none", "offline-template", "skip")
# The interpreter that runs the stage files: this environment's, where mmcorpus is installed.
PY_INTERPRETER = os.environ.get("MMCORPUS_PYTHON", sys.executable)
# Options for every stage, passed straight to Beam (e.g. Dataflow project/region/temp_location).
BEAM_OPTIONS: dict = json.loads(os.environ.get("MMCORPUS_BEAM_OPTIONS", "{}") or "{}")


def safe_run_dir(run_id: str) -> str:
    """Run id → a directory name that is safe on local disks and object stores (no ':' or '+')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


def asset_root(output_root: str) -> str:
    """The URI prefix of a DAG's assets: the output root, as a ``file://`` URI when it is a local path."""
    root = output_root.rstrip("/")
    return root if "://" in root else "file://" + os.path.abspath(root)


# Settings both DAGs offer, with the same defaults: the environment of the scheduler / DAG processor, then these.
SHARED_DEFAULTS = {
    "output_root": os.environ.get("MMCORPUS_OUTPUT_ROOT", str(REPO / "build" / "airflow-runs")),
    "runner": os.environ.get("MMCORPUS_RUNNER", "DirectRunner"),
    "rewrite_endpoint": os.environ.get("MMCORPUS_REWRITE_ENDPOINT", ""),
    "rewrite_model": os.environ.get("MMCORPUS_REWRITE_MODEL", "rewriter"),
    # No silent fallback: without a healthy endpoint the run fails unless a fallback is asked for.
    "rewrite_fallback": os.environ.get("MMCORPUS_REWRITE_FALLBACK", "none"),
    "seq_len": os.environ.get("MMCORPUS_SEQ_LEN", "2048"),
    "pack_format": os.environ.get("MMCORPUS_PACK_FORMAT", "parquet"),
    # Empty: the flag is not passed and every stage sizes its shards by the CLI's default (512MiB).
    "target_shard_bytes": os.environ.get("MMCORPUS_TARGET_SHARD_BYTES", ""),
}
# The run form's description of each shared setting (an empty param means: the default above).
SHARED_PARAM_DESCRIPTIONS = {
    "output_root": "runs go to <output_root>/<run id>/<stage>",
    "runner": "DirectRunner | DataflowRunner | FlinkRunner | SparkRunner",
    "rewrite_endpoint": "OpenAI-compatible base URL, e.g. http://gpu:8000/v1",
    "rewrite_model": "served model name",
    "rewrite_fallback": "when the endpoint is down or not configured: "
                        "none (default: the rewrite task fails, nothing is packed) | offline-template | skip",
    "seq_len": "packed sequence length",
    "pack_format": "parquet | webdataset",
    "target_shard_bytes": "bytes per data/ledger shard, counted on the input (e.g. 512MiB, 1G); "
                          "empty: the stages' own default (512MiB)",
}


def shared_params(*names: str) -> dict:
    """``{name: Param}`` for the shared settings ``names``, in that order (the run form's order)."""
    from airflow.sdk import Param  # imported here: this module stays importable without Airflow

    return {n: Param("", type="string", description=SHARED_PARAM_DESCRIPTIONS[n]) for n in names}


# Stage flags whose empty setting means "not passed": the stage command's own default applies.
OPTIONAL_OPTIONS = ("target_shard_bytes",)


def drop_empty_options(options: dict) -> dict:
    """Remove the ``OPTIONAL_OPTIONS`` a run left empty (in place), so the CLI default applies."""
    for name in OPTIONAL_OPTIONS:
        if options.get(name) in ("", None):
            options.pop(name, None)
    return options


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


def rewrite_decision(ti) -> dict:
    """``{"rewrite": mode}`` plus ``rewrite_fallback_reason`` when a fallback was taken (from XCom)."""
    mode = ti.xcom_pull(task_ids="choose_rewrite", key="rewrite")
    out = {"rewrite": mode}
    why = ti.xcom_pull(task_ids="choose_rewrite", key="rewrite_fallback_reason")
    if why:
        out["rewrite_fallback_reason"] = why
    return out


def choose_rewrite_branch(get, ti, log) -> str:
    """The rewrite branch of a run: ``rewrite_endpoint`` when the endpoint is configured and healthy,
    otherwise the fallback the run asked for, or (``none``, the default) ``rewrite_endpoint`` anyway,
    which fails. ``get(name)`` reads a setting; XCom keys ``rewrite``, ``rewrite_fallback_reason``
    and ``pack_input`` (the stage directory the rewrite's consumers read) record the decision."""
    fallback = get("rewrite_fallback") or "none"
    if fallback not in FALLBACKS:
        raise ValueError(f"rewrite_fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
    problem = endpoint_problem(get("rewrite_endpoint"))
    if problem is None or fallback == "none":
        if problem is not None:
            log.error(
                "%s and rewrite_fallback is none: the rewrite task will fail and nothing will be packed; "
                "fix the endpoint, or rerun with rewrite_fallback=offline-template or skip", problem)
        ti.xcom_push(key="pack_input", value="rewrite")
        ti.xcom_push(key="rewrite", value="endpoint")
        return "rewrite_endpoint"
    reason = f"{problem}; rewrite_fallback={fallback}"
    log.warning("rewrite fallback: %s", reason)
    ti.xcom_push(key="rewrite", value=fallback)
    ti.xcom_push(key="rewrite_fallback_reason", value=reason)
    if fallback == "skip":
        ti.xcom_push(key="pack_input", value="dedup")
        return "no_rewrite"
    ti.xcom_push(key="pack_input", value="rewrite")
    return "rewrite_offline"
