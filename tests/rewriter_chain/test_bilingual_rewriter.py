"""The rewriter in the caption's language: Chinese prompts for Chinese captions, the CJK faithfulness
rules, language-stratified seed sampling and the language in the SFT export."""

from __future__ import annotations

import json
import os

import pytest

from rewriter import prompts
from rewriter.offline import template_rewrite
from rewriter.seed import SampleConfig, sample_rows
from rewriter.sft import ExportConfig, export_sft


def test_chinese_caption_gets_the_chinese_prompt():
    sys_m, user_m = prompts.build_messages("一只白色的小狗睡在沙发上")
    assert sys_m["content"] == prompts.SYSTEM_PROMPT_ZH and user_m["content"] == "原始说明：一只白色的小狗睡在沙发上"
    sys_m, user_m = prompts.build_messages("a white puppy asleep on a sofa")
    assert sys_m["content"] == prompts.SYSTEM_PROMPT and user_m["content"] == "Raw caption: a white puppy asleep on a sofa"
    assert prompts.build_messages("a dog", lang="zh")[0]["content"] == prompts.SYSTEM_PROMPT_ZH


def test_offline_template_answers_in_chinese():
    out = template_rewrite("一只白色的小狗睡在沙发上")
    assert out == {"qa": [{"question": "图片里有什么？", "answer": "一只白色的小狗睡在沙发上。"}],
                   "caption": "一只白色的小狗睡在沙发上。"}


@pytest.mark.parametrize(
    "raw, adopted, ok, missing",
    [
        ("一个小街道旁有一个红色醒目STOP标识牌", "街道旁有一个红色的STOP标识牌。", True, ""),
        ("一个小街道旁有一个红色醒目STOP标识牌", "街道旁有一个红色的标识牌。", False, "STOP"),
        ("山上有2只牛，一只站着，一只卧在地上", "山上有两只牛，一只站着，一只卧着。", True, ""),
        ("3艘小船在海边，每艘船上有许多人", "海边有三艘小船，船上有许多人。", True, ""),
        ("3艘小船在海边，每艘船上有许多人", "海边有几艘小船，船上有许多人。", False, "3"),
        ("书架上放着《红楼梦》和《三国演义》", "书架上放着《红楼梦》和《三国演义》两本书。", True, ""),
        ("书架上放着《红楼梦》和《三国演义》", "书架上放着《红楼梦》。", False, "三国演义"),
        ("一位游客在「故宫」门前拍照", "一位游客在故宫门前拍照。", True, ""),
        ("一位游客在「故宫」门前拍照", "一位游客在宫殿门前拍照。", False, "故宫"),
        ("他手里拿着一部iPhone手机", "他拿着一部iPhone。", True, ""),
        ("他手里拿着一部iPhone手机", "他拿着一部手机。", False, "iPhone"),
        # pure Chinese without numbers, Latin words or marked titles: nothing to check
        ("一个男人和一个女人穿着军装玩手机。", "一男一女穿着军装在玩手机。", True, ""),
    ],
)
def test_cjk_faithfulness(raw, adopted, ok, missing):
    got_ok, detail = prompts.check_faithful(raw, adopted)
    assert got_ok is ok
    if not ok:
        assert detail == f"missing from the adopted caption: {missing}"


def test_cjk_caption_is_not_garbage_and_english_rules_unchanged():
    assert not prompts.faithfulness_constraints("山上有2只牛").garbage
    assert prompts.faithfulness_constraints("猫").garbage
    # the whole CJK run used to be one "word" (str.isupper() is True for "一个STOP"): no longer
    assert prompts.faithfulness_constraints("一个红色醒目STOP标识牌").entities == ("STOP",)
    assert prompts.check_faithful("a dog in Paris with 3 cats", "A dog in Paris with three cats.") == (True, "")


def test_seed_sampling_is_stratified_by_language():
    rows = [{"key": f"e{i:03d}", "caption": f"a photo of a dog number {i}", "lang": "en",
             "quality_flags": [], "needs_rewrite": False} for i in range(90)]
    rows += [{"key": f"z{i:03d}", "caption": f"一只小狗在草地上奔跑{i}", "lang": "zh",
              "quality_flags": [], "needs_rewrite": False} for i in range(10)]
    selected, report = sample_rows(rows, SampleConfig(n=20, length_bins=(64,)))
    # one per stratum, then the other 18 by largest remainder: en 18*89/98 = 16.35, zh 18*9/98 = 1.65
    # -> 16 + 1, and the one left goes to zh (remainder .65 > .35): en 1+16 = 17, zh 1+1+1 = 3
    assert report == {"en|clean|<64": {"population": 90, "selected": 17},
                      "zh|clean|<64": {"population": 10, "selected": 3}}
    assert sum(r["key"].startswith("z") for r in selected) == 3


def test_sft_export_carries_language(tmp_path):
    seed = tmp_path / "seed"
    os.makedirs(seed)
    caps = [("k1", "一只白色的小狗睡在沙发上", "zh"), ("k2", "a white puppy asleep on a sofa", "en"),
            ("k3", "两个孩子在公园里放风筝", None)]  # a seed record written before `lang` existed
    with open(seed / "seed.jsonl", "w", encoding="utf-8") as f:
        for key, cap, lang in caps:
            rec = {"key": key, "caption": cap, "status": "ok", "reason": "ok", "model": "t",
                   "prompt_version": prompts.PROMPT_VERSION, "response": template_rewrite(cap)}
            if lang:
                rec["lang"] = lang
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (seed / "provenance.json").write_text(json.dumps({"model": "t", "prompt_version": prompts.PROMPT_VERSION}))
    summary = export_sft(str(seed), str(tmp_path / "sft"), ExportConfig(validation_fraction=0.0))
    assert summary["languages"] == {"en": 1, "zh": 2}
    examples = [json.loads(x) for x in (tmp_path / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    by_lang = {ex["messages"][1]["content"]: ex["lang"] for ex in examples}
    assert by_lang == {"原始说明：一只白色的小狗睡在沙发上": "zh", "Raw caption: a white puppy asleep on a sofa": "en",
                       "原始说明：两个孩子在公园里放风筝": "zh"}
    zh = next(ex for ex in examples if ex["lang"] == "zh")
    assert zh["messages"][0]["content"] == prompts.SYSTEM_PROMPT_ZH
    assert json.loads(zh["messages"][2]["content"])["qa"][0]["question"] == "图片里有什么？"
