"""The OCR stage end to end with the real RapidOCR models from the wheel (no stub)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw, ImageFont

from pipelines import ocr as ocr_stage
from pipelines.verify import verify
from schemas.records import Pair
from transforms import ocr as ocr_mod
from transforms.safety import NsfwModel
from transforms.stage_io import read_table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from helpers import make_stage_dir  # noqa: E402

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
EN_LINE = "Fresh bread every morning"
ZH_LINE = "欢迎光临小店"


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def text_image() -> bytes:
    im = Image.new("RGB", (420, 140), (250, 248, 240))
    d = ImageDraw.Draw(im)
    d.text((12, 16), EN_LINE, font=ImageFont.truetype(DEJAVU, 26), fill=(20, 20, 20))
    d.text((12, 78), ZH_LINE, font=ImageFont.truetype(NOTO_CJK, 30), fill=(20, 20, 20))
    return png(im)


def plain_image() -> bytes:
    im = Image.new("RGB", (160, 120))
    im.putdata([(x % 160, y % 120 * 2, 90) for y in range(120) for x in range(160)])
    return png(im)


def pair(key: str, image: bytes | None, caption: str = "a picture") -> Pair:
    return Pair(key=key, caption=caption, image=image, source=f"t#{key}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ocr_in")
    pairs = [
        pair("text1", text_image(), "a shop sign"),
        pair("plain1", plain_image()),
        pair("broken1", b"\x89PNG\r\n\x1a\n not really a png"),
        pair("noimage1", None),
    ]
    return make_stage_dir(str(d / "in"), pairs)


def test_ocr_stage_reads_text_flags_and_ledgers(inputs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert ocr_stage.main(["--input", inputs, "--output", str(out), "--cache-dir", str(cache), "--num-shards", "2"]) == 0
    ledger = {r["key"]: (r["status"], r["reason"]) for r in read_table(str(out), "ledger").to_pylist()}
    assert ledger == {
        "text1": ("kept", "ok"), "plain1": ("kept", "ok"),
        "broken1": ("rejected", "image_undecodable"), "noimage1": ("rejected", "image_missing"),
    }
    rows = {r["key"]: r for r in read_table(str(out)).to_pylist()}
    text = json.loads(rows["text1"]["ocr"])
    assert text["texts"] == [EN_LINE, ZH_LINE]
    assert text["chars"] == len(EN_LINE.replace(" ", "")) + len(ZH_LINE)
    assert text["text_rich"] is True and len(text["boxes"]) == 2 and min(text["scores"]) > 0.9
    assert 0.1 < text["text_area_ratio"] < 0.6
    plain = json.loads(rows["plain1"]["ocr"])
    assert plain["texts"] == [] and plain["chars"] == 0 and plain["text_rich"] is False
    assert plain["text_area_ratio"] == 0.0
    # stage-3 samples: transcription QA in reading order, caption enriched and marked, original kept
    t = rows["text1"]
    assert t["qa"][-1]["answer"] == f"{EN_LINE}\n{ZH_LINE}"
    assert t["qa"][-1]["question"] in ocr_mod.TRANSCRIBE_PROMPTS["en"]  # mostly Latin text -> an English prompt
    assert t["caption"] == f"a shop sign [OCR text: {EN_LINE} / {ZH_LINE}]" and t["raw_caption"] == "a shop sign"
    assert rows["plain1"]["caption"] == "a picture" and rows["plain1"]["qa"] is None
    assert all(ch.ok for ch in verify(str(out)))
    # one cache entry per model and decodable image, keyed by the image sha256 (never for the broken one)
    entries = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    shas = sorted(hashlib.sha256(b).hexdigest() for b in (text_image(), plain_image()))
    assert sorted((e["model"][0], e["image_sha256"]) for e in entries) == sorted(
        [("nudenet-3.4.2/320n", s) for s in shas] + [("rapidocr-3.10.0/PP-OCRv6-small", s) for s in shas])
    # safety flags on every kept record: no NSFW on a sign or a gradient, no PII, no watermark
    assert json.loads(rows["text1"]["safety"]) == {"nsfw_classes": [], "nsfw_score": 0.0}
    # OCR and safety counts in the manifest, shown by inspect and drawn by stats --plot
    signals = {"ocr_text_found": 1, "ocr_text_rich": 1, "ocr_no_text": 1, "nsfw_score_gt_0": 0, "pii_flagged": 0,
               "watermark_text": 0, "laion_punsafe_present": 0, "laion_pwatermark_present": 0}
    assert json.loads((out / "manifest.json").read_text())["extra"]["image_signals"] == signals
    env = dict(os.environ, COLUMNS="200")
    shown = subprocess.run([sys.executable, "-m", "pipelines.cli", "inspect", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "image_signals.ocr_text_rich" in shown.stdout and "model_error" not in shown.stdout
    png_path = tmp_path / "stats.png"
    st = subprocess.run([sys.executable, "-m", "pipelines.cli", "stats", str(out), "--json", "--plot", str(png_path)],
                        capture_output=True, text=True, env=env, timeout=300)
    assert st.returncode == 0, st.stderr
    summary = json.loads(st.stdout)
    assert "image_signals" in summary["plot"]["panels"]
    assert summary["summary"]["image_signals"] == {f"ocr: {k}": v for k, v in signals.items()}
    assert Image.open(png_path).size[0] > 0


def test_rerun_is_answered_from_cache_and_byte_identical(inputs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, second = tmp_path / "a", tmp_path / "b"
    assert ocr_stage.main(["--input", inputs, "--output", str(first), "--cache-dir", str(cache)]) == 0

    def no_model(self, image):
        raise AssertionError("the model ran although the cache holds the answer")

    monkeypatch.setattr(ocr_mod.RapidOcrModel, "run", no_model)
    monkeypatch.setattr(NsfwModel, "run", no_model)
    assert ocr_stage.main(["--input", inputs, "--output", str(second), "--cache-dir", str(cache)]) == 0
    for f in sorted(p.relative_to(first) for p in first.rglob("*.parquet")):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_model_error_is_a_ledger_row(inputs, tmp_path, monkeypatch):
    def broken(self, image):
        raise RuntimeError("onnx session died")

    monkeypatch.setattr(ocr_mod.RapidOcrModel, "run", broken)
    out = tmp_path / "out"
    assert ocr_stage.main(["--input", inputs, "--output", str(out)]) == 0
    ledger = {r["key"]: (r["status"], r["reason"], r["detail"]) for r in read_table(str(out), "ledger").to_pylist()}
    assert ledger["text1"] == ("error", "model_error", "ocr: RuntimeError: onnx session died")
    assert ledger["plain1"][:2] == ("error", "model_error")
    assert ledger["broken1"][:2] == ("rejected", "image_undecodable")
    assert read_table(str(out)).num_rows == 0


def test_bad_config_and_missing_input_are_user_errors(tmp_path):
    from schemas.errors import UserError

    with pytest.raises(UserError, match="not a finished mmcorpus stage output"):
        ocr_stage.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    cfg = tmp_path / "c.toml"
    cfg.write_text("[ocr]\nprompt_langs = ['fr']\n")
    (tmp_path / "in").mkdir()
    with pytest.raises(UserError, match="prompt_langs"):
        ocr_mod_cfg = ocr_stage.load_config(str(cfg))  # noqa: F841


def test_pixel_bound_is_checked_before_decoding(inputs, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[ocr]\nmax_pixels = 20000\n")
    out = tmp_path / "out"
    assert ocr_stage.main(["--input", inputs, "--output", str(out), "--config", str(cfg), "--no-safety"]) == 0
    ledger = {r["key"]: (r["status"], r["reason"], r["detail"]) for r in read_table(str(out), "ledger").to_pylist()}
    assert ledger["text1"] == ("rejected", "image_too_many_pixels", "420x140 = 58800 pixels > 20000")
    assert ledger["plain1"][:2] == ("kept", "ok")  # 160 x 120 = 19200
    assert json.loads(read_table(str(out)).to_pylist()[0]["safety"] or "null") is None


def test_prompt_follows_the_script_of_the_text():
    zh_prompts, en_prompts = ocr_mod.TRANSCRIBE_PROMPTS["zh"], ocr_mod.TRANSCRIBE_PROMPTS["en"]
    assert {ocr_mod.pick_prompt(f"k{i}", ("en", "zh"), "欢迎光临 OK") for i in range(40)} == set(zh_prompts)
    assert {ocr_mod.pick_prompt(f"k{i}", ("en", "zh"), "OPEN 24 HOURS 店") for i in range(40)} == set(en_prompts)
    assert {ocr_mod.pick_prompt(f"k{i}", ("en",), "欢迎光临") for i in range(40)} == set(en_prompts)
