"""How often the rewriter's faithfulness rule applies and fires on the real sample captions.

For each bundled caption source: the share exempt as garbage, the share carrying numbers / entity words
(the rule is active), and how often ``rewrite_unfaithful`` fires for three rewriters measured in the same
run: the ``offline-template`` (must be 0), a lossy one that keeps the first 8 words, and one that keeps
only lower-case words (drops every name and acronym, keeps numbers).

    .venv/bin/python -m bench.rewrite_faithfulness
"""

from __future__ import annotations

import csv
import json
import os
import time

import pyarrow.parquet as pq

from rewriter import prompts
from rewriter.offline import tidy

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def sources() -> dict[str, list[str]]:
    with open(os.path.join(SAMPLE, "cc3m_val_captions_8k.tsv"), encoding="utf-8", newline="") as f:
        cc3m = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    laion = [c for c in pq.read_table(os.path.join(SAMPLE, "img2dataset_sample_1000.parquet")).column("TEXT").to_pylist() if c]
    out = {"cc3m_val_8k (hypernymised alt-text)": cc3m, "img2dataset_sample_1000 (raw LAION-style alt-text)": laion}
    for name, rel in (("cc_images (Flickr titles)", "cc_images/pairs.jsonl"), ("skimage_pairs", "skimage_pairs/captions.jsonl")):
        path = os.path.join(SAMPLE, rel)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out[name] = [json.loads(line)["caption"] for line in f if line.strip()]
    return out


REWRITERS = {
    "offline-template": tidy,
    "first 8 words": lambda c: " ".join(c.split()[:8]),
    "lower-case words only": lambda c: " ".join(w for w in c.split() if not any(ch.isupper() for ch in w)),
}


def measure(captions: list[str]) -> dict:
    n = len(captions)
    cons = [prompts.faithfulness_constraints(c) for c in captions]
    active = [c for c in cons if c.active]
    row = {
        "captions": n,
        "garbage_exempt_%": round(100 * sum(c.garbage for c in cons) / n, 1),
        "with_numbers_%": round(100 * sum(bool(c.numbers) for c in cons) / n, 1),
        "with_entities_%": round(100 * sum(bool(c.entities) for c in cons) / n, 1),
        "rule_active_%": round(100 * len(active) / n, 1),
        "constraints_per_active": round(sum(len(c.numbers) + len(c.entities) for c in active) / max(1, len(active)), 2),
    }
    for name, fn in REWRITERS.items():
        fired = sum(not prompts.check_faithful(c, fn(c))[0] for c in captions)
        row[f"fires_%[{name}]"] = round(100 * fired / n, 1)
    return row


TITLE = "Rewrite faithfulness rule on the real captions"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: how often the rule applies and fires per caption source (fast: no quick mode)."""
    rows = {name: measure(caps) for name, caps in sources().items()}
    cols = list(next(iter(rows.values())).keys())
    lines = ["`python -m bench.rewrite_faithfulness` (\"rule active\" = the raw caption carries numbers or entity words the "
             "adopted caption must keep; \"fires\" = share of captions a given rewriter gets `rewrite_unfaithful` for)", "",
             "| source | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    t = time.perf_counter()
    rows = {name: measure(caps) for name, caps in sources().items()}
    total = sum(r["captions"] for r in rows.values())
    for name, r in rows.items():
        print(json.dumps({"source": name, **r}))
    cols = list(next(iter(rows.values())).keys())
    print("\n| source | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")
    dt = time.perf_counter() - t
    print(f"\n{total} captions checked in {dt:.2f}s ({total / dt:,.0f} captions/s for constraints + 3 rewriters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
