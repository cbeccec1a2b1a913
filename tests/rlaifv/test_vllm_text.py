"""The text-only RLAIF-V calls (claim splitting, question writing) against a real vLLM CPU server with a
tiny random model built locally; the image calls (policy, labeler) go to the stand-in, which checks
their ``image_url`` parts. The model's text is random, so the test asserts what the server guarantees:
every call is answered (no transport reasons), every answer that stopped normally obeys the JSON schema
(vLLM's structured output), the number of requests vLLM served equals the number of cached claim and
question answers, and a forced rerun sends vLLM nothing."""

from __future__ import annotations

import json

import pytest

from pipelines import rlaifv as cli
from rewriter.cache import ResponseCache
from rewriter.serving import ServeConfig, VLLMServer, server_metrics
from rewriter.standin import StandInServer
from transforms.stage_io import read_manifest, read_table

from .responder import photo_pairs, respond

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SUCCESS = "vllm:request_success_total"


def test_claims_and_questions_on_real_vllm(tmp_path, tiny_model, vllm_python):
    import helpers

    inp = helpers.make_stage_dir(str(tmp_path / "in"), photo_pairs()[:3], stage="dedup", num_shards=1)
    fb_cache = str(tmp_path / "fb-cache")
    cfg = ServeConfig(model=tiny_model, served_model_name="tiny", max_model_len=1024, python=vllm_python,
                      log_path=str(tmp_path / "vllm.log"), startup_timeout_s=600)
    with StandInServer(respond_body=respond) as pol, StandInServer(respond_body=respond) as lab, \
            VLLMServer(cfg).start() as vllm:
        assert cli.main(["generate", "--input", inp, "--output", str(tmp_path / "gen"), "--policy-endpoint",
                         pol.base_url, "--policy-model", "p", "--n", "2", "--num-shards", "1",
                         "--cache-dir", str(tmp_path / "gen-cache")]) == 0
        fb = ["feedback", "--input", str(tmp_path / "gen"), "--output", str(tmp_path / "fb"),
              "--claims-endpoint", vllm.base_url, "--claims-model", "tiny", "--claims-max-tokens", "96",
              "--labeler-endpoint", lab.base_url, "--labeler-model", "l", "--num-shards", "1",
              "--cache-dir", fb_cache, "--timeout", "300", "--concurrency", "4"]
        before = server_metrics(vllm.root_url).get(SUCCESS, 0.0)
        assert cli.main(fb) == 0
        served = server_metrics(vllm.root_url).get(SUCCESS, 0.0) - before
        ledger = read_table(str(tmp_path / "fb"), "ledger").to_pylist()
        assert len(ledger) == 3
        allowed = {"ok", "rlaifv_claims_invalid", "rlaifv_questions_invalid"}
        assert {r["reason"] for r in ledger} <= allowed, ledger

        cache = ResponseCache(fb_cache)
        entries = [cache.get(k) for k in cache.keys()]
        labeler = [e for e in entries if e["text"].startswith('{"answer"')]
        vllm_entries = [e for e in entries if not e["text"].startswith('{"answer"')]
        assert len(labeler) == len(lab.seen)
        assert served == len(vllm_entries) >= 6  # 3 records x 2 responses: one claims call each at least
        stopped = [e for e in vllm_entries if e["finish_reason"] == "stop"]
        for e in stopped:  # structured output: a normally finished answer is the schema's JSON
            doc = json.loads(e["text"])
            assert set(doc) in ({"claims"}, {"questions"}) and isinstance(next(iter(doc.values())), list)
        print(f"vLLM served {int(served)} claim/question requests, {len(stopped)} stopped normally; "
              f"labeler {len(lab.seen)}; ledger {sorted(r['reason'] for r in ledger)}")

        rerun = [*fb, "--force"]
        rerun[4] = str(tmp_path / "fb2")
        seen = len(lab.seen)
        assert cli.main(rerun) == 0
        assert server_metrics(vllm.root_url).get(SUCCESS, 0.0) - before == served and len(lab.seen) == seen
        assert [f.sha256 for f in read_manifest(str(tmp_path / "fb2")).files] == \
            [f.sha256 for f in read_manifest(str(tmp_path / "fb")).files]
