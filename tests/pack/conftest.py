"""Pack outputs shared by the pack tests: each Beam run happens once per session."""

from __future__ import annotations

import pytest

from pack.fixtures import make_input_dir, sample_pairs


@pytest.fixture(scope="session")
def pack_input(tmp_path_factory):
    return make_input_dir(str(tmp_path_factory.mktemp("pack_in") / "rewrite"), sample_pairs())


def run_pack(input_dir: str, output_dir: str, *flags: str) -> str:
    from pipelines import pack

    assert pack.main(["--input", input_dir, "--output", output_dir, *flags]) == 0
    return output_dir


STAGE3 = ("--stage", "3", "--seq-len", "2048", "--partitions", "2", "--max-packs-per-shard", "2")
STAGE1 = ("--stage", "1", "--seq-len", "256", "--partitions", "2", "--max-packs-per-shard", "3", "--row-group-packs", "2")


@pytest.fixture(scope="session")
def stage3_parquet(pack_input, tmp_path_factory):
    return run_pack(pack_input, str(tmp_path_factory.mktemp("s3pq") / "pack"), *STAGE3, "--format", "parquet")


@pytest.fixture(scope="session")
def stage3_wds(pack_input, tmp_path_factory):
    return run_pack(pack_input, str(tmp_path_factory.mktemp("s3wds") / "pack"), *STAGE3, "--format", "webdataset")


@pytest.fixture(scope="session")
def stage1_parquet(pack_input, tmp_path_factory):
    return run_pack(pack_input, str(tmp_path_factory.mktemp("s1pq") / "pack"), *STAGE1, "--format", "parquet")


@pytest.fixture(scope="session")
def stage1_wds(pack_input, tmp_path_factory):
    return run_pack(pack_input, str(tmp_path_factory.mktemp("s1wds") / "pack"), *STAGE1, "--format", "webdataset")
