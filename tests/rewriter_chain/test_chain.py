"""The whole rewriter chain for real, on one vLLM CPU server.

tiny model -> ``rewriter serve`` (base model, runtime LoRA) -> template-teacher adapter loaded as
``teacher`` -> ``rewriter seed`` through the openai client -> ``export-sft`` -> ``finetune`` (LoRA,
CPU) -> adapter loaded as ``rewriter`` -> ``mmcorpus rewrite`` (part B's ``RewriteCaptions``, structured
output) against it -> rerun from the cache. The text of a tiny model is meaningless; what is checked
exactly is the plumbing: counts, schema enforcement, ledger, cache, provenance, and that no API key
leaks anywhere. One server for teacher and rewriter keeps the wall time to one start-up.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from rewriter import prompts
from rewriter.cache import ResponseCache
from rewriter.seed import PROVENANCE_NAME, SEED_NAME
from rewriter.serving import load_lora_adapter, server_metrics
from schemas import reasons
from schemas.records import Pair
from transforms.stage_io import read_manifest, read_table

from .utils import SENTINEL_KEY, files_containing, make_stage_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_INPUT = 40
N_SEED = 32
N_PROBE = 12
REWRITE_REASONS = {
    reasons.OK, reasons.REWRITE_TRUNCATED, reasons.REWRITE_EMPTY, reasons.REWRITE_INVALID_JSON,
    reasons.REWRITE_OFF_FORMAT, reasons.REWRITE_UNFAITHFUL,
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OPENAI_API_KEY=SENTINEL_KEY, MMCORPUS_LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )


class ServeProcess:
    """``mmcorpus rewriter serve`` as a child process; reads the endpoint line it prints."""

    def __init__(self, args: list[str], log_path: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "rewriter", "serve", *args, "--log", log_path],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.log_path = log_path
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr_chunks: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_chunks.append), daemon=True).start()
        self.info: dict | None = None

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink(line)

    def wait_endpoint(self, timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("{"):
                self.info = json.loads(line)
                return self.info
        raise AssertionError(f"serve did not print its endpoint; stderr: {''.join(self.stderr_chunks)[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the CLI stops the vLLM server it started
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.info and self.info.get("pid"):
            try:  # the server's own process group, in case the CLI could not stop it
                os.killpg(self.info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def _input_pairs(captions: list[str]) -> list[Pair]:
    flags_cycle = [[], [], ["repeated_words"], ["short"], ["trailing_id", "url_token"]]
    pairs = []
    for i, caption in enumerate(captions[100: 100 + N_INPUT]):
        flags = flags_cycle[i % len(flags_cycle)]
        pairs.append(Pair(key=f"cc{i:04d}", url=f"http://example.invalid/{i}.jpg", caption=caption,
                          source=f"cc3m.tsv#{100 + i}", quality_flags=list(flags), needs_rewrite=bool(flags)))
    return pairs


def _probe(base_url: str, model: str, captions: list[str]) -> list[tuple[str, str]]:
    """(finish_reason, validation reason) per caption, greedy, with the JSON schema enforced."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)

    def one(caption: str) -> tuple[str, str]:
        r = client.chat.completions.create(
            model=model, messages=prompts.build_messages(caption), response_format=prompts.response_format(),
            max_tokens=256, temperature=0.0,
        )
        choice = r.choices[0]
        verdict = prompts.validate_detailed(caption, choice.message.content, choice.finish_reason)
        return choice.finish_reason, verdict.reason

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, captions))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model, vllm_python, cc3m_captions):
    from rewriter.tiny import make_template_teacher

    work = str(tmp_path_factory.mktemp("chain"))
    filter_dir = make_stage_dir(os.path.join(work, "filter"), _input_pairs(cc3m_captions), stage="filter")
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    server = ServeProcess(
        ["--model", tiny_model, "--served-model-name", "tiny", "--runtime-lora", "--max-model-len", "512",
         "--python", vllm_python],
        os.path.join(work, "vllm-server.log"),
    )
    try:
        # While vLLM starts: the teacher stand-in, a LoRA adapter imitating the offline template.
        teacher_adapter = make_template_teacher(tiny_model, cc3m_captions[2000:2400], os.path.join(work, "teacher"),
                                                steps=250)
        timings["teacher_finetune"] = time.monotonic() - t0
        info = server.wait_endpoint()
        timings["server_ready"] = time.monotonic() - t0
        root = info["endpoint"][: -len("/v1")]
        load_lora_adapter(root, "teacher", teacher_adapter)

        seed_dir = os.path.join(work, "seed")
        seed = _cli("rewriter", "seed", "--input", filter_dir, "--output", seed_dir, "--n", str(N_SEED),
                    "--endpoint", info["endpoint"], "--model", "teacher", "--temperature", "0",
                    "--max-tokens", "256", "--concurrency", "8", "--requests-per-min", "6000",
                    "--tokens-per-min", "2000000", "--yes")
        timings["seed"] = time.monotonic() - t0
        assert seed.returncode == 0, seed.stderr[-3000:]

        sft_dir = os.path.join(work, "sft")
        export = _cli("rewriter", "export-sft", "--seed", seed_dir, "--output", sft_dir, "--validation-fraction", "0.15")
        assert export.returncode == 0, export.stderr[-3000:]

        ft_dir = os.path.join(work, "ft")
        ft = _cli("rewriter", "finetune", "--base", tiny_model, "--data", sft_dir, "--output", ft_dir,
                  "--max-steps", "250", "--lr", "1e-2", "--batch-size", "4", "--lora-dropout", "0",
                  "--cpu-threads", "1", "--merge")
        timings["finetune"] = time.monotonic() - t0
        assert ft.returncode == 0, ft.stderr[-3000:]
        load_lora_adapter(root, "rewriter", os.path.join(ft_dir, "adapter"))

        probe_captions = cc3m_captions[300: 300 + N_PROBE]
        probe_base = _probe(info["endpoint"], "tiny", probe_captions)
        probe_tuned = _probe(info["endpoint"], "rewriter", probe_captions)
        timings["probe"] = time.monotonic() - t0

        rewrite_dir = os.path.join(work, "rewrite")
        cache_dir = os.path.join(work, "rewrite-cache")
        rewrite_args = ["rewrite", "--input", filter_dir, "--output", rewrite_dir, "--endpoint", info["endpoint"],
                        "--model", "rewriter", "--policy", "all", "--cache-dir", cache_dir, "--concurrency", "8",
                        "--batch-size", "16", "--max-tokens", "256", "--temperature", "0"]
        before = server_metrics(root)
        rw1 = _cli(*rewrite_args)
        timings["rewrite"] = time.monotonic() - t0
        assert rw1.returncode == 0, rw1.stderr[-3000:]
        after_first = server_metrics(root)
        manifest1 = read_manifest(rewrite_dir)
        rw2 = _cli(*rewrite_args, "--force")
        assert rw2.returncode == 0, rw2.stderr[-3000:]
        after_second = server_metrics(root)
        timings["rerun"] = time.monotonic() - t0
        server_env = open(f"/proc/{info['pid']}/environ", "rb").read()
        server.stop()  # before the merged-model test starts its own server (one at a time: ~3 GB each)
        yield {
            "work": work, "info": info, "filter_dir": filter_dir, "seed_dir": seed_dir, "sft_dir": sft_dir,
            "ft_dir": ft_dir, "rewrite_dir": rewrite_dir, "cache_dir": cache_dir,
            "seed": seed, "export": export, "ft": ft, "rw1": rw1, "rw2": rw2,
            "probe_base": probe_base, "probe_tuned": probe_tuned,
            "metrics": (before, after_first, after_second), "manifest1": manifest1, "server_env": server_env,
            "timings": timings, "server": server,
        }
    finally:
        server.stop()
        print("chain timings (s from start):", {k: round(v, 1) for k, v in timings.items()})


def test_server_started_through_the_cli_without_the_key(chain):
    info = chain["info"]
    assert info["endpoint"].startswith("http://127.0.0.1:") and info["endpoint"].endswith("/v1")
    assert info["models"] == ["tiny"]
    # The serve CLI ran with OPENAI_API_KEY set; the vLLM process must not have inherited it.
    assert SENTINEL_KEY.encode() not in chain["server_env"]
    assert b"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in chain["server_env"]


def test_seed_set_records_every_sampled_caption_with_provenance(chain):
    seed_dir = chain["seed_dir"]
    records = [json.loads(line) for line in open(os.path.join(seed_dir, SEED_NAME), encoding="utf-8")]
    prov = json.load(open(os.path.join(seed_dir, PROVENANCE_NAME), encoding="utf-8"))
    assert len(records) == N_SEED
    assert len({r["key"] for r in records}) == N_SEED
    assert [r["key"] for r in records] == sorted(r["key"] for r in records)
    assert {r["key"] for r in records} <= {f"cc{i:04d}" for i in range(N_INPUT)}
    status = Counter(r["status"] for r in records)
    assert sum(status.values()) == N_SEED and set(status) <= {"ok", "invalid", "failed"}
    assert status["failed"] == 0  # the server answered every request
    assert status["ok"] >= 4, status  # the template-teacher stand-in mostly closes its JSON
    for r in records:
        assert r["model"] == "teacher" and r["prompt_version"] == prompts.PROMPT_VERSION
        if r["status"] == "ok":
            assert r["reason"] == "ok" and r["response"]["qa"] and r["response"]["caption"]
        else:
            assert r["reason"] in REWRITE_REASONS - {reasons.OK} and r["response"] is None and r["text"] is not None
    assert prov["model"] == "teacher" and prov["prompt_version"] == prompts.PROMPT_VERSION
    assert prov["endpoint"] == chain["info"]["endpoint"]
    assert prov["started_at"] <= prov["finished_at"]
    assert prov["counts"]["requested"] == N_SEED
    assert prov["counts"]["ok"] == status["ok"] and prov["counts"]["invalid"] == status["invalid"]
    assert sum(s["selected"] for s in prov["strata"].values()) == N_SEED
    assert sum(s["population"] for s in prov["strata"].values()) == N_INPUT
    assert all(s["selected"] >= 1 for s in prov["strata"].values())  # every stratum represented
    assert prov["run"]["requests_sent"] == N_SEED and prov["run"]["retries"] == 0
    assert prov["usage"]["completion_tokens"] == sum(r["completion_tokens"] for r in records) > 0
    out = chain["seed"].stdout
    assert "estimated cost" in out and f"{N_SEED} requests to teacher" in out


def test_export_is_chat_jsonl_with_a_split(chain):
    from datasets import load_dataset

    seed_ok = [json.loads(line) for line in open(os.path.join(chain["seed_dir"], SEED_NAME), encoding="utf-8")]
    seed_ok = [r for r in seed_ok if r["status"] == "ok"]
    export = json.load(open(os.path.join(chain["sft_dir"], "export.json"), encoding="utf-8"))
    assert export["exported"] == len(seed_ok) and export["train"] + export["validation"] == len(seed_ok)
    assert export["validation"] >= 1 and export["train"] >= 1
    ds = load_dataset("json", data_files={"train": os.path.join(chain["sft_dir"], "train.jsonl"),
                                          "validation": os.path.join(chain["sft_dir"], "validation.jsonl")})
    assert ds["train"].num_rows == export["train"] and ds["validation"].num_rows == export["validation"]
    expected = {prompts.render_output(r["response"]["qa"], r["response"]["caption"]) for r in seed_ok}
    got = set()
    for split in ("train", "validation"):
        for row in ds[split]:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["system", "user", "assistant"]
            assert row["messages"][0]["content"] == prompts.SYSTEM_PROMPT
            got.add(row["messages"][2]["content"])
    assert got == expected


def test_finetune_learned_and_the_tuned_model_closes_its_json(chain):
    report = json.load(open(os.path.join(chain["ft_dir"], "finetune.json"), encoding="utf-8"))
    assert report["steps"] == 250 and report["device"] == "cpu"
    assert report["loss_last"] < 0.6 * report["loss_first"]
    assert report["val_loss_after"] < report["val_loss_before"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.path.isfile(os.path.join(chain["ft_dir"], "adapter", name))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert os.path.isfile(os.path.join(chain["ft_dir"], "merged", name))
    base, tuned = chain["probe_base"], chain["probe_tuned"]
    base_stop = sum(f == "stop" for f, _ in base)
    tuned_stop = sum(f == "stop" for f, _ in tuned)
    base_ok = sum(r == "ok" for _, r in base)
    tuned_ok = sum(r == "ok" for _, r in tuned)
    print("probe base", Counter(base), "tuned", Counter(tuned))
    # Random weights pad the JSON with whitespace until max_tokens; the fine-tune stops with valid JSON.
    assert tuned_stop > base_stop
    assert tuned_ok > base_ok
    assert tuned_ok >= N_PROBE // 2


def test_rewrite_stage_against_the_tuned_model(chain):
    ledger = read_table(chain["rewrite_dir"], "ledger").to_pylist()
    data = read_table(chain["rewrite_dir"]).to_pylist()
    inputs = {p.key: p for p in _input_pairs_from(chain["filter_dir"])}
    # Exactly one ledger row per input; kept rows are exactly the data rows.
    assert sorted(r["key"] for r in ledger) == sorted(inputs)
    kept = {r["key"] for r in ledger if r["status"] == "kept"}
    assert sorted(r["key"] for r in data) == sorted(kept)
    by_key = {r["key"]: r for r in ledger}
    for r in ledger:
        assert r["stage"] == "rewrite" and r["model"] == "rewriter" and r["prompt_version"] == prompts.PROMPT_VERSION
        assert r["reason"] in REWRITE_REASONS, r
        # on_failure keep_raw (the default): a failed rewrite keeps the record, the reason names the failure
        assert r["status"] == "kept"
        assert (r["reason"] == reasons.OK) == (not r["detail"].startswith("kept raw caption: "))
    rewritten = {k for k in kept if by_key[k]["reason"] == reasons.OK}
    assert len(rewritten) >= 1
    for row in data:
        src = inputs[row["key"]]
        if row["key"] not in rewritten:  # kept as it came: raw caption, not rewritten
            assert (row["caption"], row["raw_caption"], row["qa"], row["rewrite_model"]) == (src.caption, None, None, None)
            continue
        assert row["raw_caption"] == src.caption
        assert row["rewrite_model"] == "rewriter" and row["prompt_version"] == prompts.PROMPT_VERSION
        assert row["qa"] and all(p["answer"] for p in row["qa"])
        ok, reason, parsed = prompts.validate(src.caption, prompts.render_output(row["qa"], row["caption"]), "stop")
        assert ok, reason
    m = chain["manifest1"]
    assert m.counts["inputs"] == m.counts["ledger_rows"] == N_INPUT
    assert m.counts["outputs"] == len(kept) == N_INPUT
    assert sum(m.counts["by_reason"].values()) == N_INPUT
    # The LoRA adapter's identity, read from vLLM's GET /v1/models, keys the config and the cache.
    assert m.config["rewrite"]["model_revision"] == os.path.join(chain["ft_dir"], "adapter") + " (parent tiny)"


def test_cache_makes_the_rerun_free_and_identical(chain):
    before, first, second = chain["metrics"]
    key = "vllm:request_success_total"
    assert key in first, sorted(first)[:40]
    assert first[key] - before[key] == N_INPUT  # one request per record, no duplicates
    assert second[key] - first[key] == 0  # the --force rerun sent nothing
    cache = ResponseCache(chain["cache_dir"])
    assert len(cache.keys()) == len({p.caption for p in _input_pairs_from(chain["filter_dir"])})
    m1, m2 = chain["manifest1"], read_manifest(chain["rewrite_dir"])
    assert [(f.path, f.sha256) for f in m1.files] == [(f.path, f.sha256) for f in m2.files]


def test_api_key_never_printed_logged_or_written(chain):
    needle = SENTINEL_KEY.encode()
    assert files_containing(chain["work"], needle) == []
    for name in ("seed", "export", "ft", "rw1", "rw2"):
        proc = chain[name]
        assert SENTINEL_KEY not in proc.stdout and SENTINEL_KEY not in proc.stderr, name
    # The DEBUG logs were really captured (the check above is not vacuous).
    assert "DEBUG" in chain["seed"].stderr
    with open(chain["server"].log_path, "rb") as f:
        assert needle not in f.read()
    assert SENTINEL_KEY not in "".join(chain["server"].stderr_chunks)


def test_merged_model_serves_through_the_context_manager(chain, vllm_python, cc3m_captions):
    """``finetune --merge`` output served on its own (``VLLMServer``, the fixture-friendly API)."""
    from rewriter.serving import ServeConfig, VLLMServer

    cfg = ServeConfig(model=os.path.join(chain["ft_dir"], "merged"), served_model_name="rewriter-merged",
                      python=vllm_python, max_model_len=512, log_path=os.path.join(chain["work"], "merged.log"))
    with VLLMServer(cfg) as server:
        assert server.models() == ["rewriter-merged"]
        probe = _probe(server.base_url, "rewriter-merged", cc3m_captions[300: 300 + N_PROBE])
        pid = server.proc.pid
    assert server.proc is None
    from rewriter.serving import _group_alive

    assert not _group_alive(pid)  # stop() waited for the whole process group (engine processes too)
    print("probe merged", Counter(probe))
    merged_ok = sum(r == "ok" for _, r in probe)
    base_ok = sum(r == "ok" for _, r in chain["probe_base"])
    assert merged_ok > base_ok and merged_ok >= N_PROBE // 2


def _input_pairs_from(stage_dir: str) -> list[Pair]:
    return [Pair.from_row(r) for r in read_table(stage_dir).to_pylist()]
