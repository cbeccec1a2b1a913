"""Bilingual bench: filter loss on curated English and Chinese captions, language-ID accuracy with
a confusion report, Chinese near-duplicate recall/false merges next to English, and filter
throughput with language ID on vs off in the same run.

    .venv/bin/python -m bench.bilingual            # all sections, Markdown on stdout
    .venv/bin/python -m bench.bilingual --only lid dedup

``section()`` returns the whole Markdown section (for bench/run_all.py). Data: data/sample's CC3M
(8,000 English captions) and COCO-CN (2,000 Chinese captions, MIT; data/sample/ATTRIBUTION.md).
"""

from __future__ import annotations

import argparse
import collections
import csv
import pathlib
import random
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
COMMAND = ".venv/bin/python -m bench.bilingual"


def english_captions() -> list[str]:
    with open(SAMPLE / "cc3m_val_captions_8k.tsv", newline="", encoding="utf-8") as f:
        return [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def chinese_captions() -> list[str]:
    with open(SAMPLE / "coco_cn_captions_2k.tsv", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if "\t" in line]


# --- filter loss ----------------------------------------------------------------------------------
def filter_loss() -> str:
    """Share of curated captions the default caption filter chain rejects, by reason."""
    from schemas.records import Pair
    from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
    from transforms.filter_base import run_filters

    cfg = CaptionFilterConfig()
    chain, flagger = caption_filters(cfg), CaptionQualityFlagger(cfg)
    lines = ["| set | captions | rejected | loss | limit | reasons | flagged for rewrite |", "|---|---|---|---|---|---|---|"]
    for name, caps, limit in (("CC3M (en)", english_captions(), 1.5), ("COCO-CN (zh)", chinese_captions(), 2.0)):
        rej, flags = collections.Counter(), collections.Counter()
        for c in caps:
            p, reason, _ = run_filters(Pair(key="k", caption=c), chain)
            if reason:
                rej[reason] += 1
            else:
                flags.update(flagger(p) or ["(none)"])
        n = sum(rej.values())
        flagged = len(caps) - n - flags.get("(none)", 0)
        lines.append(
            f"| {name} | {len(caps):,} | {n} | {100 * n / len(caps):.2f}% | ≤ {limit}% | "
            + (", ".join(f"{k} {v}" for k, v in rej.most_common()) or "-")
            + f" | {flagged} ({100 * flagged / len(caps):.1f}%): "
            + ", ".join(f"{k} {v}" for k, v in flags.most_common() if k != "(none)") + " |"
        )
    return "\n".join(lines)


# --- language ID ----------------------------------------------------------------------------------
MIXED_TOKENS = ("iPhone", "NBA", "LOGO", "T恤", "KTV", "DIY", "3D", "USB", "WiFi", "SUV", "MacBook", "PPT")


def lid_sets(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """(caption, expected language) sets: full captions, short ones (< 6 characters) and mixed ones.

    Short English: single words of 3–5 letters drawn from CC3M captions; short Chinese: the first 2–5
    characters of COCO-CN captions. Mixed: a Latin brand/acronym inserted into a Chinese caption
    (still ``zh``), and a Chinese place name inserted into an English caption (still ``en``).
    """
    rng = random.Random(seed)
    en, zh = english_captions(), chinese_captions()
    words = sorted({w for c in en for w in c.split() if w.isalpha() and 3 <= len(w) <= 5})
    places = ("故宫", "长城", "西湖", "外滩", "黄山", "天坛")
    mixed = []
    for c in rng.sample(zh, 300):
        i = rng.randrange(len(c))
        mixed.append((c[:i] + rng.choice(MIXED_TOKENS) + c[i:], "zh"))
    for c in rng.sample(en, 300):
        toks = c.split()
        i = rng.randrange(len(toks) + 1)
        mixed.append((" ".join(toks[:i] + [rng.choice(places)] + toks[i:]), "en"))
    return {
        "en (CC3M)": [(c, "en") for c in en],
        "zh (COCO-CN)": [(c, "zh") for c in zh],
        "short en (< 6 chars)": [(w, "en") for w in rng.sample(words, 300)],
        "short zh (< 6 chars)": [(c[: rng.randint(2, 5)], "zh") for c in rng.sample(zh, 300)],
        "mixed zh+Latin / en+Han": mixed,
    }


def lid_accuracy() -> str:
    from transforms import lang as lg

    lines = ["| set | captions | accuracy | confusion (detected: count) |", "|---|---|---|---|"]
    for name, items in lid_sets().items():
        got = collections.Counter()
        right = 0
        for text, want in items:
            lang = lg.detect(text).lang
            right += lang == want
            if lang != want:
                got[lang] += 1
        lines.append(f"| {name} | {len(items):,} | {100 * right / len(items):.2f}% | "
                     + (", ".join(f"{k}: {v}" for k, v in got.most_common(8)) or "-") + " |")
    return "\n".join(lines)


# --- Chinese near-duplicates ----------------------------------------------------------------------
EDITS = ("punctuation", "width", "credit_suffix", "drop_char", "insert_space")
CREDITS = ("，图片来源：视觉中国", " 千图网", "_昵图网", " 摄图网 高清壁纸", "（图片来源：摄图网）", " 素材中国 免费下载")


def plant_edit(text: str, kind: str, rng: random.Random) -> str:
    """One light edit of a Chinese caption (the issue's list)."""
    if kind == "punctuation":
        i = rng.randrange(1, len(text))
        return text[:i] + rng.choice("，。、；！") + text[i:] if rng.random() < 0.5 else text.rstrip("。") + rng.choice("。！…")
    if kind == "width":
        table = {"，": ",", "。": ".", "！": "!", "、": ",", "：": ":"}
        out = "".join(table.get(ch, chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch) for ch in text)
        return out if out != text else text + "!"
    if kind == "credit_suffix":
        return text + rng.choice(CREDITS)
    if kind == "drop_char":
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1 :]
    if kind == "insert_space":
        i = rng.randrange(1, len(text))
        return text[:i] + " " + text[i:]
    raise ValueError(kind)


def zh_dedup_set(seed: int = 0, n_edited: int = 1000):
    rng = random.Random(seed)
    originals = list(dict.fromkeys(chinese_captions()))  # exact repeats of one text are one family
    caps, family, kinds = list(originals), list(range(len(originals))), [""] * len(originals)
    for i in rng.sample(range(len(originals)), n_edited):
        kind = EDITS[len(caps) % len(EDITS)]
        caps.append(plant_edit(originals[i], kind, rng))
        family.append(i)
        kinds.append(kind)
    # Traditional script: the same captions converted with OpenCC s2t (reported separately).
    import opencc

    s2t = opencc.OpenCC("s2t")
    for i in rng.sample(range(len(originals)), 200):
        caps.append(s2t.convert(originals[i]))
        family.append(i)
        kinds.append("traditional")
    return caps, family, kinds


def _exact_jaccard(a: str, b: str, kind: str, n: int) -> float:
    from transforms import minhash as mh

    x = set(mh.shingles(mh.normalize_caption(a), kind, n))
    y = set(mh.shingles(mh.normalize_caption(b), kind, n))
    return len(x & y) / max(1, len(x | y))


def dedup_quality() -> str:
    from bench.dedup_quality import build_eval_set, components, found_edges
    from transforms.dedup import DedupConfig

    cfg = DedupConfig(exact_image=False, near_image_max_hamming=None)
    t = cfg.near_caption_threshold
    rows = ["| set | captions | planted variants | recall (variant in its original's cluster) | merged pairs (edges) | false merges (J < t − 0.1) | cross-family edges |",
            "|---|---|---|---|---|---|---|"]
    per_kind = []
    with tempfile.TemporaryDirectory() as tmp:
        zh_caps, zh_family, zh_kinds = zh_dedup_set()
        en_caps, en_family, en_depth = build_eval_set()
        en_kinds = ["edit" if d else "" for d in en_depth]
        for name, caps, family, kinds in (("zh (COCO-CN + planted edits)", zh_caps, zh_family, zh_kinds),
                                          ("en (bench.dedup_quality set)", en_caps, en_family, en_kinds)):
            edges = found_edges(caps, cfg, tempfile.mkdtemp(dir=tmp))
            comp = components(len(caps), edges)
            variants = [i for i in range(len(caps)) if kinds[i]]
            caught = [comp[i] == comp[family[i]] for i in variants]
            false = sum(1 for a, b in edges if _exact_jaccard(caps[a], caps[b], cfg.shingle, cfg.ngram) < t - 0.1)
            cross = sum(1 for a, b in edges if family[a] != family[b])
            rows.append(f"| {name} | {len(caps):,} | {len(variants):,} | {sum(caught) / len(variants):.4f} | {len(edges):,} | "
                        f"{false} ({100 * false / max(1, len(edges)):.2f}%) | {cross} |")
            if name.startswith("zh"):
                by = collections.defaultdict(list)
                for i, ok in zip(variants, caught):
                    by[kinds[i]].append(ok)
                per_kind = [f"{k} {sum(v) / len(v):.3f} ({len(v)})" for k, v in by.items()]
    return "\n".join(rows) + "\n\nChinese recall by edit: " + ", ".join(per_kind) + (
        f"\n\nDedup config: defaults (`{cfg.shingle}:{cfg.ngram}`, CJK text as character "
        f"{__import__('transforms.minhash', fromlist=['x']).cjk_ngram(cfg.ngram)}-grams, threshold {t}).")


# --- throughput -----------------------------------------------------------------------------------
def throughput(n: int = 20_000, repeats: int = 5) -> str:
    """Caption filter chain + flags, pairs/s, language ID off vs on, interleaved in one run.

    Pairs/s are per second of this process's CPU time (``time.process_time``): on a shared, loaded
    machine wall time mostly measures the neighbours; the best of ``repeats`` interleaved runs is kept.
    """
    from schemas.records import Pair
    from transforms import lang as lg
    from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
    from transforms.filter_base import run_filters
    from transforms.image_filters import ImageFilterConfig, image_filters

    rng = random.Random(1)
    caps = english_captions() + chinese_captions()
    # Distinct captions so the per-caption caches do not hide the cost of the first look.
    pairs = [Pair(key=str(i), caption=rng.choice(caps) + f" {i}") for i in range(n)]
    results = collections.defaultdict(list)
    for _ in range(repeats):
        for name, on in (("off", False), ("on", True)):
            lg.detect.cache_clear()
            cfg = CaptionFilterConfig(detect_language=on)
            chain = caption_filters(cfg) + image_filters(ImageFilterConfig(require_image=False))
            flagger = CaptionQualityFlagger(cfg)
            t0 = time.process_time()
            for p in pairs:
                p2, reason, _ = run_filters(p, chain)
                if reason is None:
                    flagger(p2)
            results[name].append(n / (time.process_time() - t0))
    off, on = max(results["off"]), max(results["on"])
    return (f"| language ID | pairs per CPU-second (best of {repeats}, {n:,} en+zh captions) |\n|---|---|\n"
            f"| off | {off:,.0f} |\n| on | {on:,.0f} |\n\nRatio on/off: **{on / off:.3f}** (requirement ≥ 0.8).")


def stage_throughput(n: int = 10_000, repeats: int = 2) -> str:
    """The whole `mmcorpus filter` stage (DirectRunner, one worker, in this process) on the same n
    en+zh captions, language ID off vs on (``[filter.caption] detect_language``), interleaved: pairs
    per CPU-second of this process (``time.process_time``; wall time on a shared machine mostly
    measures the neighbours)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import filter as filter_stage

    os.environ["MMCORPUS_PROGRESS"] = "0"
    rng = random.Random(2)
    caps = english_captions() + chinese_captions()
    res = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        table = pathlib.Path(tmp) / "captions.parquet"
        pq.write_table(pa.table({"url": [f"http://img.example/{i}.jpg" for i in range(n)],
                                 "caption": [rng.choice(caps) for _ in range(n)]}), table)
        for on in (False, True):
            (pathlib.Path(tmp) / f"{on}.toml").write_text(f"[filter.caption]\ndetect_language = {str(on).lower()}\n")
        for _ in range(repeats):
            for on in (False, True):
                args, beam_args = filter_stage.parser().parse_known_args(
                    ["--input", str(table), "--output", str(pathlib.Path(tmp) / f"out_{on}"), "--force",
                     "--config", str(pathlib.Path(tmp) / f"{on}.toml"), "--direct_num_workers", "1"])
                t0 = time.process_time()
                filter_stage.run(args, beam_args)
                res[on].append(n / (time.process_time() - t0))
    off, on = max(res[False]), max(res[True])
    return (f"| language ID | filter stage pairs per CPU-second (best of {repeats}, {n:,} en+zh captions) |\n|---|---|\n"
            f"| off | {off:,.0f} |\n| on | {on:,.0f} |\n\nRatio on/off: **{on / off:.3f}** (requirement ≥ 0.8).")


# Published tokens per character of production tokenizers (see docs/bilingual.md for the sources).
PUBLISHED = (
    ("Llama-3 (128K vocab), English", 1 / 3.94, "The Llama 3 Herd of Models (Dubey et al. 2024), model architecture: 3.94 chars/token on English"),
    ("Llama-3, Simplified Chinese (cc100-zh-Hans)", 1 / 1.24, "Tokenizer Arena (xu-song/tokenizer-arena README): 1.24 chars/token"),
    ("Llama (32K vocab), Simplified Chinese", 1 / 0.70, "Tokenizer Arena: 0.70 chars/token"),
)


def tokenizer_rates() -> str:
    """Tokens per character of the bundled tokenizer on the sample captions (which it was trained
    on) and on Chinese captions it never saw, next to published figures of production tokenizers."""
    from transforms.tokens import TextTokenizer

    tok = TextTokenizer()
    en, zh = english_captions(), chinese_captions()
    unseen_zh = ["公园里有一只黑色的狗在草地上奔跑", "两个小孩在海边堆沙堡", "一位老人坐在长椅上看报纸",
                 "厨房的桌子上放着一碗新鲜的水果", "雪山脚下有一片蓝色的湖泊"]

    def rate(caps):
        return sum(len(tok.encode(c)) for c in caps) / sum(len(c) for c in caps)

    rows = ["| text | tokens / char | source |", "|---|---|---|",
            f"| CC3M English captions (bundled tokenizer, vocab {len(tok._tok.get_vocab()) if tok._tok else '?'}) | {rate(en):.3f} | measured |",
            f"| COCO-CN Chinese captions (bundled tokenizer) | {rate(zh):.3f} | measured (in training data) |",
            f"| Chinese captions written for the test, unseen | {rate(unseen_zh):.3f} | measured |"]
    rows += [f"| {name} | {value:.3f} | {src} |" for name, value, src in PUBLISHED]
    return "\n".join(rows)


SECTIONS = {"filter": ("Filter loss on curated captions", filter_loss), "lid": ("Language ID accuracy", lid_accuracy),
            "tokens": ("Tokens per character, en vs zh", tokenizer_rates),
            "dedup": ("Near-duplicates: Chinese next to English", dedup_quality),
            "throughput": ("Caption rules alone (no Beam), language ID on vs off", throughput),
            "stage": ("Filter stage throughput, language ID on vs off", stage_throughput)}


TITLE = "Bilingual (en + zh): filter loss, language ID, tokens per character, Chinese dedup, throughput"


def section(quick: bool = False, only: list[str] | None = None) -> str:
    """The bench's Markdown (sub-headings, tables, the command that made them); ``quick`` measures
    throughput on fewer captions with fewer repeats."""
    parts = [f"`{COMMAND}` (docs/bilingual.md explains every number)", ""]
    for key, (title, fn) in SECTIONS.items():
        if only and key not in only:
            continue
        t0 = time.perf_counter()
        if quick and key == "throughput":
            body = fn(n=5_000, repeats=2)
        elif quick and key == "stage":
            body = fn(n=2_000, repeats=1)
        else:
            body = fn()
        parts += [f"### {title}", "", body, "", f"_({time.perf_counter() - t0:.1f} s)_", ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="throughput on fewer captions")
    args = ap.parse_args(argv)
    print(f"## {TITLE}\n\n" + section(args.quick, args.only), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
