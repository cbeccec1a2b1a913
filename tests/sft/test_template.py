"""Chat template + assistant-only labels, checked against transformers' return_assistant_tokens_mask."""

from __future__ import annotations

import json

import pytest

from schemas.packed import IGNORE_INDEX
from transforms.sft_template import ChatTemplater, SftTooLong, fit, load_chat_tokenizer


def _conversations(qa90_records):
    """Real conversations: LLaVA-Bench QA (one turn each), the three questions on one image as one
    multi-turn conversation, with and without a system prompt, and a text-only one."""
    convs = []
    for r in qa90_records[:12]:
        convs.append([{"role": "user", "content": "<image>\n" + r["question"]}, {"role": "assistant", "content": r["answer"]}])
    for i in range(0, 9, 3):
        msgs = [{"role": "system", "content": "Answer about the photo."}] if i == 3 else []
        for j, r in enumerate(qa90_records[i:i + 3]):
            q = ("<image>\n" if j == 0 else "") + r["question"]
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r["answer"]}]
        convs.append(msgs)
    convs.append([{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}])
    return convs


def test_template_comes_from_tokenizer_config(chat_tok_dir):
    import pathlib

    cfg = json.loads((pathlib.Path(chat_tok_dir) / "tokenizer_config.json").read_text())
    assert "{% generation %}" in cfg["chat_template"]
    assert not (pathlib.Path(chat_tok_dir) / "chat_template.jinja").exists()
    tok = load_chat_tokenizer(chat_tok_dir)
    assert tok.chat_template == cfg["chat_template"]


def test_labels_equal_transformers_assistant_mask(chat_tok_dir, qa90_records):
    tok = load_chat_tokenizer(chat_tok_dir)
    t = ChatTemplater(tok, query_num=8)
    im = tok.convert_tokens_to_ids("<image>")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    checked = 0
    for msgs in _conversations(qa90_records):
        has_image = any("<image>" in m["content"] for m in msgs)
        ours = t.tokens(msgs, grid=None, has_image=has_image)
        ids, labels = ours.input_ids, ours.labels
        if has_image:  # fold the placeholder span back into the one <image> token to compare
            o, n = ours.image_offset, ours.image_length
            assert labels[o:o + n] == [IGNORE_INDEX] * n
            ids = ids[:o] + [im] + ids[o + n:]
            labels = labels[:o] + [IGNORE_INDEX] + labels[o + n:]
        ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"])
        mask = list(ref["assistant_masks"])
        assert sum(mask) > 0
        assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in mask]
        assert all(lab == i for lab, i in zip(labels, ids) if lab != IGNORE_INDEX)
        # every end-of-turn token closing an assistant turn is trained; the user turns' are not
        n_asst = sum(m["role"] == "assistant" for m in msgs)
        assert sum(1 for lab in labels if lab == eot) == n_asst
        checked += 1
    assert checked == 16


def test_image_placeholder_span_follows_slicing(chat_tok_dir):
    tok = load_chat_tokenizer(chat_tok_dir)
    t = ChatTemplater(tok, query_num=4)
    msgs = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]
    plain = t.tokens(msgs, grid=None, has_image=True)
    sliced = t.tokens(msgs, grid=(2, 1), has_image=True)
    # overview <image> + 4 <unk> + </image>; sliced adds <slice> + 2 slices of 6 + </slice> (one row: no newline)
    assert plain.image_length == 6 and sliced.image_length == 6 + 1 + 12 + 1
    assert len(sliced) - len(plain) == 14
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<image>", "</image>", "<unk>", "<slice>", "</slice>")}
    o = sliced.image_offset
    span = sliced.input_ids[o:o + sliced.image_length]
    one = [ids["<image>"]] + [ids["<unk>"]] * 4 + [ids["</image>"]]
    assert span == one + [ids["<slice>"]] + one + one + [ids["</slice>"]]
    assert sliced.labels[o:o + sliced.image_length] == [IGNORE_INDEX] * sliced.image_length
    with pytest.raises(ValueError, match="without an image"):
        t.tokens(msgs, has_image=False)


def test_too_long_and_turn_boundary_truncation(chat_tok_dir, qa90_records):
    tok = load_chat_tokenizer(chat_tok_dir)
    t = ChatTemplater(tok, query_num=4)
    msgs = []
    for j, r in enumerate(qa90_records[0:3]):
        msgs += [{"role": "user", "content": ("<image>\n" if j == 0 else "") + r["question"]}, {"role": "assistant", "content": r["answer"]}]
    full = t.tokens(msgs, has_image=True)
    assert len(full.turn_ends) == 3 and full.turn_ends[-1] == len(full)
    with pytest.raises(SftTooLong):
        fit(full, len(full) - 1, truncate=False)
    cut = fit(full, full.turn_ends[1] + 5, truncate=True)
    assert len(cut) == full.turn_ends[1] and cut.truncated_turns == 1
    # the kept prefix is exactly the template applied to the first two turns
    two = t.tokens(msgs[:4], has_image=True)
    assert cut.input_ids == two.input_ids and cut.labels == two.labels
    with pytest.raises(SftTooLong, match="first turn"):
        fit(full, full.turn_ends[0] - 1, truncate=True)
