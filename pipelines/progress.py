"""Progress for long local runs: a live rich counter per stage (records, rate, elapsed) and a
closing table with the time each stage took.

The counter is fed by ``ReportProgress``, a pass-through step the stage runner puts in front of
the stage writer. Under the DirectRunner (in-process) every record it sees ticks the live display of
the current process; on remote runners (Dataflow, Flink, Spark) the step runs on workers, where no
display is registered, and it costs one dictionary lookup per record (``bench/ops_overhead.py``). The display is on when stderr
is a terminal, or when ``MMCORPUS_PROGRESS=1``; ``MMCORPUS_PROGRESS=0`` switches it off.

Example:
    with stage_progress("filter", total=1000):
        with beam.Pipeline() as p:
            outcomes = build(p) | ReportProgress("filter")
    record_stage("filter", seconds=3.2, inputs=1000, outputs=900)
    print_summary()
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import apache_beam as beam

from transforms.stage_io import record_count

# Records between two updates of the live bar.
REDRAW_EVERY = 256
# stage -> tick(n) of the live display in this process (empty when nothing is displayed).
_TICKERS: dict[str, Callable[[int], None]] = {}


def progress_enabled() -> bool:
    """``MMCORPUS_PROGRESS`` (1/0) when set, otherwise whether stderr is a terminal."""
    env = os.environ.get("MMCORPUS_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no", "off")
    return sys.stderr.isatty()


class ReportProgressFn(beam.DoFn):
    """Passes every element through and ticks the stage's live display (when one is registered),
    by a batch's length for a batch of outcomes (``stage_io.encode_batch``)."""

    def __init__(self, stage: str):
        self.stage = stage

    def process(self, element):
        tick = _TICKERS.get(self.stage)
        if tick is not None:
            tick(record_count(element))
        yield element


class ReportProgress(beam.PTransform):
    """Pass-through step that reports each record to the live progress display of ``stage``.

    Args:
        stage: the stage name the display was opened for (``stage_progress(stage)``).

    Example:
        outcomes | "Progress" >> ReportProgress("filter")
    """

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def expand(self, pcoll):
        return pcoll | "Report" >> beam.ParDo(ReportProgressFn(self.stage))


class _Counter:
    """Thread-safe count shared by the DoFn (runner threads) and the display (refresh thread)."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def add(self, k: int) -> None:
        with self._lock:
            self.n += k


@contextlib.contextmanager
def stage_progress(stage: str, total: int | None = None, enabled: bool | None = None) -> Iterator[_Counter]:
    """Show a live counter for ``stage`` while the body runs (the pipeline runs at its ``with`` exit).

    Args:
        stage: stage name; ``ReportProgress(stage)`` steps tick this display.
        total: expected number of records, when known (the previous stage's outputs).
        enabled: force the display on/off; default ``progress_enabled()``.

    Yields the counter (its ``n`` is the number of records seen so far in this process).
    """
    counter = _Counter()
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        _TICKERS[stage] = counter.add
        try:
            yield counter
        finally:
            _TICKERS.pop(stage, None)
        return

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    if total:
        columns += [BarColumn(), MofNCompleteColumn()]
    else:
        columns += [TextColumn("{task.completed:,.0f} records")]
    columns += [TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    t0 = time.monotonic()
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task(stage, total=total or None, rate="")

        def tick(k: int) -> None:
            counter.add(k)
            # Redraw data every REDRAW_EVERY records only: rich refreshes the screen at 4 Hz anyway,
            # and a bar update per record would cost more than many stages' own work.
            if counter.n % REDRAW_EVERY == 0:
                elapsed = max(time.monotonic() - t0, 1e-9)
                bar.update(task, completed=counter.n, rate=f"{counter.n / elapsed:,.0f} rec/s")

        _TICKERS[stage] = tick
        try:
            yield counter
        finally:
            _TICKERS.pop(stage, None)
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.update(task, completed=counter.n, rate=f"{counter.n / elapsed:,.0f} rec/s")


@dataclass
class StageTiming:
    """One finished (or skipped) stage of this process, for the closing summary."""

    stage: str
    seconds: float
    inputs: int | None = None
    outputs: int | None = None
    skipped: bool = False
    output_dir: str = ""


# Stages finished in this process, in order.
SUMMARY: list[StageTiming] = []


def record_stage(stage: str, seconds: float, inputs: int | None = None, outputs: int | None = None,
                 skipped: bool = False, output_dir: str = "") -> StageTiming:
    """Remember one stage's timing for ``print_summary``."""
    t = StageTiming(stage, seconds, inputs, outputs, skipped, output_dir)
    SUMMARY.append(t)
    return t


def summary_table(timings: list[StageTiming] | None = None):
    """A rich ``Table``: stage, inputs, outputs, seconds, records/s, share of the total time."""
    from rich.table import Table

    timings = SUMMARY if timings is None else timings
    total = sum(t.seconds for t in timings)
    table = Table(title="time per stage")
    for col, justify in (("stage", "left"), ("in", "right"), ("out", "right"), ("seconds", "right"),
                         ("records/s", "right"), ("share", "right")):
        table.add_column(col, justify=justify)
    for t in timings:
        rate = "" if t.skipped or not t.inputs or t.seconds <= 0 else f"{t.inputs / t.seconds:,.0f}"
        table.add_row(
            t.stage + (" (up to date)" if t.skipped else ""),
            "" if t.inputs is None else f"{t.inputs:,}",
            "" if t.outputs is None else f"{t.outputs:,}",
            f"{t.seconds:.1f}",
            rate,
            f"{100 * t.seconds / total:.0f}%" if total > 0 else "",
        )
    table.add_section()
    table.add_row("total", "", "", f"{total:.1f}", "", "")
    return table


def print_summary(timings: list[StageTiming] | None = None, console=None) -> None:
    """Print the time-per-stage table (to stderr unless a console is given)."""
    from rich.console import Console

    (console or Console(stderr=True)).print(summary_table(timings))
