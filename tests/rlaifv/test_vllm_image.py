"""The image calls of RLAIF-V (policy responses, labeler yes/no answers) against a real vLLM CPU server
serving a tiny random-weight BLIP-2 built locally (tests/rlaifv/tiny_mllm.py); claims and questions on
the stand-in. The whole chain runs on the bundled photos: generate → feedback → pairs → TRL export.

The model's text is random, so the test asserts what the server guarantees and what the stage must do
with it: vLLM served exactly one request per response and one per distinct (image, question); the
labeler's JSON schema, with the server's ``disable_any_whitespace``, leaves the random model no answer
but ``{"answer":"yes"}`` / ``{"answer":"no"}``, so every record is scored and the ledgers are exact;
a forced rerun sends vLLM nothing."""

from __future__ import annotations

import pytest

from pipelines import rlaifv as cli
from rewriter.serving import ServeConfig, VLLMServer, server_metrics
from rewriter.standin import StandInServer
from schemas.rlaifv import PAIR_META_KEY, get_doc
from transforms.rlaifv import image_data_url
from transforms.stage_io import read_manifest, read_table

from .responder import photo_pairs, respond
from .tiny_mllm import NUM_QUERY_TOKENS, make_tiny_blip2

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SUCCESS = "vllm:request_success_total"
KEYS = ["astronaut", "camera", "chelsea", "coffee", "horse", "motorcycle-right", "page", "rocket"]


def _served(vllm) -> float:
    return server_metrics(vllm.root_url).get(SUCCESS, 0.0)


def _ledger(d):
    return sorted((r["key"], r["status"], r["reason"]) for r in read_table(d, "ledger").to_pylist())


def test_policy_and_labeler_on_real_multimodal_vllm(photos_stage, tmp_path, cc3m_captions, vllm_python):
    model = make_tiny_blip2(str(tmp_path / "blip2"), cc3m_captions[:500])
    cfg = ServeConfig(model=model, served_model_name="tinyblip", max_model_len=512, python=vllm_python,
                      log_path=str(tmp_path / "vllm.log"), startup_timeout_s=900,
                      extra_args=("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'))
    out = tmp_path / "out"
    common = ["--num-shards", "2", "--concurrency", "4", "--timeout", "300"]
    with StandInServer(respond_body=respond) as clm, VLLMServer(cfg).start() as vllm:
        gen = ["generate", "--input", photos_stage, "--output", str(out / "gen"), "--policy-endpoint",
               vllm.base_url, "--policy-model", "tinyblip", "--n", "2", "--temperature", "1.0",
               "--top-p", "0.9", "--policy-max-tokens", "12", "--cache-dir", str(out / "gen-cache"), *common]
        before = _served(vllm)
        assert cli.main(gen) == 0
        policy_served = _served(vllm) - before
        assert policy_served == 16  # 8 photos x 2 responses, each answered once by vLLM
        assert _ledger(str(out / "gen")) == [(k, "kept", "ok") for k in KEYS]
        gen_docs = [get_doc(r["meta"]) for r in read_table(str(out / "gen")).to_pylist()]
        texts = [r["text"] for d in gen_docs for r in d["responses"]]
        assert len(texts) == 16 and all(t.strip() for t in texts)
        assert [(r["seed"], r["temperature"], r["top_p"], r["max_tokens"]) for r in gen_docs[0]["responses"]] == \
            [(0, 1.0, 0.9, 12), (1, 1.0, 0.9, 12)]

        fb = ["feedback", "--input", str(out / "gen"), "--output", str(out / "fb"),
              "--claims-endpoint", clm.base_url, "--claims-model", "llm", "--labeler-endpoint", vllm.base_url,
              "--labeler-model", "tinyblip", "--labeler-max-tokens", "32", "--cache-dir", str(out / "fb-cache"),
              *common]
        before = _served(vllm)
        assert cli.main(fb) == 0
        labeler_served = _served(vllm) - before
        assert _ledger(str(out / "fb")) == [(k, "kept", "ok") for k in KEYS]
        docs = {r["key"]: get_doc(r["meta"]) for r in read_table(str(out / "fb")).to_pylist()}
        # one vLLM request per distinct question of an image (identical ones share a request and the cache)
        distinct = sum(len({q for r in d["responses"] for q in r["questions"]}) for d in docs.values())
        assert labeler_served == distinct >= 16
        assert all(r.images == 0 for r in clm.seen)
        for d in docs.values():
            for r in d["responses"]:
                assert [a["answer"] in ("yes", "no") for a in r["answers"]] == [True] * len(r["questions"])
                assert r["score"] == -[a["answer"] for a in r["answers"]].count("no")
                # vLLM returned logprobs: the decision token's ("y" / "n" with this vocabulary) are kept
                assert all(a[f"logprob_{a['answer']}"] is not None and a[f"logprob_{a['answer']}"] <= 0
                           for a in r["answers"])
        answers = [a for d in docs.values() for r in d["responses"] for a in r["answers"]]
        print(f"vLLM BLIP-2: {int(policy_served)} policy + {int(labeler_served)} labeler requests; answers "
              f"{sum(a['answer'] == 'yes' for a in answers)} yes / {sum(a['answer'] == 'no' for a in answers)} no")

        # a forced rerun of both stages sends vLLM nothing and writes the same files
        before, seen = _served(vllm), len(clm.seen)
        gen2 = list(gen)
        gen2[4] = str(out / "gen2")
        assert cli.main([*gen2, "--force"]) == 0
        fb2 = list(fb)
        fb2[2], fb2[4] = str(out / "gen2"), str(out / "fb2")
        assert cli.main([*fb2, "--force"]) == 0
        assert _served(vllm) - before == 0 and len(clm.seen) == seen
        assert [f.sha256 for f in read_manifest(str(out / "fb2")).files] == \
            [f.sha256 for f in read_manifest(str(out / "fb")).files]

        # the image goes through the vision tower: with it the prompt is exactly the 4 query tokens longer
        import httpx

        def prompt_tokens(content):
            r = httpx.post(vllm.base_url + "/chat/completions", timeout=300, json={
                "model": "tinyblip", "max_tokens": 1, "messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        text = {"type": "text", "text": gen_docs[0]["prompt"]}
        image = {"type": "image_url", "image_url": {"url": image_data_url(photo_pairs()[0].image)}}
        assert prompt_tokens([image, text]) - prompt_tokens([text]) == NUM_QUERY_TOKENS

    assert cli.main(["pairs", "--input", str(out / "fb"), "--output", str(out / "pairs"), "--margin", "1",
                     "--max-pairs-per-image", "1", "--num-shards", "1"]) == 0
    # n=2: an image has a pair exactly when its two scores differ
    differ = sorted(k for k, d in docs.items() if d["responses"][0]["score"] != d["responses"][1]["score"])
    assert _ledger(str(out / "pairs")) == sorted(
        [(k, "kept", "ok") for k in differ] + [(k, "rejected", "rlaifv_no_pair") for k in KEYS if k not in differ])
    pairs = [p for r in read_table(str(out / "pairs")).to_pylist() for p in get_doc(r["meta"], PAIR_META_KEY)["pairs"]]
    assert len(pairs) == len(differ) >= 1  # seeded sampling on fixed random weights: 3 seen here
    assert cli.main(["export", "--input", str(out / "pairs"), "--output", str(out / "dpo"), "--format", "trl"]) == 0
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "dpo" / "trl" / "train.parquet"), split="train")
    assert len(ds) == len(differ)
