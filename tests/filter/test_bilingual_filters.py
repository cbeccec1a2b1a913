"""Script-aware caption rules and language identification: CJK captions are measured in characters,
no language is rejected by a rule written for another, and every kept caption gets a language."""

import pytest

from schemas import reasons
from schemas.records import Pair
from transforms import lang as lg
from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
from transforms.filter_base import run_filters

CHAIN = caption_filters(CaptionFilterConfig())
FLAGGER = CaptionQualityFlagger(CaptionFilterConfig())


def run(caption, cfg=None):
    chain = caption_filters(cfg) if cfg else CHAIN
    pair, reason, detail = run_filters(Pair(key="k", caption=caption), chain)
    return pair, reason


# The table: before this change the three CJK captions were lost as caption_too_short_words.
FIVE = [
    ("一只白色的小狗睡在沙发上", "zh"),
    ("雨天行人打着伞顶着风行走在街道上", "zh"),
    ("桜の木の下でお弁当を食べる家族", "ja"),
    ("a brown dog running on a sandy beach", "en"),
    ("un perro marrón corriendo en una playa de arena", "es"),
]


@pytest.mark.parametrize("caption, want_lang", FIVE)
def test_five_caption_table_all_kept_with_language(caption, want_lang):
    pair, reason = run(caption)
    assert reason is None
    assert pair.lang == want_lang
    assert 0.5 <= pair.lang_score <= 1.0


def test_languages_setting_keeps_only_those():
    cfg = CaptionFilterConfig(languages=("en", "zh"))
    got = {c: run(c, cfg)[1] for c, _ in FIVE}
    assert got == {
        FIVE[0][0]: None, FIVE[1][0]: None, FIVE[2][0]: reasons.CAPTION_LANGUAGE,
        FIVE[3][0]: None, FIVE[4][0]: reasons.CAPTION_LANGUAGE,
    }
    # Traditional Chinese is "zh" too.
    assert run("一個男人和一個女人穿著軍裝玩手機", cfg)[1] is None


@pytest.mark.parametrize(
    "caption, expected",
    [
        # CJK: characters, not spaces. 4 CJK characters is the minimum ("a cat" = 一只猫 is too short).
        ("一只猫", reasons.CAPTION_TOO_SHORT_CHARS),
        ("草地上的狗", None),  # 5 characters: shorter than DataComp's 6-char Latin minimum, still kept
        ("白色的猫", None),
        ("해변에서 노는 개", None),  # Korean: spaces, but Hangul syllables are the unit
        ("개", reasons.CAPTION_TOO_SHORT_CHARS),
        # mixed: words / 3 + CJK chars / 4 >= 1
        ("iPhone 15 手机壳", None),
        ("NBA 球星", reasons.CAPTION_TOO_SHORT_WORDS),
        # unspaced non-CJK scripts: only the character limits
        ("สุนัขวิ่งบนชายหาด", None),
        # scripts with spaces keep the word rule
        ("Собака на пляже", None),
        ("Собака пляж", reasons.CAPTION_TOO_SHORT_WORDS),
        # Devanagari vowel signs are marks, not punctuation
        ("समुद्र तट पर दौड़ता हुआ कुत्ता", None),
        # Chinese web boilerplate and repetition
        ("高清壁纸 免费下载", reasons.CAPTION_BOILERPLATE),
        ("图片来源：视觉中国", reasons.CAPTION_BOILERPLATE),
        ("千图网 素材 编号：1234567", reasons.CAPTION_BOILERPLATE),
        ("高清壁纸高清壁纸高清壁纸高清壁纸", reasons.CAPTION_BOILERPLATE),
        ("可爱的猫咪可爱的猫咪可爱的猫咪可爱的猫咪", reasons.CAPTION_REPETITIVE),
        ("一只猫在沙发上睡觉 图片来源：视觉中国", None),  # content + credit: kept, flagged
        # a number inside unspaced CJK text is not a file name (\w matches CJK characters) ...
        ("台北101大樓的夜景", None),
        ("北京101中学的校门", None),
        ("2020年东京奥运会的会场", None),
        ("上海中心大厦632米", None),
        ("東京スカイツリー634mの展望台", None),
        # ... but CJK file names still are
        ("微信图片_20200101123456", reasons.CAPTION_BOILERPLATE),
        ("微信图片_20200101123456.jpg", reasons.CAPTION_BOILERPLATE),
        ("截图-20190312", reasons.CAPTION_BOILERPLATE),
        ("风景照片001.png", reasons.CAPTION_BOILERPLATE),
        # full-width forms are the same rules
        ("ＤＳＣ＿２４８１", reasons.CAPTION_BOILERPLATE),
        ("１２３４５ ６７８９０ ！！！ ＃＃＃ ２０２１－０１－０１ ＄＄＄", reasons.CAPTION_NON_ALPHA),
    ],
)
def test_script_aware_reasons(caption, expected):
    assert run(caption)[1] == expected


@pytest.mark.parametrize(
    "caption, flags",
    [
        ("一只白色的小狗睡在沙发上", []),
        ("星星在夜空中慢慢地闪烁着光芒", []),  # reduplication (星星, 慢慢) is grammar, not repetition
        ("一只猫在沙发上睡觉 图片来源：视觉中国", ["watermark"]),
        ("蓝天白云", ["short"]),
        ("我爱NBA篮球比赛和球星", []),  # str.isupper() is True here: the case rules must not fire
        ("北京故宫北京故宫的雪景", ["repeated_words"]),
        ("東京タワーの夜景がとてもきれいです", []),
        ("a brown dog running on a sandy beach", []),
    ],
)
def test_flags_fit_the_script(caption, flags):
    assert sorted(FLAGGER(Pair(key="k", caption=caption))) == flags


@pytest.mark.parametrize(
    "text, lang",
    [
        ("猫", "zh"),  # CLD2 alone says Japanese for short Han-only text; the script rule decides
        ("一個男人和一個女人穿著軍裝", "zh"),
        ("東京タワーの夜景", "ja"),
        ("해변에서 노는 개", "ko"),
        ("一个小街道旁有一个红色醒目STOP标识牌", "zh"),
        ("Собака на пляже", "ru"),
        ("12345 !!!", "und"),
    ],
)
def test_detect(text, lang):
    assert lg.detect(text).lang == lang


def test_detect_survives_odd_code_points():
    # lone surrogates cannot be UTF-8 encoded; CLD2 raises on them: detect must still answer
    assert lg.detect("a dog on a beach \ud800 in the sun").lang in ("en", "und")


def test_language_off_leaves_fields_empty():
    pair, reason = run("a brown dog running on a sandy beach", CaptionFilterConfig(detect_language=False))
    assert reason is None and pair.lang is None and pair.lang_score is None


def test_pair_reads_rows_written_before_lang_existed():
    old_row = {"key": "k", "caption": "a dog", "quality_flags": None, "meta": None}
    p = Pair.from_row(old_row)
    assert p.lang is None and p.lang_score is None
    assert Pair.from_row(p.replace(lang="zh", lang_score=0.75).to_row()).lang == "zh"


def test_width_normalisation():
    assert lg.normalize_width("ＡＢＣ１２３！图片来源：视觉中国。") == "ABC123!图片来源:视觉中国."
    assert lg.drop_spaces_near_cjk("一只 猫 在 sofa 上") == "一只猫在sofa上"
    assert lg.to_simplified("一個男人穿著軍裝") == "一个男人穿著军装"
