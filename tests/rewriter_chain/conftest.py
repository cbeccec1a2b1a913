"""Fixtures of the rewriter chain tests: real captions, a tiny model built locally, the vLLM interpreter."""

from __future__ import annotations

import os

import pytest

from rewriter.tiny import read_texts

@pytest.fixture(scope="session")
def cc3m_captions(sample_dir) -> list[str]:
    return read_texts(str(sample_dir / "cc3m_val_captions_8k.tsv"), 3000)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, cc3m_captions) -> str:
    """A tiny random Llama + byte-level BPE tokenizer with chat template (about 5 s)."""
    from rewriter.tiny import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), cc3m_captions[:2000])


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of the vLLM venv. The vllm tests must run in CI: no skip when it is missing."""
    python = os.environ.get("MMCORPUS_VLLM_PYTHON")
    if not python:
        pytest.fail(
            "MMCORPUS_VLLM_PYTHON is not set: run `make vllm-env` and set "
            "MMCORPUS_VLLM_PYTHON=$PWD/.venv-vllm/bin/python (`make test` does both)",
            pytrace=False,
        )
    if not os.path.exists(python):
        pytest.fail(f"MMCORPUS_VLLM_PYTHON={python} does not exist: run `make vllm-env`", pytrace=False)
    return python
