"""The output contract: messages, schema, every validation reason, the faithfulness rule, the offline template."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

from rewriter import prompts
from rewriter.offline import OFFLINE_MODEL, OfflineTemplateBackend, template_rewrite, tidy
from schemas import reasons


def good(caption: str, question: str = "What is shown?") -> str:
    return json.dumps({"qa": [{"question": question, "answer": caption}], "caption": caption})


def real_captions(sample_dir) -> list[str]:
    with open(sample_dir / "cc3m_val_captions_8k.tsv", encoding="utf-8", newline="") as f:
        cc3m = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    laion = pq.read_table(sample_dir / "img2dataset_sample_1000.parquet").column("TEXT").to_pylist()
    return cc3m + [c for c in laion if c]


def test_messages_and_response_format():
    msgs = prompts.build_messages("  dog   on beech\n beech ")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"] == "Raw caption: dog on beech beech"
    rf = prompts.response_format()
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["schema"] is prompts.OUTPUT_SCHEMA
    assert rf["json_schema"]["schema"]["required"] == ["qa", "caption"]
    assert len(prompts.build_messages("x" * 5000)[1]["content"]) == len("Raw caption: ") + prompts.MAX_INPUT_CHARS


@pytest.mark.parametrize(
    "text, finish, reason",
    [
        (good("A dog."), "length", reasons.REWRITE_TRUNCATED),
        ('{"qa": [{"question": "q", "ans', "length", reasons.REWRITE_TRUNCATED),
        ("", "stop", reasons.REWRITE_EMPTY),
        ("   ", "stop", reasons.REWRITE_EMPTY),
        (None, "stop", reasons.REWRITE_EMPTY),
        ('{"qa": [{"question": "q", "answer": "a"}], "caption": ', "stop", reasons.REWRITE_INVALID_JSON),
        ("Sure! Here is the JSON:", "stop", reasons.REWRITE_INVALID_JSON),
        ('["a dog"]', "stop", reasons.REWRITE_OFF_FORMAT),
        ('{"qa": [{"question": "q", "answer": "A dog."}]}', "stop", reasons.REWRITE_OFF_FORMAT),
        ('{"qa": "A dog.", "caption": "A dog."}', "stop", reasons.REWRITE_OFF_FORMAT),
        ('{"qa": [{"question": "q"}], "caption": "A dog."}', "stop", reasons.REWRITE_OFF_FORMAT),
        ('{"qa": [{"question": "q", "answer": 3}], "caption": "A dog."}', "stop", reasons.REWRITE_OFF_FORMAT),
        ('{"qa": [{"question": "q", "answer": "A dog."}], "caption": "A dog.", "x": 1}', "stop",
         reasons.REWRITE_OFF_FORMAT),
        (json.dumps({"qa": [{"question": "q", "answer": "a"}] * 5, "caption": "a"}), "stop", reasons.REWRITE_OFF_FORMAT),
        (json.dumps({"qa": [{"question": "q", "answer": "a" * 401}], "caption": "a"}), "stop",
         reasons.REWRITE_OFF_FORMAT),
        (good("A dog."), "content_filter", reasons.REWRITE_OFF_FORMAT),
        ('{"qa": [], "caption": "A dog."}', "stop", reasons.REWRITE_EMPTY),
        ('{"qa": [{"question": "q", "answer": "  "}], "caption": "A dog."}', "stop", reasons.REWRITE_EMPTY),
        ('{"qa": [{"question": "q", "answer": "A dog."}], "caption": " "}', "stop", reasons.REWRITE_EMPTY),
        (good("A dog in a city."), "stop", reasons.REWRITE_UNFAITHFUL),
        (good("A dog in Paris."), "stop", reasons.OK),
    ],
)
def test_validate_reasons(text, finish, reason):
    ok, got, parsed = prompts.validate("a dog in Paris", text, finish)
    assert got == reason
    assert ok is (reason == reasons.OK)
    assert (parsed is not None) is ok


def test_validate_normalises_whitespace_and_drops_empty_answers():
    text = json.dumps({"qa": [{"question": " Where?\n", "answer": " A  dog in\tParis. "},
                              {"question": "Why?", "answer": ""}], "caption": "A dog  in Paris."})
    ok, reason, parsed = prompts.validate("a dog in Paris", text, "stop")
    assert (ok, reason) == (True, "ok")
    assert parsed == {"qa": [{"question": "Where?", "answer": "A dog in Paris."}], "caption": "A dog in Paris."}


@pytest.mark.parametrize(
    "raw, adopted, ok",
    [
        ("3 dogs on a beach", "Three dogs on a beach.", True),  # 0-20 may be spelled out
        ("3 dogs on a beach", "Dogs on a beach.", False),
        ("21 dogs on a beach", "Twenty-one dogs on a beach.", False),  # only 0-20 spelled
        ("price 2,200 dollars", "It costs 2200 dollars.", True),  # thousands separator
        ("a 4.7 inch phone", "A 4.70 inch phone.", False),  # decimals compare as written
        ("Lille and Roux celebrate their goal", "Two men celebrate a goal.", False),  # Roux: mid-segment capital
        ("Lille and Roux celebrate their goal", "Roux celebrates a goal.", True),  # Lille starts the segment
        ("Big Ben clock in London, England, UK", "A clock tower.", False),  # acronym UK
        ("Big Ben Clock In London England", "A clock tower.", True),  # Title Case: capitals say nothing
        ("leaked photo of the new iPhone", "A leaked phone photo.", False),  # mixed case
        ("leaked photo of the new iPhone", "A leaked IPHONE photo.", True),  # case-insensitive
        ("dragon 3D Print 14466", "A dragon print 14466.", False),  # 3 from 3D is a number
        ("!!! $$$ 123 ###", "Symbols.", True),  # garbage: exempt
        ("ok", "Fine.", True),  # fewer than two words: garbage, exempt
    ],
)
def test_faithfulness_rule(raw, adopted, ok):
    assert prompts.check_faithful(raw, adopted)[0] is ok


def test_unfaithful_detail_names_what_is_missing():
    raw = "singer Geri Halliwell attends the awards in London on 1st December 2017 , UK"
    ok, detail = prompts.check_faithful(raw, "A singer at an awards show.")
    assert not ok
    assert detail == "missing from the adopted caption: 1, 2017, Geri, Halliwell, London, December, UK"
    assert prompts.check_faithful(raw, "Geri Halliwell at the awards in London, UK, on December 1, 2017.") == (True, "")


def test_garbage_and_constraints():
    assert prompts.is_garbage("$$$ 123")
    assert prompts.is_garbage("a b c 1 2 3")
    assert not prompts.is_garbage("a dog on the beach")
    c = prompts.faithfulness_constraints("1 Bedroom House for sale in 39 Main Road, Gatehead KA2 0AR")
    assert c.numbers == ("1", "39", "2", "0")
    assert c.entities == ()  # KA2 / 0AR hold digits: number rule only; the rest is Title Case


def test_tidy_template():
    assert tidy("a  dog on the the beach ,in Nice") == "A dog on the beach, in Nice."
    assert tidy("price 2,200 ok") == "Price 2,200 ok."
    assert tidy("Wow!") == "Wow!"
    assert tidy("   ") == ""
    out = template_rewrite("dog dog on beach")
    assert out == {"qa": [{"question": "What does the image show?", "answer": "Dog on beach."}], "caption": "Dog on beach."}


def test_offline_template_is_faithful_on_all_real_sample_captions(sample_dir):
    """The template only removes adjacent repeats, so the faithfulness rule never fires on it."""
    import asyncio

    backend = OfflineTemplateBackend()
    assert backend.model == OFFLINE_MODEL
    captions = real_captions(sample_dir)
    assert len(captions) > 8900

    async def all_verdicts():
        out = []
        for c in captions:
            comp = await backend.complete(c)
            out.append(prompts.validate_detailed(c, comp.text, comp.finish_reason))
        return out

    verdicts = asyncio.run(all_verdicts())
    unfaithful = [(c, v.detail) for c, v in zip(captions, verdicts) if v.reason == reasons.REWRITE_UNFAITHFUL]
    assert unfaithful == []
    # Long captions exceed the schema's caption bound, exactly like a model answer would.
    too_long = sum(1 for c in captions if len(tidy(c)) > prompts.MAX_CAPTION_CHARS)
    assert sum(v.reason == reasons.REWRITE_OFF_FORMAT for v in verdicts) == too_long
    assert sum(v.ok for v in verdicts) == len(captions) - too_long - sum(not tidy(c) for c in captions)
