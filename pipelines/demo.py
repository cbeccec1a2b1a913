"""`mmcorpus demo`: the whole pipeline on the bundled real sample data with the DirectRunner.

Three inputs, all in data/sample/ (see its ATTRIBUTION.md):
  photos  26 CC BY / public-domain photos downloaded by the real img2dataset from a local server
          (webdataset shards + status parquet, 2 failed downloads included):
          filter → dedup → rewrite → pack (Parquet and WebDataset) → export for MiniCPM-V fine-tuning
  cc3m    8,000 Conceptual Captions validation captions (metadata pass, no images): filter → dedup
  laion   1,000 LAION-style alt-texts from img2dataset's test set (metadata pass): filter → dedup

The rewrite stage uses the offline template backend by default (no model, deterministic; the
ledger's ``model`` column says ``offline-template``). ``--endpoint URL --model NAME`` runs it against
a real OpenAI-compatible server instead (``make demo-vllm`` starts a local vLLM for that).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.errors import UserError
from transforms.stage_io import read_manifest

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "data" / "sample"

import sys

# Logs of `make demo` are read in CI and pipes too: keep tables readable there.
console = Console(width=None if sys.stdout.isatty() else 132)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="build/demo", help="where the demo writes (default build/demo)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the bundled sample data directory")
    p.add_argument("--endpoint", help="OpenAI-compatible endpoint for the rewrite stage (default: offline template)")
    p.add_argument("--model", help="served model name at --endpoint")
    p.add_argument("--seq-len", type=int, default=2048, help="packed sequence length (default 2048)")
    p.add_argument("--stage-profile", type=int, default=3, choices=(1, 2, 3), help="MiniCPM-V pretraining stage (default 3)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if its output is up to date")
    return p


def _stage(name: str, module_main, argv: list[str], timings: list) -> None:
    t0 = time.monotonic()
    console.rule(f"[bold]{escape(name)}")
    rc = module_main(argv)
    if rc:
        raise UserError(f"demo step {name} failed with exit code {rc}")
    timings.append((name, time.monotonic() - t0))


def run(args: argparse.Namespace) -> int:
    from pipelines import dedup, export, filter as filter_stage, pack, rewrite, verify

    data = pathlib.Path(args.data)
    out = pathlib.Path(args.output)
    if not (data / "i2d_webdataset").is_dir():
        raise UserError(f"{data} does not hold the bundled sample data (expected {data}/i2d_webdataset)")
    force = ["--force"] if args.force else []
    if args.endpoint and not args.model:
        raise UserError("--endpoint needs --model (the served model name)")
    rewrite_backend = (
        ["--backend", "openai", "--endpoint", args.endpoint, "--model", args.model]
        if args.endpoint
        else ["--backend", "offline-template"]
    )
    os.environ.setdefault("MMCORPUS_PROGRESS", "0")  # step lines below are the progress here
    timings: list[tuple[str, float]] = []
    photos = out / "photos"
    steps = [
        ("photos/filter", filter_stage.main, ["--input", str(data / "i2d_webdataset"), "--output", str(photos / "filter"), *force]),
        ("photos/dedup", dedup.main, ["--input", str(photos / "filter"), "--output", str(photos / "dedup"), *force]),
        ("photos/rewrite", rewrite.main, ["--input", str(photos / "dedup"), "--output", str(photos / "rewrite"),
                                          "--policy", "all", *rewrite_backend, *force]),
        ("photos/pack", pack.main, ["--input", str(photos / "rewrite"), "--output", str(photos / "pack"),
                                    "--stage", str(args.stage_profile), "--seq-len", str(args.seq_len),
                                    "--format", "parquet", *force]),
        ("photos/pack-wds", pack.main, ["--input", str(photos / "rewrite"), "--output", str(photos / "pack-wds"),
                                        "--stage", str(args.stage_profile), "--seq-len", str(args.seq_len),
                                        "--format", "webdataset", *force]),
        ("cc3m/filter", filter_stage.main, ["--input", str(data / "cc3m_val_captions_8k.tsv"), "--caption-col", "0",
                                            "--url-col", "1", "--output", str(out / "cc3m" / "filter"), *force]),
        ("cc3m/dedup", dedup.main, ["--input", str(out / "cc3m" / "filter"), "--output", str(out / "cc3m" / "dedup"), *force]),
        ("laion/filter", filter_stage.main, ["--input", str(data / "img2dataset_sample_1000.parquet"), "--caption-col", "TEXT",
                                             "--url-col", "URL", "--output", str(out / "laion" / "filter"), *force]),
        ("laion/dedup", dedup.main, ["--input", str(out / "laion" / "filter"), "--output", str(out / "laion" / "dedup"), *force]),
    ]
    for name, fn, argv in steps:
        _stage(name, fn, argv, timings)
    console.rule("[bold]photos/export minicpmv")
    export.main(["minicpmv", "--input", str(photos / "rewrite"), "--output", str(photos / "export-minicpmv")])

    # verify every stage output
    failed = []
    for name, _, argv in steps:
        stage_dir = argv[argv.index("--output") + 1]
        if not all(ch.ok for ch in verify.verify(stage_dir)):
            failed.append(stage_dir)

    console.rule("[bold]what the demo built")
    console.print(summary_table(steps, dict(timings)))
    console.rule("[bold]one decoded pack (photos/pack, pack 0)")
    console.print(escape(pack.render_pack(str(photos / "pack"), 0)))
    console.print(
        f"\nOutputs are in [bold]{escape(str(out))}[/bold]. Look inside with:\n"
        f"  mmcorpus inspect {out}/photos/pack\n"
        f"  mmcorpus inspect {out}/photos/rewrite --samples 3\n"
        f"  mmcorpus stats {out}/photos --plot {out}/photos.png\n"
        f"  mmcorpus verify {out}/photos/filter"
    )
    if failed:
        console.print(f"[red]verify failed for: {', '.join(failed)}[/red]")
    else:
        console.print("[green]verify: every stage output passed its invariants and checksums[/green]")
    write_demo_report(out, data)
    return 1 if failed else 0


def write_demo_report(out: pathlib.Path, data: pathlib.Path) -> None:
    """The demo's last step: one static HTML report of every run it wrote (``mmcorpus report``)."""
    from pipelines import report

    console.rule("[bold]report")
    raw = tuple(str(p) for p in (data / "i2d_webdataset", data / "img2dataset_sample_1000.parquet") if p.exists())
    res = report.write_report(str(out), str(out / "report"), report.ReportConfig(raw_inputs=raw))
    console.print(f"report of {', '.join(res['runs'])}: {res['thumbnails']} thumbnails, {res['traced_keys']} traced keys.\n"
                  f"Open it: [bold]{escape(os.path.abspath(res['index']))}[/bold]\n"
                  f"(or share it: python -m http.server -d {escape(str(out / 'report'))})")


def summary_table(steps, seconds: dict[str, float]) -> Table:
    t = Table(title="stages (all verified: inputs = ledger rows, kept = outputs, checksums)", title_justify="left")
    for col, just in (("step", "left"), ("in", "right"), ("kept", "right"), ("rejected", "right"),
                      ("duplicate", "right"), ("error", "right"), ("top reasons", "left"), ("s", "right")):
        t.add_column(col, justify=just)
    for name, _, argv in steps:
        m = read_manifest(argv[argv.index("--output") + 1])
        c = m.counts
        top = sorted(((n, k) for k, n in c["by_reason"].items() if not k.startswith("kept/")), reverse=True)[:3]
        t.add_row(
            name, f"{c['inputs']:,}", f"{c['outputs']:,}", f"{c['by_status']['rejected']:,}",
            f"{c['by_status']['duplicate']:,}", f"{c['by_status']['error']:,}",
            escape(", ".join(f"{k.split('/', 1)[1]} {n}" for n, k in top)), f"{seconds.get(name, 0):.1f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args)
