"""Same input + config ⇒ byte-identical rewrite outputs under injected faults, with identical captions in
batches that are in flight together: real Beam pipeline (the CLI) run twice against fresh stand-in servers,
every record's outcome predicted from ``standin.fault_for`` alone."""

from __future__ import annotations

import csv

import pytest

from pipelines import rewrite as rewrite_cli
from rewriter.standin import StandInServer, fault_for
from schemas import reasons
from schemas.records import Pair
from transforms.stage_io import read_manifest, read_table

from .stage_fixture import make_stage_dir

RATE, MAX_RETRIES, BATCH = 0.5, 2, 8


def captions(sample_dir, n: int) -> list[str]:
    with open(sample_dir / "cc3m_val_captions_8k.tsv", encoding="utf-8", newline="") as f:
        rows = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return list(dict.fromkeys(rows))[:n]


def planned(seed: int, caption: str, fault: str) -> tuple[str, str]:
    """(status under --on-failure drop, reason) of one caption, from the stand-in's fault plan."""
    if fault == "malformed_body":  # a 200 that is not JSON: not retried, not cached
        if fault_for(seed, caption, 0, RATE, (fault,)):
            return "rejected", reasons.REWRITE_INVALID_JSON
        return "kept", reasons.OK
    # http_429: retried (Retry-After 0) until an attempt is answered or MAX_RETRIES retries are spent
    if all(fault_for(seed, caption, a, RATE, (fault,)) for a in range(MAX_RETRIES + 1)):
        return "error", reasons.REWRITE_EXHAUSTED_RETRIES
    return "kept", reasons.OK


def sensitive(seed: int, caption: str, fault: str) -> bool:
    """Whether a second ask of ``caption`` that continued a shared per-caption counter (its first attempt
    numbered after the other ask's) would end differently from the first: such captions show a race."""
    shifted = {"malformed_body": 1, "http_429": MAX_RETRIES + 1}[fault]
    first = planned(seed, caption, fault)
    later = [fault_for(seed, caption, a + shifted, RATE, (fault,)) for a in range(MAX_RETRIES + 1)]
    if fault == "malformed_body":
        return (first[1] == reasons.OK) == bool(later[0])
    return (first[1] == reasons.OK) == all(later)


@pytest.mark.parametrize("fault", ["malformed_body", "http_429"])
@pytest.mark.parametrize("on_failure", ["drop", "keep_raw"])
def test_two_runs_are_byte_identical_and_follow_the_fault_plan(tmp_path, sample_dir, fault, on_failure):
    caps = captions(sample_dir, 24)
    # The seed: the first one where several captions would end differently if asked a second time after
    # (or racing) the first ask, and every outcome occurs.
    seed = next(s for s in range(200)
                if sum(sensitive(s, c, fault) for c in caps) >= 6
                and len({planned(s, c, fault) for c in caps}) == 2)
    # Each block of BATCH captions twice in a row: identical captions land in consecutive batches, which
    # the stage keeps in flight together (max_pending_batches=2), each batch asking its own copy.
    order = [c for i in range(0, len(caps), BATCH) for c in caps[i:i + BATCH] * 2]
    pairs = [Pair(key=f"k{i:04d}", caption=c, needs_rewrite=True, quality_flags=["x"], source=f"in.tsv#{i}")
             for i, c in enumerate(order)]
    inp = make_stage_dir(str(tmp_path / "dedup"), pairs)

    runs = []
    for run in range(2):
        out = str(tmp_path / f"rewrite-{run}")
        with StandInServer(latency_s=0.01, fault_rate=RATE, faults=(fault,), seed=seed, retry_after_s=0) as srv:
            assert rewrite_cli.main([
                "--input", inp, "--output", out, "--endpoint", srv.base_url, "--model", "rw-test",
                "--cache-dir", str(tmp_path / f"cache-{run}"), "--policy", "all", "--on-failure", on_failure,
                "--batch-size", str(BATCH), "--concurrency", "4", "--max-retries", str(MAX_RETRIES),
                "--timeout", "30"]) == 0  # generous: a slow answer on a loaded box must not add an attempt
            asked = srv.captions_seen()
        assert len(asked) > len(caps)  # the duplicates really were asked more than once
        runs.append(out)

    expected = {p.key: planned(seed, p.caption, fault) for p in pairs}
    if on_failure == "keep_raw":  # a failed rewrite stays, kept, with the failure as its reason
        expected = {k: ("kept", reason) for k, (_, reason) in expected.items()}
    for out in runs:
        ledger = read_table(out, "ledger").to_pylist()
        assert len(ledger) == len(pairs)
        assert {r["key"]: (r["status"], r["reason"]) for r in ledger} == expected
        data = read_table(out, "data").to_pylist()
        assert sorted(r["key"] for r in data) == sorted(k for k, e in expected.items() if e[0] == "kept")
    first, second = read_manifest(runs[0]), read_manifest(runs[1])
    assert [(f.path, f.sha256) for f in first.files] == [(f.path, f.sha256) for f in second.files]
    assert {f.kind for f in first.files} >= {"data", "ledger"}
