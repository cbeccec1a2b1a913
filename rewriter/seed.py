"""Seed annotation: sample captions from a stage output (stratified), ask a teacher model, write the seed set.

``mmcorpus rewriter seed --input build/filter --output build/seed --n 2000 --endpoint URL --model gpt-4o``

1. **Sample.** Captions of the input stage's kept records are grouped into strata by the filter's
   quality flags (``clean`` or the sorted flags joined by ``+``) and a caption-length bucket. Every
   non-empty stratum gets one caption (as long as ``n`` allows), the rest is shared out in proportion
   to stratum size (largest remainder). Inside a stratum captions are taken in order of
   ``sha256(salt + key)``: the same input and options select the same captions.
2. **Estimate and confirm.** The number of requests, estimated tokens and the cost at the configured
   prices are printed; the run asks for confirmation unless ``--yes`` is given (and refuses to run
   unattended without it).
3. **Annotate.** Requests go through ``rewriter.client.RewriteClient`` (the official ``openai``
   ``AsyncOpenAI``; retries with back-off on 429 / 5xx / time-outs only) behind a sliding-window rate
   limiter (requests/min and tokens/min). The limiter admits each caption once; the client's retries
   of that caption are not admitted again (they wait out their back-off or the server's
   ``Retry-After`` instead), so under heavy retrying the sent rate can briefly exceed the limit. Prompt and output contract are ``rewriter.prompts``; every
   answer is validated with ``prompts.validate_detailed``. Completed answers are cached
   (``rewriter.cache``, default ``OUTPUT/cache``), so a rerun after a crash pays for nothing twice.
4. **Write.** ``seed.jsonl``: one record per sampled caption, sorted by key, with ``status`` ``ok``
   (validated ``response``), ``invalid`` (the teacher answered, validation failed: ``reason`` says why,
   ``text`` holds the answer) or ``failed`` (no answer: retries exhausted, client error or an
   exception). Nothing sampled is dropped. ``provenance.json``: teacher model, endpoint (without
   credentials), prompt version, start/end time, sampling and generation settings, counts by status
   and reason, token usage, estimated and actual cost.

The API key is read from the environment variable ``--api-key-env`` (default ``OPENAI_API_KEY``) by
the client; it is never printed, logged or written.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from rewriter import prompts
from schemas import reasons
from schemas.errors import UserError

log = logging.getLogger("mmcorpus.rewriter.seed")

SEED_NAME = "seed.jsonl"
PROVENANCE_NAME = "provenance.json"
CACHE_DIRNAME = "cache"

STATUS_OK = "ok"
STATUS_INVALID = "invalid"
STATUS_FAILED = "failed"

# English text runs about 4 characters per token with GPT-style BPE tokenizers; only used for the estimate.
CHARS_PER_TOKEN = 4.0
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class SampleConfig:
    """Which captions go into the seed set.

    Args:
        n: captions to sample (all of them when the input has fewer).
        length_bins: caption-length bucket edges in characters (``(32, 64)`` gives ``<32``, ``32-63``, ``>=64``).
        policy: ``all`` captions, or only those the filter flagged (``needs_rewrite``).
        salt: mixed into the per-key hash that orders captions inside a stratum.

    Example:
        >>> SampleConfig(n=100, policy="needs_rewrite").length_bins
        (32, 64, 128)
    """

    n: int
    length_bins: tuple[int, ...] = (32, 64, 128)
    policy: str = "all"
    salt: str = "seed-sample-v1"

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if list(self.length_bins) != sorted(set(self.length_bins)) or any(b <= 0 for b in self.length_bins):
            raise ValueError("length_bins must be increasing positive integers")
        if self.policy not in ("all", "needs_rewrite"):
            raise ValueError("policy must be 'all' or 'needs_rewrite'")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher endpoint, its limits and prices.

    Args:
        endpoint: OpenAI-compatible base URL (``https://api.openai.com/v1``, or a local vLLM ``.../v1``).
        model: teacher model name.
        api_key_env: environment variable holding the key (the key itself is never a config value).
        concurrency: requests in flight at once.
        requests_per_min, tokens_per_min: rate limits over a sliding 60 s window (None: no limit).
            Tokens are counted as estimated prompt tokens + ``max_tokens`` when a request is sent and
            corrected to the reported usage when it returns.
        max_tokens, temperature: generation settings.
        timeout_s, max_retries: per-request time-out and retries on 429 / 5xx / time-outs.
        price_input_per_mtok, price_output_per_mtok: USD per million prompt / completion tokens.
        expected_output_tokens: typical answer length used for the expected cost (worst case uses max_tokens).

    Example:
        >>> TeacherConfig(endpoint="https://api.openai.com/v1", model="gpt-4o", requests_per_min=500).concurrency
        4
    """

    endpoint: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_tokens: int = 512
    temperature: float = 0.2
    timeout_s: float = 120.0
    max_retries: int = 5
    price_input_per_mtok: float = 2.50
    price_output_per_mtok: float = 10.00
    expected_output_tokens: int = 120

    def __post_init__(self):
        if not self.endpoint or not self.model:
            raise ValueError("endpoint and model are required")
        for name in ("requests_per_min", "tokens_per_min"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for no limit)")
        if self.tokens_per_min is not None and self.tokens_per_min < self.max_tokens:
            raise ValueError("tokens_per_min must be at least max_tokens (one request must fit)")
        if self.price_input_per_mtok < 0 or self.price_output_per_mtok < 0:
            raise ValueError("prices must be >= 0")


def public_endpoint(url: str) -> str:
    """The endpoint without user info, query or fragment (safe to print and record)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- sampling --------------------------------------------------------------------------------


def length_bucket(caption: str, bins: tuple[int, ...]) -> str:
    n = len(caption)
    lo = 0
    for edge in bins:
        if n < edge:
            return f"<{edge}" if lo == 0 else f"{lo}-{edge - 1}"
        lo = edge
    return f">={lo}"


def stratum_of(row: dict[str, Any], bins: tuple[int, ...]) -> str:
    flags = sorted(set(row.get("quality_flags") or []))
    flag_part = "+".join(flags) if flags else ("flagged" if row.get("needs_rewrite") else "clean")
    return f"{flag_part}|{length_bucket(row['caption'], bins)}"


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many to take from each stratum: one each first (largest strata first when ``n`` is short),
    then the rest in proportion to the remaining sizes by largest remainder. Deterministic."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    order = sorted(sizes, key=lambda s: (-sizes[s], s))
    take = {s: 0 for s in sizes}
    for s in order[:n]:
        take[s] = 1
    left = n - sum(take.values())
    if left <= 0:
        return take
    rest = {s: sizes[s] - take[s] for s in sizes}
    rest_total = sum(rest.values())
    quotas = {s: left * rest[s] / rest_total for s in sizes}
    for s in sizes:
        take[s] += int(quotas[s])
    left = n - sum(take.values())
    for s in sorted(sizes, key=lambda s: (-(quotas[s] - int(quotas[s])), s)):
        if left <= 0:
            break
        if take[s] < sizes[s]:
            take[s] += 1
            left -= 1
    return take


def key_order(key: str, salt: str) -> bytes:
    return hashlib.sha256((salt + key).encode("utf-8")).digest()


def sample_rows(rows: list[dict[str, Any]], config: SampleConfig) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """(selected rows sorted by key, per-stratum ``{population, selected}``)."""
    strata: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row = dict(row, stratum=stratum_of(row, config.length_bins))
        strata.setdefault(row["stratum"], []).append(row)
    take = allocate({s: len(v) for s, v in strata.items()}, config.n)
    selected = []
    for s, members in strata.items():
        members.sort(key=lambda r: key_order(r["key"], config.salt))
        selected.extend(members[: take[s]])
    report = {s: {"population": len(strata[s]), "selected": take[s]} for s in sorted(strata)}
    return sorted(selected, key=lambda r: r["key"]), report


def read_population(stage_dir: str, policy: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Kept records of a stage output as ``{key, caption, quality_flags, needs_rewrite}`` rows."""
    from storage.files import read_table

    try:
        table = read_table(stage_dir, columns=["key", "caption", "quality_flags", "needs_rewrite"])
    except FileNotFoundError as e:
        raise UserError(f"--input {stage_dir}: not a finished stage output ({e}); run the filter stage first") from e
    rows, skipped = [], Counter()
    for row in table.to_pylist():
        if not (row.get("caption") or "").strip():
            skipped["no_caption"] += 1
        elif policy == "needs_rewrite" and not row.get("needs_rewrite"):
            skipped["policy"] += 1
        else:
            rows.append(row)
    return rows, dict(skipped)


# --- cost and confirmation -------------------------------------------------------------------


def estimate_prompt_tokens(caption: str) -> int:
    chars = sum(len(m["content"]) for m in prompts.build_messages(caption))
    return int(chars / CHARS_PER_TOKEN) + 8  # + chat-format overhead per message pair


def token_cost(
    requests: int, prompt_tokens: int, expected_out: int, worst_out: int, price_input_per_mtok: float,
    price_output_per_mtok: float,
) -> dict[str, Any]:
    """Requests, tokens and USD (expected and worst case) at the given prices; shared by
    ``rewriter seed`` and ``rlaifv`` estimates."""

    def usd(inp: int, out: int) -> float:
        return round((inp * price_input_per_mtok + out * price_output_per_mtok) / 1e6, 4)

    return {
        "requests": requests,
        "prompt_tokens_est": prompt_tokens,
        "output_tokens_expected": expected_out,
        "output_tokens_max": worst_out,
        "usd_expected": usd(prompt_tokens, expected_out),
        "usd_max": usd(prompt_tokens, worst_out),
        "price_input_per_mtok": price_input_per_mtok,
        "price_output_per_mtok": price_output_per_mtok,
    }


def estimate_cost(captions: list[str], teacher: TeacherConfig) -> dict[str, Any]:
    prompt_tokens = sum(estimate_prompt_tokens(c) for c in captions)
    expected_out = len(captions) * min(teacher.expected_output_tokens, teacher.max_tokens)
    worst_out = len(captions) * teacher.max_tokens
    return token_cost(len(captions), prompt_tokens, expected_out, worst_out, teacher.price_input_per_mtok,
                      teacher.price_output_per_mtok)


def format_estimate(est: dict[str, Any], teacher: TeacherConfig) -> str:
    return (
        f"seed annotation: {est['requests']} requests to {teacher.model} at {public_endpoint(teacher.endpoint)}\n"
        f"  prompt tokens ~{est['prompt_tokens_est']:,}; output tokens ~{est['output_tokens_expected']:,} expected, "
        f"<= {est['output_tokens_max']:,} (max_tokens={teacher.max_tokens})\n"
        f"  estimated cost: ${est['usd_expected']:.4f} expected, <= ${est['usd_max']:.4f} "
        f"(at ${teacher.price_input_per_mtok}/M input, ${teacher.price_output_per_mtok}/M output tokens)"
    )


def confirm(yes: bool, ask: Callable[[str], str] | None = None, interactive: bool | None = None) -> bool:
    """True to proceed: ``--yes``, or a ``y`` typed at the prompt. Unattended runs need ``--yes``."""
    if yes:
        return True
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise UserError("seed: stdin is not a terminal, cannot ask for confirmation; pass --yes to start")
    answer = (ask or input)("Proceed? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


# --- rate limiting ---------------------------------------------------------------------------


class RateLimiter:
    """Sliding-window limits on requests and tokens per ``window_s`` (60 s: per minute).

    ``acquire(tokens)`` waits until one more request with ``tokens`` fits in the window and returns a
    handle; ``settle(handle, actual)`` corrects the token count once the usage is known. A request
    larger than the token limit still goes through when the window is empty (it could never fit).

    Args:
        requests_per_window, tokens_per_window: limits (None: no limit).
        window_s: window length in seconds.
    """

    def __init__(self, requests_per_window: int | None, tokens_per_window: int | None, window_s: float = 60.0):
        self.requests_per_window = requests_per_window
        self.tokens_per_window = tokens_per_window
        self.window_s = window_s
        self._events: deque[list[float]] = deque()
        self._lock: asyncio.Lock | None = None
        self.waited_s = 0.0

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._events.popleft()

    def _fits(self, tokens: int) -> bool:
        if self.requests_per_window is not None and len(self._events) >= self.requests_per_window:
            return False
        if self.tokens_per_window is not None and self._events:
            used = sum(e[1] for e in self._events)
            if used + tokens > self.tokens_per_window:
                return False
        return True

    async def acquire(self, tokens: int) -> list[float]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                self._prune(now)
                if self._fits(tokens):
                    event = [now, float(tokens)]
                    self._events.append(event)
                    return event
                wait = self._events[0][0] + self.window_s - now
                wait = max(wait, 0.001)
                self.waited_s += wait
                await asyncio.sleep(wait)

    def settle(self, event: list[float], actual_tokens: int) -> None:
        event[1] = float(actual_tokens)


# --- annotation ------------------------------------------------------------------------------


def _cache_params(teacher: TeacherConfig) -> dict[str, Any]:
    return {"max_tokens": teacher.max_tokens, "temperature": teacher.temperature, "purpose": "seed"}


async def annotate(
    rows: list[dict[str, Any]],
    teacher: TeacherConfig,
    *,
    cache_dir: str | None,
    limiter: RateLimiter | None = None,
    api_key: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ask the teacher about every row; return (records, stats). Every row yields one record."""
    from rewriter.cache import ResponseCache, cache_key
    from rewriter.client import ClientConfig, Completion, RequestFailed, RewriteClient

    client = RewriteClient(
        ClientConfig(
            endpoint=teacher.endpoint, model=teacher.model, api_key_env=teacher.api_key_env,
            concurrency=teacher.concurrency, timeout_s=teacher.timeout_s, max_retries=teacher.max_retries,
            max_tokens=teacher.max_tokens, temperature=teacher.temperature,
        ),
        api_key=api_key,
    )
    cache = ResponseCache(cache_dir) if cache_dir else None
    limiter = limiter or RateLimiter(teacher.requests_per_min, teacher.tokens_per_min)
    stats = Counter()

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        caption = row["caption"]
        record = {
            "key": row["key"], "caption": caption, "quality_flags": list(row.get("quality_flags") or []),
            "needs_rewrite": bool(row.get("needs_rewrite")), "stratum": row["stratum"],
            "model": teacher.model, "prompt_version": prompts.PROMPT_VERSION,
            "status": STATUS_FAILED, "reason": "", "detail": "", "response": None, "text": None,
            "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0,
        }
        try:
            ckey = cache_key(teacher.model, prompts.PROMPT_VERSION, caption, _cache_params(teacher))
            entry = cache.get(ckey) if cache else None
            if entry is not None:
                completion = Completion.from_entry(entry)
                stats["cache_hits"] += 1
            else:
                est = estimate_prompt_tokens(caption) + teacher.max_tokens
                handle = await limiter.acquire(est)
                try:
                    completion = await client.complete(caption)
                except RequestFailed as e:
                    limiter.settle(handle, estimate_prompt_tokens(caption))
                    record.update(reason=e.reason, detail=e.detail)
                    return record
                limiter.settle(handle, completion.prompt_tokens + completion.completion_tokens)
                if cache:
                    cache.put(ckey, completion.to_entry())
            record.update(
                text=completion.text, finish_reason=completion.finish_reason,
                prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
            )
            verdict = prompts.validate_detailed(caption, completion.text, completion.finish_reason)
            if verdict.ok:
                record.update(status=STATUS_OK, reason=reasons.OK, response=verdict.parsed)
            else:
                record.update(status=STATUS_INVALID, reason=verdict.reason, detail=verdict.detail)
        except Exception as e:  # recorded as a failure, never dropped
            record.update(status=STATUS_FAILED, reason=reasons.exception_reason(e), detail="")
        return record

    t0 = time.monotonic()
    try:
        records = await asyncio.gather(*(one(r) for r in rows))
    finally:
        await client.aclose()
    stats.update(
        requests_sent=client.stats.requests, retries=client.stats.retries,
        max_in_flight=client.stats.max_in_flight,
    )
    out = dict(stats)
    out["seconds"] = round(time.monotonic() - t0, 3)
    out["rate_limit_wait_s"] = round(limiter.waited_s, 3)
    return sorted(records, key=lambda r: r["key"]), out


def summarize(records: list[dict[str, Any]], teacher: TeacherConfig) -> dict[str, Any]:
    by_status = Counter(r["status"] for r in records)
    by_reason = Counter(f"{r['status']}/{r['reason']}" for r in records)
    p_tok = sum(r["prompt_tokens"] for r in records)
    c_tok = sum(r["completion_tokens"] for r in records)
    return {
        "counts": {
            "requested": len(records),
            **{s: by_status.get(s, 0) for s in (STATUS_OK, STATUS_INVALID, STATUS_FAILED)},
            "by_reason": dict(sorted(by_reason.items())),
        },
        "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok},
        "actual_usd": round((p_tok * teacher.price_input_per_mtok + c_tok * teacher.price_output_per_mtok) / 1e6, 4),
    }


def write_seed(output_dir: str, records: list[dict[str, Any]], provenance: dict[str, Any]) -> None:
    from storage.files import write_bytes_atomic

    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    write_bytes_atomic(os.path.join(output_dir, SEED_NAME), body.encode("utf-8"))
    write_bytes_atomic(
        os.path.join(output_dir, PROVENANCE_NAME),
        (json.dumps(provenance, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"),
    )


def read_seed_records(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, provenance) from a seed directory or its ``seed.jsonl``."""
    seed_file = os.path.join(path, SEED_NAME) if os.path.isdir(path) else path
    prov_file = os.path.join(os.path.dirname(seed_file), PROVENANCE_NAME)
    if not os.path.isfile(seed_file):
        raise UserError(f"--seed {path}: {seed_file} not found; run `mmcorpus rewriter seed` first")
    records = []
    with open(seed_file, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{seed_file}:{i}: not JSON ({e}); the seed file is damaged, re-run the seed") from e
    provenance = {}
    if os.path.isfile(prov_file):
        with open(prov_file, encoding="utf-8") as f:
            provenance = json.load(f)
    return records, provenance


def run_seed(
    input_dir: str,
    output_dir: str,
    sample: SampleConfig,
    teacher: TeacherConfig,
    *,
    yes: bool = False,
    cache_dir: str | None = "",
    ask: Callable[[str], str] | None = None,
    interactive: bool | None = None,
    out=None,
) -> dict[str, Any] | None:
    """Sample, estimate, confirm, annotate and write. Returns the provenance (None when declined).

    ``cache_dir=""`` means ``OUTPUT/cache``; None disables the cache.
    """
    from storage.files import stage_input_info

    out = out or sys.stdout
    host = urllib.parse.urlsplit(teacher.endpoint).hostname or ""
    if host not in _LOCAL_HOSTS and not os.environ.get(teacher.api_key_env):
        raise UserError(
            f"seed: ${teacher.api_key_env} is not set; export the teacher's API key in that variable "
            "(keys are read from the environment only) or choose another with --api-key-env"
        )
    population, skipped = read_population(input_dir, sample.policy)
    if not population:
        raise UserError(f"--input {input_dir}: no kept record with a caption matches policy {sample.policy!r}")
    rows, strata = sample_rows(population, sample)
    est = estimate_cost([r["caption"] for r in rows], teacher)
    print(format_estimate(est, teacher), file=out, flush=True)
    if not confirm(yes, ask, interactive):
        print("seed: not confirmed, nothing sent", file=out)
        return None
    if cache_dir == "":
        cache_dir = os.path.join(output_dir, CACHE_DIRNAME)
    started = utc_now()
    records, stats = asyncio.run(annotate(rows, teacher, cache_dir=cache_dir))
    summary = summarize(records, teacher)
    provenance = {
        "kind": "mmcorpus.rewriter.seed",
        "model": teacher.model,
        "endpoint": public_endpoint(teacher.endpoint),
        "prompt_version": prompts.PROMPT_VERSION,
        "started_at": started,
        "finished_at": utc_now(),
        "source": {"stage_dir": os.path.abspath(input_dir), "input": stage_input_info(input_dir),
                   "population": len(population), "skipped": skipped},
        "sample": asdict(sample),
        "strata": strata,
        "generation": {"max_tokens": teacher.max_tokens, "temperature": teacher.temperature},
        "limits": {"concurrency": teacher.concurrency, "requests_per_min": teacher.requests_per_min,
                   "tokens_per_min": teacher.tokens_per_min, "max_retries": teacher.max_retries,
                   "timeout_s": teacher.timeout_s},
        "estimate": est,
        "run": stats,
        **summary,
    }
    os.makedirs(output_dir, exist_ok=True)
    write_seed(output_dir, records, provenance)
    c = summary["counts"]
    print(
        f"seed: {c['requested']} sampled -> {c['ok']} ok, {c['invalid']} invalid, {c['failed']} failed; "
        f"{summary['usage']['completion_tokens']:,} output tokens, ~${summary['actual_usd']:.4f}; "
        f"wrote {os.path.join(output_dir, SEED_NAME)}",
        file=out,
    )
    return provenance


def main(argv: list[str]) -> int:
    """``mmcorpus rewriter seed``."""
    parser = argparse.ArgumentParser(prog="mmcorpus rewriter seed", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a finished stage output (e.g. the filter stage's)")
    parser.add_argument("--output", required=True, help="seed directory to write")
    parser.add_argument("--n", type=int, required=True, help="captions to annotate")
    parser.add_argument("--policy", choices=("all", "needs_rewrite"), default="all")
    parser.add_argument("--length-bins", default="32,64,128", help="caption length bucket edges (chars)")
    parser.add_argument("--salt", default=SampleConfig.salt)
    parser.add_argument("--endpoint", required=True, help="teacher base URL, e.g. https://api.openai.com/v1")
    parser.add_argument("--model", required=True, help="teacher model name")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the API key")
    parser.add_argument("--concurrency", type=int, default=TeacherConfig.concurrency)
    parser.add_argument("--requests-per-min", type=int)
    parser.add_argument("--tokens-per-min", type=int)
    parser.add_argument("--max-tokens", type=int, default=TeacherConfig.max_tokens)
    parser.add_argument("--temperature", type=float, default=TeacherConfig.temperature)
    parser.add_argument("--timeout", type=float, default=TeacherConfig.timeout_s)
    parser.add_argument("--max-retries", type=int, default=TeacherConfig.max_retries)
    parser.add_argument("--price-input", type=float, default=TeacherConfig.price_input_per_mtok,
                        help="USD per million prompt tokens")
    parser.add_argument("--price-output", type=float, default=TeacherConfig.price_output_per_mtok,
                        help="USD per million completion tokens")
    parser.add_argument("--expected-output-tokens", type=int, default=TeacherConfig.expected_output_tokens)
    parser.add_argument("--cache", default="", help="response cache dir (default OUTPUT/cache)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--yes", "-y", action="store_true", help="skip the cost confirmation prompt")
    args = parser.parse_args(argv)
    try:
        bins = tuple(int(b) for b in args.length_bins.split(",") if b.strip())
        sample = SampleConfig(n=args.n, length_bins=bins, policy=args.policy, salt=args.salt)
        teacher = TeacherConfig(
            endpoint=args.endpoint, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
            requests_per_min=args.requests_per_min, tokens_per_min=args.tokens_per_min,
            max_tokens=args.max_tokens, temperature=args.temperature, timeout_s=args.timeout,
            max_retries=args.max_retries, price_input_per_mtok=args.price_input,
            price_output_per_mtok=args.price_output, expected_output_tokens=args.expected_output_tokens,
        )
    except ValueError as e:
        raise UserError(f"seed: {e}") from e
    result = run_seed(args.input, args.output, sample, teacher, yes=args.yes,
                      cache_dir=None if args.no_cache else args.cache)
    return 0 if result is not None else 1
