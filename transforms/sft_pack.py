"""SFT pack: an ``sft split`` record -> chat-templated tokens with assistant-only labels, ready for the
shared packer (``transforms.shards.PackSamples``)."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import reasons
from schemas import sft as S
from schemas.records import Pair
from transforms.packing import PackingConfig
from transforms.shards import PreparedSample, PrepareSampleFn
from transforms.tokens import StageProfile, prepare_image


@dataclass(frozen=True)
class SftPackConfig:
    """SFT-specific packing choices.

    Args:
        part: pack only part 1 or part 2 (None: both).
        truncate_turns: a conversation longer than ``seq_len`` is cut after its last whole turn
            that fits (ledger detail says how many turns were cut) instead of ``sft_too_long``.
        check_mask: also compute transformers' ``return_assistant_tokens_mask`` for every record and
            reject disagreeing ones (``sft_label_mismatch``); needs ``{% generation %}`` in the template.

    Example:
        >>> SftPackConfig(part=2).truncate_turns
        False
    """

    part: int | None = None
    truncate_turns: bool = False
    check_mask: bool = False

    def __post_init__(self):
        if self.part not in (None, S.PART_1, S.PART_2):
            raise ValueError(f"part must be 1, 2 or None, not {self.part!r}")


class PrepareSftFn(PrepareSampleFn):
    """Pair (``sft split`` output) -> ``PreparedSample`` with chat-template tokens and assistant-only
    labels, or a rejected Outcome (``sft_too_long``, ``pack_image_undecodable``, ``pack_too_many_images``).

    Args:
        profile: image storage and slicing (``sft pack`` uses stage 3: adaptive slicing).
        tokenizer_files: the chat tokenizer dir's files (``TextTokenizer.files_of``), rebuilt in ``setup``.
        packing: sequence length and per-pack limits.
        cfg: part selection and truncation.
    """

    def __init__(self, profile: StageProfile, tokenizer_files: dict[str, bytes], packing: PackingConfig, cfg: SftPackConfig):
        super().__init__(profile, tokenizer_files, packing, require_image=False)
        self.cfg = cfg

    def setup(self):
        import pathlib
        import tempfile

        from apache_beam.metrics import Metrics

        from transforms.sft_template import ChatTemplater, load_chat_tokenizer

        self._tmp = tempfile.TemporaryDirectory(prefix="mmcorpus-sft-tok-")
        root = pathlib.Path(self._tmp.name)
        for name, data in self.tokenizer_files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        self.templater = ChatTemplater(load_chat_tokenizer(root), self.profile.query_num)
        self.total = Metrics.counter("mmcorpus.pack", "total")
        self.rejected = {}

    def _prepare(self, pair: Pair):
        sample = S.SftSample.from_pair(pair)
        image, w, h, grid = None, 0, 0, None
        if sample.image:
            try:
                image, w, h = prepare_image(sample.image, self.profile)
            except Exception as e:  # PIL raises many types for bad bytes; all mean "cannot decode"
                return self._reject(pair, reasons.PACK_IMAGE_UNDECODABLE, type(e).__name__)
            grid = self.profile.grid(w, h)
        from transforms.sft_template import SftTooLong, fit

        if self.cfg.check_mask:
            bad = self.templater.mask_mismatches(sample.messages())
            if bad:
                what = "token ids differ" if bad < 0 else f"{bad} tokens differ"
                return self._reject(pair, reasons.SFT_LABEL_MISMATCH, f"{what} from return_assistant_tokens_mask")
        toks = self.templater.tokens(sample.messages(), grid=grid, has_image=image is not None)
        try:
            toks = fit(toks, self.packing.seq_len, self.cfg.truncate_turns)
        except SftTooLong as e:
            return self._reject(pair, reasons.SFT_TOO_LONG, str(e))
        slices = (1 + (grid[0] * grid[1] if grid else 0)) if image is not None else 0
        prepared = PreparedSample(
            key=pair.key, source=pair.source, input_ids=toks.input_ids, labels=toks.labels, image=image,
            width=w, height=h, grid=grid, image_length=toks.image_length, slices=slices,
            image_offset=toks.image_offset or 0,
        )
        why = self.packing.fits_alone(prepared.item(safe_cut=False))
        if why == "too_many_images":
            return self._reject(pair, reasons.PACK_TOO_MANY_IMAGES, f"{slices} slices exceed the per-pack limit")
        return prepared
