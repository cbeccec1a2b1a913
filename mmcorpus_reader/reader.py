"""Iterate packed shards (Parquet or WebDataset tar) for training: sharding over ranks and DataLoader
workers, a shuffle buffer, and an exactly resumable state. No Beam; torch is optional."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from typing import Any, Iterator

import fsspec
import numpy as np

from schemas import packed as S

try:  # torch is optional: with it, PackDataset is an IterableDataset and yields tensors
    import torch
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - exercised in environments without torch
    torch = None
    _Base = object


def _open_index(source: str, storage_options: dict | None) -> tuple[Any, str, dict]:
    """(filesystem, directory of index.json, index) for an index.json path, a pack data dir or a
    pack stage output dir (local path or any fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    path = path.rstrip("/")
    for cand in (path, f"{path}/{S.INDEX_NAME}", f"{path}/{S.PACK_DIR}/{S.INDEX_NAME}"):
        if cand.endswith(S.INDEX_NAME) and fs.isfile(cand):
            with fs.open(cand, "rb") as f:
                return fs, cand.rsplit("/", 1)[0], json.loads(f.read().decode("utf-8"))
    raise FileNotFoundError(f"{source}: no {S.INDEX_NAME} here nor in {S.PACK_DIR}/ (is it a finished `mmcorpus pack` output?)")


def shuffle_order(ordinals: list[int], buffer: int, rng: random.Random) -> list[int]:
    """The order a shuffle buffer of ``buffer`` packs yields ``ordinals`` in (identity when 0)."""
    if buffer <= 1:
        return list(ordinals)
    buf: list[int] = []
    out: list[int] = []
    for o in ordinals:
        if len(buf) < buffer:
            buf.append(o)
            continue
        j = rng.randrange(buffer)
        out.append(buf[j])
        buf[j] = o
    rng.shuffle(buf)
    return out + buf


class PackDataset(_Base):
    """Packs of a ``mmcorpus pack`` output, one dict per pack, ready for transformers' packed path.

    Each consumer (rank x DataLoader worker) reads a contiguous, equal-sized (±1) slice of the
    epoch's pack sequence, so every pack is read exactly once per epoch with no gaps, and only the
    row groups / tar members of its slice are decoded. The epoch's shard order and the shuffle buffer
    are seeded by ``(seed, epoch, consumer)``: the yield order is a pure function of them, which is
    what makes ``load_state_dict`` resume exactly.

    Args:
        source: ``index.json``, the pack ``data/`` dir or the pack stage output dir; local or an
            fsspec URL (``gs://``, ``s3://``, ``memory://`` ...).
        rank, world_size: distributed position; default from ``torch.distributed`` when initialised,
            else the ``RANK`` / ``WORLD_SIZE`` environment, else 0 / 1.
        shuffle_buffer: packs held by the shuffle buffer (0: storage order).
        shuffle_shards: permute the shard order per epoch.
        seed, epoch: see ``set_epoch``.
        pad_to: pad every pack to this many tokens (a last padding segment with labels -100);
            None leaves packs at their own length (varlen attention needs no padding).
        decode_images: yield images as HxWx3 uint8 arrays instead of JPEG bytes.
        as_tensors: torch tensors (default when torch is importable) or numpy arrays.
        storage_options: passed to fsspec.

    Example:
        >>> ds = PackDataset("out/pack", shuffle_buffer=64, seed=1)  # doctest: +SKIP
        >>> batch = next(iter(ds)); model(**{k: batch[k] for k in MODEL_KEYS})  # doctest: +SKIP
    """

    def __init__(
        self,
        source: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        seed: int = 0,
        epoch: int = 0,
        pad_to: int | None = None,
        decode_images: bool = False,
        as_tensors: bool | None = None,
        storage_options: dict | None = None,
    ):
        super().__init__()
        self.source = source
        self.fs, self.root, self.index = _open_index(source, storage_options)
        self.format = self.index["pack_format"]
        self.seq_len = int(self.index["seq_len"])
        self.tokens = dict(self.index["tokens"])
        self.shards = list(self.index[S.INDEX_SHARDS])
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = shuffle_shards
        self.seed = int(seed)
        self.epoch = int(epoch)
        if pad_to is not None and pad_to < self.seq_len:
            raise ValueError(f"pad_to={pad_to} is shorter than the packs' seq_len {self.seq_len}")
        self.pad_to = pad_to
        self.decode_images = decode_images
        self.as_tensors = (torch is not None) if as_tensors is None else as_tensors
        if self.as_tensors and torch is None:
            raise ValueError("as_tensors=True needs torch (pip install torch)")
        self._yielded: dict[str, int] = {}

    # --- who am I ---------------------------------------------------------------------------------
    def _distributed(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def consumer(self) -> tuple[int, int]:
        """(this consumer's id, number of consumers) = (rank * workers + worker, world * workers)."""
        rank, world = self._distributed()
        worker, workers = 0, 1
        if torch is not None:
            info = torch.utils.data.get_worker_info()
            if info is not None:
                worker, workers = info.id, info.num_workers
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world_size {world}")
        return rank * workers + worker, world * workers

    def __len__(self) -> int:
        """Packs this consumer yields per epoch (the whole epoch when iterated by one process)."""
        c, n = self.consumer()
        total = sum(s["packs"] for s in self.shards)
        return total * (c + 1) // n - total * c // n

    @property
    def total_packs(self) -> int:
        return sum(s["packs"] for s in self.shards)

    # --- epoch order --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (call before each epoch, like DistributedSampler)."""
        self.epoch = int(epoch)
        self._yielded = {}

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)
        return order

    def plan(self, consumer: int, consumers: int) -> tuple[list[tuple[int, int, int]], list[int]]:
        """(segments, yield order) of one consumer: segments are (shard, first, end, ordinal of first) in storage
        order with global ordinals; the yield order lists those ordinals as they will be yielded."""
        total = self.total_packs
        start, end = total * consumer // consumers, total * (consumer + 1) // consumers
        segments, base = [], 0
        for sid in self._shard_order():
            n = self.shards[sid]["packs"]
            lo, hi = max(start, base), min(end, base + n)
            if lo < hi:
                segments.append((sid, lo - base, hi - base, lo))
            base += n
        rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{consumer}/{consumers}")
        return segments, shuffle_order(list(range(start, end)), self.shuffle_buffer, rng)

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where each consumer is in the current epoch. Exact when iterated in this process; with
        DataLoader workers call ``mark_consumed(pack)`` for every pack the training loop receives."""
        return {"epoch": self.epoch, "seed": self.seed, "yielded": dict(self._yielded), "total_packs": self.total_packs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("total_packs", self.total_packs) != self.total_packs or state.get("seed", self.seed) != self.seed:
            raise ValueError("state was saved for different shards or a different seed")
        self.epoch = int(state["epoch"])
        self._yielded = {str(k): int(v) for k, v in state["yielded"].items()}

    def mark_consumed(self, pack: dict[str, Any]) -> None:
        """Record that the training loop received ``pack`` (or a ``collate_packs`` batch of packs)."""
        cs, ns, ps = pack["consumer"], pack["consumers"], pack["position"]
        if not isinstance(cs, (list, tuple)):
            cs, ns, ps = [cs], [ns], [ps]
        for c, n, p in zip(cs, ns, ps):
            key = f"{int(c)}/{int(n)}"
            self._yielded[key] = max(self._yielded.get(key, 0), int(p) + 1)

    # --- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        c, n = self.consumer()
        key = f"{c}/{n}"
        segments, order = self.plan(c, n)
        skip = self._yielded.get(key, 0)
        todo = order[skip:]
        needed = set(todo)
        pending: dict[int, dict[str, Any]] = {}
        pos = 0
        for ordinal, raw in self._stream(segments, needed):
            pending[ordinal] = raw
            while pos < len(todo) and todo[pos] in pending:
                pack = self._finish(pending.pop(todo[pos]))
                pack.update(consumer=c, consumers=n, position=skip + pos, epoch=self.epoch)
                pos += 1
                self._yielded[key] = skip + pos
                yield pack

    def _stream(self, segments, needed: set[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        for sid, lo, hi, first in segments:
            path = f"{self.root}/{self.shards[sid]['path']}"
            wanted = {o - first + lo for o in needed if first <= o < first + hi - lo}
            if not wanted:
                continue
            reader = self._parquet if self.format == S.FORMAT_PARQUET else self._tar
            for local, raw in reader(path, sid, lo, hi, wanted):
                yield first + local - lo, raw

    def _parquet(self, path: str, sid: int, lo: int, hi: int, wanted: set[int]):
        import pyarrow.parquet as pq

        groups = self.shards[sid].get("row_groups") or []
        with self.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if not groups:
                groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            base = 0
            for rg, n in enumerate(groups):
                if any(base <= w < base + n for w in wanted):
                    yield from ((base + i, row) for i, row in enumerate(_rows_of(pf.read_row_group(rg))) if base + i in wanted)
                base += n

    def _tar(self, path: str, sid: int, lo: int, hi: int, wanted: set[int]):
        last = max(wanted)
        with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            local, cur_key, members = -1, None, {}
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = m.name.split(".", 1)
                if key != cur_key:
                    if cur_key is not None and local in wanted:
                        yield local, _wds_row(members)
                    local, cur_key, members = local + 1, key, {}
                    if local > last:
                        return
                if local in wanted:
                    members[ext] = tar.extractfile(m).read()
            if cur_key is not None and local in wanted:
                yield local, _wds_row(members)

    def _finish(self, row: dict[str, Any]) -> dict[str, Any]:
        ids = np.asarray(row[S.INPUT_IDS], dtype=np.int64)
        labels = np.asarray(row[S.LABELS], dtype=np.int64)
        pos = np.asarray(row[S.POSITION_IDS], dtype=np.int64)
        cu = np.asarray(row[S.CU_SEQLENS], dtype=np.int32)
        if self.pad_to is not None and len(ids) < self.pad_to:
            pad = self.pad_to - len(ids)
            ids = np.concatenate([ids, np.full(pad, self.tokens["pad"], np.int64)])
            labels = np.concatenate([labels, np.full(pad, S.IGNORE_INDEX, np.int64)])
            pos = np.concatenate([pos, np.arange(pad, dtype=np.int64)])
            cu = np.concatenate([cu, np.asarray([self.pad_to], np.int32)])
        max_len = int(np.diff(cu).max()) if len(cu) > 1 else 0
        offsets = np.asarray(row[S.IMAGE_OFFSET], np.int32)
        spans = np.stack([offsets, np.asarray(row[S.IMAGE_LENGTH], np.int32)], axis=1) if len(offsets) else np.zeros((0, 2), np.int32)
        grids = np.stack([np.asarray(row[S.IMAGE_GRID_COLS], np.int32), np.asarray(row[S.IMAGE_GRID_ROWS], np.int32)], axis=1) if len(offsets) else np.zeros((0, 2), np.int32)
        starts = np.flatnonzero(ids == self.tokens["im_start"]) + 1
        ends = np.flatnonzero(ids == self.tokens["im_end"])
        bound = np.stack([starts, ends], axis=1).astype(np.int64) if len(starts) else np.zeros((0, 2), np.int64)
        images = list(row[S.IMAGES])
        if self.decode_images:
            images = [_decode(b) for b in images]
        out = {
            "pack_id": row[S.PACK_ID],
            "sample_keys": list(row[S.SAMPLE_KEYS]),
            "num_tokens": int(row[S.NUM_TOKENS]),
            "input_ids": ids[None, :],
            "labels": labels[None, :],
            "position_ids": pos[None, :],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_len,
            "max_length_k": max_len,
            "images": images,
            "image_spans": spans,
            "image_grids": grids,
            "image_sample": np.asarray(row[S.IMAGE_SAMPLE], np.int32),
            "image_bound": bound,
        }
        if self.as_tensors:
            for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "image_spans", "image_grids", "image_sample", "image_bound"):
                out[k] = torch.from_numpy(np.array(out[k], copy=True))
            out["cu_seq_lens_k"] = out["cu_seq_lens_q"]
            if self.decode_images:
                out["images"] = [torch.from_numpy(a) for a in out["images"]]
        return out


def _rows_of(table) -> Iterator[dict[str, Any]]:
    """Rows of a pack table with the int lists as numpy slices (no per-element Python objects)."""
    n = table.num_rows
    cols: dict[str, Any] = {}
    for name in table.schema.names:
        col = table.column(name).combine_chunks()
        if name in S.PACK_ARRAY_FIELDS or name in S.PACK_IMAGE_FIELDS:
            cols[name] = (col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False))
        else:
            cols[name] = col.to_pylist()
    for i in range(n):
        row = {}
        for name, v in cols.items():
            if isinstance(v, tuple):
                off, vals = v
                row[name] = vals[off[i]:off[i + 1]]
            else:
                row[name] = v[i]
        yield row


def _wds_row(members: dict[str, bytes]) -> dict[str, Any]:
    row = json.loads(members[S.WDS_EXT_META].decode("utf-8"))
    for name, ext in S.WDS_ARRAY_EXTS.items():
        row[name] = np.load(io.BytesIO(members[ext]), allow_pickle=False)
    row[S.IMAGES] = [members[S.wds_image_ext(i)] for i in range(len(row[S.IMAGE_OFFSET]))]
    return row


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def render_pack_text(pack: dict[str, Any], tokenizer: str, max_text: int = 200) -> str:
    """A pack as text, one line per sample, runs of repeated special tokens collapsed (``<unk>×96``)."""
    from tokenizers import Tokenizer

    path = tokenizer if tokenizer.endswith(".json") else os.path.join(tokenizer, "tokenizer.json")
    tok = Tokenizer.from_file(path)
    ids = np.asarray(pack["input_ids"]).reshape(-1).tolist()
    cu = np.asarray(pack["cu_seq_lens_q"]).tolist()
    specials = set(int(v) for v in pack.get("special_ids", [])) or None
    lines = [f"pack {pack['pack_id']}: {len(pack['sample_keys'])} samples, {pack['num_tokens']} tokens"]
    for i, key in enumerate(pack["sample_keys"]):
        seg = ids[cu[i]:cu[i + 1]]
        parts: list[str] = []
        text: list[int] = []
        j = 0
        while j < len(seg):
            t = seg[j]
            name = tok.id_to_token(t)
            special = name is not None and name.startswith("<") and name.endswith(">") and (specials is None or t in specials)
            if not special:
                text.append(t)
                j += 1
                continue
            if text:
                parts.append(tok.decode(text).replace("\n", "\\n"))
                text = []
            k = j
            while k < len(seg) and seg[k] == t:
                k += 1
            parts.append(name if k - j == 1 else f"{name}×{k - j}")
            j = k
        if text:
            parts.append(tok.decode(text).replace("\n", "\\n"))
        body = "".join(parts)
        lines.append(f"  [{i}] {key} ({len(seg)} tokens): {body[:max_text]}{'…' if len(body) > max_text else ''}")
    return "\n".join(lines)


def collate_packs(packs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several packs as one flattened (1, total) batch, like transformers' ``DataCollatorWithFlattening``:
    ``DataLoader(ds, batch_size=4, collate_fn=collate_packs)``. Spans and bounds are shifted to the
    concatenated positions; cu_seq_lens run over all samples of all packs."""
    if not packs:
        raise ValueError("collate_packs needs at least one pack")
    is_torch = torch is not None and isinstance(packs[0]["input_ids"], torch.Tensor)
    cat = (lambda xs, dim: torch.cat(xs, dim)) if is_torch else (lambda xs, dim: np.concatenate(xs, dim))
    offsets, total = [], 0
    for p in packs:
        offsets.append(total)
        total += int(p["input_ids"].shape[1])
    out: dict[str, Any] = {k: cat([p[k] for p in packs], 1) for k in ("input_ids", "labels", "position_ids")}
    cu = [packs[0]["cu_seq_lens_q"][:1]] + [p["cu_seq_lens_q"][1:] + off for p, off in zip(packs, offsets)]
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cat(cu, 0)
    out["max_length_q"] = out["max_length_k"] = max(int(p["max_length_q"]) for p in packs)
    def shift_offsets(spans, off):
        spans = spans.clone() if is_torch else spans.copy()
        spans[:, 0] += off
        return spans

    out["image_spans"] = cat([shift_offsets(p["image_spans"], off) for p, off in zip(packs, offsets)], 0)
    out["image_bound"] = cat([p["image_bound"] + off for p, off in zip(packs, offsets)], 0)
    out["image_grids"] = cat([p["image_grids"] for p in packs], 0)
    sample_base = np.cumsum([0] + [len(p["sample_keys"]) for p in packs[:-1]])
    out["image_sample"] = cat([p["image_sample"] + int(b) for p, b in zip(packs, sample_base)], 0)
    out["images"] = [img for p in packs for img in p["images"]]
    out["sample_keys"] = [k for p in packs for k in p["sample_keys"]]
    out["pack_id"] = [p["pack_id"] for p in packs]
    out["num_tokens"] = sum(int(p["num_tokens"]) for p in packs)
    for k in ("consumer", "consumers", "position", "epoch"):
        if k in packs[0]:
            out[k] = [p[k] for p in packs]
    return out
