"""Write Pair records as a finished stage output for dedup tests (tests.helpers.make_stage_dir trips
Beam's type-hint check on ``beam.Map(Outcome.kept)``: its ``**extra`` hint is read as the element type)."""

from __future__ import annotations

import apache_beam as beam

from pipelines.runner import run_stage
from schemas.records import Outcome, Pair


def write_pairs(output_dir: str, pairs: list[Pair], num_shards: int = 2) -> str:
    def build(p):
        return p | "Pairs" >> beam.Create(pairs) | "Keep" >> beam.Map(lambda pair: Outcome.kept(pair))

    run_stage(
        stage="filter",
        output_dir=output_dir,
        config={"test_fixture": True},
        input_info={"kind": "test", "fingerprint": "test"},
        build=build,
        beam_args=[],
        num_shards=num_shards,
        force=True,
    )
    return output_dir
