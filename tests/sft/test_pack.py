"""sft pack: chat-templated packs through the shared packer, read back by mmcorpus_reader; and the
acceptance test: a tiny Llama gives the same per-sample loss on the packed batch as sample by sample."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from pipelines import sft as cli
from schemas.packed import IGNORE_INDEX
from transforms.stage_io import read_table

REPO = pathlib.Path(__file__).resolve().parents[2]
QA90 = REPO / "data" / "sample" / "llava_qa90"
SEQ = 1024


@pytest.fixture(scope="module")
def chain(tmp_path_factory, chat_tok_dir):
    d = tmp_path_factory.mktemp("sftchain")
    long_words = " ".join(f"w{i}" for i in range(3000))
    text = [
        {"id": "t_long", "conversations": [{"from": "human", "value": "Write a lot."}, {"from": "gpt", "value": long_words}]},
        {"id": "t_multi", "conversations": [
            {"from": "human", "value": "What is a suitcase?"}, {"from": "gpt", "value": "A case for carrying clothes."},
            {"from": "human", "value": "And now write a lot."}, {"from": "gpt", "value": long_words}]},
        {"id": "t_short", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    ]
    (d / "text.json").write_text(json.dumps(text))
    cli.ingest(["--input", str(QA90 / "qa90_vqa.jsonl"), "--format", "vqa", "--name", "llava_qa90",
                "--images", str(QA90 / "images"), "--output", str(d / "ing_qa")])
    cli.ingest(["--input", str(d / "text.json"), "--format", "text", "--name", "txt", "--output", str(d / "ing_txt")])
    cli.split(["--input", str(d / "ing_qa"), "--input", str(d / "ing_txt"), "--output", str(d / "split")])
    out = {}
    for part in ("1", "2"):
        out[part] = d / f"pack{part}"
        # part 1 also runs the per-record --check-mask comparison: its 30 kept rows say 0 mismatches
        check = ["--check-mask"] if part == "1" else []
        cli.main(["pack", "--input", str(d / "split"), "--part", part, "--tokenizer", chat_tok_dir, "--seq-len", str(SEQ),
                  "--stage", "2", "--query-num", "64", "--output", str(out[part]), "--num-shards", "2", *check])
    out["2t"] = d / "pack2t"
    cli.main(["pack", "--input", str(d / "split"), "--part", "2", "--tokenizer", chat_tok_dir, "--seq-len", str(SEQ),
              "--stage", "2", "--query-num", "64", "--truncate-turns", "--output", str(out["2t"])])
    out["split"] = d / "split"
    return out


def _ledger(path):
    return {r["key"]: (r["status"], r["reason"], r["detail"]) for r in read_table(str(path), "ledger").to_pylist()}


def _packs(path):
    from mmcorpus_reader import PackDataset

    return list(PackDataset(str(path), as_tensors=False))


def test_pack_ledgers_and_verify(chain):
    from pipelines.verify import verify

    for k in ("1", "2", "2t"):
        bad = [c for c in verify(str(chain[k])) if not c.ok]
        assert not bad, (k, bad)
    l1, l2, l2t = _ledger(chain["1"]), _ledger(chain["2"]), _ledger(chain["2t"])
    assert len(l1) == len(l2) == len(l2t) == 93
    # part 1: the 30 LLaVA-Bench `conv` questions; the text-only ones are part 2 (rule 4)
    assert sum(v[0] == "kept" for v in l1.values()) == 30
    assert sum(v[1] == "sft_other_part" for v in l1.values()) == 63
    assert sum(v[0] == "kept" for v in l2.values()) == 61  # 60 detail/complex + t_short
    assert l2["txt-t_long"][:2] == ("rejected", "sft_too_long") and l2["txt-t_multi"][:2] == ("rejected", "sft_too_long")
    # with --truncate-turns the two-turn one keeps its first turn; a one-turn one cannot be cut
    assert l2t["txt-t_multi"][0] == "kept" and l2t["txt-t_long"][:2] == ("rejected", "sft_too_long")
    assert "first turn alone does not fit" in l2t["txt-t_long"][2]


def test_reader_yields_pretraining_keys_and_assistant_only_labels(chain, chat_tok_dir):
    from transforms.sft_template import load_chat_tokenizer

    tok = load_chat_tokenizer(chat_tok_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    packs = _packs(chain["1"])
    keys = [k for p in packs for k in p["sample_keys"]]
    assert len(keys) == 30 and len(set(keys)) == 30
    for p in packs:
        assert set(p) >= {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "images", "image_spans", "image_bound"}
        ids, labels, pos, cu = p["input_ids"][0], p["labels"][0], p["position_ids"][0], p["cu_seq_lens_q"]
        assert p["num_tokens"] <= SEQ and cu[-1] == len(ids)
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1]
            assert list(pos[s:e]) == list(range(e - s))  # restart per sample
            assert ids[s] == im_start and labels[s] == IGNORE_INDEX  # each sample starts with its system header
            assert sum(1 for x in labels[s:e] if x == eot) == 1  # one assistant turn, its end-of-turn trained
        for (o, n) in p["image_spans"]:
            assert all(x == IGNORE_INDEX for x in labels[o:o + n])
        trained = labels != IGNORE_INDEX
        assert np.array_equal(labels[trained], ids[trained])
    assert sum(len(p["images"]) for p in packs) == 30


def _reference(tok, msgs, grid_span):
    """input_ids and labels of one conversation from transformers alone: the template's token ids and
    its assistant mask; the one <image> token replaced by the given placeholder ids (labels -100)."""
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(ref["input_ids"]), list(ref["assistant_masks"])
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    im = tok.convert_tokens_to_ids("<image>")
    if im in ids:
        p = ids.index(im)
        ids = ids[:p] + grid_span + ids[p + 1:]
        labels = labels[:p] + [IGNORE_INDEX] * len(grid_span) + labels[p + 1:]
    return ids, labels


def _sample_losses(logits, labels, cu):
    """Per-sample mean next-token loss: position t predicts labels[t+1] within the sample."""
    import torch

    out = []
    for i in range(len(cu) - 1):
        s, e = int(cu[i]), int(cu[i + 1])
        lg, lb = logits[s:e - 1], labels[s + 1:e]
        out.append(torch.nn.functional.cross_entropy(lg, lb, ignore_index=IGNORE_INDEX, reduction="mean"))
    return torch.stack(out)


def test_acceptance_packed_loss_equals_one_by_one(chain, chat_tok_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from schemas import sft as S
    from schemas.records import Pair
    from transforms.sft_template import load_chat_tokenizer
    from transforms.tokens import image_placeholder_ids

    tok = load_chat_tokenizer(chat_tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2 * SEQ, attn_implementation="sdpa",
    )).eval()
    by_key = {}
    for r in read_table(str(chain["split"])).to_pylist():
        s = S.SftSample.from_pair(Pair.from_row(r))
        by_key[s.key] = s
    ids_of = {k: tok.convert_tokens_to_ids(t) for k, t in
              (("unk", "<unk>"), ("im_start", "<image>"), ("im_end", "</image>"), ("slice_start", "<slice>"), ("slice_end", "</slice>"))}
    newline = tok.encode("\n", add_special_tokens=False)
    checked = 0
    for part in ("1", "2"):
        for p in _packs(chain[part])[:3]:
            ids = torch.tensor(p["input_ids"], dtype=torch.long)
            pos = torch.tensor(p["position_ids"], dtype=torch.long)
            labels = torch.tensor(p["labels"][0], dtype=torch.long)
            cu = p["cu_seq_lens_q"]
            with torch.no_grad():
                # the packed path transformers uses with DataCollatorWithFlattening: no attention
                # mask, position ids restarting per sample mark the sample boundaries
                packed = _sample_losses(model(input_ids=ids, position_ids=pos, use_cache=False).logits[0], labels, cu)
            single = []
            for i, key in enumerate(p["sample_keys"]):
                grid = None
                img = [j for j, si in enumerate(p["image_sample"]) if si == i]
                span = []
                if img:
                    cols, rows = p["image_grids"][img[0]]
                    grid = (int(cols), int(rows)) if cols else None
                    span = image_placeholder_ids(grid, 64, ids_of, newline)
                r_ids, r_labels = _reference(tok, by_key[key].messages(), span)
                s, e = int(cu[i]), int(cu[i + 1])
                assert list(p["input_ids"][0][s:e]) == r_ids
                with torch.no_grad():
                    lg = model(input_ids=torch.tensor([r_ids]), use_cache=False).logits[0]
                single.append(_sample_losses(lg, torch.tensor(r_labels), [0, len(r_ids)])[0])
            single = torch.stack(single)
            assert torch.allclose(packed, single, atol=1e-5, rtol=1e-5), (packed, single)
            checked += len(single)
    assert checked >= 6


def test_pack_rerun_is_byte_identical(chain, chat_tok_dir, tmp_path):
    from transforms.stage_io import read_manifest

    again = tmp_path / "again"
    cli.main(["pack", "--input", str(chain["split"]), "--part", "1", "--tokenizer", chat_tok_dir, "--seq-len", str(SEQ),
              "--stage", "2", "--query-num", "64", "--output", str(again), "--num-shards", "2", "--check-mask"])
    a, b = read_manifest(str(chain["1"])), read_manifest(str(again))
    assert [(f.path, f.sha256) for f in a.files] == [(f.path, f.sha256) for f in b.files]


def test_check_mask_flags_a_template_that_trains_the_separator(chain, chat_tok_dir, tmp_path, capsys):
    import shutil

    from schemas.errors import UserError

    base = ["pack", "--input", str(chain["split"]), "--part", "1", "--seq-len", str(SEQ), "--stage", "2",
            "--query-num", "64", "--check-mask"]
    from transforms.stage_io import read_manifest

    assert read_manifest(str(chain["1"])).config["sft"]["check_mask"] is True  # the chain's part 1 ran it: 30 kept
    # a template whose generation block also covers the "\n" after <|im_end|>: its mask now includes a
    # token our rule leaves untrained, so every part-1 record (one assistant turn each) disagrees by one
    other = tmp_path / "tok_nl"
    shutil.copytree(chat_tok_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    old = "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    assert old in cfg["chat_template"]
    cfg["chat_template"] = cfg["chat_template"].replace(old, "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}")
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    bad = tmp_path / "bad"
    cli.main(base + ["--tokenizer", str(other), "--output", str(bad)])
    led = _ledger(bad)
    mism = [v for v in led.values() if v[1] == "sft_label_mismatch"]
    assert len(mism) == 30 and {v[2] for v in mism} == {"1 tokens differ from return_assistant_tokens_mask"}
    cfg["chat_template"] = cfg["chat_template"].replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no {% generation %} block"):
        cli.main(base + ["--tokenizer", str(other), "--output", str(tmp_path / "none")])
