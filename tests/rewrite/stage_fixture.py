"""Write Pair records as a finished stage output for rewrite tests (a dedup output by default)."""

from __future__ import annotations

import helpers
from schemas.records import Pair


def make_stage_dir(output_dir: str, pairs: list[Pair], stage: str = "dedup", num_shards: int = 2) -> str:
    return helpers.make_stage_dir(output_dir, pairs, stage=stage, num_shards=num_shards)
