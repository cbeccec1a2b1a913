"""LoRA fine-tune on the CPU with the tiny model: it learns, writes a servable adapter and a merged model."""

from __future__ import annotations

import builtins
import json
import os

import pytest

from rewriter.finetune import FinetuneConfig, finetune, main as ft_main, require_finetune_extra
from rewriter.sft import ExportConfig, export_sft
from rewriter.tiny import write_template_seed
from schemas.errors import UserError


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, cc3m_captions):
    work = tmp_path_factory.mktemp("sft")
    write_template_seed(str(work / "seed"), cc3m_captions[500:540])
    export_sft(str(work / "seed"), str(work / "sft"), ExportConfig(validation_fraction=0.2))
    return str(work / "sft")


def test_lora_on_cpu_learns_and_merges(tmp_path, tiny_model, sft_dir):
    import torch
    import transformers
    from peft import PeftModel

    out = str(tmp_path / "ft")
    cfg = FinetuneConfig(max_steps=40, learning_rate=1e-2, batch_size=4, lora_dropout=0.0, cpu_threads=1)
    result = finetune(tiny_model, sft_dir, out, cfg, merge=True)
    report = json.load(open(os.path.join(out, "finetune.json")))
    assert result.steps == report["steps"] == 40 and len(report["losses"]) == 40
    assert report["train_examples"] + report["validation_examples"] == 40 and report["validation_examples"] >= 1
    assert report["loss_last"] < report["loss_first"] - 1.0
    assert report["val_loss_after"] < report["val_loss_before"]
    adapter_cfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert adapter_cfg["r"] == 8 and set(adapter_cfg["target_modules"]) == set(cfg.target_modules)

    # The merged model computes what base + adapter compute.
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "merged"))
    ids = tok("a dog on the beach", return_tensors="pt")["input_ids"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, os.path.join(out, "adapter"))
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = with_adapter(input_ids=ids).logits
        c = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # and it is not the base model


def test_same_seed_same_adapter(tmp_path, tiny_model, sft_dir):
    cfg = FinetuneConfig(max_steps=5, learning_rate=1e-2, batch_size=4, cpu_threads=1)
    finetune(tiny_model, sft_dir, str(tmp_path / "a"), cfg)
    finetune(tiny_model, sft_dir, str(tmp_path / "b"), cfg)
    name = os.path.join("adapter", "adapter_model.safetensors")
    assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read()


def test_missing_extra_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("No module named 'peft'", name="peft")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match=r"peft is missing.*pip install -e '\.\[finetune\]'"):
        require_finetune_extra()


def test_user_errors(tmp_path, tiny_model, sft_dir):
    with pytest.raises(UserError, match="--base"):
        ft_main(["--base", str(tmp_path), "--data", sft_dir, "--output", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--data"):
        ft_main(["--base", tiny_model, "--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    with pytest.raises(UserError, match="max_steps"):
        ft_main(["--base", tiny_model, "--data", sft_dir, "--output", str(tmp_path / "o"), "--max-steps", "0"])
