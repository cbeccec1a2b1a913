"""Export a seed set as chat-format SFT data (``{"messages": [...]}`` JSONL) with a deterministic split.

The output directory holds ``train.jsonl`` and ``validation.jsonl`` (one ``{"messages": [system,
user, assistant]}`` object per line, the conversational format TRL's ``SFTTrainer`` and
LLaMA-Factory's ``sharegpt`` loader read), ``dataset_info.json`` (LLaMA-Factory's dataset registry
for the two files) and ``export.json`` (counts, source seed provenance, split rule).

Only seed records whose teacher answer passed validation (``status == "ok"``) are exported; the
assistant turn is the canonical JSON of the validated answer (``prompts.render_output``), so the
model learns compact JSON followed by end-of-turn. The split is a pure function of the record key:
``validation`` when ``sha256(salt + key) mod 10000 < validation_fraction * 10000``; when that leaves the
validation set empty and there are at least two records, the record with the smallest hash moves there;
the training set is never left empty.
Rows are sorted by key, so the same seed set and options give byte-identical files.

Example:
    mmcorpus rewriter export-sft --seed build/seed --output build/sft --validation-fraction 0.1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from rewriter import prompts
from rewriter.seed import PROVENANCE_NAME, SEED_NAME, read_seed_records
from schemas.errors import UserError
from storage.files import write_bytes_atomic

TRAIN_NAME = "train.jsonl"
VALIDATION_NAME = "validation.jsonl"
EXPORT_NAME = "export.json"
DATASET_INFO_NAME = "dataset_info.json"


@dataclass(frozen=True)
class ExportConfig:
    """How to split the seed set.

    Args:
        validation_fraction: share of records sent to validation (0 disables the split).
        salt: mixed into the key hash; change it to draw a different split.
        min_validation: move records into validation until it has this many (when possible).

    Example:
        >>> ExportConfig(validation_fraction=0.2).validation_fraction
        0.2
    """

    validation_fraction: float = 0.1
    salt: str = "sft-split-v1"
    min_validation: int = 1

    def __post_init__(self):
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        if self.min_validation < 0:
            raise ValueError("min_validation must be >= 0")


def split_hash(key: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256((salt + key).encode("utf-8")).digest()[:8], "big")


def to_example(record: dict[str, Any]) -> dict[str, Any]:
    """One chat example from one validated seed record."""
    response = record["response"]
    messages = prompts.build_messages(record["caption"])
    messages.append({"role": "assistant", "content": prompts.render_output(response["qa"], response["caption"])})
    return {"messages": messages}


def split_records(records: Iterable[dict[str, Any]], config: ExportConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) records, each sorted by key."""
    records = sorted(records, key=lambda r: r["key"])
    threshold = int(config.validation_fraction * 10000)
    hashes = {r["key"]: split_hash(r["key"], config.salt) for r in records}
    val_keys = {k for k, h in hashes.items() if h % 10000 < threshold}
    if config.validation_fraction > 0:
        # Small seed sets: guarantee a validation set, but never empty the training set.
        for k in sorted(hashes, key=lambda k: (hashes[k], k)):
            if len(val_keys) >= min(config.min_validation, len(records) - 1):
                break
            val_keys.add(k)
    if records and len(val_keys) == len(records):  # never leave training empty
        val_keys.discard(max(hashes, key=lambda k: (hashes[k], k)))
    train = [r for r in records if r["key"] not in val_keys]
    val = [r for r in records if r["key"] in val_keys]
    return train, val


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def export_sft(seed_path: str, output_dir: str, config: ExportConfig = ExportConfig()) -> dict[str, Any]:
    """Write ``train.jsonl``, ``validation.jsonl``, ``dataset_info.json`` and ``export.json``; return the summary."""
    records, provenance = read_seed_records(seed_path)
    usable = [r for r in records if r.get("status") == "ok" and r.get("response")]
    versions = sorted({r.get("prompt_version") for r in usable})
    if versions and versions != [prompts.PROMPT_VERSION]:
        raise UserError(
            f"{seed_path}: seed records use prompt version(s) {versions}, this code is {prompts.PROMPT_VERSION}; "
            "re-annotate with `mmcorpus rewriter seed` (the prompt in the SFT data must match the rewriter's)"
        )
    if not usable:
        raise UserError(f"{seed_path}: no seed record passed validation (status ok); nothing to export")
    train, val = split_records(usable, config)
    os.makedirs(output_dir, exist_ok=True)
    write_bytes_atomic(os.path.join(output_dir, TRAIN_NAME), _jsonl([to_example(r) for r in train]))
    write_bytes_atomic(os.path.join(output_dir, VALIDATION_NAME), _jsonl([to_example(r) for r in val]))
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
            "assistant_tag": "assistant", "system_tag": "system"}
    info = {
        f"mmcorpus_rewriter_{split}": {
            "file_name": name, "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags,
        }
        for split, name in (("train", TRAIN_NAME), ("validation", VALIDATION_NAME))
    }
    write_bytes_atomic(os.path.join(output_dir, DATASET_INFO_NAME), (json.dumps(info, indent=1) + "\n").encode())
    summary = {
        "seed": os.path.abspath(seed_path),
        "seed_provenance": {k: provenance.get(k) for k in ("model", "prompt_version", "finished_at", "counts")},
        "prompt_version": prompts.PROMPT_VERSION,
        "config": asdict(config),
        "records": len(records),
        "exported": len(usable),
        "skipped_not_ok": len(records) - len(usable),
        "train": len(train),
        "validation": len(val),
        "split_rule": "validation iff sha256(salt + key)[:8] mod 10000 < validation_fraction * 10000",
    }
    write_bytes_atomic(
        os.path.join(output_dir, EXPORT_NAME), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()
    )
    return summary


def read_sft(path: str) -> list[dict[str, Any]]:
    """Read one exported JSONL file back (tests, fine-tuning)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str]) -> int:
    """``mmcorpus rewriter export-sft``."""
    parser = argparse.ArgumentParser(prog="mmcorpus rewriter export-sft", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", required=True, help=f"seed directory (with {SEED_NAME}, {PROVENANCE_NAME}) or the JSONL")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--validation-fraction", type=float, default=ExportConfig.validation_fraction)
    parser.add_argument("--salt", default=ExportConfig.salt)
    parser.add_argument("--min-validation", type=int, default=ExportConfig.min_validation)
    args = parser.parse_args(argv)
    try:
        config = ExportConfig(args.validation_fraction, args.salt, args.min_validation)
    except ValueError as e:
        raise UserError(f"export-sft: {e}") from e
    summary = export_sft(args.seed, args.output, config)
    print(json.dumps({k: summary[k] for k in ("exported", "skipped_not_ok", "train", "validation")}))
    print(f"wrote {args.output}/{TRAIN_NAME} and {VALIDATION_NAME}")
    return 0
