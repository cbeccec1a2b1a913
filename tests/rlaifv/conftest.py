"""RLAIF-V fixtures: the bundled photos as a finished stage output; the tiny model and vLLM interpreter
of the rewriter chain tests."""

from __future__ import annotations

import pytest

from rewriter_chain.conftest import cc3m_captions, tiny_model, vllm_python  # noqa: F401 (shared fixtures)

from .responder import photo_pairs


@pytest.fixture
def photos_stage(tmp_path):
    import helpers

    return helpers.make_stage_dir(str(tmp_path / "photos"), photo_pairs(), stage="dedup", num_shards=2)
