"""`mmcorpus inspect`, `stats --plot`, `verify` and `--key` on a real run of the stages over the
bundled photos (img2dataset parquet layout), checked against independent pyarrow/PIL reads."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import inspection, stats, verify
from schemas.manifest import MANIFEST_NAME

from .conftest import DUPLICATE_OF, FAILED_ROWS


def _json_main(module, argv, capsys) -> dict:
    capsys.readouterr()
    assert module.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _ledger(stage_dir) -> list[dict]:
    rows = []
    for f in sorted((stage_dir / "ledger").glob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def test_inspect_counts_match_the_ledger(demo_run, capsys):
    filter_dir = demo_run["filter"]
    info = _json_main(inspection, [str(filter_dir)], capsys)["describe"]
    ledger = _ledger(filter_dir)
    assert info["stage"] == "filter"
    assert info["counts"]["inputs"] == len(ledger) == 18 + 1 + len(FAILED_ROWS)
    by_status = {s: sum(r["status"] == s for r in ledger) for s in ("kept", "rejected", "duplicate", "error")}
    assert info["counts"]["by_status"] == by_status
    reasons = {(r["status"], r["reason"]): r["count"] for r in info["reasons"]}
    assert reasons[("error", "download_failed")] == len(FAILED_ROWS)
    assert sum(reasons.values()) == len(ledger)
    data_rows = sum(pq.read_metadata(f).num_rows for f in (filter_dir / "data").glob("*.parquet"))
    assert info["files"]["data"]["rows"] == data_rows == by_status["kept"]
    assert info["files"]["ledger"]["rows"] == len(ledger)
    assert info["invariants"] == {"inputs_eq_ledger_rows": True, "kept_eq_outputs": True}
    manifest = json.loads((filter_dir / MANIFEST_NAME).read_text())
    assert info["config_hash"] == manifest["config_hash"]


def test_inspect_table_names_reasons_and_counts(demo_run, capsys):
    capsys.readouterr()
    assert inspection.main([str(demo_run["filter"])]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "download_failed" in ln)
    assert "error" in line and f" {len(FAILED_ROWS)} " in line
    assert "config hash" in out and "invariants" in out and "ok" in out


def test_inspect_run_lists_every_stage_in_order(demo_run, capsys):
    run = _json_main(inspection, [str(demo_run["root"])], capsys)["run"]
    assert [s["stage"] for s in run["stages"]] == ["filter", "dedup", "rewrite", "pack"]
    for s in run["stages"]:
        m = json.loads((demo_run[s["stage"]] / MANIFEST_NAME).read_text())
        assert (s["inputs"], s["outputs"]) == (m["counts"]["inputs"], m["counts"]["outputs"])


def test_inspect_pack_summary(demo_run, capsys):
    pack_dir = demo_run["pack"]
    info = _json_main(inspection, [str(pack_dir)], capsys)["describe"]
    packs = info["packs"]
    shards = sorted((pack_dir / "data").glob("packs-*.parquet"))
    table = [r for f in shards for r in pq.read_table(f).to_pylist()]
    assert packs["shards"] == len(shards) and packs["packs"] == len(table)
    assert packs["samples"] == sum(r["num_samples"] for r in table)
    assert packs["tokens"] == sum(r["num_tokens"] for r in table)
    assert packs["token_fill"] == pytest.approx(sum(r["num_tokens"] for r in table) / sum(r["seq_len"] for r in table))
    assert packs["images_per_pack"]["max"] == max(len(r["images"]) for r in table)


def test_samples_decode_records_and_packs(demo_run, capsys):
    got = _json_main(inspection, [str(demo_run["rewrite"]), "--samples", "3"], capsys)["samples"]
    rows = sorted((r for f in (demo_run["rewrite"] / "data").glob("*.parquet") for r in pq.read_table(f).to_pylist()),
                  key=lambda r: r["key"])[:3]
    assert [s["key"] for s in got] == [r["key"] for r in rows]
    assert [s["caption"] for s in got] == [r["caption"] for r in rows]
    assert [s["qa"] for s in got] == [r["qa"] or [] for r in rows]

    packs = _json_main(inspection, [str(demo_run["pack"]), "--samples", "1"], capsys)["samples"]
    first = pq.read_table(sorted((demo_run["pack"] / "data").glob("packs-*.parquet"))[0]).to_pylist()[0]
    assert len(packs) == 1
    assert packs[0]["keys"] == first["sample_keys"]
    assert sum(packs[0]["sample_tokens"]) == packs[0]["tokens"] == first["num_tokens"]
    assert len(packs[0]["text"]) == first["num_samples"]
    # Image placeholder runs are collapsed, and only where the pack has images.
    collapsed = sum(t.count("<unk>×") for t in packs[0]["text"])
    assert collapsed >= len(first["images"]) and "<unk><unk>" not in "".join(packs[0]["text"])
    capsys.readouterr()
    assert inspection.main([str(demo_run["pack"]), "--samples", "1"]) == 0
    assert f"pack 0" in capsys.readouterr().out


def test_key_trace_follows_a_duplicate_and_a_failed_download(demo_run, capsys):
    dup = _json_main(inspection, [str(demo_run["pack"]), "--key", DUPLICATE_OF + "dup"], capsys)["trace"]
    steps = {s["stage"]: s for s in dup["steps"]}
    assert steps["filter"]["status"] == "kept"
    assert (steps["dedup"]["status"], steps["dedup"]["reason"], steps["dedup"]["kept_key"]) == (
        "duplicate", "exact-image", DUPLICATE_OF)
    assert steps["rewrite"]["status"] == steps["pack"]["status"] == "absent"
    assert dup["fate"] == "duplicate at dedup (exact-image)"

    failed = _json_main(inspection, [str(demo_run["root"]), "--key", FAILED_ROWS[0][0]], capsys)["trace"]
    assert [(s["stage"], s["status"], s["reason"]) for s in failed["steps"]] == [
        ("filter", "error", "download_failed"), ("dedup", "absent", ""), ("rewrite", "absent", ""), ("pack", "absent", "")]
    assert FAILED_ROWS[0][3] in failed["steps"][0]["detail"]

    capsys.readouterr()
    assert inspection.main([str(demo_run["root"]), "--key", "no-such-key", "--json"]) == 1
    unknown = json.loads(capsys.readouterr().out)["trace"]
    assert unknown["fate"] == "never seen" and {s["status"] for s in unknown["steps"]} == {"absent"}


def test_key_trace_locates_a_kept_sample_in_its_pack(demo_run, capsys, monkeypatch):
    trace = _json_main(inspection, [str(demo_run["dedup"]), "--key", DUPLICATE_OF], capsys)["trace"]
    steps = {s["stage"]: s for s in trace["steps"]}
    assert [steps[s]["status"] for s in ("filter", "dedup", "rewrite", "pack")] == ["kept"] * 4
    assert steps["dedup"]["cluster_size"] == 2
    where = steps["pack"]["pack"]
    row = pq.read_table(demo_run["pack"] / "data" / where["shard"]).to_pylist()[where["row"]]
    assert row["sample_keys"][where["position"]] == DUPLICATE_OF
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "200")  # one table line per stage
    assert inspection.main([str(demo_run["root"]), "--key", DUPLICATE_OF]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("│ pack"))
    assert f"{where['shard']} row {where['row']}, slot {where['position'] + 1} of " in line


def _cell_drawn_fraction(img: Image.Image, row: int, col: int) -> float:
    """Share of a grid cell's pixels that are not the figure background."""
    w, h = stats.PANEL_W_IN * stats.DPI, stats.PANEL_H_IN * stats.DPI
    box = (int(col * w), int(row * h), int((col + 1) * w), int((row + 1) * h))
    cell = img.convert("RGB").crop(box)
    face = tuple(int(stats.FIG_FACE[i:i + 2], 16) for i in (1, 3, 5))
    background = sum(n for n, rgb in cell.getcolors(maxcolors=1 << 20) if rgb == face)
    return 1 - background / (cell.width * cell.height)


@pytest.mark.parametrize(
    "target, panels",
    [
        ("root", ["caption_words", "languages", "ledger_reasons", "cluster_sizes", "tokens_per_sample", "fill_per_pack",
                  "images_per_pack"]),
        ("filter", ["caption_words", "languages", "ledger_reasons"]),
        ("dedup", ["caption_words", "languages", "ledger_reasons", "cluster_sizes"]),
    ],
)
def test_stats_plot_has_one_panel_per_available_measure(demo_run, tmp_path, capsys, target, panels):
    out = tmp_path / f"{target}.png"
    result = _json_main(stats, [str(demo_run[target]), "--plot", str(out)], capsys)
    assert result["plot"]["panels"] == panels
    img = Image.open(out)
    img.load()
    assert img.format == "PNG"
    rows, cols = stats.panel_grid(len(panels))
    assert img.size == (int(cols * stats.PANEL_W_IN * stats.DPI), int(rows * stats.PANEL_H_IN * stats.DPI))
    assert json.loads(img.text["Description"])["panels"] == panels
    # Every drawn panel covers most of its grid cell; a spare cell stays figure background.
    for i in range(rows * cols):
        drawn = _cell_drawn_fraction(img, i // cols, i % cols)
        assert (drawn > 0.5) if i < len(panels) else (drawn < 0.01), (i, drawn)


def test_stats_numbers_match_the_outputs(demo_run, i2d_input, sample_dir, capsys):
    result = _json_main(stats, [str(demo_run["root"]), "--raw-input", str(i2d_input.parent)], capsys)["summary"]
    raw = [json.loads(ln)["caption"] for ln in (sample_dir / "cc_images" / "pairs.jsonl").read_text().splitlines()]
    raw_words = [len(c.split()) for c in raw] + [len(raw[0].split())]  # + the planted copy of the first photo
    assert result["caption_words"]["raw input (before filter)"] == {
        "n": len(raw_words), "min": min(raw_words), "mean": pytest.approx(sum(raw_words) / len(raw_words)), "max": max(raw_words)}
    kept = [r["caption"] for f in (demo_run["filter"] / "data").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert result["caption_words"]["after filter"]["n"] == len(kept)
    assert result["caption_words"]["after filter"]["max"] == max(len(c.split()) for c in kept)
    assert result["ledger_reasons"]["filter: download_failed"] == len(FAILED_ROWS)
    assert result["ledger_reasons"]["dedup: exact-image"] >= 1
    assert result["cluster_sizes"]["max"] == 2
    packs = [r for f in (demo_run["pack"] / "data").glob("packs-*.parquet") for r in pq.read_table(f).to_pylist()]
    assert result["fill_per_pack"]["n"] == len(packs)
    assert result["tokens_per_sample"]["n"] == sum(r["num_samples"] for r in packs)


def test_verify_passes_on_the_run_and_catches_a_corrupt_copy(demo_run, tmp_path, capsys):
    dirs = [str(demo_run[s]) for s in ("filter", "dedup", "rewrite", "pack")]
    report = _json_main(verify, dirs, capsys)
    assert all(report[d]["ok"] for d in dirs)
    broken = tmp_path / "dedup"
    shutil.copytree(demo_run["dedup"], broken)
    ledger = sorted((broken / "ledger").glob("*.parquet"))[0]
    data = bytearray(ledger.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ledger.write_bytes(bytes(data))
    capsys.readouterr()
    assert verify.main([str(broken), "--json"]) == 1
    checks = {c["name"]: c["ok"] for c in json.loads(capsys.readouterr().out)[str(broken)]["checks"]}
    assert checks["files match checksums"] is False


def test_inspect_refuses_a_directory_that_is_no_output(tmp_path):
    from schemas.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json and no stage outputs"):
        inspection.main([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="does not exist"):
        stats.main([str(tmp_path / "missing"), "--plot", str(tmp_path / "x.png")])


def test_inspect_and_trace_webdataset_packs(demo_run, tmp_path, capsys):
    from pipelines import pack

    wds = tmp_path / "pack"
    assert pack.main(["--input", str(demo_run["rewrite"]), "--output", str(wds), "--stage", "2", "--seq-len", "512",
                      "--format", "webdataset", "--num-shards", "2"]) == 0
    parquet_info = _json_main(inspection, [str(demo_run["pack"])], capsys)["describe"]["packs"]
    wds_info = _json_main(inspection, [str(wds)], capsys)["describe"]["packs"]
    for k in ("packs", "samples", "tokens", "token_fill", "images_per_pack", "tokens_per_sample"):
        assert wds_info[k] == parquet_info[k], k
    # Cross-check against the tars read by the independent webdataset package.
    import webdataset as wds_lib

    tars = sorted(str(p) for p in (wds / "data").glob("*.tar"))
    samples = list(wds_lib.WebDataset(tars, shardshuffle=False).decode())
    assert len(samples) == wds_info["packs"]
    assert sum(len(s["json"]["sample_keys"]) for s in samples) == wds_info["samples"]
    where = inspection.trace_key(str(wds), DUPLICATE_OF)["steps"][-1]["pack"]
    hit = [s for s in samples if DUPLICATE_OF in s["json"]["sample_keys"]]
    assert len(hit) == 1 and where["shard"] == hit[0]["__url__"].rsplit("/", 1)[-1]
    assert hit[0]["json"]["sample_keys"][where["position"]] == DUPLICATE_OF
