"""RLAIF-V test helpers: the bundled photos as Pair records, and a deterministic stand-in responder.

The responder answers the three request kinds by what the request carries:

- policy (a ``seed`` in the body): ``"The picture is photo <sha256(data URL)[:8]>."`` followed by ``seed % 3`` sentences
  ``"There is a wrong thing N."``; so with 4 samples (seeds 0..3) the scores are 0, -1, -2, 0;
- claims (``response_format`` named ``claims``): the answer split at ". ";
- questions (``questions``): ``"Is it true that <claim>?"`` per claim;
- labeler (``answer``): ``no`` when the question holds ``wrong``, else ``yes``.

Markers in the prompt make bad answers on cue: ``EMPTY`` (policy answers ""), ``BADCLAIMS`` (claims
answer ``{"claims": "x"}``), ``MAYBE`` (labeler answers ``maybe``); ``LABFAIL`` is carried into a
claim and its question (``labfail``) so a fault plan can target that record's labeler calls.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
PHOTOS = REPO / "data" / "sample" / "skimage_pairs"


def photo_pairs():
    from schemas.records import Pair

    out = []
    for line in (PHOTOS / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        stem = r["image"].rsplit(".", 1)[0].replace("_", "-")
        out.append(Pair(key=stem, caption=r["caption"], image=(PHOTOS / r["image"]).read_bytes(),
                        source=f"skimage_pairs/{r['image']}"))
    return sorted(out, key=lambda p: p.key)


def _user_text(body: dict) -> str:
    for m in body["messages"]:
        if m["role"] == "user":
            c = m["content"]
            return c if isinstance(c, str) else "\n".join(p["text"] for p in c if p["type"] == "text")
    return ""


def respond(body: dict) -> tuple[str, str]:
    text = _user_text(body)
    fmt = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
    if "seed" in body:
        if "EMPTY" in text:
            return "", "stop"
        extra = "".join(f" There is a wrong thing {k}." for k in range(body["seed"] % 3))
        tag = "".join(f" {m}." for m in ("BADCLAIMS", "MAYBE", "LABFAIL") if m in text)
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        photo = hashlib.sha256(url.encode()).hexdigest()[:8]  # each image its own claims: no shared cache entries
        return f"The picture is photo {photo}." + tag + extra, "stop"
    if fmt == "claims":
        answer = text.split("Answer: ", 1)[1]
        if "BADCLAIMS" in answer:
            return json.dumps({"claims": "x"}), "stop"
        claims = [s.strip().rstrip(".") + "." for s in answer.split(". ") if s.strip()]
        return json.dumps({"claims": claims}), "stop"
    if fmt == "questions":
        claims = json.loads(text)["claims"]
        return json.dumps({"questions": [f"Is it true that {c[:-1].lower()}?" for c in claims]}), "stop"
    if fmt == "answer":
        if "maybe" in text:
            return json.dumps({"answer": "maybe"}), "stop"
        return json.dumps({"answer": "no" if "wrong" in text else "yes"}), "stop"
    return "unexpected request", "stop"


