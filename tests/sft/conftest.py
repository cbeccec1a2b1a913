"""Shared SFT fixtures: a tiny local chat tokenizer (BPE on bundled text + the ChatML template with
generation markers in tests/fixtures/sft) and LLaVA-Bench conversations."""

from __future__ import annotations

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "sft"
QA90 = REPO / "data" / "sample" / "llava_qa90"


@pytest.fixture(scope="session")
def chat_tok_dir(tmp_path_factory):
    from transforms.sft_template import build_chat_tokenizer
    from transforms.tokens import read_sample_captions

    texts = read_sample_captions(REPO / "data" / "sample")[:3000]
    for line in (QA90 / "qa90_vqa.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        texts += [r["question"], r["answer"]]
    return build_chat_tokenizer(tmp_path_factory.mktemp("chat_tok"), FIX / "chatml_generation.jinja", texts, vocab_size=1024)


@pytest.fixture(scope="session")
def qa90_records():
    return [json.loads(x) for x in (QA90 / "qa90_vqa.jsonl").read_text(encoding="utf-8").splitlines()]
