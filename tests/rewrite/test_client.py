"""The async client against the stand-in server: what is retried, how long it waits, how many in flight."""

from __future__ import annotations

import asyncio
import random

import pytest

from rewriter.client import ClientConfig, RequestFailed, RewriteClient, parse_retry_after
from rewriter.standin import StandInServer
from schemas import reasons

# Generous time-out: on a loaded CI box a spurious time-out would add an attempt and break exact counts.
FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0)


def run(server: StandInServer, captions: list[str], api_key: str = "sk-test", **cfg):
    async def go():
        client = RewriteClient(ClientConfig(endpoint=server.base_url, model="m", **cfg), api_key=api_key,
                               rng=random.Random(0))

        async def one(c):
            try:
                return await client.complete(c)
            except RequestFailed as e:
                return e

        try:
            return await asyncio.gather(*(one(c) for c in captions)), client.stats
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_answer_and_usage():
    with StandInServer() as srv:
        (comp,), stats = run(srv, ["a dog dog"], **FAST)
    assert comp.finish_reason == "stop"
    assert comp.text == '{"qa": [{"question": "What does the image show?", "answer": "A dog."}], "caption": "A dog."}'
    assert comp.attempts == 1 and comp.completion_tokens > 0
    assert stats.requests == 1 and stats.retries == 0


@pytest.mark.parametrize("fault", ["http_500", "hang"])
def test_retryable_faults_are_retried_until_exhausted(fault):
    with StandInServer(fault_rate=1.0, faults=(fault,), hang_s=1.5) as srv:
        (err,), stats = run(srv, ["a dog"], max_retries=2, **dict(FAST, timeout_s=0.4))
        seen = srv.requests_for("a dog")
    assert isinstance(err, RequestFailed)
    assert err.reason == reasons.REWRITE_EXHAUSTED_RETRIES
    assert err.attempts == 3 and len(seen) == 3  # first try + 2 retries, no more
    assert stats.retries == 2
    assert err.detail == f"3 attempts, last: {'timeout' if fault == 'hang' else 'http_500'}"


def test_429_retry_after_is_honoured():
    # attempt 0 of this caption gets a 429 with Retry-After: 1; attempt 1 succeeds.
    plan = {0: "http_429"}
    with StandInServer(plan=lambda caption, attempt: plan.get(attempt), retry_after_s=1) as srv:
        (comp,), stats = run(srv, ["a cat"], max_retries=3, **FAST)
        seen = srv.requests_for("a cat")
    assert [r.fault for r in seen] == ["http_429", None]
    assert seen[1].t - seen[0].t >= 1.0  # backoff alone would be <= 0.05 s
    assert comp.attempts == 2 and stats.retries == 1


@pytest.mark.parametrize(
    "headers, expected",
    [({"retry-after": "2"}, 2.0), ({"retry-after-ms": "250", "retry-after": "9"}, 0.25), ({}, None),
     ({"retry-after": "soon"}, None)],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers) == expected


def test_client_errors_are_not_retried():
    with StandInServer(expected_api_key="sk-right") as srv:
        (err,), stats = run(srv, ["a dog"], api_key="sk-wrong", max_retries=5, **FAST)
        assert len(srv.seen) == 0  # refused before it counts as a chat request
    assert isinstance(err, RequestFailed)
    assert (err.reason, err.detail, err.attempts) == (reasons.REWRITE_CLIENT_ERROR, "http_401", 1)
    assert stats.requests == 1 and stats.retries == 0


def test_non_json_body_is_not_retried():
    with StandInServer(fault_rate=1.0, faults=("malformed_body",)) as srv:
        (err,), stats = run(srv, ["a dog"], max_retries=5, **FAST)
        assert len(srv.seen) == 1
    assert (err.reason, err.attempts) == (reasons.REWRITE_INVALID_JSON, 1)


@pytest.mark.parametrize("fault, finish", [("truncated", "length"), ("malformed_json", "stop")])
def test_bad_content_is_an_answer_not_a_retry(fault, finish):
    with StandInServer(fault_rate=1.0, faults=(fault,)) as srv:
        (comp,), stats = run(srv, ["a dog"], max_retries=5, **FAST)
    assert comp.finish_reason == finish and stats.requests == 1


def test_in_flight_is_bounded_and_reached():
    with StandInServer(latency_s=0.2) as srv:
        results, stats = run(srv, [f"dog {i}" for i in range(40)], concurrency=5, **FAST)
        assert srv.max_in_flight == 5
    assert stats.max_in_flight == 5
    assert all(r.finish_reason == "stop" for r in results)


def test_config_rejects_bad_combinations():
    with pytest.raises(ValueError, match="concurrency"):
        ClientConfig(endpoint="http://x/v1", model="m", concurrency=0)
    with pytest.raises(ValueError, match="backoff"):
        ClientConfig(endpoint="http://x/v1", model="m", backoff_base_s=2, backoff_max_s=1)
    with pytest.raises(ValueError, match="endpoint"):
        ClientConfig(endpoint="", model="m")
