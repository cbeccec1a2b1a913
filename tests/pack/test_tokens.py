"""Token accounting: the MiniCPM-V slicing rule, stage profiles, placeholder layout, tokenizers."""

from __future__ import annotations

import json

import pytest

from schemas.errors import UserError
from schemas.packed import IGNORE_INDEX
from transforms import tokens as T

# (width, height) -> grid (cols, rows) or None, tokens at q=96, tokens at q=64
SHAPES = [
    ((1344, 1344), (3, 3), 984, 664),  # 9 slices: 98 + 2 + 9*98 + 2 newlines
    ((640, 480), (2, 1), 296, 200),
    ((448, 448), None, 98, 66),  # exactly one slice worth of pixels: no slicing
    ((224, 224), None, 98, 66),
    ((512, 512), (1, 2), 297, 201),  # ratio 1.3 -> 2 slices; [1,2] and [2,1] tie, the first found wins
    ((1000, 500), (2, 1), 296, 200),
    ((2000, 500), (4, 1), 492, 332),  # 98 + 2 + 4*98, one row: no newline
    ((480, 1440), (1, 3), 396, 268),  # 3 rows -> 2 newline tokens
    ((4000, 4000), (3, 3), 984, 664),  # capped at 9 slices
    ((1920, 1080), (4, 2), 885, 597),  # 10.3 -> 9; candidates 8, 9: 4x2 beats 3x3 on aspect
]


@pytest.mark.parametrize("size,grid,t96,t64", SHAPES)
def test_slice_grid_and_token_count(size, grid, t96, t64):
    assert T.slice_grid(*size) == grid
    assert T.image_token_count(grid, 96) == t96
    assert T.image_token_count(grid, 64) == t64


def test_placeholder_layout_matches_minicpmv():
    ids = {"unk": 0, "im_start": 4, "im_end": 5, "slice_start": 6, "slice_end": 7, "eos": 2}
    one = [4, 0, 0, 5]
    got = T.image_placeholder_ids((2, 2), 2, ids, [99])
    assert got == one + [6] + one + one + [99] + one + one + [7]
    assert len(got) == T.image_token_count((2, 2), 2)
    s = T.sample_tokens([10, 11], True, (2, 2), 2, ids, [99])
    assert s.input_ids == got + [10, 11, 2]
    assert s.labels == [IGNORE_INDEX] * len(got) + [10, 11, 2]
    assert (s.image_offset, s.image_length, s.slices) == (0, len(got), 5)
    text_only = T.sample_tokens([10, 11], False, None, 2, ids, [99])
    assert text_only.input_ids == [10, 11, 2] and text_only.labels == [IGNORE_INDEX, 11, 2]


def test_stage_profiles():
    p1, p2, p3 = (T.StageProfile.for_stage(s) for s in (1, 2, 3))
    assert p1.stored_size(640, 480) == (224, 224) and p1.grid(224, 224) is None
    assert p2.stored_size(640, 480) == (448, 448) and p2.grid(448, 448) is None
    assert p3.stored_size(640, 480) == (640, 480) and p3.grid(640, 480) == (2, 1)
    w, h = p3.stored_size(4000, 3000)  # more pixels than 9 slices use: scaled down, aspect kept
    assert w * h <= 9 * 448 * 448 and abs(w / h - 4 / 3) < 0.01
    assert (w, h) == (1551, 1163) and p3.grid(w, h) == (3, 3)
    assert T.StageProfile.for_stage(3, query_num=64).query_num == 64
    with pytest.raises(ValueError):
        T.StageProfile.for_stage(4)


def test_bundled_tokenizer_has_the_special_tokens_and_is_small():
    assert T.DEFAULT_TOKENIZER.stat().st_size < 1_000_000
    tok = T.TextTokenizer()
    vocab = json.loads(T.DEFAULT_TOKENIZER.read_text())["model"]["vocab"]
    for t in ("<image>", "</image>", "<slice>", "</slice>", "<unk>"):
        assert t in vocab
    assert tok.decode(tok.encode("a dog on a beach")) == "a dog on a beach"
    # a caption that spells a special token stays text: no placeholder can be smuggled in
    ids = tok.encode("look <image> here </slice>")
    assert not set(ids) & set(tok.special_ids().values())
    assert tok.decode(ids) == "look <image> here </slice>"


def test_train_tokenizer_reproduces_the_bundled_file(tmp_path):
    out = tmp_path / "tok.json"
    assert T.main(["train-tokenizer", "--output", str(out)]) == 0
    assert out.read_bytes() == T.DEFAULT_TOKENIZER.read_bytes()


def test_tokenizer_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        T.TextTokenizer(tmp_path / "missing.json")
    plain = T.train_tokenizer(["a cat", "a dog"] * 10, vocab_size=300)
    # drop the image tokens: a tokenizer trained without them
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE(unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(["a cat", "a dog"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(UserError, match=r"lacks the MiniCPM-V special token '<image>'"):
        T.TextTokenizer(tmp_path / "bare.json")
    plain.save(str(tmp_path / "ok.json"))
    assert T.TextTokenizer(tmp_path / "ok.json").special_ids()["im_start"] == plain.token_to_id("<image>")


def test_transformers_tokenizer_dir(tmp_path):
    import transformers  # the finetune extra (make test installs it)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(T.DEFAULT_TOKENIZER), unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tokdir")
    tok = T.TextTokenizer(tmp_path / "tokdir")
    ref = T.TextTokenizer()
    assert tok.encode("a red bus .") == ref.encode("a red bus .")
    assert tok.special_ids() == ref.special_ids()


def test_tokenizer_files_round_trip_for_remote_workers(tmp_path):
    files = T.TextTokenizer.files_of(None)
    assert list(files) == ["tokenizer.json"]
    tok = T.TextTokenizer.from_files(files, str(tmp_path / "w"))
    ref = T.TextTokenizer()
    assert tok.encode("two cats on a sofa") == ref.encode("two cats on a sofa")
    d = tmp_path / "model"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(T.DEFAULT_TOKENIZER.read_bytes())
    (d / "model.safetensors").write_bytes(b"weights")
    assert list(T.TextTokenizer.files_of(d)) == ["tokenizer.json"]
