"""SFT ingest: parse instruction-data formats into ``SftSample``s, check the turns, join images by id.

Every input record ends as one ``Outcome``: kept (the conversation, as a ``Pair`` row) or rejected
with a reason from ``schemas.reasons`` (``sft_*``). The parsing and checking are pure functions
(``parse_record``, ``check_turns``) so tests and the bench call them without Beam.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import reasons
from schemas import sft as S
from schemas.records import ERROR, KEPT, REJECTED, Outcome, Pair
from transforms.keys import hash_key, safe_key

# Caption sets become instructions with a prompt drawn (by key hash, so deterministically) from a
# pool in the caption's language. English prompts follow LLaVA's brief-description pool; the Chinese
# ones are their plain translations.
CAPTION_PROMPTS_EN = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Write a terse but informative summary of the picture.",
    "Render a clear and concise summary of the photo.",
)
CAPTION_PROMPTS_ZH = (
    "简要描述这张图片。",
    "请简短地描述给定的图片。",
    "简洁地说明这张图片的内容。",
    "概括这张图片的视觉内容。",
    "用一句话描述这张照片。",
    "请对这张图片做一个简洁的解释。",
)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_USER_ROLES = {"human": S.ROLE_USER, "user": S.ROLE_USER}
_ASSISTANT_ROLES = {"gpt": S.ROLE_ASSISTANT, "assistant": S.ROLE_ASSISTANT, "bot": S.ROLE_ASSISTANT}
_SYSTEM_ROLES = {"system": S.ROLE_SYSTEM}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class SftIngestConfig:
    """Checks and choices of ``mmcorpus sft ingest``.

    Args:
        max_turns: more user/assistant turn pairs ⇒ ``sft_too_many_turns``; None: off.
        max_chars: more characters over all turns ⇒ ``sft_too_long_chars`` (a cheap bound before the
            token-exact ``sft_too_long`` of ``sft pack``); None: off.
        caption_prompts_en, caption_prompts_zh: prompt pools for caption sets (zh when the caption
            holds CJK characters).

    Example:
        >>> SftIngestConfig(max_turns=8).max_chars
        65536
    """

    max_turns: int | None = 64
    max_chars: int | None = 65536
    caption_prompts_en: tuple[str, ...] = CAPTION_PROMPTS_EN
    caption_prompts_zh: tuple[str, ...] = CAPTION_PROMPTS_ZH

    def __post_init__(self):
        for name in ("max_turns", "max_chars"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None")
        if not self.caption_prompts_en or not self.caption_prompts_zh:
            raise ValueError("caption prompt pools must not be empty")


class SftRecordError(Exception):
    """An expected data problem: becomes a ledger row with ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reasons.check_reason(reason)
        self.detail = detail


@dataclass
class Parsed:
    """A record after parsing, before checks: raw ``(role, content)`` messages."""

    key: str
    messages: list[tuple[str, str]]
    image_ref: str | None
    category: str | None


def caption_prompt(key: str, caption: str, cfg: SftIngestConfig) -> str:
    """The pool prompt for a caption: language by script, choice by a hash of the key."""
    pool = cfg.caption_prompts_zh if _CJK.search(caption) else cfg.caption_prompts_en
    return pool[int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % len(pool)]


def _record_key(obj: dict, dataset: str, source: str) -> str:
    rid = obj.get("id", obj.get("question_id"))
    if rid is None or isinstance(rid, (dict, list)):
        return "x" + hash_key(dataset, source, length=15)
    return safe_key(f"{dataset}-{rid}", dataset, source)


def _image_ref(obj: dict) -> str | None:
    img = obj.get("image", obj.get("image_id"))
    if img is None or img == "":
        return None
    if isinstance(img, list) and len(img) == 1:
        img = img[0]
    if isinstance(img, (int, str)) and not isinstance(img, bool):
        return str(img)
    raise SftRecordError(reasons.SFT_RECORD_UNREADABLE, "multi-image or non-string 'image' is not supported")


def _text(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise SftRecordError(reasons.SFT_RECORD_UNREADABLE, f"{what} is a {type(v).__name__}, not a string")
    return v


def _speaker_messages(turns: Any, role_key: str, text_key: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list):
        raise SftRecordError(reasons.SFT_RECORD_UNREADABLE, "'conversations' is not a list")
    out = []
    for t in turns:
        if not isinstance(t, dict) or role_key not in t:
            raise SftRecordError(reasons.SFT_RECORD_UNREADABLE, f"a turn without '{role_key}'")
        out.append((str(t[role_key]).lower(), _text(t.get(text_key), f"turn '{text_key}'")))
    return out


def _most_common_answer(answers: Any) -> str:
    if isinstance(answers, str):
        return answers
    if not isinstance(answers, list) or not answers:
        return ""
    texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        return ""
    counts = Counter(texts)
    best = max(counts.values())
    return next(t for t in texts if counts[t] == best)  # VQAv2's 10 answers: the majority, first on ties


def parse_record(obj: Any, fmt: str, dataset: str, source: str, cfg: SftIngestConfig) -> Parsed:
    """One source record -> ``Parsed``; raises ``SftRecordError`` for records it cannot read."""
    if not isinstance(obj, dict):
        raise SftRecordError(reasons.SFT_RECORD_UNREADABLE, f"a {type(obj).__name__}, not a JSON object")
    key = _record_key(obj, dataset, source)
    category = obj.get("category")
    category = str(category) if category is not None else None
    image_ref = None if fmt == S.FORMAT_TEXT and "image" not in obj else _image_ref(obj)
    if fmt in (S.FORMAT_LLAVA, S.FORMAT_MINICPMV, S.FORMAT_TEXT):
        conv = obj.get("conversations", obj.get("messages"))
        if conv is None:
            raise SftRecordError(reasons.SFT_RECORD_UNREADABLE, "no 'conversations'")
        first = conv[0] if isinstance(conv, list) and conv and isinstance(conv[0], dict) else {}
        if "from" in first:
            messages = _speaker_messages(conv, "from", "value")
        else:
            messages = _speaker_messages(conv, "role", "content")
        return Parsed(key, messages, image_ref, category)
    if fmt == S.FORMAT_VQA:
        q = _text(obj.get("question", obj.get("text")), "question")
        a = _text(obj["answer"], "answer") if "answer" in obj else _most_common_answer(obj.get("answers"))
        if image_ref is not None and S.IMAGE_MARKER not in q:
            q = f"{S.IMAGE_MARKER}\n{q}"
        return Parsed(key, [("user", q), ("assistant", a)], image_ref, category)
    if fmt == S.FORMAT_CAPTION:
        cap = _text(obj.get("caption", obj.get("text")), "caption").strip()
        q = caption_prompt(key, cap, cfg)
        if image_ref is not None:
            q = f"{S.IMAGE_MARKER}\n{q}"
        return Parsed(key, [("user", q), ("assistant", cap)], image_ref, category)
    raise ValueError(f"unknown SFT format {fmt!r}")


def check_turns(messages: list[tuple[str, str]], has_image: bool, cfg: SftIngestConfig) -> tuple[str | None, list[tuple[str, str]]]:
    """``(system, [(user, assistant), ...])`` of well-formed messages; raises ``SftRecordError``.

    Rules (each its own reason): known roles; a system prompt only first; user and assistant
    alternate, user first, assistant last; no empty question or answer; ``<image>`` only in user
    turns, exactly once when the record has an image, never without one.
    """
    system = None
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for i, (role, text) in enumerate(messages):
        if role in _SYSTEM_ROLES and i == 0:
            system = text.strip() or None
            continue
        if role in _USER_ROLES:
            if pending is not None:
                raise SftRecordError(reasons.SFT_CONSECUTIVE_USER, f"turn {i}: a second user turn in a row")
            if not text.strip():
                raise SftRecordError(reasons.SFT_EMPTY_QUESTION, f"turn {i}")
            pending = text
        elif role in _ASSISTANT_ROLES:
            if pending is None:
                raise SftRecordError(reasons.SFT_CONSECUTIVE_ASSISTANT, f"turn {i}: an assistant turn without a question")
            if not text.strip():
                raise SftRecordError(reasons.SFT_EMPTY_ANSWER, f"turn {i}")
            if S.IMAGE_MARKER in text:
                raise SftRecordError(reasons.SFT_MARKER_IN_ANSWER, f"turn {i}")
            turns.append((pending, text))
            pending = None
        else:
            raise SftRecordError(reasons.SFT_BAD_ROLE, f"turn {i}: role {role[:40]!r}")
    if pending is not None:
        raise SftRecordError(reasons.SFT_ENDS_WITH_USER, f"turn {len(messages) - 1}")
    if not turns:
        raise SftRecordError(reasons.SFT_NO_TURNS)
    markers = sum(q.count(S.IMAGE_MARKER) for q, _ in turns)
    if has_image and markers == 0:
        raise SftRecordError(reasons.SFT_IMAGE_WITHOUT_MARKER, "an image is named but no user turn holds <image>")
    if has_image and markers > 1:
        raise SftRecordError(reasons.SFT_MULTIPLE_MARKERS, f"{markers} <image> markers for one image")
    if not has_image and markers:
        raise SftRecordError(reasons.SFT_MARKER_WITHOUT_IMAGE, f"{markers} <image> marker(s), no image named")
    if cfg.max_turns is not None and len(turns) > cfg.max_turns:
        raise SftRecordError(reasons.SFT_TOO_MANY_TURNS, f"{len(turns)} turns > max_turns {cfg.max_turns}")
    chars = sum(len(q) + len(a) for q, a in turns) + len(system or "")
    if cfg.max_chars is not None and chars > cfg.max_chars:
        raise SftRecordError(reasons.SFT_TOO_LONG_CHARS, f"{chars} chars > max_chars {cfg.max_chars}")
    return system, turns


def to_sample(obj: Any, fmt: str, dataset: str, source: str, cfg: SftIngestConfig) -> S.SftSample:
    """parse + check: the sample (image not attached yet) or ``SftRecordError``."""
    p = parse_record(obj, fmt, dataset, source, cfg)
    system, turns = check_turns(p.messages, p.image_ref is not None, cfg)
    return S.SftSample(
        key=p.key, turns=turns, system=system, image_ref=p.image_ref, dataset=dataset,
        source_format=fmt, category=p.category, source=source,
    )


def pair_to_sample(pair: Pair, dataset: str, cfg: SftIngestConfig) -> S.SftSample:
    """An mmcorpus stage record (the rewrite's QA, else its caption) as a conversation."""
    qa = [x for x in (pair.qa or []) if (x.get("question") or "").strip() or (x.get("answer") or "").strip()]
    if qa:
        messages = []
        for i, t in enumerate(qa):
            q = (t.get("question") or "").strip()
            messages += [("user", f"{S.IMAGE_MARKER}\n{q}" if i == 0 and pair.image else q), ("assistant", t.get("answer") or "")]
    else:
        cap = (pair.caption or "").strip()
        q = caption_prompt(pair.key, cap, cfg)
        messages = [("user", f"{S.IMAGE_MARKER}\n{q}" if pair.image else q), ("assistant", cap)]
    system, turns = check_turns(messages, bool(pair.image), cfg)
    return S.SftSample(
        key=pair.key, turns=turns, system=system, image=pair.image, image_ref=pair.key if pair.image else None,
        width=pair.width, height=pair.height, dataset=dataset, source_format=S.FORMAT_REWRITE, source=pair.source,
    )


# --- Beam parts ----------------------------------------------------------------------------------


def read_json_records(path: str, rel: str) -> Iterator[tuple[str, Any]]:
    """``(source, object)`` per record of a JSONL file or a JSON array file; an unparseable line
    yields ``(source, SftRecordError)``. A JSON array file is read whole (MiniCPM-V / LLaVA ship
    single JSON files); JSONL streams."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head == b"[":
            raw = head + f.read()
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"{rel}#0", SftRecordError(reasons.SFT_RECORD_UNREADABLE, f"JSON array file unreadable: {type(e).__name__}")
                return
            for i, obj in enumerate(data):
                yield f"{rel}#{i}", obj
            return
        line_no = 0
        buf = head
        for line in f:
            line = buf + line
            buf = b""
            if line.strip():
                try:
                    yield f"{rel}#{line_no}", json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield f"{rel}#{line_no}", SftRecordError(reasons.SFT_RECORD_UNREADABLE, f"line is not JSON ({type(e).__name__})")
            line_no += 1
        if buf.strip():
            try:
                yield f"{rel}#{line_no}", json.loads(buf.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"{rel}#{line_no}", SftRecordError(reasons.SFT_RECORD_UNREADABLE, f"line is not JSON ({type(e).__name__})")


class _Counted(beam.DoFn):
    """Counters with the house names: ``total``, ``kept``, ``rejected_<reason>``, ``errors_<Exc>``."""

    def setup(self):
        self._c: dict[str, Any] = {}

    def inc(self, name: str) -> None:
        c = self._c.get(name)
        if c is None:
            c = self._c[name] = Metrics.counter("mmcorpus.sft_ingest", name)
        c.inc()


class ParseSftFn(_Counted):
    """(path, rel) of one input file -> ``SftSample`` (main, image not attached) or a rejected
    ``Outcome`` (tagged ``REJECTED``).

    Args:
        fmt: a ``schemas.sft.FORMATS`` file format (not ``rewrite``).
        dataset: the source's name.
        cfg: the ingest checks.
    """

    REJECTED = "rejected"

    def __init__(self, fmt: str, dataset: str, cfg: SftIngestConfig):
        self.fmt = fmt
        self.dataset = dataset
        self.cfg = cfg

    def process(self, unit: tuple[str, str]):
        path, rel = unit
        for source, obj in read_json_records(path, rel):
            self.inc("total")
            try:
                if isinstance(obj, SftRecordError):
                    raise obj
                out = to_sample(obj, self.fmt, self.dataset, source, self.cfg)
            except SftRecordError as e:
                key = _record_key(obj, self.dataset, source) if isinstance(obj, dict) else "x" + hash_key(self.dataset, source, length=15)
                self.inc(f"rejected_{e.reason}")
                out = beam.pvalue.TaggedOutput(self.REJECTED, Outcome(key=key, status=REJECTED, reason=e.reason, detail=e.detail, source=source))
            except Exception as e:  # dead letter: unexpected, the record stays in the ledger
                reason = reasons.exception_reason(e)
                self.inc(f"errors_{type(e).__name__}")
                out = beam.pvalue.TaggedOutput(
                    self.REJECTED, Outcome(key="x" + hash_key(self.dataset, source, length=15), status=ERROR, reason=reason, source=source)
                )
            yield out


def image_id(ref: str) -> str:
    """The id an image reference joins on: its file name without directories and extension
    (``coco/train2017/000000441147.jpg`` -> ``000000441147``)."""
    base = posixpath.basename(ref.replace("\\", "/"))
    stem, ext = posixpath.splitext(base)
    return stem if ext.lower() in IMAGE_EXTS else base


def kept_outcome(sample: S.SftSample) -> Outcome:
    return Outcome.kept(sample.to_pair())


def _not_found(sample: S.SftSample, where: str) -> Outcome:
    return Outcome(
        key=sample.key, status=REJECTED, reason=reasons.SFT_IMAGE_NOT_FOUND,
        detail=f"image {sample.image_ref!r} not in {where}", source=sample.source,
    )


class AttachLocalImageFn(_Counted):
    """SftSample -> Outcome: reads the named image from a local/Beam-filesystem directory
    (``DIR/ref``, else ``DIR/<id>.<ext>`` for the common image extensions)."""

    def __init__(self, image_dir: str | None):
        self.image_dir = image_dir.rstrip("/") if image_dir else None

    def _candidates(self, ref: str) -> list[str]:
        ref = ref.replace("\\", "/")
        if self.image_dir is None or ref.startswith("/") or ".." in ref.split("/"):
            return []  # never read outside the image directory
        out = [f"{self.image_dir}/{ref}"]
        if not posixpath.splitext(ref)[1]:
            out += [f"{self.image_dir}/{ref}{ext}" for ext in IMAGE_EXTS]
        out.append(f"{self.image_dir}/{posixpath.basename(ref)}")
        return out

    def process(self, sample: S.SftSample):
        if sample.image_ref is None:
            self.inc(KEPT)
            yield kept_outcome(sample)
            return
        for path in self._candidates(sample.image_ref):
            if FileSystems.exists(path) and not os.path.isdir(path):
                with FileSystems.open(path, compression_type="uncompressed") as f:
                    sample.image = f.read()
                self.inc(KEPT)
                yield kept_outcome(sample)
                return
        self.inc(f"rejected_{reasons.SFT_IMAGE_NOT_FOUND}")
        yield _not_found(sample, self.image_dir or "(no --images given)")


def join_keyed_images(element: tuple[str, dict[str, list]], where: str) -> Iterator[Outcome]:
    """(image id, {"samples": [...], "images": [Pair ...]}) -> one Outcome per sample. Several image
    records under one id: the smallest key wins, so the choice never depends on element order."""
    _, groups = element
    images = sorted((p for p in groups["images"] if p.image), key=lambda p: (p.key, p.source))
    for sample in groups["samples"]:
        if images:
            sample.image, sample.width, sample.height = images[0].image, images[0].width, images[0].height
            yield kept_outcome(sample)
        else:
            yield _not_found(sample, where)


def detect_image_source(path: str) -> str:
    """``stage`` (has manifest.json), ``i2d`` (img2dataset .tar / .parquet shards) or ``dir``."""
    if FileSystems.exists(f"{path.rstrip('/')}/manifest.json"):
        return "stage"
    for pattern in ("*.tar", "*.parquet"):
        if FileSystems.match([f"{path.rstrip('/')}/{pattern}"])[0].metadata_list:
            return "i2d"
    return "dir"


def list_input_files(path: str) -> list[str]:
    """The JSON/JSONL files of an input path (a file, a directory, or a glob), sorted."""
    if any(c in path for c in "*?["):
        files = [m.path for m in FileSystems.match([path])[0].metadata_list]
    elif os.path.isdir(path):
        files = [m.path for m in FileSystems.match([f"{path.rstrip('/')}/*"])[0].metadata_list]
        files = [f for f in files if f.endswith((".json", ".jsonl"))]
    else:
        files = [path] if FileSystems.exists(path) else []
    return sorted(files)
