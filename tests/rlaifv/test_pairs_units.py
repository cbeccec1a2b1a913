"""Pair sampling rules (margin, ties, cap, length control, seed), labeler answer parsing, image parts
checked by the stand-in, and config validation."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from rewriter.client import ClientConfig, Completion, RequestFailed, RewriteClient
from rewriter.standin import StandInServer
from schemas.records import Pair
from schemas.rlaifv import PAIR_META_KEY, canonical_json, get_doc
from transforms.rlaifv import GenerateConfig, PairsConfig, make_pairs, parse_answer

from .responder import respond


def _record(scores, texts=None):
    texts = texts or [f"answer {i}" for i in range(len(scores))]
    responses = [{"i": i, "status": "ok", "text": t, "score": s} for i, (s, t) in enumerate(zip(scores, texts))]
    return Pair(key="img", meta=canonical_json({"rlaifv": {"prompt": "p?", "responses": responses}}))


def _pairs(outcomes):
    assert len(outcomes) == 1 and outcomes[0].key == "img"  # one outcome per input record
    if outcomes[0].status != "kept":
        return []
    return [(p["chosen_i"], p["rejected_i"]) for p in get_doc(outcomes[0].pair.meta, PAIR_META_KEY)["pairs"]]


def test_margin_ties_and_cap():
    rec = _record([0, -1, -3, 0])
    # all qualifying pairs (no cap): ties (0, 3) never; chosen is the higher score
    assert sorted(_pairs(make_pairs(rec, PairsConfig(margin=1, max_pairs_per_image=None)))) == \
        [(0, 1), (0, 2), (1, 2), (3, 1), (3, 2)]
    assert sorted(_pairs(make_pairs(rec, PairsConfig(margin=2, max_pairs_per_image=None)))) == \
        [(0, 2), (1, 2), (3, 2)]
    capped = make_pairs(rec, PairsConfig(margin=1, max_pairs_per_image=2, seed=3))
    assert len(_pairs(capped)) == 2 and capped == make_pairs(rec, PairsConfig(margin=1, max_pairs_per_image=2, seed=3))
    assert set(_pairs(capped)) <= {(0, 1), (0, 2), (1, 2), (3, 1), (3, 2)}


def test_all_ties_reject_with_reason():
    out = make_pairs(_record([-1, -1, -1]), PairsConfig())
    assert [(o.status, o.reason) for o in out] == [("rejected", "rlaifv_no_pair")]


def test_length_ratio_drops_unbalanced_pairs():
    rec = _record([0, -1, -1], ["short", "tiny!", "a much much longer answer here"])
    assert sorted(_pairs(make_pairs(rec, PairsConfig(max_pairs_per_image=None, max_length_ratio=1.5)))) == [(0, 1)]


def test_balance_lengths_alternates_chosen_shorter_and_longer():
    # scores 0, -1, -2, -3 with lengths 10, 2, 4, 6: chosen longer in (0,1) (0,2) (0,3); shorter in (1,2) (1,3)
    # (2,3); every pair qualifies, so the cap decides
    rec = _record([0, -1, -2, -3], ["x" * 10, "x" * 2, "x" * 4, "x" * 6])
    for seed in range(20):
        picked = _pairs(make_pairs(rec, PairsConfig(max_pairs_per_image=2, seed=seed, balance_lengths=True)))
        assert len(picked) == 2 and sum(c == 0 for c, _ in picked) == 1, (seed, picked)  # one of each
    # without the control some seeds take two of one kind
    kinds = {tuple(sorted(c == 0 for c, _ in _pairs(make_pairs(rec, PairsConfig(max_pairs_per_image=2, seed=s)))))
             for s in range(20)}
    assert kinds - {(False, True)}
    # uncapped: the control changes the order only, not the set
    full = PairsConfig(max_pairs_per_image=None)
    assert sorted(_pairs(make_pairs(rec, dataclasses.replace(full, balance_lengths=True)))) == \
        sorted(_pairs(make_pairs(rec, full)))


def test_parse_answer_yes_no_only():
    assert parse_answer(Completion(text='{"answer": "no"}', finish_reason="stop"))["answer"] == "no"
    assert parse_answer(Completion(text=" Yes ", finish_reason="stop"))["answer"] == "yes"
    assert parse_answer(Completion(text='{"answer": "maybe"}', finish_reason="stop")) is None
    assert parse_answer(Completion(text="", finish_reason="stop")) is None
    lp = [{"token": "{", "logprob": -0.1, "top": {}}, {"token": "yes", "logprob": -0.2, "top": {"no": -1.7}}]
    a = parse_answer(Completion(text='{"answer":"yes"}', finish_reason="stop", logprobs=lp))
    assert (a["logprob_yes"], a["logprob_no"]) == (-0.2, -1.7)
    # a small vocabulary (the tiny BLIP-2 served by vLLM): the value starts with token "y" or "n", and the
    # "n" of "answer" must not count; the chosen token's own logprob wins over a duplicate in its top list
    toks = ['{', '"', 'a', 'n', 's', 'w', 'e', 'r', '"', ':', '"', 'y', 'es', '"', '}']
    tops = {2: {"a": -0.46, "answer": -1.1}, 3: {"n": 0.0}, 11: {"n": -1.63, "y": -0.22}, 12: {"e": -1.8, "es": -0.17}}
    lp = [{"token": t, "logprob": tops.get(i, {}).get(t, 0.0), "top": tops.get(i, {})} for i, t in enumerate(toks)]
    a = parse_answer(Completion(text='{"answer":"yes"}', finish_reason="stop", logprobs=lp))
    assert (a["answer"], a["logprob_yes"], a["logprob_no"]) == ("yes", -0.22, -1.63)
    # a large vocabulary: '"no' holds the value's first character after the quote
    lp = [{"token": '{"answer":', "logprob": -0.01, "top": {}},
          {"token": ' "no', "logprob": -0.3, "top": {' "no': -0.3, ' "yes': -1.4, ' "maybe': -4.0}},
          {"token": '"}', "logprob": 0.0, "top": {}}]
    a = parse_answer(Completion(text='{"answer": "no"}', finish_reason="stop", logprobs=lp))
    assert (a["answer"], a["logprob_yes"], a["logprob_no"]) == ("no", -1.4, -0.3)


def test_standin_rejects_image_parts_that_are_not_data_urls():
    async def go(url):
        client = RewriteClient(ClientConfig(endpoint=srv.base_url, model="m", max_retries=0))
        try:
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "q"}]}]
            return await client.complete_messages(msgs, params={"seed": 1})
        finally:
            await client.aclose()

    with StandInServer(respond_body=respond) as srv:
        for url in ("http://example.com/a.png", "data:image/png;base64,bm90IGFuIGltYWdl"):
            with pytest.raises(RequestFailed) as e:
                asyncio.run(go(url))
            assert e.value.reason == "rewrite_client_error" and e.value.detail == "http_400"
        assert [r.fault for r in srv.seen] == ["bad_image", "bad_image"]


def test_config_validation():
    pol = ClientConfig(endpoint="http://x/v1", model="m")
    for bad in ({"n": 1}, {"top_p": 0.0}, {"prompt_source": "web"}):
        with pytest.raises(ValueError):
            GenerateConfig(policy=pol, **bad)
    for bad in ({"margin": 0}, {"max_pairs_per_image": 0}, {"max_length_ratio": 0.5}):
        with pytest.raises(ValueError):
            PairsConfig(**bad)
    assert json.loads(canonical_json({"b": 1, "a": "é"})) == {"a": "é", "b": 1}
