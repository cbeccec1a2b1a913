"""Caption filters (reject) and caption quality flags (keep, but mark for rewriting).

Thresholds live in ``CaptionFilterConfig``; every check is switched off by setting it to None.
Defaults are anchored on DataComp's "basic" filter (Gadre et al. 2023, §3.4: captions with more
than 2 words and more than 5 characters) and on what the bundled real alt-text shows.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from schemas import reasons
from schemas.records import Pair
from transforms.filter_base import BaseFilter

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)

# A caption that is only a camera/file name: DSC_2481, IMG_4663.jpg, Taichung_Polaroid_20070131-2, P1010123.JPG
FILENAME_CAPTION = re.compile(
    r"^\s*[\w\-.]*\d{3,}[\w\-]*(\.(jpe?g|png|gif|webp|tiff?|bmp|heic|raw|cr2|nef))?\s*$", re.IGNORECASE
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
ALPHA = re.compile(r"[^\W\d_]")
ENGLISH_STOPWORDS = frozenset(
    "a an the of in on at to for with and or by from is are was were be this that these those it its "
    "as into over under near his her their our your my".split()
)


@dataclass(frozen=True)
class CaptionFilterConfig:
    """Caption thresholds. ``None`` switches a check off.

    Args:
        min_chars: reject shorter captions (DataComp basic: more than 5 characters → 6).
        min_words: reject captions with fewer words (DataComp basic: more than 2 words → 3).
        max_chars: reject longer captions (alt-text beyond this is page text, not a caption).
        max_words: reject captions with more words.
        min_alpha_ratio: reject when letters / non-space characters is below this.
        max_dup_word_ratio: reject when 1 - unique/total words exceeds this (≥ 4 words).
        max_dup_bigram_ratio: reject when the share of repeated word bigrams exceeds this (≥ 6 words).
        reject_boilerplate: reject file names, bare URLs, auto alt-text, generic words, and captions
            that are nothing but a stock watermark.
        reject_control_chars: reject captions with control characters (other than tab/newline).
        languages: keep only these languages (heuristic: ``en`` = mostly Latin letters and at least
            one English function word in 4+ word captions); None keeps all.
        flag_max_words_short: captions with fewer words than this are flagged ``short``.
        flag_dup_word_ratio: flag ``repeated_words`` when the duplicate ratio of content words (function
            words excluded) exceeds this, or on an immediate repeat ("the the").

    Example:
        CaptionFilterConfig(min_words=3, max_chars=1000, languages=("en",))
    """

    min_chars: int | None = 6
    min_words: int | None = 3
    max_chars: int | None = 1000
    max_words: int | None = 200
    min_alpha_ratio: float | None = 0.5
    max_dup_word_ratio: float | None = 0.5
    max_dup_bigram_ratio: float | None = 0.5
    reject_boilerplate: bool = True
    reject_control_chars: bool = True
    languages: tuple[str, ...] | None = None
    flag_max_words_short: int | None = 5
    flag_dup_word_ratio: float | None = 0.2

    def __post_init__(self):
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars > max_chars")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError("min_words > max_words")
        if self.languages is not None and set(self.languages) - {"en"}:
            raise ValueError(f"only the 'en' language heuristic is built in, not {self.languages}")


@functools.lru_cache(maxsize=256)
def words_of(text: str) -> tuple[str, ...]:
    """Lower-cased words (cached: several filters and the flagger ask for the same caption's words)."""
    return tuple(WORD.findall(text.lower()))


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
    that scans the text, so a megabyte caption costs one len()."""

    name = "caption_chars"

    def __init__(self, min_chars: int | None, max_chars: int | None):
        self.min_chars, self.max_chars = min_chars, max_chars

    def check(self, pair: Pair):
        n = len(pair.caption.strip())
        if self.max_chars is not None and n > self.max_chars:
            return False, reasons.CAPTION_TOO_LONG_CHARS, f"{n} chars > {self.max_chars}"
        if self.min_chars is not None and n < self.min_chars:
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
    "untitled"), and captions that are only a stock-photo watermark."""

    name = "caption_boilerplate"
    default_reason = reasons.CAPTION_BOILERPLATE

    def __init__(self, min_words: int | None):
        self.min_words = min_words or 1

    def check(self, pair: Pair):
        c = pair.caption
        if FILENAME_CAPTION.match(c):
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
        return True


class CaptionWordsFilter(BaseFilter):
    """Rejects captions with fewer than ``min_words`` or more than ``max_words`` words."""

    name = "caption_words"

    def __init__(self, min_words: int | None, max_words: int | None):
        self.min_words, self.max_words = min_words, max_words

    def check(self, pair: Pair):
        n = len(words_of(pair.caption))
        if self.min_words is not None and n < self.min_words:
            return False, reasons.CAPTION_TOO_SHORT_WORDS, f"{n} words < {self.min_words}"
        if self.max_words is not None and n > self.max_words:
            return False, reasons.CAPTION_TOO_LONG_WORDS, f"{n} words > {self.max_words}"
        return True


class AlphaRatioFilter(BaseFilter):
    """Rejects captions that are mostly digits, punctuation or symbols (letters / non-space < min)."""

    name = "caption_alpha"
    default_reason = reasons.CAPTION_NON_ALPHA

    def __init__(self, min_alpha_ratio: float):
        self.min_alpha_ratio = min_alpha_ratio

    def check(self, pair: Pair):
        c = pair.caption
        n = len("".join(c.split()))
        if not n:
            return False
        ratio = len(ALPHA.findall(c)) / n
        if ratio < self.min_alpha_ratio:
            return False, reasons.CAPTION_NON_ALPHA, f"alpha ratio {ratio:.2f} < {self.min_alpha_ratio}"
        return True


class RepetitionFilter(BaseFilter):
    """Rejects degenerate repetition ("sale sale sale sale", "buy now buy now buy now"): duplicate
    word ratio or repeated-bigram share above the thresholds. Milder repetition is only flagged."""

    name = "caption_repetition"
    default_reason = reasons.CAPTION_REPETITIVE

    def __init__(self, max_dup_word_ratio: float | None, max_dup_bigram_ratio: float | None):
        self.max_word, self.max_bigram = max_dup_word_ratio, max_dup_bigram_ratio

    def check(self, pair: Pair):
        words = words_of(pair.caption)
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
    """Keeps captions that look like one of ``languages``. Built-in heuristic for ``en``: at least
    90% of letters are ASCII, and a caption of 4+ words contains an English function word. A real
    language-ID model can replace it behind the same interface."""

    name = "caption_language"
    default_reason = reasons.CAPTION_LANGUAGE

    def __init__(self, languages: tuple[str, ...]):
        self.languages = languages

    def check(self, pair: Pair):
        letters = [ch for ch in pair.caption if ch.isalpha()]
        if not letters:
            return False, reasons.CAPTION_LANGUAGE, "no letters"
        ascii_share = sum(ch.isascii() for ch in letters) / len(letters)
        if ascii_share < 0.9:
            return False, reasons.CAPTION_LANGUAGE, f"non-Latin script ({ascii_share:.2f} ASCII letters)"
        words = words_of(pair.caption)
        if len(words) >= 4 and not ENGLISH_STOPWORDS.intersection(words):
            return False, reasons.CAPTION_LANGUAGE, "no English function word"
        return True


def caption_filters(cfg: CaptionFilterConfig) -> list[BaseFilter]:
    """The caption filter chain, cheapest and most specific first."""
    chain: list[BaseFilter] = [CaptionPresentFilter()]
    if cfg.min_chars is not None or cfg.max_chars is not None:
        chain.append(CaptionCharsFilter(cfg.min_chars, cfg.max_chars))
    if cfg.reject_control_chars:
        chain.append(ControlCharsFilter())
    if cfg.reject_boilerplate:
        chain.append(BoilerplateFilter(cfg.min_words))
    if cfg.min_words is not None or cfg.max_words is not None:
        chain.append(CaptionWordsFilter(cfg.min_words, cfg.max_words))
    if cfg.min_alpha_ratio is not None:
        chain.append(AlphaRatioFilter(cfg.min_alpha_ratio))
    if cfg.max_dup_word_ratio is not None or cfg.max_dup_bigram_ratio is not None:
        chain.append(RepetitionFilter(cfg.max_dup_word_ratio, cfg.max_dup_bigram_ratio))
    if cfg.languages:
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
        c = pair.caption or ""
        words = words_of(c)
        flags = []
        if self.cfg.flag_max_words_short is not None and len(words) < self.cfg.flag_max_words_short:
            flags.append(FLAG_SHORT)
        content = [w for w in words if w not in ENGLISH_STOPWORDS]
        if self.cfg.flag_dup_word_ratio is not None and (
            has_immediate_repeat(words) or (len(content) >= 4 and dup_word_ratio(content) > self.cfg.flag_dup_word_ratio)
        ):
            flags.append(FLAG_REPEATED_WORDS)
        low = c.lower()
        if has_watermark(c):
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
        if len(words) >= 3 and c.isupper() and not any(ch.islower() for ch in c):
            flags.append(FLAG_ALL_CAPS)
        elif len(words) >= 4:
            raw_words = [w for w in c.split() if w[:1].isalpha()]
            if raw_words and sum(w[0].isupper() for w in raw_words) / len(raw_words) >= 0.8:
                flags.append(FLAG_TITLE_CASE)
        return flags
