"""The response cache: keys, atomic entries, unreadable entries, many processes writing at once."""

from __future__ import annotations

import json
import multiprocessing
import os

from rewriter.cache import ResponseCache, cache_key


def test_key_depends_on_every_part():
    base = cache_key("m", "qa-v1", "a dog", {"max_tokens": 256, "temperature": 0.0})
    assert base == cache_key("m", "qa-v1", "a dog", {"temperature": 0.0, "max_tokens": 256})  # order-free
    others = {
        cache_key("m2", "qa-v1", "a dog", {"max_tokens": 256, "temperature": 0.0}),
        cache_key("m", "qa-v2", "a dog", {"max_tokens": 256, "temperature": 0.0}),
        cache_key("m", "qa-v1", "a dog ", {"max_tokens": 256, "temperature": 0.0}),
        cache_key("m", "qa-v1", "a dog", {"max_tokens": 128, "temperature": 0.0}),
    }
    assert base not in others and len(others) == 4
    assert len(base) == 64 and all(c in "0123456789abcdef" for c in base)


def test_put_get_roundtrip_layout_and_no_temp_files(tmp_path):
    cache = ResponseCache(str(tmp_path / "c"))
    key = cache_key("m", "qa-v1", "a dog")
    assert cache.get(key) is None
    cache.put(key, {"text": "{}", "finish_reason": "stop"})
    assert cache.get(key) == {"key": key, "text": "{}", "finish_reason": "stop"}
    path = tmp_path / "c" / "v1" / key[:2] / f"{key}.json"
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [f"{key}.json"]
    assert cache.keys() == [key]


def test_unreadable_or_foreign_entry_is_a_miss_and_gets_overwritten(tmp_path):
    cache = ResponseCache(str(tmp_path))
    key = cache_key("m", "qa-v1", "a dog")
    path = cache.path(key)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"text": "tor')  # what a non-atomic writer could leave behind
    assert cache.get(key) is None
    with open(path, "w") as f:
        json.dump({"key": "0" * 64, "text": "other"}, f)  # an entry filed under the wrong name
    assert cache.get(key) is None
    cache.put(key, {"text": "ok"})
    assert cache.get(key)["text"] == "ok"


def _writer(args):
    root, worker, n = args
    cache = ResponseCache(root)
    for i in range(n):
        # every worker writes the same keys (a caption answered twice) plus its own
        cache.put(cache_key("m", "v", f"shared {i}"), {"text": f"shared {i}"})
        cache.put(cache_key("m", "v", f"own {worker} {i}"), {"text": f"own {worker} {i}"})
    return worker


def test_many_processes_write_concurrently(tmp_path):
    root = str(tmp_path / "cache")
    n, workers = 150, 4
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        assert sorted(pool.map(_writer, [(root, w, n) for w in range(workers)])) == list(range(workers))
    cache = ResponseCache(root)
    assert len(cache.keys()) == n + workers * n
    for i in range(n):
        assert cache.get(cache_key("m", "v", f"shared {i}"))["text"] == f"shared {i}"
    leftovers = [f for _, _, files in os.walk(root) for f in files if f.startswith(".tmp-")]
    assert leftovers == []
