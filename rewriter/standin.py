"""A local stand-in for an OpenAI-compatible chat-completions server, for fault injection and benches.

Not a model and not for production: it binds 127.0.0.1 only, answers ``POST /v1/chat/completions``
with the ``offline-template`` rewrite of the caption in the prompt (or a custom ``respond``), after a
fixed ``latency_s``, with at most ``max_concurrency`` requests being served at once (the rest queue),
and injects faults at a given rate. It exists because a real server cannot be told to fail on cue.

Faults (``FAULTS``), chosen per request by a hash of (seed, caption, attempt number), so a test can
predict exactly which request fails how (``fault_for``). The attempt number is the request's
``X-Request-Attempt`` header (``rewriter.client`` sends its 0-based retry index) when present, else
how many requests for that caption this server saw before. The header matters when one caption is
asked more than once at a time (identical captions in two batches in flight together, or on two
workers): with a per-server counter, which ask got attempt 0 and which attempt 1 would depend on
arrival order, so the records' outcomes would change from run to run; with the header every ask of a
caption meets the same faults, and each record's outcome follows from ``fault_for`` alone.

- ``http_429``: status 429 with ``Retry-After: <retry_after_s>``;
- ``http_500``: status 500;
- ``hang``: accepts the request and never answers (holds the connection ``hang_s``, then closes it);
- ``malformed_json``: 200, ``finish_reason="stop"``, message content that is not JSON;
- ``malformed_body``: 200 whose body is not JSON at all (a broken proxy);
- ``truncated``: 200, ``finish_reason="length"``, the answer cut in half.

It records every request it saw (caption, attempt, fault, time) — never the Authorization header; with
``expected_api_key`` set it answers 401 when the header does not carry that key.

Run it alone (prints ``PORT <n>`` when ready)::

    python -m rewriter.standin --latency 0.05 --max-concurrency 16 [--fault-rate 0.2]

Example:
    with StandInServer(latency_s=0.01, fault_rate=0.2) as srv:
        client = RewriteClient(ClientConfig(endpoint=srv.base_url, model="m"))
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from rewriter import prompts
from rewriter.client import ATTEMPT_HEADER
from rewriter.offline import template_rewrite

FAULTS = ("http_429", "http_500", "hang", "malformed_json", "malformed_body", "truncated")
RETRYABLE_FAULTS = ("http_429", "http_500", "hang")

_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}


@dataclass
class SeenRequest:
    caption: str
    attempt: int
    fault: str | None
    t: float
    images: int = 0  # image_url parts in the request (all checked to decode)


def caption_of(body: dict) -> str:
    """The raw caption inside a request built by ``rewriter.prompts.build_messages``; for a request
    whose user content is a list of parts, its text parts joined by newlines; a request's ``seed``
    (RLAIF-V policy samples) is appended as ``|seed=N`` so each sample has its own fault schedule
    (and the server appends ``|img=<sha256 of the image URLs>[:12]`` to requests carrying images)."""
    prefix = prompts.USER_TEMPLATE.split("{caption}")[0]
    text = ""
    for m in body.get("messages") or []:
        if m.get("role") == "user":
            content = m.get("content") or ""
            if isinstance(content, list):
                text = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            else:
                text = content[len(prefix):] if content.startswith(prefix) else content
            break
    if "seed" in body:
        text += f"|seed={body['seed']}"
    return text


def check_image_parts(body: dict) -> tuple[int, str | None]:
    """(number of ``image_url`` parts, problem or None): every part must be a base64 data URL of an
    image that PIL decodes, as an OpenAI-compatible multimodal server requires."""
    import base64
    import binascii
    import io

    n = 0
    for m in body.get("messages") or []:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            n += 1
            url = (part.get("image_url") or {}).get("url") or ""
            head, sep, data = url.partition(",")
            if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
                return n, "image_url is not a base64 data URL of an image"
            try:
                from PIL import Image

                with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
                    im.load()
            except (binascii.Error, ValueError, OSError) as e:
                return n, f"image_url does not decode ({type(e).__name__})"
    return n, None


def default_respond(caption: str) -> tuple[str, str]:
    out = template_rewrite(caption)
    return prompts.render_output(out["qa"], out["caption"]), "stop"


def fault_for(seed: int, caption: str, attempt: int, rate: float, faults: tuple[str, ...] = FAULTS) -> str | None:
    """The fault injected on ``attempt`` (0-based) of ``caption`` (None: answer normally)."""
    if rate <= 0 or not faults:
        return None
    h = hashlib.sha256(f"{seed}|{caption}|{attempt}".encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u >= rate:
        return None
    return faults[int.from_bytes(h[8:12], "big") % len(faults)]


class StandInServer:
    """Threaded asyncio HTTP/1.1 server on 127.0.0.1 (keep-alive, Content-Length bodies only).

    Args:
        latency_s: time spent "generating" each answer.
        max_concurrency: answers generated at once (None: unbounded).
        fault_rate: share of requests that get a fault; faults: which ones.
        seed: fault seed.
        retry_after_s: the Retry-After a 429 carries (integer seconds, as HTTP wants).
        hang_s: how long a ``hang`` holds its connection before closing it unanswered.
        respond: ``caption -> (content, finish_reason)`` for normal answers.
        respond_body: ``request body -> (content, finish_reason)``, replacing ``respond`` (RLAIF-V
            routes on the request's schema / messages; see ``tests/rlaifv``).
        expected_api_key: when set, requests without ``Authorization: Bearer <key>`` get 401.
        plan: ``(caption, attempt) -> fault | None``, replacing the rate-based choice (exact scenarios).
        port: 0 picks a free port.
    """

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        retry_after_s: int = 1,
        hang_s: float = 5.0,
        respond: Callable[[str], tuple[str, str]] = default_respond,
        respond_body: Callable[[dict], tuple[str, str]] | None = None,
        expected_api_key: str | None = None,
        plan: Callable[[str, int], str | None] | None = None,
        port: int = 0,
    ):
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.seed = seed
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.respond = respond
        self.respond_body = respond_body
        self.expected_api_key = expected_api_key
        self.plan = plan
        self.port = port
        self.seen: list[SeenRequest] = []
        self.responses_sent = 0  # completed 200 answers written to the socket
        self.max_in_flight = 0
        self._in_flight = 0
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> "StandInServer":
        self._thread = threading.Thread(target=self._run, name="standin-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stand-in server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "StandInServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for t in pending:  # hung handlers: end them with the server
            t.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._gen_sem = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()

    # --- HTTP ------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._dispatch(method, path, headers, body, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _send(self, writer, status: int, payload: dict | str, extra_headers: dict | None = None) -> None:
        data = payload.encode("utf-8") if isinstance(payload, str) else json.dumps(payload).encode("utf-8")
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes, writer) -> bool:
        if method == "GET" and path.rstrip("/") in ("/health", "/v1/models"):
            await self._send(writer, 200, {"object": "list", "data": [{"id": "standin", "object": "model"}]})
            return True
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            await self._send(writer, 404, {"error": {"message": "not found"}})
            return True
        if self.expected_api_key is not None and headers.get("authorization") != f"Bearer {self.expected_api_key}":
            await self._send(writer, 401, {"error": {"message": "bad api key", "type": "auth"}})
            return True
        req = json.loads(body.decode("utf-8"))
        caption = caption_of(req)
        n_images, image_problem = check_image_parts(req)
        if n_images:  # same text about another image is another request (own attempts, own faults)
            urls = [p.get("image_url", {}).get("url", "") for m in req.get("messages") or []
                    if isinstance(m.get("content"), list) for p in m["content"] if isinstance(p, dict)]
            caption += "|img=" + hashlib.sha256("".join(urls).encode("utf-8")).hexdigest()[:12]
        if image_problem is not None:  # what vLLM does with an image it cannot load: a 400
            with self._lock:
                self.seen.append(SeenRequest(caption=caption, attempt=-1, fault="bad_image", t=time.monotonic(),
                                             images=n_images))
            await self._send(writer, 400, {"error": {"message": image_problem, "type": "BadRequestError"}})
            return True
        with self._lock:
            attempt = self._attempts.get(caption, 0)
            self._attempts[caption] = attempt + 1
            sent = headers.get(ATTEMPT_HEADER.lower(), "")
            if sent.isdigit():  # the client's own retry index: independent of other asks of this caption
                attempt = int(sent)
            if self.plan is not None:
                fault = self.plan(caption, attempt)
            else:
                fault = fault_for(self.seed, caption, attempt, self.fault_rate, self.faults)
            self.seen.append(SeenRequest(caption=caption, attempt=attempt, fault=fault, t=time.monotonic(),
                                         images=n_images))
        if fault == "http_429":
            await self._send(writer, 429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                             {"Retry-After": str(self.retry_after_s)})
            return True
        if fault == "http_500":
            await self._send(writer, 500, {"error": {"message": "boom", "type": "server_error"}})
            return True
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            return False
        if self._gen_sem is not None:
            async with self._gen_sem:
                content, finish = await self._generate(caption, req)
        else:
            content, finish = await self._generate(caption, req)
        if fault == "malformed_body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n"
                         b"Connection: keep-alive\r\n\r\n{not json")
            await writer.drain()
            return True
        if fault == "malformed_json":
            content, finish = content[: max(1, len(content) // 3)] + "}}]{", "stop"
        elif fault == "truncated":
            content, finish = content[: len(content) // 2], "length"
        payload = {
            "id": f"chatcmpl-{hashlib.sha1(f'{caption}|{attempt}'.encode()).hexdigest()[:12]}",
            "object": "chat.completion",
            "created": 0,
            "model": req.get("model", "standin"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(caption.split()) + 60, "completion_tokens": len(content.split()),
                      "total_tokens": len(caption.split()) + 60 + len(content.split())},
        }
        if req.get("logprobs") and fault is None:
            # One fixed-value entry per word or punctuation token; alternatives "yes"/"no" for a yes/no word.
            import re

            entries = []
            for tok in re.findall(r"\w+|[^\w\s]", content) or [content]:
                top = [{"token": tok, "logprob": -0.05}]
                if tok in ("yes", "no"):
                    top.append({"token": "no" if tok == "yes" else "yes", "logprob": -3.0})
                entries.append({"token": tok, "logprob": -0.05, "top_logprobs": top})
            payload["choices"][0]["logprobs"] = {"content": entries}
        await self._send(writer, 200, payload)
        with self._lock:
            self.responses_sent += 1
        return True

    async def _generate(self, caption: str, req: dict) -> tuple[str, str]:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return self.respond_body(req) if self.respond_body is not None else self.respond(caption)
        finally:
            with self._lock:
                self._in_flight -= 1

    # --- inspection ------------------------------------------------------------------------
    def requests_for(self, caption: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.seen if r.caption == caption]

    def captions_seen(self) -> list[str]:
        with self._lock:
            return [r.caption for r in self.seen]


def _user_text(body: dict) -> str:
    for m in body["messages"]:
        if m["role"] == "user":
            c = m["content"]
            return c if isinstance(c, str) else "\n".join(p["text"] for p in c if p["type"] == "text")
    return ""


def rlaifv_respond(body: dict) -> tuple[str, str]:
    """Deterministic RLAIF-V answers (tests, README example), by what the request carries:

    - policy (a ``seed`` in the body): ``"The picture is photo <sha256(data URL)[:8]>."`` followed by
      ``seed % 3`` sentences ``"There is a wrong thing N."``; with seeds 0..3 the scores are 0, -1, -2, 0;
    - claims (``response_format`` named ``claims``): the answer split at ". ";
    - questions (``questions``): ``"Is it true that <claim>?"`` per claim;
    - labeler (``answer``): ``no`` when the question holds ``wrong``, else ``yes``.

    Markers in the prompt make bad answers on cue: ``EMPTY`` (policy answers ""), ``BADCLAIMS`` (claims
    answer ``{"claims": "x"}``), ``MAYBE`` (labeler answers ``maybe``); ``LABFAIL`` is carried into a
    claim and its question (``labfail``) so a fault plan can target that record's labeler calls.
    """
    text = _user_text(body)
    fmt = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
    if "seed" in body:
        if "EMPTY" in text:
            return "", "stop"
        extra = "".join(f" There is a wrong thing {k}." for k in range(body["seed"] % 3))
        tag = "".join(f" {m}." for m in ("BADCLAIMS", "MAYBE", "LABFAIL") if m in text)
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        photo = hashlib.sha256(url.encode()).hexdigest()[:8]  # claims differ per image
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




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewriter.standin", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rlaifv", action="store_true", help="answer RLAIF-V policy/claims/labeler requests (rlaifv_respond)")
    args = p.parse_args(argv)
    srv = StandInServer(latency_s=args.latency, max_concurrency=args.max_concurrency,
                        fault_rate=args.fault_rate, seed=args.seed, port=args.port,
                        respond_body=rlaifv_respond if args.rlaifv else None).start()
    print(f"PORT {srv.port}", flush=True)
    try:
        sys.stdin.read()  # serve until stdin closes (the parent process exits or closes the pipe)
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
