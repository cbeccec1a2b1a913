"""`mmcorpus inspect --key` prints the RLAIF-V audit (responses, claims, questions, answers with
log-probabilities, scores, pairs) that the key's records carry; exact output lines."""

from __future__ import annotations

import json

from pipelines import inspection
from schemas.records import Pair
from schemas.rlaifv import PAIR_META_KEY, canonical_json

FEEDBACK_DOC = {
    "prompt": "What is shown?", "prompt_source": "pool", "policy_model": "pol", "prompt_version": "v1",
    "claims_model": "llm", "labeler_model": "mllm",
    "responses": [
        {"i": 0, "seed": 0, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "status": "ok",
         "text": "A cat. A red hat.", "finish_reason": "stop", "claims": ["A cat.", "A red hat."],
         "questions": ["Is there a cat?", "Is the hat red?"],
         "answers": [{"answer": "yes", "logprob_yes": -0.1, "logprob_no": -2.5},
                     {"answer": "no", "logprob_yes": None, "logprob_no": None}], "score": -1},
        {"i": 1, "seed": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "status": "rlaifv_claims_invalid",
         "text": "Hmm", "finish_reason": "stop", "score": None, "error": "claims: not {claims: [str]} within max"},
    ],
}
PAIRS_DOC = {"prompt": "What is shown?", "pairs": [
    {"chosen": "A cat.", "rejected": "A cat. A red hat.", "chosen_i": 2, "rejected_i": 0,
     "chosen_score": 0, "rejected_score": -1}]}


def test_inspect_key_prints_rlaifv_audit(tmp_path, capsys):
    import helpers

    run = tmp_path / "run"
    other = Pair(key="b", caption="x", source="s")
    helpers.make_stage_dir(str(run / "fb"), [Pair(key="a", caption="c", source="s",
                                                  meta=canonical_json({"rlaifv": FEEDBACK_DOC})), other],
                           stage="rlaifv_feedback", num_shards=1)
    helpers.make_stage_dir(str(run / "pairs"), [Pair(key="a", caption="c", source="s",
                                                     meta=canonical_json({PAIR_META_KEY: PAIRS_DOC})), other],
                           stage="rlaifv_pairs", num_shards=1)
    assert inspection.main([str(run), "--key", "a"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("RLAIF-V audit at rlaifv_feedback (fb):")
    assert out[start:] == [
        "RLAIF-V audit at rlaifv_feedback (fb):",
        "  prompt: What is shown?",
        "  models: policy_model pol, claims_model llm, labeler_model mllm",
        "  response 0 (seed 0, ok, score -1): A cat. A red hat.",
        "    claim 1: A cat.",
        "      question: Is there a cat? -> yes (logprob yes -0.1, no -2.5)",
        "    claim 2: A red hat.",
        "      question: Is the hat red? -> no (logprob yes -, no -)",
        "  response 1 (seed 1, rlaifv_claims_invalid): Hmm",
        "    error: claims: not {claims: [str]} within max",
        "RLAIF-V audit at rlaifv_pairs (pairs):",
        "  prompt: What is shown?",
        "  pair: chosen 2 (score 0) over rejected 0 (score -1)",
    ]
    # --json carries the same lines per stage; a key without the documents gets none
    assert inspection.main([str(run), "--key", "a", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["trace"]["steps"]
    assert [len(s.get("rlaifv", [])) for s in steps] == [9, 2]
    assert inspection.main([str(run), "--key", "b"]) == 0
    assert "RLAIF-V audit" not in capsys.readouterr().out
