"""`mmcorpus sft pack|export|make-tokenizer`: SFT packs with the shared packer, and exports for other trainers.

Examples:
    mmcorpus sft pack --input out/sft_split --part 1 --tokenizer TOK_DIR --seq-len 2048 --output out/sft_pack1
    mmcorpus sft export --input out/sft_split --to minicpmv|llamafactory|trl --output out/sft_export
    mmcorpus sft make-tokenizer --chat-template tests/fixtures/sft/chatml_generation.jinja --output out/sft_tok
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pathlib
from dataclasses import asdict
from typing import Any, Iterator

import apache_beam as beam

from pipelines.runner import add_stage_args, ledger_only_input_info, resolve_num_shards, run_stage
from schemas import packed as P
from schemas import reasons
from schemas import sft as S
from schemas.errors import UserError
from schemas.manifest import FILE_KIND_DATA
from schemas.records import REJECTED, Outcome, Pair
from storage.staging import staging_dir
from transforms.packing import PackingConfig
from transforms.sft_pack import PrepareSftFn, SftPackConfig
from transforms.shards import PackSamples, ShardConfig
from transforms.stage_io import ReadStage, join, read_manifest, stage_input_info, write_bytes_atomic
from transforms.tokens import QUERY_NUMS, StageProfile, TextTokenizer

SUMMARY_KEYS = ("packed_samples", "packs", "pack_tokens", "pack_fill", "truncated_tokens", "pack_images", "pack_shards")


def _input(d: str) -> dict:
    try:
        read_manifest(d)
    except FileNotFoundError as e:
        raise UserError(f"--input {d}: {e}") from None
    return stage_input_info(d)


# --- pack ------------------------------------------------------------------------------------------


class SelectPartFn(beam.DoFn):
    """Pair -> the Pair (its part is selected) or an ``sft_other_part`` Outcome (tagged ``OTHER``)."""

    OTHER = "other"

    def __init__(self, part: int | None):
        self.part = part

    def process(self, pair: Pair):
        s = S.SftSample.from_pair(pair)
        if self.part is None or s.part == self.part:
            yield pair
        else:
            yield beam.pvalue.TaggedOutput(self.OTHER, Outcome.dropped(pair, REJECTED, reasons.SFT_OTHER_PART, f"part {s.part}"))


def pack(argv: list[str]):
    p = argparse.ArgumentParser(prog="mmcorpus sft pack", description="chat-templated, assistant-only-label SFT packs")
    p.add_argument("--input", required=True, help="an sft split output (or an sft ingest output with --part all)")
    p.add_argument("--part", default="all", choices=("1", "2", "all"), help="which part to pack")
    p.add_argument("--tokenizer", required=True, help="local tokenizer dir whose tokenizer_config.json has a chat_template")
    p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=4096)
    p.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="image profile (3: adaptive slicing, as SFT uses)")
    p.add_argument("--query-num", "--query_num", dest="query_num", type=int, default=64, choices=QUERY_NUMS)
    p.add_argument("--format", default=P.FORMAT_PARQUET, choices=P.FORMATS)
    p.add_argument("--truncate-turns", "--truncate_turns", dest="truncate_turns", action="store_true",
                   help="cut a conversation longer than seq-len after its last whole turn that fits (else sft_too_long)")
    p.add_argument("--check-mask", "--check_mask", dest="check_mask", action="store_true",
                   help="check every record's labels against transformers' return_assistant_tokens_mask "
                        "(template needs {% generation %}); disagreeing records -> sft_label_mismatch")
    p.add_argument("--max-images-per-pack", "--max_images_per_pack", dest="max_images_per_pack", type=int, default=None)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--max-packs-per-shard", "--max_packs_per_shard", dest="max_packs_per_shard", type=int, default=2048)
    add_stage_args(p)
    args, beam_args = p.parse_known_args(argv)
    from transforms.sft_template import load_chat_tokenizer

    from transforms.sft_template import has_generation_markers

    tok = load_chat_tokenizer(args.tokenizer)  # fail fast: no transformers, no template, missing tokens
    if args.check_mask and not has_generation_markers(tok):
        raise UserError(f"--check-mask: the chat template of {args.tokenizer} has no {{% generation %}} block "
                        "(add one around the assistant content and its end-of-turn token, or drop --check-mask)")
    input_info = _input(args.input)
    try:
        profile = StageProfile.for_stage(args.stage, args.query_num)
        packing = PackingConfig(seq_len=args.seq_len, window=args.window, max_images_per_pack=args.max_images_per_pack)
        shards = ShardConfig(format=args.format, partitions=args.partitions, max_packs_per_shard=args.max_packs_per_shard)
        cfg = SftPackConfig(part=None if args.part == "all" else int(args.part), truncate_turns=args.truncate_turns,
                            check_mask=args.check_mask)
    except ValueError as e:
        raise UserError(f"mmcorpus sft pack flags: {e}") from None
    files = TextTokenizer.files_of(args.tokenizer)
    from pipelines.pack import _tokenizer_hash

    config = {"profile": asdict(profile), "packing": asdict(packing), "shards": asdict(shards), "sft": asdict(cfg),
              "tokenizer_sha256": _tokenizer_hash(pathlib.Path(args.tokenizer))}

    def build(pl):
        pairs = pl | "Read" >> ReadStage(args.input)
        sel = pairs | "SelectPart" >> beam.ParDo(SelectPartFn(cfg.part)).with_outputs(SelectPartFn.OTHER, main="pairs")
        out = sel.pairs | "Pack" >> PackSamples(
            staging_dir(args.output), profile, packing, shards, tokenizer_path=args.tokenizer,
            prepare=PrepareSftFn(profile, files, packing, cfg), header_extra={"sft": asdict(cfg), "labels": "assistant_only"},
        )
        outcomes = (out["outcomes"], sel[SelectPartFn.OTHER]) | "AllOutcomes" >> beam.Flatten()
        extra = {k: out["summary"] | f"Extra_{k}" >> beam.Map(lambda d, k=k: d[k]) for k in SUMMARY_KEYS}
        return {"outcomes": outcomes, "write_data": False, "files": out["files"], "extra": extra}

    # only the ledger goes through the stage writer (pack shards roll by bytes): size it from the records
    num_shards = args.num_shards if args.num_shards is not None else resolve_num_shards(
        None, args.target_shard_bytes, ledger_only_input_info(input_info))
    return run_stage(stage="sft_pack", output_dir=args.output, config=config, input_info=input_info, build=build,
                     beam_args=beam_args, num_shards=num_shards, force=args.force)


# --- exports -----------------------------------------------------------------------------------------

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
LLAMAFACTORY_INFO = "dataset_info.json"


def iter_samples(stage_dir: str) -> Iterator[S.SftSample]:
    """The records of a finished sft stage output, one row group at a time (bounded memory)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    manifest = read_manifest(stage_dir)
    for entry in manifest.files_of(FILE_KIND_DATA):
        with FileSystems.open(join(stage_dir, entry.path), compression_type="uncompressed") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                for row in pf.read_row_group(rg).to_pylist():
                    yield S.SftSample.from_pair(Pair.from_row(row))


def _image_ext(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXT.get((im.format or "").upper(), "bin")
    except Exception:  # undecodable bytes are exported as they are; the trainer's loader will say so
        return "bin"


def _record(fmt: str, s: S.SftSample, image_rel: str | None) -> dict[str, Any]:
    if fmt == "minicpmv":  # MiniCPM-V finetune/dataset.py: {"id", "image", "conversations": [{"role", "content"}]}
        r: dict[str, Any] = {"id": s.key}
        if image_rel:
            r["image"] = image_rel
        r["conversations"] = [m for m in s.messages() if m["role"] != S.ROLE_SYSTEM]
        return r
    if fmt == "llamafactory":  # sharegpt with OpenAI-style role/content tags, <image> in the text, "images" list
        r = {"messages": [m for m in s.messages() if m["role"] != S.ROLE_SYSTEM], "images": [image_rel] if image_rel else []}
        if s.system:
            r["system"] = s.system
        return r
    # TRL: conversational "messages" whose content is a list of typed parts; images in "images".
    msgs = []
    for m in s.messages():
        text = m["content"]
        parts: list[dict[str, Any]] = []
        if m["role"] == S.ROLE_USER and S.IMAGE_MARKER in text:
            before, after = text.split(S.IMAGE_MARKER, 1)
            if before.strip():
                parts.append({"type": "text", "text": before.strip()})
            parts.append({"type": "image"})
            text = after.lstrip("\n")
        if text:
            parts.append({"type": "text", "text": text})
        msgs.append({"role": m["role"], "content": parts})
    return {"messages": msgs, "images": [image_rel] if image_rel else []}


def export(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="mmcorpus sft export", description="SFT conversations for other trainers")
    p.add_argument("--input", required=True, help="an sft split (or ingest) output")
    p.add_argument("--to", required=True, choices=("minicpmv", "llamafactory", "trl"))
    p.add_argument("--output", required=True)
    p.add_argument("--name", default="mmcorpus_sft", help="dataset name prefix (files, dataset_info.json entries)")
    args = p.parse_args(argv)
    _input(args.input)
    by_part: dict[str, list[dict]] = {}
    written_images: set[str] = set()
    for s in iter_samples(args.input):
        image_rel = None
        if s.image:
            # content-addressed: an image shared by several conversations is written once
            image_rel = f"images/{hashlib.sha256(s.image).hexdigest()[:20]}.{_image_ext(s.image)}"
            if image_rel not in written_images:
                write_bytes_atomic(join(args.output, image_rel), s.image)
                written_images.add(image_rel)
        part = f"part{s.part}" if s.part else "all"
        by_part.setdefault(part, []).append((s.key, _record(args.to, s, image_rel)))
    summary: dict[str, Any] = {"format": args.to, "files": {}}
    info: dict[str, Any] = {}
    for part, recs in sorted(by_part.items()):
        recs = [r for _, r in sorted(recs, key=lambda x: x[0])]
        if args.to == "trl":
            name = f"{args.name}_{part}.jsonl"
            data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs).encode("utf-8")
        else:
            name = f"{args.name}_{part}.json"
            data = (json.dumps(recs, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")
        write_bytes_atomic(join(args.output, name), data)
        summary["files"][name] = {"records": len(recs), "sha256": hashlib.sha256(data).hexdigest()}
        if args.to == "llamafactory":
            info[f"{args.name}_{part}"] = {
                "file_name": name,
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images", "system": "system"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
            }
    if args.to == "llamafactory":
        write_bytes_atomic(join(args.output, LLAMAFACTORY_INFO), (json.dumps(info, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    summary["images"] = len(written_images)
    write_bytes_atomic(join(args.output, "export.json"), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    files = ", ".join(f"{n} ({v['records']})" for n, v in summary["files"].items())
    return f"sft export {args.to}: {files}; {len(written_images)} images -> {args.output}"


def make_tokenizer(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="mmcorpus sft make-tokenizer",
                                description="a tiny chat tokenizer dir (BPE on the bundled text + a chat template file) for demos")
    p.add_argument("--chat-template", "--chat_template", dest="chat_template", required=True, help="a Jinja chat template file")
    p.add_argument("--output", required=True)
    p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=2048)
    args = p.parse_args(argv)
    from transforms.sft_template import build_chat_tokenizer
    from transforms.tokens import REPO, read_sample_captions

    texts = read_sample_captions(REPO / "data" / "sample")
    qa = REPO / "data" / "sample" / "llava_qa90" / "qa90_vqa.jsonl"
    if qa.exists():
        for line in qa.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            texts += [r["question"], r["answer"]]
    build_chat_tokenizer(args.output, args.chat_template, texts, args.vocab_size)
    return f"sft make-tokenizer: wrote {args.output} (vocab {args.vocab_size}, template {args.chat_template})"


SUBCOMMANDS = {"pack": pack, "export": export, "make-tokenizer": make_tokenizer}
