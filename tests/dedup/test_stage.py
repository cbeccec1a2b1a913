"""The dedup stage end to end on the DirectRunner: planted groups (exact caption, exact image, near
image, a near-caption chain c1~c2~...~c8 whose ends are not similar, one caption on two different
photos), singletons, the keep policy, the ledger invariant, byte-identical reruns, the
multi-processing runner, and the same input under ``mode = "legacy-transitive"``."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines import cli, dedup
from schemas.records import Pair
from tests.dedup.stage_fixture import write_pairs
from transforms import minhash as mh
from transforms.dedup import DedupConfig, Deduplicate, parse_detail
from transforms.stage_io import read_manifest, read_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = (
    "an old wooden fishing boat rests on the pebble beach beside weathered blue nets while gulls "
    "circle above the quiet harbour town under heavy grey clouds before the evening storm arrives"
).split()
# Same-length replacements at spread-out positions: each chain step changes one word.
REPLACE = [(2, "timber"), (8, "gravel"), (15, "crows"), (21, "city"), (28, "morning"), (11, "tarnished"), (25, "vapour")]


def _chain() -> list[str]:
    words = list(BASE)
    out = [" ".join(words)]
    for pos, word in REPLACE:
        assert len(words[pos]) == len(word) and words[pos] != word
        words[pos] = word
        out.append(" ".join(words))
    return out


def _img(sample_dir, i: int, half: bool = False) -> tuple[bytes, int, int]:
    path = sorted((sample_dir / "cc_images").glob("*.jpg"))[i]
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if not half:
            return data, im.width, im.height
        small = im.convert("RGB").resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
        return buf.getvalue(), small.width, small.height


def _with_image(key, caption, img) -> Pair:
    data, w, h = img
    return Pair(key=key, caption=caption, image=data, image_format="JPEG", width=w, height=h,
                image_sha256=hashlib.sha256(data).hexdigest(), source=f"t#{key}")


def planted_pairs(sample_dir) -> tuple[list[Pair], dict[str, tuple]]:
    """The planted records and the strict-mode expectation (key → status, reason, kept_key)."""
    chain = _chain()
    pairs = [
        # exact image: same bytes, unrelated captions; e2's caption is more informative
        _with_image("e1", "lighthouse", _img(sample_dir, 0)),
        _with_image("e2", "tall striped lighthouse on rocky cliffs", _img(sample_dir, 0)),
        # near image: the same photo at half size; resolution beats the smaller key
        _with_image("n0-small", "my holiday snapshot", _img(sample_dir, 1, half=True)),
        _with_image("n1-big", "a picture i took last summer", _img(sample_dir, 1)),
        # exact caption after normalisation; all ties -> smallest key
        Pair(key="x1", caption="A red car parked on the street at night", source="t#x1"),
        Pair(key="x2", caption="a red car, parked on the street at NIGHT!!", source="t#x2"),
        Pair(key="x3", caption="A  red car parked on the street at night.", source="t#x3"),
        # image beats caption-only and beats the smaller key
        Pair(key="k0", caption="Vintage typewriter on an oak desk", source="t#k0"),
        _with_image("k9", "vintage typewriter on an oak desk", _img(sample_dir, 2)),
        # more informative caption (one more distinct word) beats the smaller key
        Pair(key="m1", caption=" ".join(BASE[:20]).replace("fishing", "sailing"), source="t#m1"),
        Pair(key="m2", caption=" ".join(BASE[:20]).replace("fishing", "sailing") + " tonight", source="t#m2"),
    ]
    pairs += [Pair(key=f"c{i + 1}", caption=c, source=f"t#c{i + 1}") for i, c in enumerate(chain)]
    singles = [
        "a man rides a bicycle through a crowded market",
        "two children build a sandcastle near the water",
        "snow covered mountains reflected in a calm alpine lake",
        "close up of a ripe strawberry on a white plate",
        "",  # empty caption: no shingles, stays a singleton
    ]
    pairs += [Pair(key=f"s{i}", caption=c, source=f"t#s{i}") for i, c in enumerate(singles)]
    pairs.append(_with_image("s-img", "city skyline at dusk", _img(sample_dir, 3)))
    # one caption on two different photos (d1's is 640x480, d2's 678x452: d1 has more pixels)
    pairs += [_with_image("d1", "A view of the old city from the river", _img(sample_dir, 4)),
              _with_image("d2", "a view of the old city from the river", _img(sample_dir, 5))]
    return pairs, STRICT_EXPECTED


# Default (strict) mode. Image clusters keep the first key when resolution ties (e1, not the more
# informative caption of e2); a caption never ties a record with an image to another record (k0/k9,
# d1/d2 all kept); caption-only records keep caption semantics (x*, m*, the chain). The chain is
# split: c1 is kept; c2..c5 (exact Jaccard to c1 0.89, 0.80, 0.73, 0.66) are its duplicates; c6
# (0.61, at the 0.6 bar: its 128-slot estimate falls below it), c7 (0.53) and c8 (0.47) are not
# within the bar of c1, so the second round keeps c6 and puts c7 (0.89 to c6) and c8 (0.80) with it.
STRICT_EXPECTED = {
    "e1": ("kept", "ok", "e1"), "e2": ("duplicate", "exact-image", "e1"),
    "n0-small": ("duplicate", "near-image", "n1-big"), "n1-big": ("kept", "ok", "n1-big"),
    "x1": ("kept", "ok", "x1"), "x2": ("duplicate", "exact-caption", "x1"),
    "x3": ("duplicate", "exact-caption", "x1"),
    "k0": ("kept", "ok", None), "k9": ("kept", "ok", None),
    "m1": ("duplicate", "near-caption", "m2"), "m2": ("kept", "ok", "m2"),
    "c1": ("kept", "ok", "c1"),
    **{f"c{i}": ("duplicate", "near-caption", "c1") for i in range(2, 6)},
    "c6": ("kept", "ok", "c6"), "c7": ("duplicate", "near-caption", "c6"), "c8": ("duplicate", "near-caption", "c6"),
    **{f"s{i}": ("kept", "ok", None) for i in range(5)}, "s-img": ("kept", "ok", None),
    "d1": ("kept", "ok", None), "d2": ("kept", "ok", None),
}

# mode = "legacy-transitive": the first wave's behaviour, unchanged (one closure over every rule).
LEGACY_EXPECTED = {
        "e1": ("duplicate", "exact-image", "e2"), "e2": ("kept", "ok", "e2"),
        "n0-small": ("duplicate", "near-image", "n1-big"), "n1-big": ("kept", "ok", "n1-big"),
        "x1": ("kept", "ok", "x1"), "x2": ("duplicate", "exact-caption", "x1"),
        "x3": ("duplicate", "exact-caption", "x1"),
        "k0": ("duplicate", "exact-caption", "k9"), "k9": ("kept", "ok", "k9"),
        "m1": ("duplicate", "near-caption", "m2"), "m2": ("kept", "ok", "m2"),
        "c1": ("kept", "ok", "c1"),
        **{f"c{i}": ("duplicate", "near-caption", "c1") for i in range(2, 9)},
        **{f"s{i}": ("kept", "ok", None) for i in range(5)}, "s-img": ("kept", "ok", None),
        "d1": ("kept", "ok", "d1"), "d2": ("duplicate", "exact-caption", "d1"),
}


def _jaccard(a: str, b: str) -> float:
    cfg = DedupConfig()
    sa = set(mh.shingles(mh.normalize_caption(a), cfg.shingle, cfg.ngram))
    sb = set(mh.shingles(mh.normalize_caption(b), cfg.shingle, cfg.ngram))
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("dedup")
    pairs, expected = planted_pairs(sample_dir)
    inp = write_pairs(str(root / "in"), pairs)
    legacy_cfg = root / "legacy.toml"
    legacy_cfg.write_text('[dedup]\nmode = "legacy-transitive"\n')
    out = {}
    for name, extra in (
        ("a", []),
        ("b", []),
        ("mp", ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
        ("legacy", ["--config", str(legacy_cfg)]),
    ):
        out[name] = str(root / name)
        assert dedup.main(["--input", inp, "--output", out[name], "--num-shards", "3"] + extra) == 0
    return pairs, expected, inp, out


def test_chain_ends_are_not_similar():
    chain = _chain()
    for a, b in zip(chain, chain[1:]):
        assert _jaccard(a, b) >= 0.8
    assert _jaccard(chain[0], chain[-1]) <= 0.5  # below threshold - 0.1 (0.6): not similar
    assert [round(_jaccard(chain[0], c), 2) for c in chain] == [1.0, 0.89, 0.8, 0.73, 0.66, 0.61, 0.53, 0.47]


def test_planted_groups_singletons_and_keep_policy(runs):
    pairs, expected, _, out = runs
    ledger = read_table(out["a"], "ledger").to_pylist()
    got = {r["key"]: (r["status"], r["reason"], r["kept_key"]) for r in ledger}
    assert got == expected
    by_key = {r["key"]: r for r in ledger}
    # one cluster id per planted group, distinct across groups; none on singletons
    groups = [("e1", "e2"), ("n0-small", "n1-big"), ("x1", "x2", "x3"), ("m1", "m2"),
              ("c1", "c2", "c3", "c4", "c5"), ("c6", "c7", "c8")]
    ids = []
    for g in groups:
        cids = {by_key[k]["cluster_id"] for k in g}
        assert len(cids) == 1 and None not in cids
        ids.append(cids.pop())
    assert len(set(ids)) == len(groups)
    assert all(by_key[k]["cluster_id"] is None for k in by_key if k[0] in "skd")
    # the detail names the link to the kept record and its distance, in a parseable form
    assert parse_detail(by_key["e2"]["detail"]) == {"link": "exact-image", "hamming": "0", "kept": "e1", "round": "0"}
    d = parse_detail(by_key["n0-small"]["detail"])
    assert (d["link"], d["kept"], d["round"]) == ("near-image", "n1-big", "0") and 0 <= int(d["hamming"]) <= 8
    assert parse_detail(by_key["x3"]["detail"]) == {"link": "exact-caption", "jaccard": "1.0", "kept": "x1", "round": "0"}
    chain = dict(zip([f"c{i}" for i in range(1, 9)], _chain()))
    for k in ("c2", "c3", "c4", "c5", "c7", "c8"):
        d = parse_detail(by_key[k]["detail"])
        assert set(d) == {"link", "jaccard", "kept", "round"} and d["link"] == "near-caption"
        assert d["round"] == ("0" if d["kept"] == "c1" else "1")
        # the estimate is within 0.1 of the exact Jaccard to the kept record, which is >= 0.6
        exact = _jaccard(chain[k], chain[d["kept"]])
        assert exact >= 0.6 and abs(float(d["jaccard"]) - exact) <= 0.1, (k, d, exact)


def test_legacy_transitive_mode_keeps_the_old_behaviour(runs):
    pairs, _, _, out = runs
    ledger = read_table(out["legacy"], "ledger").to_pylist()
    got = {r["key"]: (r["status"], r["reason"], r["kept_key"]) for r in ledger}
    assert got == LEGACY_EXPECTED
    by_key = {r["key"]: r for r in ledger}
    assert by_key["c8"]["detail"] == "cluster of 8, kept c1; linked by near-caption"
    m = read_manifest(out["legacy"])
    assert m.config["dedup"]["mode"] == "legacy-transitive" and m.extra["dedup"]["mode"] == "legacy-transitive"
    assert "representative_rounds" not in m.extra["dedup"]


def test_kept_records_unchanged_except_cluster_fields(runs):
    pairs, expected, _, out = runs
    data = {p.key: p for p in (Pair.from_row(r) for r in read_table(out["a"]).to_pylist())}
    assert set(data) == {k for k, v in expected.items() if v[0] == "kept"}
    sizes = {"e1": 2, "n1-big": 2, "x1": 3, "m2": 2, "c1": 5, "c6": 3}
    for p in pairs:
        if p.key not in data:
            continue
        size = sizes.get(p.key)
        want = p.replace(cluster_id=data[p.key].cluster_id, cluster_size=size) if size else p
        assert data[p.key] == want
        assert (data[p.key].cluster_id is None) == (size is None)


def test_ledger_invariant_and_manifest(runs):
    pairs, expected, _, out = runs
    m = read_manifest(out["a"])
    assert m.counts["inputs"] == m.counts["ledger_rows"] == len(pairs)
    assert m.counts["outputs"] == read_table(out["a"]).num_rows == 16
    assert m.counts["by_reason"] == {
        "duplicate/exact-caption": 2, "duplicate/exact-image": 1, "duplicate/near-caption": 7,
        "duplicate/near-image": 1, "kept/ok": 16,
    }
    keys = [r["key"] for r in read_table(out["a"], "ledger").to_pylist()]
    assert sorted(keys) == sorted(p.key for p in pairs)
    rep = m.extra["dedup"]
    assert rep["components"]["converged"] is True and 1 <= rep["components"]["rounds"] < rep["components"]["max_rounds"]
    assert (rep["lsh_bands"], rep["lsh_rows"]) == DedupConfig().lsh_params()
    assert m.config["dedup"]["near_caption_threshold"] == 0.7
    assert rep["mode"] == m.config["dedup"]["mode"] == "strict"
    # round 0: 5 representatives + 9 members within their bar; round 1: c6 with c7, c8
    assert rep["representative_rounds"] == {
        "max_split_rounds": 4, "members_per_round": [14, 3, 0, 0], "kept_unassigned_after_last_round": 0,
    }
    assert rep["caption_overused"] == 0


def test_rerun_and_multiprocessing_are_byte_identical(runs):
    _, _, _, out = runs
    out = {k: v for k, v in out.items() if k != "legacy"}
    files = {name: [(f.path, f.sha256) for f in read_manifest(d).files] for name, d in out.items()}
    assert files["a"] == files["b"] == files["mp"]
    for name in ("b", "mp"):
        for rel, _ in files["a"]:
            with open(os.path.join(out["a"], rel), "rb") as fa, open(os.path.join(out[name], rel), "rb") as fb:
                assert fa.read() == fb.read()
    ma, mmp = read_manifest(out["a"]), read_manifest(out["mp"])
    assert ma.extra == mmp.extra and ma.counts == mmp.counts


def test_rules_switched_off_by_config(runs, tmp_path):
    _, _, inp, _ = runs
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[dedup]\nexact_image = false\nnear_caption_threshold = 0.95\n")
    out = str(tmp_path / "o")
    assert dedup.main(["--input", inp, "--output", out, "--config", str(cfg)]) == 0
    got = {r["key"]: (r["status"], r["reason"]) for r in read_table(out, "ledger").to_pylist()}
    # exact image off: e1/e2 stay (same bytes: dHash distance 0, found by the near-image rule)
    assert got["e2"] == ("duplicate", "near-image")
    # at 0.95 the chain steps (J ~ 0.9) are no longer near duplicates
    assert all(got[f"c{i}"] == ("kept", "ok") for i in range(1, 9))
    assert got["x2"] == ("duplicate", "exact-caption")


def test_bad_config_is_a_user_error(runs, tmp_path, capsys):
    _, _, inp, _ = runs
    bad = tmp_path / "bad.toml"
    bad.write_text("[dedup]\nthreshold = 0.7\n")
    assert cli.main(["dedup", "--input", inp, "--output", str(tmp_path / "o"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown keys in [dedup]: ['threshold']" in err and str(bad) in err
    bad.write_text("[dedup]\nnear_caption_threshold = 2.0\n")
    assert cli.main(["dedup", "--input", inp, "--output", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert cli.main(["dedup", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "not a finished mmcorpus stage output" in capsys.readouterr().err


def test_runs_as_a_file_with_underscore_flags(runs, tmp_path):
    _, _, inp, out = runs
    o = str(tmp_path / "file-run")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "pipelines", "dedup.py"), f"--input={inp}", f"--output={o}", "--num_shards=3"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [f.sha256 for f in read_manifest(o).files] == [f.sha256 for f in read_manifest(out["a"]).files]


def test_feature_errors_become_error_outcomes():
    good = [Pair(key="g1", caption="same caption here"), Pair(key="g2", caption="Same caption, here!")]
    bad = Pair(key="bad", caption=12345)  # not a str: normalisation raises AttributeError
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(good + [bad]) | Deduplicate(DedupConfig())
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.extra.get("kept_key"))),
            equal_to([("bad", "error", "exception_AttributeError", None), ("g1", "kept", "ok", "g1"),
                      ("g2", "duplicate", "exact-caption", "g1")]),
        )


def test_flat_images_are_not_near_image_duplicates():
    def png(color, size):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, "PNG")
        data = buf.getvalue()
        return data, size[0], size[1]

    pairs = [_with_image("w1", "summer sale banner", png("white", (64, 64))),
             _with_image("w2", "blank placeholder", png((250, 250, 250), (80, 60)))]
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig())
        assert_that(outcomes | beam.Map(lambda o: (o.key, o.status)), equal_to([("w1", "kept"), ("w2", "kept")]))
