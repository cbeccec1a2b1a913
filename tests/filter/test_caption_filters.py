"""Caption filters and quality flags: exact reasons on real-looking alt-text."""

import pytest

from schemas import reasons
from schemas.records import Pair
from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
from transforms.filter_base import run_filters

CHAIN = caption_filters(CaptionFilterConfig())


def reason_of(caption, cfg=None):
    chain = caption_filters(cfg) if cfg else CHAIN
    _, reason, _ = run_filters(Pair(key="k", caption=caption), chain)
    return reason


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a brown dog running on a sandy beach", None),
        (None, reasons.CAPTION_MISSING),
        ("", reasons.CAPTION_EMPTY),
        ("   \n\t ", reasons.CAPTION_EMPTY),
        ("a cat", reasons.CAPTION_TOO_SHORT_CHARS),
        ("Hogsmeade Station", reasons.CAPTION_TOO_SHORT_WORDS),
        ("word " * 300, reasons.CAPTION_TOO_LONG_CHARS),
        ("x" * (1 << 20), reasons.CAPTION_TOO_LONG_CHARS),
        ("a dog " * 50, reasons.CAPTION_REPETITIVE),
        ("ab cd ef gh ij kl mn op " * 26, reasons.CAPTION_TOO_LONG_WORDS),
        ("DSC_2481", reasons.CAPTION_BOILERPLATE),
        ("IMG_4663.jpg", reasons.CAPTION_BOILERPLATE),
        ("Taichung_Polaroid_20070131-2", reasons.CAPTION_BOILERPLATE),
        ("onboard-off-board-clients", reasons.CAPTION_BOILERPLATE),
        ("https://example.com/images/photo123.jpg", reasons.CAPTION_BOILERPLATE),
        ("image may contain : person , on stage and playing a musical instrument", reasons.CAPTION_BOILERPLATE),
        ("Untitled", reasons.CAPTION_BOILERPLATE),
        ("Rooster Royalty Free Stock Photos", reasons.CAPTION_BOILERPLATE),
        ("a bell \u0007 in the middle of a caption", reasons.CAPTION_CONTROL_CHARS),
        ("decoded with \ufffd replacement characters", reasons.CAPTION_INVALID_UTF8),
        ("12345 67890 !!! ### 2021-01-01 $$$", reasons.CAPTION_NON_ALPHA),
        ("sale sale sale sale sale now", reasons.CAPTION_REPETITIVE),
        ("buy now buy now buy now buy now", reasons.CAPTION_REPETITIVE),
    ],
)
def test_caption_reasons(caption, expected):
    assert reason_of(caption) == expected


def test_thresholds_switch_off_with_none():
    cfg = CaptionFilterConfig(min_words=None, min_chars=None)
    assert reason_of("Hogsmeade Station", cfg) is None
    assert reason_of("a cat", cfg) is None


def test_language_filter_english_only():
    cfg = CaptionFilterConfig(languages=("en",))
    assert reason_of("a small boat on a calm lake", cfg) is None
    assert reason_of("Интеллектуалы коммунисты на собрании", cfg) == reasons.CAPTION_LANGUAGE
    assert reason_of("Intellectuels communistes dans leur bureau", cfg) == reasons.CAPTION_LANGUAGE


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_chars=10, max_chars=5), dict(min_words=5, max_words=2), dict(languages=("English",)),
     dict(languages=()), dict(languages=("en",), detect_language=False)],
)
def test_bad_config_raises_in_init(kwargs):
    with pytest.raises(ValueError):
        CaptionFilterConfig(**kwargs)


@pytest.mark.parametrize(
    "caption, flags",
    [
        ("a brown dog running on a sandy beach", []),
        ("Boston harbour at night - 00201", ["trailing_id"]),
        ("Fireworks and Morey's Pier in North Wildwood July 2007", []),
        ("Coffee Table With Tray Top Color: Gray", ["title_case_listing"]),
        ("a dog dog running on the beach", ["repeated_words"]),
        ("Closeup of burning camping bonfire Stock Photo - Royalty-Free", ["watermark"]),
        ("<a href='x'>Yale New Haven hospital entrance</a>", ["markup"]),
        ("my holiday photo IMG_4663 at the lake", ["file_name_token"]),
        ("Long ago far away", ["short"]),
        ("KAWASAKI ZX9R THROTTLE TUBE GRIPS", ["all_caps"]),
    ],
)
def test_quality_flags(caption, flags):
    assert sorted(CaptionQualityFlagger(CaptionFilterConfig())(Pair(key="k", caption=caption))) == flags
