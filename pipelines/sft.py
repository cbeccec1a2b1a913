"""`mmcorpus sft ingest|split|pack|export`: instruction data to chat-templated, assistant-only-loss SFT packs.

Examples (see docs/sft.md):
    mmcorpus sft ingest --input data/sample/llava_qa90/qa90_vqa.jsonl --format vqa --name llava_qa90 \
        --images data/sample/llava_qa90/images --output out/sft_ingest
    mmcorpus sft split --input out/sft_ingest --output out/sft_split
    mmcorpus sft pack --input out/sft_split --part 2 --tokenizer TOKENIZER_DIR --seq-len 4096 --output out/sft_pack2
    mmcorpus sft export --input out/sft_split --to llamafactory --output out/sft_lf
"""

from __future__ import annotations

import argparse
import os
import sys

import apache_beam as beam

from pipelines.config import build, load_toml, section, to_dict
from pipelines.runner import add_stage_args, run_stage
from schemas import sft as S
from schemas.errors import UserError
from schemas.records import REJECTED, Outcome
from transforms import sft_ingest as I
from transforms.sft_split import AssignPartFn, SftSplitConfig, SummarizeSplit
from transforms.sources import read_sources, stage_inputs
from transforms.stage_io import ReadStage, read_manifest, stage_input_info
from transforms.tokens import DEFAULT_TOKENIZER, TextTokenizer

FILE_FORMATS = tuple(f for f in S.FORMATS if f != S.FORMAT_REWRITE)


# --- ingest --------------------------------------------------------------------------------------


def _file_fingerprint(files: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.encode("utf-8"))
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def ingest(argv: list[str]):
    p = argparse.ArgumentParser(prog="mmcorpus sft ingest", description="read instruction data into SFT conversations (with a ledger)")
    p.add_argument("--input", required=True, action="append",
                   help="a JSON/JSONL file, a directory of them, a glob, or (--format rewrite) [NAME=]a stage "
                        "directory, repeated with NAME=DIR")
    p.add_argument("--format", required=True, choices=S.FORMATS, help="source format (docs/sft.md)")
    p.add_argument("--name", default=None, help="source name for the split report (default: the input's file name)")
    p.add_argument("--images", default=None, help="image directory, img2dataset output, or a stage directory; joined by id")
    add_stage_args(p)
    args, beam_args = p.parse_known_args(argv)
    cfg = build(I.SftIngestConfig, section(load_toml(args.config), "sft.ingest"), "sft.ingest")
    sources = None
    if args.format == S.FORMAT_REWRITE:
        sources, input_info = stage_inputs(args.input)
        if args.name and any(s.name for s in sources):
            raise UserError("--name: with --input NAME=DIR each source's NAME is its dataset; drop --name")
    elif len(args.input) > 1:
        raise UserError(f"--input: one file, directory or glob for --format {args.format} "
                        "(several named inputs are for --format rewrite; run ingest once per source)")
    # named stage inputs: every record's dataset is its source's (FromStageFn reads pair.dataset)
    named = sources is not None and sources[0].name is not None
    name = None if named else (args.name or os.path.splitext(os.path.basename(args.input[0].rstrip("/")))[0])
    config = {"format": args.format, "name": name, "ingest": to_dict(cfg), "images": None}
    image_kind = None
    if args.images:
        if not os.path.exists(args.images) and "://" not in args.images:
            raise UserError(f"--images {args.images}: no such directory")
        image_kind = I.detect_image_source(args.images)
        config["images"] = image_kind
    if args.format == S.FORMAT_REWRITE:
        files = []
    else:
        files = I.list_input_files(args.input[0])
        if not files:
            raise UserError(f"--input {args.input[0]}: no .json/.jsonl file found (pass a file, a directory or a glob)")
        root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
        input_info = {"kind": "sft-files", "files": [os.path.relpath(f, root) for f in files],
                      "fingerprint": _file_fingerprint(files)}
        root_for_rel = root
    if image_kind:
        input_info = dict(input_info, images=args.images)

    def build_pipeline(pl):
        if args.format == S.FORMAT_REWRITE:
            pairs = read_sources(pl, sources, label="ReadStage")
            return pairs | "ToSample" >> beam.ParDo(FromStageFn(name, cfg))
        units = [(f, os.path.relpath(f, root_for_rel)) for f in files]
        parsed = (
            pl
            | "Files" >> beam.Create(units)
            | "Parse" >> beam.ParDo(I.ParseSftFn(args.format, name, cfg)).with_outputs(I.ParseSftFn.REJECTED, main="samples")
        )
        samples = parsed.samples
        if image_kind is None:
            kept = samples | "NoImages" >> beam.ParDo(I.AttachLocalImageFn(None))
        elif image_kind == "dir":
            kept = samples | "AttachImages" >> beam.ParDo(I.AttachLocalImageFn(args.images))
        else:
            if image_kind == "stage":
                images = pl | "ReadImages" >> ReadStage(args.images)
            else:
                from transforms.ingest import InputSpec, ReadPairs, resolve_input

                images = (
                    pl
                    | "ReadImages" >> ReadPairs(resolve_input(InputSpec(args.images)))
                    | "OnlyPairs" >> beam.Filter(lambda x: not isinstance(x, Outcome))
                )
            where = args.images
            keyed_images = images | "ImageById" >> beam.Map(lambda pr: (pr.key, pr))
            with_ref = samples | "SampleById" >> beam.Map(lambda s: (I.image_id(s.image_ref) if s.image_ref else "\x00" + s.key, s))
            kept = (
                {"samples": with_ref, "images": keyed_images}
                | "JoinImages" >> beam.CoGroupByKey()
                | "Attach" >> beam.FlatMap(_attach, where)
            )
        return (kept, parsed[I.ParseSftFn.REJECTED]) | "All" >> beam.Flatten()

    return run_stage(stage="sft_ingest", output_dir=args.output, config=config, input_info=input_info,
                     build=build_pipeline, beam_args=beam_args, num_shards=args.num_shards, force=args.force)


def _attach(element, where):
    key, groups = element
    if key.startswith("\x00"):  # text-only samples: nothing to join
        for s in groups["samples"]:
            yield I.kept_outcome(s)
        return
    yield from I.join_keyed_images(element, where)


class FromStageFn(beam.DoFn):
    """Pair of an mmcorpus stage -> Outcome (kept conversation, or rejected with the turn rule it broke)."""

    def __init__(self, dataset: str | None, cfg: I.SftIngestConfig):
        self.dataset = dataset  # None: named inputs, each record's own (tagged) dataset
        self.cfg = cfg

    def process(self, pair):
        try:
            if self.dataset is None:
                out = I.kept_outcome(I.pair_to_sample(pair, pair.dataset or "", self.cfg))
                yield Outcome.kept(out.pair.replace(dataset=pair.dataset))  # the dataset column, as other stages
                return
            yield I.kept_outcome(I.pair_to_sample(pair, self.dataset, self.cfg))
        except I.SftRecordError as e:
            yield Outcome.dropped(pair, REJECTED, e.reason, e.detail)


# --- split ---------------------------------------------------------------------------------------


def split(argv: list[str]):
    p = argparse.ArgumentParser(prog="mmcorpus sft split", description="assign part 1 / part 2 (rule: docs/sft.md)")
    p.add_argument("--input", required=True, action="append", help="an sft ingest output (repeat for several sources)")
    p.add_argument("--tokenizer", default=None, help="tokenizer that measures answer lengths (default: the bundled one)")
    add_stage_args(p)
    args, beam_args = p.parse_known_args(argv)
    cfg = build(SftSplitConfig, section(load_toml(args.config), "sft.split"), "sft.split")
    infos = []
    for d in args.input:
        try:
            read_manifest(d)
        except FileNotFoundError as e:
            raise UserError(f"--input {d}: {e}") from None
        infos.append(stage_input_info(d))
    tok_path = args.tokenizer or str(DEFAULT_TOKENIZER)
    TextTokenizer(tok_path)  # fail fast with a clear message
    tok_files = TextTokenizer.files_of(tok_path)
    from pipelines.pack import _tokenizer_hash
    import pathlib

    config = {"split": to_dict(cfg), "tokenizer_sha256": _tokenizer_hash(pathlib.Path(tok_path))}
    input_info = {"kind": "stages", "inputs": infos, "fingerprint": "+".join(i["fingerprint"] for i in infos),
                  "records": sum(int(i.get("records") or 0) for i in infos)}

    def build_pipeline(pl):
        reads = [pl | f"Read{i}" >> ReadStage(d) for i, d in enumerate(args.input)]
        pairs = reads | "Sources" >> beam.Flatten()
        outcomes = pairs | "AssignPart" >> beam.ParDo(AssignPartFn(tok_files, cfg))
        report = outcomes | "Report" >> beam.CombineGlobally(SummarizeSplit())
        return outcomes, {"split": report}

    return run_stage(stage="sft_split", output_dir=args.output, config=config, input_info=input_info,
                     build=build_pipeline, beam_args=beam_args, num_shards=args.num_shards, force=args.force)


def format_split(report: dict) -> str:
    lines = [f"{'source':<24} {'part':<6} {'samples':>8} {'turns':>7} {'asst tok/turn':>14} {'text-only':>10}"]
    for ds, parts in report.items():
        for name, c in parts.items():
            per = c["assistant_tokens"] / c["turns"] if c["turns"] else 0
            lines.append(f"{ds:<24} {name:<6} {c['samples']:>8} {c['turns']:>7} {per:>14.1f} {c['text_only']:>10}")
    return "\n".join(lines)


# --- entry -----------------------------------------------------------------------------------------


def _summary(name: str, result) -> str:
    m = result.manifest
    state = "up to date, skipped" if result.skipped else f"done in {result.seconds:.1f}s"
    by_reason = {k: v for k, v in m.counts["by_reason"].items() if not k.startswith("kept/")}
    line = f"sft {name}: {state}: {m.counts['inputs']} in, {m.counts['outputs']} kept, not kept {by_reason or 'none'}"
    x = m.extra
    if "packs" in x:
        line += (f"; {x.get('packed_samples')} samples in {x.get('packs')} packs ({x.get('pack_shards')} shards, "
                 f"fill {100 * (x.get('pack_fill') or 0):.2f}%)")
    return line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pipelines import sft_pack  # pack, export, make-tokenizer

    subs = {"ingest": ingest, "split": split, **sft_pack.SUBCOMMANDS}
    if not argv or argv[0] not in subs:
        print(f"usage: mmcorpus sft {{{'|'.join(subs)}}} ...\n\n{__doc__}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    result = subs[name](rest)
    if isinstance(result, str):
        print(result)
        return 0
    print(_summary(name, result))
    if name == "split":
        print(format_split(result.manifest.extra.get("split") or {}))
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "sft")
