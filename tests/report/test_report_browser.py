"""`mmcorpus report` opened in a real headless Chromium: thumbnails per section, links, console
errors, hostile captions as literal text, clusters, rewrites and packs checked against independent
pyarrow reads of the run's ledgers and shards."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from .browser import dump_dom, screenshot
from .conftest import HOSTILE_CAPTION, HOSTILE_CAPTION_2, HOSTILE_KEY, HOSTILE_KEY_2, SAMPLES

pytestmark = pytest.mark.timeout(600)

# Everything the tests read from the page, in one DOM query.
DOM_QUERY = r"""
(() => {
  const txt = e => e ? e.textContent : null;
  const card = c => ({key: txt(c.querySelector('a.key')), href: c.querySelector('a.key').getAttribute('href'),
                      caption: txt(c.querySelector('.caption')), img: !!c.querySelector('img.thumb'),
                      none: !!c.querySelector('.thumb.none'), rep: c.classList.contains('rep'),
                      link: txt(c.querySelector('.link')) || ''});
  const stages = [...document.querySelectorAll('section.stage')].map(s => ({
    label: s.querySelector('h3').firstChild.textContent.trim(),
    kind: [...s.classList].find(c => c.startsWith('kind-')),
    groups: [...s.querySelectorAll('div.group')].map(g => ({
      title: txt(g.querySelector('h5 .reason')), cards: [...g.querySelectorAll('figure.card')].map(card)})),
    clusters: [...s.querySelectorAll('div.cluster')].map(cl => [...cl.querySelectorAll('figure.card')].map(card)),
    rewrite: [...s.querySelectorAll('table.rewrite tbody tr')].map(tr => ({
      key: txt(tr.querySelector('a.key')), img: !!tr.querySelector('img.thumb'),
      cells: [...tr.children].map(td => td.textContent)})),
    packs: [...s.querySelectorAll('div.pack')].map(p => ({
      id: txt(p.querySelector('.phead code')), head: txt(p.querySelector('.phead')),
      image_segs: p.querySelectorAll('.pseg.image').length, pad: p.querySelectorAll('.pseg.pad').length,
      samples: [...p.querySelectorAll('ol.psamples li')].map(li => li.textContent.trim().split(' ')[0]),
      imgs: p.querySelectorAll('.pimages img.thumb').length})),
  }));
  return {
    stages,
    links: [...document.querySelectorAll('a[href], img[src], link[href]')].map(e => e.getAttribute('href') || e.getAttribute('src')),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    scripts: document.querySelectorAll('script').length,
    handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
    img_x: document.querySelectorAll('img[src="x"]').length,
    broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
    thumbs: document.querySelectorAll('img.thumb').length,
    traces: [...document.querySelectorAll('div.trace')].map(t => ({id: t.id, key: txt(t.querySelector('h3 code')),
                                                                  text: t.textContent})),
  };
})()
"""


def _ledger(stage_dir: pathlib.Path) -> list[dict]:
    rows = []
    for f in sorted((stage_dir / "ledger").glob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def _data(stage_dir: pathlib.Path) -> dict[str, dict]:
    out = {}
    for f in sorted((stage_dir / "data").glob("*.parquet")):
        for r in pq.read_table(f, columns=["key", "caption", "raw_caption", "qa"]).to_pylist():
            out[r["key"]] = r
    return out


@pytest.fixture(scope="module")
def pages(report_run, browser):
    out = {}
    for name in ("index", "traces"):
        session, events = browser.open((report_run["report"] / f"{name}.html").as_uri(), height=16000)
        out[name] = {"dom": browser.evaluate(session, DOM_QUERY), "events": events}
    return out


def _stage(pages, label: str) -> dict:
    return next(s for s in pages["index"]["dom"]["stages"] if s["label"] == label)


def test_no_console_errors_no_dialogs_no_broken_images(pages):
    for name, page in pages.items():
        assert page["events"].console_errors == [], name
        assert page["events"].dialogs == [], name
        assert page["dom"]["broken"] == [], name
        assert page["dom"]["scripts"] == 0 and page["dom"]["handlers"] == 0 and page["dom"]["img_x"] == 0, name


def test_every_linked_file_and_anchor_exists(report_run, pages):
    ids = {name: set(p["dom"]["ids"]) for name, p in pages.items()}
    links = pages["index"]["dom"]["links"] + pages["traces"]["dom"]["links"]
    assert len(links) > 50
    for link in links:
        assert "://" not in link, link  # nothing from the network
        path, _, frag = link.partition("#")
        if path:
            assert (report_run["report"] / path).is_file(), link
        if frag:
            page = path.removesuffix(".html") if path else None
            assert frag in (ids[page] if page else ids["index"] | ids["traces"]), link


def test_sections_follow_the_manifests_in_pipeline_order(pages):
    labels = [s["label"] for s in pages["index"]["dom"]["stages"]]
    assert labels == ["filter", "dedup", "rewrite", "pack", "pack (pack-wds)"]


@pytest.mark.parametrize("stage", ["filter", "dedup", "rewrite", "pack", "pack-wds"])
def test_samples_per_reason_match_the_ledger(report_run, pages, stage):
    ledger = _ledger(report_run[stage])
    counts = Counter((r["status"], r["reason"]) for r in ledger)
    keys_of = {g: {r["key"] for r in ledger if (r["status"], r["reason"]) == g} for g in counts}
    label = "pack (pack-wds)" if stage == "pack-wds" else stage
    dom = _stage(pages, label)
    shown = {tuple(g["title"].split(" · ", 1)): g for g in dom["groups"]}
    assert set(shown) == set(counts)
    trace_ids = {t["id"]: t["key"] for t in pages["traces"]["dom"]["traces"]}
    for group, n in counts.items():
        cards = shown[group]["cards"]
        assert len(cards) == min(SAMPLES, n), group
        assert {c["key"] for c in cards} <= keys_of[group]
        assert len({c["key"] for c in cards}) == len(cards)
        # thumbnails: every record has an image except the failed downloads
        with_image = 0 if group == ("error", "download_failed") else len(cards)
        assert sum(c["img"] for c in cards) == with_image, group
        assert sum(c["none"] for c in cards) == len(cards) - with_image, group
        for c in cards:  # each key links to its own trace
            assert c["href"].startswith("traces.html#")
            assert trace_ids[c["href"].split("#", 1)[1]] == c["key"]


def test_thumbnail_total_and_files(report_run, pages):
    thumbs = sorted((report_run["report"] / "thumbs").glob("*.jpg"))
    assert thumbs
    for t in thumbs:
        with Image.open(t) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    srcs = {link for link in pages["index"]["dom"]["links"] if link.startswith("thumbs/")}
    assert srcs == {f"thumbs/{t.name}" for t in thumbs}  # no orphan files, no missing ones


def test_dedup_clusters_show_every_member_and_the_representative(report_run, pages):
    ledger = [r for r in _ledger(report_run["dedup"]) if r["status"] == "duplicate"]
    expected: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for r in ledger:
        c = expected.setdefault(r["cluster_id"], {"kept": r["kept_key"], "dups": {}})
        c["dups"][r["key"]] = r["reason"]
        details[r["key"]] = dict(p.split("=", 1) for p in (r["detail"] or "").split() if "=" in p)
    # exact-image x2 (one with the hostile caption), near-image (the other hostile caption); the
    # near-caption pair has different images, which strict dedup does not merge
    assert len(expected) == 3
    shown = _stage(pages, "dedup")["clusters"]
    assert len(shown) == len(expected)
    distances = 0
    for members in shown:
        reps = [m for m in members if m["rep"]]
        assert len(reps) == 1
        cid = next(cid for cid, c in expected.items() if c["kept"] == reps[0]["key"])
        assert {m["key"] for m in members} == {expected[cid]["kept"], *expected[cid]["dups"]}
        for m in members:
            assert m["img"]
            if not m["rep"]:
                assert m["link"].startswith(f"link {expected[cid]['dups'][m['key']]}"), m
                for metric in ("hamming", "jaccard"):  # the distance the ledger detail carries
                    if metric in details[m["key"]]:
                        assert f"{metric} {details[m['key']][metric]}" in m["link"], m
                        distances += 1
            else:
                assert "kept representative" in m["link"]
    assert distances >= 1  # the near-image member's Hamming distance is shown


def test_hostile_captions_are_literal_text(report_run, pages):
    cards = [c for s in pages["index"]["dom"]["stages"] for g in s["groups"] for c in g["cards"]]
    cards += [m for s in pages["index"]["dom"]["stages"] for cl in s["clusters"] for m in cl]
    hostile = [c for c in cards if c["key"] == HOSTILE_KEY]
    hostile2 = [c for c in cards if c["key"] == HOSTILE_KEY_2]
    assert hostile and hostile2
    assert {c["caption"] for c in hostile} == {HOSTILE_CAPTION}
    assert {c["caption"] for c in hostile2} == {HOSTILE_CAPTION_2}
    trace = next(t for t in pages["traces"]["dom"]["traces"] if t["key"] == HOSTILE_KEY)
    assert HOSTILE_CAPTION in trace["text"]
    html = (report_run["report"] / "index.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_rewrite_side_by_side(report_run, pages):
    data = _data(report_run["rewrite"])
    manifest = json.loads((report_run["rewrite"] / "manifest.json").read_text())
    kept_ok = sum(1 for r in _ledger(report_run["rewrite"]) if (r["status"], r["reason"]) == ("kept", "ok"))
    rows = _stage(pages, "rewrite")["rewrite"]
    assert len(rows) == min(SAMPLES, kept_ok)
    for row in rows:
        rec = data[row["key"]]
        _, raw, qa, adopted = row["cells"]
        assert row["img"]
        assert raw == rec["raw_caption"]
        assert adopted.startswith(rec["caption"])
        assert manifest["config"]["rewrite"]["model"] in adopted and manifest["config"]["rewrite"]["prompt_version"] in adopted
        for pair in rec["qa"]:
            assert pair["question"] in qa and pair["answer"] in qa


@pytest.mark.parametrize("stage", ["pack", "pack-wds"])
def test_pack_bars_match_the_shards(report_run, pages, stage):
    if stage == "pack":
        table = pq.read_table(next((report_run["pack"] / "data").glob("*.parquet")),
                              columns=["pack_id", "seq_len", "num_tokens", "sample_keys", "image_offset"])
        packs = {r["pack_id"]: r for r in table.to_pylist()}
    else:
        import webdataset as wds

        packs = {}
        for s in wds.WebDataset(str(next((report_run["pack-wds"] / "data").glob("*.tar"))), shardshuffle=False):
            meta = json.loads(s["json"])
            packs[meta["pack_id"]] = meta
    shown = _stage(pages, "pack (pack-wds)" if stage == "pack-wds" else "pack")["packs"]
    assert len(shown) == min(SAMPLES, len(packs))
    for p in shown:
        ref = packs[p["id"]]
        assert p["samples"] == ref["sample_keys"]
        assert p["image_segs"] == len(ref["image_offset"]) == p["imgs"]
        assert f"fill {100 * ref['num_tokens'] / ref['seq_len']:.1f}%" in p["head"]
        assert p["pad"] == (1 if ref["num_tokens"] < ref["seq_len"] else 0)


def test_screenshot_is_a_real_render(report_run, tmp_path):
    png = tmp_path / "shot.png"
    screenshot((report_run["report"] / "index.html").as_uri(), png, 1280, 2000)
    with Image.open(png) as im:
        assert im.size == (1280, 2000)
        colors = im.convert("RGB").resize((64, 64)).getcolors(64 * 64)
        assert colors is not None and len(colors) > 50  # text, bars, photos: not a blank page


def test_unknown_stage_gets_a_generic_section(report_run, tmp_path):
    from pipelines import report

    run = tmp_path / "run"
    shutil.copytree(report_run["run"] / "filter", run / "filter")
    shutil.copytree(report_run["run"] / "filter", run / "ocr")
    m = json.loads((run / "ocr" / "manifest.json").read_text())
    m["stage"] = "ocr"
    m["extra"] = {"ocr": {"engine": "<b>rapidocr</b>"}}
    (run / "ocr" / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "report"
    report.write_report(str(run), str(out), report.ReportConfig(samples=2))
    dom = dump_dom((out / "index.html").as_uri())
    sections = re.findall(r'<section class="stage kind-(\w+)" id="[^"]+">\s*<h3>(\w+)', dom)
    assert sections == [("filter", "filter"), ("other", "ocr")]
    ocr = dom[dom.index('class="stage kind-other"'):]
    groups = Counter((r["status"], r["reason"]) for r in _ledger(run / "ocr"))
    assert ocr.count('<div class="group"') == len(groups)
    assert "&lt;b&gt;rapidocr&lt;/b&gt;" in ocr  # the manifest extra, escaped
