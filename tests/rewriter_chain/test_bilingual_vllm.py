"""Chinese and English captions through the real vLLM path: a tiny model whose tokenizer was trained on
English and Chinese captions, served by vLLM's CPU build; the Chinese prompt is what reaches the server
(its own token count of the request proves it), and the rewrite stage accounts for every record of a
mixed-language input with the v2 prompt. The tiny model's text is random: the plumbing is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rewriter import prompts
from schemas import reasons
from schemas.records import Pair
from transforms.stage_io import read_table

from .utils import make_stage_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REWRITE_REASONS = {
    reasons.OK, reasons.REWRITE_TRUNCATED, reasons.REWRITE_EMPTY, reasons.REWRITE_INVALID_JSON,
    reasons.REWRITE_OFF_FORMAT, reasons.REWRITE_UNFAITHFUL,
}


def _zh_captions(sample_dir) -> list[str]:
    lines = (sample_dir / "coco_cn_captions_2k.tsv").read_text(encoding="utf-8").splitlines()
    return [ln.split("\t", 1)[1] for ln in lines if "\t" in ln]


@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_python, cc3m_captions, sample_dir):
    """The tiny model (tokenizer trained on English and Chinese captions) served by vLLM's CPU build."""
    from rewriter.serving import ServeConfig, VLLMServer
    from rewriter.tiny import make_tiny_model

    work = tmp_path_factory.mktemp("bilingual-vllm")
    zh = _zh_captions(sample_dir)
    model = make_tiny_model(str(work / "model"), cc3m_captions[:1500] + zh[:1500])
    cfg = ServeConfig(model=model, served_model_name="tiny-bi", python=vllm_python, max_model_len=512,
                      log_path=str(work / "vllm.log"))
    with VLLMServer(cfg) as server:
        yield {"server": server, "model": model, "zh": zh, "work": work}


def _n_prompt_tokens(tok, messages) -> int:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    return len(ids)


def test_the_server_receives_the_prompt_in_the_captions_language(served, cc3m_captions):
    import openai
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served["model"], local_files_only=True)
    client = openai.OpenAI(base_url=served["server"].base_url, api_key="EMPTY", max_retries=0, timeout=120)
    counts = {}
    for lang, caption in (("zh", served["zh"][1600]), ("en", cc3m_captions[1600])):
        messages = prompts.build_messages(caption)
        assert messages[0]["content"] == (prompts.SYSTEM_PROMPT_ZH if lang == "zh" else prompts.SYSTEM_PROMPT)
        want = _n_prompt_tokens(tok, messages)
        r = client.chat.completions.create(model="tiny-bi", messages=messages, max_tokens=8, temperature=0.0)
        assert r.usage.prompt_tokens == want  # the server tokenised exactly the per-language prompt
        counts[lang] = want
    # the Chinese system prompt is a different text: a different request, not the English one
    en_for_zh = _n_prompt_tokens(tok, prompts.build_messages(served["zh"][1600], lang="en"))
    assert counts["zh"] != en_for_zh


def test_rewrite_stage_on_a_mixed_language_input(served, cc3m_captions, tmp_path):
    zh, en = served["zh"][1700:1706], cc3m_captions[1700:1706]
    pairs = [Pair(key=f"zh{i:02d}", caption=c, lang="zh", lang_score=1.0, source=f"coco-cn#{i}") for i, c in enumerate(zh)]
    pairs += [Pair(key=f"en{i:02d}", caption=c, lang="en", lang_score=0.95, source=f"cc3m#{i}") for i, c in enumerate(en)]
    filter_dir = make_stage_dir(str(tmp_path / "filter"), pairs)
    out = tmp_path / "rewrite"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "rewrite", "--input", filter_dir, "--output", str(out),
         "--endpoint", served["server"].base_url, "--model", "tiny-bi", "--policy", "all", "--max-tokens", "48",
         "--temperature", "0", "--concurrency", "4"],
        cwd=REPO, env=dict(os.environ, OPENAI_API_KEY="EMPTY"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = read_table(str(out), "ledger").to_pylist()
    assert sorted(r["key"] for r in ledger) == sorted(p.key for p in pairs)  # every record, exactly once
    assert all(r["reason"] in REWRITE_REASONS for r in ledger), [r["reason"] for r in ledger]
    assert {(r["model"], r["prompt_version"]) for r in ledger} == {("tiny-bi", "qa-v2")}
    rows = read_table(str(out)).to_pylist()
    # on_failure=keep_raw (the default): a failed rewrite keeps the record with its raw caption
    kept = {r["key"] for r in ledger if r["status"] == "kept"}
    assert {r["key"] for r in rows} == kept
    for row in rows:  # every kept record still carries its language and its own caption
        assert row["lang"] == row["key"][:2]
        assert row["caption"] == {p.key: p.caption for p in pairs}[row["key"]] or row["raw_caption"] is not None
    print("bilingual rewrite reasons:", json.dumps(sorted(r["reason"] for r in ledger)))
