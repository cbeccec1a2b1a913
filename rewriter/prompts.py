"""Versioned rewriter prompt, the JSON output contract, and the validation every response passes.

The MiniCPM-V recipe turns a noisy web caption into question–answer pairs about the image and adopts
the answer as the new caption. Here the model answers one JSON object (``OUTPUT_SCHEMA``)::

    {"qa": [{"question": "What does the image show?", "answer": "A dog on a beach."}],
     "caption": "A dog on a beach."}

``caption`` is the adopted caption (normally one of the answers, or a fluent merge of them). The
prompt text, the schema and the validation rules together are versioned by ``PROMPT_VERSION``: change
any of them and bump it, because the version goes into the response cache key and every ledger row.

Validation (``validate``) turns a completion into ``(ok, reason, parsed)``; the reasons, checked in
this order, are the ones in ``schemas.reasons``:

- ``rewrite_truncated``: ``finish_reason == "length"`` (the JSON may parse, but the model was cut off);
- ``rewrite_empty``: no text, or ``qa`` has no pair with a non-empty answer, or ``caption`` is blank;
- ``rewrite_invalid_json``: the text is not one JSON value;
- ``rewrite_off_format``: valid JSON that does not match ``OUTPUT_SCHEMA`` (wrong types, missing or
  extra keys, too many pairs, over-long strings), or a ``finish_reason`` other than ``stop``;
- ``rewrite_unfaithful``: the faithfulness rule below fails.

Faithfulness rule (no NER model is available offline, so the rule is lexical and documented exactly):

1. Numbers: every digit run in the raw caption (``2,200`` is one number, ``4.7`` is one number,
   ``24th`` gives ``24``, ``8x10`` gives ``8`` and ``10``) must appear as a number in the adopted
   caption; ``0``–``20`` may also appear spelled out (``3`` ↔ ``three``).
2. Named entities: these words of the raw caption must appear in the adopted caption (case-insensitive,
   whole words):
   a. capitalised words that do not start a sentence/segment and are not function words
      (``the``, ``of``, ...) — only when the caption is not in Title Case (more than 75% of its
      content words capitalised: then capitals mark style, not names);
   b. acronyms: all-capital words of 2+ letters (``UK``, ``NASA``) — unless the whole caption shouts;
   c. mixed-case words starting lower-case (``iPhone``, ``eBay``).
   Words with digits are covered by the number rule only.
3. Garbage exemption: the rule does not apply when the raw caption is garbage — fewer than two words of
   two or more letters, or letters are under half of its non-space characters. Rewriting garbage cannot
   preserve it.

4. CJK (a caption with Han, Kana or Hangul; matched by characters, since there are no spaces):
   a. words are Latin-script runs only (``一个红色STOP标识牌`` has the word ``STOP``), so rules 1–2
      apply to the digits and Latin tokens inside CJK text (``iPhone``, ``NBA``, ``T恤`` → ``T`` is
      one letter and exempt);
   b. numbers 0–20 may also appear as Chinese numerals (``3`` ↔ ``三``, ``2`` ↔ ``两``/``二``);
   c. titles in 《书名号》 and spans in 「」『』“” quotes must appear character for character (with or
      without their brackets): they mark works, names and terms;
   d. garbage means fewer than 2 CJK characters plus words, or letters under half of the characters.
   e. Japanese and Korean: the same rules (Kana and Hangul are CJK characters here, never "words", so
      Katakana loanwords and Hangul words are not entities; Latin tokens and digits inside them are);
      numbers 1–10 and 20 may also come back as Korean native number words, as whole words
      (``2`` ↔ ``둘``/``두``: ``고양이 두 마리``); Japanese uses the Han numerals of 4b (``3`` ↔ ``三``).
   f. In a caption written mostly in CJK, a capitalised Latin word after CJK text is mid-segment (rule
      2a: ``삼성 Galaxy``, ``我用Apple手机``) and the Title Case exemption does not apply (CJK has no case).
   Chinese, Japanese and Korean person and place names without such marks are not detected (no NER
   model offline).

Language: ``prompt_language(caption)`` picks the prompt by script: when the caption is mostly CJK
(CJK characters at 1.4 a word against its other words), ``ja`` with Kana, ``ko`` when Hangul
outnumbers Han, else ``zh``; otherwise ``en``.
So Chinese, Japanese and Korean captions are rewritten by a prompt in their own language, and the
English prompt asks for "the language of the raw caption" (Spanish in, Spanish out). The rewriter does
not import the filter's language ID (``rewriter`` must not import ``transforms``); on CJK and mixed
captions the rule agrees with it (tests/rewriter_chain/test_prompt_languages.py).

``faithfulness_constraints(raw)`` exposes what the rule requires for a caption, so its reach can be
measured on real captions (``bench/rewrite_faithfulness.py``).

Example:
    >>> msgs = build_messages("dog on beech beech")
    >>> ok, reason, parsed = validate("a dog in Paris", '{"qa": [{"question": "Where?", '
    ...     '"answer": "A dog in Paris."}], "caption": "A dog in Paris."}', "stop")
    >>> ok, reason, parsed["caption"]
    (True, 'ok', 'A dog in Paris.')
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from schemas import reasons

# v2: per-language prompts (en, zh) and the CJK faithfulness rules. v3: Japanese and Korean prompts,
# the English prompt asks for the caption's language, Korean number words (the cache key changes
# for every caption: a cached v2 answer was asked for and validated under other rules).
PROMPT_VERSION = "qa-v3"

# Bounds that keep one response small enough for a 512-token context (the CPU test server's limit).
MAX_PAIRS = 4
MAX_QUESTION_CHARS = 200
MAX_ANSWER_CHARS = 400
MAX_CAPTION_CHARS = 400
# Longest raw caption put into a prompt; longer ones are cut (the filter stage bounds them anyway).
MAX_INPUT_CHARS = 1000

SYSTEM_PROMPT = (
    "You rewrite noisy web image captions for a vision-language pretraining corpus. "
    "Given a raw caption, write 1 to 4 short question-answer pairs about what the image shows, "
    "using only facts stated in the caption. Fix grammar, spelling and repeated words. "
    "Keep every number and every name (people, places, brands, titles, acronyms) exactly as written. "
    "Then give the adopted caption: one fluent sentence that states all facts of the answers. "
    "Write the questions, answers and caption in the language of the raw caption. "
    'Reply with JSON only: {"qa": [{"question": "...", "answer": "..."}], "caption": "..."}'
)

USER_TEMPLATE = "Raw caption: {caption}"

SYSTEM_PROMPT_ZH = (
    "你负责改写用于视觉语言预训练语料的网络图片说明。"
    "根据一条原始说明，用中文写 1 到 4 个关于图片内容的简短问答，只使用说明中给出的事实。"
    "改正语病、错别字和重复的词。数字、人名、地名、品牌、《书名》和英文缩写必须原样保留。"
    "然后给出采用的说明：一句通顺的中文，包含所有回答中的事实。"
    '只回复 JSON：{"qa": [{"question": "...", "answer": "..."}], "caption": "..."}'
)
USER_TEMPLATE_ZH = "原始说明：{caption}"
SYSTEM_PROMPT_JA = (
    "あなたは視覚言語モデルの事前学習コーパスのために、ウェブ画像のキャプションを書き直します。"
    "元のキャプションをもとに、画像に写っているものについての短い質問と回答を日本語で 1〜4 組書いてください。"
    "キャプションに書かれた事実だけを使ってください。文法、誤字、繰り返された語を直してください。"
    "数字、人名、地名、ブランド名、「作品名」、英字の略語は書かれたとおりに残してください。"
    "最後に採用するキャプションとして、すべての回答の事実を含む自然な日本語の一文を書いてください。"
    'JSON だけで答えてください：{"qa": [{"question": "...", "answer": "..."}], "caption": "..."}'
)
USER_TEMPLATE_JA = "元のキャプション：{caption}"
SYSTEM_PROMPT_KO = (
    "당신은 시각-언어 사전학습 말뭉치를 위해 웹 이미지 캡션을 다시 씁니다. "
    "원본 캡션을 바탕으로 이미지에 보이는 것에 대한 짧은 질문과 답변을 한국어로 1~4쌍 쓰세요. "
    "캡션에 적힌 사실만 사용하세요. 문법, 맞춤법, 반복된 단어를 고치세요. "
    "숫자, 사람 이름, 지명, 브랜드, 《작품명》, 영문 약어는 적힌 그대로 유지하세요. "
    "마지막으로 채택할 캡션으로, 모든 답변의 사실을 담은 자연스러운 한국어 한 문장을 쓰세요. "
    'JSON으로만 답하세요: {"qa": [{"question": "...", "answer": "..."}], "caption": "..."}'
)
USER_TEMPLATE_KO = "원본 캡션: {caption}"
PROMPTS = {
    "en": (SYSTEM_PROMPT, USER_TEMPLATE),
    "zh": (SYSTEM_PROMPT_ZH, USER_TEMPLATE_ZH),
    "ja": (SYSTEM_PROMPT_JA, USER_TEMPLATE_JA),
    "ko": (SYSTEM_PROMPT_KO, USER_TEMPLATE_KO),
}
LANGUAGES = tuple(PROMPTS)

_KANA_RE = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL_RE = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_CJK_CLASS = (
    "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
)
_CJK_RE = re.compile(f"[{_CJK_CLASS}]")


# CJK characters per word (COCO-CN vs COCO captions, docs/bilingual.md): a caption is "mostly CJK"
# when its CJK characters make at least as many words as its other words.
CJK_CHARS_PER_WORD = 1.4


def prompt_language(caption: str) -> str:
    """The prompt for a caption, by script: when the caption is mostly CJK (its CJK characters, at
    ``CJK_CHARS_PER_WORD`` a word, are at least as many words as its words of other scripts), ``ja``
    if there is Kana, ``ko`` if Hangul outnumbers Han, else ``zh``; otherwise ``en``, whose prompt
    asks for the caption's own language. Words, not letters, are weighed, so a Latin brand inside a
    Chinese caption ("在Starbucks喝咖啡的女孩") leaves it Chinese, as the filter's language ID says.

    Example:
        >>> [prompt_language(c) for c in ("草地上的狗", "桜の木の下の猫", "해변의 강아지", "un perro en la playa")]
        ['zh', 'ja', 'ko', 'en']
    """
    text = caption or ""
    if text.isascii():
        return "en"
    cjk = _CJK_RE.findall(text)
    if not cjk or len(cjk) < CJK_CHARS_PER_WORD * len(_words(text)):
        return "en"
    if _KANA_RE.search(text):
        return "ja"
    hangul = len(_HANGUL_RE.findall(text))
    return "ko" if hangul and hangul >= len(cjk) - hangul else "zh"

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "qa": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_PAIRS,
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string", "maxLength": MAX_QUESTION_CHARS},
                    "answer": {"type": "string", "maxLength": MAX_ANSWER_CHARS},
                },
                "required": ["question", "answer"],
                "additionalProperties": False,
            },
        },
        "caption": {"type": "string", "maxLength": MAX_CAPTION_CHARS},
    },
    "required": ["qa", "caption"],
    "additionalProperties": False,
}

SCHEMA_NAME = "caption_qa"


def build_messages(caption: str, lang: str | None = None) -> list[dict[str, str]]:
    """Chat messages (system + user) asking the rewriter to turn ``caption`` into QA JSON, in the
    caption's language (``lang``: a key of ``PROMPTS``; other codes and the default use
    ``prompt_language(caption)``)."""
    text = " ".join((caption or "").split())[:MAX_INPUT_CHARS]
    system, user = PROMPTS[lang if lang in PROMPTS else prompt_language(text)]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user.format(caption=text)},
    ]


def response_format() -> dict[str, Any]:
    """The ``response_format`` for OpenAI-compatible chat completions (vLLM enforces it by grammar)."""
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": OUTPUT_SCHEMA, "strict": True}}


def render_output(qa: list[dict[str, str]], caption: str) -> str:
    """The canonical JSON text of a valid answer (seed sets and SFT targets use this form): question
    before answer, as ``OUTPUT_SCHEMA`` orders them and structured output generates them (seed files
    are written with sorted keys, which would teach a model the other order)."""
    qa = [{"question": p["question"], "answer": p["answer"]} for p in qa]
    return json.dumps({"qa": qa, "caption": caption}, ensure_ascii=False, separators=(", ", ": "))


# --- faithfulness ----------------------------------------------------------------------------

FUNCTION_WORDS = frozenset(
    """a an the and or but nor of in on at to for from by with without into onto over under about
    above below after before between through during near off out up down as is are was were be been
    this that these those it its his her their our your my we you he she they i me him them us
    what which who whom whose where when why how not no yes so if then than too very all any each
    every some such only own same other both few more most new free photo image picture stock""".split()
)
# A caption whose content words are more than this share capitalised is in Title Case: its capitals
# mark style, not names (product titles, headlines), so rule 2a is off for it.
TITLE_CASE_SHARE = 0.75
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
# Words of scripts with spaces: CJK characters are not part of a word (rule 4a).
_TOKEN_RE = re.compile(f"[^\\W{_CJK_CLASS}]+")
# Korean native number words (and the forms used before a counter: 두 마리, 세 명), whole words only:
# 1–10 and 20. Sino-Korean numerals (일, 이, 삼…) are not accepted: 이 is also the subject particle.
KO_NUMERALS = {1: ("하나", "한"), 2: ("둘", "두"), 3: ("셋", "세"), 4: ("넷", "네"), 5: ("다섯",), 6: ("여섯",),
               7: ("일곱",), 8: ("여덟",), 9: ("아홉",), 10: ("열",), 20: ("스물", "스무")}
_HANGUL_WORD_RE = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]+")
ZH_NUMERALS = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二", "十三", "十四", "十五",
               "十六", "十七", "十八", "十九", "二十")
# Titles and quoted spans kept character for character (rule 4c).
_QUOTED_RE = re.compile(r"《([^《》]{1,60})》|「([^「」]{1,60})」|『([^『』]{1,60})』|“([^“”]{1,60})”")
# A new segment starts at the text start or after sentence/segment punctuation.
_SEGMENT_SPLIT_RE = re.compile(r"(?:[.!?:;|•·]|\s[-–—]+)\s+|\s*[\"“”(\[]\s*")


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER_RE.finditer(text):
        tok = m.group(0)
        if "," in tok:
            head, *groups = tok.split(",")
            if all(len(g.split(".")[0]) == 3 for g in groups):
                out.append(tok.replace(",", ""))
            else:
                out.extend(tok.split(","))
        else:
            out.append(tok)
    return [_norm_number(n) for n in out if n]


def _norm_number(n: str) -> str:
    if "." in n:
        whole, frac = n.split(".", 1)
        whole = whole.lstrip("0") or "0"
        return f"{whole}.{frac}"
    return n.lstrip("0") or "0"


def _words(text: str) -> list[str]:
    """Whole words of letters only: tokens holding a digit (``KA2``, ``4K``) belong to the number rule."""
    tokens = _TOKEN_RE.findall(unicodedata.normalize("NFKC", text))
    return [t for t in tokens if t.isalpha()]


def is_garbage(raw: str) -> bool:
    """True when the caption is too broken for the faithfulness rule to apply (see module doc)."""
    raw = raw or ""
    cjk = len(_CJK_RE.findall(raw))
    if sum(1 for w in _words(raw) if len(w) >= 2) + (cjk if cjk >= 2 else 0) < 2:
        return True
    chars = [c for c in raw if not c.isspace()]
    letters = sum(1 for c in chars if c.isalpha())
    return letters < 0.5 * len(chars)


@dataclass(frozen=True)
class Constraints:
    """What the faithfulness rule requires of a rewrite of one raw caption."""

    garbage: bool
    numbers: tuple[str, ...] = ()
    entities: tuple[str, ...] = field(default=())
    spans: tuple[str, ...] = ()  # 《titles》 and quoted spans, matched character for character
    cjk: bool = False

    @property
    def active(self) -> bool:
        return not self.garbage and bool(self.numbers or self.entities or self.spans)


def faithfulness_constraints(raw: str) -> Constraints:
    """Numbers and entity words a rewrite of ``raw`` must keep (empty when ``raw`` is garbage)."""
    raw = unicodedata.normalize("NFKC", raw or "")
    if is_garbage(raw):
        return Constraints(garbage=True)
    numbers = tuple(dict.fromkeys(_numbers(raw)))
    words = [w for w in _words(raw) if len(w) >= 2]
    capitalised = [w for w in words if w[0].isupper() and w.lower() not in FUNCTION_WORDS]
    content = [w for w in words if w.lower() not in FUNCTION_WORDS]
    # CJK has no letter case: in a CJK caption the few Latin words that are capitalised are names
    # ("삼성 Galaxy"), not Title Case style
    title_case = prompt_language(raw) == "en" and bool(content) and len(capitalised) > TITLE_CASE_SHARE * len(content)
    letters = [c for c in raw if c.isalpha()]
    shouting = bool(letters) and sum(c.isupper() for c in letters) > 0.6 * len(letters)

    entities: list[str] = []
    for seg in _SEGMENT_SPLIT_RE.split(raw):
        seg_words = [(m.group(0), m.start()) for m in _TOKEN_RE.finditer(seg) if m.group(0).isalpha()]
        for i, (w, start) in enumerate(seg_words):
            if len(w) < 2:
                continue
            # CJK text before the word means it does not start the segment ("삼성 Galaxy", "我用Apple")
            mid = i > 0 or _CJK_RE.search(seg, 0, start) is not None
            if w.isupper():
                if not shouting:
                    entities.append(w)  # (b) acronym
            elif w[0].islower() and any(c.isupper() for c in w[1:]):
                entities.append(w)  # (c) iPhone, eBay
            elif w[0].isupper() and mid and not title_case and w.lower() not in FUNCTION_WORDS:
                entities.append(w)  # (a) capitalised mid-segment word
    spans = tuple(dict.fromkeys(next(g for g in m.groups() if g) for m in _QUOTED_RE.finditer(raw)))
    return Constraints(garbage=False, numbers=numbers, entities=tuple(dict.fromkeys(entities)), spans=spans,
                       cjk=_CJK_RE.search(raw) is not None)


def check_faithful(raw: str, adopted: str) -> tuple[bool, str]:
    """(ok, detail): does ``adopted`` keep the numbers and entities of ``raw``?"""
    c = faithfulness_constraints(raw)
    if not c.active:
        return True, ""
    adopted = unicodedata.normalize("NFKC", adopted or "")
    have_numbers = set(_numbers(adopted))
    have_words = {w.lower() for w in _words(adopted)}
    missing = []
    for n in c.numbers:
        spelled = NUMBER_WORDS[int(n)] if n.isdigit() and int(n) <= 20 else None
        if n in have_numbers or (spelled is not None and spelled in have_words):
            continue
        if c.cjk and n.isdigit() and int(n) <= 20 and (ZH_NUMERALS[int(n)] in adopted or (n == "2" and "两" in adopted)):
            continue
        if c.cjk and n.isdigit() and int(n) in KO_NUMERALS and \
                set(KO_NUMERALS[int(n)]) & set(_HANGUL_WORD_RE.findall(adopted)):
            continue
        missing.append(n)
    missing += [e for e in c.entities if e.lower() not in have_words]
    missing += [sp for sp in c.spans if sp not in adopted]
    if missing:
        return False, "missing from the adopted caption: " + ", ".join(missing[:10])
    return True, ""


# --- validation ------------------------------------------------------------------------------


class Verdict(NamedTuple):
    ok: bool
    reason: str
    parsed: dict[str, Any] | None
    detail: str


def _off_format(obj: Any) -> str:
    """Why ``obj`` does not match OUTPUT_SCHEMA ('' when it does)."""
    if not isinstance(obj, dict):
        return f"top level is {type(obj).__name__}, not an object"
    extra = set(obj) - {"qa", "caption"}
    if extra:
        return f"unexpected keys {sorted(extra)[:5]}"
    if "qa" not in obj or "caption" not in obj:
        return "missing key " + ("qa" if "qa" not in obj else "caption")
    qa, caption = obj["qa"], obj["caption"]
    if not isinstance(caption, str):
        return "caption is not a string"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"caption longer than {MAX_CAPTION_CHARS} chars"
    if not isinstance(qa, list):
        return "qa is not a list"
    if len(qa) > MAX_PAIRS:
        return f"{len(qa)} pairs (max {MAX_PAIRS})"
    for i, item in enumerate(qa):
        if not isinstance(item, dict) or set(item) != {"question", "answer"}:
            return f"qa[{i}] is not a {{question, answer}} object"
        if not isinstance(item["question"], str) or not isinstance(item["answer"], str):
            return f"qa[{i}] has a non-string field"
        if len(item["question"]) > MAX_QUESTION_CHARS or len(item["answer"]) > MAX_ANSWER_CHARS:
            return f"qa[{i}] has an over-long field"
    return ""


def validate_detailed(raw_caption: str, text: str | None, finish_reason: str | None) -> Verdict:
    """Like ``validate`` but with a short ``detail`` for the ledger (never the whole text)."""
    if finish_reason == "length":
        return Verdict(False, reasons.REWRITE_TRUNCATED, None, "finish_reason=length")
    if text is None or not text.strip():
        return Verdict(False, reasons.REWRITE_EMPTY, None, "no text")
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Verdict(False, reasons.REWRITE_INVALID_JSON, None, f"{type(e).__name__} at char {getattr(e, 'pos', '?')}")
    problem = _off_format(obj)
    if problem:
        return Verdict(False, reasons.REWRITE_OFF_FORMAT, None, problem)
    if finish_reason not in ("stop", None):
        return Verdict(False, reasons.REWRITE_OFF_FORMAT, None, f"finish_reason={finish_reason}")
    qa = [
        {"question": " ".join(p["question"].split()), "answer": " ".join(p["answer"].split())}
        for p in obj["qa"]
    ]
    qa = [p for p in qa if p["answer"]]
    caption = " ".join(obj["caption"].split())
    if not qa or not caption:
        return Verdict(False, reasons.REWRITE_EMPTY, None, "no answer" if not qa else "blank caption")
    ok, detail = check_faithful(raw_caption, caption)
    if not ok:
        return Verdict(False, reasons.REWRITE_UNFAITHFUL, None, detail)
    return Verdict(True, reasons.OK, {"qa": qa, "caption": caption}, "")


def validate(raw_caption: str, text: str | None, finish_reason: str | None) -> tuple[bool, str, dict | None]:
    """Check one completion against the output contract.

    Args:
        raw_caption: the caption that was sent (the faithfulness reference).
        text: the completion's message content.
        finish_reason: the completion's ``finish_reason`` (``stop``, ``length``, ...).

    Returns ``(ok, reason, parsed)``: ``reason`` is ``ok`` or a ``rewrite_*`` ledger reason; ``parsed``
    is ``{"qa": [...], "caption": str}`` with whitespace collapsed (None unless ok).
    """
    v = validate_detailed(raw_caption, text, finish_reason)
    return v.ok, v.reason, v.parsed
