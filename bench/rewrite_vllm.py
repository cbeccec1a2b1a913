"""Throughput of a real local vLLM CPU server answering rewrite requests, at several client concurrencies.

Builds the tiny model, fine-tunes it briefly on the offline template's answers (so completions close
their JSON and have caption-like lengths instead of running to ``max_tokens``), merges the adapter,
serves the merged model with ``rewriter.serving.VLLMServer`` and sends the same captions through
``rewriter.client.RewriteClient`` (the rewrite stage's client: structured output with the JSON schema)
at each concurrency. Reports requests/s, output tokens/s and the speed-up over concurrency 1 measured
in the same run. The model is tiny, so the numbers measure the server's per-request overhead, batching
and structured-output cost on this CPU — not what a 2–8B rewriter does on a GPU.

    MMCORPUS_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m bench.rewrite_vllm [--requests 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(work: str, captions: list[str], steps: int) -> str:
    from rewriter.finetune import FinetuneConfig, finetune
    from rewriter.sft import ExportConfig, export_sft
    from rewriter.tiny import make_tiny_model, write_template_seed

    base = make_tiny_model(os.path.join(work, "tiny"), captions[:2000])
    write_template_seed(os.path.join(work, "seed"), captions[2000:2400])
    export_sft(os.path.join(work, "seed"), os.path.join(work, "sft"), ExportConfig(validation_fraction=0.0))
    cfg = FinetuneConfig(max_steps=steps, learning_rate=1e-2, batch_size=4, lora_dropout=0.0, cpu_threads=1)
    return finetune(base, os.path.join(work, "sft"), os.path.join(work, "ft"), cfg, merge=True).merged_dir


async def run_level(endpoint: str, model: str, captions: list[str], concurrency: int, max_tokens: int) -> dict:
    from rewriter import prompts
    from rewriter.client import ClientConfig, RequestFailed, RewriteClient

    client = RewriteClient(ClientConfig(endpoint=endpoint, model=model, concurrency=concurrency, max_tokens=max_tokens,
                                        timeout_s=300, max_retries=0), api_key="EMPTY")
    t0 = time.monotonic()
    results = await asyncio.gather(*(client.complete(c) for c in captions), return_exceptions=True)
    wall = time.monotonic() - t0
    await client.aclose()
    done = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, (RequestFailed, Exception))]
    out_tokens = sum(r.completion_tokens for r in done)
    valid = sum(prompts.validate(c, r.text, r.finish_reason)[0] for c, r in zip(captions, results)
                if not isinstance(r, BaseException))
    return {
        "concurrency": concurrency, "requests": len(captions), "answered": len(done), "failed": len(failed),
        "valid": valid, "stopped": sum(r.finish_reason == "stop" for r in done),
        "seconds": round(wall, 2), "requests_per_s": round(len(done) / wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "mean_output_tokens": round(out_tokens / max(1, len(done)), 1),
        "max_in_flight": client.stats.max_in_flight,
    }


TITLE = "Rewrite on a real vLLM CPU server"


def measure_levels(requests: int, levels: list[int], max_tokens: int, train_steps: int, python: str | None = None) -> dict:
    """Build + fine-tune the tiny model, serve it, and drive each concurrency level."""
    from rewriter.serving import ServeConfig, VLLMServer, vllm_python
    from rewriter.tiny import read_texts

    captions = read_texts(os.path.join(REPO, "data", "sample", "cc3m_val_captions_8k.tsv"), 3000)
    with tempfile.TemporaryDirectory(prefix="bench-rewrite-vllm-") as work:
        t0 = time.monotonic()
        merged = build_model(work, captions, train_steps)
        build_s = time.monotonic() - t0
        cfg = ServeConfig(model=merged, served_model_name="rewriter-bench", python=vllm_python(python),
                          max_model_len=512, log_path=os.path.join(work, "server.log"))
        with VLLMServer(cfg) as server:
            # Warm-up (grammar compilation, first batches) is not measured.
            asyncio.run(run_level(server.base_url, "rewriter-bench", captions[2500:2504], 4, max_tokens))
            rows = []
            for i, c in enumerate(levels):
                # Fresh captions per level: nothing is served from the prefix cache of an earlier level
                # except the shared system prompt, as in a real run.
                batch = captions[2600 + i * requests: 2600 + (i + 1) * requests]
                rows.append(asyncio.run(run_level(server.base_url, "rewriter-bench", batch, c, max_tokens)))
            startup = server.startup_seconds
    return {"startup_s": startup, "build_s": build_s, "levels": rows, "load_avg": os.getloadavg()[0]}


def _table(res: dict) -> list[str]:
    rows = res["levels"]
    base = rows[0]
    lines = ["| concurrency | requests | valid JSON | req/s | output tok/s | mean out tok | speed-up vs c=1 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['answered']}/{r['requests']} | {r['valid']} | {r['requests_per_s']} | "
                     f"{r['output_tokens_per_s']} | {r['mean_output_tokens']} | {r['requests_per_s'] / base['requests_per_s']:.2f}x |")
    return lines


def require_vllm(python: str | None = None) -> tuple[str, str]:
    """The interpreter that has vLLM and vLLM's version, or a RuntimeError saying how to get one.

    Without this, a machine lacking vLLM would fall back to this interpreter and fail late and
    obscurely (or a caller might keep last run's numbers); ``make bench`` must fail loudly instead.
    """
    from rewriter.serving import vllm_python

    python = vllm_python(python)
    probe = subprocess.run([python, "-c", "import importlib.metadata as m, importlib.util, sys; "
                            "sys.exit(1) if importlib.util.find_spec('vllm') is None else "
                            "print(*(f'{d} {m.version(d)}' for d in m.packages_distributions().get('vllm', ['vllm'])))"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        raise RuntimeError(f"bench.rewrite_vllm needs vLLM, and {python} cannot import it: run `make vllm-env` and set "
                           "MMCORPUS_VLLM_PYTHON=.venv-vllm/bin/python (make bench does both)")
    return python, probe.stdout.strip()


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (needs the vLLM venv: ``$MMCORPUS_VLLM_PYTHON`` or ``.venv-vllm/bin/python``);
    raises when vLLM is absent, so the section shows the failure rather than old numbers."""
    requests, levels, steps = (8, [1, 4], 30) if quick else (48, [1, 4, 16, 32], 250)
    if not os.environ.get("MMCORPUS_VLLM_PYTHON") and os.path.exists(os.path.join(REPO, ".venv-vllm", "bin", "python")):
        os.environ["MMCORPUS_VLLM_PYTHON"] = os.path.join(REPO, ".venv-vllm", "bin", "python")
    python, version = require_vllm()
    res = measure_levels(requests, levels, 256, steps, python)
    head = (f"`MMCORPUS_VLLM_PYTHON=.venv-vllm/bin/python python -m bench.rewrite_vllm --requests {requests} "
            f"--concurrency {','.join(map(str, levels))} --train-steps {steps}` (tiny Llama after a {steps}-step LoRA fine-tune, merged, "
            f"served by {version} on CPU, bfloat16, --max-model-len 512, started and stopped by the bench; {requests} fresh CC3M "
            f"captions per level through the rewrite stage's client with structured output (`caption_qa` JSON schema, max_tokens 256, "
            f"greedy) after a 4-request warm-up; server start-up {res['startup_s']:.0f} s, model build + fine-tune {res['build_s']:.0f} s, "
            f"load average {res['load_avg']:.1f})")
    from rewriter.tiny import TinyModelConfig

    dims = TinyModelConfig()
    note = (f"The model is tiny (hidden {dims.hidden_size}, {dims.num_hidden_layers} layers), so these figures are the server's per-request, batching and "
            "structured-output (xgrammar) overhead on this CPU, not model compute; they do not transfer to a 2–8B rewriter on a GPU. "
            "\"valid JSON\" counts answers that pass `rewriter.prompts.validate` (the schema forces the shape only; truncation "
            "or an unfaithful answer fails validation).")
    return "\n".join([head, "", *_table(res), "", note]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,32", help="client concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--python", help="vLLM interpreter (default $MMCORPUS_VLLM_PYTHON)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    res = measure_levels(args.requests, levels, args.max_tokens, args.train_steps, args.python)
    print(f"vLLM CPU server (tiny merged model, structured output), start-up {res['startup_s']:.0f} s, "
          f"model build+fine-tune {res['build_s']:.0f} s, load average {res['load_avg']:.1f}")
    print("\n".join(_table(res)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"startup_s": res["startup_s"], "levels": res["levels"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
