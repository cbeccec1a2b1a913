"""`stats` caption lengths in the filter's units: words for space-separated scripts, characters for
CJK (a Chinese caption used to be one "word"); the same series in the PNG `mmcorpus report` embeds.
Expected lengths are counted by hand."""

from __future__ import annotations

import json
import re
import warnings

import pytest
from PIL import Image

from pipelines import report, stats
from schemas.records import Pair

from helpers import make_stage_dir

# (caption, unit, length) — counted by hand
CAPTIONS = [
    ("a brown dog running on a sandy beach", "words", 8),
    ("two children flying a red kite", "words", 6),
    ("un perro corriendo en la playa", "words", 6),
    ("一只白色的小狗睡在沙发上", "characters", 12),
    ("雨天行人打着伞顶着风行走在街道上", "characters", 16),
    ("一間臥室的桌子上放著三個花瓶", "characters", 14),
    ("桜の木の下でお弁当を食べる家族", "characters", 15),
    ("해변에서 뛰어노는 강아지 두 마리", "characters", 14),  # 14 Hangul syllables (spaces are not units)
    ("我爱NBA篮球", "characters", 5),  # 4 CJK characters + 1 Latin word, as the filter counts them
    ("一只猫在 sofa 上睡觉", "characters", 8),  # 7 + 1
    ("แมวนอนบนโซฟา", "characters", 12),  # Thai: no spaces between words, 12 code points
]


@pytest.mark.parametrize("caption, unit, n", CAPTIONS)
def test_caption_length_units(caption, unit, n):
    assert stats.caption_length(caption) == (unit, n)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    pairs = [Pair(key=f"k{i:02d}", caption=c, url=f"http://img.example/{i}.jpg") for i, (c, _, _) in enumerate(CAPTIONS)]
    return make_stage_dir(str(tmp_path_factory.mktemp("lengths") / "filter"), pairs)


def test_stats_measures_cjk_captions_in_characters(stage, capsys):
    panel = stats.collect(stage)["panels"]["caption_words"]
    assert {k: sorted(v) for k, v in panel.items()} == {
        "after filter": [6, 6, 8],
        "after filter · characters": [5, 8, 12, 12, 14, 14, 15, 16],
    }
    capsys.readouterr()
    assert stats.main([stage, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]["caption_words"]
    assert summary["after filter · characters"] == {"n": 8, "min": 5, "mean": 12.0, "max": 16}
    assert summary["after filter"] == {"n": 3, "min": 6, "mean": 20 / 3, "max": 8}


def test_english_only_output_keeps_one_word_series(tmp_path):
    pairs = [Pair(key="e1", caption="a dog on a beach", url="http://x/1.jpg"),
             Pair(key="e2", caption="two cats", url="http://x/2.jpg")]
    panel = stats.collect(make_stage_dir(str(tmp_path / "filter"), pairs))["panels"]["caption_words"]
    assert {k: sorted(v) for k, v in panel.items()} == {"after filter": [2, 5]}


def test_plot_and_report_draw_the_character_series(stage, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats.plot(stats.collect(stage), str(tmp_path / "stats.png"))
    assert [str(w.message) for w in caught if "missing from" in str(w.message)] == []
    desc = json.loads(Image.open(tmp_path / "stats.png").text["Description"])
    assert desc["caption_lengths"] == {"after filter": 3, "after filter · characters": 8}

    out = tmp_path / "report"
    report.write_report(stage, str(out))
    html = (out / "index.html").read_text(encoding="utf-8")
    src = re.search(r'<img class="stats" src="([^"]+)"', html).group(1)
    desc = json.loads(Image.open(out / src).text["Description"])
    assert desc["caption_lengths"] == {"after filter": 3, "after filter · characters": 8}
