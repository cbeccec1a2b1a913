"""The whole RLAIF-V chain from the bundled photos to DPO files against three stand-in servers
(policy, claims, labeler), exact counts; a rerun pays 0 requests; exports read back with `datasets`."""

from __future__ import annotations

import json
import os

from .responder import respond

from pipelines import rlaifv as cli
from rewriter.standin import StandInServer
from schemas.rlaifv import PAIR_META_KEY, get_doc
from transforms.stage_io import read_manifest, read_table


def _run(argv):
    assert cli.main(argv) == 0


def _ledger(d):
    return sorted((r["key"], r["status"], r["reason"]) for r in read_table(d, "ledger").to_pylist())


def test_chain_photos_to_dpo(photos_stage, tmp_path, capsys):
    out = tmp_path / "out"
    cache = str(out / "cache")
    with StandInServer(respond_body=respond) as pol, StandInServer(respond_body=respond) as clm, \
            StandInServer(respond_body=respond) as lab:
        common = ["--cache-dir", cache, "--num-shards", "2", "--concurrency", "8", "--timeout", "20"]
        gen = ["generate", "--input", photos_stage, "--output", str(out / "gen"), "--policy-endpoint", pol.base_url,
               "--policy-model", "policy", "--n", "4", "--temperature", "0.8", "--top-p", "0.95", "--seed", "0",
               *common]
        _run(gen)
        err = capsys.readouterr().err
        assert "rlaifv generate: ~32 requests" in err  # the estimate printed before the run
        assert len(pol.seen) == 32 and all(r.images == 1 for r in pol.seen)
        assert sorted(int(r.caption.rsplit("|seed=", 1)[1].split("|")[0]) for r in pol.seen) == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
        m = read_manifest(str(out / "gen"))
        assert (m.counts["inputs"], m.counts["outputs"]) == (8, 8)
        rows = read_table(str(out / "gen")).to_pylist()
        doc = json.loads(rows[0]["meta"])["rlaifv"]
        assert [(r["i"], r["seed"], r["temperature"], r["top_p"], r["max_tokens"], r["status"])
                for r in doc["responses"]] == [(i, i, 0.8, 0.95, 256, "ok") for i in range(4)]
        assert doc["prompt_source"] == "pool"

        fb = ["feedback", "--input", str(out / "gen"), "--output", str(out / "fb"),
              "--claims-endpoint", clm.base_url, "--claims-model", "llm",
              "--labeler-endpoint", lab.base_url, "--labeler-model", "mllm", *common]
        _run(fb)
        assert "rlaifv feedback: ~256 requests" in capsys.readouterr().err  # 8 x 4 responses x (2 + 6 claims)
        # per image: responses of seeds 0 and 3 are the same text, so 3 distinct claim lists and 3 question
        # lists; the distinct questions are "photo", "wrong thing 0", "wrong thing 1": 3 labeler calls
        # (identical requests in flight share one HTTP request; without that the count depends on timing)
        assert len(clm.seen) == 8 * 6 and all(r.images == 0 for r in clm.seen)
        assert len(lab.seen) == 8 * 3 and all(r.images == 1 for r in lab.seen)
        assert _ledger(str(out / "fb")) == [(p, "kept", "ok") for p in
                                             sorted(["astronaut", "camera", "chelsea", "coffee", "horse",
                                                     "motorcycle-right", "page", "rocket"])]
        fbrow = json.loads(read_table(str(out / "fb")).to_pylist()[0]["meta"])["rlaifv"]
        r1 = fbrow["responses"][1]
        assert r1["score"] == -1 and len(r1["claims"]) == 2 and len(r1["questions"]) == 2
        assert [a["answer"] for a in r1["answers"]] == ["yes", "no"]
        assert r1["answers"][1]["logprob_no"] == -0.05 and r1["answers"][1]["logprob_yes"] == -3.0
        assert [r["score"] for r in fbrow["responses"]] == [0, -1, -2, 0]
        capsys.readouterr()
        _run(["show", "--input", str(out / "fb"), "--key", "astronaut"])
        shown = json.loads(capsys.readouterr().out)["rlaifv"]["responses"][2]
        assert shown["claims"][1:] == ["There is a wrong thing 0.", "There is a wrong thing 1."]
        assert shown["questions"][1] == "Is it true that there is a wrong thing 0?" and shown["score"] == -2

        _run(["pairs", "--input", str(out / "fb"), "--output", str(out / "pairs"), "--margin", "1",
              "--max-pairs-per-image", "2", "--seed", "7", "--num-shards", "2"])
        pm = read_manifest(str(out / "pairs"))
        # scores 0,-1,-2,0: 5 candidate pairs (the 0/0 tie dropped), capped at 2 per image; one record per image
        assert (pm.counts["inputs"], pm.counts["outputs"]) == (8, 8) and pm.counts["by_reason"] == {"kept/ok": 8}
        stats = pm.extra["pair_stats"]
        assert stats["pairs"] == 16
        assert stats["chosen_longer_share"] == 0.0  # every chosen answer has fewer (wrong) sentences
        assert sum(stats["score_gaps"].values()) == 16 and set(stats["score_gaps"]) <= {"1", "2"}
        docs = [p for r in read_table(str(out / "pairs")).to_pylist() for p in get_doc(r["meta"], PAIR_META_KEY)["pairs"]]
        assert len(docs) == 16 and all(d["chosen_score"] > d["rejected_score"] for d in docs)
        # `mmcorpus inspect --key` on the run shows the audit of every rlaifv stage the key went through
        from pipelines import inspection

        capsys.readouterr()
        assert inspection.main([str(out), "--key", "astronaut"]) == 0
        shown = capsys.readouterr().out.splitlines()
        assert [ln for ln in shown if ln.startswith("RLAIF-V audit")] == [
            "RLAIF-V audit at rlaifv_generate (gen):", "RLAIF-V audit at rlaifv_feedback (fb):",
            "RLAIF-V audit at rlaifv_pairs (pairs):"]
        ast = get_doc(next(r for r in read_table(str(out / "fb")).to_pylist() if r["key"] == "astronaut")["meta"])
        fb_audit = shown[shown.index("RLAIF-V audit at rlaifv_feedback (fb):"):shown.index("RLAIF-V audit at rlaifv_pairs (pairs):")]
        assert [ln for ln in fb_audit if ln.startswith("  response")] == [
            f"  response {i} (seed {i}, ok, score {s}): {ast['responses'][i]['text']}" for i, s in enumerate([0, -1, -2, 0])]
        assert fb_audit.count("      question: Is it true that there is a wrong thing 0? -> no (logprob yes -3, no -0.05)") == 2
        assert len([ln for ln in shown[shown.index("RLAIF-V audit at rlaifv_pairs (pairs):"):] if ln.startswith("  pair: ")]) == 2
        from pipelines.verify import main as verify_main

        assert verify_main([str(out / "gen"), str(out / "fb"), str(out / "pairs")]) == 0

        # same seed: same pairs, byte for byte
        _run(["pairs", "--input", str(out / "fb"), "--output", str(out / "pairs2"), "--margin", "1",
              "--max-pairs-per-image", "2", "--seed", "7", "--num-shards", "2"])
        assert [f.sha256 for f in read_manifest(str(out / "pairs2")).files] == [f.sha256 for f in pm.files]

        # a rerun (forced, fresh outputs) pays nothing: every answer comes from the cache
        before = (len(pol.seen), len(clm.seen), len(lab.seen))
        _run([*gen[:4], str(out / "gen2"), *gen[5:], "--force"])
        fb2 = list(fb)
        fb2[2], fb2[4] = str(out / "gen2"), str(out / "fb2")
        _run([*fb2, "--force"])
        assert (len(pol.seen), len(clm.seen), len(lab.seen)) == before
        assert [f.sha256 for f in read_manifest(str(out / "fb2")).files] == \
            [f.sha256 for f in read_manifest(str(out / "fb")).files]

    _run(["export", "--input", str(out / "pairs"), "--output", str(out / "dpo")])
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "dpo" / "trl" / "train.parquet"), split="train")
    assert len(ds) == 16 and set(ds.column_names) == {"prompt", "chosen", "rejected", "images"}
    first = ds[0]
    assert first["prompt"][0]["role"] == "user" and first["prompt"][0]["content"][0]["type"] == "image"
    assert first["images"][0].size == (512, 512)  # PIL image decoded by datasets (astronaut.png)
    # TRL's own data utilities: conversational preference rows whose image placeholders match `images`
    from trl.data_utils import is_conversational, prepare_multimodal_messages, unpair_preference_dataset

    assert all(is_conversational(row) for row in ds)
    msgs = prepare_multimodal_messages(first["prompt"], first["images"])  # raises when the counts differ
    assert [part["type"] for part in msgs[0]["content"]] == ["image", "text"] and msgs[0]["content"][0]["image"].size == (512, 512)
    unpaired = unpair_preference_dataset(ds)
    assert len(unpaired) == 32 and sorted(set(unpaired["label"])) == [False, True]
    lf = datasets.load_dataset("json", data_files=str(out / "dpo" / "llamafactory" / "rlaifv_dpo.json"), split="train")
    assert len(lf) == 16 and lf[0]["conversations"][0]["value"].startswith("<image>")
    assert all(os.path.exists(out / "dpo" / "llamafactory" / p) for row in lf["images"] for p in row)
    info = json.loads((out / "dpo" / "llamafactory" / "dataset_info.json").read_text())
    assert info["rlaifv_dpo"]["ranking"] is True
