"""Token accounting per sample: tokenizer loading, the MiniCPM-V slicing rule, stage profiles, and the
``train-tokenizer`` command that builds the small tokenizer bundled in ``data/tokenizer/``.

A sample becomes ``[image placeholder span] + caption tokens + eos``. The placeholder span follows
MiniCPM-V (``get_slice_image_placeholder``): overview ``<image>`` + q x ``<unk>`` + ``</image>``; when
sliced, ``<slice>`` + rows of ``cols`` slice placeholders joined by the tokens of ``"\\n"`` + ``</slice>``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

from schemas.errors import UserError
from schemas.packed import IGNORE_INDEX

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO / "data" / "tokenizer" / "tokenizer.json"

IM_START, IM_END, SLICE_START, SLICE_END, UNK = "<image>", "</image>", "<slice>", "</slice>", "<unk>"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MINICPMV_SPECIALS = (UNK, BOS, EOS, PAD, IM_START, IM_END, SLICE_START, SLICE_END)

SCALE_RESOLUTION = 448  # MiniCPM-V's slice size S
MAX_SLICES = 9
QUERY_NUMS = (96, 64)  # MiniCPM-Llama3-V 2.5, MiniCPM-V 2.6


# --- the slicing rule --------------------------------------------------------------------------


def slice_grid(width: int, height: int, scale: int = SCALE_RESOLUTION, max_slices: int = MAX_SLICES) -> tuple[int, int] | None:
    """MiniCPM-V ``slice_image``'s grid choice: ``(cols, rows)``, or None when the image is not sliced.

    ``multiple = min(ceil(W*H / S^2), max_slices)``; no slicing when ``multiple <= 1``; otherwise the
    candidate counts {multiple-1, multiple, multiple+1} (dropping 1 and > max_slices) are factored into
    grids and the grid minimising ``|log(W/H) - log(cols/rows)|`` wins (first found on ties).

    Example:
        >>> slice_grid(1344, 1344), slice_grid(640, 480), slice_grid(448, 448)
        ((3, 3), (2, 1), None)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for cols in range(1, n + 1):
            if n % cols:
                continue
            err = abs(log_ratio - math.log(cols / (n // cols)))
            if err < best_err:
                best, best_err = (cols, n // cols), err
    return best


@dataclass(frozen=True)
class StageProfile:
    """How images are stored and counted in one pretraining stage (MiniCPM-V paper, section 4.1).

    Args:
        stage: 1, 2 or 3.
        resolution: stages 1/2 resize every image to ``resolution`` x ``resolution``; stage 3 keeps
            the native aspect ratio and uses it as the slice size S.
        slicing: adaptive visual encoding (stage 3): overview + up to ``max_slices`` slices.
        query_num: q, query tokens per image / slice (96: MiniCPM-Llama3-V 2.5, 64: MiniCPM-V 2.6).
        max_slices: slice limit of the slicing rule.
        jpeg_quality: quality of the stored JPEG.

    Example:
        >>> StageProfile.for_stage(3, query_num=64).resolution
        448
    """

    stage: int
    resolution: int
    slicing: bool
    query_num: int = 96
    max_slices: int = MAX_SLICES
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, not {self.stage}")
        if self.query_num < 1 or self.resolution < 14 or self.max_slices < 1:
            raise ValueError("query_num, resolution and max_slices must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")

    @classmethod
    def for_stage(cls, stage: int, query_num: int = 96) -> "StageProfile":
        if stage == 1:
            return cls(stage=1, resolution=224, slicing=False, query_num=query_num)
        if stage == 2:
            return cls(stage=2, resolution=448, slicing=False, query_num=query_num)
        if stage == 3:
            return cls(stage=3, resolution=SCALE_RESOLUTION, slicing=True, query_num=query_num)
        raise ValueError(f"stage must be 1, 2 or 3, not {stage}")

    def stored_size(self, width: int, height: int) -> tuple[int, int]:
        """Size the image is stored at: a fixed square for stages 1/2; for stage 3 the native size,
        scaled down (aspect kept) only when it has more pixels than ``max_slices`` slices can use."""
        if not self.slicing:
            return self.resolution, self.resolution
        cap = self.max_slices * self.resolution * self.resolution
        if width * height <= cap:
            return width, height
        s = math.sqrt(cap / (width * height))
        return max(1, int(width * s)), max(1, int(height * s))

    def grid(self, width: int, height: int) -> tuple[int, int] | None:
        """Slice grid of a *stored* image (None: overview only)."""
        if not self.slicing:
            return None
        return slice_grid(width, height, self.resolution, self.max_slices)


def image_token_count(grid: tuple[int, int] | None, query_num: int, newline_tokens: int = 1) -> int:
    """Tokens of one image's placeholder span: ``q + 2`` for the overview; when sliced plus
    ``2 + cols*rows*(q + 2) + (rows - 1) * newline_tokens``.

    Example:
        >>> image_token_count((3, 3), 96), image_token_count((2, 1), 96), image_token_count(None, 64)
        (984, 296, 66)
    """
    n = query_num + 2
    if grid:
        cols, rows = grid
        n += 2 + cols * rows * (query_num + 2) + (rows - 1) * newline_tokens
    return n


# --- tokenizers ----------------------------------------------------------------------------------


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx", ".ckpt"}


class TextTokenizer:
    """A tokenizer loaded from a local path with the MiniCPM-V special tokens resolved to ids.

    Args:
        path: an HF ``tokenizers`` JSON file, or a directory holding ``tokenizer.json`` or a
            ``transformers`` tokenizer (loaded with ``local_files_only``; needs the finetune extra).

    Example:
        >>> tok = TextTokenizer(DEFAULT_TOKENIZER)
        >>> tok.decode(tok.encode("a dog")) == "a dog"
        True
    """

    def __init__(self, path: str | os.PathLike | None = None):
        path = pathlib.Path(path or DEFAULT_TOKENIZER)
        self.path = str(path)
        self._hf = None
        self._tok = None
        if path.is_file():
            self._tok = self._load_json(path)
        elif path.is_dir() and (path / "tokenizer.json").is_file():
            self._tok = self._load_json(path / "tokenizer.json")
        elif path.is_dir():
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise UserError(
                    f"--tokenizer {path}: a directory without tokenizer.json needs transformers "
                    "(pip install 'mmcorpus[finetune]'), or pass a tokenizers JSON file"
                ) from e
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            raise UserError(f"--tokenizer {path}: no such file or directory (pass a tokenizer.json or a tokenizer dir)")
        self.ids = {t: self._require(t) for t in (UNK, IM_START, IM_END, SLICE_START, SLICE_END)}
        self.eos_id = self._first_of(EOS, "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
        self.pad_id = self._first_of(PAD, "<|pad|>", UNK)
        self.newline_ids = self.encode("\n")

    @staticmethod
    def files_of(path: str | os.PathLike | None) -> dict[str, bytes]:
        """The tokenizer's files as ``{relative name: bytes}``: shipped inside a DoFn, so remote
        workers (Dataflow, Flink) need no access to the launching machine's disk."""
        path = pathlib.Path(path or DEFAULT_TOKENIZER)
        if path.is_file():
            return {"tokenizer.json": path.read_bytes()}
        if path.is_dir():  # a model dir may hold weights beside the tokenizer: never ship those
            return {
                str(f.relative_to(path)): f.read_bytes()
                for f in sorted(path.rglob("*"))
                if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES
            }
        raise UserError(f"--tokenizer {path}: no such file or directory (pass a tokenizer.json or a tokenizer dir)")

    @classmethod
    def from_files(cls, files: dict[str, bytes], workdir: str) -> "TextTokenizer":
        """Rebuild from ``files_of`` output, writing the files under ``workdir``."""
        root = pathlib.Path(workdir)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return cls(root)

    def _load_json(self, path: pathlib.Path):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"--tokenizer {path}: not a tokenizers JSON file ({type(e).__name__})") from e
        # A caption containing "<image>" must stay text, never become a placeholder token.
        tok.encode_special_tokens = True
        return tok

    def token_to_id(self, token: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(token)
        tid = self._hf.convert_tokens_to_ids(token)
        return None if tid is None or (tid == self._hf.unk_token_id and token != self._hf.unk_token) else tid

    def _require(self, token: str) -> int:
        tid = self.token_to_id(token)
        if tid is None:
            raise UserError(
                f"--tokenizer {self.path}: lacks the MiniCPM-V special token {token!r}; add "
                f"{list(MINICPMV_SPECIALS)} as special tokens (or use data/tokenizer/tokenizer.json)"
            )
        return tid

    def _first_of(self, *tokens: str) -> int:
        for t in tokens:
            tid = self.token_to_id(t)
            if tid is not None:
                return tid
        raise UserError(f"--tokenizer {self.path}: none of {list(tokens)} is in the vocabulary")

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, tid: int) -> str | None:
        if self._tok is not None:
            return self._tok.id_to_token(tid)
        return self._hf.convert_ids_to_tokens(tid)

    def special_ids(self) -> dict[str, int]:
        return {
            "unk": self.ids[UNK],
            "im_start": self.ids[IM_START],
            "im_end": self.ids[IM_END],
            "slice_start": self.ids[SLICE_START],
            "slice_end": self.ids[SLICE_END],
            "eos": self.eos_id,
            "pad": self.pad_id,
        }


# --- one sample's tokens -------------------------------------------------------------------------


@dataclass
class SampleTokens:
    """The token sequence of one sample and where its image placeholder span sits."""

    input_ids: list[int]
    labels: list[int]
    image_offset: int | None = None
    image_length: int = 0
    grid: tuple[int, int] | None = None
    slices: int = 0  # vision-encoder passes: 1 (overview) + cols*rows, 0 without an image

    def __len__(self) -> int:
        return len(self.input_ids)


def image_placeholder_ids(grid: tuple[int, int] | None, query_num: int, ids: dict[str, int], newline_ids: Sequence[int]) -> list[int]:
    one = [ids["im_start"]] + [ids["unk"]] * query_num + [ids["im_end"]]
    out = list(one)
    if grid:
        cols, rows = grid
        out.append(ids["slice_start"])
        for r in range(rows):
            if r:
                out.extend(newline_ids)
            out.extend(one * cols)
        out.append(ids["slice_end"])
    return out


def sample_tokens(
    caption_ids: Sequence[int],
    has_image: bool,
    grid: tuple[int, int] | None,
    query_num: int,
    ids: dict[str, int],
    newline_ids: Sequence[int],
) -> SampleTokens:
    """``[image span] + caption + eos``; labels are -100 on the image span and on the first token
    (so the previous sample's last token is never trained to predict this sample's start)."""
    image = image_placeholder_ids(grid, query_num, ids, newline_ids) if has_image else []
    text = list(caption_ids) + [ids["eos"]]
    input_ids = image + text
    labels = [IGNORE_INDEX] * len(image) + text
    labels[0] = IGNORE_INDEX
    slices = (1 + (grid[0] * grid[1] if grid else 0)) if has_image else 0
    return SampleTokens(
        input_ids=input_ids,
        labels=labels,
        image_offset=0 if has_image else None,
        image_length=len(image),
        grid=grid,
        slices=slices,
    )


# --- images --------------------------------------------------------------------------------------


# Above this many source pixels, JPEGs are decoded at a reduced DCT scale (still at least the stored
# size): a huge but legal photo then never occupies width x height x 3 bytes in a pack worker.
# Below it the full decode is kept, so ordinary images are stored exactly as before.
DRAFT_ABOVE_PIXELS = 16_000_000


def prepare_image(data: bytes, profile: StageProfile) -> tuple[bytes, int, int]:
    """Decode (upright, 8-bit RGB, through ``transforms.images``), resize per ``profile`` and encode as
    JPEG: ``(jpeg, width, height)``. JPEG has no alpha and pack writes no EXIF, so orientation and
    transparency are resolved here, before re-encoding. Raises whatever PIL raises on undecodable
    bytes (the caller turns it into a ledger row)."""
    from PIL import Image

    from transforms import images

    with images.open_image(data) as probe:
        head = images.read_header(probe)
    size = profile.stored_size(head.width, head.height)
    draft = size if head.pixels > DRAFT_ABOVE_PIXELS else None
    im = images.decode(data, draft_size=draft)
    if size != im.size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=profile.jpeg_quality, optimize=False, progressive=False)
    return buf.getvalue(), size[0], size[1]


# --- training the bundled tokenizer --------------------------------------------------------------


def read_sample_captions(sample_dir: pathlib.Path) -> list[str]:
    """Captions of the bundled sample data (CC3M validation TSV + the two image sets)."""
    caps = []
    tsv = sample_dir / "cc3m_val_captions_8k.tsv"
    if tsv.exists():
        for line in tsv.read_text(encoding="utf-8").splitlines():
            if line.strip():
                caps.append(line.split("\t", 1)[0])
    for name in ("cc_images/pairs.jsonl", "skimage_pairs/captions.jsonl"):
        p = sample_dir / name
        if p.exists():
            caps += [json.loads(x)["caption"] for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    return caps


def train_tokenizer(captions: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer (any text encodes) with MiniCPM-V's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(MINICPMV_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(captions), trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transforms.tokens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-tokenizer", help="train the small BPE tokenizer on the bundled captions")
    t.add_argument("--sample-dir", "--sample_dir", default=str(REPO / "data" / "sample"))
    t.add_argument("--output", default=str(DEFAULT_TOKENIZER))
    t.add_argument("--vocab-size", "--vocab_size", type=int, default=4096)
    c = sub.add_parser("count", help="print the token count of one image size per stage profile")
    c.add_argument("width", type=int)
    c.add_argument("height", type=int)
    c.add_argument("--query-num", "--query_num", type=int, default=96, choices=QUERY_NUMS)
    args = parser.parse_args(argv)
    if args.cmd == "train-tokenizer":
        caps = read_sample_captions(pathlib.Path(args.sample_dir))
        if not caps:
            raise UserError(f"--sample-dir {args.sample_dir}: no captions found")
        tok = train_tokenizer(caps, args.vocab_size)
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = tok.to_str(pretty=False)
        from transforms.stage_io import write_bytes_atomic

        write_bytes_atomic(str(out), text.encode("utf-8"))
        print(f"wrote {out} ({len(text.encode('utf-8'))} bytes, vocab {tok.get_vocab_size()}, {len(caps)} captions)")
        return 0
    for stage in (1, 2, 3):
        prof = StageProfile.for_stage(stage, args.query_num)
        w, h = prof.stored_size(args.width, args.height)
        grid = prof.grid(w, h)
        print(f"stage {stage}: stored {w}x{h} grid {grid} tokens {image_token_count(grid, args.query_num)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
