"""`--input NAME=DIR` repeated on the last stages that read stage outputs: `rlaifv generate` (against the
stand-in server) and `sft ingest --format rewrite`. Two sources whose raw keys collide come out with
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
from rewriter.standin import StandInServer, rlaifv_respond
from transforms.stage_io import read_manifest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from helpers import make_stage_dir  # noqa: E402

def _pair(key: str, seed: int, caption: str) -> Pair:
    im = Image.new("RGB", (96, 64))
    im.putdata([((x * 7 + seed * 40) % 256, (y * 5 + seed * 13) % 256, 90) for y in range(64) for x in range(96)])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return Pair(key=key, caption=caption, image=buf.getvalue(), source=f"t#{key}", width=96, height=64,
                image_format="JPEG")


WANT_KEYS = ["cc-000000001", "cc-000000002", "web-000000001", "web-000000003", "web-000000004"]
PLURAL = "--input: with several inputs name each one, e.g. --input cc3m=DIR1 --input laion=DIR2"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("more_inputs")
    # raw keys collide across the two sources ("000000001" in both), as img2dataset keys do
    a = make_stage_dir(str(root / "a"), [_pair("000000001", 1, "a red barn in a field"),
                                         _pair("000000002", 2, "two dogs on a beach")], stage="dedup")
    b = make_stage_dir(str(root / "b"), [_pair("000000001", 3, "a city street at night"),
                                         _pair("000000003", 4, "a bowl of noodles"),
                                         _pair("000000004", 5, "an old stone bridge")], stage="dedup")
    return root, a, b


def _rows(out, sub="data", columns=("key", "dataset")):
    """Rows read back with pyarrow alone (not our reader)."""
    files = sorted((pathlib.Path(out) / sub).glob("*.parquet"))
    assert files, f"no parquet under {out}/{sub}"
    return [r for f in files for r in pq.read_table(f, columns=list(columns)).to_pylist()]


def _check_named(out):
    data = _rows(out)
    assert sorted((r["key"], r["dataset"]) for r in data) == [
        ("cc-000000001", "cc"), ("cc-000000002", "cc"),
        ("web-000000001", "web"), ("web-000000003", "web"), ("web-000000004", "web")]
    ledger = _rows(out, "ledger", ("key", "status"))
    assert sorted((r["key"], r["status"]) for r in ledger) == [(k, "kept") for k in WANT_KEYS]
    m = read_manifest(str(out))
    assert (m.counts["inputs"], m.counts["outputs"]) == (5, 5)
    assert m.input["kind"] == "sources" and sorted(m.input["sources"]) == ["cc", "web"]
    assert cli.main(["verify", str(out)]) == 0


def _gen(server, inputs, out):
    return cli.main(["rlaifv", "generate", *inputs, "--output", str(out), "--policy-endpoint", server.base_url,
                     "--policy-model", "policy", "--n", "2", "--cache-dir", "none", "--concurrency", "4",
                     "--timeout", "20", "--num-shards", "1"])


def test_rlaifv_generate_takes_named_inputs(dirs):
    root, a, b = dirs
    with StandInServer(respond_body=rlaifv_respond) as pol:
        assert _gen(pol, ["--input", f"cc={a}", "--input", f"web={b}"], root / "gen") == 0
        assert len(pol.seen) == 5 * 2  # n responses for each of the 5 records
        _check_named(root / "gen")
        metas = [json.loads(r["meta"])["rlaifv"] for r in _rows(root / "gen", columns=("meta",))]
        assert sorted(len(d["responses"]) for d in metas) == [2] * 5
        # feedback keeps one --input: the generate output's records already carry their keys and dataset
        with StandInServer(respond_body=rlaifv_respond) as clm, StandInServer(respond_body=rlaifv_respond) as lab:
            assert cli.main(["rlaifv", "feedback", "--input", str(root / "gen"), "--output", str(root / "fb"),
                             "--claims-endpoint", clm.base_url, "--claims-model", "llm", "--labeler-endpoint",
                             lab.base_url, "--labeler-model", "mllm", "--cache-dir", "none", "--concurrency", "4",
                             "--timeout", "20", "--num-shards", "1"]) == 0
        assert sorted((r["key"], r["dataset"]) for r in _rows(root / "fb")) == sorted(
            (r["key"], r["dataset"]) for r in _rows(root / "gen"))
        assert len(_rows(root / "fb")) == 5
        # a plain --input DIR: keys and dataset exactly as before, the one-stage input description
        assert _gen(pol, ["--input", a], root / "gen1") == 0
    assert sorted((r["key"], r["dataset"]) for r in _rows(root / "gen1")) == [("000000001", None), ("000000002", None)]
    assert read_manifest(str(root / "gen1")).input["kind"] == "stage"


def test_sft_ingest_rewrite_takes_named_inputs(dirs):
    root, a, b = dirs
    out = root / "sft"
    assert cli.main(["sft", "ingest", "--format", "rewrite", "--input", f"cc={a}", "--input", f"web={b}",
                     "--output", str(out)]) == 0
    _check_named(out)
    # the SFT dataset (what the split report groups by) is the source name
    metas = {r["key"]: json.loads(r["meta"])["sft"] for r in _rows(out, columns=("key", "meta"))}
    assert {k: m["dataset"] for k, m in metas.items()} == {k: k.split("-", 1)[0] for k in WANT_KEYS}
    # a plain --input DIR with --name: as before (dataset column unset, SFT dataset the --name)
    single = root / "sft1"
    assert cli.main(["sft", "ingest", "--format", "rewrite", "--input", a, "--name", "mine", "--output", str(single)]) == 0
    rows = _rows(single, columns=("key", "dataset", "meta"))
    assert sorted((r["key"], r["dataset"], json.loads(r["meta"])["sft"]["dataset"]) for r in rows) == [
        ("000000001", None, "mine"), ("000000002", None, "mine")]
    assert read_manifest(str(single)).input["kind"] == "stage"


BAD_ARGS = {
    "rlaifv": ["rlaifv", "generate", "--policy-endpoint", "http://127.0.0.1:9/v1", "--policy-model", "p"],
    "sft": ["sft", "ingest", "--format", "rewrite"],
}


@pytest.mark.parametrize("stage", sorted(BAD_ARGS))
def test_bad_inputs_exit_2_before_work(dirs, tmp_path, capsys, stage):
    _, a, b = dirs
    out = tmp_path / "o"
    assert cli.main([*BAD_ARGS[stage], "--input", a, "--input", b, "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"mmcorpus {stage}: error: {PLURAL}\n"
    missing = tmp_path / "nowhere"
    assert cli.main([*BAD_ARGS[stage], "--input", f"cc={a}", "--input", f"x={missing}", "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"mmcorpus {stage}: error: --input {missing}: {missing}/manifest.json not found: {missing} is not a "
        "finished mmcorpus stage output (a stage writes manifest.json last; rerun the stage that should have "
        "produced it)\n")
    assert not out.exists()


def test_sft_ingest_named_inputs_and_name_conflict(dirs, tmp_path, capsys):
    _, a, b = dirs
    out = tmp_path / "o"
    assert cli.main(["sft", "ingest", "--format", "rewrite", "--input", f"cc={a}", "--name", "x",
                     "--output", str(out)]) == 2
    assert capsys.readouterr().err == ("mmcorpus sft: error: --name: with --input NAME=DIR each source's NAME "
                                       "is its dataset; drop --name\n")
    assert cli.main(["sft", "ingest", "--format", "vqa", "--input", "x.jsonl", "--input", "y.jsonl",
                     "--output", str(out)]) == 2
    assert capsys.readouterr().err == ("mmcorpus sft: error: --input: one file, directory or glob for --format vqa "
                                       "(several named inputs are for --format rewrite; run ingest once per source)\n")
    assert not out.exists()
