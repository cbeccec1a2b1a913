"""Run one stage as a Beam pipeline: skip it when its output is up to date, clear stale output,
build, run, and hand back the manifest it wrote."""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import engines, progress  # engine flags; live counter + time-per-stage summary
from schemas.manifest import DATA_DIR, LEDGER_DIR, MANIFEST_NAME, Manifest, config_hash
from transforms.stage_io import WriteStageOutput, join, read_bytes

log = logging.getLogger("mmcorpus")


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    """Flags every stage command shares. Anything not recognised goes to Beam's PipelineOptions."""
    parser.add_argument("--output", required=True, help="output directory (local path or gs://, s3://)")
    parser.add_argument(
        "--num-shards", "--num_shards", dest="num_shards", type=int, default=8,
        help="key-hash shards of data and ledger (default 8)",
    )
    parser.add_argument("--config", help="TOML config file; its sections override the defaults")
    parser.add_argument("--force", action="store_true", help="rerun even if the output is up to date")


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """PipelineOptions from the pass-through flags; DirectRunner by default."""
    opts = PipelineOptions(engines.translate(beam_args))  # --runner dask and its short flags
    std = opts.view_as(beam.options.pipeline_options.StandardOptions)
    if not std.runner:
        std.runner = "DirectRunner"
    return opts


def _existing_manifest(output_dir: str) -> Manifest | None:
    path = join(output_dir, MANIFEST_NAME)
    if not FileSystems.exists(path):
        return None
    try:
        return Manifest.from_json(read_bytes(path).decode("utf-8"))
    except Exception:  # a torn or foreign manifest: treat the output as stale
        log.warning("ignoring unreadable %s", path)
        return None


def is_up_to_date(output_dir: str, config: dict, input_info: dict) -> Manifest | None:
    """The existing manifest when it was written from the same config and input and every file it
    lists is present with its recorded size; otherwise None."""
    m = _existing_manifest(output_dir)
    if m is None or m.config_hash != config_hash(config):
        return None
    if m.input.get("fingerprint") != input_info.get("fingerprint"):
        return None
    for entry in m.files:
        path = join(output_dir, entry.path)
        if not FileSystems.exists(path):
            return None
        if "://" not in path and os.path.getsize(path) != entry.bytes:
            return None
    return m


def clear_output(output_dir: str) -> None:
    """Remove a previous (stale or partial) output: manifest first, so a crash mid-way never
    leaves a manifest pointing at deleted files."""
    manifest = join(output_dir, MANIFEST_NAME)
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    for sub in (DATA_DIR, LEDGER_DIR):
        pattern = join(output_dir, sub, "*")
        matches = FileSystems.match([pattern])[0].metadata_list
        hidden = FileSystems.match([join(output_dir, sub, ".tmp-*")])[0].metadata_list
        paths = sorted({m.path for m in matches + hidden})
        if paths:
            FileSystems.delete(paths)


@dataclass
class StageResult:
    manifest: Manifest
    skipped: bool
    seconds: float


def run_stage(
    *,
    stage: str,
    output_dir: str,
    config: dict[str, Any],
    input_info: dict[str, Any],
    build: Callable[[beam.Pipeline], Any],
    beam_args: list[str],
    num_shards: int = 8,
    force: bool = False,
) -> StageResult:
    """Build and run one stage pipeline.

    Args:
        stage: stage name.
        output_dir: where data/, ledger/ and manifest.json go.
        config: resolved stage config (hashed into the manifest; decides whether a rerun is needed).
        input_info: input description with a ``fingerprint``.
        build: ``build(pipeline) -> outcomes`` or ``(outcomes, {name: single-value PCollection})``
            whose values go into ``manifest.extra``, or a dict ``{"outcomes": .., "extra": {..},
            "files": PCollection[FileEntry], "write_data": bool}`` for stages that write their own
            files (see ``WriteStageOutput``).
        beam_args: pass-through Beam flags (``--runner``, ``--project``, ``--direct_num_workers`` ...).
        num_shards: data/ledger shards.
        force: rerun even when up to date.
    """
    t0 = time.monotonic()
    full_config = dict(config, num_shards=num_shards)
    if not force:
        m = is_up_to_date(output_dir, full_config, input_info)
        if m is not None:
            log.info("%s: %s is up to date (config %s), skipping", stage, output_dir, m.config_hash[:12])
            progress.record_stage(stage, time.monotonic() - t0, m.counts.get("inputs"), m.counts.get("outputs"),
                                  skipped=True, output_dir=output_dir)
            return StageResult(manifest=m, skipped=True, seconds=time.monotonic() - t0)
    clear_output(output_dir)
    with progress.stage_progress(stage, total=input_info.get("records")), beam.Pipeline(
        options=beam_options(beam_args)
    ) as p:
        built = build(p)
        if isinstance(built, dict):
            spec = dict(built)
        elif isinstance(built, tuple):
            spec = {"outcomes": built[0], "extra": built[1]}
        else:
            spec = {"outcomes": built}
        outcomes = spec["outcomes"] | f"Progress_{stage}" >> progress.ReportProgress(stage)
        _ = outcomes | f"Write_{stage}" >> WriteStageOutput(
            output_dir,
            stage,
            full_config,
            input_info,
            num_shards=num_shards,
            extra=spec.get("extra") or {},
            write_data=spec.get("write_data", True),
            files=spec.get("files"),
        )
    m = _existing_manifest(output_dir)
    if m is None:
        raise RuntimeError(f"{stage}: pipeline finished but {output_dir}/{MANIFEST_NAME} was not written")
    seconds = time.monotonic() - t0
    progress.record_stage(stage, seconds, m.counts.get("inputs"), m.counts.get("outputs"), output_dir=output_dir)
    return StageResult(manifest=m, skipped=False, seconds=seconds)
