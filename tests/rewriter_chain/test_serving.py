"""Serving without a server: the command line, the scrubbed environment, config and CLI errors.
(The real server runs in test_chain.py.)"""

from __future__ import annotations

import pytest

from rewriter.serving import ServeConfig, build_command, main as serve_main, server_env, vllm_python
from schemas.errors import UserError


def test_command_line_for_lora_serving():
    cfg = ServeConfig(model="/m", served_model_name="base", lora_modules={"rewriter": "/a"}, python="/usr/bin/env",
                      max_model_len=512)
    cmd = build_command(cfg, 8123)
    assert cmd[:3] == ["/usr/bin/env", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--model /m", "--host 127.0.0.1", "--port 8123", "--max-model-len 512", "--dtype bfloat16",
                 "--served-model-name base", "--enable-lora", "--max-lora-rank 8", "--lora-modules rewriter=/a"):
        assert part in joined, part
    plain = " ".join(build_command(ServeConfig(model="/m", python="/usr/bin/env"), 1))
    assert "--enable-lora" not in plain and "--served-model-name" not in plain


def test_server_env_drops_keys_and_sets_cpu_workarounds(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret2")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = server_env(ServeConfig(model="/m", runtime_lora=True, kv_cache_gib=2))
    assert "OPENAI_API_KEY" not in env and "VLLM_API_KEY" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in server_env(ServeConfig(model="/m"))


def test_vllm_python_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCORPUS_VLLM_PYTHON", "/usr/bin/env")
    assert vllm_python() == "/usr/bin/env"
    assert vllm_python("/bin/sh") == "/bin/sh"
    with pytest.raises(UserError, match="make vllm-env"):
        vllm_python(str(tmp_path / "no-python"))


def test_config_and_cli_errors(tmp_path):
    with pytest.raises(ValueError):
        ServeConfig(model="")
    with pytest.raises(ValueError):
        ServeConfig(model="/m", lora_modules={"a=b": "/x"})
    with pytest.raises(UserError, match="config.json"):
        serve_main(["--model", str(tmp_path)])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="NAME=ADAPTER_DIR"):
        serve_main(["--model", str(tmp_path), "--lora", "nodir", "--python", "/usr/bin/env"])
    with pytest.raises(UserError, match="adapter_config.json"):
        serve_main(["--model", str(tmp_path), "--lora", f"r={tmp_path}", "--python", "/usr/bin/env"])
