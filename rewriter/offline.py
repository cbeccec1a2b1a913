"""The ``offline-template`` backend: a deterministic caption → QA template for dry runs, no model at all.

It exists so the demo and CI run the rewrite stage in well under a second without a GPU or a server.
It is *not* a rewriter: it tidies the caption mechanically and wraps it in one question–answer pair,
and every row it produces says so (``rewrite_model = "offline-template"`` in the data and the ledger).
For real rewriting use ``--backend openai`` against a vLLM (or OpenAI) endpoint.

The template:

1. collapse whitespace, drop a space before ``, . ; : ! ?``;
2. drop an immediately repeated word (case-insensitive: ``beach beach`` → ``beach``);
3. upper-case the first letter and end with a full stop (``。`` for a Chinese or Japanese caption);
4. answer ``{"qa": [{"question": "What does the image show?", "answer": T}], "caption": T}``, with the
   question in the caption's prompt language (``prompts.prompt_language``: ``图片里有什么？`` for
   Chinese, ``画像には何が写っていますか？`` for Japanese, ``이미지에 무엇이 있나요?`` for Korean).

Because it only removes adjacent repeats, every number and name of the caption survives, so its output
passes the faithfulness rule of ``rewriter.prompts`` by construction (a test checks that on the sample
data). Captions longer than the schema allows come back as ``rewrite_off_format``, like a model's would.

Example:
    >>> template_rewrite("a  dog on the the beach ,in Nice")["caption"]
    'A dog on the beach, in Nice.'
"""

from __future__ import annotations

import re

from rewriter import prompts
from rewriter.client import Completion

OFFLINE_MODEL = "offline-template"
QUESTION = "What does the image show?"
# The template's question in each prompt language (``prompts.PROMPTS``); a full stop to end with.
QUESTIONS = {"en": QUESTION, "zh": "图片里有什么？", "ja": "画像には何が写っていますか？", "ko": "이미지에 무엇이 있나요?"}
FULL_STOPS = {"zh": "。", "ja": "。"}

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_PUNCT_NO_SPACE = re.compile(r"([,;])(?=[^\s\d])")


def _drop_adjacent_repeats(text: str) -> str:
    out: list[str] = []
    for tok in text.split(" "):
        if out and tok and tok.lower() == out[-1].lower():
            continue
        out.append(tok)
    return " ".join(out)


def tidy(caption: str) -> str:
    """The template's caption clean-up (steps 1–3 of the module doc)."""
    text = " ".join((caption or "").split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _PUNCT_NO_SPACE.sub(r"\1 ", text)
    text = _drop_adjacent_repeats(text)
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?。！？":
        text += FULL_STOPS.get(prompts.prompt_language(text), ".")
    return text


def template_rewrite(caption: str) -> dict:
    """``{"qa": [...], "caption": ...}`` for one caption."""
    t = tidy(caption)
    return {"qa": [{"question": QUESTIONS[prompts.prompt_language(t)], "answer": t}], "caption": t}


class OfflineTemplateBackend:
    """Same interface as ``rewriter.client.RewriteClient`` (``complete``/``aclose``), no network."""

    model = OFFLINE_MODEL

    async def complete(self, caption: str) -> Completion:
        out = template_rewrite(caption)
        text = prompts.render_output(out["qa"], out["caption"])
        return Completion(text=text, finish_reason="stop", completion_tokens=len(text.split()))

    async def aclose(self) -> None:
        return None
