"""Many sources in one run and `mmcorpus select`, on the bundled real samples: English CC3M captions
(tsv), LAION-style alt-text (img2dataset's parquet, with five CC3M captions planted under other URLs)
and the img2dataset webdataset of real photos. Asserts exact counts against oracles the code under test
does not compute: the single-source filter runs (the old path), the planted rows, hand-computed
mixture targets, PIL's own image sizes; byte-identical reruns; bad configs exit 2 naming the key."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import cli
from schemas import reasons
from transforms.selection import SelectConfig, cell_targets, make_plan
from transforms.stage_io import read_manifest, read_table

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
N_CC3M, N_LAION, PLANTED = 300, 300, 5

SOURCES_TOML = """
[sources.cc3m]
caption_col = "0"
url_col = "1"
license = "cc3m-terms"
[sources.laion]
caption_col = "TEXT"
url_col = "URL"
license = "laion-unknown"
"""

MIX_TOML = """
[select]
target_pairs = 100
[select.weights]
cc3m = 0.6
laion = 0.3
photos = 0.1

[select.stage2]
target_pairs = 30
on_short = "upsample"
earlier = "{earlier}"
overlap = "{overlap}"
[select.stage2.weights]
photos = 1.0
"""


def _cli(*argv: str) -> None:
    assert cli.main([*map(str, argv)]) == 0


def _files_sha(d: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    (root / "cc3m").mkdir()
    (root / "laion").mkdir()
    lines = (SAMPLE / "cc3m_val_captions_8k.tsv").read_text(encoding="utf-8").splitlines()[:N_CC3M]
    (root / "cc3m" / "part.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = pq.read_table(SAMPLE / "img2dataset_sample_1000.parquet").slice(0, N_LAION)
    rows = table.to_pylist()
    planted = {}  # laion url -> cc3m url of the same caption
    for i in range(PLANTED):
        caption, url = lines[20 + 7 * i].split("\t")
        mirror = f"http://mirror.example/{i}.jpg"
        planted[mirror] = url
        rows.append({"URL": mirror, "TEXT": caption, "__index_level_0__": 100000 + i})
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "laion" / "part.parquet")
    (root / "sources.toml").write_text(SOURCES_TOML)
    (root / "dedup.toml").write_text('[dedup]\nsource_priority = ["cc3m", "laion", "photos"]\n')
    (root / "dedup_rev.toml").write_text('[dedup]\nsource_priority = ["laion", "cc3m", "photos"]\n')
    out = root / "out"
    inputs = ["--input", f"cc3m={root / 'cc3m'}", "--input", f"laion={root / 'laion'}",
              "--input", f"photos={SAMPLE / 'i2d_webdataset'}"]
    _cli("filter", *inputs, "--config", root / "sources.toml", "--output", out / "filter", "--num-shards", 3)
    _cli("dedup", "--input", out / "filter", "--config", root / "dedup.toml", "--output", out / "dedup", "--num-shards", 3)
    return {"root": root, "out": out, "planted": planted, "lines": lines}


def test_named_inputs_match_single_source_runs(run):
    """Each source's records are exactly those of its own single-source run, keys prefixed NAME-,
    with dataset and licence (configured, or img2dataset's own `license` for the photos)."""
    root, out = run["root"], run["out"]
    _cli("filter", "--input", root / "cc3m", "--caption-col", 0, "--url-col", 1, "--output", out / "single_cc3m")
    _cli("filter", "--input", SAMPLE / "i2d_webdataset", "--output", out / "single_photos")
    multi = read_table(str(out / "filter")).to_pylist()
    by_ds = Counter(r["dataset"] for r in multi)
    single_cc3m = read_table(str(out / "single_cc3m")).to_pylist()
    single_photos = read_table(str(out / "single_photos")).to_pylist()
    assert {r["key"] for r in multi if r["dataset"] == "cc3m"} == {f"cc3m-{r['key']}" for r in single_cc3m}
    assert {r["key"] for r in multi if r["dataset"] == "photos"} == {f"photos-{r['key']}" for r in single_photos}
    assert by_ds["cc3m"] == len(single_cc3m) and by_ds["photos"] == len(single_photos) == 16
    assert {r["license"] for r in multi if r["dataset"] == "cc3m"} == {"cc3m-terms"}
    assert {r["license"] for r in multi if r["dataset"] == "laion"} == {"laion-unknown"}
    assert {r["license"] for r in multi if r["dataset"] == "photos"} == {
        "https://creativecommons.org/licenses/by/2.0/", "CC0/public domain"}
    m = read_manifest(str(out / "filter"))
    assert m.counts["inputs"] == N_CC3M + N_LAION + PLANTED + read_manifest(str(out / "single_photos")).counts["inputs"]
    assert set(m.input["sources"]) == {"cc3m", "laion", "photos"}


def _planted_pairs(run, table):
    """(laion key, cc3m key) of the planted rows, looked up by URL in the filter output."""
    by_url = {(r["dataset"], r["url"]): r["key"] for r in table}
    return {(by_url[("laion", lurl)], by_url[("cc3m", curl)]) for lurl, curl in run["planted"].items()}


def test_planted_cross_source_duplicates_follow_source_priority(run):
    root, out = run["root"], run["out"]
    filtered = read_table(str(out / "filter")).to_pylist()
    planted = _planted_pairs(run, filtered)
    assert len(planted) == PLANTED
    ledger = read_table(str(out / "dedup"), "ledger").to_pylist()
    ds = {r["key"]: r["dataset"] for r in filtered}
    cross = {(r["key"], r["kept_key"]) for r in ledger
             if r["status"] == "duplicate" and ds[r["key"]] != ds[r["kept_key"]]}
    assert cross == planted  # recall 1.0 and no other cross-source pair
    assert all(r["reason"] == reasons.EXACT_CAPTION for r in ledger if (r["key"], r["kept_key"]) in planted)
    # reversed priority: the LAION copies are kept, the CC3M originals removed
    _cli("dedup", "--input", out / "filter", "--config", root / "dedup_rev.toml", "--output", out / "dedup_rev",
         "--num-shards", 3)
    rev = read_table(str(out / "dedup_rev"), "ledger").to_pylist()
    cross_rev = {(r["kept_key"], r["key"]) for r in rev
                 if r["status"] == "duplicate" and ds[r["key"]] != ds[r["kept_key"]]}
    assert cross_rev == planted


def test_stage1_mixture_exact_and_rerun_identical(run):
    root, out = run["root"], run["out"]
    mix = root / "mix.toml"
    mix.write_text(MIX_TOML.format(earlier=out / "select1", overlap="disjoint"))
    _cli("select", "--input", out / "dedup", "--stage", 1, "--config", mix, "--output", out / "select1", "--num-shards", 3)
    data = read_table(str(out / "select1")).to_pylist()
    assert Counter(r["dataset"] for r in data) == {"cc3m": 60, "laion": 30, "photos": 10}  # 100 * weights
    ledger = read_table(str(out / "select1"), "ledger").to_pylist()
    dedup_keys = {r["key"] for r in read_table(str(out / "dedup"), columns=["key"]).to_pylist()}
    assert sorted(r["key"] for r in ledger) == sorted(dedup_keys)  # one ledger row per input record
    assert Counter(r["reason"] for r in ledger) == {"ok": 100, reasons.NOT_SELECTED: len(dedup_keys) - 100}
    mixture = json.loads((out / "select1" / "mixture.json").read_text())
    assert mixture["selected"] == 100 and mixture["replicas"] == 0 and mixture["shortfall"] == 0
    assert {k: (v["target"], v["achieved"]) for k, v in mixture["by_dataset"].items()} == {
        "cc3m": (60, 60), "laion": (30, 30), "photos": (10, 10)}
    # Languages as the filter's language ID wrote them into the records (read here with pyarrow, not by select).
    pool_langs = Counter(r["lang"] or "und" for r in read_table(str(out / "dedup"), columns=["lang"]).to_pylist())
    sel_langs = Counter(r["lang"] or "und" for r in data)
    assert sum(pool_langs.values()) == len(dedup_keys) and sum(sel_langs.values()) == 100
    assert {k: (v["achieved"], v["pool"]) for k, v in mixture["by_lang"].items()} == {
        k: (sel_langs.get(k, 0), n) for k, n in pool_langs.items()}
    assert read_manifest(str(out / "select1")).extra["mixture"] == mixture
    _cli("select", "--input", out / "dedup", "--stage", 1, "--config", mix, "--output", out / "select1b",
         "--num-shards", 3)
    assert _files_sha(out / "select1") == _files_sha(out / "select1b")


def _min_side(image: bytes) -> int:
    return min(Image.open(io.BytesIO(image)).size)


def test_stage2_disjoint_reselection_min_side_and_upsampling(run):
    root, out = run["root"], run["out"]
    if not (out / "select1").exists():
        test_stage1_mixture_exact_and_rerun_identical(run)
    dedup_rows = read_table(str(out / "dedup")).to_pylist()
    first = {r["key"] for r in read_table(str(out / "select1"), columns=["key"]).to_pylist()}
    eligible = {r["key"] for r in dedup_rows
                if r["dataset"] == "photos" and r["image"] and _min_side(r["image"]) >= 448 and r["key"] not in first}
    assert 0 < len(eligible) < 30
    mix = root / "mix.toml"
    _cli("select", "--input", out / "dedup", "--stage", 2, "--config", mix, "--output", out / "select2", "--num-shards", 3)
    data = read_table(str(out / "select2")).to_pylist()
    assert len(data) == 30
    originals = {r["key"] for r in data if r["replica"] is None}
    assert originals == eligible and not originals & first  # disjoint
    base, extra = divmod(30, len(eligible))
    copies = Counter(r["key"] if r["replica"] is None else r["key"].rsplit("-r", 1)[0] for r in data)
    assert sorted(copies.values()) == sorted([base] * (len(eligible) - extra) + [base + 1] * extra)
    mixture = json.loads((out / "select2" / "mixture.json").read_text())
    assert mixture["replicas"] == 30 - len(eligible)
    assert mixture["earlier"]["overlap"] == 0
    ledger = read_table(str(out / "select2"), "ledger").to_pylist()
    by_reason = Counter(r["reason"] for r in ledger)
    assert by_reason[reasons.IN_EARLIER_SELECTION] == len(first)
    assert by_reason["ok"] == 30
    # every non-photo, never-selected record is not eligible (no image size), or outside the weights
    assert mixture["rules"]["in_earlier_selection"] == len(first)
    assert cli.main(["verify", str(out / "select2"), str(out / "select1"), str(out / "dedup")]) == 0


def test_stage2_overlap_allowed_is_measured(run):
    root, out = run["root"], run["out"]
    if not (out / "select1").exists():
        test_stage1_mixture_exact_and_rerun_identical(run)
    mix = root / "mix_allow.toml"
    mix.write_text(MIX_TOML.format(earlier=out / "select1", overlap="allow").replace(
        'on_short = "upsample"', 'on_short = "upsample"\nmin_side = false'))
    _cli("select", "--input", out / "dedup", "--stage", 2, "--config", mix, "--output", out / "select2a", "--num-shards", 3)
    first = {r["key"] for r in read_table(str(out / "select1"), columns=["key"]).to_pylist()}
    second = {r["key"] for r in read_table(str(out / "select2a")).to_pylist() if r["replica"] is None}
    mixture = json.loads((out / "select2a" / "mixture.json").read_text())
    assert mixture["earlier"]["overlap"] == len(first & second)
    photos = {r["key"] for r in read_table(str(out / "dedup"), columns=["key", "dataset"]).to_pylist()
              if r["dataset"] == "photos"}
    assert second == photos and len(first & second) == 10  # every photo; the 10 drawn at stage 1 again


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[select]\ntarget_pairs = 10\n[select.weights]\ncc3m = 0.5\nlaion = 0.4\n", "weights"),
        ("[select]\ntarget_pairs = 10\n[select.weights]\ncc3m = 0.5\nwukong = 0.5\n", "wukong"),
        ("[select]\ntarget_pairs = 100000\n", "target_pairs"),
        ("[select]\ntarget_pairs = 10\non_short = \"pad\"\n", "on_short"),
        ("[select]\ntarget_pairs = 10\nweigths = 1\n", "weigths"),
    ],
)
def test_bad_configs_exit_2_naming_the_key(run, tmp_path, capsys, toml, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    code = cli.main(["select", "--input", str(run["out"] / "dedup"), "--stage", "1", "--config", str(cfg),
                     "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_two_axes_and_text_rich_share_by_raking():
    """Sources × languages: a pool where only some cells exist still meets both marginals."""
    cfg = SelectConfig(stage=3, target_pairs=100, weights=(("a", 0.5), ("b", 0.5)),
                       languages=(("en", 0.6), ("zh", 0.4)), text_rich_share=0.1)
    pool = {("a", "en", False): 500, ("a", "zh", False): 40, ("b", "en", False): 90, ("b", "zh", False): 300,
            ("a", "en", True): 30, ("b", "zh", True): 30}
    t = cell_targets(cfg, pool)
    assert sum(t.values()) == 100
    for axis, want in ((0, {"a": 50, "b": 50}), (1, {"en": 60, "zh": 40}), (2, {True: 10, False: 90})):
        got = Counter()
        for c, n in t.items():
            got[c[axis]] += n
        assert all(abs(got[k] - v) <= 1 for k, v in want.items()), (axis, got)


def test_plan_threshold_takes_exact_remainder():
    cfg = SelectConfig(stage=1, target_pairs=7)
    hist = {(("a", "und", False), b): 3 for b in range(5)}  # 15 records over 5 buckets
    plan = make_plan(cfg, hist)[("a", "und", False)]
    assert (plan.target, plan.base, plan.cut, plan.need) == (7, 0, 2, 1)


def test_inspect_and_stats_break_counts_down_by_dataset(run, capsys):
    from pipelines import inspection, stats

    out = run["out"]
    ds = {r["key"]: r["dataset"] for r in read_table(str(out / "filter"), columns=["key", "dataset"]).to_pylist()}
    want: dict[str, Counter] = {}
    for r in read_table(str(out / "dedup"), "ledger", columns=["key", "status"]).to_pylist():
        want.setdefault(ds[r["key"]], Counter())[r["status"]] += 1
    want = {k: dict(v) for k, v in want.items()}
    assert inspection.describe(str(out / "dedup"))["by_dataset"] == want
    assert want["laion"]["duplicate"] >= PLANTED
    capsys.readouterr()
    assert stats.main([str(out / "dedup"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_dataset"] == {"dedup": want}


def test_dedup_names_stage_inputs(run):
    """`dedup --input NAME=DIR` over unnamed single-source outputs: keys prefixed, dataset set."""
    root, out = run["root"], run["out"]
    if not (out / "single_cc3m").exists():
        _cli("filter", "--input", root / "cc3m", "--caption-col", 0, "--url-col", 1, "--output", out / "single_cc3m")
    if not (out / "single_photos").exists():
        _cli("filter", "--input", SAMPLE / "i2d_webdataset", "--output", out / "single_photos")
    _cli("dedup", "--input", f"en={out / 'single_cc3m'}", "--input", f"img={out / 'single_photos'}",
         "--output", out / "dedup_named")
    ledger = read_table(str(out / "dedup_named"), "ledger", columns=["key"]).to_pylist()
    want = ({f"en-{r['key']}" for r in read_table(str(out / "single_cc3m"), columns=["key"]).to_pylist()}
            | {f"img-{r['key']}" for r in read_table(str(out / "single_photos"), columns=["key"]).to_pylist()})
    assert sorted(r["key"] for r in ledger) == sorted(want)
    data = read_table(str(out / "dedup_named"), columns=["key", "dataset"]).to_pylist()
    assert all(r["dataset"] == r["key"].split("-", 1)[0] for r in data)
    assert cli.main(["verify", str(out / "dedup_named")]) == 0
    # several inputs must all be named
    assert cli.main(["dedup", "--input", str(out / "single_cc3m"), "--input", str(out / "single_photos"),
                     "--output", str(out / "x")]) == 2


def test_bundled_mix_configs_parse():
    """data/mix/*.toml (the docs' worked example) stay valid configs."""
    import tomllib

    from transforms.selection import load_select_config
    from transforms.sources import source_settings

    doc = tomllib.loads((REPO / "data" / "mix" / "mix.toml").read_text())
    cfgs = [load_select_config(doc, s) for s in (1, 2, 3)]
    assert [c.target_pairs for c in cfgs] == [3000, 3000, 1000]
    assert [c.earlier for c in cfgs] == [None, "build/mix/select1", "build/mix/select2"]
    assert [c.on_short for c in cfgs] == ["report", "report", "upsample"]
    src = tomllib.loads((REPO / "data" / "mix" / "sources.toml").read_text())
    assert sorted(source_settings(src, ["cc3m", "laion", "photos"])) == ["cc3m", "laion"]


def test_select_byte_identical_on_the_dask_runner(run):
    """The same selection under `--runner dask` (a local 2-worker cluster) writes the same bytes."""
    root, out = run["root"], run["out"]
    if not (out / "select1").exists():
        test_stage1_mixture_exact_and_rerun_identical(run)
    _cli("select", "--input", out / "dedup", "--stage", 1, "--config", root / "mix.toml", "--output", out / "select1_dask",
         "--num-shards", 3, "--runner", "dask", "--dask-workers", 2)
    assert _files_sha(out / "select1") == _files_sha(out / "select1_dask")


def test_combined_input_info_sizes_shards_from_every_source():
    from pipelines.runner import resolve_num_shards
    from transforms.sources import combined_input_info

    infos = [("a", {"kind": "stage", "fingerprint": "f1", "records": 10, "bytes": 300}),
             ("b", {"kind": "raw", "fingerprint": "f2", "records": 5, "files": [{"path": "x", "bytes": 200}]})]
    info = combined_input_info(infos)
    assert (info["bytes"], info["records"], sorted(info["sources"])) == (500, 15, ["a", "b"])
    assert resolve_num_shards(None, 100, info) == 5
    assert combined_input_info(infos[:1]) != combined_input_info([(None, infos[0][1])])  # named ≠ unnamed
    assert combined_input_info([(None, infos[0][1])]) == infos[0][1]  # unnamed single input: unchanged
