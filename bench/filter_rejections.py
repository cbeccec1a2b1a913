"""Rejection table of the filter stage on the bundled real caption sets, with examples per reason.

    .venv/bin/python -m bench.filter_rejections [--examples 10]

Runs the real filter stage (DirectRunner) on CC3M (8,000 curated captions) and the LAION-style
img2dataset sample (1,000 noisy alt-texts) and prints, for each, the counts by reason, the share of
kept captions flagged for rewriting, and N rejected captions per top reason, as Markdown.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import pathlib
import tempfile

import pyarrow.parquet as pq

from pipelines import filter as filter_stage
from transforms.stage_io import read_table

SAMPLE = pathlib.Path(__file__).resolve().parent.parent / "data" / "sample"
SETS = {
    "cc3m": (["--input", str(SAMPLE / "cc3m_val_captions_8k.tsv"), "--caption-col", "0", "--url-col", "1"],
             lambda: [r[0] for r in csv.reader(open(SAMPLE / "cc3m_val_captions_8k.tsv", newline=""), delimiter="\t",
                                               quoting=csv.QUOTE_NONE)]),
    "laion": (["--input", str(SAMPLE / "img2dataset_sample_1000.parquet"), "--caption-col", "TEXT", "--url-col", "URL"],
              lambda: pq.read_table(SAMPLE / "img2dataset_sample_1000.parquet").column("TEXT").to_pylist()),
}


def report(name: str, out: pathlib.Path, examples: int) -> str:
    args, read_captions = SETS[name]
    argv = [*args, "--output", str(out / name), "--force"]
    a, beam_args = filter_stage.parser().parse_known_args(argv)
    filter_stage.run(a, beam_args)
    captions = read_captions()
    ledger = read_table(str(out / name), "ledger").to_pylist()
    data = read_table(str(out / name), columns=["quality_flags", "needs_rewrite"]).to_pylist()
    counts = collections.Counter((r["status"], r["reason"]) for r in ledger)
    lines = [f"### {name}: {len(ledger):,} captions", "", "| status | reason | rows | share |", "|---|---|---|---|"]
    for (status, reason), n in counts.most_common():
        lines.append(f"| {status} | {reason} | {n:,} | {100 * n / len(ledger):.1f}% |")
    flagged = sum(d["needs_rewrite"] for d in data)
    flags = collections.Counter(f for d in data for f in d["quality_flags"])
    lines += ["", f"Kept and flagged `needs_rewrite`: {flagged:,} of {len(data):,} ({100 * flagged / max(1, len(data)):.1f}%): "
              + ", ".join(f"{k} {v}" for k, v in flags.most_common()), ""]
    for (status, reason), _ in counts.most_common():
        if status == "kept":
            continue
        rows = [r for r in ledger if r["reason"] == reason][:examples]
        lines.append(f"**{reason}** ({len([r for r in ledger if r['reason'] == reason])}):")
        for r in rows:
            cap = captions[int(r["source"].rsplit("#", 1)[1])]
            cap = cap if len(cap) <= 110 else cap[:107] + "..."
            lines.append(f"- `{cap}` ({r['detail'][:60]})")
        lines.append("")
    return "\n".join(lines)


TITLE = "Filter rejections on the real caption sets"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: the rejection tables (quick: the 1k LAION-style set, 2 examples)."""
    os.environ["MMCORPUS_PROGRESS"] = "0"
    names, examples = (["laion"], 2) if quick else (list(SETS), 10)
    head = f"`python -m bench.filter_rejections --examples {examples}`" + (" (quick: the `laion` set only)" if quick else "")
    with tempfile.TemporaryDirectory() as tmp:
        body = "\n".join(report(name, pathlib.Path(tmp), examples) for name in names)
    return head + "\n\n" + body.replace("\n### ", "\n#### ").replace("### ", "#### ", 1) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10)
    args = ap.parse_args(argv)
    os.environ["MMCORPUS_PROGRESS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        for name in SETS:
            print(report(name, pathlib.Path(tmp), args.examples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
