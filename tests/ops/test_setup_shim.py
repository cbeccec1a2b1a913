"""`--setup_file ./setup.py`: Beam's own stager builds an sdist that carries every package workers import."""

from __future__ import annotations

import tarfile

from apache_beam.runners.portability.stager import Stager

from conftest import REPO


def test_beam_stager_builds_an_sdist_with_the_pipeline_code(tmp_path):
    sdist = Stager._build_setup_package(str(REPO / "setup.py"), str(tmp_path))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for module in ("pipelines/filter.py", "pipelines/dedup.py", "pipelines/rewrite.py", "pipelines/pack.py",
                   "transforms/stage_io.py", "schemas/records.py", "rewriter/__init__.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "dags/", "data/")) for n in names)
