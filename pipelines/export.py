"""`mmcorpus export minicpmv`: a finished stage output (normally the rewrite's) as MiniCPM-V fine-tuning data.

Example:
    mmcorpus export minicpmv --input out/rewrite --output out/minicpmv

Writes ``OUTPUT/minicpmv.json``: a list of ``{"id", "image", "conversations": [{"role", "content"}]}``
(MiniCPM-V's ``finetune/dataset.py`` format) with ``<image>`` opening the first user turn, and the
image files under ``OUTPUT/images/<key>.<ext>``. An image is copied byte for byte when a plain
``Image.open(..).convert("RGB")`` (what MiniCPM-V's loader does) already shows the right picture;
one with an EXIF rotation, alpha, CMYK or 16-bit pixels is re-encoded upright as 8-bit RGB through
``transforms.images`` (JPEG quality 95 for JPEG sources, PNG otherwise) and listed under
``normalised`` in ``export.json``. The rewriter's QA pairs
(``Pair.qa``) become the turns; a sample without QA gets one turn: a fixed prompt answered by its
caption. Samples without an image are skipped and counted in ``OUTPUT/export.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA
from schemas.records import Pair
from transforms.stage_io import join, read_manifest, write_bytes_atomic

IMAGE_TOKEN = "<image>"
DEFAULT_CAPTION_PROMPT = "Describe this image briefly."
JSON_NAME = "minicpmv.json"
SUMMARY_NAME = "export.json"
IMAGE_DIR = "images"
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


NORMALISED_JPEG_QUALITY = 95


def _export_image(pair: Pair) -> tuple[bytes, str, bool]:
    """(bytes, extension, normalised?) of one sample's image for the trainer."""
    from transforms import images

    try:
        with images.open_image(pair.image) as im:
            head = images.read_header(im)
            plain = im.mode in ("RGB", "L") and "transparency" not in im.info
    except Exception:  # undecodable bytes are still exported as they are; the trainer will say so
        return pair.image, _EXT.get((pair.image_format or "").upper(), "bin"), False
    ext = _EXT.get((head.format or "").upper(), "bin")
    if plain and head.orientation == 1:
        return pair.image, ext, False
    # The trainer neither rotates by EXIF nor composites alpha: hand it the picture the filter saw.
    rgb = images.decode(pair.image)
    buf = io.BytesIO()
    if head.format == "JPEG":
        rgb.save(buf, "JPEG", quality=NORMALISED_JPEG_QUALITY)
        return buf.getvalue(), "jpg", True
    rgb.save(buf, "PNG")
    return buf.getvalue(), "png", True


def conversations(pair: Pair, caption_prompt: str = DEFAULT_CAPTION_PROMPT) -> list[dict[str, str]]:
    """MiniCPM-V turns of one sample; ``<image>`` opens the first user turn."""
    qa = [x for x in (pair.qa or []) if (x.get("question") or "").strip() and (x.get("answer") or "").strip()]
    turns = qa or [{"question": caption_prompt, "answer": pair.caption or ""}]
    out = []
    for i, t in enumerate(turns):
        q = t["question"].strip()
        out.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        out.append({"role": "assistant", "content": t["answer"].strip()})
    return out


def export_minicpmv(input_dir: str, output_dir: str, caption_prompt: str = DEFAULT_CAPTION_PROMPT) -> dict[str, Any]:
    """Write the export; returns the summary also written to ``export.json``."""
    try:
        manifest = read_manifest(input_dir)
    except FileNotFoundError as e:
        raise UserError(f"--input {input_dir}: {e}") from None
    records, skipped, normalised, with_qa = [], [], [], 0
    for entry in manifest.files_of(FILE_KIND_DATA):
        with FileSystems.open(join(input_dir, entry.path), compression_type="uncompressed") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                for row in pf.read_row_group(rg).to_pylist():
                    pair = Pair.from_row(row)
                    if not pair.image:
                        skipped.append(pair.key)
                        continue
                    data, ext, changed = _export_image(pair)
                    rel = f"{IMAGE_DIR}/{pair.key}.{ext}"
                    write_bytes_atomic(join(output_dir, rel), data)
                    if changed:
                        normalised.append(pair.key)
                    with_qa += bool(pair.qa)
                    records.append({"id": pair.key, "image": rel, "conversations": conversations(pair, caption_prompt)})
    records.sort(key=lambda r: r["id"])
    data = json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
    write_bytes_atomic(join(output_dir, JSON_NAME), data)
    summary = {
        "input_stage": manifest.stage,
        "exported": len(records),
        "with_qa": with_qa,
        "caption_only": len(records) - with_qa,
        "skipped_no_image": sorted(skipped),
        "normalised": sorted(normalised),
        "json_sha256": hashlib.sha256(data).hexdigest(),
    }
    write_bytes_atomic(join(output_dir, SUMMARY_NAME), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcorpus export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="target", required=True)
    m = sub.add_parser("minicpmv", help="MiniCPM-V fine-tuning JSON + image files")
    m.add_argument("--input", required=True, help="a finished stage output directory (normally the rewrite's)")
    m.add_argument("--output", required=True, help="directory for minicpmv.json and images/")
    m.add_argument("--caption-prompt", "--caption_prompt", default=DEFAULT_CAPTION_PROMPT, help="user turn for samples without QA")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    s = export_minicpmv(args.input, args.output, args.caption_prompt)
    print(
        f"export minicpmv: {s['exported']} samples ({s['with_qa']} with QA, {s['caption_only']} caption only) "
        f"-> {join(args.output, JSON_NAME)}; {len(s['skipped_no_image'])} without image skipped"
    )
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "export")
