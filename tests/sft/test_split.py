"""sft split: the documented rule on declared categories, answer lengths, turn counts and text-only data."""

from __future__ import annotations

import json
import pathlib

import pytest

from pipelines import sft as cli
from schemas import sft as S
from schemas.records import Pair
from transforms.sft_split import SftSplitConfig
from transforms.stage_io import read_table

REPO = pathlib.Path(__file__).resolve().parents[2]
QA90 = REPO / "data" / "sample" / "llava_qa90"
PHOTO = REPO / "data" / "sample" / "cc_images" / "0006400c1c224e19.jpg"


def test_rule_order():
    cfg = SftSplitConfig(min_part2_tokens_per_turn=50, min_part2_turns=3)
    assert cfg.part_of([500], "conv", True) == 1  # declared category wins over length
    assert cfg.part_of([5], "detail", True) == 2
    assert cfg.part_of([10, 90], None, True) == 2  # mean 50 >= 50
    assert cfg.part_of([10, 89], None, True) == 1
    assert cfg.part_of([1, 1, 1], None, True) == 2
    assert cfg.part_of([5], None, False) == 2
    assert SftSplitConfig(text_only_part2=False).part_of([5], None, False) == 1
    with pytest.raises(ValueError, match="both parts"):
        SftSplitConfig(part1_categories=("a",), part2_categories=("a",))


def test_split_per_source(tmp_path, capsys):
    ing1, ing2, out = tmp_path / "i1", tmp_path / "i2", tmp_path / "split"
    cli.ingest(["--input", str(QA90 / "qa90_vqa.jsonl"), "--format", "vqa", "--name", "llava_qa90",
                "--images", str(QA90 / "images"), "--output", str(ing1)])
    long = "The scene shows " + "a very detailed and long description " * 40
    recs = [
        {"id": "short", "image": "0006400c1c224e19.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Fireworks."}]},
        {"id": "long", "image": "0006400c1c224e19.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": long}]},
        {"id": "many", "image": "0006400c1c224e19.jpg", "conversations": [
            {"from": "human" if i % 2 == 0 else "gpt", "value": ("<image>\nq" if i == 0 else "q") if i % 2 == 0 else "a"} for i in range(8)]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    f = tmp_path / "mix.json"
    f.write_text(json.dumps(recs))
    cli.ingest(["--input", str(f), "--format", "llava", "--name", "mix",
                "--images", str(REPO / "data" / "sample" / "cc_images"), "--output", str(ing2)])
    assert cli.main(["split", "--input", str(ing1), "--input", str(ing2), "--output", str(out)]) == 0
    parts = {}
    for r in read_table(str(out)).to_pylist():
        s = S.SftSample.from_pair(Pair.from_row(r))
        parts[s.key] = s.part
        assert len(s.assistant_tokens) == len(s.turns) and min(s.assistant_tokens) >= 1
    qa = {k: v for k, v in parts.items() if k.startswith("llava_qa90-")}
    cats = {json.loads(l)["question_id"]: json.loads(l)["category"] for l in (QA90 / "qa90_vqa.jsonl").read_text().splitlines()}
    assert qa == {f"llava_qa90-{i}": (1 if c == "conv" else 2) for i, c in cats.items()}
    assert {k: v for k, v in parts.items() if k.startswith("mix-")} == {"mix-short": 1, "mix-long": 2, "mix-many": 2, "mix-text": 2}
    from transforms.stage_io import read_manifest

    rep = read_manifest(str(out)).extra["split"]
    assert rep["llava_qa90"]["part1"]["samples"] == 30 and rep["llava_qa90"]["part2"]["samples"] == 60
    assert rep["mix"]["part1"] == {"samples": 1, "turns": 1, "assistant_tokens": rep["mix"]["part1"]["assistant_tokens"], "text_only": 0}
    assert rep["mix"]["part2"]["samples"] == 3 and rep["mix"]["part2"]["turns"] == 1 + 4 + 1 and rep["mix"]["part2"]["text_only"] == 1
    from pipelines.stats import collect, plot

    st = collect(str(out))
    lens = st["panels"]["sft_answer_tokens"]
    assert {k: len(v) for k, v in lens.items()} == {"part 1": 31, "part 2": 66}  # turns per part
    assert "sft_answer_tokens" in plot(st, str(tmp_path / "stats.png"))
    printed = capsys.readouterr().out
    assert "llava_qa90" in printed and "part2" in printed and "90 in, 90 kept" not in printed  # 94 inputs
    assert "94 in, 94 kept" in printed
