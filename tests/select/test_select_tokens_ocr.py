"""`mmcorpus select` with a token budget (`target_tokens`, the pack stage's accounting) and stage 3's
text-rich share on real OCR output.

Oracles the selection code does not compute: every record's token count is read off a real `mmcorpus
pack` run over the same input (`cu_seqlens` per sample key, best-fit packing so nothing is
truncated); per-cell targets and the hash-ordered prefix are recomputed here in a few plain lines
(sha256 of `salt NUL key`); `text_rich` comes from the OCR stage's own `ocr` column (real RapidOCR on
the bundled photos and `mmcorpus synthdoc` pages); the text-rich split is worked out by hand below."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from pipelines import cli
from transforms.stage_io import read_manifest, read_table

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
N_CC3M = 200

SOURCES = '[sources.cc3m]\ncaption_col = "0"\nurl_col = "1"\nlicense = "cc3m-terms"\n'
MIX = """
[select]
target_tokens = 2000
[select.weights]
cc3m = 0.6
photos = 0.4

[select.stage3]
target_tokens = 9000
on_short = "upsample"
[select.stage3.weights]
photos = 1.0
"""


def _cli(*argv) -> None:
    assert cli.main([str(a) for a in argv]) == 0


def _h(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{key}".encode()).digest()[:8], "big")


def _pack_tokens(pack_dir: pathlib.Path) -> dict[str, int]:
    """key -> tokens, read off a pack output's packs (cu_seqlens differences per sample key)."""
    out = {}
    for f in sorted((pack_dir / "data").glob("*.parquet")):
        t = pq.read_table(f, columns=["sample_keys", "cu_seqlens", "truncated_tokens"]).to_pylist()
        for row in t:
            assert row["truncated_tokens"] == 0
            cu = row["cu_seqlens"]
            for i, k in enumerate(row["sample_keys"]):
                out[k] = cu[i + 1] - cu[i]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seltok")
    lines = (SAMPLE / "cc3m_val_captions_8k.tsv").read_text(encoding="utf-8").splitlines()[:N_CC3M]
    (root / "cc3m.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "sources.toml").write_text(SOURCES)
    (root / "mix.toml").write_text(MIX)
    out = root / "out"
    _cli("filter", "--input", f"cc3m={root / 'cc3m.tsv'}", "--input", f"photos={SAMPLE / 'i2d_webdataset'}",
         "--config", root / "sources.toml", "--output", out / "filter")
    tokens = {}
    for stage in (1, 3):  # the oracle: the real pack stage's count of every input record
        _cli("pack", "--input", out / "filter", "--output", out / f"pack_in{stage}", "--stage", stage,
             "--seq-len", 4096, "--algorithm", "best_fit", "--partitions", 1)
        tokens[stage] = _pack_tokens(out / f"pack_in{stage}")
    rows = read_table(str(out / "filter"), columns=["key", "dataset", "lang"]).to_pylist()
    assert len(tokens[1]) == len(rows)  # pack took every record
    return {"root": root, "out": out, "rows": rows, "tokens": tokens}


def _largest_remainder(total: int, raw: dict) -> dict:
    out = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), str(k)))[: total - sum(out.values())]:
        out[k] += 1
    return out


def _expected(rows, tokens, weights: dict[str, float], target: int, salt: str) -> tuple[dict, dict]:
    """(key -> copies, cell -> target tokens) by the documented rule, computed without the code under test."""
    cells: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        cells[(r["dataset"], r["lang"] or "und", False)].append(r["key"])
    pool = {c: sum(tokens[k] for k in ks) for c, ks in cells.items()}
    by_ds = Counter()
    for c, p in pool.items():
        by_ds[c[0]] += p
    ds_target = _largest_remainder(target, {d: target * w for d, w in weights.items()})
    raw = {c: ds_target.get(c[0], 0) * pool[c] / by_ds[c[0]] for c in sorted(cells)}
    cell_target = _largest_remainder(target, raw)
    copies = {}
    for c, keys in cells.items():
        base, rem = divmod(cell_target[c], pool[c])
        cum, taken = 0, set()
        for k in sorted(keys, key=lambda k: (_h(salt, k), k)):  # closest prefix to rem, shorter on a tie
            if cum >= rem or abs(cum + tokens[k] - rem) >= abs(cum - rem):
                break
            cum += tokens[k]
            taken.add(k)
        for k in keys:
            copies[k] = base + (k in taken)
    return copies, cell_target


def _copies_in(out: pathlib.Path) -> Counter:
    data = read_table(str(out), columns=["key", "replica"]).to_pylist()
    return Counter(r["key"].rsplit("-r", 1)[0] if r["replica"] else r["key"] for r in data)


def test_stage1_token_budget_matches_the_pack_accounting(run):
    root, out, tokens = run["root"], run["out"], run["tokens"][1]
    _cli("select", "--input", out / "filter", "--stage", 1, "--config", root / "mix.toml", "--output", out / "sel1",
         "--num-shards", 2)
    want, cell_target = _expected(run["rows"], tokens, {"cc3m": 0.6, "photos": 0.4}, 2000, "stage1")
    got = _copies_in(out / "sel1")
    assert got == Counter({k: n for k, n in want.items() if n})
    mix = json.loads((out / "sel1" / "mixture.json").read_text())
    want_ds = Counter()
    for k, n in want.items():
        want_ds[k.split("-", 1)[0]] += n * tokens[k]
    assert mix["unit"] == "tokens" and mix["target_tokens"] == 2000
    assert {d: (r["target_tokens"], r["achieved_tokens"]) for d, r in mix["by_dataset"].items()} == {
        "cc3m": (1200, want_ds["cc3m"]), "photos": (800, want_ds["photos"])}
    assert mix["selected_tokens"] == sum(want_ds.values()) and mix["selected"] == sum(want.values())
    # the stated tolerance: every cell within half of its largest record's tokens of its target
    for c in mix["cells"]:
        cell = (c["dataset"], c["lang"], c["text_rich"])
        biggest = max(tokens[r["key"]] for r in run["rows"] if (r["dataset"], r["lang"] or "und", False) == cell)
        assert c["target"] == cell_target[cell]
        assert abs(c["achieved_tokens"] - c["target"]) <= biggest / 2
    # packing the selection at stage 1 counts exactly the tokens the selection reported
    _cli("pack", "--input", out / "sel1", "--output", out / "pack1", "--stage", 1, "--seq-len", 4096,
         "--algorithm", "best_fit", "--partitions", 1)
    x = read_manifest(str(out / "pack1")).extra
    assert x["pack_tokens"] + x["truncated_tokens"] == mix["selected_tokens"]
    ledger = Counter(r["reason"] for r in read_table(str(out / "sel1"), "ledger", columns=["reason"]).to_pylist())
    assert ledger == {"ok": mix["selected"], "not_selected": len(run["rows"]) - mix["selected"]}


def test_inspect_renders_a_token_mixture(run, capsys):
    out = run["out"]
    if not (out / "sel1" / "manifest.json").exists():
        test_stage1_token_budget_matches_the_pack_accounting(run)
    mix = json.loads((out / "sel1" / "mixture.json").read_text())
    capsys.readouterr()
    assert cli.main(["inspect", str(out / "sel1")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (f"{mix['selected']:,} pairs, {mix['selected_tokens']:,} tokens selected of 2,000 tokens, 0 replicas, "
            f"shortfall {mix['shortfall_tokens']:,} tokens") in text


def test_stage3_token_budget_upsamples_with_sliced_images(run):
    root, out, tokens = run["root"], run["out"], run["tokens"][3]
    _cli("select", "--input", out / "filter", "--stage", 3, "--config", root / "mix.toml", "--output", out / "sel3",
         "--num-shards", 2)
    want, _ = _expected(run["rows"], tokens, {"photos": 1.0}, 9000, "stage3")
    got = _copies_in(out / "sel3")
    assert got == Counter({k: n for k, n in want.items() if n})
    assert max(got.values()) == 2 and all(k.startswith("photos-") for k in got)  # the photos' pool is < 9000
    mix = json.loads((out / "sel3" / "mixture.json").read_text())
    achieved = sum(n * tokens[k] for k, n in want.items())
    assert mix["selected_tokens"] == achieved and mix["replicas"] == sum(n - 1 for n in got.values())
    assert mix["by_dataset"]["photos"]["target_tokens"] == 9000 and mix["by_dataset"]["cc3m"]["achieved_tokens"] == 0
    _cli("pack", "--input", out / "sel3", "--output", out / "pack3", "--stage", 3, "--seq-len", 4096,
         "--algorithm", "best_fit", "--partitions", 1)
    x = read_manifest(str(out / "pack3")).extra
    assert x["pack_tokens"] + x["truncated_tokens"] == achieved


# --- stage 3's text-rich share on real OCR output -------------------------------------------------


@pytest.fixture(scope="module")
def ocr_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("selocr")
    _cli("filter", "--input", f"photos={SAMPLE / 'i2d_webdataset'}", "--output", root / "filter")
    _cli("synthdoc", "--output", root / "docs", "--n", 4, "--lang", "en,zh", "--seed", 3)
    _cli("ocr", "--input", f"photos={root / 'filter'}", "--input", f"docs={root / 'docs'}", "--output", root / "ocr", "--no-safety")
    return root


def test_stage3_text_rich_share_reads_the_ocr_stage_output(ocr_run, tmp_path):
    root = ocr_run
    rows = read_table(str(root / "ocr"), columns=["key", "dataset", "lang", "ocr"]).to_pylist()
    rich = {r["key"]: json.loads(r["ocr"])["text_rich"] for r in rows}
    cells = Counter((r["dataset"], r["lang"] or "und", rich[r["key"]]) for r in rows)
    # what RapidOCR found: every synthdoc page and the two photos of signs are text-rich
    assert cells == {("docs", "und", True): 4, ("photos", "en", True): 2, ("photos", "en", False): 12,
                     ("photos", "nn", False): 1, ("photos", "la", False): 1}
    cfg = tmp_path / "mix.toml"
    cfg.write_text("[select]\ntarget_pairs = 5\n[select.stage3]\ntext_rich_share = 0.6\n")
    _cli("select", "--input", root / "ocr", "--stage", 3, "--config", cfg, "--output", tmp_path / "sel")
    # by hand: 5 x 0.6 = 3 text-rich, split over the pools 4 : 2 -> 2 docs, 1 photo; 2 not text-rich
    # over 12 : 1 : 1 -> 1.71, 0.14, 0.14 -> largest remainder: 2 photos/en, 0, 0
    by_hash = {c: sorted((k for k in rich if (k.split("-", 1)[0], next(r["lang"] or "und" for r in rows if r["key"] == k),
                                              rich[k]) == c), key=lambda k: (_h("stage3", k), k)) for c in cells}
    want = set(by_hash[("docs", "und", True)][:2] + by_hash[("photos", "en", True)][:1]
               + by_hash[("photos", "en", False)][:2])
    got = {r["key"] for r in read_table(str(tmp_path / "sel"), columns=["key"]).to_pylist()}
    assert got == want
    mix = json.loads((tmp_path / "sel" / "mixture.json").read_text())
    assert {v: (r["pool"], r["target"], r["achieved"]) for v, r in mix["by_text_rich"].items()} == {
        "true": (6, 3, 3), "false": (14, 2, 2)}


def test_text_rich_share_without_ocr_output_exits_2(ocr_run, tmp_path, capsys):
    cfg = tmp_path / "mix.toml"
    cfg.write_text("[select]\ntarget_pairs = 5\ntext_rich_share = 0.5\n")
    code = cli.main(["select", "--input", str(ocr_run / "filter"), "--stage", "3", "--config", str(cfg),
                     "--output", str(tmp_path / "o")])
    assert code == 2
    assert (f"mmcorpus select: error: {cfg} text_rich_share: 0.5 needs the OCR stage's output, and no --input comes "
            "from `mmcorpus ocr`; run `mmcorpus ocr --input DIR --output OCR_DIR` and select from OCR_DIR "
            "(or set text_rich_share = 0)") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
