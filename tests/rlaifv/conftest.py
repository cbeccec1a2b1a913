"""RLAIF-V fixtures: the bundled photos as a finished stage output."""

from __future__ import annotations

import pytest

from .responder import photo_pairs


@pytest.fixture
def photos_stage(tmp_path):
    import helpers

    return helpers.make_stage_dir(str(tmp_path / "photos"), photo_pairs(), stage="dedup", num_shards=2)
