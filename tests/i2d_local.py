"""Run the real img2dataset against a local http.server on 127.0.0.1 serving the bundled photos.

Used by the round-trip tests and to (re)build the demo's image shards:

    .venv/bin/python tests/i2d_local.py --output data/sample/i2d_webdataset --format webdataset

img2dataset starts workers with ``spawn``: everything that calls ``download`` sits under
``if __name__ == "__main__"`` or in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
# URLs that the local server answers with 404: img2dataset records them as failed downloads.
MISSING = ["missing/does_not_exist_1.jpg", "missing/does_not_exist_2.jpg"]


def sample_rows() -> list[dict]:
    """(path relative to data/sample, caption, author, license) for every bundled photo."""
    rows = []
    for line in (SAMPLE / "cc_images" / "pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"path": f"cc_images/{r['image']}", "caption": r["caption"], "author": r["author"], "license": r["license"]})
    for line in (SAMPLE / "skimage_pairs" / "captions.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"path": f"skimage_pairs/{r['image']}", "caption": r["caption"], "author": "scikit-image", "license": "CC0/public domain"})
    for m in MISSING:
        rows.append({"path": m, "caption": "a photo that is not on the server", "author": "", "license": ""})
    return rows


@contextlib.contextmanager
def serve(directory: pathlib.Path):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def write_url_list(path: pathlib.Path, base_url: str) -> None:
    rows = sample_rows()
    table = pa.table(
        {
            "url": [f"{base_url}/{r['path']}" for r in rows],
            "caption": [r["caption"] for r in rows],
            "author": [r["author"] for r in rows],
            "license": [r["license"] for r in rows],
        }
    )
    pq.write_table(table, path)


def run_img2dataset(url_list: pathlib.Path, output: pathlib.Path, output_format: str) -> None:
    """Run img2dataset in a fresh interpreter (its spawn-based workers re-import __main__)."""
    if output.exists():
        shutil.rmtree(output)  # its incremental "overwrite" mode loops on an existing folder
    code = (
        "import img2dataset\n"
        "if __name__ == '__main__':\n"
        f"    img2dataset.download(url_list={str(url_list)!r}, output_folder={str(output)!r},"
        f" output_format={output_format!r}, input_format='parquet', url_col='url', caption_col='caption',"
        " save_additional_columns=['author', 'license'], resize_mode='no', processes_count=1, thread_count=4,"
        " number_sample_per_shard=16, enable_wandb=False, distributor='multiprocessing', timeout=5, retries=0,"
        " disallowed_header_directives=[])\n"
    )
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", no_proxy="127.0.0.1,localhost")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(output.parent), timeout=600,
                   stdout=subprocess.DEVNULL)


def build(output: pathlib.Path, output_format: str) -> pathlib.Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    with serve(SAMPLE) as base:
        url_list = output.parent / f".{output.name}-urls.parquet"
        write_url_list(url_list, base)
        try:
            run_img2dataset(url_list, output, output_format)
        finally:
            url_list.unlink(missing_ok=True)
    return output


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--format", default="webdataset", choices=("webdataset", "parquet"))
    a = ap.parse_args()
    print(build(pathlib.Path(a.output).resolve(), a.format))
