"""The ``mmcorpus`` command: a thin dispatcher to one module per subcommand.

Each subcommand module exposes ``main(argv: list[str]) -> int``. Modules are imported only when
their command runs, so ``mmcorpus --help`` stays fast and a missing optional extra only breaks the
command that needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

from schemas.errors import StageFailed, UserError

# name -> (module, one-line help). Add a line here to add a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "filter": ("pipelines.filter", "ingest raw inputs and apply caption/image filters"),
    "dedup": ("pipelines.dedup", "exact + near-duplicate removal (MinHash LSH, perceptual hashes)"),
    "select": ("pipelines.select_stage", "draw a training stage's source/language mixture by key hash"),
    "rewrite": ("pipelines.rewrite", "rewrite captions into QA pairs through an OpenAI-compatible endpoint"),
    "rewriter": ("rewriter.cli", "seed annotation, SFT export, fine-tuning and serving of the rewriter"),
    "pack": ("pipelines.pack", "token accounting and packing into Parquet/WebDataset training shards"),
    "sft": ("pipelines.sft", "SFT data: ingest, part 1/2 split, chat-templated packs, exports"),
    "rlaifv": ("pipelines.rlaifv", "RLAIF-V preference data: generate, feedback, pairs, DPO export"),
    "export": ("pipelines.export", "export data for other tools (e.g. MiniCPM-V fine-tuning JSON)"),
    "verify": ("pipelines.verify", "check a stage output's invariants and checksums"),
    "inspect": ("pipelines.inspection", "show what an output directory holds; trace a key"),
    "stats": ("pipelines.stats", "statistics and plots of an output directory"),
    "ocr": ("pipelines.ocr", "OCR every image (RapidOCR, offline) and add stage-3 OCR samples"),
    "synthdoc": ("pipelines.synthdoc", "render synthetic document pages (SynthDoG-style) as a stage output"),
    "report": ("pipelines.report", "static HTML report of a run: samples by reason, dedup clusters, rewrites, packs"),
    "demo": ("pipelines.demo", "run the whole pipeline on the bundled sample data"),
}


def _usage() -> str:
    lines = ["usage: mmcorpus COMMAND [ARGS] [BEAM PIPELINE OPTIONS]", "", "commands:"]
    for name, (module, help_) in COMMANDS.items():
        try:
            available = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            available = False
        if available:
            lines.append(f"  {name:<10} {help_}")
    lines += [
        "",
        "Run `mmcorpus COMMAND --help` for a command's flags. Flags a command does not know are",
        "passed to Apache Beam, e.g. --runner DataflowRunner --project P --region R --temp_location gs://...",
    ]
    return "\n".join(lines)


def _debug() -> bool:
    """``MMCORPUS_LOG_LEVEL=DEBUG``: a failed stage shows its traceback too."""
    return os.environ.get("MMCORPUS_LOG_LEVEL", "").strip().upper() == "DEBUG"


def _run(main_fn, argv: list[str], name: str) -> int:
    """``main_fn(argv)``'s exit code; a UserError (exit 2) or a StageFailed from the engine (exit 1)
    becomes one ``mmcorpus NAME: error: ...`` line on stderr instead of a traceback."""
    try:
        return int(main_fn(argv) or 0)
    except UserError as e:
        print(f"mmcorpus {name}: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        if _debug():
            raise
        print(f"mmcorpus {name}: error: {e}", file=sys.stderr)
        return 1


def run_script(main_fn, name: str) -> None:
    """Entry for a stage module run as a file (``python pipelines/filter.py ...``, as Airflow's Beam
    operator does): the same exit codes and error messages as ``mmcorpus NAME``."""
    raise SystemExit(_run(main_fn, sys.argv[1:], name))


def _quiet_optional_gcp(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return "apitools not found" not in msg and "Failed to import GCSFileSystem" not in msg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("MMCORPUS_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Beam's GCP extras are optional; its import-time warnings about them are noise for local runs.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_optional_gcp)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from transforms.stage_io import software_version

        print(f"mmcorpus {software_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmcorpus: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return _run(module.main, rest, name)


if __name__ == "__main__":
    sys.exit(main())
