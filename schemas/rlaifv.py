"""RLAIF-V record documents: what ``rlaifv generate|feedback|pairs`` store in ``Pair.meta`` (canonical JSON).

The stages carry their nested data (responses, claims, questions, answers, pairs) as one canonical JSON
document under a fixed key of ``Pair.meta`` so every stage output stays a plain Pair table that
``verify``, ``inspect --key`` and ``read_table`` already understand.

``meta["rlaifv"]`` after ``generate`` (one record per image and prompt)::

    {"prompt": str, "prompt_source": "qa" | "pool", "policy_model": str, "prompt_version": str,
     "responses": [{"i": int, "seed": int, "temperature": float, "top_p": float, "max_tokens": int,
                    "status": "ok" | <reason>, "text": str | None, "finish_reason": str | None}]}

after ``feedback`` each response additionally holds ``claims`` ([str]), ``questions`` ([str]),
``answers`` ([{"answer": "yes"|"no", "logprob_yes": float|None, "logprob_no": float|None}]) and
``score`` (minus the number of "no" answers; None when the response has no score), and the document
holds ``claims_model``, ``labeler_model``.

``meta["rlaifv_pairs"]`` after ``pairs`` (one record per image and prompt, so the ledger stays one row
per input record; the ``rlaifv`` document is dropped there)::

    {"prompt": str, "pairs": [{"chosen": str, "rejected": str, "chosen_i": int, "rejected_i": int,
                               "chosen_score": int, "rejected_score": int}]}
"""

from __future__ import annotations

import json
from typing import Any

META_KEY = "rlaifv"
PAIR_META_KEY = "rlaifv_pairs"
RESPONSE_OK = "ok"


def canonical_json(doc: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the same document always gives the same bytes."""
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def get_doc(meta: str | None, key: str = META_KEY) -> dict[str, Any] | None:
    """The document under ``key`` of a ``Pair.meta`` string, or None."""
    doc = json.loads(meta or "{}").get(key)
    return doc if isinstance(doc, dict) else None


def set_doc(meta: str | None, doc: dict[str, Any], key: str = META_KEY) -> str:
    """``meta`` with ``doc`` stored under ``key``, as canonical JSON."""
    out = json.loads(meta or "{}")
    out[key] = doc
    return canonical_json(out)


def _lp(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def audit_lines(meta: str | None) -> list[str]:
    """The RLAIF-V audit of one record as plain text lines (``mmcorpus inspect --key``): per response its
    seed, status, score and text, then each claim with its question and the labeler's answer (with the
    yes/no log-probabilities when kept); then the DPO pairs. Empty when ``meta`` holds neither document."""
    lines: list[str] = []
    doc = get_doc(meta)
    if doc is not None:
        lines.append(f"prompt: {doc.get('prompt')}")
        models = [f"{k} {doc[k]}" for k in ("policy_model", "claims_model", "labeler_model") if doc.get(k)]
        if models:
            lines.append("models: " + ", ".join(models))
        for r in doc.get("responses") or []:
            score = r.get("score")
            head = f"response {r.get('i')} (seed {r.get('seed')}, {r.get('status')}"
            head += f", score {score})" if score is not None else ")"
            lines.append(f"{head}: {r.get('text')}")
            claims, questions = r.get("claims") or [], r.get("questions") or []
            answers = r.get("answers") or []
            for j, claim in enumerate(claims):
                lines.append(f"  claim {j + 1}: {claim}")
                if j < len(questions):
                    q = f"    question: {questions[j]}"
                    if j < len(answers):
                        a = answers[j]
                        q += (f" -> {a.get('answer')} (logprob yes {_lp(a.get('logprob_yes'))}, "
                              f"no {_lp(a.get('logprob_no'))})")
                    lines.append(q)
            if r.get("answers_raw"):
                lines.append(f"  labeler answers (not yes/no): {r['answers_raw']}")
            if r.get("error"):
                lines.append(f"  error: {r['error']}")
    pairs = get_doc(meta, PAIR_META_KEY)
    if pairs is not None:
        if doc is None:
            lines.append(f"prompt: {pairs.get('prompt')}")
        for p in pairs.get("pairs") or []:
            lines.append(f"pair: chosen {p.get('chosen_i')} (score {p.get('chosen_score')}) over rejected "
                         f"{p.get('rejected_i')} (score {p.get('rejected_score')})")
    return lines
