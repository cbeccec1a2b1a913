"""`mmcorpus pack`: token accounting and packing of a finished stage output into training shards.

Example:
    mmcorpus pack --input out/rewrite --output out/pack --stage 3 --seq-len 4096 --format webdataset \
        [--tokenizer data/tokenizer/tokenizer.json] [--direct_running_mode=multi_processing --direct_num_workers=2]

Shards and ``index.json`` land in ``OUTPUT/data/``; one ledger row per input sample (kept: the pack it
is in; rejected: why, e.g. ``pack_too_long``). Caption-only samples (no image) are packed as text
unless ``--require-image`` is given. Settings come from the flags, else a ``[pack]`` table in
``--config`` (keys = flag names with underscores, e.g. ``seq_len = 4096``), else the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
from dataclasses import asdict

from pipelines.runner import add_stage_args, ledger_only_input_info, resolve_num_shards, run_stage
from schemas import packed as S
from schemas.errors import UserError
from storage.staging import staging_dir
from transforms.packing import ALGORITHMS, PackingConfig
from transforms.shards import PackSamples, ShardConfig
from transforms.sources import read_sources, stage_inputs
from transforms.stage_io import join
from transforms.tokens import DEFAULT_TOKENIZER, QUERY_NUMS, StageProfile

# Auto partitioning: a worker plans one partition from its samples' lengths (about 100 bytes each);
# each partition's last few packs are the only ones that may be underfilled.
SAMPLES_PER_PARTITION = 500_000

SUMMARY_KEYS = ("packed_samples", "packs", "pack_tokens", "pack_fill", "truncated_tokens", "pack_images", "pack_shards")


# Built-in defaults; a ``[pack]`` table in --config overrides them, flags override both.
DEFAULTS: dict = {}


def _flag(parser, name: str, default=None, **kw):
    """``--seq-len`` plus its underscore alias ``--seq_len`` (Airflow's Beam operator passes those)."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    dest = name.replace("-", "_")
    DEFAULTS[dest] = default
    if kw.get("action") == "store_true":
        kw["action"] = "store_const"
        kw["const"] = True
    parser.add_argument(*names, dest=dest, default=None, **kw)


def _apply_config(args: argparse.Namespace) -> argparse.Namespace:
    from pipelines.config import load_toml, section

    table = section(load_toml(args.config), "pack")
    unknown = sorted(set(table) - set(DEFAULTS))
    if unknown:
        raise UserError(f"--config {args.config}: unknown setting(s) {unknown} in [pack]; known: {sorted(DEFAULTS)}")
    for dest, default in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, table.get(dest, default))
    return args


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="mmcorpus pack", description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", required=True,
                   help="[NAME=]a finished stage output directory (filter, dedup, select, rewrite); repeat with NAME=DIR")
    add_stage_args(p)
    _flag(p, "stage", type=int, choices=(1, 2, 3), default=2, help="pretraining stage profile (1: 224px, 2: 448px, 3: sliced)")
    _flag(p, "seq-len", type=int, default=2048, help="tokens per packed sequence")
    _flag(p, "format", choices=S.FORMATS, default=S.FORMAT_PARQUET, help="shard format")
    _flag(p, "tokenizer", default=None, help="local tokenizer.json or tokenizer dir (default: the bundled one)")
    _flag(p, "query-num", type=int, choices=QUERY_NUMS, default=96, help="query tokens per image/slice (96: V2.5, 64: V2.6)")
    _flag(p, "algorithm", choices=ALGORITHMS, default=ALGORITHMS[0], help="packer (greedy_truncate: the paper's)")
    _flag(p, "window", type=int, default=256, help="pending samples the packer chooses from (min; raised for short samples)")
    _flag(p, "max-images-per-pack", type=int, default=None, help="image limit per pack")
    _flag(p, "max-slices-per-pack", type=int, default=None, help="vision-encoder passes (overviews + slices) per pack")
    _flag(p, "partitions", type=int, default=0,
          help=f"key-hash partitions packed independently; 0 (default): one per {SAMPLES_PER_PARTITION} input samples")
    _flag(p, "max-packs-per-shard", type=int, default=2048, help="roll shards after this many packs")
    _flag(p, "max-shard-bytes", type=int, default=256 * 1024 * 1024, help="... or after about this many bytes")
    _flag(p, "row-group-packs", type=int, default=64, help="packs per Parquet row group")
    _flag(p, "jpeg-quality", type=int, default=90, help="quality of the stored JPEGs")
    _flag(p, "require-image", default=False, action="store_true", help="reject caption-only samples (pack_no_image)")
    args, rest = p.parse_known_args(argv)
    return _apply_config(args), rest


def _configs(args, records: int = 0) -> tuple[StageProfile, PackingConfig, ShardConfig]:
    try:
        base = StageProfile.for_stage(args.stage, args.query_num)
        profile = StageProfile(**dict(asdict(base), jpeg_quality=args.jpeg_quality))
        packing = PackingConfig(
            seq_len=args.seq_len, algorithm=args.algorithm, window=args.window,
            max_images_per_pack=args.max_images_per_pack, max_slices_per_pack=args.max_slices_per_pack,
        )
        shards = ShardConfig(
            format=args.format, partitions=args.partitions or max(1, -(-records // SAMPLES_PER_PARTITION)),
            max_packs_per_shard=args.max_packs_per_shard,
            max_shard_bytes=args.max_shard_bytes, row_group_packs=args.row_group_packs,
        )
    except ValueError as e:
        raise UserError(f"mmcorpus pack flags: {e}") from None
    return profile, packing, shards


def run(argv: list[str]):
    """Run the stage; returns the ``StageResult``."""
    args, beam_args = parse_args(argv)
    tok_path = pathlib.Path(args.tokenizer or DEFAULT_TOKENIZER)
    if not tok_path.exists():
        raise UserError(f"--tokenizer {tok_path}: no such file or directory (pass a tokenizer.json or a tokenizer dir)")
    sources, input_info = stage_inputs(args.input)
    profile, packing, shards = _configs(args, int(input_info.get("records") or 0))
    config = {
        "profile": asdict(profile),
        "packing": asdict(packing),
        "shards": asdict(shards),
        "tokenizer_sha256": _tokenizer_hash(tok_path),
        "require_image": args.require_image,
    }

    def build(p):
        pairs = read_sources(p, sources)
        out = pairs | "Pack" >> PackSamples(
            staging_dir(args.output), profile, packing, shards, tokenizer_path=str(tok_path), require_image=args.require_image
        )
        extra = {k: out["summary"] | f"Extra_{k}" >> _pick(k) for k in SUMMARY_KEYS}
        extra["datasets"] = _datasets(pairs)  # pack shards have no dataset column: inspect/stats read this
        return {"outcomes": out["outcomes"], "write_data": False, "files": out["files"], "extra": extra}

    return run_stage(
        stage="pack", output_dir=args.output, config=config, input_info=input_info, build=build,
        beam_args=beam_args, force=args.force,
        # only the ledger goes through the stage writer (pack shards roll by --max-shard-bytes): size it
        num_shards=args.num_shards if args.num_shards is not None
        else resolve_num_shards(None, args.target_shard_bytes, ledger_only_input_info(input_info)),
        target_shard_bytes=args.target_shard_bytes,
    )


def _datasets(pairs):
    """Sorted source names (``Pair.dataset``) of the input records, one value."""
    import apache_beam as beam

    return (
        pairs
        | "Datasets" >> beam.Map(lambda p: p.dataset)
        | "DistinctDatasets" >> beam.Distinct()
        | "DatasetList" >> beam.combiners.ToList()
        | "SortDatasets" >> beam.Map(lambda names: sorted(n for n in names if n))
    )


def _pick(key: str):
    import apache_beam as beam

    return beam.Map(lambda d, key=key: d[key])


def _tokenizer_hash(path: pathlib.Path) -> str:
    """sha256 over the tokenizer file(s): a different tokenizer means different packs."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(f.name.encode("utf-8"))
        h.update(f.read_bytes())
    return h.hexdigest()


def render_pack(output_dir: str, index: int = 0, tokenizer: str | None = None) -> str:
    """One pack of a finished pack output as text (image placeholder runs collapsed, e.g. ``<unk>×96``)."""
    from mmcorpus_reader import PackDataset, render_pack_text

    ds = PackDataset(join(output_dir, S.PACK_DIR), decode_images=False)
    for i, pack in enumerate(ds):
        if i == index:
            return render_pack_text(pack, tokenizer or str(DEFAULT_TOKENIZER))
    raise UserError(f"{output_dir}: has no pack number {index}")


def main(argv: list[str] | None = None) -> int:
    result = run(list(sys.argv[1:] if argv is None else argv))
    m = result.manifest
    state = "up to date, skipped" if result.skipped else f"done in {result.seconds:.1f}s"
    x = m.extra
    print(
        f"pack: {state}: {m.counts['inputs']} in, {x.get('packed_samples')} packed into {x.get('packs')} packs "
        f"({x.get('pack_shards')} shards, fill {100 * (x.get('pack_fill') or 0):.2f}%, "
        f"{x.get('truncated_tokens')} truncated tokens), {m.counts['inputs'] - (x.get('packed_samples') or 0)} in the ledger"
    )
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "pack")
