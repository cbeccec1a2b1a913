"""New weights under the same served name never get stale cached answers: the served model's revision
(``--model-revision``, else the ``root`` that ``GET /v1/models`` reports, as vLLM does) is part of the
rewrite config hash and of every cache key. Real Beam pipelines against the stand-in server, whose
``/v1/models`` answers like vLLM's and whose answers change with its "weights"."""

from __future__ import annotations

import time

import pytest

from pipelines import rewrite as rewrite_cli
from rewriter import prompts
from rewriter.offline import template_rewrite
from rewriter.standin import StandInServer
from schemas.records import Pair
from transforms.stage_io import read_manifest, read_table

from .stage_fixture import make_stage_dir

CAPTIONS = ["a brown dog runs on the beach", "two children fly a red kite", "a wooden boat in a quiet harbour",
            "a cyclist rides through the rain", "a bowl of ramen on a wooden table"]


def answer_with(question: str):
    """The weights' behaviour: a faithful answer whose question tells the weights apart."""
    def respond(caption: str):
        out = template_rewrite(caption)
        return prompts.render_output([{"question": question, "answer": out["caption"]}], out["caption"]), "stop"
    return respond


class ServedWeights(StandInServer):
    """The stand-in, listing ``rw-test`` on ``GET /v1/models`` the way vLLM does (``root`` = the
    weights' path, ``created`` = the time of the request)."""

    def __init__(self, root: str | None, question: str):
        super().__init__(respond=answer_with(question))
        self.root = root

    async def _dispatch(self, method, path, headers, body, writer):
        if method == "GET" and path.rstrip("/") == "/v1/models":
            card = {"id": "rw-test", "object": "model", "created": int(time.time()), "owned_by": "vllm",
                    "parent": None, "max_model_len": 512}
            if self.root is not None:
                card["root"] = self.root
            await self._send(writer, 200, {"object": "list", "data": [card]})
            return True
        return await super()._dispatch(method, path, headers, body, writer)


@pytest.fixture()
def dedup_dir(tmp_path):
    pairs = [Pair(key=f"k{i}", caption=c, needs_rewrite=True, quality_flags=["x"]) for i, c in enumerate(CAPTIONS)]
    return make_stage_dir(str(tmp_path / "dedup"), pairs)


def _run(srv, dedup_dir, out, cache, *extra):
    assert rewrite_cli.main(["--input", dedup_dir, "--output", out, "--endpoint", srv.base_url, "--model", "rw-test",
                             "--cache-dir", cache, *extra]) == 0
    questions = {r["qa"][0]["question"] for r in read_table(out, "data").to_pylist()}
    return questions, read_manifest(out)


def test_new_weights_under_the_same_name_are_asked_again(dedup_dir, tmp_path):
    cache = str(tmp_path / "cache")
    with ServedWeights("/models/rewriter-2026-11-01", "What does the old model see?") as old:
        questions, m_old = _run(old, dedup_dir, str(tmp_path / "r1"), cache)
        assert questions == {"What does the old model see?"} and len(old.seen) == len(CAPTIONS)

    # New weights, same served name, same cache: every caption is asked again, no stale answer.
    with ServedWeights("/models/rewriter-2026-11-30", "What does the new model see?") as new:
        questions, m_new = _run(new, dedup_dir, str(tmp_path / "r2"), cache)
        assert questions == {"What does the new model see?"}
        assert len(new.seen) == len(CAPTIONS)
    assert m_new.config_hash != m_old.config_hash
    assert m_old.config["rewrite"]["model_revision"] == "/models/rewriter-2026-11-01"
    assert m_new.config["rewrite"]["model_revision"] == "/models/rewriter-2026-11-30"

    # Rolling back to the old weights is free: their answers are still cached under their revision.
    with ServedWeights("/models/rewriter-2026-11-01", "never asked") as back:
        questions, m_back = _run(back, dedup_dir, str(tmp_path / "r3"), cache)
        assert questions == {"What does the old model see?"} and back.seen == []
    assert m_back.config_hash == m_old.config_hash


def test_explicit_model_revision_wins_and_keys_the_cache(dedup_dir, tmp_path):
    cache = str(tmp_path / "cache")
    with ServedWeights(None, "First weights?") as srv:  # the server names no revision
        questions, m1 = _run(srv, dedup_dir, str(tmp_path / "r1"), cache, "--model-revision", "sha256:aaaa")
        assert questions == {"First weights?"}
    with ServedWeights("/same/path", "Second weights?") as srv:
        questions, m2 = _run(srv, dedup_dir, str(tmp_path / "r2"), cache, "--model-revision", "sha256:bbbb")
        assert questions == {"Second weights?"} and len(srv.seen) == len(CAPTIONS)
    assert (m1.config["rewrite"]["model_revision"], m2.config["rewrite"]["model_revision"]) == ("sha256:aaaa", "sha256:bbbb")


def test_served_revision_reads_vllm_model_cards():
    body = {"object": "list", "data": [
        {"id": "base", "object": "model", "created": 1, "root": "/m/base", "parent": None},
        {"id": "rewriter", "object": "model", "created": 1, "root": "/m/lora-v3", "parent": "base"}]}
    assert rewrite_cli.served_revision(body, "base") == "/m/base"
    assert rewrite_cli.served_revision(body, "rewriter") == "/m/lora-v3 (parent base)"
    assert rewrite_cli.served_revision(body, "other") is None
    assert rewrite_cli.served_revision({"data": [{"id": "gpt-4o", "created": 1}]}, "gpt-4o") is None
    assert rewrite_cli.served_revision(None, "x") is None and rewrite_cli.served_revision({"data": "x"}, "x") is None
