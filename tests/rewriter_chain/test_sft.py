"""export-sft: chat JSONL that TRL / LLaMA-Factory / `datasets` read, deterministic split, only validated records."""

from __future__ import annotations

import json
import os

import pytest

from rewriter import prompts
from rewriter.offline import template_rewrite
from rewriter.sft import ExportConfig, export_sft, main as sft_main, read_sft, split_records
from schemas.errors import UserError


def _write_seed(path, n_ok=30, prompt_version=prompts.PROMPT_VERSION):
    os.makedirs(path, exist_ok=True)
    rows = []
    for i in range(n_ok):
        cap = f"a photo of thing number {i} on a table"
        rows.append({"key": f"k{i:03d}", "caption": cap, "status": "ok", "reason": "ok", "model": "t",
                     "prompt_version": prompt_version, "response": template_rewrite(cap)})
    rows.append({"key": "bad1", "caption": "x y", "status": "invalid", "reason": "rewrite_truncated",
                 "model": "t", "prompt_version": prompt_version, "response": None, "text": "{"})
    rows.append({"key": "bad2", "caption": "x z", "status": "failed", "reason": "rewrite_exhausted_retries",
                 "model": "t", "prompt_version": prompt_version, "response": None, "text": None})
    with open(os.path.join(path, "seed.jsonl"), "w") as f:
        for r in reversed(rows):
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(path, "provenance.json"), "w") as f:
        json.dump({"model": "t", "prompt_version": prompt_version, "finished_at": "2026-01-01T00:00:00Z",
                   "counts": {"requested": n_ok + 2}}, f)
    return rows


def test_export_writes_chat_jsonl_and_a_deterministic_split(tmp_path):
    from datasets import load_dataset

    rows = _write_seed(tmp_path / "seed")
    summary = export_sft(str(tmp_path / "seed"), str(tmp_path / "a"), ExportConfig(validation_fraction=0.2))
    export_sft(str(tmp_path / "seed"), str(tmp_path / "b"), ExportConfig(validation_fraction=0.2))
    for name in ("train.jsonl", "validation.jsonl", "export.json", "dataset_info.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert summary["records"] == 32 and summary["exported"] == 30 and summary["skipped_not_ok"] == 2
    assert summary["train"] + summary["validation"] == 30 and summary["validation"] >= 1
    ds = load_dataset("json", data_files={"train": str(tmp_path / "a" / "train.jsonl"),
                                          "validation": str(tmp_path / "a" / "validation.jsonl")})
    assert ds["train"].num_rows == summary["train"] and ds["validation"].num_rows == summary["validation"]
    by_caption = {r["caption"]: r for r in rows if r["status"] == "ok"}
    seen = set()
    for split in ("train", "validation"):
        for ex in ds[split]:
            sys_m, user_m, asst = ex["messages"]
            assert (sys_m["role"], user_m["role"], asst["role"]) == ("system", "user", "assistant")
            caption = user_m["content"][len("Raw caption: "):]
            resp = by_caption[caption]["response"]
            assert asst["content"] == prompts.render_output(resp["qa"], resp["caption"])
            assert json.loads(asst["content"]) == resp
            seen.add(caption)
    assert seen == set(by_caption)
    info = json.loads((tmp_path / "a" / "dataset_info.json").read_text())
    assert info["mmcorpus_rewriter_train"]["formatting"] == "sharegpt"
    assert info["mmcorpus_rewriter_train"]["file_name"] == "train.jsonl"


def test_split_is_a_function_of_the_key_only():
    recs = [{"key": f"k{i}"} for i in range(200)]
    train, val = split_records(recs, ExportConfig(validation_fraction=0.25))
    train2, val2 = split_records(list(reversed(recs)), ExportConfig(validation_fraction=0.25))
    assert [r["key"] for r in val] == [r["key"] for r in val2] and len(train) + len(val) == 200
    assert 30 <= len(val) <= 70
    # Adding records never moves an existing one across the split.
    _, val3 = split_records(recs + [{"key": f"new{i}"} for i in range(50)], ExportConfig(validation_fraction=0.25))
    assert {r["key"] for r in val} <= {r["key"] for r in val3}


def test_small_sets_still_get_a_validation_record_but_keep_training_data():
    train, val = split_records([{"key": "a"}, {"key": "b"}], ExportConfig(validation_fraction=0.01))
    assert len(train) == 1 and len(val) == 1
    train, val = split_records([{"key": "a"}], ExportConfig(validation_fraction=0.5))
    assert len(train) == 1 and val == []
    train, val = split_records([{"key": "a"}, {"key": "b"}], ExportConfig(validation_fraction=0.0))
    assert len(train) == 2 and val == []


def test_prompt_version_mismatch_and_empty_sets_are_user_errors(tmp_path):
    _write_seed(tmp_path / "old", prompt_version="qa-v0")
    with pytest.raises(UserError, match="prompt version"):
        export_sft(str(tmp_path / "old"), str(tmp_path / "o"))
    _write_seed(tmp_path / "none", n_ok=0)
    with pytest.raises(UserError, match="no seed record passed validation"):
        export_sft(str(tmp_path / "none"), str(tmp_path / "o"))
    with pytest.raises(UserError, match="not found"):
        sft_main(["--seed", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    with pytest.raises(UserError, match="validation_fraction"):
        sft_main(["--seed", str(tmp_path / "old"), "--output", str(tmp_path / "o"), "--validation-fraction", "1.5"])


def test_cli_prints_counts(tmp_path, capsys):
    _write_seed(tmp_path / "seed", n_ok=10)
    assert sft_main(["--seed", str(tmp_path / "seed" / "seed.jsonl"), "--output", str(tmp_path / "o")]) == 0
    counts = json.loads(capsys.readouterr().out.splitlines()[0])
    assert counts["exported"] == 10 and counts["skipped_not_ok"] == 2
    assert len(read_sft(str(tmp_path / "o" / "train.jsonl"))) == counts["train"]
