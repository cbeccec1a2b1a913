"""RLAIF-V transforms: policy responses, divide-and-conquer feedback (claims → questions → yes/no), DPO pairs.

All model calls go through the rewriter's one model-call layer: ``rewriter.client.RewriteClient``
(bounded concurrency, whitelisted retries, ``Retry-After``), ``rewriter.cache.ResponseCache`` keyed by
``cache_key(model, prompt_version, sha256(request messages), params)``. Every completed HTTP 200 answer is
cached (valid or not); transport failures are not, so a ``--force`` rerun asks only those again.

Per record (one image and one prompt):

- ``GenerateFn``: ``n`` policy samples with seeds ``seed + 0 .. seed + n-1`` and the configured
  temperature / top-p; the image goes as an ``image_url`` data-URL part. A response is usable when its
  text is non-empty; the record is kept when at least 2 are usable.
- ``FeedbackFn``: for every usable response, claims (JSON schema ``{"claims": [str]}``), one yes/no
  question per claim (``{"questions": [str]}``), then one labeler call per question with the image,
  constrained by a JSON schema to ``{"answer": "yes"|"no"}`` (logprobs asked for and kept when the
  server returns them). ``score = -(number of "no")``. Kept when at least 2 responses got a score.
- ``make_pairs``: pure function of one feedback record and the config (seeded per key).

A record that cannot be kept is rejected (the answer broke the contract: cached, a rerun gives the
same) or an error (no answer: retries exhausted, client error, unexpected exception), with the reason
of its first failed response (by index) and a detail counting the failures by reason.

Counters (``Metrics.counter("mmcorpus.rlaifv", name)``): ``requests``, ``cache_hits``, ``inflight_shared``,
``requests_<endpoint>`` (policy, claims, questions, labeler).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from rewriter.cache import ResponseCache, cache_key
from rewriter.client import ClientConfig, Completion, RequestFailed, RewriteClient
from schemas import reasons
from schemas.records import ERROR, REJECTED, Outcome, Pair
from schemas.rlaifv import META_KEY, PAIR_META_KEY, RESPONSE_OK, canonical_json, get_doc, set_doc

GENERATE_PROMPT_VERSION = "rlaifv-generate-v1"
CLAIMS_PROMPT_VERSION = "rlaifv-claims-v1"
QUESTIONS_PROMPT_VERSION = "rlaifv-questions-v1"
LABELER_PROMPT_VERSION = "rlaifv-labeler-v1"

DEFAULT_PROMPT_POOL = (
    "Describe this image in detail.",
    "What is happening in this image?",
    "List the objects you can see in this image and where they are.",
)

CLAIMS_SYSTEM = (
    "Split the answer into atomic factual claims about the image, each a short standalone sentence. "
    'Reply with JSON {"claims": [...]} only.'
)
QUESTIONS_SYSTEM = (
    "Turn every claim into one yes/no question that is answered 'yes' exactly when the claim is true. "
    'Reply with JSON {"questions": [...]}, one question per claim, in order.'
)
LABELER_TEMPLATE = 'Look at the image and answer with JSON {{"answer": "yes"}} or {{"answer": "no"}}. {question}'

CLAIMS_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "claims",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"claims": {"type": "array", "items": {"type": "string"}}},
            "required": ["claims"],
            "additionalProperties": False,
        },
    },
}
QUESTIONS_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "questions",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"questions": {"type": "array", "items": {"type": "string"}}},
            "required": ["questions"],
            "additionalProperties": False,
        },
    },
}
ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}

# Transport failures: nothing was answered, so nothing is cached and the record is an error.
_TRANSPORT = (reasons.REWRITE_EXHAUSTED_RETRIES, reasons.REWRITE_CLIENT_ERROR)
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(frozen=True)
class GenerateConfig:
    """Policy sampling.

    Args:
        policy: the policy endpoint (``max_tokens`` there is the response length cap).
        n: responses per prompt (>= 2: a pair needs two).
        temperature, top_p: sampling parameters sent with (and stored for) every response.
        seed: response ``i`` is sampled with seed ``seed + i``.
        prompt_source: ``qa`` (the record's first QA question, else the pool), ``pool`` (pool only).
        prompt_pool: prompts picked by a hash of the record key when the record has no question.
        cache_dir: response cache (None: no cache).
        batch_size: records per DoFn call (their requests run concurrently).
    """

    policy: ClientConfig
    n: int = 8
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    prompt_source: str = "qa"
    prompt_pool: tuple[str, ...] = DEFAULT_PROMPT_POOL
    cache_dir: str | None = None
    batch_size: int = 8

    def __post_init__(self):
        if self.n < 2:
            raise ValueError("n must be >= 2 (a pair needs two responses)")
        if not 0.0 <= self.temperature <= 2.0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("need 0 <= temperature <= 2 and 0 < top_p <= 1")
        if self.prompt_source not in ("qa", "pool"):
            raise ValueError("prompt_source must be 'qa' or 'pool'")
        if self.prompt_source == "pool" and not self.prompt_pool:
            raise ValueError("prompt_source 'pool' needs a non-empty prompt_pool")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class FeedbackConfig:
    """Claim splitting, question writing (``claims`` endpoint) and labeling (``labeler`` endpoint).

    Args:
        claims: text-only endpoint for claims and questions.
        labeler: multimodal endpoint answering yes/no with the image.
        max_claims: a claim list longer than this fails the schema (``rlaifv_claims_invalid``).
        logprobs: ask the labeler for logprobs (kept when the server returns them).
        cache_dir, batch_size: as in ``GenerateConfig``.
    """

    claims: ClientConfig
    labeler: ClientConfig
    max_claims: int = 16
    logprobs: bool = True
    cache_dir: str | None = None
    batch_size: int = 4

    def __post_init__(self):
        if self.max_claims < 1:
            raise ValueError("max_claims must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class PairsConfig:
    """DPO pair sampling within each response set.

    Args:
        margin: keep a pair only when ``score(chosen) - score(rejected) >= margin`` (>= 1: ties dropped).
        max_pairs_per_image: cap on pairs per record (None: all qualifying pairs).
        max_length_ratio: drop pairs whose longer response has more than this many times the
            characters of the shorter one (length-bias control; None: off).
        seed: sampling seed (the per-record order is seeded by ``(seed, key)``).
        balance_lengths: pick the capped pairs alternately from those whose chosen answer is shorter
            and those whose chosen answer is longer than the rejected one (shorter first, equal lengths
            last), so the cap does not pass a record's length bias on to the pairs (length-bias control).
    """

    margin: int = 1
    max_pairs_per_image: int | None = 2
    max_length_ratio: float | None = None
    seed: int = 0
    balance_lengths: bool = False

    def __post_init__(self):
        if self.margin < 1:
            raise ValueError("margin must be >= 1 (a tie is never a preference)")
        if self.max_pairs_per_image is not None and self.max_pairs_per_image < 1:
            raise ValueError("max_pairs_per_image must be >= 1 or None")
        if self.max_length_ratio is not None and self.max_length_ratio < 1.0:
            raise ValueError("max_length_ratio must be >= 1 or None")


# --- helpers ---------------------------------------------------------------------------------


def image_data_url(image: bytes | None) -> str:
    """``data:image/...;base64,...`` of image bytes PIL decodes; ValueError otherwise."""
    from PIL import Image

    if not image:
        raise ValueError("no image bytes")
    try:
        with Image.open(io.BytesIO(image)) as im:
            fmt = im.format
            im.load()
    except Exception as e:  # PIL raises many types for bad bytes
        raise ValueError(f"image does not decode ({type(e).__name__})") from None
    mime = _MIME.get(fmt or "")
    if mime is None:
        raise ValueError(f"image format {fmt} not sent to models")
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def image_messages(data_url: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": text}]}]


def pick_prompt(pair: Pair, cfg: GenerateConfig) -> tuple[str | None, str]:
    if cfg.prompt_source == "qa":
        for qa in pair.qa or []:
            q = (qa.get("question") or "").strip()
            if q:
                return q, "qa"
    if not cfg.prompt_pool:
        return None, "pool"
    h = int.from_bytes(hashlib.sha256(pair.key.encode("utf-8")).digest()[:8], "big")
    return cfg.prompt_pool[h % len(cfg.prompt_pool)], "pool"


def _parse_string_list(text: str | None, field_name: str, max_len: int | None = None) -> list[str] | None:
    try:
        doc = json.loads(text or "")
    except ValueError:
        return None
    items = doc.get(field_name) if isinstance(doc, dict) else None
    if not isinstance(items, list) or not all(isinstance(c, str) and c.strip() for c in items):
        return None
    if max_len is not None and len(items) > max_len:
        return None
    return [c.strip() for c in items]


def parse_answer(completion: Completion) -> dict[str, Any] | None:
    """``{"answer", "logprob_yes", "logprob_no"}`` from a labeler answer, or None when not yes/no."""
    text = (completion.text or "").strip()
    try:
        doc = json.loads(text)
        value = doc.get("answer") if isinstance(doc, dict) else doc
    except ValueError:
        value = text
    if not isinstance(value, str) or value.strip().lower() not in ("yes", "no"):
        return None
    out: dict[str, Any] = {"answer": value.strip().lower(), "logprob_yes": None, "logprob_no": None}
    if _decision_logprobs(completion.logprobs or [], out):
        return out
    for tok in completion.logprobs or []:  # the first token that is yes/no carries the decision
        word = tok["token"].strip().strip('"').lower()
        if word in ("yes", "no"):
            top = dict(tok.get("top") or {})
            top.setdefault(tok["token"], tok["logprob"])
            for t, lp in top.items():
                w = t.strip().strip('"').lower()
                if w in ("yes", "no") and out[f"logprob_{w}"] is None:
                    out[f"logprob_{w}"] = lp
            break
    return out


_ANSWER_VALUE = re.compile(r'"answer"\s*:\s*"')


def _decision_logprobs(tokens: list[dict[str, Any]], out: dict[str, Any]) -> bool:
    """Fill ``logprob_yes``/``logprob_no`` from the token that holds the first character of the JSON
    answer's value and its alternatives: with small vocabularies that token is only ``y`` or ``n`` (a
    prefix of the word), with large ones ``yes``/``no`` or ``"yes``. False when the tokens do not spell
    ``"answer": "`` (then the caller looks for a whole yes/no token)."""
    text = "".join(t["token"] for t in tokens)
    m = _ANSWER_VALUE.search(text)
    if m is None:
        return False
    pos = 0
    for tok in tokens:
        end = pos + len(tok["token"])
        if end > m.end():
            skip = max(0, m.end() - pos)  # characters of this token before the value (e.g. the quote)
            top = dict(tok.get("top") or {})
            top.setdefault(tok["token"], tok["logprob"])
            for t, lp in top.items():
                word = t[skip:].strip().strip('"').lower() if len(t) > skip else ""
                for w in ("yes", "no"):
                    if word and w.startswith(word) and out[f"logprob_{w}"] is None:
                        out[f"logprob_{w}"] = lp
            return True
        pos = end
    return False


class _Caller:
    """One endpoint: client + cache + counters, on the DoFn's event loop."""

    def __init__(self, name: str, config: ClientConfig, cache: ResponseCache | None, inc):
        self.name = name
        self.config = config
        self.client = RewriteClient(config)
        self.cache = cache
        self._inc = inc
        self._inflight: dict[str, asyncio.Future] = {}

    async def call(self, prompt_version: str, messages: list[dict], *, response_format: dict | None = None,
                   params: dict | None = None) -> Completion:
        """The (cached) answer; identical requests in flight at once share one HTTP request (responses
        of one set often share claims), which also makes the request count independent of timing."""
        params = dict(params or {})
        params.setdefault("max_tokens", self.config.max_tokens)
        params.setdefault("temperature", self.config.temperature)
        input_hash = hashlib.sha256(canonical_json([messages, response_format]).encode("utf-8")).hexdigest()
        key = cache_key(self.config.model, prompt_version, input_hash, params)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key, messages, response_format, params))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        else:
            self._inc("inflight_shared")
        return await asyncio.shield(task)

    async def _fetch(self, key: str, messages, response_format, params) -> Completion:
        if self.cache is not None:
            entry = await asyncio.to_thread(self.cache.get, key)
            if entry is not None:
                self._inc("cache_hits")
                return Completion.from_entry(entry)
        self._inc("requests")
        self._inc(f"requests_{self.name}")
        completion = await self.client.complete_messages(messages, response_format=response_format, params=params)
        if self.cache is not None:
            await asyncio.to_thread(self.cache.put, key, completion.to_entry())
        return completion


class _AsyncBatchFn(beam.DoFn):
    """A DoFn owning an event loop in a background thread; ``process`` runs one batch on it."""

    def _callers(self) -> dict[str, tuple[str, ClientConfig]]:
        raise NotImplementedError

    def setup(self):
        self._counters: dict[str, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rlaifv-client-loop", daemon=True)
        self._thread.start()
        cache = ResponseCache(self.cache_dir) if self.cache_dir else None

        async def build():
            return {n: _Caller(n, c, cache, self._inc) for n, c in self._callers().items()}

        self._call = asyncio.run_coroutine_threadsafe(build(), self._loop).result()

    def _inc(self, name: str, n: int = 1) -> None:
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = Metrics.counter("mmcorpus.rlaifv", name)
        c.inc(n)

    def process(self, batch: list[Pair]):
        return asyncio.run_coroutine_threadsafe(self._batch(batch), self._loop).result()

    async def _batch(self, batch: list[Pair]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one_safe(p) for p in batch)))

    async def _one_safe(self, pair: Pair) -> Outcome:
        try:
            return await self._one(pair)
        except Exception as e:  # one record's surprise never fails the bundle
            return Outcome.dropped(pair, ERROR, reasons.exception_reason(e))

    def teardown(self):
        loop = getattr(self, "_loop", None)
        if loop is None:
            return

        async def close():
            for c in self._call.values():
                await c.client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)


def _failed_outcome(pair: Pair, failures: list[tuple[int, str, str]], usable: int, **extra: str) -> Outcome:
    """Reject (or error) a record that kept fewer than 2 usable responses: reason of the first failure."""
    failures = sorted(failures)
    counts = Counter(r for _, r, _ in failures)
    if failures:
        _, reason, detail = failures[0]
    else:
        reason, detail = reasons.RLAIFV_TOO_FEW_RESPONSES, ""
    status = ERROR if reason in _TRANSPORT or reason.startswith(reasons.EXCEPTION_PREFIX) else REJECTED
    summary = ", ".join(f"{r}={n}" for r, n in sorted(counts.items()))
    return Outcome.dropped(pair, status, reason, f"{usable} usable; {summary}; first: {detail}", **extra)


# --- generate --------------------------------------------------------------------------------


class GenerateFn(_AsyncBatchFn):
    """Batches of Pair → one Outcome each: kept with ``meta["rlaifv"]`` holding the responses."""

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.cache_dir = config.cache_dir

    def _callers(self):
        return {"policy": self.config.policy}

    async def _one(self, pair: Pair) -> Outcome:
        cfg = self.config
        extra = {"model": cfg.policy.model, "prompt_version": GENERATE_PROMPT_VERSION}
        try:
            url = image_data_url(pair.image)
        except ValueError as e:
            return Outcome.dropped(pair, REJECTED, reasons.RLAIFV_IMAGE_UNDECODABLE, str(e), **extra)
        prompt, source = pick_prompt(pair, cfg)
        if prompt is None:
            return Outcome.dropped(pair, REJECTED, reasons.RLAIFV_NO_PROMPT, "no QA question, empty pool", **extra)
        messages = image_messages(url, prompt)

        async def sample(i: int) -> dict[str, Any]:
            params = {"max_tokens": cfg.policy.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                      "seed": cfg.seed + i}
            resp: dict[str, Any] = {"i": i, "seed": cfg.seed + i, "temperature": cfg.temperature,
                                    "top_p": cfg.top_p, "max_tokens": cfg.policy.max_tokens,
                                    "text": None, "finish_reason": None}
            try:
                c = await self._call["policy"].call(GENERATE_PROMPT_VERSION, messages, params=params)
            except RequestFailed as e:
                resp.update(status=e.reason, error=f"policy: {e.detail}")
                return resp
            resp.update(text=c.text, finish_reason=c.finish_reason)
            if not (c.text or "").strip():
                resp.update(status=reasons.RLAIFV_EMPTY_RESPONSE, error="policy: empty text")
            else:
                resp["status"] = RESPONSE_OK
            return resp

        responses = list(await asyncio.gather(*(sample(i) for i in range(cfg.n))))
        usable = sum(r["status"] == RESPONSE_OK for r in responses)
        if usable < 2:
            failures = [(r["i"], r["status"], r.get("error", "")) for r in responses if r["status"] != RESPONSE_OK]
            return _failed_outcome(pair, failures, usable, **extra)
        doc = {"prompt": prompt, "prompt_source": source, "policy_model": cfg.policy.model,
               "prompt_version": GENERATE_PROMPT_VERSION, "responses": responses}
        return Outcome.kept(pair.replace(meta=set_doc(pair.meta, doc)), **extra)


# --- feedback --------------------------------------------------------------------------------


class FeedbackFn(_AsyncBatchFn):
    """Batches of generate records → one Outcome each: kept with claims, questions, answers and scores."""

    def __init__(self, config: FeedbackConfig):
        self.config = config
        self.cache_dir = config.cache_dir

    def _callers(self):
        return {"claims": self.config.claims, "questions": self.config.claims, "labeler": self.config.labeler}

    async def _one(self, pair: Pair) -> Outcome:
        cfg = self.config
        extra = {"model": cfg.labeler.model, "prompt_version": LABELER_PROMPT_VERSION}
        doc = get_doc(pair.meta)
        if doc is None or not isinstance(doc.get("responses"), list):
            return Outcome.dropped(pair, REJECTED, reasons.RLAIFV_TOO_FEW_RESPONSES, "no rlaifv responses", **extra)
        try:
            url = image_data_url(pair.image)
        except ValueError as e:
            return Outcome.dropped(pair, REJECTED, reasons.RLAIFV_IMAGE_UNDECODABLE, str(e), **extra)
        responses = [dict(r) for r in doc["responses"]]
        todo = [r for r in responses if r.get("status") == RESPONSE_OK]
        await asyncio.gather(*(self._score(r, doc["prompt"], url) for r in todo))
        scored = sum(r.get("score") is not None for r in responses)
        if scored < 2:
            failures = [(r["i"], r["status"], r.get("error", "")) for r in todo if r.get("score") is None]
            return _failed_outcome(pair, failures, scored, **extra)
        new = dict(doc, responses=responses, claims_model=cfg.claims.model, labeler_model=cfg.labeler.model)
        return Outcome.kept(pair.replace(meta=set_doc(pair.meta, new)), **extra)

    async def _score(self, resp: dict[str, Any], prompt: str, url: str) -> None:
        """Fill ``claims``, ``questions``, ``answers``, ``score`` of one response in place (or set its
        ``status`` to the failure)."""
        cfg = self.config
        resp["score"] = None
        step = "claims"
        try:
            c = await self._call["claims"].call(
                CLAIMS_PROMPT_VERSION,
                [{"role": "system", "content": CLAIMS_SYSTEM},
                 {"role": "user", "content": f"Question: {prompt}\nAnswer: {resp['text']}"}],
                response_format=CLAIMS_FORMAT)
            claims = _parse_string_list(c.text, "claims", cfg.max_claims)
            if claims is None:
                resp.update(status=reasons.RLAIFV_CLAIMS_INVALID, error="claims: not {claims: [str]} within max")
                return
            resp["claims"] = claims
            questions: list[str] = []
            if claims:
                step = "questions"
                q = await self._call["questions"].call(
                    QUESTIONS_PROMPT_VERSION,
                    [{"role": "system", "content": QUESTIONS_SYSTEM},
                     {"role": "user", "content": canonical_json({"claims": claims})}],
                    response_format=QUESTIONS_FORMAT)
                questions = _parse_string_list(q.text, "questions")
                if questions is None or len(questions) != len(claims):
                    resp.update(status=reasons.RLAIFV_QUESTIONS_INVALID,
                                error="questions: not one question per claim")
                    return
            resp["questions"] = questions
            step = "labeler"
            params = {"logprobs": True, "top_logprobs": 2} if cfg.logprobs else {}
            completions = await asyncio.gather(*(
                self._call["labeler"].call(LABELER_PROMPT_VERSION,
                                           image_messages(url, LABELER_TEMPLATE.format(question=qn)),
                                           response_format=ANSWER_FORMAT, params=params)
                for qn in questions))
        except RequestFailed as e:
            resp.update(status=e.reason, error=f"{step}: {e.detail}")
            return
        answers = [parse_answer(c) for c in completions]
        if any(a is None for a in answers):
            resp.update(status=reasons.RLAIFV_ANSWER_NOT_YES_NO, error="labeler: answer not yes/no",
                        answers_raw=[c.text for c in completions])
            return
        resp["answers"] = answers
        resp["score"] = -sum(a["answer"] == "no" for a in answers)


# --- pairs -----------------------------------------------------------------------------------


def make_pairs(pair: Pair, cfg: PairsConfig) -> list[Outcome]:
    """The one outcome of a feedback record: kept with ``meta["rlaifv_pairs"]`` holding its DPO pairs,
    or rejected ``rlaifv_no_pair``.

    Candidates are all (i, j) of scored responses with ``|score_i - score_j| >= margin`` (ties never),
    minus those the length control drops; they are shuffled by ``Random(f"{seed}|{key}")`` and the
    first ``max_pairs_per_image`` kept, listed in (chosen, rejected) index order.
    """
    doc = get_doc(pair.meta) or {}
    scored = [r for r in doc.get("responses") or [] if r.get("score") is not None]
    candidates = []
    for a_idx in range(len(scored)):
        for b_idx in range(a_idx + 1, len(scored)):
            a, b = scored[a_idx], scored[b_idx]
            if abs(a["score"] - b["score"]) < cfg.margin:
                continue
            chosen, rejected = (a, b) if a["score"] > b["score"] else (b, a)
            if cfg.max_length_ratio is not None:
                la, lb = len(chosen["text"]), len(rejected["text"])
                if max(la, lb) > cfg.max_length_ratio * max(1, min(la, lb)):
                    continue
            candidates.append((chosen, rejected))
    random.Random(f"{cfg.seed}|{pair.key}").shuffle(candidates)
    if cfg.balance_lengths:
        shorter = [cr for cr in candidates if len(cr[0]["text"]) < len(cr[1]["text"])]
        longer = [cr for cr in candidates if len(cr[0]["text"]) > len(cr[1]["text"])]
        equal = [cr for cr in candidates if len(cr[0]["text"]) == len(cr[1]["text"])]
        alternated = [cr for two in itertools.zip_longest(shorter, longer) for cr in two if cr is not None]
        candidates = alternated + equal
    if cfg.max_pairs_per_image is not None:
        candidates = candidates[: cfg.max_pairs_per_image]
    if not candidates:
        return [Outcome.dropped(pair, REJECTED, reasons.RLAIFV_NO_PAIR, f"{len(scored)} scored responses")]
    pairs = [{"chosen": c["text"], "rejected": r["text"], "chosen_i": c["i"], "rejected_i": r["i"],
              "chosen_score": c["score"], "rejected_score": r["score"]}
             for c, r in sorted(candidates, key=lambda cr: (cr[0]["i"], cr[1]["i"]))]
    base_meta = json.loads(pair.meta or "{}")
    base_meta.pop(META_KEY, None)
    meta = set_doc(canonical_json(base_meta), {"prompt": doc["prompt"], "pairs": pairs}, PAIR_META_KEY)
    return [Outcome.kept(pair.replace(caption=doc["prompt"], meta=meta))]


class PairStatsFn(beam.CombineFn):
    """Length bias and score gaps of pair documents in bounded memory: ``chosen_longer_share``
    (0.5 = no length bias), mean characters chosen − rejected, and the histogram of score gaps."""

    def create_accumulator(self):
        return [0, 0, 0, Counter()]  # pairs, chosen longer, summed length difference, gaps

    def add_input(self, acc, p):
        acc[0] += 1
        acc[1] += len(p["chosen"]) > len(p["rejected"])
        acc[2] += len(p["chosen"]) - len(p["rejected"])
        acc[3][p["chosen_score"] - p["rejected_score"]] += 1
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out[0] += a[0]
            out[1] += a[1]
            out[2] += a[2]
            out[3].update(a[3])
        return out

    def extract_output(self, acc):
        n = acc[0]
        return {"pairs": n, "chosen_longer_share": round(acc[1] / n, 4) if n else None,
                "mean_length_diff_chars": round(acc[2] / n, 2) if n else None,
                "score_gaps": {str(k): v for k, v in sorted(acc[3].items())}}
