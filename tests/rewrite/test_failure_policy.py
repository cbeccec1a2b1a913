"""`[rewrite] on_failure`: a failed rewrite keeps the record with its raw caption by default (ledger
`kept` with the failure as reason), or drops it with `drop`; real Beam pipeline, the stand-in server
answering each caption in a planned way."""

from __future__ import annotations

import json

import pytest

from pipelines import rewrite as rewrite_cli
from rewriter import prompts
from rewriter.standin import StandInServer
from schemas import reasons
from schemas.records import Pair
from transforms.stage_io import read_manifest, read_table

from .stage_fixture import make_stage_dir

# One caption per outcome; what the stand-in answers for each (None: the offline template, a valid answer).
CAPTIONS = {
    "good": "a brown dog runs on the beach in Brittany",
    "trunc": "two children fly a red kite over a green hill",
    "badjson": "a wooden boat moored in a quiet harbour at dusk",
    "unfaithful": "the old lighthouse of Saint-Malo at 6 pm in winter",
    "down": "a cyclist rides through the rain in Amsterdam",
}
ANSWERS = {
    CAPTIONS["trunc"]: ('{"qa": [{"question": "What is in the sky?", "answer": "A red ki', "length"),
    CAPTIONS["badjson"]: ("Sure! Here is a wooden boat in a harbour.", "stop"),
    # Valid JSON, but it drops the raw caption's place and time: rewrite_unfaithful.
    CAPTIONS["unfaithful"]: (prompts.render_output([{"question": "What is shown?", "answer": "A building."}],
                                                   "A building."), "stop"),
}
EXPECTED_REASON = {
    "good": reasons.OK, "trunc": reasons.REWRITE_TRUNCATED, "badjson": reasons.REWRITE_INVALID_JSON,
    "unfaithful": reasons.REWRITE_UNFAITHFUL, "down": reasons.REWRITE_EXHAUSTED_RETRIES,
}


def _respond(caption: str):
    from rewriter.standin import default_respond

    return ANSWERS.get(caption) or default_respond(caption)


@pytest.fixture(scope="module")
def server():
    # "down": every attempt is a 500, so with --max-retries 1 the request is exhausted after 2 attempts.
    with StandInServer(respond=_respond, plan=lambda c, a: "http_500" if c == CAPTIONS["down"] else None) as srv:
        yield srv


@pytest.fixture()
def dedup_dir(tmp_path):
    pairs = [Pair(key=k, caption=c, needs_rewrite=True, quality_flags=["caption_repetitive"], source=f"in.tsv#{i}",
                  url=f"http://example.org/{k}.jpg")
             for i, (k, c) in enumerate(CAPTIONS.items())]
    pairs.append(Pair(key="fine", caption="a cat sleeps on a sofa", source="in.tsv#9"))  # not selected
    return make_stage_dir(str(tmp_path / "dedup"), pairs)


def _run(server, dedup_dir, out, *extra):
    argv = ["--input", dedup_dir, "--output", out, "--endpoint", server.base_url, "--model", "rw-test",
            "--cache-dir", "none", "--max-retries", "1", "--timeout", "10", *extra]
    assert rewrite_cli.main(argv) == 0
    ledger = {r["key"]: r for r in read_table(out, "ledger").to_pylist()}
    data = {r["key"]: r for r in read_table(out, "data").to_pylist()}
    return ledger, data, read_manifest(out)


def test_keep_raw_is_the_default_and_keeps_every_failed_record_unrewritten(server, dedup_dir, tmp_path):
    ledger, data, m = _run(server, dedup_dir, str(tmp_path / "rewrite"))
    assert set(data) == set(ledger) == set(CAPTIONS) | {"fine"}
    assert {k: (r["status"], r["reason"]) for k, r in ledger.items()} == {
        **{k: ("kept", r) for k, r in EXPECTED_REASON.items()}, "fine": ("kept", reasons.REWRITE_SKIPPED)}
    assert m.counts["by_reason"] == {
        "kept/ok": 1, "kept/rewrite_truncated": 1, "kept/rewrite_invalid_json": 1, "kept/rewrite_unfaithful": 1,
        "kept/rewrite_exhausted_retries": 1, "kept/rewrite_skipped": 1}
    assert m.counts["outputs"] == m.counts["by_status"]["kept"] == 6  # kept = outputs
    assert m.config["rewrite"]["on_failure"] == "keep_raw"
    for k in ("trunc", "badjson", "unfaithful", "down"):
        row, led = data[k], ledger[k]
        # The record exactly as it came in: raw caption, not rewritten, still flagged as needing it.
        assert (row["caption"], row["raw_caption"], row["qa"], row["rewrite_model"], row["prompt_version"]) == (
            CAPTIONS[k], None, None, None, None)
        assert row["needs_rewrite"] is True and row["quality_flags"] == ["caption_repetitive"]
        assert row["url"] == f"http://example.org/{k}.jpg"
        # The ledger names the failure and the model that was asked.
        assert (led["model"], led["prompt_version"]) == ("rw-test", prompts.PROMPT_VERSION)
        assert led["detail"].startswith("kept raw caption: ")
    assert ledger["trunc"]["detail"] == "kept raw caption: finish_reason=length"
    assert ledger["down"]["detail"] == "kept raw caption: 2 attempts, last: http_500"
    assert ledger["unfaithful"]["detail"] == "kept raw caption: missing from the adopted caption: 6, Saint, Malo"
    assert data["good"]["raw_caption"] == CAPTIONS["good"] and data["good"]["rewrite_model"] == "rw-test"
    assert ledger["good"]["detail"] == ""


def test_drop_policy_rejects_or_errors_and_changes_the_config_hash(server, dedup_dir, tmp_path):
    keep_dir, drop_dir = str(tmp_path / "keep"), str(tmp_path / "drop")
    _, _, keep_m = _run(server, dedup_dir, keep_dir)
    ledger, data, m = _run(server, dedup_dir, drop_dir, "--on-failure", "drop")
    assert set(data) == {"good", "fine"}
    assert {k: (r["status"], r["reason"]) for k, r in ledger.items()} == {
        "good": ("kept", "ok"), "fine": ("kept", reasons.REWRITE_SKIPPED),
        "trunc": ("rejected", reasons.REWRITE_TRUNCATED), "badjson": ("rejected", reasons.REWRITE_INVALID_JSON),
        "unfaithful": ("rejected", reasons.REWRITE_UNFAITHFUL), "down": ("error", reasons.REWRITE_EXHAUSTED_RETRIES)}
    assert ledger["trunc"]["detail"] == "finish_reason=length"
    assert m.config["rewrite"]["on_failure"] == "drop" and m.config_hash != keep_m.config_hash


def test_on_failure_from_toml_and_bad_values(tmp_path, capsys):
    from pipelines import cli

    toml = tmp_path / "cfg.toml"
    toml.write_text('[rewrite]\nbackend = "offline-template"\non_failure = "drop"\n')
    args, _ = rewrite_cli.parser().parse_known_args(["--input", "a", "--output", "b/out", "--config", str(toml)])
    assert rewrite_cli.resolve_config(args).on_failure == "drop"
    toml.write_text('[rewrite]\nbackend = "offline-template"\non_failure = "skip"\n')
    inp = make_stage_dir(str(tmp_path / "dedup"), [Pair(key="a", caption="a dog")])
    assert cli.main(["rewrite", "--input", inp, "--output", str(tmp_path / "o"), "--config", str(toml)]) == 2
    assert "on_failure must be one of ('keep_raw', 'drop'), got 'skip'" in capsys.readouterr().err
    assert json.loads(json.dumps(rewrite_cli.RewriteConfig(backend="offline-template").hashed()))["on_failure"] == "keep_raw"
