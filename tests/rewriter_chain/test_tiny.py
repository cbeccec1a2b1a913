"""The tiny model builder: tokenizer, chat template, EOS wiring, determinism."""

from __future__ import annotations

import json
import os

import pytest

from rewriter import prompts
from rewriter.tiny import END, TinyModelConfig, main as tiny_main, make_tiny_model
from schemas.errors import UserError


def test_tiny_model_files_and_tokenizer(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert os.path.isfile(os.path.join(tiny_model, name)), name
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = AutoConfig.from_pretrained(tiny_model)
    assert len(tok) == cfg.vocab_size == TinyModelConfig().vocab_size
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)
    end_id = tok.convert_tokens_to_ids(END)
    assert tok.eos_token_id == cfg.eos_token_id == end_id
    assert json.load(open(os.path.join(tiny_model, "generation_config.json")))["eos_token_id"] == end_id
    text = '{"qa": [{"question": "Who?", "answer": "A dog."}], "caption": "A dog."}'
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips
    rendered = tok.apply_chat_template(prompts.build_messages("a dog"), tokenize=False, add_generation_prompt=True)
    assert rendered == (f"<|system|>\n{prompts.SYSTEM_PROMPT}<|end|>\n<|user|>\nRaw caption: a dog<|end|>\n"
                        "<|assistant|>\n")
    # The tokenizer was trained on the prompt: the system prompt costs far fewer tokens than bytes.
    assert len(tok(prompts.SYSTEM_PROMPT)["input_ids"]) < len(prompts.SYSTEM_PROMPT) / 3


def test_same_seed_same_model(tmp_path, cc3m_captions):
    a = make_tiny_model(str(tmp_path / "a"), cc3m_captions[:300], TinyModelConfig(vocab_size=400))
    b = make_tiny_model(str(tmp_path / "b"), cc3m_captions[:300], TinyModelConfig(vocab_size=400))
    c = make_tiny_model(str(tmp_path / "c"), cc3m_captions[:300], TinyModelConfig(vocab_size=400, seed=1))
    for name in ("model.safetensors", "tokenizer.json"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name
    assert open(os.path.join(a, "model.safetensors"), "rb").read() != open(os.path.join(c, "model.safetensors"), "rb").read()


def test_config_and_cli_errors(tmp_path):
    with pytest.raises(ValueError):
        TinyModelConfig(vocab_size=100)
    with pytest.raises(ValueError):
        TinyModelConfig(hidden_size=63)
    with pytest.raises(UserError, match="--corpus"):
        tiny_main(["--output", str(tmp_path / "m"), "--corpus", str(tmp_path / "missing.tsv")])
