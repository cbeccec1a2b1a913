"""The MiniCPM-V export of a bilingual rewrite: Chinese, Japanese, Korean and English records go
through the real rewrite stage (offline-template backend) and `mmcorpus export minicpmv`; the
export has exactly the same shape for every language — only the text's language differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from schemas.records import Pair

from helpers import make_stage_dir
from pack.fixtures import sample_pairs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTIONS = {  # written for this test
    "zh": "两只小猫趴在窗台上晒太阳",
    "ja": "猫がソファの上で寝ている",
    "ko": "해변에서 노는 아이들",
    "en": "two kittens sunbathing on a windowsill",
}
# What the offline template makes of each (question in the caption's language, full stop added)
EXPECTED = {
    "zh": ("图片里有什么？", "两只小猫趴在窗台上晒太阳。"),
    "ja": ("画像には何が写っていますか？", "猫がソファの上で寝ている。"),
    "ko": ("이미지에 무엇이 있나요?", "해변에서 노는 아이들."),
    "en": ("What does the image show?", "Two kittens sunbathing on a windowsill."),
}


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_export_is_the_same_shape_in_every_language(tmp_path):
    images = [p for p in sample_pairs(captions_only=0) if p.source.startswith("cc_images/")][:4]
    pairs = [Pair(key=f"{lang}-{i}", caption=CAPTIONS[lang], image=img.image, lang=lang, lang_score=1.0,
                  source=img.source) for i, (lang, img) in enumerate(zip(CAPTIONS, images))]
    filter_dir = make_stage_dir(str(tmp_path / "filter"), pairs)
    _cli("rewrite", "--input", filter_dir, "--output", str(tmp_path / "rewrite"), "--backend", "offline-template",
         "--policy", "all")
    _cli("export", "minicpmv", "--input", str(tmp_path / "rewrite"), "--output", str(tmp_path / "mv"))
    raw = (tmp_path / "mv" / "minicpmv.json").read_bytes()
    data = json.loads(raw)
    assert [d["id"] for d in data] == sorted(p.key for p in pairs)
    for d in data:
        lang = d["id"].split("-")[0]
        question, answer = EXPECTED[lang]
        assert set(d) == {"id", "image", "conversations"}
        assert d["conversations"] == [{"role": "user", "content": "<image>\n" + question},
                                      {"role": "assistant", "content": answer}]
        assert (tmp_path / "mv" / d["image"]).read_bytes() == next(p.image for p in pairs if p.key == d["id"])
        # written as UTF-8 text, not \\u escapes: the trainer's tokenizer sees the characters
        assert answer.encode("utf-8") in raw
    summary = json.loads((tmp_path / "mv" / "export.json").read_text(encoding="utf-8"))
    assert (summary["exported"], summary["with_qa"], summary["caption_only"]) == (4, 4, 0)
