"""`mmcorpus ocr`: OCR every image of a stage output (RapidOCR, models in the wheel) and add the stage-3 OCR samples.

Example:
    mmcorpus ocr --input out/dedup --output out/ocr --cache-dir out/ocr-cache
    mmcorpus pack --input out/ocr --output out/pack3 --stage 3
"""

from __future__ import annotations

import argparse

import apache_beam as beam

from pipelines.config import build, load_toml, section, to_dict
from pipelines.runner import StageResult, add_stage_args, run_stage
from schemas.errors import UserError
from transforms.ocr import OCR_MODEL, OcrAnnotateFn, OcrConfig, SignalCountsFn
from transforms.safety import NSFW_MODEL, SafetyConfig
from transforms.sources import read_sources, stage_inputs

STAGE = "ocr"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus ocr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="[NAME=]a finished stage output directory with images (filter, dedup, synthdoc); "
                        "repeat with NAME=DIR")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                   help="OCR result cache (by image sha256): a rerun or a resumed run never pays twice")
    p.add_argument("--no-safety", "--no_safety", dest="safety", action="store_false",
                   help="skip the safety flags (NSFW score, PII, watermark, LAION punsafe/pwatermark)")
    add_stage_args(p)
    return p


def load_config(path: str | None) -> OcrConfig:
    return build(OcrConfig, section(load_toml(path), "ocr"), "ocr")


def load_safety(path: str | None, enabled: bool) -> SafetyConfig | None:
    return build(SafetyConfig, section(load_toml(path), "safety"), "safety") if enabled else None


def run(args: argparse.Namespace, beam_args: list[str]) -> StageResult:
    sources, input_info = stage_inputs(args.input)
    cfg = load_config(args.config)
    safety = load_safety(args.config, args.safety)
    try:
        import rapidocr  # noqa: F401
        if safety is not None and safety.nsfw:
            import nudenet  # noqa: F401
    except ImportError:
        raise UserError("the OCR stage needs rapidocr, nudenet and onnxruntime: pip install -e . (they are core dependencies)") from None
    config = {"ocr": to_dict(cfg), "model": OCR_MODEL,
              "safety": to_dict(safety) if safety else None, "safety_model": NSFW_MODEL if safety else None}

    def build_pipeline(p):
        outcomes = (read_sources(p, sources)
                    | "OCR" >> beam.ParDo(OcrAnnotateFn(cfg, cache_dir=args.cache_dir, safety=safety)))
        signals = outcomes | "Signals" >> beam.CombineGlobally(SignalCountsFn())
        return outcomes, {"image_signals": signals}

    return run_stage(stage=STAGE, output_dir=args.output, config=config, input_info=input_info,
                     build=build_pipeline, beam_args=beam_args, num_shards=args.num_shards, force=args.force,
                     target_shard_bytes=args.target_shard_bytes)


def main(argv: list[str]) -> int:
    args, beam_args = parser().parse_known_args(argv)
    result = run(args, beam_args)
    from pipelines.summary import print_stage_summary

    print_stage_summary(result, args.output)
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "ocr")
