"""`mmcorpus sft` CLI: registered, usage, and clear errors for unusable tokenizers (exit 2, fix named)."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

from pipelines import cli

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_registered_and_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "sft" in capsys.readouterr().out
    assert cli.main(["sft"]) == 2
    assert "ingest|split|pack|export|make-tokenizer" in capsys.readouterr().err


def test_unusable_tokenizers_are_user_errors(tmp_path, capsys, chat_tok_dir, monkeypatch):
    args = ["sft", "pack", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli.main(args + ["--tokenizer", str(REPO / "data" / "tokenizer" / "tokenizer.json")]) == 2
    assert "pass a tokenizer directory" in capsys.readouterr().err
    no_tpl = tmp_path / "no_tpl"
    shutil.copytree(chat_tok_dir, no_tpl)
    cfg = json.loads((no_tpl / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (no_tpl / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert cli.main(args + ["--tokenizer", str(no_tpl)]) == 2
    assert "has no chat_template" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the finetune extra were not installed
    assert cli.main(args + ["--tokenizer", chat_tok_dir]) == 2
    assert "pip install 'mmcorpus[finetune]'" in capsys.readouterr().err
