"""Tiny and extreme-aspect images are 'no text' / 'not NSFW' for the real models, never a model error,
and a 2000x8 banner is not blown up to 184,000x736 pixels by the detector's size rule (it took 4 minutes
of CPU before the padding in ``transforms.ocr.pad_for_detection``)."""

from __future__ import annotations

import time

from PIL import Image

from transforms.ocr import OcrConfig, RapidOcrModel
from transforms.safety import NsfwModel


def test_tiny_and_thin_images():
    ocr, nsfw = RapidOcrModel(OcrConfig()), NsfwModel()
    ocr.load()
    nsfw.load()
    for size in [(1, 1), (5, 3), (2000, 8), (8, 2000)]:
        im = Image.new("RGB", size, "white")
        t0 = time.monotonic()
        r = ocr.run(im)
        assert time.monotonic() - t0 < 60, size  # generous: ~1 s on a loaded core; minutes without the padding
        assert (r["texts"], r["chars"], r["text_area_ratio"]) == ([], 0, 0.0), size
        assert nsfw.run(im) == {"model": "nudenet-3.4.2/320n", "score": 0.0, "classes": []}, size


def test_padding_bounds_the_detector_input():
    from transforms.ocr import pad_for_detection

    cfg = OcrConfig()  # det rule "min", 736
    banner = pad_for_detection(Image.new("RGB", (2000, 8), "black"), cfg)
    assert banner.size == (2000, 360)  # 2000 * 736 / 4096 = 359.4 -> 360: the long side becomes 4088.9 <= 4096
    assert banner.getpixel((1999, 7)) == (0, 0, 0) and banner.getpixel((0, 8)) == (255, 255, 255)
    assert pad_for_detection(Image.new("RGB", (8, 2000)), cfg).size == (360, 2000)
    photo = Image.new("RGB", (640, 480))
    assert pad_for_detection(photo, cfg) is photo
    assert pad_for_detection(Image.new("RGB", (2000, 8)), OcrConfig(det_limit_type="max")).size == (2000, 8)
