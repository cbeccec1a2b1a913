"""The packer on lengths: every sample exactly once, limits kept, fill, truncation rules, determinism."""

from __future__ import annotations

import pathlib
import random

import pytest

from transforms.packing import ALGO_GREEDY_TRUNCATE, Item, PackingConfig, fill_stats, pack_items
from transforms.tokens import TextTokenizer, read_sample_captions

SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def caption_lengths():
    tok = TextTokenizer()
    return [len(ids) + 1 for ids in tok.encode_batch(read_sample_captions(SAMPLE))]


def _check_exactly_once(packs, items, seq_len):
    seen = sorted(i for p in packs for i, _ in p)
    assert seen == list(range(len(items)))
    for p in packs:
        assert 0 < sum(t for _, t in p) <= seq_len


def test_best_fit_packs_real_captions_stage1_at_99_5_percent(caption_lengths):
    items = [Item(n + 98, 1, 1) for n in caption_lengths]  # stage 1: one 98-token overview per image
    cfg = PackingConfig(seq_len=2048)
    packs = list(pack_items(items, cfg))
    _check_exactly_once(packs, items, 2048)
    st = fill_stats(packs, items, 2048)
    assert st.truncated_tokens == 0
    assert st.fill >= 0.995
    assert packs == list(pack_items(items, cfg))  # deterministic


def test_limits_are_kept():
    rng = random.Random(3)
    items = [Item(rng.randint(20, 300), 1, rng.choice([1, 3, 10])) for _ in range(500)]
    cfg = PackingConfig(seq_len=1024, max_images_per_pack=4, max_slices_per_pack=12, window=64)
    packs = list(pack_items(items, cfg))
    _check_exactly_once(packs, items, 1024)
    for p in packs:
        assert sum(items[i].images for i, _ in p) <= 4
        assert sum(items[i].slices for i, _ in p) <= 12


def test_fits_alone():
    cfg = PackingConfig(seq_len=100, max_slices_per_pack=5)
    assert cfg.fits_alone(Item(101)) == "too_long"
    assert cfg.fits_alone(Item(100, 1, 6)) == "too_many_images"
    assert cfg.fits_alone(Item(100, 1, 5)) is None
    greedy = PackingConfig(seq_len=100, algorithm=ALGO_GREEDY_TRUNCATE)
    assert greedy.fits_alone(Item(150, 1, 1, min_take=51)) is None  # truncatable after its image
    assert greedy.fits_alone(Item(150, 1, 1, min_take=101)) == "too_long"


def test_greedy_truncate_is_the_papers_packing():
    items = [Item(60), Item(60), Item(30), Item(90)]
    packs = list(pack_items(items, PackingConfig(seq_len=100, algorithm=ALGO_GREEDY_TRUNCATE)))
    assert packs == [[(0, 60), (1, 40)], [(2, 30), (3, 70)]]
    assert fill_stats(packs, items, 100).truncated_tokens == 20 + 20


def test_greedy_truncate_never_cuts_before_min_take():
    items = [Item(70), Item(60, 1, 1, min_take=41)]  # 30 tokens of room, but the image span needs 40 + 1
    packs = list(pack_items(items, PackingConfig(seq_len=100, algorithm=ALGO_GREEDY_TRUNCATE)))
    assert packs == [[(0, 70)], [(1, 60)]]


def test_bad_configs_raise():
    with pytest.raises(ValueError):
        PackingConfig(seq_len=1)
    with pytest.raises(ValueError):
        PackingConfig(algorithm="first_fit")
    with pytest.raises(ValueError):
        PackingConfig(max_images_per_pack=0)


def test_shards_roll_by_count_and_by_bytes(tmp_path):
    import pyarrow.parquet as pq

    from schemas import packed as S
    from transforms.shards import PreparedSample, ShardConfig, render_pack, write_shards

    samples = [PreparedSample(f"k{i}", "", [5] * 10, [5] * 10, image=b"\xff" * 1000 if i % 2 else None,
                              width=1, height=1, image_length=0, slices=1 if i % 2 else 0) for i in range(12)]
    rows = [render_pack(S.pack_id(0, n), 32, [(samples[2 * n], 10), (samples[2 * n + 1], 10)]) for n in range(6)]
    by_count = list(write_shards(iter(rows), str(tmp_path / "a"), 0, ShardConfig(max_packs_per_shard=4)))
    assert [i.packs for i in by_count] == [4, 2]
    by_bytes = list(write_shards(iter(rows), str(tmp_path / "b"), 0, ShardConfig(max_shard_bytes=2500)))
    assert [i.packs for i in by_bytes] == [2, 2, 2]  # ~1.4 kB per pack: roll once a shard passes 2.5 kB
    assert [i.path for i in by_bytes] == [f"data/packs-{i:05d}.parquet" for i in range(3)]
    assert [r for i in by_bytes for r in pq.read_table(tmp_path / "b" / i.path).column(S.PACK_ID).to_pylist()] == [
        r[S.PACK_ID] for r in rows]
    assert not list((tmp_path / "b" / "data").glob(".tmp-*"))  # atomic writes leave no temp files
