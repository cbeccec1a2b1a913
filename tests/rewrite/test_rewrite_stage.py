"""The rewrite stage end to end in real Beam pipelines: offline backend, policies, fault injection through the
stand-in server, crash + resume without paying twice, the API key never leaking, the CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from pipelines import rewrite as rewrite_cli
from rewriter import prompts
from rewriter.cache import ResponseCache, cache_key
from rewriter.standin import RETRYABLE_FAULTS, StandInServer, fault_for
from schemas import reasons
from schemas.manifest import MANIFEST_NAME
from transforms.stage_io import read_manifest, read_table

from .stage_fixture import make_stage_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARAMS = {"max_tokens": 256, "temperature": 0.0}
SENTINEL = "sk-SENTINEL-9d41c7e0b2a6"


def cc3m_captions(sample_dir, n: int) -> list[str]:
    with open(sample_dir / "cc3m_val_captions_8k.tsv", encoding="utf-8", newline="") as f:
        rows = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return list(dict.fromkeys(rows))[:n]


def pairs_from(captions: list[str], needs_rewrite=lambda i: True):
    from schemas.records import Pair

    return [
        Pair(key=f"k{i:04d}", caption=c, needs_rewrite=needs_rewrite(i), quality_flags=["x"] if needs_rewrite(i) else [],
             source=f"in.tsv#{i}")
        for i, c in enumerate(captions)
    ]


def ledger_by_key(out: str) -> dict[str, dict]:
    rows = read_table(out, "ledger").to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key has more than one ledger row"
    return {r["key"]: r for r in rows}


def data_by_key(out: str) -> dict[str, dict]:
    rows = read_table(out, "data").to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was written twice"
    return {r["key"]: r for r in rows}


def file_hashes(out: str) -> dict[str, str]:
    return {f.path: f.sha256 for f in read_manifest(out).files}


# --- offline backend (the demo path) -----------------------------------------------------------


def test_offline_backend_policy_and_records(tmp_path, sample_dir):
    captions = cc3m_captions(sample_dir, 200)
    pairs = pairs_from(captions, needs_rewrite=lambda i: i % 3 == 0)
    pairs[3] = pairs[3].replace(caption="   ")  # selected, nothing to rewrite
    inp = make_stage_dir(str(tmp_path / "dedup"), pairs)
    out = str(tmp_path / "rewrite")
    t0 = time.monotonic()
    assert rewrite_cli.main(["--input", inp, "--output", out, "--backend", "offline-template"]) == 0
    seconds = time.monotonic() - t0

    ledger, data = ledger_by_key(out), data_by_key(out)
    assert set(ledger) == {p.key for p in pairs}
    selected = [p for p in pairs if p.needs_rewrite]
    assert Counter((r["status"], r["reason"]) for r in ledger.values()) == Counter(
        {("kept", "ok"): len(selected) - 1, ("kept", reasons.REWRITE_SKIPPED): len(pairs) - len(selected),
         ("kept", reasons.REWRITE_EMPTY): 1}  # on_failure keep_raw (the default): kept as it came
    )
    for p in pairs:
        row, led = data.get(p.key), ledger[p.key]
        if not p.needs_rewrite:  # skipped: unchanged, no model named
            assert row["caption"] == p.caption and row["raw_caption"] is None and row["qa"] is None
            assert (led["model"], led["prompt_version"]) == (None, None)
        elif p.key == "k0003":
            assert (row["caption"], row["raw_caption"], row["qa"], row["rewrite_model"]) == ("   ", None, None, None)
            assert led["detail"] == "kept raw caption: no caption to rewrite"
            assert (led["model"], led["prompt_version"]) == ("offline-template", prompts.PROMPT_VERSION)
        else:
            from rewriter.offline import tidy

            assert row["raw_caption"] == p.caption
            assert row["caption"] == tidy(p.caption)
            assert row["qa"] == [{"question": "What does the image show?", "answer": tidy(p.caption)}]
            assert (row["rewrite_model"], row["prompt_version"]) == ("offline-template", prompts.PROMPT_VERSION)
            assert (led["model"], led["prompt_version"]) == ("offline-template", prompts.PROMPT_VERSION)
    m = read_manifest(out)
    assert m.config["rewrite"]["model"] == "offline-template"
    assert seconds < 60

    # --policy all changes the config: rerun; same input + config again: byte-identical files.
    out_all = str(tmp_path / "rewrite-all")
    rewrite_cli.main(["--input", inp, "--output", out_all, "--backend", "offline-template", "--policy", "all"])
    assert read_manifest(out_all).counts["by_reason"] == {"kept/ok": len(pairs) - 1, "kept/rewrite_empty": 1}
    first = file_hashes(out_all)
    rewrite_cli.main(["--input", inp, "--output", out_all, "--backend", "offline-template", "--policy", "all", "--force"])
    assert file_hashes(out_all) == first


# --- fault injection -------------------------------------------------------------------------


def expected_outcome(seed: int, caption: str, rate: float, max_retries: int) -> tuple[str, str, int, bool]:
    """(status, reason, requests, cached) the stand-in's fault plan implies for one caption."""
    attempt = 0
    while True:
        fault = fault_for(seed, caption, attempt, rate)
        if fault in RETRYABLE_FAULTS:
            if attempt >= max_retries:
                return "error", reasons.REWRITE_EXHAUSTED_RETRIES, attempt + 1, False
            attempt += 1
            continue
        if fault == "malformed_json":
            return "rejected", reasons.REWRITE_INVALID_JSON, attempt + 1, True
        if fault == "malformed_body":
            return "rejected", reasons.REWRITE_INVALID_JSON, attempt + 1, False
        if fault == "truncated":
            return "rejected", reasons.REWRITE_TRUNCATED, attempt + 1, True
        return "kept", reasons.OK, attempt + 1, True


def pick_seed(captions, rate, max_retries) -> int:
    """The first seed whose plan exercises every fault and every outcome (deterministic)."""
    for seed in range(500):
        faults = {fault_for(seed, c, a, rate) for c in captions for a in range(max_retries + 1)}
        outcomes = {expected_outcome(seed, c, rate, max_retries)[1] for c in captions}
        if faults >= {None, "http_429", "http_500", "hang", "malformed_json", "malformed_body", "truncated"} and outcomes == {
            reasons.OK, reasons.REWRITE_INVALID_JSON, reasons.REWRITE_TRUNCATED, reasons.REWRITE_EXHAUSTED_RETRIES
        }:
            return seed
    raise AssertionError("no seed exercises every fault")


@pytest.mark.slow
def test_fault_injection_every_input_ends_once(tmp_path, sample_dir):
    rate, max_retries = 0.2, 1
    captions = cc3m_captions(sample_dir, 80)
    seed = pick_seed(captions, rate, max_retries)
    pairs = pairs_from(captions)
    inp = make_stage_dir(str(tmp_path / "dedup"), pairs)
    out, cache_dir = str(tmp_path / "rewrite"), str(tmp_path / "cache")
    argv = ["--input", inp, "--output", out, "--model", "rw-test", "--cache-dir", cache_dir, "--policy", "all",
            "--timeout", "2", "--max-retries", str(max_retries), "--concurrency", "8", "--batch-size", "16",
            "--on-failure", "drop",  # this test is about which failures are errors, rejections, cached
            "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    # time-out 2 s against hangs of 4 s: a loaded box must not turn a slow answer into an extra attempt
    with StandInServer(latency_s=0.01, fault_rate=rate, seed=seed, hang_s=4.0, retry_after_s=1) as srv:
        assert rewrite_cli.main(argv + ["--endpoint", srv.base_url]) == 0
        seen = Counter(srv.captions_seen())

    ledger, data = ledger_by_key(out), data_by_key(out)
    assert len(ledger) == len(pairs)  # exactly one ledger row per input
    expected = {p.key: expected_outcome(seed, p.caption, rate, max_retries) for p in pairs}
    got = {k: (r["status"], r["reason"]) for k, r in ledger.items()}
    assert got == {k: (e[0], e[1]) for k, e in expected.items()}
    assert set(data) == {k for k, e in expected.items() if e[0] == "kept"}  # kept = outputs, no duplicates
    assert all(ledger[k]["model"] == "rw-test" and ledger[k]["prompt_version"] == prompts.PROMPT_VERSION for k in ledger)
    # The server saw exactly the attempts the plan implies: no extra retries, none missing.
    assert seen == Counter({p.caption: expected[p.key][2] for p in pairs})
    # Every HTTP 200 chat completion was cached (valid or not); transport failures were not.
    cache = ResponseCache(cache_dir)
    cached = {p.key for p in pairs if cache.get(cache_key("rw-test", prompts.PROMPT_VERSION, p.caption, PARAMS))}
    assert cached == {k for k, e in expected.items() if e[3]}
    assert len(cache.keys()) == len(cached)
    m = read_manifest(out)
    assert m.counts["inputs"] == m.counts["ledger_rows"] == len(pairs)
    assert m.counts["outputs"] == len(data)

    # Rerun from the cache alone: the server is gone; cached answers still decide every cached record.
    out2 = str(tmp_path / "rewrite-again")
    rewrite_cli.main(argv[:3] + [out2] + argv[4:] + ["--endpoint", "http://127.0.0.1:9/v1", "--no-preflight",
                                                    "--timeout", "0.2", "--max-retries", "0"])
    again = ledger_by_key(out2)
    for k, e in expected.items():
        if e[3]:
            assert (again[k]["status"], again[k]["reason"]) == (e[0], e[1])
        else:
            assert (again[k]["status"], again[k]["reason"]) == ("error", reasons.REWRITE_EXHAUSTED_RETRIES)


# --- crash + resume --------------------------------------------------------------------------


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, MMCORPUS_PROGRESS="0", **extra)
    return env


@pytest.mark.slow
def test_kill_mid_run_then_rerun_pays_nothing_twice(tmp_path, sample_dir):
    captions = cc3m_captions(sample_dir, 40)
    pairs = pairs_from(captions)
    inp = make_stage_dir(str(tmp_path / "dedup"), pairs)
    out, cache_dir = str(tmp_path / "rewrite"), str(tmp_path / "cache")
    logs = tmp_path / "killed.log"
    with StandInServer(latency_s=0.1) as srv:
        argv = ["--input", inp, "--output", out, "--endpoint", srv.base_url, "--model", "rw-test",
                "--cache-dir", cache_dir, "--policy", "all", "--concurrency", "2", "--batch-size", "8"]
        with open(logs, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines.rewrite", *argv], cwd=REPO, env=_env(),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 300
            while srv.responses_sent < 10 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group we started: the pipeline and its workers
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not os.path.exists(os.path.join(out, MANIFEST_NAME))
        cache = ResponseCache(cache_dir)
        key = {c: cache_key("rw-test", prompts.PROMPT_VERSION, c, PARAMS) for c in captions}
        cached_before = {c for c in captions if cache.get(key[c]) is not None}
        assert 5 <= len(cached_before) < len(captions)
        n_before = len(srv.seen)

        assert rewrite_cli.main(argv) == 0
        rerun = srv.captions_seen()[n_before:]

    assert not set(rerun) & cached_before  # no request whose answer was already cached
    assert len(rerun) == len(captions) - len(cached_before)  # and each missing answer asked exactly once
    assert set(rerun) | cached_before == set(captions)
    assert read_manifest(out).counts["by_reason"] == {"kept/ok": len(captions)}

    # A fresh run with everything cached sends nothing and writes byte-identical files.
    out2 = str(tmp_path / "rewrite-2")
    rewrite_cli.main(argv[:3] + [out2] + argv[4:5] + ["http://127.0.0.1:9/v1", "--no-preflight"] + argv[6:])
    assert file_hashes(out2) == file_hashes(out)


# --- the key never leaks -----------------------------------------------------------------------


@pytest.mark.slow
def test_api_key_is_never_printed_logged_or_written(tmp_path, sample_dir):
    captions = cc3m_captions(sample_dir, 30)
    inp = make_stage_dir(str(tmp_path / "dedup"), pairs_from(captions))
    out, cache_dir = str(tmp_path / "rewrite"), str(tmp_path / "cache")
    with StandInServer(fault_rate=0.3, seed=3, hang_s=1.0, retry_after_s=1, expected_api_key=SENTINEL) as srv:
        argv = ["--input", inp, "--output", out, "--endpoint", srv.base_url, "--model", "rw-test",
                "--cache-dir", cache_dir, "--policy", "all", "--timeout", "0.4", "--max-retries", "1",
                "--api-key-env", "REWRITER_KEY"]
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "rewrite", *argv], cwd=REPO, capture_output=True,
                              env=_env(REWRITER_KEY=SENTINEL, MMCORPUS_LOG_LEVEL="DEBUG", OPENAI_LOG="debug"),
                              timeout=300)
        faults = Counter(r.fault for r in srv.seen)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert faults[None] > 0 and sum(faults.values()) > faults[None]  # answered (key accepted) and faulted
    assert b"chat/completions" in proc.stderr  # the debug log really was on
    ledger = ledger_by_key(out)
    assert Counter(r["reason"] for r in ledger.values())[reasons.OK] > 0
    assert not any(r["reason"] == reasons.REWRITE_CLIENT_ERROR for r in ledger.values())  # the key was sent
    needle = SENTINEL.encode()
    assert needle not in proc.stdout and needle not in proc.stderr
    for root in (out, cache_dir, str(tmp_path / "dedup")):
        for d, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(d, name), "rb") as f:
                    assert needle not in f.read(), os.path.join(d, name)
    # the manifest names neither the key nor the endpoint
    with open(os.path.join(out, MANIFEST_NAME), encoding="utf-8") as f:
        manifest = f.read()
    assert "REWRITER_KEY" not in manifest and "127.0.0.1" not in manifest


# --- CLI -------------------------------------------------------------------------------------


def test_cli_errors_name_the_flag(tmp_path, capsys):
    from pipelines import cli

    inp = make_stage_dir(str(tmp_path / "dedup"), pairs_from(["a dog on a beach"]))
    assert cli.main(["rewrite", "--input", inp, "--output", str(tmp_path / "o")]) == 2
    assert "--endpoint and --model required with --backend openai" in capsys.readouterr().err
    assert cli.main(["rewrite", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                     "--backend", "offline-template"]) == 2
    assert f"--input {tmp_path / 'nope'}" in capsys.readouterr().err
    assert cli.main(["rewrite", "--input", inp, "--output", str(tmp_path / "o"), "--endpoint",
                     "http://user:pw@127.0.0.1:9/v1?token=t", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "--endpoint http://127.0.0.1:9/v1 does not answer" in err and "pw" not in err and "token" not in err
    assert cli.main(["rewrite", "--input", inp, "--output", str(tmp_path / "o"), "--backend", "offline-template",
                     "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err


def test_underscore_aliases_and_toml(tmp_path):
    args, beam_args = rewrite_cli.parser().parse_known_args(
        ["--input", "a", "--output", "b/out", "--cache_dir=/c", "--max_retries=3", "--api_key_env=K", "--batch_size=4",
         "--max_tokens=99", "--num_shards=3", "--no_preflight", "--endpoint=http://h/v1", "--model=m",
         "--runner=DirectRunner"]
    )
    assert beam_args == ["--runner=DirectRunner"]
    cfg = rewrite_cli.resolve_config(args)
    assert (cfg.cache_dir, cfg.max_retries, cfg.api_key_env, cfg.batch_size, cfg.max_tokens) == ("/c", 3, "K", 4, 99)
    assert args.num_shards == 3 and args.preflight is False

    toml = tmp_path / "cfg.toml"
    toml.write_text('[rewrite]\nbackend = "openai"\nendpoint = "http://h/v1"\nmodel = "from-toml"\nconcurrency = 7\n')
    args, _ = rewrite_cli.parser().parse_known_args(["--input", "a", "--output", "b/out", "--config", str(toml),
                                                      "--model", "from-flag"])
    cfg = rewrite_cli.resolve_config(args)
    assert (cfg.model, cfg.concurrency, cfg.cache_dir) == ("from-flag", 7, "b/rewrite-cache")
    assert "endpoint" not in json.dumps(cfg.hashed())


# --- duplicates and unexpected exceptions --------------------------------------------------------


class _ExplodingBackend:
    """Answers like the offline template, but raises for captions containing 'boom'."""

    def __init__(self):
        from rewriter.offline import OfflineTemplateBackend

        self.inner = OfflineTemplateBackend()

    async def complete(self, caption):
        if "boom" in caption:
            raise RuntimeError("secret detail that must not reach the ledger")
        return await self.inner.complete(caption)

    async def aclose(self):
        return None


def test_unexpected_exception_is_an_error_row_and_duplicates_are_asked_once(tmp_path, monkeypatch):
    import apache_beam as beam

    from schemas.records import Pair
    from transforms import rewrite as rewrite_transform
    from transforms.rewrite import RewriteCaptions, RewriteConfig

    monkeypatch.setattr(rewrite_transform, "make_backend", lambda cfg: _ExplodingBackend())
    pairs = [Pair(key="a", caption="a dog in Paris", needs_rewrite=True),
             Pair(key="b", caption="a dog in Paris", needs_rewrite=True),  # same caption: one request
             Pair(key="c", caption="boom goes the dynamite", needs_rewrite=True),
             Pair(key="d", caption="a cat", needs_rewrite=False)]
    cache_dir = str(tmp_path / "cache")
    cfg = RewriteConfig(backend="offline-template", policy="needs_rewrite", cache_dir=cache_dir, batch_size=8,
                        on_failure="drop")
    with beam.Pipeline() as p:
        outcomes = p | beam.Create(pairs) | RewriteCaptions(cfg)
        _ = (outcomes | beam.Map(lambda o: json.dumps([o.key, o.status, o.reason, o.detail, o.extra.get("model"),
                                                       o.pair.caption if o.pair else None]))
             | beam.io.WriteToText(str(tmp_path / "outcomes"), shard_name_template=""))
    got = sorted(json.loads(line) for line in open(tmp_path / "outcomes"))
    assert got == [
        ["a", "kept", "ok", "", "offline-template", "A dog in Paris."],
        ["b", "kept", "ok", "", "offline-template", "A dog in Paris."],
        ["c", "error", "exception_RuntimeError", "unexpected error while rewriting", "offline-template", None],
        ["d", "kept", "rewrite_skipped", "", None, "a cat"],
    ]
    assert len(ResponseCache(cache_dir).keys()) == 1  # one answer for the two identical captions
