"""Packing samples into fixed-length sequences: streaming best fit within a bounded window (default, no
truncation; each pack = its oldest pending sample + the exact best-filling subset of the window) and the
MiniCPM-V paper's greedy packing with truncation (for comparison).

Pure Python on sample lengths, no Beam: the pack stage, the benchmark and the tests share it. The
result depends only on the input order and the config, so a caller that feeds samples in a fixed
order (the pack stage sorts each key-hash partition by key) gets the same packs on every run.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

ALGO_BEST_FIT = "best_fit"
ALGO_GREEDY_TRUNCATE = "greedy_truncate"
ALGORITHMS = (ALGO_BEST_FIT, ALGO_GREEDY_TRUNCATE)


class Item(NamedTuple):
    """One sample as the packer sees it.

    ``min_take``: the shortest prefix a truncation may keep (greedy_truncate only): 1 cuts anywhere
    (the paper); ``image span + 1`` never cuts inside an image's placeholder span.
    """

    length: int
    images: int = 0
    slices: int = 0
    min_take: int = 1


@dataclass(frozen=True)
class PackingConfig:
    """How samples are packed.

    Args:
        seq_len: tokens per sequence (pack).
        algorithm: ``best_fit`` (streaming best fit within a window, never truncates; samples longer
            than ``seq_len`` are rejected by the caller) or ``greedy_truncate`` (the paper: fill in input
            order, truncate the sample that does not fit; the cut never falls before ``Item.min_take``).
        window: pending samples the packer chooses from (its memory bound; raised to about 4 packs'
            worth of samples when samples are short). Smaller windows fill better here: a big pool lets
            early packs spend the short samples that later packs need (README.md, "Packed shards and
            the training-time reader", "The packer's window"). The oldest
            pending sample anchors each pack; then the subset of pending samples that fills the rest
            best (an exact bounded subset-sum over the window's length histogram); then anything that
            still fits within the pack limits.
        max_images_per_pack: image limit per pack (vision encoder memory); None: no limit.
        max_slices_per_pack: limit on vision-encoder passes (overviews + slices) per pack; None: no limit.

    Example:
        >>> cfg = PackingConfig(seq_len=8)
        >>> [[i for i, _ in p] for p in pack_items([Item(5), Item(3), Item(4), Item(4)], cfg)]
        [[0, 1], [2, 3]]
    """

    seq_len: int = 2048
    algorithm: str = ALGO_BEST_FIT
    window: int = 256
    max_images_per_pack: int | None = None
    max_slices_per_pack: int | None = None

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        for name in ("max_images_per_pack", "max_slices_per_pack"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None")

    def fits_alone(self, item: Item) -> str | None:
        """Why ``item`` can never be packed under this config (None: it can)."""
        if item.length > self.seq_len and (self.algorithm == ALGO_BEST_FIT or item.min_take > self.seq_len):
            return "too_long"
        if self.max_images_per_pack is not None and item.images > self.max_images_per_pack:
            return "too_many_images"
        if self.max_slices_per_pack is not None and item.slices > self.max_slices_per_pack:
            return "too_many_images"
        return None


# A pack: [(item index, tokens taken)], taken < length only for a truncated sample.
Pack = list[tuple[int, int]]


class _Bin:
    __slots__ = ("id", "remaining", "images", "slices", "items")

    def __init__(self, bid: int, seq_len: int):
        self.id = bid
        self.remaining = seq_len
        self.images = 0
        self.slices = 0
        self.items: Pack = []


def pack_items(items: Iterable[Item], config: PackingConfig) -> Iterator[Pack]:
    """Pack ``items`` (in input order, indices 0..n-1) into packs; yields each pack once closed.
    Items that ``config.fits_alone`` refuses must be filtered out by the caller."""
    if config.algorithm == ALGO_GREEDY_TRUNCATE:
        yield from _greedy_truncate(items, config)
    else:
        yield from _best_fit(items, config)


def _limits_ok(b: _Bin, it: Item, cfg: PackingConfig) -> bool:
    if cfg.max_images_per_pack is not None and b.images + it.images > cfg.max_images_per_pack:
        return False
    if cfg.max_slices_per_pack is not None and b.slices + it.slices > cfg.max_slices_per_pack:
        return False
    return True


class _Pool:
    """Pending samples indexed by length: a histogram (length -> FIFO of items) and its sorted keys."""

    def __init__(self):
        self.by_len: dict[int, deque] = {}
        self.lens: list[int] = []
        self.size = 0
        self.arrivals: deque = deque()  # (idx, length) in arrival order; popped entries skipped lazily
        self.taken: set[int] = set()

    def add(self, idx: int, it: Item) -> None:
        q = self.by_len.get(it.length)
        if q is None:
            q = self.by_len[it.length] = deque()
            bisect.insort(self.lens, it.length)
        q.append((idx, it))
        self.size += 1
        self.arrivals.append((idx, it.length))

    def pop_oldest(self) -> tuple[int, Item]:
        while True:
            idx, length = self.arrivals.popleft()
            if idx in self.taken:
                self.taken.discard(idx)
            else:
                return self.pop(length)

    def pop(self, length: int) -> tuple[int, Item]:
        q = self.by_len[length]
        x = q.popleft()
        if not q:
            del self.by_len[length]
            del self.lens[bisect.bisect_left(self.lens, length)]
        self.size -= 1
        self.taken.add(x[0])
        return x

    def unpop(self, idx: int, it: Item) -> None:
        """Undo ``pop`` (same fill step, so the item's arrival entry is still queued)."""
        q = self.by_len.get(it.length)
        if q is None:
            q = self.by_len[it.length] = deque()
            bisect.insort(self.lens, it.length)
        q.appendleft((idx, it))
        self.size += 1
        self.taken.discard(idx)

    def peek(self, length: int) -> tuple[int, Item]:
        return self.by_len[length][0]

    def largest_fitting(self, room: int, b: "_Bin", cfg: PackingConfig) -> int | None:
        pos = bisect.bisect_right(self.lens, room) - 1
        while pos >= 0:
            length = self.lens[pos]
            if _limits_ok(b, self.peek(length)[1], cfg):
                return length
            pos -= 1
        return None

    def best_subset(self, room: int) -> list[int]:
        """Lengths (with repeats) of pending samples whose sum fills ``room`` best: an exact bounded
        subset-sum over the length histogram, with Python ints as bitsets of reachable sums."""
        full = (1 << (room + 1)) - 1
        masks = [1]
        used: list[int] = []
        for length in reversed(self.lens):  # longest first: ties resolve towards fewer, longer samples
            if length > room:
                continue
            m = masks[-1]
            for _ in range(min(len(self.by_len[length]), room // length)):
                nm = (m | (m << length)) & full
                if nm == m:
                    break
                m = nm
            masks.append(m)
            used.append(length)
            if m >> room & 1:
                break
        total = masks[-1].bit_length() - 1
        out: list[int] = []
        for i in range(len(used), 0, -1):
            length, prev = used[i - 1], masks[i - 1]
            k = 0
            while not (prev >> (total - k * length)) & 1:
                k += 1
            out += [length] * k
            total -= k * length
        return out


def _add(b: _Bin, idx: int, it: Item) -> None:
    b.items.append((idx, it.length))
    b.remaining -= it.length
    b.images += it.images
    b.slices += it.slices


def _fill_one(pool: _Pool, cfg: PackingConfig, bid: int) -> Pack:
    b = _Bin(bid, cfg.seq_len)
    # 1. the oldest pending sample anchors the pack: no sample waits for more than ~window packs,
    #    and the pool keeps the stream's length mix (taking the longest first would leave only
    #    long samples for the end)
    idx, it = pool.pop_oldest()
    pool.taken.discard(idx)
    _add(b, idx, it)
    # 2. the subset of pending samples that fills the rest best, if it keeps the pack limits
    picked = [pool.pop(length) for length in pool.best_subset(b.remaining)] if pool.size else []
    images = b.images + sum(it.images for _, it in picked)
    slices = b.slices + sum(it.slices for _, it in picked)
    if (cfg.max_images_per_pack is None or images <= cfg.max_images_per_pack) and (
        cfg.max_slices_per_pack is None or slices <= cfg.max_slices_per_pack
    ):
        for idx, it in picked:
            _add(b, idx, it)
    else:
        for idx, it in reversed(picked):  # put back at the front of its FIFO, order kept
            pool.unpop(idx, it)
    # 3. whatever still fits within the limits, longest first
    while pool.size:
        length = pool.largest_fitting(b.remaining, b, cfg)
        if length is None:
            break
        _add(b, *pool.pop(length))
    return b.items


def _best_fit(items: Iterable[Item], cfg: PackingConfig) -> Iterator[Pack]:
    pool = _Pool()
    bid = 0
    seen = total = 0
    for idx, it in enumerate(items):
        pool.add(idx, it)
        seen, total = seen + 1, total + it.length
        # at least ~4 packs' worth of samples to choose from, however short the samples are
        window = max(cfg.window, 4 * cfg.seq_len * seen // total)
        while pool.size >= window:
            yield _fill_one(pool, cfg, bid)
            bid += 1
    while pool.size:
        yield _fill_one(pool, cfg, bid)
        bid += 1


def _greedy_truncate(items: Iterable[Item], cfg: PackingConfig) -> Iterator[Pack]:
    cur = _Bin(0, cfg.seq_len)
    for idx, it in enumerate(items):
        if cur.items and not _limits_ok(cur, it, cfg):
            yield cur.items
            cur = _Bin(0, cfg.seq_len)
        if it.length <= cur.remaining:
            cur.items.append((idx, it.length))
            cur.remaining -= it.length
            cur.images += it.images
            cur.slices += it.slices
            if cur.remaining == 0:
                yield cur.items
                cur = _Bin(0, cfg.seq_len)
            continue
        if cur.items and cur.remaining < it.min_take:  # cannot cut it here: start a new pack
            yield cur.items
            cur = _Bin(0, cfg.seq_len)
        take = min(it.length, cur.remaining)
        cur.items.append((idx, take))
        cur.remaining -= take
        cur.images += it.images
        cur.slices += it.slices
        if cur.remaining == 0:
            yield cur.items
            cur = _Bin(0, cfg.seq_len)
    if cur.items:
        yield cur.items


@dataclass
class FillStats:
    """Token fill of a packing: ``fill = tokens / (packs * seq_len)``."""

    packs: int = 0
    samples: int = 0
    tokens: int = 0
    truncated_tokens: int = 0
    seq_len: int = 0

    @property
    def fill(self) -> float:
        return self.tokens / (self.packs * self.seq_len) if self.packs else 0.0


def fill_stats(packs: Iterable[Pack], items: list[Item], seq_len: int) -> FillStats:
    s = FillStats(seq_len=seq_len)
    for p in packs:
        s.packs += 1
        for idx, take in p:
            s.samples += 1
            s.tokens += take
            s.truncated_tokens += items[idx].length - take
    return s
