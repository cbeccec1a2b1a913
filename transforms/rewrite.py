"""``RewriteCaptions``: caption → QA pairs through an OpenAI-compatible endpoint, cached, one outcome per record.

Shape of the transform::

    pairs ─ SelectByPolicy ─┬─ selected ─ Batch (BatchElements) ─ RewriteBatch (async, cached) ─┐
                            └─ skipped ─ MarkSkipped (kept, reason rewrite_skipped) ────────────┴─ Flatten

Why ``BatchElements`` + a DoFn owning an asyncio loop, and not ``RunInference``: the model is remote,
so what matters is keeping ``concurrency`` requests in flight per worker and deciding retries per
request. ``RunInference`` calls ``ModelHandler.run_inference`` synchronously per batch and waits for
it, so every batch would end with its slots draining while the slowest answer finishes (LLM answer
times vary several-fold with output length), and its extras — loading and sharing model weights,
model-update side inputs — have nothing to load here; its ``RemoteModelHandler`` retries a whole batch
and cannot honour one request's ``Retry-After``. Here ``BatchElements`` (fixed size, several times the
concurrency) feeds a DoFn whose event loop runs in a background thread, so up to
``max_pending_batches`` batches are in flight at once and the slots stay busy across batch
boundaries; the loop, the HTTP client and the cache handle are built once per DoFn instance in
``setup()``.

Outcomes (every selected record gets exactly one; ledger rows carry ``model`` and ``prompt_version``):

- kept / ``ok``: ``caption`` = the adopted caption, ``raw_caption`` = the caption before rewriting
  (the earliest one if the record was rewritten before), ``qa``, ``rewrite_model``, ``prompt_version``;
- kept / ``rewrite_skipped``: not selected by the policy, record unchanged (no model, no ledger model);
- a failed rewrite, by ``on_failure``:

  - ``keep_raw`` (the default): **kept** with the failure as its ledger reason, the record unchanged
    (its raw caption in ``caption``, ``raw_caption``/``qa``/``rewrite_model`` null: not rewritten;
    ``needs_rewrite`` still true), the failure's detail after ``kept raw caption: `` in the ledger.
    Kept = outputs still holds; ``reason != "ok"`` on a kept row says the caption is not a rewrite.
  - ``drop``: **rejected** when the endpoint answered but the answer breaks the contract (a rerun gets
    the same cached answer): ``rewrite_truncated``, ``rewrite_empty``, ``rewrite_invalid_json``,
    ``rewrite_off_format``, ``rewrite_unfaithful`` (see ``rewriter.prompts``); **error** when no answer
    came (not cached, so a ``--force`` rerun asks only these again): ``rewrite_exhausted_retries``,
    ``rewrite_client_error``, and ``exception_<Type>`` for anything unexpected.

Cache I/O (one blocking call per lookup and per store, network round trips on an object store) runs in
a thread pool of ``cache_threads``, never on the event loop that keeps the requests in flight: a batch's
lookups go out together, each answer is stored while the other requests keep running.

Counters (``Metrics.counter(RewriteBatchFn, name)``): ``total``, ``kept``, ``cache_hits``,
``cache_errors``, ``requests``, ``retries``, ``kept_raw_<reason>``, ``rejected_<reason>``,
``errors_<reason>``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from rewriter import prompts
from rewriter.cache import ResponseCache, cache_key
from rewriter.client import ClientConfig, Completion, RequestFailed
from rewriter.offline import OFFLINE_MODEL
from schemas import reasons
from schemas.records import ERROR, KEPT, REJECTED, Outcome, Pair

log = logging.getLogger("mmcorpus.rewrite")

POLICIES = ("needs_rewrite", "all")
BACKEND_OPENAI = "openai"
BACKEND_OFFLINE = "offline-template"
BACKENDS = (BACKEND_OPENAI, BACKEND_OFFLINE)
KEEP_RAW = "keep_raw"
DROP = "drop"
ON_FAILURE = (KEEP_RAW, DROP)
KEPT_RAW_PREFIX = "kept raw caption: "

# No answer came back: the record may succeed on a rerun.
ERROR_REASONS = frozenset({reasons.REWRITE_EXHAUSTED_RETRIES, reasons.REWRITE_CLIENT_ERROR})


def status_of(reason: str) -> str:
    """Ledger status of a failed rewrite: ``error`` for transport failures, ``rejected`` otherwise."""
    if reason in ERROR_REASONS or reason.startswith(reasons.EXCEPTION_PREFIX):
        return ERROR
    return REJECTED


@dataclass(frozen=True)
class RewriteConfig:
    """What the rewrite stage does and how it reaches the model.

    Args:
        backend: ``openai`` (any OpenAI-compatible endpoint: vLLM, OpenAI) or ``offline-template``
            (deterministic template, no model; see ``rewriter.offline``).
        model: served model name (``openai`` backend). It keys the cache, with ``model_revision``.
        model_revision: identity of the served weights (a checkpoint hash, a git sha, a path): part of
            the config hash and of every cache key, so new weights under the same served name never
            get the old weights' cached answers. ``mmcorpus rewrite`` fills it from the endpoint's
            ``GET /models`` (the served name's ``root``) when not given; pass it explicitly when
            weights are replaced in place under the same path.
        endpoint: base URL, e.g. ``http://127.0.0.1:8000/v1`` (``openai`` backend). Not hashed into
            the manifest config and never logged with credentials.
        policy: ``needs_rewrite`` (only records the filter flagged) or ``all``.
        on_failure: ``keep_raw`` (default: a record whose rewrite failed stays, with its raw caption,
            kept in the ledger with the failure as reason) or ``drop`` (rejected / error rows).
        cache_dir: response cache root (local dir or ``gs://``...); None: no cache.
        api_key_env: environment variable holding the API key (read on the workers only).
        concurrency: requests in flight per worker (per DoFn instance).
        batch_size: records per ``BatchElements`` batch; a few times ``concurrency`` keeps slots busy.
        cache_threads: threads doing cache I/O per worker (lookups of a batch run in parallel).
        timeout_s, max_retries, backoff_base_s, backoff_max_s: per-request policy (``rewriter.client``).
        max_tokens, temperature: generation parameters (part of the cache key).

    Example:
        RewriteConfig(backend="openai", endpoint="http://127.0.0.1:8000/v1", model="rewriter",
                      cache_dir="build/rewrite-cache", concurrency=32)
    """

    backend: str = BACKEND_OPENAI
    model: str | None = None
    model_revision: str | None = None
    endpoint: str | None = None
    policy: str = "needs_rewrite"
    on_failure: str = KEEP_RAW
    cache_dir: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    batch_size: int = 128
    cache_threads: int = 16
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_tokens: int = 256
    temperature: float = 0.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")
        if self.cache_threads < 1:
            raise ValueError("cache_threads must be >= 1")
        if self.backend == BACKEND_OPENAI and not (self.endpoint and self.model):
            raise ValueError("the openai backend needs endpoint and model (or use backend offline-template)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.backend == BACKEND_OPENAI:
            self.client_config()  # validates concurrency, time-out and back-off bounds

    @property
    def model_label(self) -> str:
        """What ledger rows and records name as the model."""
        return OFFLINE_MODEL if self.backend == BACKEND_OFFLINE else str(self.model)

    @property
    def revision(self) -> str | None:
        """The served weights' identity when known (never for the offline template)."""
        return self.model_revision if self.backend == BACKEND_OPENAI and self.model_revision else None

    def generation_params(self) -> dict[str, Any]:
        if self.backend == BACKEND_OFFLINE:
            return {}
        return {"max_tokens": self.max_tokens, "temperature": self.temperature}

    def hashed(self) -> dict[str, Any]:
        """The part of the config that decides the output (goes into the manifest and its hash).

        Transport settings (endpoint, concurrency, time-outs, cache location, key variable) are left
        out: they change how fast answers arrive, not which answers are valid.
        """
        return {
            "backend": self.backend,
            "model": self.model_label,
            "model_revision": self.revision,
            "prompt_version": prompts.PROMPT_VERSION,
            "policy": self.policy,
            "on_failure": self.on_failure,
            "generation": self.generation_params(),
            "max_retries": self.max_retries if self.backend == BACKEND_OPENAI else 0,
        }

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            endpoint=str(self.endpoint), model=str(self.model), api_key_env=self.api_key_env,
            concurrency=self.concurrency, timeout_s=self.timeout_s, max_retries=self.max_retries,
            backoff_base_s=self.backoff_base_s, backoff_max_s=self.backoff_max_s,
            max_tokens=self.max_tokens, temperature=self.temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_backend(config: RewriteConfig):
    """The object answering ``await complete(caption)``: an HTTP client or the offline template."""
    if config.backend == BACKEND_OFFLINE:
        from rewriter.offline import OfflineTemplateBackend

        return OfflineTemplateBackend()
    from rewriter.client import RewriteClient

    return RewriteClient(config.client_config())


def rewritten_pair(pair: Pair, parsed: dict[str, Any], model: str) -> Pair:
    """The kept record: adopted caption in ``caption``, the original one in ``raw_caption``."""
    raw = pair.raw_caption if pair.raw_caption is not None else pair.caption
    return pair.replace(
        caption=parsed["caption"], raw_caption=raw, qa=parsed["qa"], rewrite_model=model,
        prompt_version=prompts.PROMPT_VERSION,
    )


class SelectByPolicyFn(beam.DoFn):
    """Main output: records the policy selects; ``SKIPPED``: kept-as-is outcomes for the others."""

    SKIPPED = "skipped"

    def __init__(self, policy: str):
        self.policy = policy

    def process(self, pair: Pair):
        if self.policy == "all" or pair.needs_rewrite:
            yield pair
        else:
            yield beam.pvalue.TaggedOutput(
                self.SKIPPED,
                Outcome(key=pair.key, status=KEPT, reason=reasons.REWRITE_SKIPPED, pair=pair, source=pair.source),
            )


class RewriteBatchFn(beam.DoFn):
    """Rewrite batches of records concurrently; yield one ``Outcome`` per record.

    The HTTP client lives on an event loop in a background thread (started in ``setup``), so requests
    keep running while Beam assembles the next batch. ``process`` submits its batch and returns
    without waiting for it unless more than ``max_pending_batches`` batches are unfinished; it hands
    back the outcomes of every finished batch, oldest first, and ``finish_bundle`` waits for the rest.
    So a slow request holds up only its own batch's output, never the slots: they stay busy across
    batch boundaries instead of draining at the end of each batch.

    Each distinct (model, revision, prompt version, caption, generation params) is looked up in the
    cache, asked at most once per batch, and written to the cache as soon as its answer arrives (so a
    crash mid-batch loses only the answers still in flight). Cache calls block, so they run in a
    thread pool: a batch's lookups all at once, then each store while the other requests run. A
    failing cache call costs a cache hit (counter ``cache_errors``), never a record. Counters are
    published from the Beam thread.
    """

    def __init__(self, config: RewriteConfig, max_pending_batches: int = 2):
        if max_pending_batches < 1:
            raise ValueError("max_pending_batches must be >= 1")
        self.config = config
        self.max_pending_batches = max_pending_batches

    def setup(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rewrite-client-loop", daemon=True)
        self._thread.start()
        self._backend = make_backend(self.config)
        self._cache = ResponseCache(self.config.cache_dir) if self.config.cache_dir else None
        self._pool = (concurrent.futures.ThreadPoolExecutor(self.config.cache_threads, thread_name_prefix="rewrite-cache")
                      if self._cache is not None else None)
        self._model = self.config.model_label
        self._revision = self.config.revision
        self._params = self.config.generation_params()
        self._counters: dict[str, Any] = {}
        self._published = {"requests": 0, "retries": 0, "cache_hits": 0, "cache_errors": 0}
        self._cache_hits = 0  # incremented on the loop thread, published from the Beam thread
        self._cache_errors = 0
        self._pending: collections.deque = collections.deque()

    def _inc(self, name: str, n: int = 1) -> None:
        if n:
            c = self._counters.get(name)
            if c is None:
                c = self._counters[name] = Metrics.counter(self.__class__, name)
            c.inc(n)

    def start_bundle(self):
        self._pending = collections.deque()

    def process(self, batch: list[Pair], window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        batch = list(batch)
        future = asyncio.run_coroutine_threadsafe(self._rewrite_batch(batch), self._loop)
        self._pending.append((batch, future, window, timestamp))
        while len(self._pending) > self.max_pending_batches:
            yield from self._emit_oldest()
        while self._pending and self._pending[0][1].done():
            yield from self._emit_oldest()

    def finish_bundle(self):
        while self._pending:
            yield from self._emit_oldest()

    def _emit_oldest(self):
        batch, future, window, timestamp = self._pending.popleft()
        try:
            outcomes = future.result()
        except Exception as exc:  # the batch coroutine itself failed: every record still gets its outcome
            log.warning("rewrite batch of %d failed: %s", len(batch), type(exc).__name__)
            outcomes = [self._failed(p, reasons.exception_reason(exc), "batch failed") for p in batch]
        self._publish_stats()
        for o in outcomes:
            self._inc("total")
            if o.status == KEPT:
                self._inc("kept")
                if o.reason != reasons.OK:
                    self._inc(f"kept_raw_{o.reason}")
            else:
                self._inc(f"{'errors' if o.status == ERROR else 'rejected'}_{o.reason}")
            yield WindowedValue(o, timestamp, [window])

    def _publish_stats(self) -> None:
        stats = getattr(self._backend, "stats", None)
        now = {"cache_hits": self._cache_hits, "cache_errors": self._cache_errors}
        if stats is not None:
            now.update(requests=stats.requests, retries=stats.retries)
        for name, value in now.items():
            self._inc(name, value - self._published.get(name, 0))
            self._published[name] = value

    def teardown(self):
        loop = getattr(self, "_loop", None)
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._backend.aclose(), loop).result(timeout=30)
        except Exception:  # closing a client must not fail the worker
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=30)
        if not loop.is_running():
            loop.close()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)

    # --- per batch ---------------------------------------------------------------------------
    async def _rewrite_batch(self, batch: list[Pair]) -> list[Outcome]:
        keys: dict[str, str] = {}  # cache key -> caption
        for p in batch:
            if p.caption and p.caption.strip():
                keys.setdefault(self._key(p.caption), p.caption)
        ordered = list(keys)
        cached = await self._lookup(ordered)
        answers = await asyncio.gather(*(self._answer(k, keys[k], cached.get(k)) for k in ordered),
                                       return_exceptions=True)
        by_key = dict(zip(ordered, answers))
        return [self._outcome(p, by_key.get(self._key(p.caption)) if p.caption and p.caption.strip() else None)
                for p in batch]

    def _key(self, caption: str) -> str:
        return cache_key(self._model, prompts.PROMPT_VERSION, caption, self._params, revision=self._revision)

    async def _lookup(self, keys: list[str]) -> dict[str, dict]:
        """Cache entries of ``keys`` that exist, read in the thread pool, all at once."""
        if self._cache is None or not keys:
            return {}
        loop = asyncio.get_running_loop()
        found = await asyncio.gather(*(loop.run_in_executor(self._pool, self._cache.get, k) for k in keys),
                                     return_exceptions=True)
        out = {}
        for k, entry in zip(keys, found):
            if isinstance(entry, BaseException):  # an unreachable cache is a miss, not a lost record
                self._cache_errors += 1
                log.warning("rewrite cache lookup failed: %s", type(entry).__name__)
            elif entry is not None:
                out[k] = entry
        return out

    async def _answer(self, key: str, caption: str, entry: dict | None) -> Completion:
        if entry is not None:
            self._cache_hits += 1
            return Completion.from_entry(entry)
        completion = await self._backend.complete(caption)
        if self._cache is not None:
            entry = completion.to_entry()
            entry.update(model=self._model, prompt_version=prompts.PROMPT_VERSION, params=self._params)
            if self._revision:
                entry["model_revision"] = self._revision
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._cache.put, key, entry)
            except Exception as exc:  # the answer is still good; only the next run pays for it again
                self._cache_errors += 1
                log.warning("rewrite cache store failed: %s", type(exc).__name__)
        return completion

    def _outcome(self, pair: Pair, answer: Completion | BaseException | None) -> Outcome:
        if answer is None:
            return self._failed(pair, reasons.REWRITE_EMPTY, "no caption to rewrite")
        if isinstance(answer, RequestFailed):
            return self._failed(pair, answer.reason, answer.detail)
        if isinstance(answer, BaseException):
            return self._failed(pair, reasons.exception_reason(answer), "unexpected error while rewriting")
        try:
            verdict = prompts.validate_detailed(pair.caption, answer.text, answer.finish_reason)
        except Exception as exc:  # a validation bug must cost one record, not the bundle
            return self._failed(pair, reasons.exception_reason(exc), "validation raised")
        if not verdict.ok:
            return self._failed(pair, verdict.reason, verdict.detail)
        return Outcome.kept(
            rewritten_pair(pair, verdict.parsed, self._model), model=self._model,
            prompt_version=prompts.PROMPT_VERSION,
        )

    def _failed(self, pair: Pair, reason: str, detail: str) -> Outcome:
        if self.config.on_failure == KEEP_RAW:  # the record as it came in: raw caption, not rewritten
            return Outcome(key=pair.key, status=KEPT, reason=reason, pair=pair, detail=KEPT_RAW_PREFIX + detail,
                           source=pair.source, extra={"model": self._model, "prompt_version": prompts.PROMPT_VERSION})
        return Outcome.dropped(
            pair, status_of(reason), reason, detail, model=self._model, prompt_version=prompts.PROMPT_VERSION
        )


class RewriteCaptions(beam.PTransform):
    """Rewrite captions into QA pairs; one ``Outcome`` per input ``Pair``.

    Args:
        config: a ``RewriteConfig`` (backend, model, endpoint, policy, cache, concurrency ...).

    Example:
        cfg = RewriteConfig(backend="offline-template", policy="all")
        outcomes = pairs | "Rewrite" >> RewriteCaptions(cfg)
    """

    def __init__(self, config: RewriteConfig):
        super().__init__()
        self.config = config

    def expand(self, pairs):
        selected, skipped = (
            pairs
            | "SelectByPolicy"
            >> beam.ParDo(SelectByPolicyFn(self.config.policy)).with_outputs(SelectByPolicyFn.SKIPPED, main="selected")
        )
        rewritten = (
            selected
            | "Batch" >> beam.BatchElements(min_batch_size=self.config.batch_size, max_batch_size=self.config.batch_size)
            | "RewriteBatch" >> beam.ParDo(RewriteBatchFn(self.config))
        )
        return (rewritten, skipped) | "MergeOutcomes" >> beam.Flatten()
