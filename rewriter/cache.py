"""Content-addressed cache of rewriter responses: one small JSON file per (model, prompt, caption).

Why one file per entry (and not sqlite with WAL):

- **Crash safety without a lock.** An entry is written under a unique temporary name in its final
  directory and renamed into place (``os.replace``, atomic on POSIX); a reader sees a complete entry or
  none. A process killed with SIGKILL leaves at most an orphan ``.tmp-*`` file, never a torn entry.
- **Many writers.** Beam's multi-process DirectRunner (and any runner) runs several workers at once.
  Independent files need no coordination; two workers answering the same caption write the same
  content and the last rename wins. sqlite serialises writers on one lock and is unsafe on network
  filesystems.
- **Distributed runners.** The same layout works on object stores through Beam's ``FileSystems``
  (``gs://``, ``s3://``; an object appears only once its upload completes), so Dataflow workers share
  the cache; a local sqlite file is invisible to them.
- Cost: one file per entry. 200M entries are 200M small objects — fine for an object store, heavy for
  a local disk; shard the cache by run or compact it into Parquet offline if that matters.

Layout: ``ROOT/v1/ab/abcdef...json`` (two-hex-digit fan-out). The key is the sha256 of the canonical
JSON of ``[model, prompt_version, caption, generation params]``, plus ``{"revision": ...}`` when the
served model's revision is known (``--model-revision``, or the ``root`` that vLLM's ``GET /v1/models``
reports for the served name): new weights served under an old name get new keys, so they are
asked afresh instead of answered from the old weights' entries. The entry stores the completion text,
``finish_reason`` and token usage, plus the caption's sha256 (not the caption itself) and never any
credential. Every completed HTTP 200 answer is cached, valid or not (re-asking a deterministic model
would pay for the same answer again); transport failures (retries exhausted, 4xx) are not, so a rerun
retries them.

Where it lives: a local directory, a URL of a Beam filesystem (``gs://``, ``s3://``, ``hdfs://``), or
any other fsspec URL (``memory://`` in benches). Every method blocks on I/O: callers on an event loop
run them in a thread pool (``transforms.rewrite.RewriteBatchFn`` does).

Example:
    cache = ResponseCache("/data/rewrite-cache")
    key = cache_key("rewriter-v3", "qa-v1", "a dog", {"max_tokens": 256, "temperature": 0.0})
    if cache.get(key) is None:
        cache.put(key, {"text": "...", "finish_reason": "stop"})
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

LAYOUT_VERSION = "v1"


def cache_key(
    model: str, prompt_version: str, caption: str, params: dict[str, Any] | None = None, revision: str | None = None
) -> str:
    """sha256 hex of the canonical JSON of what determines a completion. ``revision`` (the served
    weights' identity) is appended only when known, so entries written without one keep their keys."""
    doc: list[Any] = [model, prompt_version, caption, params or {}]
    if revision:
        doc.append({"revision": revision})
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Get/put completions by key under ``root`` (a local directory or a Beam filesystem URL).

    Args:
        root: cache directory; created on first write.
    """

    def __init__(self, root: str):
        self.root = root.rstrip("/") if "://" in root else os.path.abspath(root)
        self.remote = "://" in root
        self._fs = None  # an fsspec filesystem, for URLs Beam has no filesystem for
        if self.remote:
            from apache_beam.io.filesystems import FileSystems

            try:
                FileSystems.get_filesystem(self.root)
            except ValueError:  # not a Beam scheme (memory://, ...): fsspec
                import fsspec

                self._fs = fsspec.url_to_fs(self.root)[0]

    def path(self, key: str) -> str:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be lower-case hex, got {key[:16]!r}")
        if self.remote:
            return f"{self.root}/{LAYOUT_VERSION}/{key[:2]}/{key}.json"
        return os.path.join(self.root, LAYOUT_VERSION, key[:2], key + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when absent or unreadable (an unreadable entry is a miss and
        is overwritten by the next put)."""
        path = self.path(key)
        try:
            if self._fs is not None:  # one round trip: a missing object is FileNotFoundError
                raw = self._fs.cat_file(path)
            elif self.remote:
                from apache_beam.io.filesystems import FileSystems

                if not FileSystems.exists(path):
                    return None
                with FileSystems.open(path, compression_type="uncompressed") as f:
                    raw = f.read()
            else:
                with open(path, "rb") as f:
                    raw = f.read()
            entry = json.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` (JSON-able) atomically under ``key``."""
        data = json.dumps(dict(entry, key=key), sort_keys=True, ensure_ascii=False).encode("utf-8")
        path = self.path(key)
        if self._fs is not None:
            self._fs.pipe_file(path, data)  # one object, published whole
            return
        if self.remote:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.create(path) as f:  # object stores publish an object only when closed
                f.write(data)
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def keys(self) -> list[str]:
        """All keys present (local caches only; for tests and inspection)."""
        if self.remote:
            raise NotImplementedError("listing a remote cache: use gsutil/aws s3 ls on the root")
        base = os.path.join(self.root, LAYOUT_VERSION)
        out = []
        if not os.path.isdir(base):
            return out
        for fan in sorted(os.listdir(base)):
            d = os.path.join(base, fan)
            if os.path.isdir(d):
                out.extend(n[:-5] for n in sorted(os.listdir(d)) if n.endswith(".json") and not n.startswith("."))
        return out
