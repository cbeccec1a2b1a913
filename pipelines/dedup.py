"""`mmcorpus dedup`: exact + near-duplicate removal over a finished stage output (normally the filter's).

Example:
    mmcorpus dedup --input out/filter --output out/dedup [--config cfg.toml] \
        [--direct_running_mode=multi_processing --direct_num_workers=2]
"""

from __future__ import annotations

import argparse
import sys

import apache_beam as beam

from pipelines.runner import add_stage_args, run_stage
from transforms.dedup import DedupConfig, Deduplicate
from transforms.sources import TagSourceFn, stage_inputs
from transforms.stage_io import ReadStage


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mmcorpus dedup", description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True,
                        help="[NAME=]a finished stage output directory (e.g. the filter's); repeat with NAME=DIR "
                        "to deduplicate several sources together")
    add_stage_args(parser)
    return parser.parse_known_args(argv)


def load_config(path: str | None) -> DedupConfig:
    return DedupConfig.from_toml(path) if path else DedupConfig()


def run(argv: list[str]):
    """Run the stage; returns the ``StageResult``."""
    args, beam_args = parse_args(argv)
    cfg = load_config(args.config)
    sources, input_info = stage_inputs(args.input)

    def build(p):
        parts = []
        for src in sources:
            tag = "" if len(sources) == 1 and src.name is None else f"_{src.name}"
            pairs = p | f"Read{tag}" >> ReadStage(src.path)
            if src.name is not None:
                pairs = pairs | f"Tag{tag}" >> beam.ParDo(TagSourceFn(src.name))
            parts.append(pairs)
        pairs = parts[0] if len(parts) == 1 else parts | "Sources" >> beam.Flatten()
        # the records go straight to the writer, which applies each decision in its shard
        records, decisions, report = pairs | "Dedup" >> Deduplicate(cfg, records=input_info.get("records"), decisions=True)
        return {"outcomes": records, "decisions": decisions, "extra": {"dedup": report}}

    return run_stage(
        stage="dedup",
        output_dir=args.output,
        config={"dedup": cfg.to_dict()},
        input_info=input_info,
        build=build,
        beam_args=beam_args,
        num_shards=args.num_shards,
        target_shard_bytes=args.target_shard_bytes,
        force=args.force,
    )


def main(argv: list[str] | None = None) -> int:
    result = run(list(sys.argv[1:] if argv is None else argv))
    m = result.manifest
    state = "up to date, skipped" if result.skipped else f"done in {result.seconds:.1f}s"
    comps = m.extra.get("dedup", {}).get("components", {})
    print(
        f"dedup: {state}: {m.counts['inputs']} in, {m.counts['outputs']} kept, "
        f"{m.counts['by_status'].get('duplicate', 0)} duplicates "
        f"({comps.get('rounds')} clustering rounds, converged={comps.get('converged')})"
    )
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "dedup")
