"""Fixtures for the report tests: the bundled img2dataset webdataset photos plus one extra shard
(a hostile caption, duplicates for dedup to cluster), run through filter → dedup → rewrite
(offline template) → pack (Parquet and WebDataset), then reported."""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

HOSTILE_CAPTION = 'A red car <script>alert(1)</script> parked by the harbour <img src=x onerror="alert(2)"> at dusk'
HOSTILE_KEY = "9000001"
# Both hostile records are duplicates of bundled photos, so dedup puts them in clusters, and the
# report shows every cluster of this run (3 <= largest + samples): their text is on the page
# whatever the sample.
HOSTILE_CAPTION_2 = "<img src=x onerror=alert(3)>"
HOSTILE_KEY_2 = "9000005"
SAMPLES = 4


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_input(sample_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A copy of ``data/sample/i2d_webdataset`` plus ``00002.tar`` / ``00002.parquet``."""
    src = sample_dir / "i2d_webdataset"
    shutil.copytree(src, out)
    with tarfile.open(src / "00000.tar") as tar:
        img = {n: tar.extractfile(n).read() for n in ("0000000.jpg", "0000005.jpg", "0000007.jpg", "0000011.jpg")}
    with Image.open(io.BytesIO(img["0000007.jpg"])) as im:
        mirrored = _jpeg(im.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
        tiny = _jpeg(im.resize((240, 240)))
    records = [
        (HOSTILE_KEY, HOSTILE_CAPTION, img["0000011.jpg"]),  # exact image of 0000011 (and kept: more caption words)
        ("9000002", "Fireworks over Morey's Pier, North Wildwood, July 2007", img["0000000.jpg"]),  # exact image of 0000000
        # near caption of 0000010 ("Café le fil du Rasoir #1") on another image: kept by strict dedup
        ("9000004", "Café le fil du Rasoir #2", mirrored),
        (HOSTILE_KEY_2, HOSTILE_CAPTION_2, tiny),  # near image of 0000007
    ]
    rows = []
    with tarfile.open(out / "00002.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, caption, data in records:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            meta = {"caption": caption, "url": f"http://127.0.0.1:9/{key}.jpg", "key": key, "status": "success",
                    "error_message": None, "width": w, "height": h}
            _member(tar, f"{key}.jpg", data)
            _member(tar, f"{key}.json", json.dumps(meta).encode())
            _member(tar, f"{key}.txt", caption.encode())
            rows.append({"caption": caption, "url": meta["url"], "key": key, "status": "success",
                         "error_message": None, "width": w, "height": h})
    schema = pa.schema([("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "00002.parquet")
    return out


@pytest.fixture(scope="session")
def report_run(sample_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The run (filter, dedup, rewrite, pack, pack-wds) and its report at ``SAMPLES`` per group
    (built once per session; tests write other reports elsewhere and never change it)."""
    from pipelines import dedup, pack, report, rewrite
    from pipelines import filter as filter_

    base = tmp_path_factory.mktemp("report")
    inp = build_input(sample_dir, base / "input")
    run = base / "photos"
    d = {s: run / s for s in ("filter", "dedup", "rewrite", "pack", "pack-wds")}
    shards = ["--num-shards", "2"]
    assert filter_.main(["--input", str(inp), "--output", str(d["filter"]), *shards]) == 0
    assert dedup.main(["--input", str(d["filter"]), "--output", str(d["dedup"]), *shards]) == 0
    assert rewrite.main(["--input", str(d["dedup"]), "--output", str(d["rewrite"]), "--policy", "all",
                         "--backend", "offline-template", *shards]) == 0
    for name, fmt in (("pack", "parquet"), ("pack-wds", "webdataset")):
        assert pack.main(["--input", str(d["rewrite"]), "--output", str(d[name]), "--stage", "3", "--seq-len", "2048",
                          "--format", fmt, *shards]) == 0
    out = base / "report"
    assert report.main([str(run), "--output", str(out), "--samples", str(SAMPLES), "--raw-input", str(inp)]) == 0
    return {"input": inp, "run": run, "report": out, "base": base, **d}


@pytest.fixture(scope="module")
def browser():
    from .browser import Chromium

    b = Chromium()
    yield b
    b.close()
