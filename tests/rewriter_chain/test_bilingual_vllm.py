"""Chinese captions come back as Chinese QA, English as English, through the real vLLM path.

A tiny model (tokenizer trained on English and Chinese captions) is fully fine-tuned on the offline
template's answers in both languages, each prompted exactly as the rewriter prompts it
(``rewriter.tiny.make_bilingual_teacher``; ~1–2 min on one CPU thread), then served by vLLM's CPU
build. The real ``mmcorpus rewrite`` stage (structured output, greedy) runs on a mixed zh/en input;
every outcome is asserted exactly: keys, statuses, reasons, the question of each language's
template and the script of every answer and adopted caption. The model's text is still garbage;
what it learned is the frame and the language of its answer, which it takes from the prompt.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from rewriter import prompts
from rewriter.offline import QUESTIONS
from schemas import reasons
from schemas.records import Pair
from transforms.stage_io import read_table

from .utils import make_stage_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_PER_LANG = 6


def _zh_captions(sample_dir) -> list[str]:
    lines = (sample_dir / "coco_cn_captions_2k.tsv").read_text(encoding="utf-8").splitlines()
    return [ln.split("\t", 1)[1] for ln in lines if "\t" in ln]


def _unconstrained(captions: list[str], n: int) -> list[str]:
    """The first ``n`` captions whose rewrite the faithfulness rule does not constrain (no digits,
    names, titles): the teacher's answers are garbage text, so a number would make them unfaithful."""
    return [c for c in captions if not prompts.faithfulness_constraints(c).active][:n]


@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_python, cc3m_captions, sample_dir):
    """The bilingual template teacher, served by vLLM's CPU build."""
    from rewriter.serving import ServeConfig, VLLMServer
    from rewriter.tiny import make_bilingual_teacher

    work = tmp_path_factory.mktemp("bilingual-vllm")
    zh = _zh_captions(sample_dir)
    t0 = time.monotonic()
    # Training examples: the first 200 of each list; captions 1600+ (the tests') never seen.
    model = make_bilingual_teacher(str(work / "teacher"), {"en": cc3m_captions[:1500], "zh": zh[:1500]})
    train_s = time.monotonic() - t0
    report = json.load(open(os.path.join(os.path.dirname(model), "finetune.json"), encoding="utf-8"))
    cfg = ServeConfig(model=model, served_model_name="tiny-bi", python=vllm_python, max_model_len=512,
                      log_path=str(work / "vllm.log"))
    with VLLMServer(cfg) as server:
        print(f"bilingual teacher: built and trained in {train_s:.0f} s (fine-tune {report['seconds']} s, "
              f"loss {report['loss_first']:.2f} -> {report['loss_last']:.2f}); vLLM up in {server.startup_seconds:.0f} s")
        yield {"server": server, "model": model, "zh": zh, "work": work, "report": report}


def _n_prompt_tokens(tok, messages) -> int:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    return len(ids)


def test_the_teacher_was_fully_fine_tuned_in_both_languages(served):
    report = served["report"]
    assert report["config"]["method"] == "full" and report["adapter_dir"] is None
    assert report["train_examples"] == 400 and report["steps"] == 800
    assert report["loss_last"] < 0.3 * report["loss_first"]
    train = [json.loads(line) for line in open(os.path.join(report["data"], "train.jsonl"), encoding="utf-8")]
    assert sorted({ex["lang"] for ex in train}) == ["en", "zh"]
    for ex in train:  # trained on exactly the messages the rewriter sends, in the caption's language
        system, user = prompts.PROMPTS[ex["lang"]]
        caption = ex["messages"][1]["content"][len(user.format(caption="")):]
        assert ex["messages"][:2] == prompts.build_messages(caption) and ex["messages"][0]["content"] == system
        assert json.loads(ex["messages"][2]["content"])["qa"][0]["question"] == QUESTIONS[ex["lang"]]


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


def _scripts(text: str) -> set[str]:
    """The scripts in ``text``: ``zh`` for Han characters, ``en`` for Latin letters — computed here,
    independently of the rewriter's own rule."""
    return ({"zh"} if any("\u4e00" <= c <= "\u9fff" for c in text) else set()) | (
        {"en"} if any("a" <= c.lower() <= "z" for c in text) else set())


def _inputs(served, cc3m_captions) -> list[Pair]:
    zh = _unconstrained(served["zh"][1700:], N_PER_LANG)
    en = _unconstrained(cc3m_captions[1700:], N_PER_LANG)
    assert len(zh) == len(en) == N_PER_LANG
    pairs = [Pair(key=f"zh{i:02d}", caption=c, lang="zh", lang_score=1.0, source=f"coco-cn#{i}") for i, c in enumerate(zh)]
    pairs += [Pair(key=f"en{i:02d}", caption=c, lang="en", lang_score=0.95, source=f"cc3m#{i}") for i, c in enumerate(en)]
    return pairs


def test_every_answer_opens_with_the_question_in_the_captions_language(served, cc3m_captions):
    """Greedy, with the JSON schema enforced: the first field the model writes is the question, and it
    is the template's question of the caption's language — for every caption, Chinese and English."""
    import openai

    client = openai.OpenAI(base_url=served["server"].base_url, api_key="EMPTY", max_retries=0, timeout=120)
    got = {}
    for p in _inputs(served, cc3m_captions):
        r = client.chat.completions.create(model="tiny-bi", messages=prompts.build_messages(p.caption),
                                           response_format=prompts.response_format(), max_tokens=40, temperature=0.0)
        m = re.match(r'\s*\{\s*"qa"\s*:\s*\[\s*\{\s*"question"\s*:\s*"([^"]*)"', r.choices[0].message.content)
        got[p.key] = m.group(1) if m else r.choices[0].message.content
    assert got == {p.key: QUESTIONS[p.lang] for p in _inputs(served, cc3m_captions)}


def test_rewrite_stage_answers_each_caption_in_its_language(served, cc3m_captions, tmp_path):
    pairs = _inputs(served, cc3m_captions)
    filter_dir = make_stage_dir(str(tmp_path / "filter"), pairs)
    out = tmp_path / "rewrite"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "rewrite", "--input", filter_dir, "--output", str(out),
         "--endpoint", served["server"].base_url, "--model", "tiny-bi", "--policy", "all", "--max-tokens", "256",
         "--temperature", "0", "--concurrency", "4"],
        cwd=REPO, env=dict(os.environ, OPENAI_API_KEY="EMPTY"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = read_table(str(out), "ledger").to_pylist()
    rows = {r["key"]: r for r in read_table(str(out)).to_pylist()}
    print("bilingual rewrite:", json.dumps({r["key"]: [r["reason"], (rows.get(r["key"]) or {}).get("caption")]
                                            for r in ledger}, ensure_ascii=False))
    keys = sorted(p.key for p in pairs)
    assert sorted(r["key"] for r in ledger) == keys == sorted(rows)  # every record, exactly once, all kept
    assert {(r["status"], r["model"], r["prompt_version"]) for r in ledger} == {("kept", "tiny-bi", prompts.PROMPT_VERSION)}
    # The tiny model does not always close its JSON within max_tokens (docs/bilingual.md): such a
    # record keeps its raw caption (on_failure=keep_raw). Nothing else may go wrong.
    by_key = {r["key"]: r["reason"] for r in ledger}
    assert set(by_key.values()) <= {reasons.OK, reasons.REWRITE_TRUNCATED}, by_key
    for lang in ("zh", "en"):
        assert sum(k.startswith(lang) and v == reasons.OK for k, v in by_key.items()) >= N_PER_LANG // 2, by_key
    raw = {p.key: p.caption for p in pairs}
    for key, row in rows.items():
        lang = key[:2]
        assert row["lang"] == lang and row["source"].startswith("coco-cn#" if lang == "zh" else "cc3m#")
        if by_key[key] != reasons.OK:
            assert (row["caption"], row["raw_caption"], row["qa"], row["rewrite_model"]) == (raw[key], None, None, None)
            continue
        assert row["raw_caption"] == raw[key] and row["rewrite_model"] == "tiny-bi"
        assert [p["question"] for p in row["qa"]] == [QUESTIONS[lang]]  # the template's question, in its language
        answer = row["qa"][0]["answer"]
        # A Chinese caption's answer is Chinese text, an English caption's has no Chinese in it. (The
        # tiny model sometimes copies the JSON key into a Chinese string, "caption球。", so a Latin
        # word in a Chinese answer is not asserted away.)
        if lang == "zh":
            assert "zh" in _scripts(answer), (key, answer, row["caption"])
            assert "zh" in _scripts(row["caption"]) or not row["caption"].strip("。"), (key, answer, row["caption"])
        else:
            assert _scripts(answer) == {"en"} and "zh" not in _scripts(row["caption"]), (key, answer, row["caption"])
