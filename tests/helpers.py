"""Test helpers: build small stage outputs from records without running earlier stages."""

from __future__ import annotations

import apache_beam as beam

from pipelines.runner import run_stage
from schemas.records import Outcome, Pair


def make_stage_dir(output_dir: str, pairs: list[Pair], stage: str = "filter", num_shards: int = 2) -> str:
    """Write ``pairs`` as a finished stage output (all kept) and return the directory."""

    def build(p):
        return p | "Pairs" >> beam.Create(pairs) | "Keep" >> beam.Map(lambda pair: Outcome.kept(pair))

    run_stage(
        stage=stage,
        output_dir=output_dir,
        config={"test_fixture": True},
        input_info={"kind": "test", "fingerprint": "test"},
        build=build,
        beam_args=[],
        num_shards=num_shards,
        force=True,
    )
    return output_dir
