"""Fixtures for the operations tests: an img2dataset-style parquet input built from the bundled
photos, and one real run of every stage on it (shared by the inspect/stats/verify tests)."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

# Two download failures, as img2dataset writes them: a status row without image bytes.
FAILED_ROWS = (
    ("failed0001", "a photo that never arrived", "http://127.0.0.1:9/404.jpg", "HTTP Error 404: Not Found"),
    ("failed0002", "another lost picture", "http://127.0.0.1:9/timeout.jpg", "The read operation timed out"),
)
# Captions that exercise dedup: the first photo's caption repeated on a second copy of the photo.
DUPLICATE_OF = "0006400c1c224e19"


def write_i2d_parquet(sample_dir: pathlib.Path, out_dir: pathlib.Path, limit: int | None = None) -> pathlib.Path:
    """img2dataset's ``parquet`` output format (key, caption, url, status, error_message, width,
    height, jpg) for the bundled cc_images photos, plus two failed downloads and one exact copy."""
    src = sample_dir / "cc_images"
    rows = []
    for line in (src / "pairs.jsonl").read_text().splitlines()[:limit]:
        rec = json.loads(line)
        data = (src / rec["image"]).read_bytes()
        with Image.open(src / rec["image"]) as im:
            w, h = im.size
        key = rec["image"].split(".")[0]
        rows.append({"key": key, "caption": rec["caption"], "url": rec["landing_url"], "status": "success",
                     "error_message": None, "width": w, "height": h, "jpg": data})
        if key == DUPLICATE_OF:
            rows.append(dict(rows[-1], key=key + "dup", url=rec["landing_url"] + "?copy"))
    for key, caption, url, err in FAILED_ROWS:
        rows.append({"key": key, "caption": caption, "url": url, "status": "failed_to_download",
                     "error_message": err, "width": None, "height": None, "jpg": None})
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("jpg", pa.binary())])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture(scope="session")
def i2d_input(sample_dir, tmp_path_factory) -> pathlib.Path:
    return write_i2d_parquet(sample_dir, tmp_path_factory.mktemp("i2d"))


@pytest.fixture(scope="session")
def demo_run(i2d_input, tmp_path_factory) -> dict[str, pathlib.Path]:
    """filter → dedup → rewrite (offline template backend) → pack, each through its real command."""
    from pipelines import dedup, pack, rewrite
    from pipelines import filter as filter_

    root = tmp_path_factory.mktemp("run")
    dirs = {"root": root, **{s: root / s for s in ("filter", "dedup", "rewrite", "pack")}}
    shards = ["--num-shards", "2"]
    assert filter_.main(["--input", str(i2d_input.parent), "--output", str(dirs["filter"]), *shards]) == 0
    assert dedup.main(["--input", str(dirs["filter"]), "--output", str(dirs["dedup"]), *shards]) == 0
    assert rewrite.main(["--input", str(dirs["dedup"]), "--output", str(dirs["rewrite"]),
                         "--backend", "offline-template", *shards]) == 0
    assert pack.main(["--input", str(dirs["rewrite"]), "--output", str(dirs["pack"]), "--stage", "2",
                      "--seq-len", "512", "--format", "parquet", *shards]) == 0
    return dirs
