"""Write Pair records as a finished stage output for dedup tests."""

from __future__ import annotations

from helpers import make_stage_dir
from schemas.records import Pair


def write_pairs(output_dir: str, pairs: list[Pair], num_shards: int = 2) -> str:
    return make_stage_dir(output_dir, pairs, stage="filter", num_shards=num_shards)
