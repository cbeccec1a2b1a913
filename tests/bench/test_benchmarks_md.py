"""BENCHMARKS.md holds only generated sections: every `## ` heading lies between the markers of a bench
module that run_all knows, under the run_all command that produced it (full sizes, not --quick)."""

from __future__ import annotations

import importlib
import pathlib
import re

from bench import run_all

REPO = pathlib.Path(__file__).resolve().parents[2]

# Sections still typed by hand. Empty since the Dedup section became bench.dedup_quality and
# bench.dedup_speed blocks: every heading and every table line must now sit inside a bench block.
NOT_YET_CONVERTED: set[str] = set()
# Marker blocks wrapped by hand around a bench's own output, not written by a run_all run (no
# run_all command line under the heading). Re-run with `python -m bench.run_all --only NAME`.
NOT_YET_REGENERATED: set[str] = set()

BLOCK = re.compile(r"<!-- bench:(?P<name>[\w]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->\n", re.S)


def _blocks_and_rest(text: str) -> tuple[list[re.Match], str]:
    blocks = list(BLOCK.finditer(text))
    return blocks, BLOCK.sub("", text)


def test_every_section_is_generated_by_a_registered_bench():
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert text.startswith(run_all.HEADER), "BENCHMARKS.md must start with bench.run_all's HEADER"
    blocks, rest = _blocks_and_rest(text)
    names = [b["name"] for b in blocks]
    registered = set(run_all.bench_names())
    assert len(names) == len(set(names)), f"a bench section appears twice: {sorted(names)}"
    assert not set(names) - registered, f"markers of unknown benches: {sorted(set(names) - registered)}"
    # every marker is closed (an unclosed one would leave its text outside any block)
    assert "<!-- bench:" not in rest and "<!-- /bench:" not in rest

    outside = [ln[3:] for ln in rest.splitlines() if ln.startswith("## ")]
    assert sorted(set(outside) - NOT_YET_CONVERTED) == [], (
        f"sections typed by hand (not between bench markers): {sorted(set(outside) - NOT_YET_CONVERTED)}; "
        "generate them with `python -m bench.run_all --only NAME`")
    stale = NOT_YET_CONVERTED - set(outside)
    assert not stale, f"{sorted(stale)} are generated now: remove them from NOT_YET_CONVERTED"
    if not NOT_YET_CONVERTED:  # once all are converted, nothing outside the blocks may carry figures
        assert not [ln for ln in rest.splitlines() if ln.startswith("|")], "a table outside any bench section"

    for b in blocks:
        name, body = b["name"], b["body"]
        title = importlib.import_module(f"bench.{name}").TITLE
        assert body.startswith(f"## {title}\n\n"), f"section {name} must start with its module's TITLE {title!r}"
        if name in NOT_YET_REGENERATED:
            continue
        head = body.split("\n")[2]
        assert head.startswith(f"`python -m bench.run_all --only {name}` — "), (
            f"section {name} was not written by a full `python -m bench.run_all --only {name}` run: {head[:120]!r}")
        assert "QUICK sizes" not in head, f"section {name} holds --quick numbers"
        assert "**FAILED** in this run" not in body, f"section {name} records a failed run"
    regenerated_now = {b["name"] for b in blocks if b["body"].split("\n")[2].startswith("`python -m bench.run_all --only ")}
    assert not NOT_YET_REGENERATED & regenerated_now, (
        f"{sorted(NOT_YET_REGENERATED & regenerated_now)} are regenerated now: remove them from NOT_YET_REGENERATED")


def test_the_check_catches_a_hand_typed_section():
    """The same parsing on a file with one generated block and one hand-typed section finds the latter."""
    text = (run_all.HEADER + "\n<!-- bench:sft -->\n## SFT\n\n`python -m bench.run_all --only sft` — x\n\n| a |\n"
            "<!-- /bench:sft -->\n\n## Pack\n\n| typed | by hand |\n")
    blocks, rest = _blocks_and_rest(text)
    assert [b["name"] for b in blocks] == ["sft"]
    assert [ln for ln in rest.splitlines() if ln.startswith("## ")] == ["## Pack"]
    assert [ln for ln in rest.splitlines() if ln.startswith("|")] == ["| typed | by hand |"]


def test_vllm_section_fails_loudly_without_vllm(monkeypatch):
    """No vLLM: the section is a FAILED block naming the fix (and run_all exits 1), never old numbers."""
    import sys

    monkeypatch.setenv("MMCORPUS_VLLM_PYTHON", sys.executable)  # the main venv: vllm is not installed there
    block, ok = run_all.run_section("rewrite_vllm", quick=False)
    assert not ok
    assert block.startswith("<!-- bench:rewrite_vllm -->\n## rewrite_vllm\n\n`python -m bench.run_all --only rewrite_vllm` — ")
    assert "**FAILED** in this run" in block
    assert f"RuntimeError: bench.rewrite_vllm needs vLLM, and {sys.executable} cannot import it: run `make vllm-env`" in block
    assert "| concurrency |" not in block
