"""Safety and privacy flags: PII rules on a hand-labelled fixture, and the rules inside the real OCR stage."""

from __future__ import annotations

import io
import json
import pathlib
import sys

import pytest
from PIL import Image, ImageDraw, ImageFont

from pipelines import ocr as ocr_stage
from schemas.records import Pair
from transforms import safety
from transforms.stage_io import read_table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from helpers import make_stage_dir  # noqa: E402

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "pii" / "captions.jsonl"
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def test_pii_rules_on_the_labelled_fixture():
    rows = [json.loads(x) for x in FIXTURE.read_text("utf-8").splitlines() if x.strip()]
    assert len(rows) == 28
    wrong = [(r["text"], r["pii"], sorted({rule for *_, rule in safety.find_pii(r["text"])}))
             for r in rows if sorted({rule for *_, rule in safety.find_pii(r["text"])}) != sorted(r["pii"])]
    assert wrong == []


def test_checksums_and_scrub():
    assert safety.luhn_ok("4111111111111111") and not safety.luhn_ok("4111111111111112")
    assert safety.cn_id_ok("11010519491231002X") and not safety.cn_id_ok("110105194912310021")
    assert not safety.cn_id_ok("110105194913310029")  # month 13
    text = "mail bob@example.org or call (212) 555-0187, card 4111-1111-1111-1111"
    assert safety.scrub_pii(text, safety.find_pii(text)) == "mail [EMAIL] or call [PHONE], card [CARD]"


def test_nsfw_decision_uses_the_threshold():
    cfg = safety.SafetyConfig(max_nsfw_score=0.6)
    p = Pair(key="k", caption="a person", source="s")
    hot = {"nsfw": {"model": safety.NSFW_MODEL, "score": 0.81, "classes": ["FEMALE_BREAST_EXPOSED"]}}
    o = safety.apply_safety(p, hot, cfg)
    assert (o.status, o.reason, o.detail) == ("rejected", "nsfw", "nsfw score 0.81 > 0.6 (FEMALE_BREAST_EXPOSED)")
    o = safety.apply_safety(p, {"nsfw": dict(hot["nsfw"], score=0.6)}, cfg)
    assert (o.status, o.detail) == ("kept", "nsfw 0.6")
    o = safety.apply_safety(p, hot, safety.SafetyConfig(max_nsfw_score=None))
    assert o.status == "kept" and json.loads(o.pair.safety)["nsfw_score"] == 0.81
    with pytest.raises(ValueError, match="pii_action"):
        safety.SafetyConfig(pii_action="delete")


def sign(text: str) -> bytes:
    im = Image.new("RGB", (360, 90), (255, 255, 255))
    ImageDraw.Draw(im).text((14, 24), text, font=ImageFont.truetype(DEJAVU, 30), fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_rules_in_the_ocr_stage(tmp_path):
    plain = sign("OPEN DAILY")
    pairs = [
        Pair(key="unsafe1", caption="a street", image=plain, meta=json.dumps({"punsafe": 0.93}), source="s#1"),
        Pair(key="wmark1", caption="a street", image=plain, meta=json.dumps({"pwatermark": 0.97, "punsafe": 0.01}), source="s#2"),
        Pair(key="pii1", caption="shop sign, call 13912345678 or mail shop@example.com", image=plain, source="s#3"),
        Pair(key="stock1", caption="a sign", image=sign("shutterstock"), source="s#4"),
        Pair(key="fine1", caption="a sign", image=plain, meta=json.dumps({"punsafe": 0.2}), source="s#5"),
    ]
    inp = make_stage_dir(str(tmp_path / "in"), pairs)
    cache = str(tmp_path / "cache")

    def run(name: str, toml: str):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(toml)
        out = tmp_path / name
        assert ocr_stage.main(["--input", inp, "--output", str(out), "--cache-dir", cache, "--config", str(cfg)]) == 0
        ledger = {r["key"]: (r["status"], r["reason"], r["detail"]) for r in read_table(str(out), "ledger").to_pylist()}
        return ledger, {r["key"]: r for r in read_table(str(out)).to_pylist()}

    ledger, rows = run("flag", "[safety]\npii_action = 'flag'\n")
    assert ledger["unsafe1"] == ("rejected", "laion_punsafe", "punsafe 0.93 > 0.5")
    assert ledger["wmark1"] == ("rejected", "laion_pwatermark", "pwatermark 0.97 > 0.8")
    assert ledger["pii1"] == ("kept", "ok", "pii email,phone flag")
    assert ledger["stock1"] == ("kept", "ok", "watermark 'shutterstock'")
    assert ledger["fine1"] == ("kept", "ok", "")
    assert json.loads(rows["fine1"]["safety"]) == {"laion_punsafe": 0.2, "nsfw_classes": [], "nsfw_score": 0.0}
    assert json.loads(rows["pii1"]["safety"])["pii"] == ["email", "phone"]
    assert rows["pii1"]["caption"].startswith("shop sign, call 13912345678 or mail shop@example.com")

    ledger, rows = run("strict", "[safety]\npii_action = 'scrub'\nwatermark_action = 'reject'\nmax_punsafe = 0.95\n")
    assert ledger["unsafe1"][:2] == ("kept", "ok")
    assert ledger["stock1"] == ("rejected", "image_watermark", "OCR text 'shutterstock' matches a stock-credit rule")
    assert rows["pii1"]["caption"].startswith("shop sign, call [PHONE] or mail [EMAIL]")
    assert "13912345678" not in json.dumps(rows["pii1"], default=str)

    ledger, _ = run("reject", "[safety]\npii_action = 'reject'\nmax_pwatermark = 0.99\n")
    assert ledger["pii1"] == ("rejected", "caption_pii", "PII in caption: email,phone")
    assert ledger["wmark1"][:2] == ("kept", "ok")
