"""Caption filters (reject) and caption quality flags (keep, but mark for rewriting).

Thresholds live in ``CaptionFilterConfig``; every check is switched off by setting it to None.
Defaults are anchored on DataComp's "basic" filter (Gadre et al. 2023, §3.4: captions with more
than 2 words and more than 5 characters) and on what the bundled real alt-text shows. Lengths and
repetition are measured in the units of the caption's script (``transforms.lang.profile``): words
for space-separated scripts, characters for CJK, both for mixed text; docs/bilingual.md has the
reasoning and the measurements behind the CJK thresholds.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from schemas import reasons
from schemas.records import Pair
from transforms import lang as lg
from transforms.filter_base import BaseFilter, with_fields

# A caption that is only a camera/file name: DSC_2481, IMG_4663.jpg, Taichung_Polaroid_20070131-2, P1010123.JPG
FILENAME_CAPTION = re.compile(
    r"^\s*[\w\-.]*\d{3,}[\w\-]*(\.(jpe?g|png|gif|webp|tiff?|bmp|heic|raw|cr2|nef))?\s*$", re.IGNORECASE
)
# ``\w`` matches CJK characters, and CJK text has no spaces, so on CJK captions FILENAME_CAPTION would
# read a whole sentence holding a number ("台北101大樓的夜景", "上海中心大厦632米") as one file-name
# token. A CJK caption is a file name only with an image extension ("微信图片_2020.jpg") or a long
# digit run joined by "_"/"-" ("微信图片_20200101123456", "截图-20190312").
CJK_FILENAME_CAPTION = re.compile(
    r"^\s*(?:[\w\-.]*\d{3,}[\w\-]*\.(jpe?g|png|gif|webp|tiff?|bmp|heic|raw|cr2|nef)"
    r"|[\w\-.]*[_\-]\d{6,}[\w\-.]*)\s*$",
    re.IGNORECASE,
)
# Matched against the lower-cased caption (case-insensitive alternations are several times slower).
CAMERA_TOKEN = re.compile(r"\b(img|dsc|dscn|dscf|dcim|pict?|gopr|mvi|sam|cimg|p\d{3})[_\- ]?\d{3,}\b")
FILE_EXTENSION_TOKEN = re.compile(r"\w\.(jpe?g|png|gif|webp|tiff?|bmp|heic)\b")
THREE_DIGITS = re.compile(r"\d{3}")
# A URL slug or file stem used as alt text: no spaces, words joined by - or _ ("onboard-off-board-clients").
SLUG_CAPTION = re.compile(r"^\s*[^\s_-]+([_-][^\s_-]+){2,}\s*$")
BARE_URL = re.compile(r"^\s*(https?://|www\.)\S+\s*$", re.IGNORECASE)
URL_TOKEN = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
AUTO_ALT_TEXT = re.compile(r"^\s*(image|photo|picture) (may contain|might contain)\s*[:\-]", re.IGNORECASE)
GENERIC_ALT_TEXT = re.compile(
    r"^\s*(image|img|photo|photograph|picture|pic|untitled|thumbnail|thumb|no image( available)?|"
    r"click to enlarge|loading\.*|placeholder|default|banner|logo|icon|null|none|n/?a|undefined)\s*\d*\s*$",
    re.IGNORECASE,
)
# Stock-photo watermarks and agency credits (LAION alt-text is full of them).
# Cheap substring test before the watermark regex (which costs ~35 µs a caption on its own).
WATERMARK_HINTS = ("stock", "royalty", "alamy", "getty", "dreamstime", "depositphotos", "123rf", "fotolia",
                   "pond5", "image id", "photo id")
WATERMARK = re.compile(
    r"(royalty[- ]free|stock (photo|image|picture|footage|vector|illustration)s?\b|shutterstock|alamy|"
    r"getty ?images|istock(photo)?|dreamstime|depositphotos|123rf|bigstock(photo)?|fotolia|adobe ?stock|"
    r"can ?stock ?photo|vectorstock|pond5|\bimage id\b|\bphoto id\b)"
    r"(\s*[-–:#]?\s*(\d+|id\s*\d+))?",
    re.IGNORECASE,
)
HTML = re.compile(r"</?[a-z][^>]{0,200}>|&(amp|quot|lt|gt|nbsp|#\d+);", re.IGNORECASE)
TRAILING_ID = re.compile(r"(?:\s[-–#]\s*|\s)#?(\d{3,})\s*$")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
CJK_CHAR = re.compile(f"[{lg.CJK_RANGES}]")
CJK_RUN_REPEAT = re.compile(f"([{lg.CJK_RANGES}]{{2,}})\\1")
LANG_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
ENGLISH_STOPWORDS = frozenset(
    "a an the of in on at to for with and or by from is are was were be this that these those it its "
    "as into over under near his her their our your my".split()
)


@dataclass(frozen=True)
class CaptionFilterConfig:
    """Caption thresholds. ``None`` switches a check off.

    Args:
        min_chars: reject shorter captions without CJK (DataComp basic: more than 5 characters → 6).
        min_words: reject captions with fewer words (DataComp basic: more than 2 words → 3);
            space-separated scripts only.
        min_cjk_chars: reject CJK captions (Han, Kana, Hangul) with fewer CJK characters: 4, i.e.
            3 words at the 1.4 characters per word measured in docs/bilingual.md. A mixed caption
            passes when words / min_words + CJK chars / min_cjk_chars >= 1.
        max_chars: reject longer captions (alt-text beyond this is page text, not a caption).
        max_words: reject captions with more words.
        min_alpha_ratio: reject when letters / non-space characters is below this.
        max_dup_word_ratio: reject when 1 - unique/total words exceeds this (≥ 4 words).
        max_dup_bigram_ratio: reject when the share of repeated word bigrams exceeds this (≥ 6 words).
        reject_boilerplate: reject file names, bare URLs, auto alt-text, generic words, and captions
            that are nothing but a stock watermark.
        reject_control_chars: reject captions with control characters (other than tab/newline).
        detect_language: identify every caption's language (``transforms.lang.detect``: script
            rules, then CLD2) and write it to ``Pair.lang`` / ``Pair.lang_score``.
        languages: keep only these languages (ISO 639-1 codes as ``detect`` gives them, e.g.
            ``("en", "zh")``; ``zh`` covers Simplified and Traditional); None keeps all.
        flag_max_words_short: captions with fewer words than this are flagged ``short``.
        flag_min_cjk_chars_short: CJK captions with fewer CJK characters than this are flagged
            ``short`` (5 words × 1.4 characters per word).
        flag_dup_word_ratio: flag ``repeated_words`` when the duplicate ratio of content words (function
            words excluded) exceeds this, or on an immediate repeat ("the the").

    Example:
        CaptionFilterConfig(min_words=3, max_chars=1000, languages=("en", "zh"))
    """

    min_chars: int | None = 6
    min_words: int | None = 3
    min_cjk_chars: int | None = 4
    max_chars: int | None = 1000
    max_words: int | None = 200
    min_alpha_ratio: float | None = 0.5
    max_dup_word_ratio: float | None = 0.5
    max_dup_bigram_ratio: float | None = 0.5
    reject_boilerplate: bool = True
    reject_control_chars: bool = True
    detect_language: bool = True
    languages: tuple[str, ...] | None = None
    flag_max_words_short: int | None = 5
    flag_min_cjk_chars_short: int | None = 7
    flag_dup_word_ratio: float | None = 0.2

    def __post_init__(self):
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars > max_chars")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError("min_words > max_words")
        if self.languages is not None:
            bad = [x for x in self.languages if not isinstance(x, str) or not LANG_CODE.match(x)]
            if bad or not self.languages:
                raise ValueError(f"languages must be ISO 639-1 codes like ['en', 'zh'], got {list(self.languages)}")
            if not self.detect_language:
                raise ValueError("languages needs detect_language = true")


@functools.lru_cache(maxsize=256)
def words_of(text: str) -> tuple[str, ...]:
    """Lower-cased units: words, and CJK characters one by one (``lang.profile``, cached)."""
    return lg.profile(text).units


@functools.lru_cache(maxsize=256)
def rules_text(text: str) -> str:
    """What the pattern rules match: full-width folded to half-width, CJK punctuation to ASCII."""
    return lg.normalize_width(text)


def length_units(p: lg.ScriptProfile, min_words: int | None, min_cjk_chars: int | None) -> float:
    """How far a caption is towards the length minimum (>= 1 passes): words for space-separated
    text, CJK characters for CJK text, the two fractions summed for mixed text."""
    w = p.words / min_words if min_words else 0.0
    c = p.cjk / min_cjk_chars if min_cjk_chars else 0.0
    return w + c


WATERMARK_HINT = re.compile("|".join(re.escape(h) for h in WATERMARK_HINTS))


def has_watermark(text: str) -> bool:
    return WATERMARK_HINT.search(text.lower()) is not None and WATERMARK.search(text) is not None


def has_immediate_repeat(words) -> bool:
    return any(a == b for a, b in zip(words, words[1:]))


def dup_word_ratio(words: list[str]) -> float:
    return 1.0 - len(set(words)) / len(words) if words else 0.0


def dup_bigram_ratio(words: list[str]) -> float:
    bigrams = list(zip(words, words[1:]))
    if not bigrams:
        return 0.0
    seen: dict[tuple[str, str], int] = {}
    for b in bigrams:
        seen[b] = seen.get(b, 0) + 1
    repeated = sum(n for n in seen.values() if n > 1)
    return repeated / len(bigrams)


def dup_ngram_ratio(words, n: int) -> float:
    """Share of the n-gram occurrences whose n-gram occurs more than once."""
    grams = list(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0.0
    seen: dict[tuple, int] = {}
    for g in grams:
        seen[g] = seen.get(g, 0) + 1
    repeated = sum(k for k in seen.values() if k > 1)
    return repeated / len(grams)


def strip_watermarks(text: str) -> str:
    return WATERMARK.sub(" ", text)


class CaptionPresentFilter(BaseFilter):
    """Rejects a missing or whitespace-only caption."""

    name = "caption_present"
    default_reason = reasons.CAPTION_EMPTY

    def check(self, pair: Pair):
        if pair.caption is None:
            return False, reasons.CAPTION_MISSING
        return bool(pair.caption.strip())


class CaptionCharsFilter(BaseFilter):
    """Rejects captions outside [min_chars, max_chars] (stripped length). Checked before anything
    that scans the text, so a megabyte caption costs one len(). The minimum is DataComp's rule for
    alphabetic text: captions with CJK characters are measured by ``CaptionWordsFilter`` instead
    (five Han characters are a sentence, not a typo)."""

    name = "caption_chars"

    def __init__(self, min_chars: int | None, max_chars: int | None):
        self.min_chars, self.max_chars = min_chars, max_chars

    def check(self, pair: Pair):
        n = len(pair.caption.strip())
        if self.max_chars is not None and n > self.max_chars:
            return False, reasons.CAPTION_TOO_LONG_CHARS, f"{n} chars > {self.max_chars}"
        if self.min_chars is not None and n < self.min_chars and not lg.CJK.search(pair.caption):
            return False, reasons.CAPTION_TOO_SHORT_CHARS, f"{n} chars < {self.min_chars}"
        return True


class ControlCharsFilter(BaseFilter):
    """Rejects control characters (Unicode category Cc other than tab/newline/CR) and U+FFFD, the
    mark of text that was decoded with replacement somewhere upstream."""

    name = "caption_control_chars"

    def check(self, pair: Pair):
        c = pair.caption
        if "\ufffd" in c:
            return False, reasons.CAPTION_INVALID_UTF8, "contains U+FFFD replacement characters"
        m = CONTROL_CHARS.search(c)
        if m:
            return False, reasons.CAPTION_CONTROL_CHARS, f"control character U+{ord(m.group()):04X}"
        return True


class BoilerplateFilter(BaseFilter):
    """Rejects alt-text that describes nothing: camera file names (``DSC_2481``, ``IMG_4663.jpg``),
    bare URLs, auto-generated alt-text ("Image may contain: ..."), generic words ("image",
    "untitled"), and captions that are only a stock-photo watermark, English or Chinese (图片来源,
    视觉中国, 千图网, 高清壁纸, 免费下载, ...: ``transforms.lang.ZH_BOILERPLATE``). Patterns are matched
    on the width-normalised text, so ``ＤＳＣ＿２４８１`` is a file name too."""

    name = "caption_boilerplate"
    default_reason = reasons.CAPTION_BOILERPLATE

    def __init__(self, min_words: int | None, min_cjk_chars: int | None = None):
        self.min_words = min_words or 1
        self.min_cjk_chars = min_cjk_chars or 1

    def check(self, pair: Pair):
        c = rules_text(pair.caption)
        if FILENAME_CAPTION.match(c) and (not CJK_CHAR.search(c) or CJK_FILENAME_CAPTION.match(c)):
            return False, reasons.CAPTION_BOILERPLATE, "file name"
        if SLUG_CAPTION.match(c):
            return False, reasons.CAPTION_BOILERPLATE, "URL slug / file stem"
        if BARE_URL.match(c):
            return False, reasons.CAPTION_BOILERPLATE, "bare URL"
        if AUTO_ALT_TEXT.match(c):
            return False, reasons.CAPTION_BOILERPLATE, "auto-generated alt text"
        if GENERIC_ALT_TEXT.match(c):
            return False, reasons.CAPTION_BOILERPLATE, "generic alt text"
        if has_watermark(c) and len(words_of(strip_watermarks(URL_TOKEN.sub(" ", c)))) < self.min_words:
            return False, reasons.CAPTION_BOILERPLATE, "stock watermark only"
        if lg.has_zh_boilerplate(c):
            rest = lg.profile(lg.strip_zh_boilerplate(URL_TOKEN.sub(" ", c)))
            if length_units(rest, self.min_words, self.min_cjk_chars) < 1:
                return False, reasons.CAPTION_BOILERPLATE, "web credit / stock-site text only"
        return True


class CaptionWordsFilter(BaseFilter):
    """Rejects captions that are too short or too long in the units of their script: fewer than
    ``min_words`` words (space-separated scripts), fewer than ``min_cjk_chars`` CJK characters (CJK
    text: reason ``caption_too_short_chars``), or, for mixed text (when both minimums are set),
    words / min_words + CJK characters / min_cjk_chars below 1. Thai, Lao, Khmer, Myanmar and Tibetan text has no word
    spaces either: only the character limits apply to it. ``max_words`` counts words only."""

    name = "caption_words"

    def __init__(self, min_words: int | None, max_words: int | None, min_cjk_chars: int | None = None):
        self.min_words, self.max_words, self.min_cjk_chars = min_words, max_words, min_cjk_chars

    def check(self, pair: Pair):
        p = lg.profile(pair.caption)
        kind = p.kind
        if self.max_words is not None and p.words > self.max_words:
            return False, reasons.CAPTION_TOO_LONG_WORDS, f"{p.words} words > {self.max_words}"
        if kind == lg.UNSPACED_SCRIPT:
            return True
        if kind == lg.SPACED:
            if self.min_words is not None and p.words < self.min_words:
                return False, reasons.CAPTION_TOO_SHORT_WORDS, f"{p.words} words < {self.min_words}"
        elif kind == lg.CJK_ONLY:
            if self.min_cjk_chars is not None and p.cjk < self.min_cjk_chars:
                return False, reasons.CAPTION_TOO_SHORT_CHARS, f"{p.cjk} CJK chars < {self.min_cjk_chars}"
        elif self.min_words and self.min_cjk_chars and length_units(p, self.min_words, self.min_cjk_chars) < 1:
            return False, reasons.CAPTION_TOO_SHORT_WORDS, (
                f"{p.words} words + {p.cjk} CJK chars < {self.min_words} words / {self.min_cjk_chars} chars"
            )
        return True


class AlphaRatioFilter(BaseFilter):
    """Rejects captions that are mostly digits, punctuation or symbols (letters / non-space < min).
    Letters of every script count, and so do combining marks (Devanagari and Thai vowel signs)."""

    name = "caption_alpha"
    default_reason = reasons.CAPTION_NON_ALPHA

    def __init__(self, min_alpha_ratio: float):
        self.min_alpha_ratio = min_alpha_ratio

    def check(self, pair: Pair):
        c = pair.caption
        n = len("".join(c.split()))
        if not n:
            return False
        ratio = lg.profile(c).letters / n
        if ratio < self.min_alpha_ratio:
            return False, reasons.CAPTION_NON_ALPHA, f"alpha ratio {ratio:.2f} < {self.min_alpha_ratio}"
        return True


class RepetitionFilter(BaseFilter):
    """Rejects degenerate repetition ("sale sale sale sale", "buy now buy now buy now", "高清壁纸高清壁纸
    高清壁纸"): duplicate word ratio or repeated-bigram share above the thresholds. Milder repetition
    is only flagged. Text with CJK gets the n-gram rule only, over character trigrams (the span of
    two words at 1.4 characters per word), on 8+ units: single characters and bigrams repeat in any
    natural sentence (一个黄色的消防栓旁边躺着一个红色的消防栓 repeats 5 bigrams; docs/bilingual.md)."""

    name = "caption_repetition"
    default_reason = reasons.CAPTION_REPETITIVE

    def __init__(self, max_dup_word_ratio: float | None, max_dup_bigram_ratio: float | None):
        self.max_word, self.max_bigram = max_dup_word_ratio, max_dup_bigram_ratio

    def check(self, pair: Pair):
        p = lg.profile(pair.caption)
        words = p.units
        if p.cjk:
            if self.max_bigram is not None and len(words) >= 8:
                r = dup_ngram_ratio(words, 3)
                if r > self.max_bigram:
                    return False, reasons.CAPTION_REPETITIVE, f"repeated CJK trigram share {r:.2f}"
            return True
        if self.max_word is not None and len(words) >= 4:
            r = dup_word_ratio(words)
            if r > self.max_word:
                return False, reasons.CAPTION_REPETITIVE, f"duplicate word ratio {r:.2f}"
        if self.max_bigram is not None and len(words) >= 6:
            r = dup_bigram_ratio(words)
            if r > self.max_bigram:
                return False, reasons.CAPTION_REPETITIVE, f"repeated bigram share {r:.2f}"
        return True


class LanguageFilter(BaseFilter):
    """Identifies the caption's language (``transforms.lang.detect``: script rules, then CLD2 from
    the pycld2 wheel) and writes it to ``Pair.lang`` / ``Pair.lang_score``; with ``languages`` set,
    rejects captions in any other language (``und`` included)."""

    name = "caption_language"
    default_reason = reasons.CAPTION_LANGUAGE

    def __init__(self, languages: tuple[str, ...] | None):
        self.languages = frozenset(languages) if languages else None
        self._last: tuple[str | None, lg.LangResult | None] = (None, None)

    def _detect(self, caption: str) -> lg.LangResult:
        # check() and annotate() ask about the same caption one after the other: keep one answer,
        # not a shared cache (hashing every caption into an LRU cost a tenth of the ID's price).
        text, r = self._last
        if text is not caption:
            r = lg.detect_uncached(caption)
            self._last = (caption, r)
        return r

    def check(self, pair: Pair):
        if self.languages is None:
            return True
        r = self._detect(pair.caption)
        if r.lang not in self.languages:
            return False, reasons.CAPTION_LANGUAGE, f"{r.lang} ({r.score:.2f}) not in {sorted(self.languages)}"
        return True

    def annotate(self, pair: Pair) -> Pair:
        r = self._detect(pair.caption)
        self._last = (None, None)
        # A shallow copy with two fields set: dataclasses.replace re-runs __init__ over all fields,
        # which alone cost a fifth of the language-ID overhead per caption.
        return with_fields(pair, lang=r.lang, lang_score=r.score)


def caption_filters(cfg: CaptionFilterConfig) -> list[BaseFilter]:
    """The caption filter chain, cheapest and most specific first."""
    chain: list[BaseFilter] = [CaptionPresentFilter()]
    if cfg.min_chars is not None or cfg.max_chars is not None:
        chain.append(CaptionCharsFilter(cfg.min_chars, cfg.max_chars))
    if cfg.reject_control_chars:
        chain.append(ControlCharsFilter())
    if cfg.reject_boilerplate:
        chain.append(BoilerplateFilter(cfg.min_words, cfg.min_cjk_chars))
    if cfg.min_words is not None or cfg.max_words is not None or cfg.min_cjk_chars is not None:
        chain.append(CaptionWordsFilter(cfg.min_words, cfg.max_words, cfg.min_cjk_chars))
    if cfg.min_alpha_ratio is not None:
        chain.append(AlphaRatioFilter(cfg.min_alpha_ratio))
    if cfg.max_dup_word_ratio is not None or cfg.max_dup_bigram_ratio is not None:
        chain.append(RepetitionFilter(cfg.max_dup_word_ratio, cfg.max_dup_bigram_ratio))
    if cfg.detect_language:
        chain.append(LanguageFilter(cfg.languages))
    return chain


# --- quality flags: why a kept caption should be rewritten --------------------------------------
FLAG_SHORT = "short"
FLAG_REPEATED_WORDS = "repeated_words"
FLAG_WATERMARK = "watermark"
FLAG_MARKUP = "markup"
FLAG_FILE_NAME = "file_name_token"
FLAG_URL = "url_token"
FLAG_TRAILING_ID = "trailing_id"
FLAG_ALL_CAPS = "all_caps"
FLAG_TITLE_CASE = "title_case_listing"


class CaptionQualityFlagger:
    """Marks kept captions the rewriter should fix (the MiniCPM-V paper's "low-quality" web
    captions: disfluent, repeated words, boilerplate) and says why. Flags never reject."""

    def __init__(self, cfg: CaptionFilterConfig):
        self.cfg = cfg

    def __call__(self, pair: Pair) -> list[str]:
        raw = pair.caption or ""
        c = rules_text(raw)
        p = lg.profile(raw)
        words = p.units
        flags = []
        if p.cjk:
            if length_units(p, self.cfg.flag_max_words_short, self.cfg.flag_min_cjk_chars_short) < 1:
                flags.append(FLAG_SHORT)
        elif self.cfg.flag_max_words_short is not None and p.kind == lg.SPACED and len(words) < self.cfg.flag_max_words_short:
            flags.append(FLAG_SHORT)
        if self.cfg.flag_dup_word_ratio is not None and self._repeated(p, c):
            flags.append(FLAG_REPEATED_WORDS)
        low = c.lower()
        if has_watermark(c) or lg.has_zh_boilerplate(c):
            flags.append(FLAG_WATERMARK)
        if "<" in c or "&" in c:
            if HTML.search(c):
                flags.append(FLAG_MARKUP)
        if (THREE_DIGITS.search(c) and CAMERA_TOKEN.search(low)) or ("." in c and FILE_EXTENSION_TOKEN.search(low)):
            flags.append(FLAG_FILE_NAME)
        if ("http" in low or "www." in low) and URL_TOKEN.search(c):
            flags.append(FLAG_URL)
        m = TRAILING_ID.search(c)
        if m and not (len(m.group(1)) == 4 and 1800 <= int(m.group(1)) <= 2099):  # a year is content
            flags.append(FLAG_TRAILING_ID)
        # Case rules only where case exists: most letters of a cased script (Latin, Greek,
        # Cyrillic) and no CJK ("我爱NBA" is not shouting; str.isupper() would say it is).
        if not p.cjk and p.cased * 2 >= p.letters:
            if len(words) >= 3 and c.isupper() and not any(ch.islower() for ch in c):
                flags.append(FLAG_ALL_CAPS)
            elif len(words) >= 4:
                raw_words = [w for w in c.split() if w[:1].isalpha()]
                if raw_words and sum(w[0].isupper() for w in raw_words) / len(raw_words) >= 0.8:
                    flags.append(FLAG_TITLE_CASE)
        return flags

    def _repeated(self, p: lg.ScriptProfile, c: str) -> bool:
        words = p.units
        if p.cjk:
            # Reduplication of one character is grammar (看看, 慢慢, 星星); an immediately repeated
            # run of 2+ characters, or many repeated character trigrams, is boilerplate or spam.
            return CJK_RUN_REPEAT.search(lg.drop_spaces_near_cjk(c)) is not None or (
                len(words) >= 10 and dup_ngram_ratio(words, 3) > self.cfg.flag_dup_word_ratio
            )
        content = [w for w in words if w not in ENGLISH_STOPWORDS]
        return has_immediate_repeat(words) or (len(content) >= 4 and dup_word_ratio(content) > self.cfg.flag_dup_word_ratio)
