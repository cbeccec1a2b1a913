"""Run one stage as a Beam pipeline: lock the output directory, skip the stage when its output is up to
date, clear stale output, build and run into a staging area, publish (manifest last), and hand back the
manifest it wrote."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import engines, progress  # engine flags; live counter + time-per-stage summary
from schemas.errors import UserError
from schemas.manifest import DATA_DIR, LEDGER_DIR, MANIFEST_NAME, Manifest, config_hash
from storage.files import input_bytes, join, read_bytes
from storage.lock import RunLock
from storage.staging import clear_staging, publish, staging_dir
from transforms.stage_io import WRITER_PEAK_METRIC, WriteStageOutput

log = logging.getLogger("mmcorpus")

# Output bytes per data/ledger shard a stage aims at when --num-shards is not given (docs/scale.md).
DEFAULT_TARGET_SHARD_BYTES = 512 * 1024 * 1024
# Set to 1 to report each shard write's own peak memory (tracemalloc; slows the writer), or to a file
# path that every shard write appends a JSON line to (works on runners without metrics, e.g. Dask).
MEASURE_WRITER_MEMORY_ENV = "MMCORPUS_WRITER_MEMORY"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``536870912``, ``512MiB``, ``512M``, ``1.5G`` -> bytes (binary units: K = 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 536870912, 512MiB, 1G)")
    value = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be at least 1 byte")
    return int(value)


# Stored bytes of one ledger row, generously (key, stage, status, reason, short detail, source; zstd):
# sizes the shards of stages that write only a ledger through WriteStageOutput (pack).
LEDGER_ROW_BYTES = 256


def ledger_only_input_info(input_info: dict[str, Any]) -> dict[str, Any]:
    """``input_info`` for sizing a ledger-only output: its bytes are the ledger's, ~LEDGER_ROW_BYTES per record."""
    return {"bytes": int(input_info.get("records") or 0) * LEDGER_ROW_BYTES}


def resolve_num_shards(num_shards: int | None, target_shard_bytes: int, input_info: dict[str, Any]) -> int:
    """``num_shards`` when given, else one shard per ``target_shard_bytes`` of input (at least 1).

    Input bytes stand in for output bytes: filter and dedup only drop records, rewrite adds a little
    text to records whose bytes are mostly images; pack writes only its ledger here and sizes it with
    ``ledger_only_input_info``.
    """
    if num_shards is not None:
        if num_shards < 1:
            raise UserError(f"--num-shards {num_shards}: must be at least 1")
        return num_shards
    if target_shard_bytes < 1:
        raise UserError(f"--target-shard-bytes {target_shard_bytes}: must be at least 1")
    return max(1, -(-input_bytes(input_info) // target_shard_bytes))


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    """Flags every stage command shares. Anything not recognised goes to Beam's PipelineOptions."""
    parser.add_argument("--output", required=True, help="output directory (local path or gs://, s3://)")
    parser.add_argument(
        "--num-shards", "--num_shards", dest="num_shards", type=int, default=None,
        help="key-hash shards of data and ledger (default: sized by --target-shard-bytes)",
    )
    parser.add_argument(
        "--target-shard-bytes", "--target_shard_bytes", dest="target_shard_bytes", type=parse_size,
        default=DEFAULT_TARGET_SHARD_BYTES,
        help="aim at about this many bytes per data/ledger shard, counted on the input "
        "(default 512MiB; accepts 512MiB, 1G, ...); --num-shards overrides it",
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


@contextlib.contextmanager
def frozen_heap():
    """Run the pipeline with the objects that exist before it moved out of the cyclic GC's reach
    (``gc.freeze``), and put them back after (``gc.unfreeze``).

    Every full collection scans every live container object. At start the process already holds
    Beam's, pyarrow's and our modules (~300k objects, more when a caller holds data, e.g. a
    benchmark's records); a stage's read/transform/write loop allocates several tracked objects a
    record, which triggers a few full collections per 100k records, each scanning that whole heap:
    5-7 µs a record of CPU
    (measured at 100k caption-only records: 0.5-0.7 s of GC against 0.15-0.25 s frozen). Objects made
    during the run are collected as before, so memory stays bounded; the frozen ones were alive at
    the start anyway. A caller that froze its heap itself (``gc.get_freeze_count()``), or runs with
    the GC off, is left as it is."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def bound_dask_partitions(opts: PipelineOptions, target_shard_bytes: int, input_info: dict[str, Any]) -> None:
    """On the Dask engine without ``--dask_npartitions``: set ``--dask_min_partitions`` to the larger of
    the input's bytes / ``target_shard_bytes`` and its records / ``--dask_partition_records`` (both
    rounded up), so a shuffle's partition, which a worker holds as one list, holds about one target
    shard of input and a bounded number of records whatever the corpus size (docs/scale.md, the
    bound). Records count when the input says how many it has (stage outputs do). The engine takes the
    larger of this and the cluster's threads. It is not in the manifest's config: the partition count
    changes no output byte. Other runners: nothing changes."""
    if not engines.is_dask(opts.view_as(beam.options.pipeline_options.StandardOptions).runner):
        return
    from apache_beam.runners.dask.dask_runner import DaskOptions  # dask is an extra: import it only here

    local = opts.view_as(engines.LocalDaskOptions)
    if local.dask_max_branch is not None and local.dask_max_branch < 2:
        raise UserError(f"--dask_max_branch {local.dask_max_branch}: must be at least 2 (a shuffle of more "
                        "partitions than this runs in hops of at most this many branches)")
    if opts.view_as(DaskOptions).npartitions:
        return
    if local.dask_partition_records is not None and local.dask_partition_records < 1:
        raise UserError(f"--dask_partition_records {local.dask_partition_records}: must be at least 1")
    if not local.dask_min_partitions:
        by_bytes = resolve_num_shards(None, target_shard_bytes, input_info)
        records = int(input_info.get("records") or 0)
        per = local.dask_partition_records or engines.DEFAULT_PARTITION_RECORDS
        local.dask_min_partitions = max(by_bytes, -(-records // per))


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
    leaves a manifest pointing at deleted files; then the files and the staging area."""
    manifest = join(output_dir, MANIFEST_NAME)
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    clear_staging(output_dir)
    for sub in (DATA_DIR, LEDGER_DIR):
        pattern = join(output_dir, sub, "*")
        matches = FileSystems.match([pattern])[0].metadata_list
        hidden = FileSystems.match([join(output_dir, sub, ".tmp-*")])[0].metadata_list
        paths = sorted({m.path for m in matches + hidden})
        if paths:
            FileSystems.delete(paths)


@dataclass
class StageResult:
    """What ``run_stage`` did. ``writer_peak_bytes``: the largest peak memory of one shard write, and
    the number of shards measured, when ``MMCORPUS_WRITER_MEMORY=1`` (else None)."""

    manifest: Manifest
    skipped: bool
    seconds: float
    writer_peak_bytes: dict[str, int] | None = None


def _writer_peaks(result, stage: str, log_path: str | None) -> dict[str, int] | None:
    """Per-shard writer peaks from the run's metrics, else from the JSON lines of ``log_path``."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_name(WRITER_PEAK_METRIC))["distributions"]
    except Exception:  # a runner without metrics support
        found = []
    for d in found:
        if d.key.metric.namespace == f"mmcorpus.{stage}":
            v = d.committed or d.attempted
            if v is not None and v.count:
                return {"max": int(v.max), "min": int(v.min), "mean": int(v.sum / v.count), "shards": int(v.count)}
    if log_path and os.path.exists(log_path):
        import json

        with open(log_path, encoding="utf-8") as f:
            peaks = [json.loads(line)["peak_bytes"] for line in f if line.strip() and json.loads(line)["stage"] == stage]
        if peaks:
            return {"max": max(peaks), "min": min(peaks), "mean": sum(peaks) // len(peaks), "shards": len(peaks)}
    return None


def _measure_setting() -> bool | str:
    value = os.environ.get(MEASURE_WRITER_MEMORY_ENV, "")
    if value in ("", "0"):
        return False
    return True if value == "1" else os.path.abspath(value)


def run_stage(
    *,
    stage: str,
    output_dir: str,
    config: dict[str, Any],
    input_info: dict[str, Any],
    build: Callable[[beam.Pipeline], Any],
    beam_args: list[str],
    num_shards: int | None = None,
    force: bool = False,
    target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
) -> StageResult:
    """Build and run one stage pipeline.

    The run holds ``OUTPUT/.mmcorpus.lock`` (``storage.lock``: a second run into the same directory
    refuses), writes into ``OUTPUT/.staging/`` and publishes (``storage.staging``: files, then the
    manifest) only after the pipeline succeeded; stages that write their own files write them under
    ``storage.staging.staging_dir(output_dir)``.

    Args:
        stage: stage name.
        output_dir: where data/, ledger/ and manifest.json go.
        config: resolved stage config (hashed into the manifest; decides whether a rerun is needed).
        input_info: input description with a ``fingerprint`` (and ``bytes`` or ``files`` sizes).
        build: ``build(pipeline) -> outcomes`` or ``(outcomes, {name: single-value PCollection})``
            whose values go into ``manifest.extra``, or a dict ``{"outcomes": .., "extra": {..},
            "files": PCollection[FileEntry], "write_data": bool, "decisions": PCollection[Decision]}``
            for stages that write their own files or decide records apart from them (see ``WriteStageOutput``).
        beam_args: pass-through Beam flags (``--runner``, ``--project``, ``--direct_num_workers`` ...).
        num_shards: data/ledger shards; None: one per ``target_shard_bytes`` of input.
        force: rerun even when up to date.
        target_shard_bytes: bytes per shard aimed at when ``num_shards`` is None.
    """
    t0 = time.monotonic()
    num_shards = resolve_num_shards(num_shards, target_shard_bytes, input_info)
    full_config = dict(config, num_shards=num_shards)
    with RunLock(output_dir, stage):
        if not force:
            m = is_up_to_date(output_dir, full_config, input_info)
            if m is not None:
                log.info("%s: %s is up to date (config %s), skipping", stage, output_dir, m.config_hash[:12])
                progress.record_stage(stage, time.monotonic() - t0, m.counts.get("inputs"), m.counts.get("outputs"),
                                      skipped=True, output_dir=output_dir)
                return StageResult(manifest=m, skipped=True, seconds=time.monotonic() - t0)
        clear_output(output_dir)
        staged = staging_dir(output_dir)
        measure = _measure_setting()
        with progress.stage_progress(stage, total=input_info.get("records")):
            opts = beam_options(beam_args)
            bound_dask_partitions(opts, target_shard_bytes, input_info)
            p = beam.Pipeline(options=opts)
            built = build(p)
            if isinstance(built, dict):
                spec = dict(built)
            elif isinstance(built, tuple):
                spec = {"outcomes": built[0], "extra": built[1]}
            else:
                spec = {"outcomes": built}
            outcomes = spec["outcomes"] | f"Progress_{stage}" >> progress.ReportProgress(stage)
            _ = outcomes | f"Write_{stage}" >> WriteStageOutput(
                staged,
                stage,
                full_config,
                input_info,
                num_shards=num_shards,
                extra=spec.get("extra") or {},
                write_data=spec.get("write_data", True),
                files=spec.get("files"),
                measure_memory=measure,
                decisions=spec.get("decisions"),
            )
            with frozen_heap():
                result = p.run()
                result.wait_until_finish()
        peaks = _writer_peaks(result, stage, measure if isinstance(measure, str) else None) if measure else None
        if peaks:
            print(f"mmcorpus {stage}: writer peak per shard: max {peaks['max'] / 2**20:.1f} MiB, mean "
                  f"{peaks['mean'] / 2**20:.1f} MiB over {peaks['shards']} shards", file=sys.stderr)
        m = publish(output_dir)
    seconds = time.monotonic() - t0
    progress.record_stage(stage, seconds, m.counts.get("inputs"), m.counts.get("outputs"), output_dir=output_dir)
    return StageResult(manifest=m, skipped=False, seconds=seconds, writer_peak_bytes=peaks)
