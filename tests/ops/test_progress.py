"""Progress display and time-per-stage summary of local runs (real DirectRunner stage runs)."""

from __future__ import annotations

import contextlib

import apache_beam as beam
from rich.console import Console

from pipelines import progress
from pipelines.runner import run_stage
from schemas.records import Outcome, Pair


def _run(output_dir, n: int, force: bool = True):
    pairs = [Pair(key=f"k{i:04d}", caption=f"caption number {i}") for i in range(n)]
    return run_stage(
        stage="filter", output_dir=str(output_dir), config={"progress_test": True},
        input_info={"kind": "test", "fingerprint": f"progress-{n}", "records": n},
        build=lambda p: p | "Pairs" >> beam.Create(pairs) | "Keep" >> beam.Map(lambda x: Outcome.kept(x)),
        beam_args=[], num_shards=2, force=force,
    )


def test_live_counter_shows_every_record_and_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMCORPUS_PROGRESS", "1")
    _run(tmp_path / "out", 300)
    err = capsys.readouterr().err
    assert "filter" in err and "300/300" in err and "rec/s" in err
    assert progress._TICKERS == {}  # the display unregisters itself


def test_no_display_when_switched_off_but_records_still_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMCORPUS_PROGRESS", "0")
    seen = []
    real = progress.stage_progress

    @contextlib.contextmanager
    def spy(stage, total=None, enabled=None):
        with real(stage, total, enabled) as counter:
            seen.append(counter)
            yield counter

    monkeypatch.setattr(progress, "stage_progress", spy)
    _run(tmp_path / "out", 120)
    assert "120/120" not in capsys.readouterr().err
    assert seen and seen[-1].n == 120


def test_summary_lists_time_per_stage_including_skipped_reruns(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCORPUS_PROGRESS", "0")
    monkeypatch.setattr(progress, "SUMMARY", [])
    first = _run(tmp_path / "out", 50, force=False)
    again = _run(tmp_path / "out", 50, force=False)
    assert (first.skipped, again.skipped) == (False, True)
    assert [(t.stage, t.inputs, t.outputs, t.skipped) for t in progress.SUMMARY] == [
        ("filter", 50, 50, False), ("filter", 50, 50, True)]
    console = Console(record=True, width=120)
    progress.print_summary(console=console)
    text = console.export_text()
    assert "time per stage" in text and "filter (up to date)" in text and "total" in text
    total = sum(t.seconds for t in progress.SUMMARY)
    assert f"{total:.1f}" in text
