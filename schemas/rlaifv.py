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
