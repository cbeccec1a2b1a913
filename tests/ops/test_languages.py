"""Counts by language in `mmcorpus stats` / `inspect`, and CJK labels that render: a real filter run
over English, Chinese and Japanese captions, checked against an independent pyarrow read."""

from __future__ import annotations

import collections
import json
import warnings

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import inspection, stats

CAPTIONS = [
    "a brown dog running on a sandy beach",
    "two children flying a red kite in a park",
    "an old wooden boat tied to a pier at sunset",
    "一只白色的小狗睡在沙发上",
    "雨天行人打着伞顶着风行走在街道上",
    "桌子上放着一块巧克力蛋糕",
    "一間臥室的桌子上放著三個花瓶",
    "桜の木の下でお弁当を食べる家族",
    "一只猫",  # too short: rejected, so not counted
]


@pytest.fixture(scope="module")
def bilingual_filter(tmp_path_factory):
    from pipelines import filter as filter_

    root = tmp_path_factory.mktemp("bilingual")
    table = root / "captions.tsv"
    table.write_text("caption\turl\n" + "".join(f"{c}\thttp://img.example/{i}.jpg\n" for i, c in enumerate(CAPTIONS)),
                     encoding="utf-8")
    out = root / "filter"
    args, beam_args = filter_.parser().parse_known_args(["--input", str(table), "--output", str(out)])
    filter_.run(args, beam_args)
    return out


def test_filter_writes_lang_and_stats_counts_it(bilingual_filter, capsys):
    rows = [r for f in sorted((bilingual_filter / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    by_caption = {r["caption"]: r["lang"] for r in rows}
    assert by_caption == {CAPTIONS[0]: "en", CAPTIONS[1]: "en", CAPTIONS[2]: "en", CAPTIONS[3]: "zh",
                          CAPTIONS[4]: "zh", CAPTIONS[5]: "zh", CAPTIONS[6]: "zh", CAPTIONS[7]: "ja"}
    assert all(0 < r["lang_score"] <= 1 for r in rows)
    capsys.readouterr()
    assert stats.main([str(bilingual_filter), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["languages"] == {"after filter": {"zh": 4, "en": 3, "ja": 1}}


def test_inspect_counts_by_language(bilingual_filter, capsys):
    capsys.readouterr()
    assert inspection.main([str(bilingual_filter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["describe"]
    assert info["languages"] == {"zh": 4, "en": 3, "ja": 1}


def test_plot_renders_cjk_labels(bilingual_filter, tmp_path):
    out = tmp_path / "stats.png"
    assert stats.use_cjk_font() is not None, "no CJK font: run `make system-deps` (fonts-noto-cjk)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = stats.collect(str(bilingual_filter))
        drawn = stats.plot(data, str(out))
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert missing == []  # matplotlib warns "Glyph ... missing from font(s)" when it draws boxes
    assert drawn == ["caption_words", "languages", "ledger_reasons"]
    img = Image.open(out)
    assert json.loads(img.text["Description"])["panels"] == drawn


def test_files_without_lang_have_no_language_panel(tmp_path):
    # Language identification switched off: the `lang` column is all null, so no panel.
    from pipelines import filter as filter_

    table = tmp_path / "c.tsv"
    table.write_text("caption\turl\na brown dog running on a sandy beach\thttp://x/1.jpg\n", encoding="utf-8")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[filter.caption]\ndetect_language = false\n")
    args, beam_args = filter_.parser().parse_known_args(["--input", str(table), "--output", str(tmp_path / "f"), "--config", str(cfg)])
    filter_.run(args, beam_args)
    assert "languages" not in stats.collect(str(tmp_path / "f"))["panels"]
    assert collections.Counter(stats._lang_counts(str(tmp_path / "f"), 10)) == collections.Counter()
