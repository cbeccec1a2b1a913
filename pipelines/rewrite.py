"""`mmcorpus rewrite`: caption → QA pairs through an OpenAI-compatible endpoint (or the offline template).

Examples:
    # dry run, no model (the demo): deterministic template, says "offline-template" in every row
    mmcorpus rewrite --input out/dedup --output out/rewrite --backend offline-template

    # real run against a vLLM server (mmcorpus rewriter serve); key, if any, from $OPENAI_API_KEY
    mmcorpus rewrite --input out/dedup --output out/rewrite --endpoint http://127.0.0.1:8000/v1 \
        --model rewriter --policy needs_rewrite --cache-dir out/rewrite-cache --concurrency 32 \
        [--direct_running_mode=multi_processing --direct_num_workers=2]

A record whose rewrite fails stays in the output with its raw caption (``--on-failure keep_raw``, the
default; its ledger row is ``kept`` with the failure as reason) or leaves it (``--on-failure drop``).
The served weights' identity (``--model-revision``, else the ``root`` the endpoint reports for
``--model`` on ``GET /models``) is hashed into the config and every cache key.

Settings can also come from the ``[rewrite]`` table of ``--config FILE.toml`` (keys as in
``transforms.rewrite.RewriteConfig``); flags win. Every flag has an underscore alias (``--cache_dir``)
for Airflow's Beam operator. Unknown flags go to Beam.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from urllib.parse import urlsplit

from pipelines.config import build, load_toml, section
from pipelines.runner import StageResult, add_stage_args, run_stage
from schemas.errors import UserError
from transforms.rewrite import (BACKEND_OFFLINE, BACKEND_OPENAI, BACKENDS, ON_FAILURE, POLICIES, RewriteCaptions,
                                RewriteConfig)
from transforms.sources import read_sources, stage_inputs

STAGE = "rewrite"
log = logging.getLogger("mmcorpus.rewrite")

# flag -> RewriteConfig field (None-valued flags leave the TOML/default value alone)
_FLAGS = {
    "endpoint": "endpoint", "model": "model", "policy": "policy", "backend": "backend", "cache_dir": "cache_dir",
    "api_key_env": "api_key_env", "concurrency": "concurrency", "batch_size": "batch_size", "timeout": "timeout_s",
    "max_retries": "max_retries", "max_tokens": "max_tokens", "temperature": "temperature",
    "on_failure": "on_failure", "model_revision": "model_revision", "cache_threads": "cache_threads",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmcorpus rewrite", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Unknown flags go to Beam, e.g. --direct_running_mode=multi_processing --direct_num_workers=2",
    )
    p.add_argument("--input", action="append", required=True,
                   help="[NAME=]a finished stage output directory (normally the dedup's); repeat with NAME=DIR")
    p.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (backend openai)")
    p.add_argument("--model", help="served model name (backend openai); keys the response cache")
    p.add_argument("--model-revision", "--model_revision", dest="model_revision",
                   help="identity of the served weights (checkpoint hash, git sha); default: the 'root' the "
                        "endpoint's GET /models reports for --model. Keys the cache and the config hash")
    p.add_argument("--policy", choices=POLICIES, help="which records to rewrite (default needs_rewrite)")
    p.add_argument("--on-failure", "--on_failure", dest="on_failure", choices=ON_FAILURE,
                   help="a record whose rewrite failed: keep_raw (default; kept with its raw caption, the "
                        "failure as ledger reason) or drop (rejected/error row, not in the output)")
    p.add_argument("--backend", choices=BACKENDS,
                   help=f"{BACKEND_OPENAI} (default) or {BACKEND_OFFLINE} (deterministic template, no model)")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir",
                   help="response cache directory (default for backend openai: rewrite-cache beside --output; "
                        "'none' disables it)")
    p.add_argument("--api-key-env", "--api_key_env", dest="api_key_env",
                   help="environment variable holding the API key (default OPENAI_API_KEY; never pass the key itself)")
    p.add_argument("--concurrency", type=int, help="requests in flight per worker (default 16)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="records per batch (default 128)")
    p.add_argument("--cache-threads", "--cache_threads", dest="cache_threads", type=int,
                   help="threads doing cache I/O per worker, off the request loop (default 16)")
    p.add_argument("--timeout", type=float, help="per-request time-out in seconds (default 60)")
    p.add_argument("--max-retries", "--max_retries", dest="max_retries", type=int,
                   help="retries on 429/5xx/time-out/connection error (default 5)")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, help="completion token limit (default 256)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0)")
    p.add_argument("--fallback-reason", "--fallback_reason", dest="fallback_reason",
                   help="this run is a fallback (the Airflow DAG sets it when the endpoint is down and the run "
                        "asked for rewrite_fallback): recorded in the manifest config as rewrite_fallback")
    p.add_argument("--no-preflight", "--no_preflight", dest="preflight", action="store_false",
                   help="do not check that the endpoint answers before starting the pipeline")
    add_stage_args(p)
    return p


def default_cache_dir(output: str) -> str:
    """``rewrite-cache`` beside the output directory: shared by reruns, untouched by stage clean-up."""
    out = output.rstrip("/")
    parent = out.rsplit("/", 1)[0] if "/" in out else "."
    return f"{parent}/rewrite-cache"


def resolve_config(args: argparse.Namespace) -> RewriteConfig:
    values = dict(section(load_toml(args.config), "rewrite"))
    for flag, field in _FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[field] = v
    backend = values.get("backend", BACKEND_OPENAI)
    if backend == BACKEND_OFFLINE:
        ignored = [f"--{k}" for k in ("endpoint", "model") if values.get(k)]
        if ignored:
            log.warning("backend %s ignores %s", BACKEND_OFFLINE, " and ".join(ignored))
        values.pop("endpoint", None)
        values.pop("model", None)
        values.pop("model_revision", None)
    elif backend == BACKEND_OPENAI:
        missing = [f"--{k}" for k in ("endpoint", "model") if not values.get(k)]
        if missing:
            raise UserError(
                f"{' and '.join(missing)} required with --backend {BACKEND_OPENAI} (e.g. --endpoint "
                f"http://127.0.0.1:8000/v1 --model rewriter), or use --backend {BACKEND_OFFLINE} for a dry run"
            )
        values.setdefault("cache_dir", default_cache_dir(args.output))
    if str(values.get("cache_dir", "")).lower() in ("none", ""):
        values["cache_dir"] = None
    return build(RewriteConfig, values, "rewrite")


def redact(url: str) -> str:
    """scheme://host:port/path of a URL: no user info, query or fragment (they may hold tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def served_revision(models_body: object, model: str) -> str | None:
    """The identity of ``model`` in a ``GET /models`` answer: vLLM's ``root`` (the weights' path or hub
    id; for a LoRA module, the adapter's path, with its ``parent``). ``created`` is not used: vLLM
    stamps it with the time of the request. None when the server does not say (OpenAI, stand-ins)."""
    data = models_body.get("data") if isinstance(models_body, dict) else None
    for card in data if isinstance(data, list) else []:
        if isinstance(card, dict) and card.get("id") == model and isinstance(card.get("root"), str) and card["root"]:
            parent = card.get("parent")
            return f"{card['root']} (parent {parent})" if isinstance(parent, str) and parent else card["root"]
    return None


def preflight(cfg: RewriteConfig) -> dict | None:
    """Fail fast, with the fix, when the endpoint does not answer ``GET /models``; return its answer."""
    import httpx

    key = os.environ.get(cfg.api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = cfg.endpoint.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers=headers, timeout=min(10.0, cfg.timeout_s))
    except httpx.HTTPError as e:
        raise UserError(
            f"--endpoint {redact(cfg.endpoint)} does not answer ({type(e).__name__}); start the server "
            "(`mmcorpus rewriter serve ...`) or fix the URL; --no-preflight skips this check"
        ) from None
    if r.status_code in (401, 403):
        raise UserError(
            f"--endpoint {redact(cfg.endpoint)} refused the API key (HTTP {r.status_code}); put the key in "
            f"${cfg.api_key_env} (or name another variable with --api-key-env)"
        )
    if r.status_code >= 400:
        log.warning("endpoint %s answered GET /models with HTTP %d; continuing", redact(cfg.endpoint), r.status_code)
        return None
    try:
        return r.json()
    except ValueError:
        return None


def with_revision(cfg: RewriteConfig, models_body: dict | None) -> RewriteConfig:
    """``cfg`` with ``model_revision`` from the endpoint when the user gave none."""
    if cfg.backend != BACKEND_OPENAI or cfg.model_revision:
        return cfg
    revision = served_revision(models_body, str(cfg.model))
    if revision is None:
        log.warning("the endpoint does not report a revision for model %r and no --model-revision was given: "
                    "cached answers are keyed by the served name alone, so new weights served under that name "
                    "would get old answers; pass --model-revision", cfg.model)
        return cfg
    log.info("model %r: revision %s (from GET /models)", cfg.model, revision)
    return dataclasses.replace(cfg, model_revision=revision)


def run(args: argparse.Namespace, beam_args: list[str]) -> StageResult:
    cfg = resolve_config(args)
    sources, input_info = stage_inputs(args.input)
    if cfg.backend == BACKEND_OPENAI and args.preflight:
        cfg = with_revision(cfg, preflight(cfg))
    elif cfg.backend == BACKEND_OPENAI:
        cfg = with_revision(cfg, None)

    def build_pipeline(p):
        pairs = read_sources(p, sources)
        return pairs | "RewriteCaptions" >> RewriteCaptions(cfg)

    config = {"rewrite": cfg.hashed()}
    if args.fallback_reason:  # provenance a reader of the output must see: not the model's rewrites
        config["rewrite_fallback"] = {"backend": cfg.backend, "reason": args.fallback_reason}
    return run_stage(
        stage=STAGE, output_dir=args.output, config=config, input_info=input_info,
        build=build_pipeline, beam_args=beam_args, num_shards=args.num_shards, force=args.force,
        target_shard_bytes=args.target_shard_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    args, beam_args = parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    result = run(args, beam_args)
    from pipelines.summary import print_stage_summary

    print_stage_summary(result, args.output)
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "rewrite")
