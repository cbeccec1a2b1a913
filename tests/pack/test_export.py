"""`mmcorpus export minicpmv`: MiniCPM-V finetune JSON with <image> in the first user turn, plus images."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from pack.fixtures import make_input_dir, sample_pairs
from pipelines import export
from schemas.errors import UserError


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    pairs = [p for p in sample_pairs(captions_only=2) if p.key not in ("badimage0001", "toolong00001")]
    with_image = [p for p in pairs if p.image]
    qa = [{"question": "What is in the picture?", "answer": "A rocket on a launch pad."},
          {"question": "Is it day or night?", "answer": "Day."}]
    pairs[pairs.index(with_image[0])] = with_image[0].replace(qa=qa, raw_caption=with_image[0].caption, caption=qa[0]["answer"])
    return make_input_dir(str(tmp_path_factory.mktemp("exp") / "rewrite"), pairs), pairs


def test_export_minicpmv(rewritten, tmp_path):
    src, pairs = rewritten
    out = tmp_path / "mv"
    assert export.main(["minicpmv", "--input", src, "--output", str(out)]) == 0
    data = json.loads((out / "minicpmv.json").read_text())
    with_image = {p.key: p for p in pairs if p.image}
    assert [d["id"] for d in data] == sorted(with_image)
    for d in data:
        conv = d["conversations"]
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert conv[0]["content"].startswith("<image>\n")
        assert sum("<image>" in t["content"] for t in conv) == 1
        p = with_image[d["id"]]
        if p.source == "skimage_pairs/horse.png":
            # RGBA: MiniCPM-V's loader would .convert("RGB") the transparent background to black;
            # the export composites it on white (transforms.images), as the filter and pack saw it.
            with Image.open(io.BytesIO(p.image)) as orig, Image.open(out / d["image"]) as got:
                assert orig.mode == "RGBA" and got.mode == "RGB" and got.size == orig.size
                rgba = np.asarray(orig).astype(float)
                alpha = rgba[..., 3:] / 255
                want = rgba[..., :3] * alpha + 255 * (1 - alpha)
                assert np.abs(np.asarray(got).astype(float) - want).max() <= 1
        else:
            assert (out / d["image"]).read_bytes() == p.image
        if p.qa:
            assert conv == [
                {"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": "A rocket on a launch pad."},
                {"role": "user", "content": "Is it day or night?"},
                {"role": "assistant", "content": "Day."},
            ]
        else:
            assert conv == [{"role": "user", "content": "<image>\n" + export.DEFAULT_CAPTION_PROMPT},
                            {"role": "assistant", "content": p.caption}]
    summary = json.loads((out / "export.json").read_text())
    assert summary["with_qa"] == 1 and summary["exported"] == len(with_image)
    assert summary["skipped_no_image"] == sorted(p.key for p in pairs if not p.image)
    assert summary["normalised"] == [p.key for p in pairs if p.source == "skimage_pairs/horse.png"]
    assert {pathlib.Path(d["image"]).suffix for d in data} == {".jpg", ".png"}
    again = tmp_path / "mv2"
    export.main(["minicpmv", "--input", src, "--output", str(again)])
    assert (again / "minicpmv.json").read_bytes() == (out / "minicpmv.json").read_bytes()


def test_export_names_a_bad_input(tmp_path):
    with pytest.raises(UserError, match="--input"):
        export.main(["minicpmv", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
