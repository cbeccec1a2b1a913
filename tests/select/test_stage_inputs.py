"""`--input NAME=DIR` repeated on the stages that read stage outputs (rewrite, pack, ocr; filter, dedup
and select are covered in test_sources_select.py): two sources whose raw keys collide come out with
`NAME-KEY` keys and their dataset, exactly one output or ledger row per input record; a plain
`--input DIR` still changes nothing; unnamed plural inputs and a missing directory exit 2."""

from __future__ import annotations

import io
import json
import pathlib
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import cli
from schemas.records import Pair
from transforms.stage_io import read_manifest, read_table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from helpers import make_stage_dir  # noqa: E402


def _jpeg(seed: int, size=(96, 64)) -> bytes:
    im = Image.new("RGB", size)
    im.putdata([((x * 7 + seed * 40) % 256, (y * 5 + seed * 13) % 256, 90) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pair(key: str, seed: int, caption: str) -> Pair:
    img = _jpeg(seed)
    return Pair(key=key, caption=caption, image=img, source=f"t#{key}", width=96, height=64, image_format="JPEG")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_inputs")
    # raw keys collide across the two sources ("000000001" in both), as img2dataset keys do
    a = make_stage_dir(str(root / "a"), [_pair("000000001", 1, "a red barn in a field"),
                                         _pair("000000002", 2, "two dogs on a beach")], stage="dedup")
    b = make_stage_dir(str(root / "b"), [_pair("000000001", 3, "a city street at night"),
                                         _pair("000000003", 4, "a bowl of noodles"),
                                         _pair("000000004", 5, "an old stone bridge")], stage="dedup")
    return root, a, b


WANT_KEYS = ["cc-000000001", "cc-000000002", "web-000000001", "web-000000003", "web-000000004"]


def _named(dirs):
    _, a, b = dirs
    return ["--input", f"cc={a}", "--input", f"web={b}"]


def _check_named_output(out: pathlib.Path):
    data = read_table(str(out), columns=["key", "dataset"]).to_pylist()
    assert sorted(r["key"] for r in data) == WANT_KEYS
    assert all(r["dataset"] == r["key"].split("-", 1)[0] for r in data)
    ledger = read_table(str(out), "ledger", columns=["key", "status"]).to_pylist()
    assert sorted(r["key"] for r in ledger) == WANT_KEYS and {r["status"] for r in ledger} == {"kept"}
    m = read_manifest(str(out))
    assert m.counts["inputs"] == 5 and m.input["kind"] == "sources" and sorted(m.input["sources"]) == ["cc", "web"]
    assert cli.main(["verify", str(out)]) == 0


def test_rewrite_takes_named_inputs(dirs):
    root, a, _ = dirs
    out = root / "rewrite"
    assert cli.main(["rewrite", *_named(dirs), "--output", str(out), "--backend", "offline-template",
                     "--policy", "all"]) == 0
    _check_named_output(out)
    # a plain --input DIR: keys and dataset exactly as before
    single = root / "rewrite1"
    assert cli.main(["rewrite", "--input", a, "--output", str(single), "--backend", "offline-template", "--policy", "all"]) == 0
    rows = read_table(str(single), columns=["key", "dataset"]).to_pylist()
    assert sorted((r["key"], r["dataset"]) for r in rows) == [("000000001", None), ("000000002", None)]
    assert read_manifest(str(single)).input["kind"] == "stage"


def test_pack_takes_named_inputs(dirs):
    root, a, _ = dirs
    out = root / "pack"
    assert cli.main(["pack", *_named(dirs), "--output", str(out), "--stage", "1", "--seq-len", "512",
                     "--partitions", "1"]) == 0
    ledger = read_table(str(out), "ledger", columns=["key", "status", "reason"]).to_pylist()
    assert sorted((r["key"], r["status"]) for r in ledger) == [(k, "kept") for k in WANT_KEYS]
    m = read_manifest(str(out))
    assert m.extra["packed_samples"] == 5 and sorted(m.input["sources"]) == ["cc", "web"]
    packed = [k for f in sorted((out / "data").glob("*.parquet"))
              for ks in pq.read_table(f, columns=["sample_keys"]).column("sample_keys").to_pylist() for k in ks]
    assert sorted(packed) == WANT_KEYS
    single = root / "pack1"
    assert cli.main(["pack", "--input", a, "--output", str(single), "--stage", "1", "--seq-len", "512",
                     "--partitions", "1"]) == 0
    assert sorted(r["key"] for r in read_table(str(single), "ledger", columns=["key"]).to_pylist()) == [
        "000000001", "000000002"]


def test_ocr_takes_named_inputs(dirs):
    root, _, _ = dirs
    out = root / "ocr"
    assert cli.main(["ocr", *_named(dirs), "--output", str(out), "--no-safety"]) == 0
    _check_named_output(out)
    rows = read_table(str(out), columns=["key", "ocr"]).to_pylist()
    assert all(json.loads(r["ocr"])["model"] for r in rows)  # every record went through the real OCR


@pytest.mark.parametrize("stage, extra", [
    ("rewrite", ["--backend", "offline-template"]),
    ("pack", []),
    ("ocr", ["--no-safety"]),
])
def test_bad_inputs_exit_2_before_work(dirs, tmp_path, capsys, stage, extra):
    _, a, b = dirs
    out = tmp_path / "o"
    assert cli.main([stage, "--input", a, "--input", b, "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "--input: with several inputs name each one, e.g. --input cc3m=DIR1 --input laion=DIR2" in err
    missing = tmp_path / "nowhere"
    assert cli.main([stage, "--input", f"x={missing}", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert f"--input {missing}:" in err and "Traceback" not in err
    assert not out.exists()


def test_inspect_and_stats_break_every_stage_down_by_dataset(dirs, tmp_path, capsys):
    """rewrite, pack (shards without a dataset column), ocr and a selection that keeps no `cc` record:
    ledger rows per dataset and status, as built above by hand (cc: 2 records, web: 3)."""
    from pipelines import inspection, stats

    root = dirs[0]
    for name, make in (("rewrite", test_rewrite_takes_named_inputs), ("pack", test_pack_takes_named_inputs),
                       ("ocr", test_ocr_takes_named_inputs)):
        if not (root / name / "manifest.json").exists():
            make(dirs)
    cfg = tmp_path / "mix.toml"
    cfg.write_text("[select]\ntarget_pairs = 2\n[select.weights]\nweb = 1.0\n")
    assert cli.main(["select", "--input", str(root / "rewrite"), "--stage", "1", "--config", str(cfg),
                     "--output", str(root / "select")]) == 0
    all_kept = {"cc": {"kept": 2}, "web": {"kept": 3}}
    want = {"rewrite": all_kept, "pack": all_kept, "ocr": all_kept,
            "select": {"cc": {"rejected": 2}, "web": {"kept": 2, "rejected": 1}}}
    for name, expected in want.items():
        assert inspection.describe(str(root / name))["by_dataset"] == expected, name
        capsys.readouterr()
        assert stats.main([str(root / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["by_dataset"][name] == expected, name
    # a single unnamed source has no breakdown
    assert "by_dataset" not in inspection.describe(dirs[1])
