"""Issue 10, "dedup semantics a user can trust": the 18-photo case (every bundled photo resized many
times, each copy with its own real CC3M caption, captions bridging photos) keeps exactly 18 under
the default config and collapses under ``legacy-transitive``; the caption cap; the keep policy."""

from __future__ import annotations

import hashlib
import io

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from bench.dedup_photos import BOILERPLATE, photo_pairs, truth
from pipelines import dedup
from schemas.records import Pair
from tests.dedup.stage_fixture import write_pairs
from transforms.dedup import DedupConfig, Deduplicate, parse_detail
from transforms.stage_io import read_manifest, read_table

COPIES = 12  # 216 pairs; the bridging needs only copies 0..5 of every photo


@pytest.fixture(scope="module")
def photo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    pairs = photo_pairs(copies=COPIES)
    inp = write_pairs(str(root / "in"), pairs, num_shards=3)
    legacy = root / "legacy.toml"
    legacy.write_text('[dedup]\nmode = "legacy-transitive"\n')
    out = {"default": str(root / "default"), "legacy": str(root / "legacy")}
    assert dedup.main(["--input", inp, "--output", out["default"]]) == 0
    assert dedup.main(["--input", inp, "--output", out["legacy"], "--config", str(legacy)]) == 0
    return pairs, out


def _ledger(out):
    return {r["key"]: r for r in read_table(out, "ledger").to_pylist()}


def test_the_fixture_bridges_every_photo():
    pairs = photo_pairs(copies=6)
    photos_of = {}
    for p in pairs:
        photos_of.setdefault(" ".join(p.caption.lower().split()), set()).add(truth(p))
    shared = [sorted(v) for v in photos_of.values() if len(v) > 1]
    # photo i shares an exact caption with photo i+1 for every i, and one boilerplate caption with all
    assert sorted(shared) == sorted([[i, i + 1] for i in range(17)] + [list(range(18))])
    assert len({p.caption for p in pairs}) == len(pairs) - 17 - 17  # otherwise every copy has its own caption


def test_default_config_keeps_exactly_the_18_photos(photo_runs):
    pairs, out = photo_runs
    ledger = _ledger(out["default"])
    assert len(ledger) == len(pairs) == 18 * COPIES
    kept = [k for k, r in ledger.items() if r["status"] == "kept"]
    assert len(kept) == 18
    by_key = {p.key: p for p in pairs}
    assert sorted(truth(by_key[k]) for k in kept) == list(range(18))

    # boilerplate: 18 records carry it, the first 10 by key order stay in the pass
    boiler = sorted(p.key for p in pairs if p.caption == BOILERPLATE)
    over = sorted(k for k, r in ledger.items() if r["reason"] == "caption_overused")
    assert over == boiler[10:]
    for k in over:
        assert ledger[k]["status"] == "duplicate" and ledger[k]["kept_key"] == boiler[0]
        assert ledger[k]["detail"] == f"link=caption-overused pairs=18 max=10 kept={boiler[0]}"

    # keep policy per photo: a caption that needs no rewrite, then more pixels, then key order
    for photo in range(18):
        cands = [p for p in pairs if truth(p) == photo and p.key not in over]
        best = min(cands, key=lambda p: (p.needs_rewrite, -(p.width * p.height), p.key))
        assert ledger[best.key]["status"] == "kept", photo
        for p in cands:
            if p.key == best.key:
                continue
            row = ledger[p.key]
            d = parse_detail(row["detail"])
            assert (row["status"], row["kept_key"], d["kept"], d["round"]) == ("duplicate", best.key, best.key, "0")
            assert row["cluster_id"] == ledger[best.key]["cluster_id"]
            if p.image_sha256 == best.image_sha256:
                assert (row["reason"], d["link"], d["hamming"]) == ("exact-image", "exact-image", "0")
            else:
                assert row["reason"] == d["link"] == "near-image" and 0 <= int(d["hamming"]) <= 8
    m = read_manifest(out["default"])
    assert m.counts["by_status"] == {"kept": 18, "duplicate": 18 * COPIES - 18, "rejected": 0, "error": 0}
    assert set(m.extra["dedup"]["candidate_edges"]) == {"exact-image", "near-image"}  # no caption edges
    assert m.extra["dedup"]["caption_overused"] == 8


def test_legacy_transitive_collapses_the_photos(photo_runs):
    pairs, out = photo_runs
    ledger = _ledger(out["legacy"])
    kept = [k for k, r in ledger.items() if r["status"] == "kept"]
    assert len(kept) == 1  # caption links bridge all 18 photos into one transitive cluster
    assert {r["kept_key"] for r in ledger.values()} == set(kept)


def _jpeg(sample_dir, i: int, scale: float = 1.0) -> tuple[bytes, int, int]:
    path = sorted((sample_dir / "cc_images").glob("*.jpg"))[i]
    with Image.open(path) as im:
        im = im.convert("RGB")
        if scale != 1.0:
            im = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue(), im.width, im.height


def _pair(key, caption, img, **kw) -> Pair:
    data, w, h = img
    return Pair(key=key, caption=caption, image=data, image_format="JPEG", width=w, height=h,
                image_sha256=hashlib.sha256(data).hexdigest(), source=f"t#{key}", **kw)


def test_caption_cap_keeps_the_first_k_by_key_order(sample_dir):
    # 5 different photos captioned "Image" (keys out of order), 2 caption-only records with it too
    pairs = [_pair(k, "Image", _jpeg(sample_dir, i)) for i, k in enumerate(["p4", "p2", "p5", "p1", "p3"])]
    pairs += [Pair(key="t1", caption="image", source="t#t1"), Pair(key="t2", caption="IMAGE!", source="t#t2")]
    detail = "link=caption-overused pairs=5 max=2 kept=p1"
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig(max_pairs_per_caption=2))
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.detail, o.extra.get("kept_key"))),
            equal_to([
                ("p1", "kept", "ok", "", None), ("p2", "kept", "ok", "", None),
                ("p3", "duplicate", "caption_overused", detail, "p1"),
                ("p4", "duplicate", "caption_overused", detail, "p1"),
                ("p5", "duplicate", "caption_overused", detail, "p1"),
                # the caption-only pass keeps caption semantics; the cap counts records with images
                ("t1", "kept", "ok", "", "t1"),
                ("t2", "duplicate", "exact-caption", "link=exact-caption jaccard=1.0 kept=t1 round=0", "t1"),
            ]),
        )


def test_caption_cap_off_and_near_captions_on_different_images(sample_dir):
    pairs = [_pair(f"p{i}", "Image", _jpeg(sample_dir, i)) for i in range(5)]
    # near-duplicate captions on two different photos: not duplicates in a pass with images
    pairs += [_pair("q1", "a red car parked on the street at night", _jpeg(sample_dir, 6)),
              _pair("q2", "a red car parked on a street at night", _jpeg(sample_dir, 7))]
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig(max_pairs_per_caption=None))
        assert_that(outcomes | beam.Map(lambda o: (o.key, o.status)),
                    equal_to([(p.key, "kept") for p in pairs]))


def test_keep_policy_prefers_a_caption_that_needs_no_rewrite(sample_dir):
    big, small = _jpeg(sample_dir, 8), _jpeg(sample_dir, 8, scale=0.5)
    pairs = [
        _pair("a-big", "photo", big, needs_rewrite=True, quality_flags=["caption_too_short_words"]),
        _pair("b-small", "a quiet harbour at dawn", small),
        _pair("c-small", "another quiet harbour at dawn", small),  # same bytes as b-small: key order
    ]
    with TestPipeline() as p:
        outcomes, _ = p | beam.Create(pairs) | Deduplicate(DedupConfig())
        assert_that(
            outcomes | beam.Map(lambda o: (o.key, o.status, o.reason, o.extra.get("kept_key"))),
            equal_to([("a-big", "duplicate", "near-image", "b-small"), ("b-small", "kept", "ok", "b-small"),
                      ("c-small", "duplicate", "exact-image", "b-small")]),
        )


def test_strict_config_keys_and_validation(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[dedup]\nmax_pairs_per_caption = false\nmax_split_rounds = 2\nmax_hamming_to_kept = 6\n')
    c = DedupConfig.from_toml(str(cfg))
    assert (c.mode, c.max_pairs_per_caption, c.max_split_rounds, c.max_hamming_to_kept) == ("strict", None, 2, 6)
    for bad in (dict(mode="transitive"), dict(max_pairs_per_caption=0), dict(max_split_rounds=0),
                dict(max_hamming_to_kept=3), dict(max_hamming_to_kept=40), dict(min_jaccard_to_kept=0.0)):
        with pytest.raises(ValueError):
            DedupConfig(**bad)
