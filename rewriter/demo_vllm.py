"""``make demo-vllm``: the demo with its rewrite stage answered by a real local vLLM server.

No hub access, no GPU: builds the tiny model, fine-tunes it briefly (LoRA, CPU) on the offline
template's answers so that it writes the JSON the rewriter contract wants, merges it, serves the
merged model with vLLM (``rewriter.serving.VLLMServer``), runs ``mmcorpus demo --endpoint ... --model
tiny-rewriter`` against it and stops the server. The tiny model's text is garbage; the point is to see
the real serving path (structured output, batching, cache, ledger) end to end. Models are kept in
``OUTPUT/models`` and reused on the next run.

    MMCORPUS_VLLM_PYTHON=.venv-vllm/bin/python python -m rewriter.demo_vllm --output build/demo-vllm
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVED_NAME = "tiny-rewriter"


def build_models(models_dir: str, corpus: str, steps: int) -> str:
    """The merged tiny rewriter (built once, then reused)."""
    from rewriter.finetune import FinetuneConfig, finetune
    from rewriter.sft import ExportConfig, export_sft
    from rewriter.tiny import make_tiny_model, read_texts, write_template_seed

    merged = os.path.join(models_dir, "rewriter", "merged")
    if os.path.isfile(os.path.join(merged, "config.json")):
        return merged
    texts = read_texts(corpus, 2400)
    base = make_tiny_model(os.path.join(models_dir, "tiny"), texts[:2000])
    write_template_seed(os.path.join(models_dir, "template-seed"), texts[2000:2400])
    export_sft(os.path.join(models_dir, "template-seed"), os.path.join(models_dir, "sft"),
               ExportConfig(validation_fraction=0.0))
    cfg = FinetuneConfig(max_steps=steps, learning_rate=1e-2, batch_size=4, lora_dropout=0.0, cpu_threads=1)
    return finetune(base, os.path.join(models_dir, "sft"), os.path.join(models_dir, "rewriter"), cfg,
                    merge=True).merged_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewriter.demo_vllm", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/demo-vllm")
    parser.add_argument("--corpus", default=os.path.join(REPO, "data", "sample", "cc3m_val_captions_8k.tsv"))
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--python", help="vLLM interpreter (default $MMCORPUS_VLLM_PYTHON)")
    parser.add_argument("--force", action="store_true", help="rerun every demo stage")
    args = parser.parse_args(argv)
    args.output = os.path.abspath(args.output)

    from rewriter.serving import ServeConfig, VLLMServer, vllm_python

    t0 = time.monotonic()
    merged = build_models(os.path.join(args.output, "models"), args.corpus, args.train_steps)
    print(f"demo-vllm: tiny rewriter ready in {time.monotonic() - t0:.0f} s: {merged}", flush=True)
    cfg = ServeConfig(model=merged, served_model_name=SERVED_NAME, python=vllm_python(args.python), max_model_len=512,
                      log_path=os.path.join(args.output, "vllm-server.log"))
    os.makedirs(args.output, exist_ok=True)
    with VLLMServer(cfg) as server:
        print(f"demo-vllm: vLLM serving {SERVED_NAME} at {server.base_url} "
              f"(started in {server.startup_seconds:.0f} s; log {server.log_path})", flush=True)
        cmd = [sys.executable, "-m", "pipelines.cli", "demo", "--output", os.path.join(args.output, "run"),
               "--endpoint", server.base_url, "--model", SERVED_NAME, *(["--force"] if args.force else [])]
        code = subprocess.call(cmd, cwd=REPO)
    print(f"demo-vllm: done in {time.monotonic() - t0:.0f} s (exit {code}); outputs in {args.output}/run")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
