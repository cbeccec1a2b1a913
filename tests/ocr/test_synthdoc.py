"""synthdoc: deterministic pages of real text, read back by the real OCR stage."""

from __future__ import annotations

import json
import pathlib

import pytest

from pipelines import ocr as ocr_stage
from pipelines import synthdoc
from pipelines.verify import verify
from schemas.errors import UserError
from transforms.stage_io import read_table


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def squash(s: str) -> str:
    return "".join(s.split())


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    cfg = d / "c.toml"
    cfg.write_text("[synthdoc]\nlayouts = ['single']\nmin_font_px = 22\nmax_font_px = 28\n"
                   "width = [420, 520]\nheight = [200, 260]\n")
    out = d / "pages"
    assert synthdoc.main(["--output", str(out), "--n", "2", "--lang", "en,zh", "--seed", "5", "--config", str(cfg)]) == 0
    return d, cfg, out


def test_pages_are_real_text_and_deterministic(pages, tmp_path):
    d, cfg, out = pages
    rows = read_table(str(out)).to_pylist()
    assert sorted(json.loads(r["meta"])["lang"] for r in rows) == ["en", "zh"]
    assert all(ch.ok for ch in verify(str(out)))
    zh_source = (pathlib.Path(synthdoc.__file__).resolve().parents[1] / "data/synthdoc/coco_cn_captions_300.tsv").read_text("utf-8")
    en_source = (pathlib.Path(synthdoc.__file__).resolve().parents[1] / "data/sample/cc3m_val_captions_8k.tsv").read_text("utf-8")
    for r in rows:
        lang = json.loads(r["meta"])["lang"]
        assert r["caption"] and r["qa"][0]["answer"] == r["caption"] and r["image_format"] == "JPEG"
        # every rendered line is a piece of the bundled corpus of that language
        source = squash(zh_source if lang == "zh" else en_source)
        assert all(squash(line) in source for line in r["caption"].split("\n"))
    again = tmp_path / "again"
    assert synthdoc.main(["--output", str(again), "--n", "2", "--lang", "en,zh", "--seed", "5", "--config", str(cfg)]) == 0
    for f in sorted(p.relative_to(out) for p in out.rglob("data/*.parquet")):
        assert (out / f).read_bytes() == (again / f).read_bytes()
    other = tmp_path / "other"
    assert synthdoc.main(["--output", str(other), "--n", "2", "--lang", "en,zh", "--seed", "6", "--config", str(cfg)]) == 0
    assert {r["image_sha256"] for r in rows}.isdisjoint({r["image_sha256"] for r in read_table(str(other)).to_pylist()})


def test_ocr_reads_back_a_synthdoc_page(pages):
    d, _, out = pages
    ocr_out = d / "ocr"
    assert ocr_stage.main(["--input", str(out), "--output", str(ocr_out)]) == 0
    rows = read_table(str(ocr_out)).to_pylist()
    assert len(rows) == 2
    for r in rows:
        # the caption is the rendered text; OCR adds no reading of its own to a page with ground truth
        assert r["raw_caption"] is None and len(r["qa"]) == 1
        truth = squash(r["caption"])
        read = squash("".join(json.loads(r["ocr"])["texts"]))
        cer = edit_distance(read, truth) / len(truth)
        assert cer <= 0.05, (json.loads(r["meta"])["lang"], cer, read, truth)
        assert json.loads(r["ocr"])["text_rich"] is True


def test_bad_settings_stop_before_work(tmp_path):
    with pytest.raises(UserError, match="langs"):
        synthdoc.main(["--output", str(tmp_path / "o"), "--n", "1", "--lang", "fr"])
    assert not (tmp_path / "o").exists()


def test_ocr_output_packs_at_stage_3_and_exports_transcriptions(pages):
    from pipelines import export, pack

    d, _, out = pages
    ocr_out = d / "ocr"
    if not (ocr_out / "manifest.json").exists():
        assert ocr_stage.main(["--input", str(out), "--output", str(ocr_out)]) == 0
    packed = d / "pack3"
    assert pack.main(["--input", str(ocr_out), "--output", str(packed), "--stage", "3", "--seq-len", "4096",
                      "--partitions", "1"]) == 0
    ledger = read_table(str(packed), "ledger").to_pylist()
    assert sorted((r["status"], r["reason"]) for r in ledger) == [("kept", "ok"), ("kept", "ok")]
    exported = d / "export"
    assert export.main(["minicpmv", "--input", str(ocr_out), "--output", str(exported)]) == 0
    items = json.loads((exported / "minicpmv.json").read_text("utf-8"))
    rows = {r["key"]: r for r in read_table(str(ocr_out)).to_pylist()}
    assert len(items) == 2
    for item in items:
        turns = item["conversations"]
        # one transcription turn answered with the exact rendered text, in reading order
        assert turns[0]["content"].startswith("<image>")
        assert turns[0]["content"].endswith(rows[item["id"]]["qa"][0]["question"])
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        assert answers == [rows[item["id"]]["caption"]]
