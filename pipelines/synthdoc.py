"""`mmcorpus synthdoc`: render SynthDoG-style document pages from bundled real text, as a stage output.

Example:
    mmcorpus synthdoc --output out/synthdoc --n 1000 --lang en,zh --seed 7
    mmcorpus pack --input out/synthdoc --output out/pack3 --stage 3
"""

from __future__ import annotations

import argparse
import hashlib

import apache_beam as beam

from pipelines.config import build, load_toml, section, to_dict
from pipelines.runner import StageResult, add_stage_args, run_stage
from schemas.errors import UserError
from schemas.records import Outcome
from transforms.synthdoc import FONTS, REPO_DATA, TEXT_SOURCES, SynthDocConfig, check_fonts, load_texts, render_page

STAGE = "synthdoc"
PAGE_BYTES = 120_000  # a rendered page at the default sizes is a 50-100 KB JPEG (measured), rounded up


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus synthdoc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="pages to render (default: [synthdoc] n, 10)")
    p.add_argument("--lang", default=None, help="comma-separated languages: en,zh (default both)")
    p.add_argument("--seed", type=int, default=None, help="seed; same seed => byte-identical pages")
    add_stage_args(p)
    return p


class RenderFn(beam.DoFn):
    """Renders page ``index``. The texts travel with the DoFn (< 1 MB): ``data/`` is not in the
    package that remote workers install."""

    def __init__(self, cfg: SynthDocConfig, texts: dict[str, list[str]]):
        self.cfg = cfg
        self.texts = texts

    def process(self, index: int):
        pair, _ = render_page(index, self.cfg, self.texts)
        yield Outcome.kept(pair)


def load_config(args: argparse.Namespace) -> SynthDocConfig:
    values = dict(section(load_toml(args.config), "synthdoc"))
    if args.n is not None:
        values["n"] = args.n
    if args.lang is not None:
        values["langs"] = [x.strip() for x in args.lang.split(",") if x.strip()]
    if args.seed is not None:
        values["seed"] = args.seed
    return build(SynthDocConfig, values, "synthdoc")


def run(args: argparse.Namespace, beam_args: list[str]) -> StageResult:
    cfg = load_config(args)
    check_fonts(cfg.langs)
    h = hashlib.sha256()
    all_texts = {}
    for lang in cfg.langs:
        texts = all_texts[lang] = load_texts(lang)
        if not texts:
            raise UserError(f"no {lang} text in {REPO_DATA / TEXT_SOURCES[lang][0]}")
        h.update("\n".join(texts).encode("utf-8"))
        for path, idx in FONTS[lang]:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest() + bytes([idx]))
    # "bytes" sizes the output shards (--target-shard-bytes): a page is a JPEG of roughly PAGE_BYTES.
    input_info = {"kind": "synthdoc", "fingerprint": h.hexdigest(), "records": cfg.n, "bytes": cfg.n * PAGE_BYTES}

    def build_pipeline(p):
        return p | "Indices" >> beam.Create(list(range(cfg.n))) | "Render" >> beam.ParDo(RenderFn(cfg, all_texts))

    return run_stage(stage=STAGE, output_dir=args.output, config={"synthdoc": to_dict(cfg)}, input_info=input_info,
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

    run_script(main, "synthdoc")
