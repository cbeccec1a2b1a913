"""Pack shards are streamed: the same bytes as encoding the whole shard at once, and the encoder's own
peak memory stays flat when the shard grows (one row group of rendered packs at a time)."""

from __future__ import annotations

import hashlib
import random
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import packed as S
from transforms.shards import PreparedSample, ShardConfig, parquet_shard_bytes, render_pack, tar_shard_bytes, write_one_shard


def _rows(packs: int, image_bytes: int = 40_000):
    for n in range(packs):
        rng = random.Random(n)
        members = []
        for j in range(3):
            ids = [rng.randrange(1000, 30000) for _ in range(50)]
            s = PreparedSample(key=f"k{n:05d}{j}", source=f"s#{n}", input_ids=ids, labels=list(ids),
                               image=rng.randbytes(image_bytes), width=448, height=448, grid=(1, 1), image_length=98, slices=1)
            members.append((s, len(ids)))
        yield render_pack(S.pack_id(0, n), 256, members)


@pytest.mark.parametrize("fmt", [S.FORMAT_PARQUET, S.FORMAT_WEBDATASET])
def test_streamed_shard_equals_the_whole_shard_encoding(tmp_path, fmt):
    cfg = ShardConfig(format=fmt, row_group_packs=4)
    info = write_one_shard(_rows(10), str(tmp_path), 3, 0, 3, cfg)
    raw = (tmp_path / info.path).read_bytes()
    whole = parquet_shard_bytes(list(_rows(10)), 4) if fmt == S.FORMAT_PARQUET else tar_shard_bytes(list(_rows(10)))
    assert raw == whole
    assert (info.bytes, info.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert (info.packs, info.samples, info.images, info.tokens) == (10, 30, 30, 1500)
    if fmt == S.FORMAT_PARQUET:
        assert info.row_groups == [4, 4, 2]
        meta = pq.ParquetFile(tmp_path / info.path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    else:
        with tarfile.open(tmp_path / info.path) as tar:
            assert sum(1 for n in tar.getnames() if n.endswith(".json")) == 10
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [info.path.split("/")[1]]  # no temp file left


@pytest.mark.parametrize("fmt", [S.FORMAT_PARQUET, S.FORMAT_WEBDATASET])
def test_encoder_peak_is_flat_in_the_shard_size(tmp_path, fmt):
    peaks = {}
    for packs in (40, 160):  # 4.8 MB and 19 MB of images
        base = pa.total_allocated_bytes()
        tracemalloc.start()
        write_one_shard(_rows(packs), str(tmp_path / str(packs)), 0, 0, 0, ShardConfig(format=fmt, row_group_packs=8))
        peaks[packs] = tracemalloc.get_traced_memory()[1] + max(0, pa.total_allocated_bytes() - base)
        tracemalloc.stop()
    assert peaks[160] < 1.3 * peaks[40], peaks
    assert peaks[160] < 160 * 3 * 40_000 / 4, peaks  # far below the shard (the old encoder held ~2-3x it)
