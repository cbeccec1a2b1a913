"""SFT tokens: the tokenizer's own chat template (transformers' ``apply_chat_template``), assistant-only
labels, MiniCPM-V image placeholders, truncation at a turn boundary; and a tiny chat tokenizer builder.

Labels rule: a token is trained (label = its id) when it lies in an assistant message's content or in
the end-of-turn token (the tokenizer's ``eos_token``) that closes it; every other token (system, user,
role headers, image placeholders, the template's separators) gets -100. The rule is computed from the
rendered text alone, without the template's ``{% generation %}`` markers, so transformers'
``return_assistant_tokens_mask`` is an independent check of it (tests/sft/test_template.py).
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Iterable

from schemas.errors import UserError
from schemas.packed import IGNORE_INDEX
from transforms.tokens import IM_END, IM_START, MINICPMV_SPECIALS, SLICE_END, SLICE_START, UNK, image_placeholder_ids

CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")
INSTALL_HINT = "pip install 'mmcorpus[finetune]' (sft pack applies the tokenizer's chat template with transformers)"


class SftTooLong(Exception):
    """The conversation does not fit ``seq_len`` (even cut at its first turn when truncation is on)."""


@dataclass
class SftTokens:
    """One templated conversation: tokens, labels, its image span, and where each turn pair ends."""

    input_ids: list[int]
    labels: list[int]
    image_offset: int | None = None
    image_length: int = 0
    turn_ends: list[int] = field(default_factory=list)  # token index after each assistant turn's end
    truncated_turns: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def load_chat_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer from a local directory whose ``tokenizer_config.json`` (or
    ``chat_template.jinja``) holds a chat template; ``UserError`` with the fix otherwise."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UserError(f"--tokenizer {path}: {INSTALL_HINT}") from e
    p = pathlib.Path(path)
    if not p.is_dir():
        raise UserError(f"--tokenizer {path}: pass a tokenizer directory (tokenizer.json + tokenizer_config.json with a chat_template)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise UserError(f"--tokenizer {path}: transformers cannot load it ({type(e).__name__}: {str(e)[:200]})") from e
    if not getattr(tok, "chat_template", None):
        raise UserError(f"--tokenizer {path}: has no chat_template; add one to its tokenizer_config.json")
    if tok.eos_token is None:
        raise UserError(f"--tokenizer {path}: has no eos_token (the end-of-turn token the labels must include)")
    missing = [t for t in (UNK, IM_START, IM_END, SLICE_START, SLICE_END) if t not in tok.get_vocab()]
    if missing:
        raise UserError(f"--tokenizer {path}: lacks the MiniCPM-V special token(s) {missing}")
    return tok


class ChatTemplater:
    """Renders ``SftSample.messages()`` with the tokenizer's chat template and labels the tokens.

    Args:
        tokenizer: a transformers tokenizer (``load_chat_tokenizer``).
        query_num: q, query tokens per image/slice for the placeholder span.

    Example:
        t = ChatTemplater(load_chat_tokenizer("tok_dir"), query_num=64)
        toks = t.tokens(sample.messages(), grid=(2, 1))
    """

    def __init__(self, tokenizer, query_num: int = 96):
        self.tok = tokenizer
        self.query_num = query_num
        vocab = tokenizer.get_vocab()
        self.ids = {
            "unk": vocab[UNK], "im_start": vocab[IM_START], "im_end": vocab[IM_END],
            "slice_start": vocab[SLICE_START], "slice_end": vocab[SLICE_END],
        }
        self.newline_ids = tokenizer.encode("\n", add_special_tokens=False)
        self.eot = tokenizer.eos_token

    def render(self, messages: list[dict[str, str]], **kw) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, **kw)

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], list[int]]:
        """The rendered text, the ``[start, end)`` character spans of trained text (each assistant
        content through its end-of-turn token), and the character end of each assistant message."""
        full = self.render(messages)
        spans, ends = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError("chat template is not prefix-stable: rendering a prefix of the conversation changes earlier text")
            start = full.find(m["content"], len(before), len(upto)) if m["content"] else -1
            start = len(before) if start < 0 else start
            content_end = start + len(m["content"])
            eot = full.find(self.eot, content_end, len(upto))
            end = eot + len(self.eot) if eot >= 0 else len(upto)
            spans.append((start, end))
            ends.append(len(upto))
        return full, spans, ends

    def mask_mismatches(self, messages: list[dict[str, str]]) -> int:
        """Tokens where our labels (before image expansion) disagree with transformers'
        ``return_assistant_tokens_mask`` (needs ``{% generation %}`` in the template); -1 when the
        token ids themselves differ."""
        ref = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ours = self.tokens(messages, has_image=False, expand_image=False)
        if list(ref["input_ids"]) != ours.input_ids:
            return -1
        return sum((lab != IGNORE_INDEX) != bool(m) for lab, m in zip(ours.labels, ref["assistant_masks"]))

    def tokens(self, messages: list[dict[str, str]], grid: tuple[int, int] | None = None, has_image: bool = False,
               expand_image: bool = True) -> SftTokens:
        """Tokens and labels of a conversation; the ``<image>`` marker (when ``has_image``) becomes
        the MiniCPM-V placeholder span for ``grid`` (None: overview only)."""
        text, spans, ends = self.assistant_spans(messages)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        si = 0
        for t, (a, b) in enumerate(offsets):
            while si < len(spans) and a >= spans[si][1]:
                si += 1
            if si < len(spans) and b > a and spans[si][0] <= a and b <= spans[si][1]:
                labels[t] = ids[t]
        turn_ends = []
        ti = 0
        for t, (a, b) in enumerate(offsets):
            while ti < len(ends) and b >= ends[ti]:
                turn_ends.append(t + 1)
                ti += 1
        turn_ends += [len(ids)] * (len(ends) - len(turn_ends))
        out = SftTokens(input_ids=ids, labels=labels, turn_ends=turn_ends)
        if not expand_image:
            return out
        marks = [t for t, x in enumerate(ids) if x == self.ids["im_start"]]
        if has_image:
            if len(marks) != 1:
                raise ValueError(f"expected one {IM_START} marker token for the image, found {len(marks)}")
            p = marks[0]
            span = image_placeholder_ids(grid, self.query_num, self.ids, self.newline_ids)
            out.input_ids = ids[:p] + span + ids[p + 1:]
            out.labels = labels[:p] + [IGNORE_INDEX] * len(span) + labels[p + 1:]
            out.image_offset, out.image_length = p, len(span)
            out.turn_ends = [e + len(span) - 1 if e > p else e for e in turn_ends]
        elif marks:
            raise ValueError(f"{IM_START} in a conversation without an image")
        return out


def has_generation_markers(tokenizer) -> bool:
    return "generation" in (tokenizer.chat_template or "") and "endgeneration" in tokenizer.chat_template


def fit(toks: SftTokens, seq_len: int, truncate: bool) -> SftTokens:
    """``toks`` when it fits; else, with ``truncate``, cut after the last whole turn pair that fits
    (never inside the image span); else ``SftTooLong``."""
    if len(toks) <= seq_len:
        return toks
    if truncate:
        keep = [e for e in toks.turn_ends if e <= seq_len]
        if keep and (toks.image_offset is None or toks.image_offset + toks.image_length <= keep[-1]):
            cut = keep[-1]
            return SftTokens(
                input_ids=toks.input_ids[:cut], labels=toks.labels[:cut], image_offset=toks.image_offset,
                image_length=toks.image_length, turn_ends=keep, truncated_turns=len(toks.turn_ends) - len(keep),
            )
    raise SftTooLong(f"{len(toks)} tokens > seq_len {seq_len}" + (" (first turn alone does not fit)" if truncate else ""))


# --- a tiny chat tokenizer (tests, bench, the README example) -------------------------------------


def build_chat_tokenizer(output_dir: str | os.PathLike, chat_template_path: str | os.PathLike, texts: Iterable[str], vocab_size: int = 2048) -> str:
    """Train a small byte-level BPE on ``texts`` with MiniCPM-V's and ChatML's special tokens and
    save it as a transformers tokenizer dir whose ``tokenizer_config.json`` holds the chat template
    read from ``chat_template_path``. Returns the directory."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise UserError(INSTALL_HINT) from e
    specials = list(MINICPMV_SPECIALS) + list(CHATML_SPECIALS)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    template = pathlib.Path(chat_template_path).read_text(encoding="utf-8")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=[t for t in specials if t not in (UNK, "<s>", "<|im_end|>", "<pad>")],
    )
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # The template lives in tokenizer_config.json, as in most model repos (newer transformers write
    # chat_template.jinja instead; both load).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    return str(out)
