"""``mmcorpus stats DIR [--plot out.png]``: the numbers behind a stage output or a whole run, and one
PNG with a histogram panel for each thing the directory actually holds.

Panels, in this fixed order, each present only when its data exists in DIR (a stage output, or a run
directory holding several):
    caption_words      caption length: raw input (with --raw-input), each stage output, and the
                       captions before rewriting; in words, and in characters for CJK captions (a
                       separate "· characters" series: the units of the filter's length rules)
    languages          kept records by caption language (``Pair.lang``) after each stage, labelled
                       with the language's own name (中文, 日本語: drawn with Noto CJK)
    ledger_reasons     non-kept ledger rows by stage and reason (when there are any)
    cluster_sizes      duplicate cluster sizes (dedup output)
    tokens_per_sample  tokens per packed sample (pack output)
    fill_per_pack      token fill per pack (pack output)
    images_per_pack    images per pack (pack output with image columns)
    sft_answer_tokens  assistant tokens per turn by SFT part (sft split output; docs/sft.md)
    image_signals      OCR and safety counts of kept records (ocr output: its manifest's extra.image_signals)

Example:
    mmcorpus stats build/demo --plot build/demo/stats.png --raw-input data/sample/cc3m_val_captions_8k.tsv
    mmcorpus stats build/demo/dedup --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.inspection import (
    MEASURE_COLUMNS,
    _require_dir,
    _seq_len,
    _tar_pack_rows,
    dataset_counts,
    is_stage_dir,
    pack_files,
    pack_measures,
    read_index,
    run_stage_dirs,
)
from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA, FILE_KIND_LEDGER, MANIFEST_NAME
from schemas.records import KEPT
from transforms.stage_io import join, read_manifest

PANELS = ("caption_words", "languages", "ledger_reasons", "cluster_sizes", "tokens_per_sample", "fill_per_pack",
          "images_per_pack", "sft_answer_tokens", "image_signals")
PANEL_TITLES = {
    "caption_words": "caption length (words; CJK: characters)",
    "languages": "kept records by caption language",
    "ledger_reasons": "removed records by stage and reason",
    "cluster_sizes": "duplicate cluster sizes",
    "tokens_per_sample": "tokens per packed sample",
    "fill_per_pack": "token fill per pack",
    "images_per_pack": "images per pack",
    "image_signals": "OCR and safety signals (kept records)",
    "sft_answer_tokens": "assistant tokens per turn, by SFT part",
}
# Pixel size of one panel (at DPI): the PNG is (COLS * W) x (rows * H).
PANEL_W_IN, PANEL_H_IN, DPI = 6.4, 4.0, 100
TITLE_BAND_IN = 0.48
FIG_FACE = "#ececec"  # figure background: panels are white on it, empty grid cells stay grey
MAX_ROWS_DEFAULT = 1_000_000
# Rows per Arrow record batch when reading a stage's files: what one read holds at a time (about 1 MB
# of captions), whatever the size of a file or of the stage (docs/operations.md, "Looking inside outputs").
BATCH_ROWS = 8_192
# Language labels in their own script, so the panel shows that CJK text renders.
LANG_NAMES = {"en": "English", "zh": "中文", "ja": "日本語", "ko": "한국어", "es": "Español", "fr": "Français",
              "de": "Deutsch", "ru": "Русский", "und": "undetermined"}
# Fonts with Han, Kana and Hangul glyphs, tried in order (fonts-noto-cjk from `make system-deps`;
# WenQuanYi as a fallback); DejaVu Sans stays first for Latin/Cyrillic.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback")


def _stage_scope(path: str) -> list[tuple[str, str]]:
    if is_stage_dir(path):
        return [(read_manifest(path).stage, path)]
    return run_stage_dirs(path)


def _batches(path: str, columns) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``BATCH_ROWS`` rows of the Parquet file at ``path``, holding only
    those of ``columns`` the file has (nothing when it has none of them): never a whole column."""
    with FileSystems.open(path, compression_type="uncompressed") as fh:
        pf = pq.ParquetFile(fh)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        if cols:
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)


def _data_batches(stage_dir: str, m, columns, max_rows: int) -> Iterator[pa.RecordBatch]:
    """The first ``max_rows`` rows of a stage's data files, in file order, as record batches."""
    left = max_rows
    for f in sorted(m.files_of(FILE_KIND_DATA), key=lambda f: f.path):
        if left <= 0:
            return
        for batch in _batches(join(stage_dir, f.path), columns):
            if batch.num_rows > left:
                batch = batch.slice(0, left)
            left -= batch.num_rows
            yield batch
            if left <= 0:
                return


def _word_counts(texts: pa.Array) -> list[int]:
    """Words of each non-null text, as ``len(text.split())`` counts them (split on Unicode
    whitespace), computed in Arrow rather than with one Python string per row."""
    trimmed = pc.utf8_trim_whitespace(pc.drop_null(texts))
    n = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    return pc.if_else(pc.equal(trimmed, ""), 0, n).to_pylist()


# Series of captions measured in characters carry this suffix (the rest are in words).
CHARS_SUFFIX = " · characters"


def caption_length(text: str) -> tuple[str, int]:
    """(unit, length) of one caption in the units the caption filter's length rules use
    (``transforms.lang.profile``, docs/bilingual.md): ``words`` for space-separated scripts;
    ``characters`` for captions with CJK (Han, Kana, Hangul: each character one unit, plus the
    words of any Latin text mixed in) and for Thai/Lao/Khmer/Myanmar/Tibetan (non-space characters).

    Example:
        >>> caption_length("a dog on a beach"), caption_length("草地上的狗"), caption_length("我爱NBA篮球")
        (('words', 5), ('characters', 5), ('characters', 5))
    """
    if text.isascii():
        return "words", len(text.split())
    from transforms import lang

    p = lang.profile(text)
    if p.cjk:
        return "characters", p.cjk + p.words
    if p.unspaced:
        return "characters", sum(1 for c in text if not c.isspace())
    return "words", len(text.split())


def _char_script_re() -> str:
    from transforms import lang

    return f"[{lang.CJK_RANGES}{lang.UNSPACED_RANGES}]"


def _length_counts(texts: pa.Array) -> tuple[list[int], list[int]]:
    """(words, characters): the length of each non-null text in its unit (``caption_length``). Rows
    without a CJK or unspaced-script character (found in Arrow) are counted in Arrow as words; only
    the others become Python strings."""
    texts = pc.drop_null(texts)
    mask = pc.match_substring_regex(texts, _char_script_re())
    if not pc.any(mask).as_py():
        return _word_counts(texts), []
    words = _word_counts(pc.filter(texts, pc.invert(mask)))
    chars: list[int] = []
    for text in pc.filter(texts, mask).to_pylist():
        unit, n = caption_length(text)
        (chars if unit == "characters" else words).append(n)
    return words, chars


def _put_lengths(captions: dict[str, list[int]], label: str, words: list[int], chars: list[int]) -> None:
    """``captions[label]``: word counts; ``captions[label + CHARS_SUFFIX]``: character counts of the
    CJK (and other unspaced-script) captions — a Chinese caption is not one "word"."""
    if words or not chars:
        captions[label] = words
    if chars:
        captions[label + CHARS_SUFFIX] = chars


@dataclass
class _StageData:
    """What the panels take from one stage's data files (the first ``max_rows`` rows)."""

    rows: int = 0
    after: list[int] = field(default_factory=list)  # words per caption (captions measured in words)
    before: list[int] = field(default_factory=list)  # words per raw_caption, else caption
    after_chars: list[int] = field(default_factory=list)  # characters per CJK caption
    before_chars: list[int] = field(default_factory=list)
    any_raw: bool = False  # some row has a raw_caption (the stage rewrote captions)
    langs: Counter = field(default_factory=Counter)
    lang_everywhere: bool = True  # every batch had a lang column
    cluster_sizes: list[int] = field(default_factory=list)  # cluster_size > 1 (dedup)
    sft_parts: dict[str, list[int]] = field(default_factory=dict)  # sft split: assistant tokens by part


def _scan_stage(stage_dir: str, m, stage: str, max_rows: int) -> _StageData:
    """One streamed pass over a stage's data files, reading only the columns the panels use
    (captions, languages, and cluster sizes or SFT metadata for the stages that have them) batch by
    batch, so memory is bounded by ``BATCH_ROWS`` plus the panels' own numbers, never by the stage."""
    columns = ["caption", "raw_caption", "lang"]
    if stage == "dedup":
        columns.append("cluster_size")
    if stage == "sft_split":
        columns.append("meta")
    out = _StageData()
    for batch in _data_batches(stage_dir, m, columns, max_rows):
        names = batch.schema.names
        out.rows += batch.num_rows
        if "caption" in names:
            caption = batch.column("caption")
            after, after_chars = _length_counts(caption)
            out.after.extend(after)
            out.after_chars.extend(after_chars)
            raw = batch.column("raw_caption") if "raw_caption" in names else None
            if raw is not None and raw.null_count < len(raw):
                out.any_raw = True
                before, before_chars = _length_counts(pc.coalesce(raw, caption))
                out.before.extend(before)
                out.before_chars.extend(before_chars)
            else:
                out.before.extend(after)
                out.before_chars.extend(after_chars)
        if "lang" in names:
            vc = pc.value_counts(pc.drop_null(batch.column("lang")))
            out.langs.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
        else:
            out.lang_everywhere = False
        if "cluster_size" in names:
            sizes = batch.column("cluster_size")
            out.cluster_sizes.extend(pc.filter(sizes, pc.greater(sizes, 1)).to_pylist())
        if "meta" in names:
            _add_sft_tokens(out.sft_parts, batch.column("meta").to_pylist())
    return out


def raw_input_captions(path: str, input_format: str = "auto", max_rows: int = MAX_ROWS_DEFAULT,
                       columns: dict[str, Any] | None = None) -> list[str]:
    """Captions of the filter's raw input (before any filter), read in-process with the same ingest
    code the filter stage runs; records unusable at ingest (failed downloads...) have none.
    ``columns``: the filter's recorded input settings (url_col, caption_col, key_col, header)."""
    from schemas.records import Pair
    from transforms.ingest import ExpandUnitsFn, InputSpec, ReadInputUnitFn, resolve_input

    known = {"url_col", "caption_col", "key_col", "header"}
    extra = {k: v for k, v in (columns or {}).items() if k in known and v is not None}
    resolved = resolve_input(InputSpec(path=path, format=input_format, **extra))
    if resolved.format == "stage":
        raise UserError(f"--raw-input {path} is a stage output; pass the raw input the filter read")
    expand, read = ExpandUnitsFn(resolved), ReadInputUnitFn(resolved)
    read.setup()
    captions: list[str] = []
    for f in resolved.files:
        for unit in expand.process(f):
            for rec in read.process(unit):
                if isinstance(rec, Pair) and rec.caption is not None:
                    captions.append(rec.caption)
                    if len(captions) >= max_rows:
                        return captions
    return captions


def collect(path: str, max_rows: int = MAX_ROWS_DEFAULT, raw_input: str | None = None,
            input_format: str = "auto") -> dict[str, Any]:
    """The data of every panel the directory has, in ``PANELS`` order (JSON-able). ``raw_input``
    (the filter's input) adds the caption lengths before filtering."""
    scope = _stage_scope(path)
    if not scope:
        raise UserError(f"{path} has no {MANIFEST_NAME} and no stage outputs below it: "
                        "pass a finished stage output directory or a run directory")
    panels: dict[str, Any] = {}

    captions: dict[str, list[int]] = {}
    if raw_input:
        # Read the raw input the way the filter did: its manifest records the column settings.
        filter_cfg = next((read_manifest(d).config.get("input") for st, d in scope if st == "filter"), None) or {}
        if input_format == "auto" and filter_cfg.get("format") not in (None, "auto"):
            input_format = filter_cfg["format"]
        raw_texts = raw_input_captions(raw_input, input_format, max_rows, filter_cfg)
        _put_lengths(captions, "raw input (before filter)", *_length_counts(pa.array(raw_texts, pa.string())))
    reasons: Counter = Counter()
    langs: dict[str, dict[str, int]] = {}
    clusters: list[int] | None = None
    packs: dict[str, list] | None = None
    signals: dict[str, int] = {}
    by_dataset: dict[str, Any] = {}
    sft_parts: dict[str, list[int]] | None = None
    for stage, d in scope:
        m = read_manifest(d)
        ds = dataset_counts(d, m)
        if ds:
            by_dataset[stage] = ds
        for name, n in (m.extra.get("image_signals") or {}).items():
            signals[f"{stage}: {name}"] = n
        for name, n in m.counts.get("by_reason", {}).items():
            status, reason = name.split("/", 1)
            if status != KEPT:
                reasons[f"{stage}: {reason}"] += n
        data = _scan_stage(d, m, stage, max_rows)
        if data.lang_everywhere and data.langs:
            langs[f"after {stage}"] = _sorted_counts(data.langs)
        if data.rows:
            if stage == "rewrite" or data.any_raw:
                _put_lengths(captions, f"before {stage}", data.before, data.before_chars)
            _put_lengths(captions, f"after {stage}", data.after, data.after_chars)
        if stage == "dedup":
            clusters = sorted(data.cluster_sizes) or _ledger_cluster_sizes(d, m)
        if stage == "sft_split":
            sft_parts = dict(sorted(data.sft_parts.items()))
        if pack_files(d, m):
            meas = _pack_measures(d, m, max_rows)
            if meas is not None:
                packs = meas
    if captions:
        panels["caption_words"] = captions
    if langs:
        panels["languages"] = langs
    if reasons:
        panels["ledger_reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    if clusters is not None:
        panels["cluster_sizes"] = clusters
    if signals:
        panels["image_signals"] = signals
    if packs is not None:
        panels["tokens_per_sample"] = packs["sample_tokens"]
        panels["fill_per_pack"] = [f for f in packs["pack_fill"] if f is not None]
        if any(v is not None for v in packs["pack_images"]):
            panels["images_per_pack"] = [v for v in packs["pack_images"] if v is not None]
    if sft_parts:
        panels["sft_answer_tokens"] = sft_parts
    return {"dir": path, "stages": [s for s, _ in scope], "panels": panels, "by_dataset": by_dataset}


def _sorted_counts(counts: Counter) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _lang_counts(stage_dir: str, max_rows: int) -> dict[str, int]:
    """Kept records per caption language in the first ``max_rows`` rows, most frequent first;
    empty when the data files have no language."""
    data = _scan_stage(stage_dir, read_manifest(stage_dir), "", max_rows)
    return _sorted_counts(data.langs) if data.lang_everywhere else {}


def use_cjk_font() -> str | None:
    """Make the first installed CJK font matplotlib's fallback after DejaVu Sans, so labels in Han,
    Kana or Hangul render instead of as boxes; returns its name (None: none found). Matplotlib
    falls back glyph by glyph only across the names in ``font.family`` (a generic family such as
    ``sans-serif`` resolves to one font), so both go there."""
    from matplotlib import font_manager, rcParams

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FONTS if name in installed), None)
    if found:
        rcParams["font.family"] = ["DejaVu Sans", found]
    return found


def _add_sft_tokens(out: dict[str, list[int]], metas: list[str | None]) -> None:
    """``out["part 1"]``, ``out["part 2"]``...: assistant tokens per turn from an sft split output's
    ``meta`` (docs/sft.md)."""
    for meta in metas:
        sft = json.loads(meta or "{}").get("sft") or {}
        if sft.get("part"):
            out.setdefault(f"part {sft['part']}", []).extend(sft.get("assistant_tokens") or [])


def _ledger_cluster_sizes(stage_dir: str, m) -> list[int]:
    """Duplicate cluster sizes from the ledger (duplicates per ``cluster_id`` + the kept one), for a
    dedup output whose data has no ``cluster_size`` above 1."""
    per_cluster: Counter = Counter()
    for f in m.files_of(FILE_KIND_LEDGER):
        for batch in _batches(join(stage_dir, f.path), ["status", "cluster_id"]):
            cid = batch.column("cluster_id")
            dup = pc.filter(cid, pc.and_(pc.equal(batch.column("status"), "duplicate"), pc.not_equal(cid, "")))
            vc = pc.value_counts(dup)
            per_cluster.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
    return sorted(n + 1 for n in per_cluster.values())


def _pack_measures(stage_dir: str, m, max_rows: int) -> dict[str, list] | None:
    """``pack_measures`` of the first ``max_rows`` packs of a pack output, shard by shard (Parquet:
    in record batches of the measure columns; WebDataset: one tar shard at a time); None without packs."""
    seq_len = _seq_len(m, read_index(stage_dir, m))
    out: dict[str, list] | None = None
    left = max_rows
    for path in pack_files(stage_dir, m):
        if left <= 0:
            break
        if path.endswith(".tar"):
            rows = _tar_pack_rows(path)
            parts = [pa.Table.from_pylist(rows)] if rows else []
        else:
            parts = _batches(path, MEASURE_COLUMNS)
        for part in parts:
            if part.num_rows > left:
                part = part.slice(0, left)
            left -= part.num_rows
            if part.num_rows:
                meas = pack_measures(part, seq_len)
                out = out or {k: [] for k in meas}
                for k, v in meas.items():
                    out[k].extend(v)
            if left <= 0:
                break
    return out


def panel_grid(n: int) -> tuple[int, int]:
    """(rows, cols) of the figure for n panels: two columns from two panels on."""
    cols = 1 if n <= 1 else 2
    return max(1, math.ceil(n / cols)), cols


def plot(stats: dict[str, Any], out_path: str) -> list[str]:
    """Write the PNG and return the panel names drawn, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_cjk_font()
    names = [p for p in PANELS if p in stats["panels"]]
    if not names:
        raise UserError(f"{stats['dir']}: nothing to plot (no captions, ledger reasons, clusters or packs)")
    rows, cols = panel_grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_W_IN * cols, PANEL_H_IN * rows), dpi=DPI, squeeze=False,
                             facecolor=FIG_FACE)
    flat = [ax for row in axes for ax in row]
    for ax, name in zip(flat, names):
        ax.set_facecolor("white")
        _draw(ax, name, stats["panels"][name])
        ax.set_title(PANEL_TITLES[name], fontsize=10)
    for ax in flat[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"mmcorpus stats: {stats['dir']}", fontsize=11)
    # The title band is a fixed 0.48 in (4% of a 3-row figure), not a share of the height: with more
    # rows a share would eat into the first row's panels.
    fig.tight_layout(rect=(0, 0, 1, 1 - TITLE_BAND_IN / (PANEL_H_IN * rows)))
    _keep_in_cells(flat[: len(names)], rows, cols)
    desc: dict[str, Any] = {"panels": names}
    if "caption_words" in stats["panels"]:  # the length series drawn (words, or "· characters" for CJK) and their n
        desc["caption_lengths"] = {k: len(v) for k, v in stats["panels"]["caption_words"].items()}
    meta = {"Title": "mmcorpus stats", "Description": json.dumps(desc, ensure_ascii=False)}
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor=FIG_FACE, metadata=meta)
    plt.close(fig)
    from transforms.stage_io import write_bytes_atomic

    write_bytes_atomic(out_path, buf.getvalue())
    return names


def _keep_in_cells(axes, rows: int, cols: int, pad: float = 0.004) -> None:
    """Shrink any panel that ``tight_layout`` let reach into the next grid cell (a panel with long
    tick labels, such as the ledger reasons, gets its axes pushed right): every panel stays inside
    its own cell, so an empty cell of an odd panel count stays empty."""
    for i, ax in enumerate(axes):
        col = i % cols
        box = ax.get_position()
        x0, x1 = max(box.x0, col / cols + pad), min(box.x1, (col + 1) / cols - pad)
        if (x0, x1) != (box.x0, box.x1):
            ax.set_position([x0, box.y0, x1 - x0, box.height])


def _draw(ax, name: str, data) -> None:
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if name in ("ledger_reasons", "image_signals") else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    if name == "caption_words":
        hi = max((max(v) for v in data.values() if v), default=1)
        bins = range(0, min(hi, 80) + 2)
        for label, values in data.items():
            ax.hist([min(v, 80) for v in values], bins=bins, histtype="step", linewidth=1.5, label=f"{label} (n={len(values):,})",
                    linestyle="--" if label.endswith(CHARS_SUFFIX) else "-")
        ax.set_xlabel("words, or characters for CJK captions (80+ pooled)")
        ax.set_ylabel("records")
        ax.legend(fontsize=7)
    elif name == "languages":
        codes = sorted({c for v in data.values() for c in v}, key=lambda c: -sum(v.get(c, 0) for v in data.values()))[:12]
        width = 0.8 / max(1, len(data))
        for i, (label, counts) in enumerate(data.items()):
            ax.bar([x + i * width for x in range(len(codes))], [counts.get(c, 0) for c in codes], width=width, label=label)
        ax.set_xticks([x + width * (len(data) - 1) / 2 for x in range(len(codes))])
        ax.set_xticklabels([f"{c} {LANG_NAMES.get(c, '')}".strip() for c in codes], fontsize=8)
        ax.set_ylabel("records")
        ax.legend(fontsize=7)
    elif name == "ledger_reasons":
        items = list(data.items())[:15][::-1]
        ax.barh([k for k, _ in items], [v for _, v in items], color="#c0504d")
        ax.set_xlabel("records")
        ax.tick_params(axis="y", labelsize=7)
    elif name == "image_signals":
        items = list(data.items())[::-1]
        ax.barh([k for k, _ in items], [v for _, v in items], color="#4bacc6")
        ax.set_xlabel("records")
        ax.tick_params(axis="y", labelsize=7)
    elif name == "cluster_sizes":
        if data:
            hi = max(data)
            bins = sorted({1.5, *[2 ** (i / 2) + 0.5 for i in range(2, int(2 * math.log2(max(hi, 2))) + 3)]})
            ax.hist(data, bins=bins, color="#4f81bd")
            ax.set_xscale("log")
            from matplotlib.ticker import LogLocator, ScalarFormatter

            ax.xaxis.set_major_locator(LogLocator(base=2))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter() if hi < 8 else matplotlib_null())
        else:
            ax.text(0.5, 0.5, "no duplicate clusters", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("records per cluster")
        ax.set_ylabel("clusters")
    elif name == "tokens_per_sample":
        ax.hist(data, bins=40, color="#9bbb59")
        ax.set_xlabel("tokens")
        ax.set_ylabel("samples")
    elif name == "fill_per_pack":
        ax.hist([100 * f for f in data], bins=40, color="#8064a2")
        ax.set_xlabel("fill (%)")
        ax.set_ylabel("packs")
    elif name == "sft_answer_tokens":
        hi = max((max(v) for v in data.values() if v), default=1)
        bins = [x * max(1, hi // 40) for x in range(0, 42)]
        for label, values in data.items():
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (n={len(values):,} turns)")
        ax.set_xlabel("assistant tokens per turn")
        ax.set_ylabel("turns")
        ax.legend(fontsize=7)
    elif name == "images_per_pack":
        hi = max(data) if data else 1
        ax.hist(data, bins=[x - 0.5 for x in range(0, hi + 2)], color="#f79646")
        ax.set_xlabel("images")
        ax.set_ylabel("packs")


def matplotlib_null():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """Small per-panel summaries (n, min, mean, max) for the table and --json."""
    out: dict[str, Any] = {}
    for name, data in stats["panels"].items():
        if name in ("ledger_reasons", "languages", "image_signals"):
            out[name] = data
        elif name in ("caption_words", "sft_answer_tokens"):
            out[name] = {k: _stat(v) for k, v in data.items()}
        else:
            out[name] = _stat(data)
    return out


def _stat(values: list) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus stats", description="Statistics and plots of an output directory.")
    p.add_argument("dir", help="a stage output directory (with manifest.json) or a run directory holding several")
    p.add_argument("--plot", metavar="PNG", help="write the histogram panels to this PNG file")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.add_argument("--raw-input", "--raw_input", dest="raw_input",
                   help="the filter's raw input (as given to `mmcorpus filter --input`): adds caption lengths before filtering")
    p.add_argument("--input-format", "--input_format", dest="input_format", default="auto",
                   help="format of --raw-input (auto, webdataset, i2d-parquet, table)")
    p.add_argument("--max-rows", "--max_rows", dest="max_rows", type=int, default=MAX_ROWS_DEFAULT,
                   help=f"read at most this many data rows per stage (default {MAX_ROWS_DEFAULT:,})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.dir.rstrip("/") or "/"
    _require_dir(path)
    stats = collect(path, max_rows=args.max_rows, raw_input=args.raw_input, input_format=args.input_format)
    summary = summarize(stats)
    drawn = plot(stats, args.plot) if args.plot else None
    if args.json:
        out = {"dir": path, "stages": stats["stages"], "panels": list(stats["panels"]), "summary": summary,
               "by_dataset": stats["by_dataset"]}
        if drawn is not None:
            out["plot"] = {"path": args.plot, "panels": drawn}
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    t = Table(title=escape(f"stats: {path} ({', '.join(stats['stages'])})"))
    for col in ("panel", "series", "n", "min", "mean", "max"):
        t.add_column(col, justify="left" if col in ("panel", "series") else "right")
    for name, s in summary.items():
        if name in ("ledger_reasons", "image_signals"):
            for k, v in s.items():
                t.add_row(name, k, f"{v:,}", "", "", "")
        elif name == "languages":
            for stage_label, counts in s.items():
                for code, v in counts.items():
                    t.add_row(name, f"{stage_label}: {code}", f"{v:,}", "", "", "")
        elif name in ("caption_words", "sft_answer_tokens"):
            for k, v in s.items():
                t.add_row(name, k, *_cells(v))
        else:
            t.add_row(name, "", *_cells(s))
    console.print(t)
    if stats["by_dataset"]:
        d = Table(title="ledger rows by dataset")
        for col in ("stage", "dataset", "kept", "dropped"):
            d.add_column(col, justify="left" if col in ("stage", "dataset") else "right")
        for stage, per in stats["by_dataset"].items():
            for name, c in per.items():
                d.add_row(stage, escape(name), f"{c.get('kept', 0):,}", f"{sum(c.values()) - c.get('kept', 0):,}")
        console.print(d)
    if drawn is not None:
        console.print(escape(f"wrote {args.plot} ({len(drawn)} panels: {', '.join(drawn)})"))
    return 0


def _cells(s: dict) -> list[str]:
    if not s.get("n"):
        return ["0", "", "", ""]
    fmt = (lambda v: f"{v:.3g}") if isinstance(s["mean"], float) else str
    return [f"{s['n']:,}", fmt(s["min"]), f"{s['mean']:.3g}", fmt(s["max"])]
