"""Report building blocks without a browser: sampling hash, link parsing, config checks, the CLI's
errors, determinism, thumbnail settings, and that the report reads samples, not the corpus."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import cli, report
from pipelines.report import BottomK, ReportConfig, key_hash, key_hashes, parse_link

from .browser import Chromium

KEYS = ["", "a", "0000000", "0006400c1c224e19", "ключ-ünïcode", "键", "x" * 300, "k" * 17]


def test_vectorised_key_hash_equals_the_scalar_one():
    arr = pa.array(KEYS + [None], pa.string())
    got = key_hashes(arr, seed=7).tolist()
    assert got == [key_hash(k, 7) for k in KEYS] + [key_hash("", 7)]
    # sliced and chunked arrays (offsets not starting at 0) hash the same
    chunked = pa.chunked_array([arr.slice(2, 3), arr.slice(5, 2)])
    assert key_hashes(chunked, 7).tolist() == [key_hash(k, 7) for k in KEYS[2:7]]
    assert key_hashes(pa.array(KEYS, pa.large_string()), 7).tolist() == got[:-1]


def test_key_hash_depends_on_seed_and_spreads():
    keys = [f"{i:07d}" for i in range(20000)]
    h0 = key_hashes(pa.array(keys), 0)
    h1 = key_hashes(pa.array(keys), 1)
    assert (h0 != h1).all()
    assert len(set(h0.tolist())) == len(keys)
    # sequential keys land evenly over the hash range (a uniform sample of sequential ids)
    buckets = np.bincount((h0 >> np.uint64(60)).astype(int), minlength=16)
    assert buckets.min() > 20000 / 16 * 0.85 and buckets.max() < 20000 / 16 * 1.15


def test_bottom_k_is_independent_of_arrival_order():
    keys = [f"k{i}" for i in range(1000)]
    ref = sorted(keys, key=lambda k: (key_hash(k, 3), k))[:5]
    for order in (keys, keys[::-1], keys[500:] + keys[:500]):
        b = BottomK(5)
        for i in range(0, 1000, 97):
            chunk = pa.array(order[i:i + 97])
            b.offer("g", key_hashes(chunk, 3), chunk)
        assert b.sample("g") == ref


@pytest.mark.parametrize("reason,detail,link,distance", [
    ("near-caption", "cluster of 3, kept ab; linked by near-caption", "near-caption", None),
    ("near-caption", "cluster of 3, kept ab; linked by near-caption; jaccard 0.82", "near-caption", "jaccard 0.82"),
    ("near-image", "hamming=3 to 0000007", "near-image", "hamming 3"),
    ("near-image", '{"link": "near-image", "distance": 2, "kept_key": "x"}', "near-image", "distance 2"),
    ("exact-image", '{"rule": "exact-image", "jaccard": 1.0}', "exact-image", "jaccard 1"),
    ("near-image", "link=near-image hamming=3 kept=00001234 round=1", "near-image", "hamming 3"),
    ("exact-caption", "link=near-caption jaccard=0.81 kept=k1 round=0", "near-caption", "jaccard 0.81"),
    ("exact-image", "link=exact-image kept=k1 round=0", "exact-image", None),
    ("near-caption", "link= jaccard=high", "near-caption", None),
    ("near-caption", "", "near-caption", None),
    ("near-caption", None, "near-caption", None),
    ("near-caption", "[1, 2]", "near-caption", None),
])
def test_parse_link_reads_whatever_the_detail_holds(reason, detail, link, distance):
    assert parse_link(reason, detail) == {"link": link, "distance": distance}


@pytest.mark.parametrize("kwargs", [{"samples": 0}, {"thumb_max_side": 8}, {"thumb_quality": 100},
                                    {"cluster_members": 1}, {"stats_rows": 0}])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ReportConfig(**kwargs)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--output", str(tmp_path / "out")]) == 2
    assert "no manifest.json and no stage outputs" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_refuses_to_write_into_a_foreign_directory(report_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["report", str(report_run["run"]), "--output", str(other)]) == 2
    assert "is not a report directory" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    assert cli.main(["report", str(report_run["run"]), "--output", str(tmp_path / "x"), "--samples", "0"]) == 2
    assert "samples must be >= 1" in capsys.readouterr().err


def _tree(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_run_and_seed_give_byte_identical_files(report_run, tmp_path):
    from .conftest import SAMPLES

    first = _tree(report_run["report"])
    again = tmp_path / "again"
    assert report.main([str(report_run["run"]), "--output", str(again), "--samples", str(SAMPLES),
                        "--raw-input", str(report_run["input"])]) == 0
    assert _tree(again) == first
    # rewriting into the same (report) directory gives the same files and removes stale thumbnails
    (again / "thumbs" / "stale.jpg").write_bytes(b"old")
    assert report.main([str(report_run["run"]), "--output", str(again), "--samples", str(SAMPLES),
                        "--raw-input", str(report_run["input"])]) == 0
    assert _tree(again) == first
    other = tmp_path / "seed1"
    assert report.main([str(report_run["run"]), "--output", str(other), "--samples", str(SAMPLES), "--seed", "1",
                        "--raw-input", str(report_run["input"])]) == 0
    assert _tree(other)["index.html"] != first["index.html"]


def test_thumbnail_side_and_quality_are_configurable(report_run, tmp_path):
    out = tmp_path / "small"
    report.write_report(str(report_run["filter"]), str(out), ReportConfig(samples=2, thumb_max_side=48, thumb_quality=30))
    thumbs = list((out / "thumbs").glob("*.jpg"))
    assert thumbs
    big = tmp_path / "big"
    report.write_report(str(report_run["filter"]), str(big), ReportConfig(samples=2, thumb_max_side=200, thumb_quality=90))
    for t in thumbs:
        with Image.open(t) as im:
            assert max(im.size) == 48
        assert t.stat().st_size < (big / "thumbs" / t.name).stat().st_size


def test_filter_rejects_without_raw_input_say_so(report_run, tmp_path):
    out = tmp_path / "noraw"
    report.write_report(str(report_run["filter"]), str(out), ReportConfig(samples=2))
    html = (out / "index.html").read_text()
    assert html.count("raw input not given (--raw-input)") == 2 + 2 + 1 + 2  # 2 per reason, 1 image_too_small, 2 downloads


def test_reads_samples_not_the_corpus(tmp_path, monkeypatch):
    """On a synthetic 40k-record run, sampling reads the key column of a bounded number of ledger
    row groups, and image bytes only from the data row groups that hold shown records."""
    from bench.report_scale import synthesize_run

    run = tmp_path / "run"
    synthesize_run(str(run), 40_000)
    reads: list[tuple[str, tuple]] = []
    real = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kw):
        reads.append((i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    cfg = ReportConfig(samples=3, stats_rows=1000)
    out = report.write_report(str(run), str(tmp_path / "rep"), cfg)
    image_reads = [r for r in reads if "image" in r[1] or "images" in r[1]]
    data_row_groups = sum(pq.ParquetFile(p).num_row_groups for p in run.glob("*/data/part-*.parquet"))
    # shown records: at most samples per group + cluster members + packs; each read once per row group
    assert out["thumbnails"] > 20
    assert len(image_reads) <= 60 < data_row_groups
    key_reads = [r for r in reads if r[1] == ("key",)]
    assert 0 < len(key_reads) <= 4 * 8 + 3  # a few row groups per stage (groups share them) + rare rows


def test_browser_helper_catches_console_errors_and_dialogs(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><p id="x">hi</p><script>console.error("injected boom");'
                    'alert("pwned");</script><img src="missing.jpg"></body></html>')
    b = Chromium()
    try:
        session, events = b.open(page.as_uri())
        assert any("injected boom" in e for e in events.console_errors)
        assert any("missing.jpg" in e for e in events.console_errors)
        assert events.dialogs == ["pwned"]
        assert b.evaluate(session, 'document.getElementById("x").textContent') == "hi"
    finally:
        b.close()


def test_counts_per_dataset_and_language_when_records_carry_them(report_run, tmp_path):
    import re
    import shutil

    run = tmp_path / "run"
    shutil.copytree(report_run["filter"], run / "filter")
    expected_ds, expected_lang = {}, {}
    for i, f in enumerate(sorted((run / "filter" / "data").glob("*.parquet"))):
        t = pq.read_table(f)
        ds = ["laion-en" if (i + j) % 3 else "wukong-zh" for j in range(t.num_rows)]
        lang = ["zh" if d == "wukong-zh" else "en" for d in ds]
        lang[0] = None
        for d in ds:
            expected_ds[d] = expected_ds.get(d, 0) + 1
        for x in lang:
            key = "(none)" if x is None else x
            expected_lang[key] = expected_lang.get(key, 0) + 1
        for name, values in (("dataset", pa.array(ds, pa.string())), ("lang", pa.array(lang, pa.string()))):
            i = t.schema.get_field_index(name)  # Pair has a dataset column since issue 13; lang may follow
            t = t.set_column(i, name, values) if i >= 0 else t.append_column(name, values)
        pq.write_table(t, f)
    out = tmp_path / "rep"
    report.write_report(str(run), str(out), ReportConfig(samples=1))
    html = (out / "index.html").read_text()
    section = html[html.index("Records per dataset and language"):html.index("Statistics")]
    for col, expected in (("dataset", expected_ds), ("lang", expected_lang)):
        table = section[section.index(f"<th>{col}</th>"):]
        table = table[: table.index("</table>")]
        rows = dict(re.findall(r"<tr><td>([^<]+)</td><td class=\"n\">(\d+)</td></tr>", table))
        assert {k: int(v) for k, v in rows.items()} == expected
