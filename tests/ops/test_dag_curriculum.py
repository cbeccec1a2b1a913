"""The curriculum DAG for real: one `airflow dags test mmcorpus_curriculum` run (sqlite, offline, DirectRunner)
over slices of the bundled sources (CC3M, LAION-style, COCO-CN, the img2dataset photos) builds three
selections and three packs and publishes three assets; bad inputs fail the run loudly. Expected
counts come from the fixture and the mixture written here, never from the code under test."""

from __future__ import annotations

import collections
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from schemas.manifest import MANIFEST_NAME

pytestmark = pytest.mark.airflow

DAG_ID = "mmcorpus_curriculum"
CC3M_LINES, COCOCN_LINES, LAION_ROWS = 60, 40, 40
# Hand-labelled from the fixture against the filter's documented rules (README "filter"):
# LAION rows 5 and 39 have 2 words (< 3), row 31 is a URL slug.
LAION_REJECTED = {"Hogsmeade Station": "caption_too_short_words", "Patent Drawing": "caption_too_short_words",
                  "2go-travel-sale-ticket-valentines-day-promo": "caption_boilerplate"}
# The photos (data/sample/i2d_webdataset, captions in the tars): 2-word titles, camera file names,
# a 384x191 image (shorter side < 200 px) and img2dataset's two failed downloads.
PHOTOS_NOT_KEPT = {
    "0000001": "caption_too_short_words", "0000003": "caption_too_short_words", "0000004": "caption_too_short_words",
    "0000008": "caption_too_short_words", "0000006": "caption_boilerplate", "0000009": "caption_boilerplate",
    "0000012": "caption_boilerplate", "0000013": "caption_boilerplate", "0000100": "caption_boilerplate",
    "0000102": "image_too_small", "0000110": "download_failed", "0000111": "download_failed",
}
OCR_PAGES = 2
# The mixture of this test: stage 1 and 2 draw 40 pairs at 40/20/20/20 %; stage 3 draws 20 at
# 30/20/10/20/20 % with the OCR pages, upsampled.
MIX = """
[select]
target_pairs = 40
[select.weights]
cc3m = 0.4
cococn = 0.2
laion = 0.2
photos = 0.2
[select.stage2]
allow_upscale = true
overlap = "disjoint"
[select.stage3]
target_pairs = 20
on_short = "upsample"
overlap = "allow"
text_rich_share = 0.2
[select.stage3.weights]
cc3m = 0.3
cococn = 0.2
laion = 0.1
photos = 0.2
synthdoc = 0.2
"""
EXPECTED = {
    1: {"cc3m": 16, "cococn": 8, "laion": 8, "photos": 8},
    2: {"cc3m": 16, "cococn": 8, "laion": 8, "photos": 8},
    3: {"cc3m": 6, "cococn": 4, "laion": 2, "photos": 4, "synthdoc": 4},
}
PROFILE_SIDE = {1: 224, 2: 448}


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "MMCORPUS_OUTPUT_ROOT": str(tmp_path_factory.mktemp("curriculum_runs")),
        "MMCORPUS_REWRITE_ENDPOINT": "http://127.0.0.1:9/v1",  # down: the run asks for the offline fallback
        "MMCORPUS_PROGRESS": "0",
        "MMCORPUS_RETRIES": "0",
        "MMCORPUS_BEAM_OPTIONS": json.dumps({"direct_running_mode": "in_memory", "direct_num_workers": 1}),
    })
    env.pop("MMCORPUS_TARGET_SHARD_BYTES", None)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return env


@pytest.fixture(scope="module")
def sources(tmp_path_factory, sample_dir) -> dict:
    """Slices of the bundled sources, plus one CC3M caption planted in the LAION table under another URL."""
    d = tmp_path_factory.mktemp("sources")
    cc3m = (sample_dir / "cc3m_val_captions_8k.tsv").read_text(encoding="utf-8").splitlines()[:CC3M_LINES]
    (d / "cc3m.tsv").write_text("\n".join(cc3m) + "\n", encoding="utf-8")
    cococn = (sample_dir / "coco_cn_captions_2k.tsv").read_text(encoding="utf-8").splitlines()[:COCOCN_LINES]
    (d / "cococn.tsv").write_text("\n".join(cococn) + "\n", encoding="utf-8")
    laion = pq.read_table(sample_dir / "img2dataset_sample_1000.parquet", columns=["URL", "TEXT"]).slice(0, LAION_ROWS)
    planted = cc3m[0].split("\t")[0]
    laion = pa.concat_tables([laion, pa.table({"URL": ["http://127.0.0.1:9/planted.jpg"], "TEXT": [planted]})])
    pq.write_table(laion, d / "laion.parquet")
    (d / "mix.toml").write_text(MIX, encoding="utf-8")
    return {
        "conf": {
            "sources": {
                "photos": {"path": str(sample_dir / "i2d_webdataset"), "format": "webdataset"},
                "cc3m": {"path": str(d / "cc3m.tsv"), "caption_col": "0", "url_col": "1", "license": "CC3M terms"},
                "cococn": {"path": str(d / "cococn.tsv"), "caption_col": "1", "url_col": "0", "header": "no",
                           "license": "MIT"},
                "laion": {"path": str(d / "laion.parquet"), "caption_col": "TEXT", "url_col": "URL",
                          "license": "unknown"},
            },
            "mix_config": str(d / "mix.toml"), "ocr_pages": str(OCR_PAGES), "rewrite_fallback": "offline-template",
        },
        "planted": planted, "laion_captions": laion.column("TEXT").to_pylist(), "dir": d,
    }


def _dags_test(env: dict, conf: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)],
                         env=env, capture_output=True, text=True, timeout=1800)
    return out.stdout + out.stderr


def _last_run(env: dict) -> tuple[str, str, dict[str, str], list[tuple[str, dict]]]:
    db = sqlite3.connect(os.path.join(env["AIRFLOW_HOME"], "airflow.db"))
    run_id, state = db.execute(f"SELECT run_id, state FROM dag_run WHERE dag_id='{DAG_ID}' ORDER BY id DESC LIMIT 1").fetchone()
    states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE run_id=? AND dag_id=?", (run_id, DAG_ID)).fetchall())
    events = [(name, json.loads(extra)) for name, extra in db.execute(
        "SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
        "WHERE e.source_run_id=? AND e.source_dag_id=? ORDER BY a.name", (run_id, DAG_ID)).fetchall()]
    return run_id, state, states, events


def _run_dir(env: dict, run_id: str) -> str:
    return os.path.join(env["MMCORPUS_OUTPUT_ROOT"], "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id))


def _manifest(d: str) -> dict:
    with open(os.path.join(d, MANIFEST_NAME)) as f:
        return json.load(f)


def _table(d: str, kind: str = "data") -> pa.Table:
    m = _manifest(d)
    return pa.concat_tables([pq.read_table(os.path.join(d, f["path"])) for f in m["files"]
                             if f["kind"] == kind and f["path"].endswith(".parquet")])


def _photo_rows(sample_dir) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (sample_dir / "i2d_webdataset").glob("*.parquet"))


def test_dagbag_has_the_curriculum_graph(airflow_env):
    out = subprocess.run([sys.executable, "-c", f"""
import json
from airflow.models import DagBag
bag = DagBag(dag_folder={str(REPO / 'dags')!r})
dag = bag.dags[{DAG_ID!r}]
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}},
    "downstream": {{t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}},
    "outlets": {{t.task_id: [a.name for a in t.outlets] for t in dag.tasks if t.outlets}},
    "params": sorted(dag.params), "schedule": str(dag.schedule)}}))
"""], env=airflow_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["errors"] == {}
    assert info["downstream"] == {
        "plan": ["filter", "synthdoc"], "filter": ["dedup"], "dedup": ["choose_rewrite"],
        "choose_rewrite": ["no_rewrite", "rewrite_endpoint", "rewrite_offline"],
        "rewrite_endpoint": ["select1"], "rewrite_offline": ["select1"], "no_rewrite": ["select1"],
        "synthdoc": ["ocr"], "ocr": ["select3"],
        "select1": ["pack1", "select2"], "select2": ["pack2", "select3"], "select3": ["pack3"],
        "pack1": ["verify"], "pack2": ["verify"], "pack3": ["verify"], "verify": []}
    # The three assets, one per pack output, published after every output of the run verified.
    assert info["outlets"] == {"verify": ["mmcorpus/curriculum/stage1", "mmcorpus/curriculum/stage2",
                                          "mmcorpus/curriculum/stage3"]}
    assert {"sources", "sources_config", "mix_config", "stage2_overlap", "target_shard_bytes", "ocr_pages"} <= set(info["params"])
    assert "num_shards" not in info["params"]


def test_one_run_builds_a_three_stage_curriculum(airflow_env, sources, sample_dir):
    log = _dags_test(airflow_env, sources["conf"])
    run_id, state, states, events = _last_run(airflow_env)
    assert state == "success", log[-4000:]
    assert states == {t: "success" for t in (
        "plan", "filter", "dedup", "choose_rewrite", "rewrite_offline", "synthdoc", "ocr",
        "select1", "select2", "select3", "pack1", "pack2", "pack3", "verify")} | {
        "rewrite_endpoint": "skipped", "no_rewrite": "skipped"}
    run = _run_dir(airflow_env, run_id)

    # filter: every row of every source went in; what was kept is the hand-labelled fixture.
    inputs = {"photos": _photo_rows(sample_dir), "cc3m": CC3M_LINES, "cococn": COCOCN_LINES, "laion": LAION_ROWS + 1}
    kept = {"photos": inputs["photos"] - len(PHOTOS_NOT_KEPT), "cc3m": CC3M_LINES, "cococn": COCOCN_LINES,
            "laion": LAION_ROWS + 1 - len(LAION_REJECTED)}
    filt = _manifest(f"{run}/filter")
    assert filt["counts"]["inputs"] == sum(inputs.values()) == 169
    data = _table(f"{run}/filter")
    assert collections.Counter(data.column("dataset").to_pylist()) == kept
    laion_kept = {c for c, d in zip(data.column("caption").to_pylist(), data.column("dataset").to_pylist()) if d == "laion"}
    assert set(sources["laion_captions"]) - laion_kept == set(LAION_REJECTED)
    ledger = _table(f"{run}/filter", "ledger")
    not_kept = {k: r for k, s, r in zip(*(ledger.column(c).to_pylist() for c in ("key", "status", "reason"))) if s != "kept"}
    assert {k[len("photos-"):]: r for k, r in not_kept.items() if k.startswith("photos-")} == PHOTOS_NOT_KEPT
    assert sorted(r for k, r in not_kept.items() if k.startswith("laion-")) == sorted(LAION_REJECTED.values())
    assert set(data.column("license").to_pylist()) >= {"CC3M terms", "MIT", "unknown"}

    # dedup across sources: the planted LAION copy of a CC3M caption is the one duplicate, and the
    # CC3M record (listed before laion, so preferred) is kept.
    dedup_ledger = _table(f"{run}/dedup", "ledger").to_pylist()
    dups = [r for r in dedup_ledger if r["status"] == "duplicate"]
    planted_keys = [k for k, c in zip(data.column("key").to_pylist(), data.column("caption").to_pylist()) if c == sources["planted"]]
    assert sorted(k.split("-")[0] for k in planted_keys) == ["cc3m", "laion"]
    assert [(r["key"].split("-")[0], r["kept_key"].split("-")[0]) for r in dups] == [("laion", "cc3m")]
    assert {dups[0]["key"], dups[0]["kept_key"]} == set(planted_keys)
    pool = sum(kept.values()) - 1
    assert _manifest(f"{run}/dedup")["counts"]["outputs"] == _manifest(f"{run}/rewrite")["counts"]["outputs"] == pool
    assert _manifest(f"{run}/rewrite")["config"]["rewrite"]["backend"] == "offline-template"

    # OCR data for stage 3: the synthetic pages, read by the OCR stage (real RapidOCR), all text-rich.
    ocr = _table(f"{run}/ocr")
    assert ocr.num_rows == OCR_PAGES
    assert [json.loads(o)["text_rich"] for o in ocr.column("ocr").to_pylist()] == [True] * OCR_PAGES

    # Three selections with exactly the configured mixture.
    keys = {}
    for n in (1, 2, 3):
        sel = _table(f"{run}/select{n}")
        assert collections.Counter(sel.column("dataset").to_pylist()) == EXPECTED[n], n
        keys[n] = sel.column("key").to_pylist()
        replicas = [k for k, r in zip(keys[n], sel.column("replica").to_pylist()) if r]
        assert len(replicas) == (OCR_PAGES if n == 3 else 0)
        assert all(k.startswith("synthdoc-") for k in replicas)
    # stage 2 is disjoint from stage 1: 16 photos in the pool, 8 + 8, so together they are all of them.
    assert not set(keys[1]) & set(keys[2])
    photos_drawn = {k for n in (1, 2) for k in keys[n] if k.startswith("photos-")}
    assert len(photos_drawn) == kept["photos"]
    sel2_ledger = _table(f"{run}/select2", "ledger")
    assert collections.Counter(sel2_ledger.column("reason").to_pylist())["in_earlier_selection"] == 40
    # stage 3 may overlap stage 2: the overlap it reports is the one in the data.
    originals3 = {k for k, r in zip(keys[3], _table(f"{run}/select3").column("replica").to_pylist()) if not r}
    mix3 = json.loads(open(f"{run}/select3/mixture.json").read())
    assert mix3["earlier"]["overlap"] == len(originals3 & set(keys[2]))

    # Three packs, each with its stage profile, holding exactly its selection.
    tokens = {}
    for n in (1, 2, 3):
        packs = _table(f"{run}/pack{n}", "pack")
        assert sorted(k for ks in packs.column("sample_keys").to_pylist() for k in ks) == sorted(keys[n])
        tokens[n] = sum(len(ids) for ids in packs.column("input_ids").to_pylist())
        assert _manifest(f"{run}/pack{n}")["config"]["profile"]["stage"] == n
        sizes = set()
        for images in packs.column("images").to_pylist():
            sizes |= {Image.open(io.BytesIO(b)).size for b in images}
        if n in PROFILE_SIDE:  # stages 1 and 2: one square image at the profile's side
            assert sizes == {(PROFILE_SIDE[n], PROFILE_SIDE[n])}, n
        else:  # stage 3 (adaptive): images keep their aspect ratio and large ones are sliced into a grid
            assert any(w != h for w, h in sizes)
            assert max(c for cols in packs.column("image_grid_cols").to_pylist() for c in cols) > 0

    # Sized by bytes with the CLI's default: the flag is not passed, each stage made one shard.
    commands = [ln.split("Running command: ", 1)[1] for ln in log.splitlines() if "Running command: " in ln]
    assert len(commands) == 11
    assert not any("num_shards" in c or "target_shard_bytes" in c for c in commands)
    assert {_manifest(f"{run}/{s}")["config"]["num_shards"] for s in ("filter", "dedup", "select1", "pack3")} == {1}
    select3_cmd = next(c for c in commands if "select_stage.py" in c and "--stage=3" in c).split()
    assert f"--input=pool={run}/rewrite" in select3_cmd and f"--input=synthdoc={run}/ocr" in select3_cmd

    # The three asset events: one per pack, with what it holds.
    assert [n for n, _ in events] == ["mmcorpus/curriculum/stage1", "mmcorpus/curriculum/stage2", "mmcorpus/curriculum/stage3"]
    for n, (_, extra) in zip((1, 2, 3), events):
        assert extra["path"] == f"{run}/pack{n}" and extra["run_id"] == run_id
        assert (extra["stage"], extra["profile"], extra["pairs"], extra["packed_samples"]) == (n, n, len(keys[n]), len(keys[n]))
        assert extra["tokens"] == tokens[n]
        total = sum(EXPECTED[n].values())
        assert extra["by_dataset"] == {k: round(100 * v / total, 2) for k, v in EXPECTED[n].items()}
        assert extra["rewrite"] == "offline-template"
    assert events[1][1]["overlap"] == 0 and events[2][1]["overlap"] == mix3["earlier"]["overlap"]
    # Stage 3's text-rich axis comes from the OCR stage's verdict: exactly the 4 synthdoc rows (20 %).
    assert events[2][1]["by_text_rich"] == {"false": 80.0, "true": 20.0}
    assert json.loads(open(f"{run}/curriculum.json").read())["stage3"]["pairs"] == 20


def test_a_bad_sources_list_fails_the_run_before_any_stage(airflow_env, sources):
    conf = json.loads(json.dumps(sources["conf"]))
    conf["sources"]["laion"]["licence"] = "typo"
    log = _dags_test(airflow_env, conf)
    run_id, state, states, events = _last_run(airflow_env)
    assert state == "failed"
    assert states["plan"] == "failed"
    assert {t for t, s in states.items() if s != "upstream_failed"} == {"plan"}
    assert events == [] and not os.path.exists(_run_dir(airflow_env, run_id))
    assert "param sources: sources.laion: unknown key(s) licence" in log


def test_a_failing_stage_fails_the_run_and_publishes_no_asset(airflow_env, sources):
    # A LAION table without the configured caption column: the filter exits 2 naming it.
    conf = json.loads(json.dumps(sources["conf"]))
    conf["sources"]["laion"]["caption_col"] = "CAPTION"
    conf["ocr_pages"] = "1"
    log = _dags_test(airflow_env, conf)
    run_id, state, states, events = _last_run(airflow_env)
    assert state == "failed"
    assert states["filter"] == "failed"
    assert all(states[t] == "upstream_failed" for t in ("dedup", "select1", "select3", "pack1", "pack3", "verify"))
    assert events == []
    assert "CAPTION" in log
