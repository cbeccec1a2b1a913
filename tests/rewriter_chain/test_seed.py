"""Seed annotation: stratified sampling, rate limits, cost estimate and confirmation, failures recorded,
cache on rerun, and the API key never leaving the environment (fault injection via the stand-in server)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time

import pytest

from rewriter import prompts
from rewriter.offline import template_rewrite
from rewriter.seed import (
    PROVENANCE_NAME, SEED_NAME, RateLimiter, SampleConfig, TeacherConfig, allocate, confirm, estimate_cost,
    length_bucket, main as seed_main, public_endpoint, run_seed, sample_rows, stratum_of,
)
from rewriter.standin import StandInServer
from schemas import reasons
from schemas.errors import UserError
from schemas.records import Pair

from .utils import SENTINEL_KEY, files_containing, make_stage_dir


def test_allocate_gives_every_stratum_one_then_shares_by_size():
    assert allocate({"a": 10, "b": 5, "c": 1}, 8) == {"a": 4, "b": 3, "c": 1}
    assert allocate({"a": 10, "b": 5, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    assert allocate({"a": 10, "b": 5, "c": 1}, 99) == {"a": 10, "b": 5, "c": 1}
    assert sum(allocate({f"s{i}": i + 1 for i in range(7)}, 13).values()) == 13


def test_strata_from_flags_and_length():
    assert length_bucket("x" * 10, (32, 64)) == "<32"
    assert length_bucket("x" * 40, (32, 64)) == "32-63"
    assert length_bucket("x" * 64, (32, 64)) == ">=64"
    row = {"caption": "a b", "quality_flags": ["url_token", "repeated_words"], "needs_rewrite": True}
    assert stratum_of(row, (32,)) == "en|repeated_words+url_token|<32"
    assert stratum_of({"caption": "a" * 40, "quality_flags": [], "needs_rewrite": False}, (32,)) == "en|clean|>=32"
    # language first: the filter's lang, else the prompt's script rule for older files
    assert stratum_of({"caption": "一只白色的小狗睡在沙发上", "quality_flags": [], "needs_rewrite": False}, (32,)) == "zh|clean|<32"
    assert stratum_of({"caption": "un perro en la playa", "lang": "es", "quality_flags": []}, (32,)) == "es|clean|<32"


def test_sample_rows_is_deterministic_and_stratified():
    rows = [{"key": f"k{i:03d}", "caption": "word " * (2 + i % 30), "quality_flags": ["short"] if i % 4 == 0 else [],
             "needs_rewrite": i % 4 == 0} for i in range(200)]
    cfg = SampleConfig(n=20, length_bins=(32, 64, 128))
    a, report = sample_rows(rows, cfg)
    b, _ = sample_rows(list(reversed(rows)), cfg)
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert len(a) == 20 and len({r["key"] for r in a}) == 20
    assert sum(s["population"] for s in report.values()) == 200
    assert sum(s["selected"] for s in report.values()) == 20
    assert all(s["selected"] >= 1 for s in report.values())
    c, _ = sample_rows(rows, SampleConfig(n=20, salt="other"))
    assert [r["key"] for r in c] != [r["key"] for r in a]


def test_rate_limiter_requests_per_window():
    async def go():
        lim = RateLimiter(3, None, window_s=0.3)
        times = []
        t0 = time.monotonic()
        for _ in range(7):
            await lim.acquire(1)
            times.append(time.monotonic() - t0)
        return times

    times = asyncio.run(go())
    # Lower bounds are the limit itself; upper bounds are loose (a loaded CI machine schedules late).
    assert times[2] < 0.25 and 0.3 <= times[3] < 0.9 and 0.6 <= times[6] < 1.5
    for i, t in enumerate(times):  # never more than 3 starts in any 0.3 s window
        assert sum(1 for u in times if t - 0.3 < u <= t) <= 3, times


def test_rate_limiter_tokens_per_window_and_settle():
    async def go():
        lim = RateLimiter(None, 100, window_s=0.3)
        t0 = time.monotonic()
        h = await lim.acquire(60)
        lim.settle(h, 10)  # the real usage was smaller: room for another big request now
        await lim.acquire(60)
        quick = time.monotonic() - t0
        await lim.acquire(60)  # 10 + 60 + 60 > 100: waits for the first to leave the window
        slow = time.monotonic() - t0
        await lim.acquire(500)  # larger than the limit: goes through once the window is empty
        return quick, slow, time.monotonic() - t0

    quick, slow, huge = asyncio.run(go())
    assert quick < 0.25 and 0.3 <= slow < 0.9 and huge >= 0.6


def test_cost_estimate_and_confirmation():
    teacher = TeacherConfig(endpoint="https://api.example.com/v1", model="gpt-x", max_tokens=500,
                            price_input_per_mtok=2.0, price_output_per_mtok=8.0, expected_output_tokens=100)
    caps = ["a dog", "two cats on a sofa"]
    est = estimate_cost(caps, teacher)
    chars = [sum(len(m["content"]) for m in prompts.build_messages(c)) for c in caps]
    assert est["prompt_tokens_est"] == sum(int(c / 4.0) + 8 for c in chars)
    assert est["output_tokens_expected"] == 200 and est["output_tokens_max"] == 1000
    assert est["usd_max"] == round((est["prompt_tokens_est"] * 2.0 + 1000 * 8.0) / 1e6, 4)
    assert confirm(True) is True
    assert confirm(False, ask=lambda _: "y", interactive=True) is True
    assert confirm(False, ask=lambda _: "", interactive=True) is False
    with pytest.raises(UserError, match="--yes"):
        confirm(False, interactive=False)


def test_public_endpoint_drops_credentials():
    assert public_endpoint("https://user:pw@api.example.com:8443/v1?key=abc#x") == "https://api.example.com:8443/v1"


def test_config_validation():
    with pytest.raises(ValueError):
        TeacherConfig(endpoint="http://x/v1", model="m", tokens_per_min=100, max_tokens=512)
    with pytest.raises(ValueError):
        SampleConfig(n=0)
    with pytest.raises(ValueError):
        SampleConfig(n=5, length_bins=(64, 32))


CAPTIONS = [
    "a dog runs on the beach", "rate limited caption about a cat", "server error caption of a red car",
    "malformed answer for a house", "two children playing football", "an old man reading a newspaper",
    "a bowl of fresh fruit on a table", "sunset over the mountains", "truncated answer about a bridge",
    "a woman riding a bicycle in the city",
]


def _plan(caption: str, attempt: int):
    if caption.startswith("rate limited") and attempt == 0:
        return "http_429"
    if caption.startswith("server error"):
        return "http_500"  # every attempt: retries run out
    if caption.startswith("malformed"):
        return "malformed_json"
    if caption.startswith("truncated"):
        return "truncated"
    return None


@pytest.fixture
def filter_dir(tmp_path):
    pairs = [Pair(key=f"s{i:02d}", caption=c, source=f"t#{i}", quality_flags=["short"] if i % 3 == 0 else [],
                  needs_rewrite=i % 3 == 0) for i, c in enumerate(CAPTIONS)]
    return make_stage_dir(str(tmp_path / "filter"), pairs)


def test_seed_against_a_faulty_teacher_records_everything(tmp_path, filter_dir, monkeypatch, caplog, capsys):
    monkeypatch.setenv("MMCORPUS_TEST_TEACHER_KEY", SENTINEL_KEY)
    caplog.set_level(logging.DEBUG)
    teacher_kw = dict(model="teacher-x", api_key_env="MMCORPUS_TEST_TEACHER_KEY", max_retries=1,
                      requests_per_min=1000, tokens_per_min=10**6, max_tokens=256, temperature=0.0)
    out_dir = str(tmp_path / "seed")
    with StandInServer(plan=_plan, expected_api_key=SENTINEL_KEY, retry_after_s=0) as srv:
        teacher = TeacherConfig(endpoint=srv.base_url, **teacher_kw)
        prov = run_seed(filter_dir, out_dir, SampleConfig(n=10), teacher, yes=True)
        first_requests = len(srv.seen)
        # Rerun: answered captions come from the cache; only the failed one is asked again (2 attempts).
        prov2 = run_seed(filter_dir, str(tmp_path / "seed2"), SampleConfig(n=10), teacher, yes=True,
                         cache_dir=os.path.join(out_dir, "cache"))
        second_requests = len(srv.seen) - first_requests
    records = {r["key"]: r for r in map(json.loads, open(os.path.join(out_dir, SEED_NAME)))}
    assert len(records) == 10
    by_caption = {r["caption"]: r for r in records.values()}
    assert by_caption[CAPTIONS[1]]["status"] == "ok"  # 429 then answered
    assert by_caption[CAPTIONS[2]]["status"] == "failed"
    assert by_caption[CAPTIONS[2]]["reason"] == reasons.REWRITE_EXHAUSTED_RETRIES
    assert by_caption[CAPTIONS[3]]["status"] == "invalid"
    assert by_caption[CAPTIONS[3]]["reason"] == reasons.REWRITE_INVALID_JSON
    assert by_caption[CAPTIONS[8]]["status"] == "invalid"
    assert by_caption[CAPTIONS[8]]["reason"] == reasons.REWRITE_TRUNCATED
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert len(ok) == 7
    for r in ok:
        assert r["response"] == template_rewrite(r["caption"])
    # 10 first attempts + 1 retry after the 429 + 1 retry of the 500
    assert first_requests == 12
    assert prov["run"]["requests_sent"] == 12 and prov["run"]["retries"] == 2
    assert prov["counts"] == {"requested": 10, "ok": 7, "invalid": 2, "failed": 1, "by_reason": {
        "failed/rewrite_exhausted_retries": 1, "invalid/rewrite_invalid_json": 1, "invalid/rewrite_truncated": 1,
        "ok/ok": 7}}
    assert prov["model"] == "teacher-x" and prov["prompt_version"] == prompts.PROMPT_VERSION
    assert prov["endpoint"] == srv.base_url
    assert second_requests == 2 and prov2["run"]["cache_hits"] == 9
    assert open(os.path.join(tmp_path / "seed2", SEED_NAME)).read() == open(os.path.join(out_dir, SEED_NAME)).read()
    # The key reached the server (it checked it) but nothing else.
    printed = capsys.readouterr()
    assert "estimated cost" in printed.out
    assert SENTINEL_KEY not in printed.out + printed.err
    assert SENTINEL_KEY not in caplog.text and caplog.text  # DEBUG logs were captured
    assert files_containing(str(tmp_path), SENTINEL_KEY.encode()) == []


def test_declined_confirmation_sends_nothing(tmp_path, filter_dir):
    with StandInServer() as srv:
        teacher = TeacherConfig(endpoint=srv.base_url, model="m")
        out = io.StringIO()
        result = run_seed(filter_dir, str(tmp_path / "seed"), SampleConfig(n=3), teacher, yes=False,
                          ask=lambda _: "n", interactive=True, out=out)
        assert result is None and srv.seen == []
    assert "estimated cost" in out.getvalue()
    assert not os.path.exists(tmp_path / "seed" / SEED_NAME)


def test_unattended_run_needs_yes(tmp_path, filter_dir):
    with StandInServer() as srv:
        with pytest.raises(UserError, match="--yes"):
            run_seed(filter_dir, str(tmp_path / "seed"), SampleConfig(n=3),
                     TeacherConfig(endpoint=srv.base_url, model="m"), interactive=False, out=io.StringIO())
        assert srv.seen == []


def test_remote_teacher_without_key_is_a_user_error(tmp_path, filter_dir, monkeypatch):
    monkeypatch.delenv("MMCORPUS_TEST_NO_KEY", raising=False)
    with pytest.raises(UserError, match=r"\$MMCORPUS_TEST_NO_KEY is not set"):
        seed_main(["--input", filter_dir, "--output", str(tmp_path / "s"), "--n", "2", "--endpoint",
                   "https://api.example.com/v1", "--model", "gpt-x", "--api-key-env", "MMCORPUS_TEST_NO_KEY", "--yes"])


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--input"):
        seed_main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "s"), "--n", "2",
                   "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--yes"])
