"""`mmcorpus select`: draw one training stage's mixture (sources × languages × text-rich share) by key hash.

Example:
    mmcorpus select --input out/dedup --output out/select1 --stage 1 --config mix.toml
    mmcorpus select --input cc3m=out/cc3m/dedup --input laion=out/laion/dedup --output out/select2 \
        --stage 2 --config mix.toml
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.config import load_toml
from pipelines.pack import _tokenizer_hash
from pipelines.runner import add_stage_args, run_stage
from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA
from storage.staging import staging_dir
from transforms.selection import NO_DATASET, NO_LANG, ReadSelectionKeys, Select, check_names, load_select_config
from transforms.sources import read_sources, stage_inputs
from transforms.stage_io import join, read_manifest, stage_input_info
from transforms.tokens import DEFAULT_TOKENIZER

STAGE = "select"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mmcorpus select", description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True,
                        help="[NAME=]a finished stage output directory (normally dedup's); repeat with NAME=DIR")
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3), help="training stage (1, 2 or 3)")
    add_stage_args(parser)
    return parser.parse_known_args(argv)


def stage_values(stage_dir: str) -> tuple[set[str], set[str]]:
    """Dataset and language names present in a stage output (reads only the ``dataset`` and ``lang``
    columns, file by file; a missing column or value reads as ``NO_DATASET`` / ``NO_LANG``)."""
    names: set[str] = set()
    langs: set[str] = set()
    for entry in read_manifest(stage_dir).files_of(FILE_KIND_DATA):
        with FileSystems.open(join(stage_dir, entry.path), compression_type="uncompressed") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("dataset", "lang") if c in pf.schema_arrow.names]
            t = pf.read(columns=cols)
        if t.num_rows == 0:
            continue
        for col, out, none in (("dataset", names, NO_DATASET), ("lang", langs, NO_LANG)):
            if col in cols:
                out.update(none if v is None else v for v in t.column(col).unique().to_pylist())
            else:
                out.add(none)
    return names, langs


def stage_datasets(stage_dir: str) -> set[str]:
    """Dataset names present in a stage output (see ``stage_values``)."""
    return stage_values(stage_dir)[0]


def ocr_ran(stage_dir: str) -> bool:
    """Whether the OCR stage ran on this stage output's records: it is an ``ocr`` output, or one of
    the stage inputs its manifest names (one level up, e.g. a dedup over OCR outputs) is."""
    m = read_manifest(stage_dir)
    if m.stage == "ocr":
        return True

    def walk(info) -> bool:
        if isinstance(info, dict):
            return info.get("stage") == "ocr" or any(walk(v) for v in info.values())
        return False

    return walk(m.input)


def run(argv: list[str]):
    """Run the stage; returns the ``StageResult``."""
    args, beam_args = parse_args(argv)
    if not args.config:
        raise UserError("--config is required: a TOML file with a [select] table (see docs/selection.md)")
    cfg = load_select_config(load_toml(args.config), args.stage, where=args.config)
    sources, input_info = stage_inputs(args.input)
    datasets, langs = set(), set()
    for src in sources:
        found, found_langs = stage_values(src.path)
        if src.name is not None:  # unnamed records of a named input take its name
            found = {src.name if n == NO_DATASET else n for n in found} or {src.name}
        datasets |= found
        langs |= found_langs
    check_names(cfg, datasets, input_info.get("records"), args.config, langs)
    if cfg.text_rich_share and not any(ocr_ran(src.path) for src in sources):
        raise UserError(
            f"{args.config} text_rich_share: {cfg.text_rich_share:g} needs the OCR stage's output, and no --input "
            "comes from `mmcorpus ocr`; run `mmcorpus ocr --input DIR --output OCR_DIR` and select from OCR_DIR "
            "(or set text_rich_share = 0)"
        )
    config = {"select": cfg.to_dict()}
    if cfg.by_tokens:
        tok_path = pathlib.Path(cfg.tokenizer or DEFAULT_TOKENIZER)
        if not tok_path.exists():
            raise UserError(f"{args.config} tokenizer: {tok_path} does not exist (a tokenizer.json or a tokenizer dir)")
        config["tokenizer_sha256"] = _tokenizer_hash(tok_path)
    earlier_info = None
    if cfg.earlier is not None:
        try:
            m = read_manifest(cfg.earlier)
        except FileNotFoundError as e:
            raise UserError(f"{args.config} earlier: {e}") from None
        if m.stage != STAGE:
            raise UserError(f"{args.config} earlier: {cfg.earlier} is a {m.stage!r} output, not a select output")
        earlier_info = stage_input_info(cfg.earlier)
        input_info = dict(input_info, earlier=earlier_info,
                          fingerprint=input_info["fingerprint"] + ":" + earlier_info["fingerprint"])

    def build(p):
        pairs = read_sources(p, sources)
        earlier = None
        if cfg.earlier is not None:
            earlier = p | "ReadEarlier" >> ReadSelectionKeys(cfg.earlier)
        # mixture.json goes to the staging area like every stage file; publish moves it into place
        outcomes, report, files = pairs | "Select" >> Select(cfg, staging_dir(args.output), earlier)
        return {"outcomes": outcomes, "extra": {"mixture": report}, "files": files}

    return run_stage(
        stage=STAGE,
        output_dir=args.output,
        config=config,
        input_info=input_info,
        build=build,
        beam_args=beam_args,
        num_shards=args.num_shards,
        force=args.force,
        target_shard_bytes=args.target_shard_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    result = run(list(sys.argv[1:] if argv is None else argv))
    m = result.manifest
    mix = m.extra.get("mixture", {})
    state = "up to date, skipped" if result.skipped else f"done in {result.seconds:.1f}s"
    if mix.get("unit") == "tokens":
        print(
            f"select: {state}: stage {mix.get('stage')}: {m.counts['inputs']} in, {mix.get('selected')} selected, "
            f"{mix.get('selected_tokens')} tokens of target {mix.get('target_tokens')} ({mix.get('replicas')} "
            f"replicas, shortfall {mix.get('shortfall_tokens')} tokens)"
        )
    else:
        print(
            f"select: {state}: stage {mix.get('stage')}: {m.counts['inputs']} in, {mix.get('selected')} selected "
            f"of target {mix.get('target_pairs')} ({mix.get('replicas')} replicas, shortfall {mix.get('shortfall')})"
        )
    for name, row in (mix.get("by_dataset") or {}).items():
        if "achieved_tokens" in row:
            print(f"  {name:<16} {row['achieved']:>9} pairs {row['achieved_tokens']:>11} tokens "
                  f"{row.get('achieved_tokens_pct')}%  target {row.get('target_tokens', '-')}")
        else:
            print(f"  {name:<16} {row['achieved']:>9} {row.get('achieved_pct')}%  target {row.get('target', '-')}")
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "select")
