"""The pack stage end to end on real sample data (Beam DirectRunner), read back by independent readers."""

from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from pack.conftest import STAGE1, run_pack
from pack.fixtures import sample_pairs
from schemas import packed as S
from schemas import reasons
from schemas.errors import UserError
from schemas.manifest import Manifest
from transforms.stage_io import read_table

N_INPUTS = len(sample_pairs())
REJECTED = {"badimage0001": reasons.PACK_IMAGE_UNDECODABLE, "toolong00001": reasons.PACK_TOO_LONG}


def _manifest(out: str) -> Manifest:
    return Manifest.from_json(pathlib.Path(out, "manifest.json").read_text())


def _parquet_rows(out: str) -> list[dict]:
    index = json.loads(pathlib.Path(out, "data", "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        rows += pq.read_table(pathlib.Path(out, "data", shard["path"])).to_pylist()
    return rows


def test_ledger_accounts_for_every_input(stage3_parquet):
    m = _manifest(stage3_parquet)
    ledger = read_table(stage3_parquet, "ledger").to_pylist()
    assert m.counts["inputs"] == len(ledger) == N_INPUTS
    assert len({r["key"] for r in ledger}) == N_INPUTS
    kept = [r for r in ledger if r["status"] == "kept"]
    assert len(kept) == m.extra["packed_samples"] == N_INPUTS - 2
    assert {r["key"]: r["reason"] for r in ledger if r["status"] != "kept"} == REJECTED
    rows = _parquet_rows(stage3_parquet)
    in_packs = [k for r in rows for k in r[S.SAMPLE_KEYS]]
    assert sorted(in_packs) == sorted(r["key"] for r in kept)  # each kept sample in exactly one pack
    by_key = {k: r[S.PACK_ID] for r in rows for k in r[S.SAMPLE_KEYS]}
    for r in kept:
        assert r["detail"] == f"pack {by_key[r['key']]}"
    files = {f.path: f for f in m.files}
    assert "data/index.json" in files and files["data/index.json"].kind == S.FILE_KIND_INDEX
    packs = [f for f in m.files if f.kind == S.FILE_KIND_PACK]
    assert sorted(os.listdir(pathlib.Path(stage3_parquet, "data"))) == sorted(p.rsplit("/", 1)[1] for p in files if p.startswith("data/"))
    assert sum(f.rows for f in packs) == m.extra["packs"] == len(rows)
    assert sorted(f.path for f in packs) == [f"data/packs-{i:05d}.parquet" for i in range(len(packs))]
    assert len(packs) == m.extra["pack_shards"] > 2  # rolled by count, numbered without gaps


def test_pack_layout_invariants(stage3_parquet):
    from transforms.tokens import TextTokenizer

    ids = TextTokenizer().special_ids()
    for r in _parquet_rows(stage3_parquet):
        cu, pos, labels, input_ids = r[S.CU_SEQLENS], r[S.POSITION_IDS], r[S.LABELS], r[S.INPUT_IDS]
        assert cu[0] == 0 and cu[-1] == r[S.NUM_TOKENS] == len(input_ids) <= r[S.SEQ_LEN] == 2048
        assert len(cu) - 1 == r[S.NUM_SAMPLES] == len(r[S.SAMPLE_KEYS]) == len(set(r[S.SAMPLE_KEYS]))
        # position ids restart exactly at each boundary and count up inside a sample
        assert pos == [p for a, b in zip(cu, cu[1:]) for p in range(b - a)]
        for a in cu[:-1]:
            assert labels[a] == S.IGNORE_INDEX  # no sample learns to predict another's start
        for j, off in enumerate(r[S.IMAGE_OFFSET]):
            n = r[S.IMAGE_LENGTH][j]
            seg = r[S.IMAGE_SAMPLE][j]
            assert off == cu[seg]  # the image opens its sample
            assert input_ids[off] == ids["im_start"] and input_ids[off + n - 1] in (ids["im_end"], ids["slice_end"])
            assert all(x == S.IGNORE_INDEX for x in labels[off : off + n])
            cols, rows_ = r[S.IMAGE_GRID_COLS][j], r[S.IMAGE_GRID_ROWS][j]
            from transforms.tokens import image_token_count, slice_grid

            assert (slice_grid(r[S.IMAGE_WIDTH][j], r[S.IMAGE_HEIGHT][j]) or (0, 0)) == (cols, rows_)
            assert n == image_token_count((cols, rows_) if cols else None, 96)
            from PIL import Image

            with Image.open(io.BytesIO(r[S.IMAGES][j])) as im:
                assert im.format == "JPEG" and im.size == (r[S.IMAGE_WIDTH][j], r[S.IMAGE_HEIGHT][j])


def test_webdataset_package_reads_the_same_packs(stage3_parquet, stage3_wds):
    import webdataset as wds

    index = json.loads(pathlib.Path(stage3_wds, "data", "index.json").read_text())
    urls = [str(pathlib.Path(stage3_wds, "data", s["path"])) for s in index["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    want = _parquet_rows(stage3_parquet)
    assert [g["__key__"] for g in got] == [w[S.PACK_ID] for w in want]
    for g, w in zip(got, want):
        for name, ext in S.WDS_ARRAY_EXTS.items():
            assert g[ext].dtype == np.int32 and g[ext].tolist() == w[name]
        meta = g[S.WDS_EXT_META]
        assert meta[S.SAMPLE_KEYS] == w[S.SAMPLE_KEYS] and meta[S.IMAGE_OFFSET] == w[S.IMAGE_OFFSET]
        images = [g[S.wds_image_ext(i)] for i in range(len(w[S.IMAGES]))]
        assert [np.asarray(im).shape[:2] for im in images] == [(h, wd) for wd, h in zip(w[S.IMAGE_WIDTH], w[S.IMAGE_HEIGHT])]
    raw = list(wds.WebDataset(urls, shardshuffle=False))  # undecoded: the JPEG bytes are the very same
    assert [r[S.wds_image_ext(0)] for r in raw if S.wds_image_ext(0) in r] == [w[S.IMAGES][0] for w in want if w[S.IMAGES]]


def test_hf_datasets_reads_the_parquet_shards(stage3_parquet, tmp_path):
    import datasets  # dev extra (make test installs it)
    files = sorted(str(p) for p in pathlib.Path(stage3_parquet, "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    want = _parquet_rows(stage3_parquet)
    assert ds[S.PACK_ID] == [w[S.PACK_ID] for w in want]
    assert ds[0][S.INPUT_IDS] == want[0][S.INPUT_IDS]


def test_rerun_is_byte_identical_whatever_the_runner_order(pack_input, stage1_parquet, tmp_path):
    again = run_pack(
        pack_input, str(tmp_path / "again"), *STAGE1, "--format", "parquet",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
    )

    def files(root):
        root = pathlib.Path(root)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(stage1_parquet), files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_rerun_with_same_config_is_skipped(pack_input, stage1_parquet, capsys):
    from pipelines import pack

    assert pack.main(["--input", pack_input, "--output", stage1_parquet, *STAGE1, "--format", "parquet"]) == 0
    assert "up to date, skipped" in capsys.readouterr().out


def test_render_pack_collapses_placeholder_runs(stage3_parquet):
    from pipelines.pack import render_pack

    text = render_pack(stage3_parquet, 0)
    assert text.startswith("pack p0000")
    assert "<image><unk>×96</image>" in text and "</s>" in text


def test_flags_underscore_aliases_and_errors(pack_input, tmp_path):
    from pipelines import pack

    args, rest = pack.parse_args(["--input", "x", "--output", "y", "--seq_len=512", "--max_images_per_pack=3", "--runner=DirectRunner"])
    assert (args.seq_len, args.max_images_per_pack, rest) == (512, 3, ["--runner=DirectRunner"])
    with pytest.raises(UserError, match="--tokenizer"):
        pack.main(["--input", pack_input, "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope.json")])
    with pytest.raises(UserError, match="--input"):
        pack.main(["--input", str(tmp_path), "--output", str(tmp_path / "o")])
    with pytest.raises(UserError, match="seq_len"):
        pack.main(["--input", pack_input, "--output", str(tmp_path / "o"), "--seq-len", "1"])


def test_greedy_truncate_option(pack_input, tmp_path):
    out = run_pack(pack_input, str(tmp_path / "g"), "--stage", "3", "--seq-len", "700", "--partitions", "1", "--algorithm", "greedy_truncate")
    rows = _parquet_rows(out)
    m = _manifest(out)
    assert m.extra["truncated_tokens"] == sum(r[S.TRUNCATED_TOKENS] for r in rows) > 0
    assert all(r[S.NUM_TOKENS] <= 700 for r in rows)
    # a truncated sample keeps its whole image span: every span ends inside its pack
    for r in rows:
        for off, n in zip(r[S.IMAGE_OFFSET], r[S.IMAGE_LENGTH]):
            assert off + n <= r[S.NUM_TOKENS]
    ledger = read_table(out, "ledger").to_pylist()
    assert any("truncated to" in r["detail"] for r in ledger)
    assert sum(r["status"] == "kept" for r in ledger) == m.extra["packed_samples"]


def test_lead_verify_accepts_the_pack_output(stage3_wds):
    from pipelines import verify

    checks = verify.verify(stage3_wds)
    assert [c.name for c in checks if not c.ok] == []
    assert "kept = packed samples" in [c.name for c in checks]


def test_require_image_and_slice_limit_reasons(pack_input, tmp_path):
    out = run_pack(pack_input, str(tmp_path / "lim"), "--stage", "3", "--seq-len", "2048", "--partitions", "1",
                   "--require-image", "--max-slices-per-pack", "2")
    ledger = {r["key"]: r for r in read_table(out, "ledger").to_pylist()}
    pairs = {p.key: p for p in sample_pairs()}
    from transforms.tokens import StageProfile

    prof = StageProfile.for_stage(3)
    for key, r in ledger.items():
        p = pairs[key]
        if key == "badimage0001":
            assert r["reason"] == reasons.PACK_IMAGE_UNDECODABLE
        elif p.image is None:  # caption-only, the overlong one included: no image is checked first
            assert (r["status"], r["reason"]) == ("rejected", reasons.PACK_NO_IMAGE)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(p.image)) as im:
                grid = prof.grid(*prof.stored_size(*im.size))
            want = ("kept", "ok") if grid is None else ("rejected", reasons.PACK_TOO_MANY_IMAGES)
            assert (r["status"], r["reason"]) == want, key
    rows = _parquet_rows(out)
    assert all(sum(1 + c * r_ for c, r_ in zip(r[S.IMAGE_GRID_COLS], r[S.IMAGE_GRID_ROWS])) <= 2 for r in rows)
    assert sum(len(r[S.SAMPLE_KEYS]) for r in rows) == _manifest(out).extra["packed_samples"] == 4


def test_config_toml_pack_table_under_flags(tmp_path):
    from pipelines import pack

    cfg = tmp_path / "c.toml"
    cfg.write_text('[pack]\nseq_len = 1024\nformat = "webdataset"\nmax_slices_per_pack = 20\n')
    args, _ = pack.parse_args(["--input", "x", "--output", "y", "--config", str(cfg), "--seq-len", "512"])
    assert (args.seq_len, args.format, args.max_slices_per_pack, args.stage, args.require_image) == (512, "webdataset", 20, 2, False)
    cfg.write_text("[pack]\nseq_length = 1024\n")
    with pytest.raises(UserError, match=r"unknown setting\(s\) \['seq_length'\] in \[pack\]"):
        pack.parse_args(["--input", "x", "--output", "y", "--config", str(cfg)])


def test_all_rejected_input_writes_an_empty_index(tmp_path):
    from mmcorpus_reader import PackDataset
    from pack.fixtures import make_input_dir

    bad = [p for p in sample_pairs(captions_only=0) if p.key in REJECTED]
    src = make_input_dir(str(tmp_path / "in"), bad)
    out = run_pack(src, str(tmp_path / "out"), "--seq-len", "256")
    m = _manifest(out)
    assert m.counts["by_reason"] == {f"rejected/{r}": 1 for r in REJECTED.values()}
    assert (m.extra["packs"], m.extra["packed_samples"]) == (0, 0)
    index = json.loads(pathlib.Path(out, "data", "index.json").read_text())
    assert index["shards"] == [] and list(PackDataset(out)) == []


def test_reader_runs_without_torch(stage3_wds):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail like an uninstalled torch
        "from mmcorpus_reader import PackDataset\n"
        f"packs = list(PackDataset({stage3_wds!r}, shuffle_buffer=2))\n"
        "assert packs and type(packs[0]['input_ids']).__module__ == 'numpy'\n"
        "assert not any(m.startswith('apache_beam') for m in sys.modules)\n"
        "print(len(packs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[2])
    assert int(out.stdout.strip()) == _manifest(stage3_wds).extra["packs"]


def test_prepare_dead_letters_unexpected_exceptions():
    from transforms.packing import PackingConfig
    from transforms.shards import PrepareSampleFn, PreparedSample
    from transforms.tokens import StageProfile, TextTokenizer
    from schemas.records import Pair

    fn = PrepareSampleFn(StageProfile.for_stage(1), TextTokenizer.files_of(None), PackingConfig(seq_len=256))
    fn.setup()
    try:
        good = list(fn.process(Pair(key="ok1", caption="a cat")))
        bad = list(fn.process(Pair(key="bad1", caption=12345, source="x#1")))  # not text: the tokenizer raises
    finally:
        fn.teardown()
    assert len(good) == 1 and isinstance(good[0], PreparedSample)
    assert len(bad) == 1 and bad[0].tag == PrepareSampleFn.REJECTED
    o = bad[0].value
    assert (o.key, o.status, o.reason, o.source) == ("bad1", "error", "exception_TypeError", "x#1")


def test_webdataset_tars_are_reproducible(pack_input, stage3_wds, tmp_path):
    import tarfile

    again = run_pack(pack_input, str(tmp_path / "again"), "--stage", "3", "--seq-len", "2048", "--partitions", "2",
                     "--max-packs-per-shard", "2", "--format", "webdataset", "--direct_running_mode=multi_processing",
                     "--direct_num_workers=2")
    tars = sorted(pathlib.Path(stage3_wds, "data").glob("packs-*.tar"))
    assert [t.name for t in tars] == [f"packs-{i:05d}.tar" for i in range(len(tars))]
    for t in tars:
        assert t.read_bytes() == pathlib.Path(again, "data", t.name).read_bytes()
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                key = m.name.split(".", 1)[0]
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
                assert key.startswith("p") and "/" not in key
    assert pathlib.Path(again, "manifest.json").read_bytes() == pathlib.Path(stage3_wds, "manifest.json").read_bytes()
