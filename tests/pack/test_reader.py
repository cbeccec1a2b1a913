"""The training-time reader: exact resumption, rank x worker sharding, fsspec URLs, no cross-contamination."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import torch  # the finetune extra, which make test installs (the reader itself runs without it)

from mmcorpus_reader import PackDataset, shuffle_order
from schemas import packed as S


def _ids(packs):
    return [p["pack_id"] for p in packs]


def test_reader_sees_every_pack_once_in_storage_order(stage1_parquet, stage1_wds):
    pq_packs = list(PackDataset(stage1_parquet, as_tensors=False))
    index = json.loads(pathlib.Path(stage1_parquet, "data", "index.json").read_text())
    assert len(pq_packs) == index["totals"]["packs"] > 8
    assert len(index["shards"]) > 4
    wds_packs = list(PackDataset(stage1_wds, as_tensors=False))
    assert _ids(pq_packs) == _ids(wds_packs)
    for a, b in zip(pq_packs, wds_packs):
        for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "image_spans", "image_bound"):
            assert np.array_equal(a[k], b[k]), k
        assert a["images"] == b["images"]


def test_yielded_fields_match_transformers_packed_path(stage1_parquet):
    p = next(iter(PackDataset(stage1_parquet, pad_to=300)))
    assert p["input_ids"].shape == p["labels"].shape == p["position_ids"].shape == (1, 300)
    assert p["input_ids"].dtype == torch.int64 and p["cu_seq_lens_q"].dtype == torch.int32
    cu = p["cu_seq_lens_q"].tolist()
    assert cu[-1] == 300 and cu[-2] == p["num_tokens"]  # padding is its own last segment
    assert p["max_length_q"] == p["max_length_k"] == max(b - a for a, b in zip(cu, cu[1:]))
    assert (p["labels"][0, p["num_tokens"]:] == S.IGNORE_INDEX).all()
    for (a, n), (s, e) in zip(p["image_spans"].tolist(), p["image_bound"].tolist()):
        assert (s, e) == (a + 1, a + 1 + 96)  # stage 1: one overview of q=96 query tokens


def test_resume_single_process_is_exact(stage1_parquet):
    kw = dict(shuffle_buffer=4, shuffle_shards=True, seed=7, epoch=2, as_tensors=False)
    straight = _ids(PackDataset(stage1_parquet, **kw))
    for k in (0, 1, 5, len(straight) - 1, len(straight)):
        ds = PackDataset(stage1_parquet, **kw)
        it = iter(ds)
        head = [next(it)["pack_id"] for _ in range(k)]
        state = json.loads(json.dumps(ds.state_dict()))  # survives a checkpoint file
        ds2 = PackDataset(stage1_parquet, **kw)
        ds2.load_state_dict(state)
        assert head + _ids(ds2) == straight, k
    assert sorted(straight) == sorted(_ids(PackDataset(stage1_parquet, as_tensors=False)))
    assert straight != _ids(PackDataset(stage1_parquet, as_tensors=False))  # it did shuffle
    other_epoch = _ids(PackDataset(stage1_parquet, **dict(kw, epoch=3)))
    assert other_epoch != straight and sorted(other_epoch) == sorted(straight)


def test_two_ranks_two_workers_see_every_pack_exactly_once(stage1_wds):
    from torch.utils.data import DataLoader

    total = PackDataset(stage1_wds).total_packs
    seen, per_rank = [], []
    for rank in (0, 1):
        ds = PackDataset(stage1_wds, rank=rank, world_size=2, shuffle_buffer=3, seed=1)
        got = [p["pack_id"] for p in DataLoader(ds, batch_size=None, num_workers=2)]
        per_rank.append(len(got))
        seen += got
    assert sorted(seen) == sorted(_ids(PackDataset(stage1_wds))) and len(seen) == total
    assert len(set(seen)) == total
    assert max(per_rank) - min(per_rank) <= 1


def test_dataloader_workers_resume_from_marked_state(stage1_parquet):
    from torch.utils.data import DataLoader

    kw = dict(shuffle_buffer=3, seed=5)
    straight: dict = {}
    for p in DataLoader(PackDataset(stage1_parquet, **kw), batch_size=None, num_workers=2):
        straight.setdefault(int(p["consumer"]), []).append(p["pack_id"])
    ds = PackDataset(stage1_parquet, **kw)
    first: dict = {}
    for i, p in enumerate(DataLoader(ds, batch_size=None, num_workers=2)):
        if i == 5:
            break
        ds.mark_consumed(p)
        first.setdefault(int(p["consumer"]), []).append(p["pack_id"])
    ds2 = PackDataset(stage1_parquet, **kw)
    ds2.load_state_dict(ds.state_dict())
    rest: dict = {}
    for p in DataLoader(ds2, batch_size=None, num_workers=2):
        rest.setdefault(int(p["consumer"]), []).append(p["pack_id"])
    for c in straight:
        assert first.get(c, []) + rest.get(c, []) == straight[c]


def test_fsspec_url(stage1_parquet):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in pathlib.Path(stage1_parquet, "data").iterdir():
        fs.pipe(f"memory://packs/{p.name}", p.read_bytes())
    assert _ids(PackDataset("memory://packs")) == _ids(PackDataset(stage1_parquet))


def test_reader_imports_no_beam():
    code = "import sys, mmcorpus_reader; assert not any(m.startswith('apache_beam') for m in sys.modules), 'beam'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[2])


def test_shuffle_order_is_a_permutation():
    import random

    out = shuffle_order(list(range(100)), 10, random.Random(0))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert shuffle_order([3, 1, 2], 0, random.Random(0)) == [3, 1, 2]


def _block_mask(cu: list[int]) -> np.ndarray:
    n = cu[-1]
    m = np.zeros((n, n), bool)
    for a, b in zip(cu, cu[1:]):
        m[a:b, a:b] = np.tril(np.ones((b - a, b - a), bool))
    return m


def test_block_diagonal_mask_from_cu_seqlens_keeps_tokens_in_their_sample(stage1_parquet):
    for p in PackDataset(stage1_parquet, as_tensors=False):
        cu = p["cu_seq_lens_q"].tolist()
        seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
        m = _block_mask(cu)
        q, k = np.nonzero(m)
        assert (seg[q] == seg[k]).all()  # nothing attends across samples
        assert m.sum() == sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu, cu[1:]))  # all in-sample causal pairs
        # the same segments transformers derives from position ids (a restart where the diff != 1)
        pos = p["position_ids"][0]
        assert (np.cumsum(np.diff(pos, prepend=pos[0] - 1) != 1) == seg).all()


def test_transformers_masking_on_our_position_ids_isolates_samples(stage1_parquet):
    import transformers  # the finetune extra (make test installs it)
    from transforms.tokens import TextTokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    pack = next(p for p in PackDataset(stage1_parquet) if len(p["sample_keys"]) >= 3)
    cu = pack["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        packed = model(input_ids=pack["input_ids"], position_ids=pack["position_ids"], use_cache=False).logits[0]
        naive = model(input_ids=pack["input_ids"], use_cache=False).logits[0]  # no restart: the control
        for a, b in zip(cu, cu[1:]):
            alone = model(input_ids=pack["input_ids"][:, a:b], use_cache=False).logits[0]
            assert torch.allclose(packed[a:b], alone, atol=1e-5)
        later = slice(cu[1], cu[2])
        assert not torch.allclose(naive[later], model(input_ids=pack["input_ids"][:, later], use_cache=False).logits[0], atol=1e-3)
    assert TextTokenizer().special_ids()["im_start"] in pack["input_ids"][0].tolist()


def test_sliced_images_bounds_and_decoding(stage3_parquet):
    for p in PackDataset(stage3_parquet, decode_images=True, as_tensors=False):
        grids = p["image_grids"].tolist()
        assert len(p["image_bound"]) == sum(1 + c * r for c, r in grids)
        assert all(e - s == 96 for s, e in p["image_bound"].tolist())
        for img, (off, n) in zip(p["images"], p["image_spans"].tolist()):
            assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
            inside = [(s, e) for s, e in p["image_bound"].tolist() if off < s and e < off + n]
            assert inside  # every query run sits inside an image span


def test_collate_packs_flattens_a_batch_of_packs(stage3_parquet, stage1_parquet):
    from torch.utils.data import DataLoader

    from mmcorpus_reader import collate_packs

    packs = list(PackDataset(stage3_parquet))[:3]
    b = collate_packs(packs)
    total = sum(p["num_tokens"] for p in packs)
    assert b["input_ids"].shape == (1, total) and b["num_tokens"] == total
    cu = b["cu_seq_lens_q"].tolist()
    assert cu[-1] == total and len(cu) - 1 == len(b["sample_keys"]) == sum(len(p["sample_keys"]) for p in packs)
    pos = b["position_ids"][0].tolist()
    assert pos == [i for a, e in zip(cu, cu[1:]) for i in range(e - a)]
    ids = b["input_ids"][0].tolist()
    im_start = PackDataset(stage3_parquet).tokens["im_start"]
    assert all(ids[o] == im_start for o, _ in b["image_spans"].tolist())
    assert all(ids[s - 1] == im_start for s, _ in b["image_bound"].tolist())
    assert len(b["images"]) == len(b["image_spans"]) == len(b["image_sample"])
    # a DataLoader batch of 2 packs per step, resumable through mark_consumed
    ds = PackDataset(stage1_parquet, as_tensors=True)
    seen = []
    for batch in DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate_packs):
        ds.mark_consumed(batch)
        seen += batch["pack_id"]
    assert seen == _ids(PackDataset(stage1_parquet)) and ds.state_dict()["yielded"] == {"0/1": len(seen)}
