"""Chinese captions in dedup: width, CJK punctuation, spacing, credit suffixes and Traditional script
fold into one key; CJK text is shingled in character bigrams; the real dedup stage merges light
edits of a Chinese caption and leaves different Chinese captions alone."""

from __future__ import annotations

import pytest

from pipelines import dedup
from schemas.records import Pair
from tests.dedup.stage_fixture import write_pairs
from transforms import minhash as mh
from transforms.stage_io import read_table


@pytest.mark.parametrize(
    "variant",
    [
        "一只白色的小狗睡在沙发上",
        "一只白色的小狗，睡在沙发上。",  # CJK punctuation
        "一只白色的小狗,睡在沙发上.",  # ASCII punctuation
        "一只白色的小狗 睡在 沙发上",  # inserted spaces
        "一只白色的小狗睡在沙发上！",  # full-width exclamation mark
        "一隻白色的小狗睡在沙發上",  # Traditional script
        "一只白色的小狗睡在沙发上 图片来源：视觉中国",  # credit suffix
        "一只白色的小狗睡在沙发上_千图网",  # stock-site suffix
        "一只白色的小狗睡在沙发上（图片来源：摄图网）",
    ],
)
def test_light_edits_share_one_normal_form(variant):
    assert mh.normalize_caption(variant) == "一只白色的小狗睡在沙发上"


def test_full_width_latin_and_english_unchanged():
    assert mh.normalize_caption("ＮＢＡ球星 在 球场上") == "nba球星在球场上"
    assert mh.normalize_caption("  The DOG, on  the beach!! ") == "the dog on the beach"
    # a credit in the middle is content, not a suffix: kept
    assert mh.normalize_caption("图片来源不明的一张老照片") == "图片来源不明的一张老照片"


def test_cjk_text_is_shingled_in_character_bigrams():
    assert mh.cjk_ngram(5) == 2
    assert mh.shingles("一只猫在沙发上", mh.CHAR, 5) == ["一只", "只猫", "猫在", "在沙", "沙发", "发上"]
    # word 2-grams span about 2 x 1.4 characters: character trigrams for CJK text
    assert mh.shingles("一只猫在沙发上", mh.WORD, 2) == ["一只猫", "只猫在", "猫在沙", "在沙发", "沙发上"]
    # mostly Latin text keeps the configured shingles
    assert mh.shingles("iphone 15 pro 手机", mh.CHAR, 5)[0] == "iphon"


def test_dedup_stage_merges_chinese_light_edits(tmp_path):
    families = {
        "a": ["一只白色的小狗睡在沙发上", "一只白色的小狗，睡在沙发上。", "一隻白色的小狗睡在沙發上",
              "一只白色的小狗睡在沙发上 图片来源：视觉中国", "一只白色小狗睡在沙发上"],  # last: one dropped char
        "b": ["雨天行人打着伞顶着风行走在街道上", "雨天行人打着伞 顶着风行走在街道上", "雨天行人打着伞顶着风行走在街道上_千图网"],
    }
    singles = ["三个甜甜圈旁边放着三种不同口味的蘸酱", "一间卧室的桌子上放着三个花瓶", "一个人正透过白色的门框向厕所中拍照",
               "两个人正在网球场上打网球"]
    pairs = [Pair(key=f"{fam}{i}", caption=c) for fam, caps in families.items() for i, c in enumerate(caps)]
    pairs += [Pair(key=f"s{i}", caption=c) for i, c in enumerate(singles)]
    inp = write_pairs(str(tmp_path / "in"), pairs)
    out = str(tmp_path / "out")
    assert dedup.main(["--input", inp, "--output", out]) == 0
    ledger = {r["key"]: r for r in read_table(out, "ledger").to_pylist()}
    assert len(ledger) == len(pairs)
    for fam, caps in families.items():
        keys = [f"{fam}{i}" for i in range(len(caps))]
        assert len({ledger[k]["cluster_id"] for k in keys}) == 1 and ledger[keys[0]]["cluster_id"] is not None
        assert sorted(ledger[k]["status"] for k in keys) == ["duplicate"] * (len(keys) - 1) + ["kept"]
    for i in range(len(singles)):
        assert (ledger[f"s{i}"]["status"], ledger[f"s{i}"]["cluster_id"]) == ("kept", None)
