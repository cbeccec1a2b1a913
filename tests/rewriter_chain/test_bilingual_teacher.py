"""The pieces of the bilingual template teacher, without vLLM: a full fine-tune (every weight, no
adapter) and a tokenizer that knows the prompt of every language its captions are in."""

from __future__ import annotations

import json
import os

import pytest

from rewriter import prompts
from rewriter.finetune import FinetuneConfig, finetune, main as ft_main
from rewriter.sft import ExportConfig, export_sft
from rewriter.tiny import TinyModelConfig, make_tiny_model, write_template_seed
from schemas.errors import UserError


def _zh(sample_dir, n):
    lines = (sample_dir / "coco_cn_captions_2k.tsv").read_text(encoding="utf-8").splitlines()
    return [ln.split("\t", 1)[1] for ln in lines[:n]]


@pytest.fixture(scope="module")
def bilingual_base(tmp_path_factory, cc3m_captions, sample_dir):
    d = tmp_path_factory.mktemp("bi") / "base"
    return make_tiny_model(str(d), cc3m_captions[:300] + _zh(sample_dir, 300), TinyModelConfig(vocab_size=2048))


def _n_tokens(model_dir, text):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])


def test_tokenizer_learns_the_prompt_of_each_language(bilingual_base, tiny_model):
    # Trained on English and Chinese captions: the Chinese system prompt is in its corpus, so it
    # takes few tokens (byte-level it would be ~3 a character and crowd a 512-token context).
    zh_prompt = prompts.SYSTEM_PROMPT_ZH
    n_bi = _n_tokens(bilingual_base, zh_prompt)
    n_en_only = _n_tokens(tiny_model, zh_prompt)  # the English-only tiny model of the chain tests
    assert n_bi < 0.5 * len(zh_prompt) < n_en_only
    assert _n_tokens(bilingual_base, prompts.SYSTEM_PROMPT) < 0.3 * len(prompts.SYSTEM_PROMPT)  # English too


def test_full_fine_tune_trains_every_weight_and_writes_a_full_model(tmp_path, bilingual_base, cc3m_captions, sample_dir):
    import torch
    import transformers

    write_template_seed(str(tmp_path / "seed"), [c for pair in zip(cc3m_captions[500:520], _zh(sample_dir, 20))
                                                 for c in pair])
    export_sft(str(tmp_path / "seed"), str(tmp_path / "sft"), ExportConfig(validation_fraction=0.0))
    cfg = FinetuneConfig(method="full", max_steps=5, learning_rate=1e-2, batch_size=4, cpu_threads=1)
    result = finetune(bilingual_base, str(tmp_path / "sft"), str(tmp_path / "ft"), cfg)
    report = json.load(open(tmp_path / "ft" / "finetune.json"))
    assert result.adapter_dir is None and not os.path.exists(tmp_path / "ft" / "adapter")
    assert result.merged_dir == str(tmp_path / "ft" / "merged")
    assert (report["config"]["method"], report["adapter_dir"], report["merged_dir"], report["steps"]) == (
        "full", None, "merged", 5)
    assert report["train_examples"] == 40
    tuned = transformers.AutoModelForCausalLM.from_pretrained(result.merged_dir).state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(bilingual_base).state_dict()
    assert sorted(tuned) == sorted(base)
    # lm_head and the embeddings changed too: a LoRA adapter can touch neither
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(tuned[name], base[name]), name
    train = [json.loads(x) for x in (tmp_path / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted({ex["lang"] for ex in train}) == ["en", "zh"]


def test_cli_full_flag_and_bad_method(tmp_path, bilingual_base):
    with pytest.raises(ValueError, match="method must be lora or full"):
        FinetuneConfig(method="qlora")
    with pytest.raises(UserError, match="--data"):
        ft_main(["--base", bilingual_base, "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o"), "--full"])
