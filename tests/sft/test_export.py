"""sft export: MiniCPM-V JSON, LLaMA-Factory ShareGPT (+ dataset_info.json), TRL messages + images;
read back with `datasets` and checked against each project's documented schema."""

from __future__ import annotations

import json
import pathlib

import pytest

from pipelines import sft as cli

REPO = pathlib.Path(__file__).resolve().parents[2]
QA90 = REPO / "data" / "sample" / "llava_qa90"


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftexp")
    text = [{"id": "t1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
                                            {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Red."}]}]
    (d / "text.json").write_text(json.dumps(text))
    cli.ingest(["--input", str(QA90 / "qa90_vqa.jsonl"), "--format", "vqa", "--name", "llava_qa90",
                "--images", str(QA90 / "images"), "--output", str(d / "i1")])
    cli.ingest(["--input", str(d / "text.json"), "--format", "text", "--name", "txt", "--output", str(d / "i2")])
    cli.split(["--input", str(d / "i1"), "--input", str(d / "i2"), "--output", str(d / "split")])
    return d / "split"


def _alternates(msgs, user="user", assistant="assistant"):
    roles = [m["role"] for m in msgs]
    return roles == [user, assistant] * (len(roles) // 2) and len(roles) >= 2


def test_minicpmv_export(split_dir, tmp_path, capsys):
    import datasets

    out = tmp_path / "mc"
    assert cli.main(["export", "--input", str(split_dir), "--to", "minicpmv", "--output", str(out)]) == 0
    assert "mmcorpus_sft_part1.json (30), mmcorpus_sft_part2.json (61); 18 images" in capsys.readouterr().out
    assert len(list((out / "images").iterdir())) == 18  # 30 COCO ids share 18 stand-in photos: one file each
    recs1 = json.loads((out / "mmcorpus_sft_part1.json").read_text())
    recs2 = json.loads((out / "mmcorpus_sft_part2.json").read_text())
    assert len(recs1) == 30 and len(recs2) == 61
    # MiniCPM-V finetune/dataset.py: id, image (path), conversations of role/content, <image> in the first user turn
    for r in recs1 + recs2:
        assert _alternates(r["conversations"])
        if "image" in r:
            assert (out / r["image"]).is_file()
            assert r["conversations"][0]["content"].startswith("<image>\n")
        else:
            assert not any("<image>" in m["content"] for m in r["conversations"])
    t1 = next(r for r in recs2 if r["id"] == "txt-t1")
    assert t1["conversations"] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                                   {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    ds = datasets.load_dataset("json", data_files=str(out / "mmcorpus_sft_part1.json"), split="train")
    assert ds.num_rows == 30 and set(ds.column_names) == {"id", "image", "conversations"}


def test_llamafactory_export(split_dir, tmp_path):
    import datasets

    out = tmp_path / "lf"
    cli.main(["export", "--input", str(split_dir), "--to", "llamafactory", "--output", str(out), "--name", "mm"])
    info = json.loads((out / "dataset_info.json").read_text())
    assert sorted(info) == ["mm_part1", "mm_part2"]
    # data/README.md of LLaMA-Factory: sharegpt formatting, OpenAI-style tags, "images" column
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt"
        assert entry["columns"] == {"messages": "messages", "images": "images", "system": "system"}
        assert entry["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
        recs = json.loads((out / entry["file_name"]).read_text())
        for r in recs:
            assert _alternates(r["messages"])
            # the number of <image> tokens must equal the number of images
            assert sum(m["content"].count("<image>") for m in r["messages"]) == len(r["images"])
            assert all((out / p).is_file() for p in r["images"])
        ds = datasets.load_dataset("json", data_files=str(out / entry["file_name"]), split="train")
        assert ds.num_rows == len(recs)
    recs2 = json.loads((out / info["mm_part2"]["file_name"]).read_text())
    t1 = [r for r in recs2 if r.get("system")]
    assert len(t1) == 1 and t1[0]["system"] == "Be brief." and t1[0]["images"] == []


def test_trl_export(split_dir, tmp_path):
    import datasets

    out = tmp_path / "trl"
    cli.main(["export", "--input", str(split_dir), "--to", "trl", "--output", str(out)])
    path = out / "mmcorpus_sft_part1.jsonl"
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds.num_rows == 30 and set(ds.column_names) == {"messages", "images"}
    # TRL vision datasets: "images" list + conversational "messages" whose content is a list of
    # {"type": "image"} / {"type": "text", "text"} parts, one image part per image
    ds = ds.map(lambda r: {"images": [str(out / p) for p in r["images"]]})
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    row = ds[0]
    assert row["images"][0].size[0] > 0
    for r in ds:
        assert _alternates(r["messages"])
        parts = [p for m in r["messages"] for p in m["content"]]
        assert sum(p["type"] == "image" for p in parts) == len(r["images"]) == 1
        assert r["messages"][0]["content"][0]["type"] == "image"
        assert all(p["type"] in ("image", "text") for p in parts)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["messages"][0]["content"][1]["type"] == "text" and "<image>" not in json.dumps(first)
