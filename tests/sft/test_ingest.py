"""sft ingest: every format, image join by id, and one exact ledger reason per malformed record."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from pipelines import sft as cli
from schemas import sft as S
from transforms.stage_io import read_table

REPO = pathlib.Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "sft"
QA90 = REPO / "data" / "sample" / "llava_qa90"
PHOTO = REPO / "data" / "sample" / "cc_images" / "0006400c1c224e19.jpg"


def _ledger(out) -> dict[str, tuple[str, str]]:
    t = read_table(str(out), "ledger").to_pylist()
    return {r["key"]: (r["status"], r["reason"]) for r in t}


def _samples(out) -> dict[str, S.SftSample]:
    from schemas.records import Pair

    return {r["key"]: S.SftSample.from_pair(Pair.from_row(r)) for r in read_table(str(out)).to_pylist()}


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    shutil.copy(PHOTO, d / "000000441147.jpg")
    return d


def test_llava_bad_turns_exact_reasons(tmp_path, images):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[sft.ingest]\nmax_turns = 4\nmax_chars = 1000\n")
    out = tmp_path / "out"
    r = cli.ingest(["--input", str(FIX / "llava_mixed.json"), "--format", "llava", "--name", "mix",
                    "--images", str(images), "--output", str(out), "--config", str(cfg), "--num-shards", "2"])
    led = _ledger(out)
    assert len(led) == 16 == r.manifest.counts["inputs"]
    expect = {
        "mix-good1": ("kept", "ok"),
        "mix-good_text": ("kept", "ok"),
        "mix-two_humans": ("rejected", "sft_consecutive_user"),
        "mix-empty_answer": ("rejected", "sft_empty_answer"),
        "mix-marker_no_image": ("rejected", "sft_marker_without_image"),
        "mix-image_no_marker": ("rejected", "sft_image_without_marker"),
        "mix-missing_image": ("rejected", "sft_image_not_found"),
        "mix-ends_with_user": ("rejected", "sft_ends_with_user"),
        "mix-assistant_first": ("rejected", "sft_consecutive_assistant"),
        "mix-bad_role": ("rejected", "sft_bad_role"),
        "mix-no_turns": ("rejected", "sft_no_turns"),
        "mix-two_markers": ("rejected", "sft_multiple_markers"),
        "mix-too_many_turns": ("rejected", "sft_too_many_turns"),
        "mix-too_long": ("rejected", "sft_too_long_chars"),
        "mix-no_conversations": ("rejected", "sft_record_unreadable"),
    }
    for k, v in expect.items():
        assert led.pop(k) == v, k
    ((_, rest),) = led.items()  # the non-object record: a hashed key, its own reason
    assert rest == ("rejected", "sft_record_unreadable")
    kept = _samples(out)
    assert sorted(kept) == ["mix-good1", "mix-good_text"]
    g = kept["mix-good1"]
    assert g.turns == [("<image>\nWhat color are the suitcases?", "Black and brown."), ("How many are there?", "Two.")]
    assert g.image == PHOTO.read_bytes() and g.image_ref == "000000441147.jpg"
    t = kept["mix-good_text"]
    assert t.image is None and t.system == "You are terse." and t.turns == [("What is 2+2?", "4")]
    assert r.manifest.counts["by_status"] == {"kept": 2, "rejected": 14, "duplicate": 0, "error": 0}


def test_vqa_llava_bench_all_kept_with_categories(tmp_path):
    out = tmp_path / "out"
    cli.ingest(["--input", str(QA90 / "qa90_vqa.jsonl"), "--format", "vqa", "--name", "llava_qa90",
                "--images", str(QA90 / "images"), "--output", str(out)])
    kept = _samples(out)
    assert len(kept) == 90
    cats = sorted(s.category for s in kept.values())
    assert cats == ["complex"] * 30 + ["conv"] * 30 + ["detail"] * 30
    s0 = kept["llava_qa90-0"]
    assert s0.turns == [("<image>\nWhat is the color of the two suitcases in the image?",
                         "The colors of the two suitcases in the image are black and brown with yellow details.")]
    assert s0.image == (QA90 / "images" / "000000441147.jpg").read_bytes()


def test_minicpmv_caption_text_and_zh_prompts(tmp_path, images):
    mc = tmp_path / "mc.json"
    mc.write_text(json.dumps([
        {"id": "a", "image": "000000441147.jpg", "conversations": [
            {"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "Luggage."}]},
    ]))
    cap = tmp_path / "cap.jsonl"
    cap.write_text(
        json.dumps({"id": "c1", "image": "000000441147", "caption": "two suitcases"}) + "\n"
        + json.dumps({"id": "c2", "image": "000000441147.jpg", "caption": "两个手提箱"}) + "\n"
        + "{broken\n"
    )
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    cli.ingest(["--input", str(mc), "--format", "minicpmv", "--images", str(images), "--output", str(out1)])
    cli.ingest(["--input", str(cap), "--format", "caption", "--images", str(images), "--output", str(out2)])
    a = _samples(out1)["mc-a"]
    assert a.turns == [("<image>\nWhat is shown?", "Luggage.")] and a.image is not None
    caps = _samples(out2)
    from transforms.sft_ingest import CAPTION_PROMPTS_EN, CAPTION_PROMPTS_ZH

    q1, a1 = caps["cap-c1"].turns[0]
    q2, a2 = caps["cap-c2"].turns[0]
    assert a1 == "two suitcases" and q1.startswith("<image>\n") and q1[len("<image>\n"):] in CAPTION_PROMPTS_EN
    assert a2 == "两个手提箱" and q2[len("<image>\n"):] in CAPTION_PROMPTS_ZH
    led = _ledger(out2)
    assert sorted(v for v in led.values()) == [("kept", "ok"), ("kept", "ok"), ("rejected", "sft_record_unreadable")]


def test_images_joined_from_a_stage_directory(tmp_path):
    from schemas.records import Pair
    from tests.helpers import make_stage_dir

    stage = make_stage_dir(str(tmp_path / "imgstage"), [
        Pair(key="000000441147", image=PHOTO.read_bytes(), caption="x", source="s#0"),
    ])
    out = tmp_path / "out"
    recs = tmp_path / "v.jsonl"
    recs.write_text(
        json.dumps({"question_id": 1, "image": "coco/val2014/000000441147.jpg", "question": "What?", "answers": ["a", "b", "b"]}) + "\n"
        + json.dumps({"question_id": 2, "image": "000000000002.jpg", "question": "What?", "answer": "x"}) + "\n"
    )
    cli.ingest(["--input", str(recs), "--format", "vqa", "--name", "v", "--images", stage, "--output", str(out)])
    assert _ledger(out) == {"v-1": ("kept", "ok"), "v-2": ("rejected", "sft_image_not_found")}
    s = _samples(out)["v-1"]
    assert s.turns == [("<image>\nWhat?", "b")] and s.image == PHOTO.read_bytes()


def test_rewrite_stage_output_becomes_conversations(tmp_path):
    from schemas.records import Pair
    from tests.helpers import make_stage_dir

    stage = make_stage_dir(str(tmp_path / "rw"), [
        Pair(key="k1", image=PHOTO.read_bytes(), caption="fireworks", source="s#0",
             qa=[{"question": "What lights the sky?", "answer": "Fireworks."}]),
        Pair(key="k2", image=None, caption="fireworks over a pier", source="s#1"),
        Pair(key="k3", image=None, caption="  ", source="s#2"),
    ], stage="rewrite")
    out = tmp_path / "out"
    cli.ingest(["--input", stage, "--format", "rewrite", "--name", "rw", "--output", str(out)])
    assert _ledger(out) == {"k1": ("kept", "ok"), "k2": ("kept", "ok"), "k3": ("rejected", "sft_empty_answer")}
    s = _samples(out)
    assert s["k1"].turns == [("<image>\nWhat lights the sky?", "Fireworks.")]
    assert s["k2"].image is None and s["k2"].turns[0][1] == "fireworks over a pier"


def test_unusable_input_is_a_user_error(tmp_path):
    from schemas.errors import UserError

    with pytest.raises(UserError, match="no .json/.jsonl file found"):
        cli.ingest(["--input", str(tmp_path / "nope.json"), "--format", "llava", "--output", str(tmp_path / "o")])


def test_images_joined_from_img2dataset_shards(tmp_path):
    import tarfile

    i2d = REPO / "data" / "sample" / "i2d_webdataset"
    with tarfile.open(i2d / "00000.tar") as tar:
        want = tar.extractfile("0000003.jpg").read()
    recs = tmp_path / "c.jsonl"
    recs.write_text(
        json.dumps({"id": "a", "image": "0000003.jpg", "caption": "a photo"}) + "\n"
        + json.dumps({"id": "b", "image": "9999999.jpg", "caption": "a photo"}) + "\n"
    )
    out = tmp_path / "out"
    r = cli.ingest(["--input", str(recs), "--format", "caption", "--name", "c", "--images", str(i2d), "--output", str(out)])
    assert r.manifest.config["images"] == "i2d"
    assert _ledger(out) == {"c-a": ("kept", "ok"), "c-b": ("rejected", "sft_image_not_found")}
    assert _samples(out)["c-a"].image == want


def test_same_bytes_on_another_runner_mode(tmp_path):
    from transforms.stage_io import read_manifest

    a, b = tmp_path / "a", tmp_path / "b"
    base = ["--input", str(QA90 / "qa90_vqa.jsonl"), "--format", "vqa", "--name", "llava_qa90", "--images", str(QA90 / "images")]
    cli.ingest(base + ["--output", str(a), "--num-shards", "8"])
    cli.ingest(base + ["--output", str(b), "--num-shards", "8", "--direct_running_mode=multi_processing",
                       "--direct_num_workers=2"])
    fa, fb = read_manifest(str(a)).files, read_manifest(str(b)).files
    assert [(f.path, f.sha256) for f in fa] == [(f.path, f.sha256) for f in fb] and len(fa) == 16
