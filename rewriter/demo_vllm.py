"""``make demo-vllm``: the demo with its rewrite stage answered by a real local vLLM server.

No hub access, no GPU: builds the tiny model (tokenizer trained on English and Chinese captions),
fine-tunes all of it briefly on the CPU on the offline template's answers in both languages
(``rewriter.tiny.make_bilingual_teacher``: each example prompted as the rewriter prompts it, in the
caption's language), serves it with vLLM (``rewriter.serving.VLLMServer``), runs ``mmcorpus demo
--endpoint ... --model tiny-rewriter`` against it and stops the server. The tiny model's text is
garbage, but it answers Chinese captions with the Chinese question and Chinese text and English ones
in English; the point is to see the real serving path (structured output, batching, cache, ledger)
end to end. Models are kept in ``OUTPUT/models`` and reused on the next run.

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


def _second_column(path: str, limit: int) -> list[str]:
    """Captions of a ``KEY<TAB>caption`` file (the COCO-CN sample)."""
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f]
    return [r[1] for r in rows if len(r) == 2 and r[1].strip()][:limit]


def build_models(models_dir: str, corpus: str, steps: int, zh_corpus: str | None = None) -> str:
    """The bilingual tiny rewriter (built once, then reused)."""
    from rewriter.tiny import make_bilingual_teacher, read_texts

    merged = os.path.join(models_dir, "teacher", "merged")
    if os.path.isfile(os.path.join(merged, "config.json")):
        return merged
    by_lang = {"en": read_texts(corpus, 1500)}
    if zh_corpus:
        by_lang["zh"] = _second_column(zh_corpus, 1500)
    return make_bilingual_teacher(models_dir, by_lang, steps=steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewriter.demo_vllm", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/demo-vllm")
    parser.add_argument("--corpus", default=os.path.join(REPO, "data", "sample", "cc3m_val_captions_8k.tsv"))
    parser.add_argument("--zh-corpus", default=os.path.join(REPO, "data", "sample", "coco_cn_captions_2k.tsv"),
                        help="Chinese captions (KEY<TAB>caption) for the tokenizer and the teacher ('' for none)")
    parser.add_argument("--train-steps", type=int, default=None, help="fine-tune steps (default: the teacher recipe's)")
    parser.add_argument("--python", help="vLLM interpreter (default $MMCORPUS_VLLM_PYTHON)")
    parser.add_argument("--force", action="store_true", help="rerun every demo stage")
    args = parser.parse_args(argv)
    args.output = os.path.abspath(args.output)

    from rewriter.serving import ServeConfig, VLLMServer, vllm_python

    t0 = time.monotonic()
    from rewriter.tiny import BILINGUAL_TEACHER

    merged = build_models(os.path.join(args.output, "models"), args.corpus,
                          args.train_steps or BILINGUAL_TEACHER["steps"], args.zh_corpus or None)
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
