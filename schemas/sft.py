"""SFT conversation records (``SftSample``) and how they are stored as ``Pair`` rows of a stage output."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from schemas.records import Pair

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "system", "user", "assistant"
IMAGE_MARKER = "<image>"  # where the image goes in a user turn (LLaVA / MiniCPM-V convention)

# Source formats `mmcorpus sft ingest` reads.
FORMAT_LLAVA = "llava"  # LLaVA / ShareGPT: {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}
FORMAT_MINICPMV = "minicpmv"  # MiniCPM-V fine-tuning JSON: {"id", "image", "conversations": [{"role", "content"}]}
FORMAT_VQA = "vqa"  # {"id"|"question_id", "image", "question"|"text", "answer"|"answers"|..., "category"?}
FORMAT_CAPTION = "caption"  # {"id", "image", "caption"}: a prompt from the pool becomes the user turn
FORMAT_TEXT = "text"  # text-only conversations in LLaVA or MiniCPM-V shape, no image
FORMAT_REWRITE = "rewrite"  # an mmcorpus stage directory (normally the rewrite's): Pair.qa becomes the turns
FORMATS = (FORMAT_LLAVA, FORMAT_MINICPMV, FORMAT_VQA, FORMAT_CAPTION, FORMAT_TEXT, FORMAT_REWRITE)

PART_1, PART_2 = 1, 2
META_KEY = "sft"  # Pair.meta["sft"] holds the SFT fields that have no Pair column


@dataclass
class SftSample:
    """One instruction-tuning conversation.

    Stored in a stage output as a ``Pair`` (so ledger, manifest, verify and ReadStage work unchanged):
    ``qa`` holds the user/assistant turn pairs in order (the user text keeps its ``<image>`` marker),
    ``image`` the image bytes, ``meta["sft"]`` everything else.

    Args:
        key: stable key (no dots, no slashes).
        turns: ``[(user, assistant), ...]``: a conversation that passed ingest alternates strictly.
        system: optional system prompt.
        image: image bytes (None: text-only).
        image_ref: the image id/path the source named (kept for exports and the ledger).
        dataset: the source's name (what the split report groups by).
        source_format: one of ``FORMATS``.
        category: the source's declared category (LLaVA-Bench: ``conv`` / ``detail`` / ``complex``).
        part: 1 or 2 once ``sft split`` ran, else None.
        assistant_tokens: assistant tokens per turn, set by ``sft split`` (its measure).
        source: ``file#row`` where the record was read.

    Example:
        >>> s = SftSample(key="k1", turns=[("<image>\\nWhat is it?", "A cat.")], image_ref="1.jpg", dataset="d")
        >>> SftSample.from_pair(s.to_pair()) == s
        True
    """

    key: str
    turns: list[tuple[str, str]]
    system: str | None = None
    image: bytes | None = None
    image_ref: str | None = None
    width: int | None = None
    height: int | None = None
    dataset: str = ""
    source_format: str = ""
    category: str | None = None
    part: int | None = None
    assistant_tokens: list[int] = field(default_factory=list)
    source: str = ""

    def messages(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` in chat-template order (system first when present)."""
        out = [{"role": ROLE_SYSTEM, "content": self.system}] if self.system else []
        for q, a in self.turns:
            out += [{"role": ROLE_USER, "content": q}, {"role": ROLE_ASSISTANT, "content": a}]
        return out

    def to_pair(self) -> Pair:
        meta = {
            "system": self.system,
            "image_ref": self.image_ref,
            "dataset": self.dataset,
            "source_format": self.source_format,
            "category": self.category,
            "part": self.part,
            "assistant_tokens": list(self.assistant_tokens),
        }
        return Pair(
            key=self.key,
            caption=self.turns[0][1] if self.turns else None,
            image=self.image,
            width=self.width,
            height=self.height,
            source=self.source,
            meta=json.dumps({META_KEY: meta}, sort_keys=True, ensure_ascii=False, separators=(",", ":")),
            qa=[{"question": q, "answer": a} for q, a in self.turns],
        )

    @classmethod
    def from_pair(cls, pair: Pair) -> "SftSample":
        meta: dict[str, Any] = pair.meta_dict().get(META_KEY) or {}
        return cls(
            key=pair.key,
            turns=[(t["question"], t["answer"]) for t in (pair.qa or [])],
            system=meta.get("system"),
            image=pair.image,
            image_ref=meta.get("image_ref"),
            width=pair.width,
            height=pair.height,
            dataset=meta.get("dataset") or "",
            source_format=meta.get("source_format") or "",
            category=meta.get("category"),
            part=meta.get("part"),
            assistant_tokens=list(meta.get("assistant_tokens") or []),
            source=pair.source,
        )
