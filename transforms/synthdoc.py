"""SynthDoG-style synthetic document pages: real caption text rendered with varied fonts, sizes, layouts, paper and light distortion."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from schemas.errors import UserError
from schemas.records import Pair

REPO_DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
# Bundled real text per language: (path under data/, column of the text in the TSV).
TEXT_SOURCES = {
    "en": ("sample/cc3m_val_captions_8k.tsv", 0),
    "zh": ("synthdoc/coco_cn_captions_300.tsv", 1),
}
# Fonts from Debian fonts-dejavu-core / fonts-noto-cjk (installed by `make system-deps`): (file, ttc index).
_DEJAVU = "/usr/share/fonts/truetype/dejavu"
_NOTO = "/usr/share/fonts/opentype/noto"
FONTS = {
    "en": [
        (f"{_DEJAVU}/DejaVuSans.ttf", 0), (f"{_DEJAVU}/DejaVuSerif.ttf", 0), (f"{_DEJAVU}/DejaVuSansMono.ttf", 0),
        (f"{_DEJAVU}/DejaVuSans-Bold.ttf", 0), (f"{_DEJAVU}/DejaVuSerifCondensed.ttf", 0),
        (f"{_NOTO}/NotoSansCJK-Regular.ttc", 2),
    ],
    "zh": [  # index 2 = the Simplified Chinese face of the collection
        (f"{_NOTO}/NotoSansCJK-Regular.ttc", 2), (f"{_NOTO}/NotoSansCJK-Bold.ttc", 2),
        (f"{_NOTO}/NotoSerifCJK-Regular.ttc", 2), (f"{_NOTO}/NotoSerifCJK-Bold.ttc", 2),
    ],
}
LAYOUTS = ("single", "two_column")
TRANSCRIBE_QUESTION = {"en": "What text is in the image?", "zh": "图片中有哪些文字？"}


@dataclass(frozen=True)
class SynthDocConfig:
    """Settings of ``mmcorpus synthdoc`` (TOML section ``[synthdoc]``).

    Args:
        n: pages to render.
        langs: languages, pages alternate between them (``en``, ``zh``).
        seed: every page is a pure function of (seed, page index).
        min_font_px, max_font_px: font size range in pixels.
        width, height: page size range (min, max) in pixels.
        layouts: layouts to draw from (``single``, ``two_column``).
        max_rotation_deg: page rotation is uniform in ±this.
        max_blur: Gaussian blur radius is uniform in [0, this].
        jpeg_quality: (min, max) JPEG quality.
    """

    n: int = 10
    langs: tuple[str, ...] = ("en", "zh")
    seed: int = 0
    min_font_px: int = 18
    max_font_px: int = 32
    width: tuple[int, int] = (480, 720)
    height: tuple[int, int] = (360, 640)
    layouts: tuple[str, ...] = LAYOUTS
    max_rotation_deg: float = 1.5
    max_blur: float = 0.6
    jpeg_quality: tuple[int, int] = (80, 95)

    def __post_init__(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")
        bad = [x for x in self.langs if x not in TEXT_SOURCES]
        if bad or not self.langs:
            raise ValueError(f"langs must be a non-empty subset of {sorted(TEXT_SOURCES)}, got {list(self.langs)}")
        if not 8 <= self.min_font_px <= self.max_font_px:
            raise ValueError("need 8 <= min_font_px <= max_font_px")
        if [x for x in self.layouts if x not in LAYOUTS] or not self.layouts:
            raise ValueError(f"layouts must be a non-empty subset of {list(LAYOUTS)}")
        if self.width[0] > self.width[1] or self.height[0] > self.height[1] or self.width[0] < 128 or self.height[0] < 128:
            raise ValueError("width/height are (min, max) ranges of at least 128 px")


def load_texts(lang: str, data_dir: pathlib.Path = REPO_DATA) -> list[str]:
    """The bundled real sentences of one language (stripped, non-empty, in file order)."""
    rel, col = TEXT_SOURCES[lang]
    path = data_dir / rel
    if not path.exists():
        raise UserError(f"synthdoc text for {lang!r} not found at {path}: run from a full checkout (data/ is not in the wheel)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = line.split("\t")
        if len(cells) > col and cells[col].strip():
            out.append(" ".join(cells[col].split()))
    return out


def check_fonts(langs: tuple[str, ...]) -> None:
    """Stop before work when a font package is missing, naming the package to install."""
    for lang in langs:
        missing = [f for f, _ in FONTS[lang] if not os.path.exists(f)]
        if missing:
            pkg = "fonts-noto-cjk" if "noto" in missing[0] else "fonts-dejavu-core"
            raise UserError(f"font {missing[0]} not found: install Debian {pkg} (make system-deps)")


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_w: float, lang: str) -> list[str]:
    """Greedy line breaking: by words for English, by characters for Chinese."""
    units = text.split(" ") if lang == "en" else list(text)
    sep = " " if lang == "en" else ""
    lines, cur = [], ""
    for u in units:
        cand = u if not cur else cur + sep + u
        if font.getlength(cand) <= max_w or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = u
    if cur:
        lines.append(cur)
    return lines


def _paper(rng: random.Random, nrng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Off-white paper: a tint, a soft vertical gradient and fine grain noise."""
    base = np.array([rng.randint(225, 252), rng.randint(220, 250), rng.randint(205, 245)], dtype=np.float32)
    grad = np.linspace(0, rng.uniform(-12, 12), h, dtype=np.float32)[:, None, None]
    noise = nrng.normal(0, rng.uniform(1.0, 5.0), (h, w, 1)).astype(np.float32)
    arr = np.clip(base[None, None, :] + grad + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def render_page(index: int, cfg: SynthDocConfig, texts: dict[str, list[str]]) -> tuple[Pair, dict[str, Any]]:
    """Render page ``index``: returns the record (JPEG image, caption = the full transcription, a
    transcription QA pair) and its render parameters. A pure function of (cfg.seed, index)."""
    seed = int.from_bytes(hashlib.sha256(f"synthdoc:{cfg.seed}:{index}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    lang = cfg.langs[index % len(cfg.langs)]
    w, h = rng.randint(*cfg.width), rng.randint(*cfg.height)
    size = rng.randint(cfg.min_font_px, cfg.max_font_px)
    font_path, font_index = rng.choice(FONTS[lang])
    font = ImageFont.truetype(font_path, size, index=font_index)
    layout = rng.choice(cfg.layouts)
    margin = rng.randint(16, 40)
    gap = rng.randint(20, 40)
    cols = 2 if layout == "two_column" and w >= 400 + gap else 1
    col_w = (w - 2 * margin - (cols - 1) * gap) / cols
    line_h = int(size * rng.uniform(1.35, 1.7))
    para_gap = int(size * rng.uniform(0.3, 1.0))
    ink = tuple(rng.randint(0, 60) for _ in range(3))

    pool = texts[lang]
    start = rng.randrange(len(pool))
    page = _paper(rng, nrng, w, h)
    draw = ImageDraw.Draw(page)
    written: list[str] = []
    k = 0
    for c in range(cols):
        x = margin + c * (col_w + gap)
        y = margin
        while True:
            para = pool[(start + k) % len(pool)]
            lines = _wrap(para, font, col_w, lang)
            need = len(lines) * line_h
            if y + need > h - margin:
                break
            for line in lines:
                draw.text((x, y), line, font=font, fill=ink)
                written.append(line)
                y += line_h
            y += para_gap
            k += 1
            if k > 200:
                break
    angle = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
    page = page.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=page.getpixel((0, 0)))
    blur = rng.uniform(0, cfg.max_blur)
    if blur > 0.05:
        page = page.filter(ImageFilter.GaussianBlur(blur))
    quality = rng.randint(*cfg.jpeg_quality)
    buf = io.BytesIO()
    page.save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    text = "\n".join(written)
    params = {
        "generator": "synthdoc", "lang": lang, "font": os.path.basename(font_path), "font_px": size,
        "layout": layout if cols == 2 else "single", "rotation_deg": round(angle, 3), "blur": round(blur, 3),
        "jpeg_quality": quality, "seed": cfg.seed, "index": index,
    }
    key = f"synthdoc{cfg.seed:x}{lang}{index:08d}"
    pair = Pair(
        key=key, url=None, caption=text, image=data, image_format="JPEG", width=w, height=h,
        image_sha256=hashlib.sha256(data).hexdigest(), source=f"synthdoc#{index}",
        meta=json.dumps(params, sort_keys=True, ensure_ascii=False),
        qa=[{"question": TRANSCRIBE_QUESTION[lang], "answer": text}],
    )
    return pair, params
