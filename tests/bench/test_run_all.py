"""`make bench` (bench.run_all): every bench module exposes a section, a quick run of two cheap benches
writes markdown with their exact commands, `--only` replaces one section in place, a failing bench
is reported, and the scale bench's image variants are deterministic and distinct."""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import subprocess
import sys
import types

import pyarrow.parquet as pq

from bench import run_all

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_bench_module_has_a_section():
    names = run_all.bench_names()
    on_disk = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in ("__init__", "run_all", "dedup_data", "dedup_photos"))
    assert sorted(names) == on_disk
    for name in ("filter_throughput", "filter_rejections", "dedup_quality", "dedup_speed", "pack_fill", "rewrite_throughput",
                 "rewrite_faithfulness", "rewrite_vllm", "ops_overhead", "verify_scale", "scale"):
        assert name in names
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        assert callable(module.section) and isinstance(module.TITLE, str), name


def test_quick_run_writes_sections_with_their_commands(tmp_path):
    out = tmp_path / "BENCH.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--quick", "--only", "rewrite_faithfulness,verify_scale", "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900, env=dict(os.environ, MMCORPUS_PROGRESS="0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = out.read_text()
    assert md.startswith("# Benchmarks\n")
    # each section: markers, heading, the run_all command that reproduces it, the module's own command
    assert "<!-- bench:rewrite_faithfulness -->\n## Rewrite faithfulness rule on the real captions\n\n" \
           "`python -m bench.run_all --only rewrite_faithfulness --quick` — " in md
    assert "`python -m bench.rewrite_faithfulness`" in md
    assert "<!-- bench:verify_scale -->\n## Verify at scale\n\n`python -m bench.run_all --only verify_scale --quick` — " in md
    assert "`python -m bench.verify_scale --sizes 50000,200000 --jobs 2 --quick`" in md
    assert md.count("<!-- /bench:") == 2
    # cells from the measurement itself: the bundled CC3M file has 8,000 captions; the synthetic
    # outputs have 50k/200k ledger rows, 70% kept
    assert "| cc3m_val_8k (hypernymised alt-text) | 8000 |" in md
    assert "| 50,000 | 35,000 | 8 |" in md and "| 200,000 | 140,000 | 8 |" in md
    assert "| sha256sum | 1 |" in md and "| verify --jobs 1 | 1 |" in md and "| verify --jobs 2 | 2 |" in md

    # --only replaces its own section and keeps everything else, text outside markers included
    hand = "# Benchmarks\n\nnotes kept as they are\n\n" + md[md.index("<!-- bench:verify_scale -->"):]
    out.write_text(hand.replace("| sha256sum | 1 |", "| sha256sum | STALE |") + "\ntrailing text\n")
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "rewrite_faithfulness", "--output", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ, MMCORPUS_PROGRESS="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md2 = out.read_text()
    assert md2.startswith("# Benchmarks\n\nnotes kept as they are\n\n<!-- bench:verify_scale -->")
    assert "| sha256sum | STALE |" in md2 and "trailing text" in md2
    assert md2.count("<!-- bench:rewrite_faithfulness -->") == 1 and md2.rstrip().endswith("<!-- /bench:rewrite_faithfulness -->")


def test_unknown_bench_and_a_failing_bench(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--only", "nosuch", "--output", str(tmp_path / "x.md")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "unknown bench nosuch" in proc.stderr
    assert not (tmp_path / "x.md").exists()

    boom = types.ModuleType("bench.boom")
    boom.TITLE = "Boom"

    def section(quick=False):
        raise RuntimeError("disk on fire")

    boom.section = section
    monkeypatch.setitem(sys.modules, "bench.boom", boom)
    block, ok = run_all.run_section("boom", quick=True)
    assert not ok
    assert block.startswith("<!-- bench:boom -->\n## boom\n\n`python -m bench.run_all --only boom --quick`")
    assert "**FAILED** in this run" in block and "RuntimeError: disk on fire" in block


def test_scale_input_images_are_deterministic_and_distinct(tmp_path):
    from bench import scale

    info = scale.write_input(str(tmp_path / "a"), 3_000, image_share=0.02)
    assert info["pairs"] == 3_000 and info["images"] == 60
    t = pq.read_table(tmp_path / "a" / "00000.parquet")
    assert t.column_names == ["key", "url", "caption", "status", "jpg"] and t.num_rows == 3_000
    jpgs = [b for b in t.column("jpg").to_pylist() if b is not None]
    assert len(jpgs) == 60 and all(b[:3] == b"\xff\xd8\xff" for b in jpgs)
    assert len({hashlib.sha256(b).hexdigest() for b in jpgs}) == 60
    scale.write_input(str(tmp_path / "b"), 3_000, image_share=0.02)
    assert (tmp_path / "a" / "00000.parquet").read_bytes() == (tmp_path / "b" / "00000.parquet").read_bytes()


def test_engine_graph_counts_the_tasks_of_a_real_stage_without_a_cluster():
    """bench.engine_graph translates a real stage (filter, run first on the DirectRunner) at two partition
    counts without a cluster. The stage reads its one input file through a Reshuffle into P partitions:
    one split of P buckets (a single input partition needs one hop) and P merges, worked out by hand;
    every shuffle of P > 32 on both sides runs in hops (slices, regroups and pieces), and the graph
    grows faster than P (each hop has about k = P^(1/2) branches here)."""
    from bench import engine_graph

    res = engine_graph.run([40, 160], ["filter"])
    a, b = res["rows"]
    assert (a["stage"], a["partitions"], b["partitions"]) == ("filter", 40, 160)
    for r, p in ((a, 40), (b, 160)):
        assert r["kinds"]["reshuffle-split"] == 1
        assert r["kinds"]["reshuffle-bucket"] == p and r["kinds"]["reshuffle-merge"] == p
        assert r["kinds"]["group-slice"] > 0 and r["kinds"]["group-regroup"] > 0 and r["kinds"]["group-piece"] > 0
        assert "group-bucket" not in r["kinds"]  # no one-stage P x P shuffle left
    assert b["tasks"] > 4 * a["tasks"]
    md = engine_graph.to_markdown(res, "python -m bench.engine_graph --partitions 40,160 --stages filter")
    assert "| filter | 40 | 2 | " in md and "| filter | 160 | 2 | " in md
