"""Helpers of the rewriter chain tests."""

from __future__ import annotations

import os

# A key that must never show up in any output, log or file (the tests grep for it).
SENTINEL_KEY = "sk-mmcorpus-SENTINEL-7f3a9c1e5b"


def files_containing(root: str, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


def make_stage_dir(output_dir: str, pairs, stage: str = "filter", num_shards: int = 2) -> str:
    """Write Pair records as a finished stage output (all kept). Same as ``tests.helpers.make_stage_dir``
    but wraps ``Outcome.kept`` in a lambda: Beam 2.77's type-hint check rejects its ``**extra: str``."""
    import apache_beam as beam

    from pipelines.runner import run_stage
    from schemas.records import Outcome

    def build(p):
        return p | "Pairs" >> beam.Create(pairs) | "Keep" >> beam.Map(lambda pair: Outcome.kept(pair))

    run_stage(
        stage=stage, output_dir=output_dir, config={"test_fixture": True},
        input_info={"kind": "test", "fingerprint": "test"}, build=build, beam_args=[], num_shards=num_shards,
        force=True,
    )
    return output_dir
