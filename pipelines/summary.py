"""Human-readable summaries of stage results (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.runner import StageResult

import sys

console = Console(width=None if sys.stdout.isatty() else 132)


def counts_table(title: str, counts: dict) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("status")
    t.add_column("reason")
    t.add_column("rows", justify="right")
    t.add_column("share", justify="right")
    total = max(1, counts.get("ledger_rows", 0))
    for name, n in sorted(counts.get("by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])):
        status, reason = name.split("/", 1)
        t.add_row(status, reason, f"{n:,}", f"{100 * n / total:.1f}%")
    return t


def print_stage_summary(result: StageResult, output_dir: str) -> None:
    m = result.manifest
    c = m.counts
    state = "up to date, skipped" if result.skipped else f"{result.seconds:.1f}s"
    console.print(
        f"[bold]{m.stage}[/bold]: {c['inputs']:,} in → {c['outputs']:,} kept "
        f"({c['by_status'].get('rejected', 0):,} rejected, {c['by_status'].get('duplicate', 0):,} duplicate, "
        f"{c['by_status'].get('error', 0):,} error) \\[{state}] → {escape(output_dir)}"
    )
    console.print(counts_table(f"{m.stage} ledger", c))
