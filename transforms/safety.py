"""Safety and privacy flags: NSFW score (NudeNet, ONNX model in its wheel), PII in captions, stock watermarks read by OCR, LAION punsafe/pwatermark."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from schemas import reasons
from schemas.records import KEPT, REASON_OK, REJECTED, Outcome, Pair
from transforms.caption_filters import WATERMARK
from transforms.model_dofn import ImageModel

NSFW_MODEL = "nudenet-3.4.2/320n"
# NudeNet classes that make an image NSFW; its score is the highest confidence among them (0 when none).
NSFW_CLASSES = frozenset({
    "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED", "BUTTOCKS_EXPOSED",
})
PII_ACTIONS = ("off", "flag", "scrub", "reject")
WATERMARK_ACTIONS = ("off", "flag", "reject")

# --- PII rules (order matters: an 18-digit resident ID is claimed before the card rule sees it) ---
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+?86[- ]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # mainland China mobile
    r"|0\d{2,3}-\d{3,4}-?\d{4}"  # mainland China landline with area code
    r"|\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}"  # international, with a + prefix
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}"  # North American
    r")(?!\w)"
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
SCRUB_TOKENS = {"email": "[EMAIL]", "cn_id": "[ID]", "card": "[CARD]", "phone": "[PHONE]"}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def cn_id_ok(s: str) -> bool:
    """GB 11643-1999 citizen ID: 17 digits, a birth date, and the ISO 7064 MOD 11-2 check character."""
    body, check = s[:17], s[17].upper()
    y, m, d = int(body[6:10]), int(body[10:12]), int(body[12:14])
    if not (1900 <= y <= 2099 and 1 <= m <= 12 and 1 <= d <= 31):
        return False
    return _ID_CHECK[sum(int(c) * w for c, w in zip(body, _ID_WEIGHTS)) % 11] == check


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping PII spans ``(start, end, rule)`` in ``text``, rules ``email``, ``cn_id``,
    ``card`` (Luhn-valid, 13-19 digits), ``phone``."""
    spans: list[tuple[int, int, str]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e, _ in spans)

    for m in _EMAIL.finditer(text):
        spans.append((m.start(), m.end(), "email"))
    for m in _CN_ID.finditer(text):
        if free(m.start(), m.end()) and cn_id_ok(m.group()):
            spans.append((m.start(), m.end(), "cn_id"))
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits) and free(m.start(), m.end()):
            spans.append((m.start(), m.end(), "card"))
    for m in _PHONE.finditer(text):
        if free(m.start(), m.end()) and sum(c.isdigit() for c in m.group()) >= 10:
            spans.append((m.start(), m.end(), "phone"))
    return sorted(spans)


def scrub_pii(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for s, e, rule in spans:
        out.append(text[last:s])
        out.append(SCRUB_TOKENS[rule])
        last = e
    out.append(text[last:])
    return "".join(out)


@dataclass(frozen=True)
class SafetyConfig:
    """Safety and privacy settings (TOML section ``[safety]``).

    Args:
        nsfw: run the NudeNet detector on every image.
        max_nsfw_score: reject (``nsfw``) when the NSFW score is above this (None: flag only).
        pii_action: ``off | flag | scrub | reject`` for PII in the caption and QA answers.
        watermark_action: ``off | flag | reject`` when OCR text matches a stock-credit rule.
        max_punsafe, max_pwatermark: reject when the source's LAION metadata is above this (None: off).
        threads: onnxruntime intra-op threads of the NSFW model.
    """

    nsfw: bool = True
    max_nsfw_score: float | None = 0.6
    pii_action: str = "flag"
    watermark_action: str = "flag"
    max_punsafe: float | None = 0.5
    max_pwatermark: float | None = 0.8
    threads: int = 1

    def __post_init__(self):
        if self.pii_action not in PII_ACTIONS:
            raise ValueError(f"pii_action must be one of {PII_ACTIONS}, got {self.pii_action!r}")
        if self.watermark_action not in WATERMARK_ACTIONS:
            raise ValueError(f"watermark_action must be one of {WATERMARK_ACTIONS}, got {self.watermark_action!r}")
        for name in ("max_nsfw_score", "max_punsafe", "max_pwatermark"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")


class NsfwModel(ImageModel):
    """NudeNet's 320n detector (ONNX, inside the nudenet wheel) with a bounded onnxruntime session."""

    name = "nsfw"

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._det = None

    @property
    def cache_id(self) -> list[Any]:
        return [NSFW_MODEL]

    def load(self) -> None:
        if self._det is not None:
            return
        import os

        import nudenet
        import onnxruntime as ort
        from nudenet import NudeDetector

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        det = NudeDetector.__new__(NudeDetector)  # its __init__ takes no session options
        det.onnx_session = ort.InferenceSession(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"), opts)
        det.input_width = det.input_height = 320
        det.input_name = det.onnx_session.get_inputs()[0].name
        self._det = det

    def run(self, image: Image.Image) -> dict[str, Any]:
        a = np.asarray(image.convert("RGB"))
        # NudeNet converts RGBA->BGR itself: hand it BGRA.
        bgra = np.ascontiguousarray(np.dstack([a[:, :, ::-1], np.full(a.shape[:2], 255, np.uint8)]))
        found = self._det.detect(bgra)
        hits = sorted({(d["class"], round(float(d["score"]), 4)) for d in found if d["class"] in NSFW_CLASSES})
        return {"model": NSFW_MODEL, "score": max((s for _, s in hits), default=0.0), "classes": [c for c, _ in hits]}


def _meta_float(meta: dict[str, Any], name: str) -> float | None:
    v = meta.get(name)
    try:
        return None if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


def apply_safety(pair: Pair, results: dict[str, dict[str, Any]], cfg: SafetyConfig) -> Outcome:
    """Flags into ``pair.safety``; one outcome: rejected with the first rule that rejects, or kept
    (the ledger detail then lists the flags raised)."""
    flags: dict[str, Any] = {}
    notes: list[str] = []
    reject: tuple[str, str] | None = None
    try:
        meta = pair.meta_dict()
    except ValueError:
        meta = {}
    for field, limit, reason in (("punsafe", cfg.max_punsafe, reasons.LAION_PUNSAFE),
                                 ("pwatermark", cfg.max_pwatermark, reasons.LAION_PWATERMARK)):
        v = _meta_float(meta, field)
        if v is not None:
            flags[f"laion_{field}"] = v
            if limit is not None and v > limit and reject is None:
                reject = (reason, f"{field} {v} > {limit}")
    if "nsfw" in results:
        n = results["nsfw"]
        flags["nsfw_score"] = n["score"]
        flags["nsfw_classes"] = n["classes"]
        if cfg.max_nsfw_score is not None and n["score"] > cfg.max_nsfw_score and reject is None:
            reject = (reasons.NSFW, f"nsfw score {n['score']} > {cfg.max_nsfw_score} ({','.join(n['classes'])})")
        elif n["score"] > 0:
            notes.append(f"nsfw {n['score']}")
    if cfg.watermark_action != "off" and "ocr" in results:
        texts = " ".join(results["ocr"].get("texts") or [])
        m = WATERMARK.search(texts)
        if m:
            flags["watermark_text"] = m.group(0)
            notes.append(f"watermark '{m.group(0)}'")
            if cfg.watermark_action == "reject" and reject is None:
                reject = (reasons.IMAGE_WATERMARK, f"OCR text '{m.group(0)}' matches a stock-credit rule")
    if cfg.pii_action != "off":
        rules: set[str] = set()
        caption = pair.caption or ""
        spans = find_pii(caption)
        rules.update(r for _, _, r in spans)
        qa = pair.qa
        qa_spans = [find_pii(x.get("answer") or "") for x in (qa or [])]
        for s in qa_spans:
            rules.update(r for _, _, r in s)
        if rules:
            flags["pii"] = sorted(rules)
            flags["pii_action"] = cfg.pii_action
            notes.append(f"pii {','.join(sorted(rules))} {cfg.pii_action}")
            if cfg.pii_action == "reject" and reject is None:
                reject = (reasons.CAPTION_PII, f"PII in caption: {','.join(sorted(rules))}")
            elif cfg.pii_action == "scrub":
                new_qa = None
                if qa is not None:
                    new_qa = [dict(x, answer=scrub_pii(x.get("answer") or "", s)) for x, s in zip(qa, qa_spans)]
                raw = pair.raw_caption
                pair = pair.replace(caption=scrub_pii(caption, spans) if pair.caption is not None else None, qa=new_qa,
                                    raw_caption=scrub_pii(raw, find_pii(raw)) if raw is not None else None)
    pair = pair.replace(safety=json.dumps(flags, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    if reject is not None:
        return Outcome.dropped(pair, REJECTED, reject[0], reject[1])
    return Outcome(key=pair.key, status=KEPT, reason=REASON_OK, pair=pair, detail="; ".join(notes), source=pair.source)
