"""`mmcorpus verify DIR`: check a stage output's invariants and checksums; exit 1 when one fails.

Checks: the manifest parses; every listed file exists with its size and sha256; no unlisted
files in data/ or ledger/; ledger rows = inputs (and = the previous stage's outputs for stage
inputs); kept ledger rows = output rows; reason counts recomputed from the ledger match the
manifest; every reason is in the vocabulary; output keys are unique and each has a kept ledger row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import reasons
from schemas.errors import UserError
from schemas.manifest import DATA_DIR, FILE_KIND_DATA, FILE_KIND_LEDGER, LEDGER_DIR, MANIFEST_NAME, Manifest
from schemas.records import KEPT
from transforms.stage_io import join, read_bytes


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _sha256_of(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with FileSystems.open(path, compression_type="uncompressed") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _read_parquet(path: str, columns: list[str]):
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(f, columns=columns)


def verify(stage_dir: str) -> list[Check]:
    checks: list[Check] = []
    mpath = join(stage_dir, MANIFEST_NAME)
    if not FileSystems.exists(mpath):
        raise UserError(f"{mpath} not found: not a finished stage output (the manifest is written last)")
    try:
        m = Manifest.from_json(read_bytes(mpath).decode("utf-8"))
    except (ValueError, TypeError, KeyError) as e:
        return [Check("manifest parses", False, f"{type(e).__name__}: {e}")]
    checks.append(Check("manifest parses", True, f"stage {m.stage}, config {m.config_hash[:12]}"))

    # files: present, right size, right checksum, nothing unlisted
    bad = []
    for entry in m.files:
        path = join(stage_dir, entry.path)
        if not FileSystems.exists(path):
            bad.append(f"{entry.path} missing")
            continue
        size, sha = _sha256_of(path)
        if size != entry.bytes:
            bad.append(f"{entry.path}: {size} bytes, manifest says {entry.bytes}")
        elif sha != entry.sha256:
            bad.append(f"{entry.path}: sha256 {sha[:12]}…, manifest says {entry.sha256[:12]}…")
    checks.append(Check("files match checksums", not bad, "; ".join(bad[:5]) or f"{len(m.files)} files"))
    listed = {e.path for e in m.files}
    unlisted = []
    for sub in (DATA_DIR, LEDGER_DIR):
        for md in FileSystems.match([join(stage_dir, sub, "*")])[0].metadata_list:
            rel = md.path[len(stage_dir.rstrip("/")) + 1 :]
            if rel not in listed:
                unlisted.append(rel)
    checks.append(Check("no unlisted files", not unlisted, ", ".join(sorted(unlisted)[:5]) or "ok"))
    if bad:
        return checks

    # ledger
    ledger_counts: Counter = Counter()
    kept_keys: Counter = Counter()
    ledger_rows = 0
    for entry in m.files_of(FILE_KIND_LEDGER):
        t = _read_parquet(join(stage_dir, entry.path), ["key", "stage", "status", "reason"])
        ledger_rows += t.num_rows
        for key, stage, status, reason in zip(*(t.column(c).to_pylist() for c in ("key", "stage", "status", "reason"))):
            ledger_counts[f"{status}/{reason}"] += 1
            if status == KEPT:
                kept_keys[key] += 1
    c = m.counts
    checks.append(Check(
        "inputs = ledger rows",
        ledger_rows == c["inputs"] == c["ledger_rows"],
        f"inputs {c['inputs']}, ledger rows {ledger_rows} (manifest says {c['ledger_rows']})",
    ))
    from_stages = m.input.get("kind") == "stage" or (
        m.input.get("kind") == "sources"
        and all(s.get("kind") == "stage" for s in (m.input.get("sources") or {}).values())
    )
    if from_stages:
        prev = m.input.get("records")
        # select's upsampled replicas have one kept ledger row each on top of one row per input record
        made = int((m.extra.get("mixture") or {}).get("replicas") or 0)
        checks.append(Check("inputs = previous stage outputs", prev is not None and prev + made == c["inputs"],
                            f"previous outputs {prev}, inputs {c['inputs']}" + (f" ({made} replicas)" if made else "")))
    checks.append(Check(
        "reason counts match ledger",
        dict(ledger_counts) == c["by_reason"],
        "ok" if dict(ledger_counts) == c["by_reason"] else f"ledger {dict(ledger_counts)} vs manifest {c['by_reason']}",
    ))
    unknown = sorted({r.split("/", 1)[1] for r in ledger_counts} - reasons.ALL)
    unknown = [u for u in unknown if not u.startswith(reasons.EXCEPTION_PREFIX)]
    checks.append(Check("reasons in vocabulary", not unknown, ", ".join(unknown) or "ok"))

    kept = sum(n for k, n in ledger_counts.items() if k.startswith(KEPT + "/"))
    data_files = m.files_of(FILE_KIND_DATA)
    if data_files or "packed_samples" not in m.extra:  # pack stages (pack, sft_pack) write packs, not rows
        data_keys: Counter = Counter()
        for entry in data_files:
            t = _read_parquet(join(stage_dir, entry.path), ["key"])
            data_keys.update(t.column("key").to_pylist())
        n_data = sum(data_keys.values())
        checks.append(Check("kept = outputs", kept == n_data == c["outputs"], f"kept {kept}, output rows {n_data}, manifest {c['outputs']}"))
        dups = [k for k, n in data_keys.items() if n > 1]
        checks.append(Check("output keys unique", not dups, ", ".join(dups[:5]) or "ok"))
        missing = [k for k in data_keys if k not in kept_keys]
        checks.append(Check("every output has a kept ledger row", not missing, ", ".join(missing[:5]) or "ok"))
    else:
        packed = m.extra.get("packed_samples")
        checks.append(Check("kept = packed samples", kept == packed == c["outputs"], f"kept {kept}, packed {packed}"))
    return checks


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcorpus verify", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="stage output directories")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    args = p.parse_args(argv)
    all_ok = True
    report = {}
    for d in args.dirs:
        checks = verify(d)
        ok = all(ch.ok for ch in checks)
        all_ok &= ok
        report[d] = {"ok": ok, "checks": [ch.__dict__ for ch in checks]}
        if not args.json:
            from rich.console import Console
            from rich.markup import escape
            from rich.table import Table

            t = Table(title=f"verify {escape(d)}: {'OK' if ok else 'FAILED'}", title_justify="left")
            t.add_column("check")
            t.add_column("result")
            t.add_column("detail")
            for ch in checks:
                t.add_row(ch.name, "[green]ok[/green]" if ch.ok else "[red]FAIL[/red]", escape(ch.detail))
            Console().print(t)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if all_ok else 1


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "verify")
