"""OCR of every image with RapidOCR (PP-OCRv6 det + rec, ONNX models inside the wheel), and the stage-3 OCR samples it feeds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from PIL import Image, ImageDraw

from schemas.records import Outcome, Pair
from transforms.model_dofn import ImageModel, ImageModelFn

OCR_MODEL = "rapidocr-3.10.0/PP-OCRv6-small"
# Longest side the detector may see under the "min" size rule. That rule scales the SHORT side up to
# det_limit_side_len, so a 2000x8 banner would become 184,000x736 (minutes of CPU, gigabytes of RAM);
# such images are padded (white, bottom/right: boxes keep their coordinates) until the rule stays under this.
MAX_DET_LONG_SIDE = 4096
# Side of the mask the text-area ratio is measured on (boxes overlap; the union counts once).
_AREA_MASK_SIDE = 256

# Stage-3 prompts (transcription tasks), one per language; the prompt is picked by a hash of the key.
TRANSCRIBE_PROMPTS = {
    "en": ("What text is in the image?", "Read all the text in this image, in reading order."),
    "zh": ("图片中有哪些文字？", "请按阅读顺序写出图中的全部文字。"),
}
# The marker that separates a caption from the text read off the image (a reader can strip it).
ENRICH_MARKER = " [OCR text: {text}]"


@dataclass(frozen=True)
class OcrConfig:
    """Settings of the OCR stage (TOML section ``[ocr]``).

    Args:
        min_text_score: recognised lines below this confidence are dropped.
        box_thresh: detection box threshold (RapidOCR ``Det.box_thresh``).
        min_chars_text_rich: ``text_rich`` needs at least this many recognised characters (None: off).
        min_text_area_ratio: ``text_rich`` needs text boxes covering at least this share of the image (None: off).
        det_limit_side_len, det_limit_type: detector input size rule (RapidOCR ``Det.limit_side_len`` /
            ``limit_type``): ``min`` scales the short side up to at least this (small text reads
            better, photos cost more), ``max`` caps the long side.
        threads: onnxruntime intra-op threads per worker (bounded; inter-op is 1).
        make_samples: add stage-3 samples to text-rich records: a transcription QA pair and the caption
            enriched with the text read (marked with ``ENRICH_MARKER``).
        prompt_langs: transcription prompt languages (``en``, ``zh``); the prompt is in the language of the
            text read when that one is listed, else in any listed one.
        max_pixels: decode bound.
    """

    min_text_score: float = 0.5
    box_thresh: float = 0.5
    min_chars_text_rich: int | None = 10
    min_text_area_ratio: float | None = 0.01
    det_limit_side_len: int = 736
    det_limit_type: str = "min"
    threads: int = 1
    make_samples: bool = True
    prompt_langs: tuple[str, ...] = ("en", "zh")
    max_pixels: int = 89_478_485

    def __post_init__(self):
        if not 0.0 <= self.min_text_score <= 1.0 or not 0.0 <= self.box_thresh <= 1.0:
            raise ValueError("min_text_score and box_thresh must be in [0, 1]")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.det_limit_type not in ("min", "max") or self.det_limit_side_len < 32:
            raise ValueError("det_limit_type must be 'min' or 'max' and det_limit_side_len >= 32")
        bad = [x for x in self.prompt_langs if x not in TRANSCRIBE_PROMPTS]
        if bad or not self.prompt_langs:
            raise ValueError(f"prompt_langs must be a non-empty subset of {sorted(TRANSCRIBE_PROMPTS)}, got {list(self.prompt_langs)}")


def text_area_ratio(boxes: list[list[list[int]]], width: int, height: int) -> float:
    """Share of the image covered by the union of the text boxes (measured on a small mask)."""
    if not boxes or width <= 0 or height <= 0:
        return 0.0
    scale = _AREA_MASK_SIDE / max(width, height)
    mw, mh = max(1, round(width * scale)), max(1, round(height * scale))
    mask = Image.new("1", (mw, mh), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.polygon([(x * scale, y * scale) for x, y in box], fill=1)
    return round(float(np.asarray(mask).mean()), 4)


def pad_for_detection(image: Image.Image, cfg: OcrConfig) -> Image.Image:
    """Pad an extreme-aspect image so the detector's "min" rule keeps its long side <= MAX_DET_LONG_SIDE."""
    if cfg.det_limit_type != "min":
        return image
    w, h = image.size
    need = -(-max(w, h) * cfg.det_limit_side_len // MAX_DET_LONG_SIDE)  # smallest short side that keeps the bound
    if min(w, h) >= need:
        return image
    out = Image.new("RGB", (w, max(h, need)) if h < w else (max(w, need), h), (255, 255, 255))
    out.paste(image, (0, 0))
    return out


class RapidOcrModel(ImageModel):
    """RapidOCR: detection on every image, direction classification + recognition only on the crops
    detection found. Models come from the wheel (no download)."""

    name = "ocr"

    def __init__(self, cfg: OcrConfig):
        self.cfg = cfg
        self._engine = None

    @property
    def cache_id(self) -> list[Any]:
        return [OCR_MODEL, {"min_text_score": self.cfg.min_text_score, "box_thresh": self.cfg.box_thresh,
                            "det_limit": [self.cfg.det_limit_side_len, self.cfg.det_limit_type, MAX_DET_LONG_SIDE]}]

    def load(self) -> None:
        if self._engine is not None:
            return
        from rapidocr import RapidOCR

        self._engine = RapidOCR(params={
            "Global.log_level": "error",
            "Global.text_score": self.cfg.min_text_score,
            "Det.box_thresh": self.cfg.box_thresh,
            "Det.limit_side_len": self.cfg.det_limit_side_len,
            "Det.limit_type": self.cfg.det_limit_type,
            "EngineConfig.onnxruntime.intra_op_num_threads": self.cfg.threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })
        self._det_ms = Metrics.distribution("mmcorpus.ocr", "det_ms")
        self._rec_ms = Metrics.distribution("mmcorpus.ocr", "rec_ms")
        self._det_only = Metrics.counter("mmcorpus.ocr", "det_only")
        self._recognised = Metrics.counter("mmcorpus.ocr", "recognised")

    def detect(self, image: Image.Image):
        """Detection only: (preprocessed image, op record, crops, det result); crops empty when no text."""
        from rapidocr.main import RapidOCRError

        e = self._engine
        image = pad_for_detection(image.convert("RGB"), self.cfg)
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        img, op = e.preprocess_img(bgr)
        try:
            crops, det = e.detect_and_crop(img, op)
        except RapidOCRError:  # RapidOCR's way of saying "no text found"
            return bgr, op, [], None
        return bgr, op, crops, det

    def run(self, image: Image.Image) -> dict[str, Any]:
        w, h = image.size
        t0 = time.perf_counter()
        bgr, op, crops, det = self.detect(image)
        self._det_ms.update(int((time.perf_counter() - t0) * 1000))
        boxes: list[list[list[int]]] = []
        texts: list[str] = []
        scores: list[float] = []
        if crops:
            t1 = time.perf_counter()
            e = self._engine
            rotated, cls = e.cls_and_rotate(crops)
            rec = e.recognize_txt(rotated)
            out = e.build_final_output(bgr, det, cls, rec, crops, op)
            self._rec_ms.update(int((time.perf_counter() - t1) * 1000))
            self._recognised.inc()
            if getattr(out, "txts", None) is not None and out.boxes is not None:
                for box, text, score in zip(out.boxes, out.txts, out.scores):
                    if text.strip() and score >= self.cfg.min_text_score:
                        boxes.append([[int(round(float(x))), int(round(float(y)))] for x, y in box])
                        texts.append(text.strip())
                        scores.append(round(float(score), 4))
        else:
            self._det_only.inc()
        chars = sum(len(t.replace(" ", "")) for t in texts)
        ratio = text_area_ratio(boxes, w, h)
        return {
            "model": OCR_MODEL, "boxes": boxes, "texts": texts, "scores": scores,
            "text_area_ratio": ratio, "chars": chars, "detected": len(crops),
        }


def is_text_rich(result: dict[str, Any], cfg: OcrConfig) -> bool:
    if not result.get("chars"):
        return False
    if cfg.min_chars_text_rich is not None and result["chars"] < cfg.min_chars_text_rich:
        return False
    if cfg.min_text_area_ratio is not None and result["text_area_ratio"] < cfg.min_text_area_ratio:
        return False
    return True


def reading_order_text(result: dict[str, Any]) -> str:
    """The recognised lines joined in RapidOCR's reading order (top to bottom, left to right)."""
    return "\n".join(result.get("texts") or [])


def text_lang(text: str) -> str:
    """``zh`` when most non-space characters are CJK ideographs, else ``en``."""
    chars = [c for c in text if not c.isspace()]
    cjk = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in chars)
    return "zh" if chars and 2 * cjk > len(chars) else "en"


def pick_prompt(key: str, langs: tuple[str, ...], text: str = "") -> str:
    """A transcription prompt in the language of the text read (when configured; else any configured
    one), the variant chosen from a hash of the key (stable across runs and runners)."""
    import hashlib

    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big")
    lang = text_lang(text)
    options = [p for lg in ((lang,) if lang in langs else langs) for p in TRANSCRIBE_PROMPTS[lg]]
    return options[h % len(options)]


def has_ground_truth(pair: Pair) -> bool:
    """A rendered page (synthdoc) already carries its exact transcription: OCR must not add its own
    reading (with its errors) to it."""
    try:
        return pair.meta_dict().get("generator") == "synthdoc"
    except ValueError:
        return False


def ocr_samples(pair: Pair, result: dict[str, Any], cfg: OcrConfig) -> Pair:
    """Stage-3 samples for a text-rich record: a transcription QA pair appended to ``qa`` and the
    caption enriched with the text read (``raw_caption`` keeps the caption before, when unset)."""
    text = reading_order_text(result)
    qa = list(pair.qa or []) + [{"question": pick_prompt(pair.key, cfg.prompt_langs, text), "answer": text}]
    caption = (pair.caption or "").rstrip() + ENRICH_MARKER.format(text=text.replace("\n", " / "))
    return pair.replace(qa=qa, caption=caption.strip(),
                        raw_caption=pair.raw_caption if pair.raw_caption is not None else pair.caption)


class OcrAnnotateFn(ImageModelFn):
    """OCR every image (cached by sha256) and store the result in ``Pair.ocr``; text-rich records
    also get the stage-3 samples. With ``safety``, the NSFW model runs on the same decoded image and
    ``transforms.safety.apply_safety`` decides (flags in ``Pair.safety``). Every record is kept
    unless its image is missing or undecodable, a model fails on it, or a safety rule rejects it.

    Args:
        cfg: OCR settings.
        cache_dir: result cache root (None: no cache).
        safety: safety settings (None: no safety flags).
    """

    def __init__(self, cfg: OcrConfig, cache_dir: str | None = None, safety=None):
        models: list[ImageModel] = [RapidOcrModel(cfg)]
        if safety is not None and safety.nsfw:
            from transforms.safety import NsfwModel

            models.append(NsfwModel(safety.threads))
        super().__init__(models, "ocr", cache_dir, cfg.max_pixels)
        self.cfg = cfg
        self.safety = safety

    def setup(self):
        super().setup()
        self._text_rich = Metrics.counter("mmcorpus.ocr", "text_rich")

    def annotate(self, pair: Pair, results: dict[str, dict[str, Any]]) -> Iterable[Outcome]:
        result = dict(results["ocr"])
        result["text_rich"] = is_text_rich(result, self.cfg)
        pair = pair.replace(ocr=json.dumps(result, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
        if result["text_rich"]:
            self._text_rich.inc()
            if self.cfg.make_samples and not has_ground_truth(pair):
                pair = ocr_samples(pair, result, self.cfg)
        if self.safety is not None:
            from transforms.safety import apply_safety

            yield apply_safety(pair, results, self.safety)
            return
        yield Outcome.kept(pair)


# Names of the per-record signals counted into the OCR stage's manifest (``extra.image_signals``),
# shown by ``mmcorpus inspect`` and drawn by ``mmcorpus stats --plot``.
SIGNALS = ("ocr_text_found", "ocr_text_rich", "ocr_no_text", "nsfw_score_gt_0", "pii_flagged", "watermark_text",
           "laion_punsafe_present", "laion_pwatermark_present")


def record_signals(pair: Pair) -> dict[str, int]:
    """0/1 per signal name for one kept record (from its ``ocr`` and ``safety`` JSON)."""
    o = json.loads(pair.ocr) if pair.ocr else {}
    s = json.loads(pair.safety) if pair.safety else {}
    return {
        "ocr_text_found": int(bool(o.get("chars"))),
        "ocr_text_rich": int(bool(o.get("text_rich"))),
        "ocr_no_text": int(bool(o) and not o.get("chars")),
        "nsfw_score_gt_0": int(s.get("nsfw_score", 0) > 0),
        "pii_flagged": int(bool(s.get("pii"))),
        "watermark_text": int("watermark_text" in s),
        "laion_punsafe_present": int("laion_punsafe" in s),
        "laion_pwatermark_present": int("laion_pwatermark" in s),
    }


class SignalCountsFn(beam.CombineFn):
    """Sum of ``record_signals`` over the kept records (a fixed-size accumulator)."""

    def create_accumulator(self):
        return {k: 0 for k in SIGNALS}

    def add_input(self, acc, outcome: Outcome):
        if outcome.status == "kept" and outcome.pair is not None:
            for k, v in record_signals(outcome.pair).items():
                acc[k] += v
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            for k in SIGNALS:
                out[k] += a[k]
        return out

    def extract_output(self, acc):
        return dict(acc)
