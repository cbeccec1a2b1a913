"""SFT part 1 / part 2 split: a documented rule on measured lengths, turn counts and declared categories."""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas import sft as S
from schemas.records import ERROR, Outcome, Pair


@dataclass(frozen=True)
class SftSplitConfig:
    """Which conversations go to part 2 (long responses, complex interactions); the rest are part 1.

    The rule, in order (MiniCPM-V paper, section 4.2: part 1 = classic QA and caption sets with short
    responses; part 2 = long responses and complex interactions, text-only or multimodal):
      1. a declared category in ``part1_categories`` ⇒ part 1; in ``part2_categories`` ⇒ part 2;
      2. ``mean assistant tokens per turn >= min_part2_tokens_per_turn`` ⇒ part 2;
      3. ``turns >= min_part2_turns`` ⇒ part 2;
      4. text-only and ``text_only_part2`` ⇒ part 2;
      5. otherwise part 1.

    Args:
        min_part2_tokens_per_turn: tokens of the split tokenizer; None: rule 2 off.
        min_part2_turns: user/assistant turn pairs; None: rule 3 off.
        text_only_part2: rule 4 on/off.
        part1_categories, part2_categories: declared categories (LLaVA-Bench: conv / detail, complex).

    Example:
        >>> SftSplitConfig().part_of(tokens_per_turn=[12], category=None, has_image=True)
        1
    """

    min_part2_tokens_per_turn: int | None = 64
    min_part2_turns: int | None = 4
    text_only_part2: bool = True
    part1_categories: tuple[str, ...] = ("conv", "short", "caption", "vqa")
    part2_categories: tuple[str, ...] = ("detail", "complex", "long", "reasoning")

    def __post_init__(self):
        both = set(self.part1_categories) & set(self.part2_categories)
        if both:
            raise ValueError(f"categories in both parts: {sorted(both)}")
        for name in ("min_part2_tokens_per_turn", "min_part2_turns"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None")

    def part_of(self, tokens_per_turn: list[int], category: str | None, has_image: bool) -> int:
        if category in self.part1_categories:
            return S.PART_1
        if category in self.part2_categories:
            return S.PART_2
        if self.min_part2_tokens_per_turn is not None and tokens_per_turn:
            if sum(tokens_per_turn) / len(tokens_per_turn) >= self.min_part2_tokens_per_turn:
                return S.PART_2
        if self.min_part2_turns is not None and len(tokens_per_turn) >= self.min_part2_turns:
            return S.PART_2
        if self.text_only_part2 and not has_image:
            return S.PART_2
        return S.PART_1


class AssignPartFn(beam.DoFn):
    """Pair (an ``sft ingest`` record) -> Outcome kept with ``part`` and ``assistant_tokens`` set.

    Args:
        tokenizer_files: ``TextTokenizer.files_of`` of the tokenizer that measures answer lengths.
        cfg: the split rule.
    """

    def __init__(self, tokenizer_files: dict[str, bytes], cfg: SftSplitConfig):
        self.tokenizer_files = tokenizer_files
        self.cfg = cfg

    def setup(self):
        import tempfile

        from transforms.tokens import TextTokenizer

        self._tmp = tempfile.TemporaryDirectory(prefix="mmcorpus-tok-")
        self.tok = TextTokenizer.from_files(self.tokenizer_files, self._tmp.name)
        self.counters = {n: Metrics.counter("mmcorpus.sft_split", n) for n in ("total", "kept", "part1", "part2")}

    def teardown(self):
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()

    def process(self, pair: Pair):
        self.counters["total"].inc()
        try:
            s = S.SftSample.from_pair(pair)
            s.assistant_tokens = [len(ids) for ids in self.tok.encode_batch([a for _, a in s.turns])]
            s.part = self.cfg.part_of(s.assistant_tokens, s.category, s.image is not None)
            out = Outcome.kept(s.to_pair())
            self.counters["kept"].inc()
            self.counters[f"part{s.part}"].inc()
        except Exception as e:  # dead letter: unexpected, the record stays in the ledger
            Metrics.counter("mmcorpus.sft_split", f"errors_{type(e).__name__}").inc()
            out = Outcome.dropped(pair, ERROR, reasons.exception_reason(e))
        yield out


class SummarizeSplit(beam.CombineFn):
    """Combine kept split outcomes into ``split_report`` without holding the records (images dropped)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, outcome: Outcome):
        if outcome.pair is None:
            return acc
        s = S.SftSample.from_pair(outcome.pair)
        d = acc.setdefault(s.dataset, {})
        part = d.setdefault(f"part{s.part}", {"samples": 0, "turns": 0, "assistant_tokens": 0, "text_only": 0})
        part["samples"] += 1
        part["turns"] += len(s.turns)
        part["assistant_tokens"] += sum(s.assistant_tokens)
        part["text_only"] += s.image is None
        return acc

    def merge_accumulators(self, accs):
        out: dict = {}
        for acc in accs:
            for ds, parts in acc.items():
                for name, c in parts.items():
                    t = out.setdefault(ds, {}).setdefault(name, {k: 0 for k in c})
                    for k, v in c.items():
                        t[k] += v
        return out

    def extract_output(self, acc):
        return {k: dict(sorted(v.items())) for k, v in sorted(acc.items())}
