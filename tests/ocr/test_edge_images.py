"""Tiny and extreme-aspect images are 'no text' / 'not NSFW' for the real models, never a model error."""

from __future__ import annotations

from PIL import Image

from transforms.ocr import OcrConfig, RapidOcrModel
from transforms.safety import NsfwModel


def test_tiny_and_thin_images():
    ocr, nsfw = RapidOcrModel(OcrConfig()), NsfwModel()
    ocr.load()
    nsfw.load()
    for size in [(1, 1), (5, 3), (2000, 8), (8, 2000)]:
        im = Image.new("RGB", size, "white")
        r = ocr.run(im)
        assert (r["texts"], r["chars"], r["text_area_ratio"]) == ([], 0, 0.0), size
        assert nsfw.run(im) == {"model": "nudenet-3.4.2/320n", "score": 0.0, "classes": []}, size
