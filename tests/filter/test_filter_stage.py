"""The filter stage end to end on the bad-input corpus and on real img2dataset output."""

from __future__ import annotations

import collections
import filecmp
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pipelines import filter as filter_stage
from pipelines.verify import verify
from schemas.errors import InputSchemaError
from transforms.stage_io import read_table

HERE = pathlib.Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(HERE.parent))
from make_bad_inputs import EXPECTED, EXPECTED_EXTRA  # noqa: E402

MMCORPUS = [sys.executable, "-m", "pipelines.cli"]


def run_filter(out, *args):
    assert filter_stage.main(["--output", str(out), *args]) == 0
    return read_table(str(out), "ledger").to_pylist(), read_table(str(out)).to_pylist()


def all_files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_bad_webdataset_every_record_has_exactly_one_reason(tmp_path):
    out = tmp_path / "out"
    ledger, data = run_filter(out, "--input", str(FIXTURES / "bad_inputs" / "webdataset"))
    by_key = collections.defaultdict(list)
    for r in ledger:
        by_key[r["key"]].append((r["status"], r["reason"]))
    for key, expected in EXPECTED.items():
        assert expected in by_key[key], (key, by_key[key])
    extra = collections.Counter((r["status"], r["reason"]) for r in ledger if r["key"] not in EXPECTED)
    extra[("rejected", "duplicate_key")] = sum(1 for r in ledger if r["reason"] == "duplicate_key")
    assert dict(extra) == EXPECTED_EXTRA
    assert len(ledger) == len(EXPECTED) + sum(EXPECTED_EXTRA.values())
    # kept = outputs, and the kept duplicate key is the first occurrence (the real photo)
    assert sorted(p["key"] for p in data) == sorted(k for k, v in EXPECTED.items() if v[0] == "kept")
    first = next(p for p in data if p["key"] == "000000000")
    assert first["source"] == "00000.tar#000000:000000000.jpg" and first["image_format"] == "JPEG"
    # nothing escaped: the output holds only our layout, and no member was ever written to disk
    assert all(f == "manifest.json" or f.startswith(("data/", "ledger/")) for f in all_files(out))
    assert not list(tmp_path.rglob("evil*")) and not pathlib.Path("/etc/evil.txt").exists()
    assert all(ch.ok for ch in verify(str(out)))
    # the megabyte caption never reaches the ledger
    assert max(len(r["detail"]) for r in ledger) <= 300


def test_bad_jsonl_rows(tmp_path):
    ledger, data = run_filter(tmp_path / "out", "--input", str(FIXTURES / "bad_inputs" / "tables" / "rows.jsonl"))
    got = [(r["source"].split("#")[1], r["status"], r["reason"]) for r in sorted(ledger, key=lambda r: r["source"])]
    assert got == [
        ("00000000", "kept", "ok"),
        ("00000001", "rejected", "caption_invalid_utf8"),
        ("00000002", "error", "row_unreadable"),
        ("00000003", "rejected", "caption_missing"),
        ("00000004", "rejected", "caption_empty"),
        ("00000005", "rejected", "caption_too_long_chars"),
        ("00000006", "error", "row_unreadable"),
        ("00000007", "rejected", "duplicate_key"),
        ("00000008", "rejected", "caption_control_chars"),
        ("00000009", "rejected", "url_missing"),
    ]
    assert [p["caption"] for p in data] == ["a brown dog running on a sandy beach"]


def test_missing_caption_column_stops_with_a_clear_message(tmp_path):
    bad = FIXTURES / "bad_inputs" / "tables" / "missing_caption.csv"
    with pytest.raises(InputSchemaError, match=r"missing_caption\.csv: column\(s\) \['caption'\] not found"):
        filter_stage.main(["--input", str(bad), "--output", str(tmp_path / "out")])
    proc = subprocess.run([*MMCORPUS, "filter", "--input", str(bad), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing_caption.csv" in proc.stderr and "--caption-col" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rerun_is_byte_identical_and_resumable(tmp_path, sample_dir):
    """Same input + config ⇒ the same bytes, also when the second run uses two worker processes."""
    args = ["--input", str(sample_dir / "img2dataset_sample_1000.parquet"), "--caption-col", "TEXT", "--url-col", "URL"]
    run_filter(tmp_path / "a", *args, "--num-shards", "8")
    run_filter(tmp_path / "b", *args, "--num-shards", "8", "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    files = all_files(tmp_path / "a")
    assert files == all_files(tmp_path / "b") and len(files) == 17
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    # a second run on the same output is skipped: files untouched
    before = {f: os.stat(tmp_path / "a" / f).st_mtime_ns for f in files}
    result = filter_stage.run(filter_stage.parser().parse_known_args(["--output", str(tmp_path / "a"), *args, "--num-shards", "8"])[0], [])
    assert result.skipped
    assert before == {f: os.stat(tmp_path / "a" / f).st_mtime_ns for f in files}


def test_verify_catches_tampering(tmp_path, sample_dir):
    out = tmp_path / "out"
    run_filter(out, "--input", str(sample_dir / "cc3m_val_captions_8k.tsv"), "--caption-col", "0", "--url-col", "1")
    ok = subprocess.run([*MMCORPUS, "verify", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    data_file = sorted((out / "data").iterdir())[0]
    raw = bytearray(data_file.read_bytes())
    raw[100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    bad = subprocess.run([*MMCORPUS, "verify", "--json", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1
    checks = {c["name"]: c["ok"] for c in json.loads(bad.stdout)[str(out)]["checks"]}
    assert checks["files match checksums"] is False
    (out / "ledger" / "part-99999-of-99999.parquet").write_bytes(b"stray")
    checks = {c.name: c.ok for c in verify(str(out))}
    assert checks["no unlisted files"] is False


def test_noisy_alt_text_loses_more_than_curated_captions(tmp_path, sample_dir):
    cc3m, _ = run_filter(tmp_path / "cc3m", "--input", str(sample_dir / "cc3m_val_captions_8k.tsv"),
                         "--caption-col", "0", "--url-col", "1")
    laion, laion_data = run_filter(tmp_path / "laion", "--input", str(sample_dir / "img2dataset_sample_1000.parquet"),
                                   "--caption-col", "TEXT", "--url-col", "URL")
    cc3m_loss = sum(r["status"] != "kept" for r in cc3m) / len(cc3m)
    laion_loss = sum(r["status"] != "kept" for r in laion) / len(laion)
    assert len(cc3m) == 8000 and len(laion) == 1000
    assert cc3m_loss < 0.02 and laion_loss > 3 * cc3m_loss
    # most kept LAION alt-text is marked for rewriting; curated CC3M text mostly is not
    assert sum(p["needs_rewrite"] for p in laion_data) / len(laion_data) > 0.5
    reasons_by_caption = {}
    import pyarrow.parquet as pq

    texts = pq.read_table(sample_dir / "img2dataset_sample_1000.parquet").column("TEXT").to_pylist()
    for r in laion:
        reasons_by_caption[texts[int(r["source"].split("#")[1])]] = r["reason"]
    assert reasons_by_caption["MV046-CuteSpiderman-BW-Shirt.jpg"] == "caption_boilerplate"
    assert reasons_by_caption["Rooster Royalty Free Stock Photos"] == "caption_boilerplate"
    assert reasons_by_caption["Matt Damon"] == "caption_too_short_words"
    assert reasons_by_caption["Dark granite or marble texture abstract background."] == "ok"


@pytest.fixture(scope="module")
def img2dataset_outputs(tmp_path_factory):
    """Real img2dataset runs (both output formats) against a local http.server on 127.0.0.1."""
    from i2d_local import build

    root = tmp_path_factory.mktemp("i2d")
    return {fmt: build(root / fmt, fmt) for fmt in ("webdataset", "parquet")}


# The bundled photos' fates: camera file names and 2-word titles are rejected, the 384x191 scan is too small.
I2D_EXPECTED = {
    ("kept", "ok"): 16,
    ("rejected", "caption_boilerplate"): 5,
    ("rejected", "caption_too_short_words"): 4,
    ("rejected", "image_too_small"): 1,
    ("error", "download_failed"): 2,
}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_img2dataset_round_trip(tmp_path, img2dataset_outputs, fmt):
    ledger, data = run_filter(tmp_path / "out", "--input", str(img2dataset_outputs[fmt]))
    assert collections.Counter((r["status"], r["reason"]) for r in ledger) == I2D_EXPECTED
    failed = [r for r in ledger if r["reason"] == "download_failed"]
    assert all("404" in r["detail"] for r in failed)
    by_caption = {p["caption"]: p for p in data}
    astro = by_caption["a portrait of an astronaut with the American flag"]
    assert (astro["width"], astro["height"]) == (512, 512)
    assert json.loads(astro["meta"])["author"] == "scikit-image"
    assert astro["url"].startswith("http://127.0.0.1:") and astro["url"].endswith("/skimage_pairs/astronaut.png")
    assert all(p["image"] and len(p["image_sha256"]) == 64 for p in data)
    assert all(ch.ok for ch in verify(str(tmp_path / "out")))
