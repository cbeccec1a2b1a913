"""Scripts, language identification (CLD2 from the pycld2 wheel) and CJK text normalisation; no Beam import.

Everything here is pure stdlib + pycld2/opencc, so the caption filters, the MinHash shingler and the
benches share one notion of "which script is this caption in" (see docs/bilingual.md).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import NamedTuple

# --- scripts --------------------------------------------------------------------------------------
# Han (CJK unified ideographs, extension A, compatibility ideographs, extensions B+), Kana, Hangul:
# the scripts written without spaces between words, where one character is the natural unit.
HAN_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
KANA_RANGES = "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
HANGUL_RANGES = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af\uffa0-\uffdc"
CJK_RANGES = HAN_RANGES + KANA_RANGES + HANGUL_RANGES
# Other scripts written without spaces between words (Thai, Lao, Tibetan, Myanmar, Khmer): a
# character is not a syllable there, so only character-length rules apply to them.
UNSPACED_RANGES = "\u0e00-\u0e7f\u0e80-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"

HAN = re.compile(f"[{HAN_RANGES}]")
KANA = re.compile(f"[{KANA_RANGES}]")
HANGUL = re.compile(f"[{HANGUL_RANGES}]")
CJK = re.compile(f"[{CJK_RANGES}]")
UNSPACED = re.compile(f"[{UNSPACED_RANGES}]")
# A caption's units: one CJK character, or one word of any other script (letters/digits, with
# inner apostrophes). For text without CJK these are exactly the words the caption rules counted before.
UNIT = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+(?:['’][^\\W_{CJK_RANGES}]+)*")
# Letters and combining marks (Devanagari/Thai vowel signs are marks, not punctuation).
LETTER_OR_MARK = re.compile(r"[^\W\d_]|[\u0300-\u036f\u0900-\u0dff\u0e31-\u0e4e\u0eb1-\u0ecd\u1000-\u109f\u17b4-\u17d3]")
ASCII_LETTER = re.compile(r"[A-Za-z]")
CASED = re.compile(r"[A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff]")

SPACED, CJK_ONLY, MIXED, UNSPACED_SCRIPT = "spaced", "cjk", "mixed", "unspaced"


class _ClassTable(dict):
    """``str.translate`` table, filled lazily: code point → H (Han), K (Kana), G (Hangul),
    U (unspaced script: letters and marks), C (cased letter), L (other letter or mark), "." (rest)."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        if HAN.match(ch):
            v = "H"
        elif KANA.match(ch):
            v = "K"
        elif HANGUL.match(ch):
            v = "G"
        elif UNSPACED.match(ch):
            v = "U" if LETTER_OR_MARK.match(ch) or unicodedata.category(ch)[0] in "LM" else "."
        elif CASED.match(ch):
            v = "C"
        elif LETTER_OR_MARK.match(ch) or unicodedata.category(ch)[0] in "LM":
            v = "L"
        else:
            v = "."
        self[cp] = v
        return v


_SCRIPT_CLASS = _ClassTable()


class ScriptProfile(NamedTuple):
    """Counts that decide which length and repetition rules fit a caption.

    Args:
        units: lower-cased units (CJK characters one by one, other words whole), in order.
        cjk: CJK characters (Han + Kana + Hangul).
        han, kana, hangul: characters of each.
        words: units that are not CJK characters (words of space-separated scripts, numbers).
        unspaced: characters of Thai/Lao/Tibetan/Myanmar/Khmer.
        letters: letters and combining marks of any script.
        cased: letters of a cased script (Latin, Greek, Cyrillic).
    """

    units: tuple[str, ...]
    cjk: int
    han: int
    kana: int
    hangul: int
    words: int
    unspaced: int
    letters: int
    cased: int

    @property
    def kind(self) -> str:
        """``spaced`` (words), ``cjk`` (characters), ``mixed`` (both), ``unspaced`` (characters)."""
        if self.cjk:
            return MIXED if self.words else CJK_ONLY
        if self.unspaced:
            return UNSPACED_SCRIPT
        return SPACED


@functools.lru_cache(maxsize=512)
def profile(text: str) -> ScriptProfile:
    """The ``ScriptProfile`` of a caption (cached: every rule and the flagger ask for it)."""
    low = text.lower()
    units = tuple(UNIT.findall(low))
    if text.isascii():  # the common English case: no CJK, no unspaced script, every letter cased
        letters = len(ASCII_LETTER.findall(text))
        return ScriptProfile(units, 0, 0, 0, 0, len(units), 0, letters, letters)
    classes = text.translate(_SCRIPT_CLASS)  # one pass: every character → its class letter
    han, kana, hangul = classes.count("H"), classes.count("K"), classes.count("G")
    cjk = han + kana + hangul
    unspaced = classes.count("U")
    cased = classes.count("C")
    return ScriptProfile(
        units=units, cjk=cjk, han=han, kana=kana, hangul=hangul, words=len(units) - cjk,
        unspaced=unspaced, letters=cjk + unspaced + cased + classes.count("L"), cased=cased,
    )


# --- CJK normalisation ----------------------------------------------------------------------------
# CJK punctuation without an NFKC half-width form (NFKC already folds ！，：；（） and full-width
# letters/digits to ASCII); mapped to their ASCII counterparts so the rules see one alphabet.
_CJK_PUNCT = str.maketrans({
    "。": ".", "、": ",", "「": '"', "」": '"', "『": '"', "』": '"', "【": "[", "】": "]", "〔": "(",
    "〕": ")", "《": "<", "》": ">", "〈": "<", "〉": ">", "・": " ", "·": " ", "～": "~", "〜": "~",
    "“": '"', "”": '"', "‘": "'", "’": "'", "…": "...", "—": "-", "–": "-", "\u3000": " ",
})
SPACE_NEAR_CJK = re.compile(f"(?<=[{CJK_RANGES}])\\s+|\\s+(?=[{CJK_RANGES}])")


def normalize_width(text: str) -> str:
    """Full-width → half-width (NFKC) and CJK punctuation → ASCII, for the rules' pattern matching.

    Example:
        >>> normalize_width("ＡＢＣ１２３！图片来源：视觉中国。")
        'ABC123!图片来源:视觉中国.'
    """
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text).translate(_CJK_PUNCT)


def drop_spaces_near_cjk(text: str) -> str:
    """Remove whitespace next to a CJK character: spacing there is typography ("盘古之白"), not a
    word boundary, so "一只 猫" and "一只猫" are the same text."""
    return SPACE_NEAR_CJK.sub("", text)


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc  # the wheel ships its conversion tables; nothing is downloaded

    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional → Simplified Chinese (OpenCC ``t2s``, character and phrase tables from the wheel)."""
    return _t2s().convert(text)


# --- Chinese web boilerplate ----------------------------------------------------------------------
# Credits, stock-site names and download come-ons of Chinese image hosts (Wukong/Zero-style web
# alt-text). Matched against ``normalize_width(text)``, so full-width colons are ASCII here.
ZH_SITES = (
    "视觉中国", "千图网", "昵图网", "摄图网", "包图网", "图虫", "汇图网", "全景网", "东方IC", "东方ic", "站酷",
    "觅知网", "我图网", "千库网", "熊猫办公", "六图网", "红动中国", "素材中国", "懒人图库", "百度图片", "堆糖",
    "花瓣网", "新浪图片", "搜狐图片", "网易图片", "Getty中国", "图行天下", "三联素材", "ZOL桌面壁纸",
)
ZH_COME_ONS = ("高清壁纸", "桌面壁纸", "手机壁纸", "免费下载", "高清下载", "素材下载", "图片素材", "高清图片",
               "设计素材", "素材", "点击查看大图", "查看大图", "点击查看", "点击放大", "原图", "大图", "版权所有",
               "版权归", "未经授权", "禁止转载", "转载请注明", "免抠", "png免扣", "免扣", "矢量图", "psd分层", "壁纸")
ZH_CREDIT = re.compile(
    r"(图片来源|图片来自|图源|来源|出处|摄影师?|供图|作者|图片作者|图片编号|编号|图片ID|ID|作品编号|素材编号)"
    r"\s*[:：]\s*[^\s,.;!?，。；！？]{0,30}"
)
ZH_BOILERPLATE = re.compile(
    "|".join(re.escape(s) for s in sorted(ZH_SITES + ZH_COME_ONS, key=len, reverse=True)) + "|" + ZH_CREDIT.pattern,
    re.IGNORECASE,
)
# A trailing credit or site name after a separator: stripped from the dedup key (a caption with a
# credit suffix is the same caption), never from the caption itself.
ZH_CREDIT_SUFFIX = re.compile(
    r"(?:[\s\-_|/,.:;~()\[\]]*(?:" + ZH_CREDIT.pattern + "|"
    + "|".join(re.escape(s) for s in sorted(ZH_SITES + ("版权所有", "高清壁纸", "免费下载", "素材下载", "高清图片"), key=len, reverse=True))
    + r"))+[\s\-_|/,.:;~()\[\]]*$",
    re.IGNORECASE,
)


def has_zh_boilerplate(text_nfkc: str) -> bool:
    return HAN.search(text_nfkc) is not None and ZH_BOILERPLATE.search(text_nfkc) is not None


def strip_zh_boilerplate(text_nfkc: str) -> str:
    return ZH_BOILERPLATE.sub(" ", text_nfkc)


def strip_zh_credit_suffix(text_nfkc: str) -> str:
    """Drop a trailing credit / stock-site suffix ("…，图片来源:视觉中国") from width-normalised text."""
    if HAN.search(text_nfkc) is None:
        return text_nfkc
    return ZH_CREDIT_SUFFIX.sub("", text_nfkc)


# --- language identification ----------------------------------------------------------------------
UNDETERMINED = "und"
# CLD2 codes folded to the codes configs use: both Chinese scripts are "zh" (the dedup key folds
# Traditional into Simplified too); Norwegian Bokmål is "no" in CLD2 already.
_FOLD_CODES = {"zh-Hant": "zh", "un": UNDETERMINED, "xxx": UNDETERMINED}


class LangResult(NamedTuple):
    lang: str
    score: float
    method: str  # "script" (decided by the script counts) or "cld2"


_UND_SCRIPT = LangResult(UNDETERMINED, 0.0, "script")
_UND_CLD2 = LangResult(UNDETERMINED, 0.0, "cld2")


@functools.lru_cache(maxsize=1)
def _pycld2():
    import pycld2  # CLD2's tables are compiled into the wheel's extension module

    return pycld2


def _cld2(text: str) -> tuple[str, float]:
    pycld2 = _pycld2()
    try:
        reliable, _, details = pycld2.detect(text, bestEffort=True)
    except (pycld2.error, UnicodeError):  # lone surrogates, odd code points: retry on printable text
        cleaned = "".join(ch for ch in text if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF)
        try:
            reliable, _, details = pycld2.detect(cleaned, bestEffort=True)
        except (pycld2.error, UnicodeError):
            return UNDETERMINED, 0.0
    name, code, percent, _ = details[0]
    code = _FOLD_CODES.get(code, code)
    if code == UNDETERMINED:
        return code, 0.0
    return code, percent / 100.0 if reliable else percent / 200.0


def detect_uncached(text: str) -> LangResult:
    """``detect`` without its cache (the caption filter asks once per caption and keeps the answer)."""
    if text.isascii():  # no CJK script to decide on: straight to CLD2 (most English captions)
        if ASCII_LETTER.search(text) is None:
            return _UND_SCRIPT
        try:  # the common case inlined: this runs once per kept caption
            reliable, _, details = _pycld2().detect(text, bestEffort=True)
        except Exception:
            code, score = _cld2(text)
            return LangResult(code, score, "cld2")
        code = details[0][1]
        code = _FOLD_CODES.get(code, code)
        if code == UNDETERMINED:
            return _UND_CLD2
        percent = details[0][2]
        return LangResult(code, percent / 100.0 if reliable else percent / 200.0, "cld2")
    return _detect_unicode(text)


@functools.lru_cache(maxsize=64)
def detect(text: str) -> LangResult:
    """Language of a caption as an ISO 639-1 code (``und`` when nothing can be said) and a confidence.

    Scripts that name their language decide first: Kana → ``ja``; Hangul → ``ko``; Han without Kana
    or Hangul → ``zh``, when that script holds at least half of the letters (CLD2 alone calls short
    Han-only captions Japanese). Otherwise CLD2 decides (``bestEffort``, so short text gets a
    guess); the confidence is the share of the text CLD2 gave the language, halved when CLD2 marks
    the result unreliable; for a script decision it is the script's share of the letters.

    Example:
        >>> detect("一只白色的小狗睡在沙发上").lang, detect("a dog asleep on a sofa").lang
        ('zh', 'en')
    """
    return detect_uncached(text)


def _detect_unicode(text: str) -> LangResult:
    p = profile(text)
    if p.cjk and p.letters:
        share = p.cjk / max(p.letters, p.cjk)
        if share >= 0.5:
            if p.kana:
                return LangResult("ja", round(share, 4), "script")
            if p.hangul >= p.han:
                return LangResult("ko", round(share, 4), "script")
            return LangResult("zh", round(share, 4), "script")
    if not p.letters:
        return LangResult(UNDETERMINED, 0.0, "script")
    code, score = _cld2(text)
    return LangResult(code, score, "cld2")
