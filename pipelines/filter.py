"""`mmcorpus filter`: ingest raw inputs (img2dataset output or metadata tables) and apply the filters."""

from __future__ import annotations

import argparse

import apache_beam as beam

from pipelines.config import build, load_toml, section, to_dict
from pipelines.runner import StageResult, add_stage_args, run_stage
from transforms.caption_filters import CaptionFilterConfig, CaptionQualityFlagger, caption_filters
from transforms.filter_base import ApplyFiltersFn
from transforms.filter_stage import ReadAndFilter
from transforms.image_filters import ImageFilterConfig, image_filters
from transforms.ingest import (
    DEFAULT_MAX_MEMBER_BYTES,
    FINGERPRINT_MODES,
    FORMATS,
    InputSpec,
    fingerprint,
    preflight,
    resolve_input,
)
from transforms.sources import TagSourceFn, combined_input_info, parse_inputs, source_settings
from transforms.stage_io import ReadStage, stage_input_info

STAGE = "filter"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmcorpus filter",
        description=__doc__,
        epilog="Unknown flags go to Beam, e.g. --runner DataflowRunner --project P --region R "
        "--temp_location gs://b/tmp --setup_file ./setup.py",
    )
    p.add_argument("--input", action="append", required=True,
                   help="[NAME=]file, directory or glob (img2dataset output or a metadata table); repeat "
                   "with NAME=... for several sources (keys become NAME-KEY, records carry dataset=NAME)")
    p.add_argument("--input-format", "--input_format", dest="input_format", default="auto", choices=FORMATS)
    p.add_argument("--url-col", "--url_col", dest="url_col", default="url", help="url column (name, or index without header)")
    p.add_argument("--caption-col", "--caption_col", dest="caption_col", default="caption", help="caption column")
    p.add_argument("--key-col", "--key_col", dest="key_col", default=None, help="key column (default: 'key' if present)")
    p.add_argument("--header", default="auto", choices=("auto", "yes", "no"), help="csv/tsv header row")
    p.add_argument("--max-member-bytes", "--max_member_bytes", dest="max_member_bytes", type=int,
                   default=DEFAULT_MAX_MEMBER_BYTES, help="tar members larger than this are skipped unread (member_too_large)")
    p.add_argument("--fingerprint", default="stat", choices=FINGERPRINT_MODES,
                   help="how a changed input is noticed: stat (size, mtime, edges, Parquet footer) or content (sha256 of every byte)")
    add_stage_args(p)
    return p


def load_configs(path: str | None, input_format: str) -> tuple[CaptionFilterConfig, ImageFilterConfig]:
    doc = load_toml(path)
    caption = build(CaptionFilterConfig, section(doc, "filter.caption"), "filter.caption")
    image_values = dict(section(doc, "filter.image"))
    image_values.setdefault("require_image", input_format in ("webdataset", "i2d-parquet"))
    image = build(ImageFilterConfig, image_values, "filter.image")
    return caption, image


def run(args: argparse.Namespace, beam_args: list[str]) -> StageResult:
    sources = parse_inputs(args.input)
    doc = load_toml(args.config)
    settings = source_settings(doc, [s.name for s in sources if s.name])
    plans = []  # (source, spec, resolved, filters, flagger, input_info, config)
    for src in sources:
        own = settings.get(src.name, {}) if src.name else {}
        spec = InputSpec(
            path=src.path, format=own.get("input_format", args.input_format),
            url_col=own.get("url_col", args.url_col), caption_col=own.get("caption_col", args.caption_col),
            key_col=own.get("key_col", args.key_col), header=own.get("header", args.header),
            max_member_bytes=args.max_member_bytes,
        )
        resolved = resolve_input(spec)
        caption_cfg, image_cfg = load_configs(args.config, resolved.format)
        if resolved.format == "stage":
            input_info = stage_input_info(resolved.root)
        else:
            preflight(resolved)
            input_info = fingerprint(resolved, args.fingerprint)
        cfg = {
            "input": spec.to_config() | {"resolved_format": resolved.format},
            "caption": to_dict(caption_cfg),
            "image": to_dict(image_cfg),
        }
        plans.append((src, resolved, caption_cfg, image_cfg, input_info, cfg))
    if len(plans) == 1 and plans[0][0].name is None:
        config = plans[0][5]
    else:
        config = {"sources": {src.name: dict(cfg, settings=settings.get(src.name, {})) for src, *_, cfg in plans}}
    input_info = combined_input_info([(src.name, info) for src, _, _, _, info, _ in plans])

    def build_pipeline(p):
        parts = []
        for i, (src, resolved, caption_cfg, image_cfg, _, _) in enumerate(plans):
            tag = "" if src.name is None and len(plans) == 1 else f"_{src.name}"
            filters = caption_filters(caption_cfg) + image_filters(image_cfg)
            flagger = CaptionQualityFlagger(caption_cfg)
            lic = settings.get(src.name, {}).get("license") if src.name else None
            tagged = src.name is not None or lic is not None
            if resolved.format != "stage":  # raw input: read, tag and filter in one step
                parts.append(p | f"Filter{tag}" >> ReadAndFilter(resolved, filters, [flagger], tagged, src.name, lic))
                continue
            records = p | f"Read{tag}" >> ReadStage(resolved.root)
            if tagged:
                records = records | f"Tag{tag}" >> beam.ParDo(TagSourceFn(src.name, lic))
            parts.append(records | f"Filter{tag}" >> beam.ParDo(ApplyFiltersFn(filters, [flagger])))
        return parts[0] if len(parts) == 1 else parts | "Sources" >> beam.Flatten()

    return run_stage(
        stage=STAGE, output_dir=args.output, config=config, input_info=input_info, build=build_pipeline,
        beam_args=beam_args, num_shards=args.num_shards, force=args.force,
        target_shard_bytes=args.target_shard_bytes,
    )


def main(argv: list[str]) -> int:
    args, beam_args = parser().parse_known_args(argv)
    result = run(args, beam_args)
    from pipelines.summary import print_stage_summary

    print_stage_summary(result, args.output)
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "filter")
