"""The curriculum plan the DAG and the demo share (pipelines/curriculum.py): sources list, per-run mixture,
TOML written back; bad lists exit 2 naming the key. No Beam, no Airflow: fast."""

from __future__ import annotations

import tomllib

import pytest

from conftest import REPO
from pipelines import curriculum
from schemas.errors import UserError
from transforms.selection import load_select_config


def test_bundled_demo_sources_resolve_in_priority_order():
    sources = curriculum.load_sources_file(str(REPO / "data" / "mix" / "demo_sources.toml"))
    assert [s["name"] for s in sources] == ["photos", "cc3m", "cococn", "laion"]
    assert [s["path"] for s in sources] == [str(REPO / "data" / "sample" / p) for p in (
        "i2d_webdataset", "cc3m_val_captions_8k.tsv", "coco_cn_captions_2k.tsv", "img2dataset_sample_1000.parquet")]
    assert curriculum.filter_inputs(sources)[1] == f"cc3m={REPO}/data/sample/cc3m_val_captions_8k.tsv"
    doc = tomllib.loads(curriculum.dump_toml(curriculum.stage_config(sources)))
    assert doc["dedup"] == {"source_priority": ["photos", "cc3m", "cococn", "laion"]}
    assert doc["sources"]["photos"] == {"input_format": "webdataset"}
    assert doc["sources"]["cococn"] == {"caption_col": "1", "url_col": "0", "header": "no",
                                        "license": "MIT (COCO-CN captions)"}


def test_run_mix_points_stages_at_this_runs_selections_and_round_trips():
    with open(REPO / "data" / "mix" / "demo_mix.toml", "rb") as f:
        doc = tomllib.load(f)
    mix = curriculum.run_mix(doc, {2: "/runs/r1/select1", 3: "/runs/r1/select2"}, "allow")
    back = tomllib.loads(curriculum.dump_toml(mix))
    assert back == mix
    assert (back["select"]["stage2"]["earlier"], back["select"]["stage2"]["overlap"]) == ("/runs/r1/select1", "allow")
    assert (back["select"]["stage3"]["earlier"], back["select"]["stage3"]["overlap"]) == ("/runs/r1/select2", "allow")
    assert "earlier" not in doc["select"].get("stage2", {})  # the file's document is not changed
    cfg = {n: load_select_config(back, n, where="mix") for n in (1, 2, 3)}
    assert (cfg[1].target_pairs, cfg[2].target_pairs, cfg[3].target_pairs) == (1000, 1000, 200)
    assert dict(cfg[3].weights) == {"cc3m": 0.45, "cococn": 0.25, "laion": 0.1, "photos": 0.1, "synthdoc": 0.1}
    assert curriculum.dump_toml({"a": {"b c": "zh 中文", "n": [1, 2], "t": True}}) == '[a]\n"b c" = "zh 中文"\nn = [1, 2]\nt = true\n'


@pytest.mark.parametrize("spec, message", [
    ({}, "param: expected a non-empty table of sources"),
    ({"cc-3m": {"path": "data"}}, "param: source name 'cc-3m' must be 1-32 letters, digits or _"),
    ({"cc3m": {"path": "data", "licence": "x"}}, "param: sources.cc3m: unknown key(s) licence"),
    ({"cc3m": {"format": "table"}}, "param: sources.cc3m.path is missing"),
    ({"cc3m": {"path": "no/such/file.tsv"}}, "param: sources.cc3m.path {repo}/no/such/file.tsv does not exist"),
])
def test_bad_sources_name_the_key(spec, message):
    with pytest.raises(UserError) as e:
        curriculum.load_sources(spec, str(REPO), "param")
    assert str(e.value).startswith(message.format(repo=REPO))


def test_bad_stage2_overlap_names_the_value():
    with pytest.raises(UserError, match="stage2_overlap must be disjoint or allow, not 'some'"):
        curriculum.run_mix({"select": {}}, {}, "some")
