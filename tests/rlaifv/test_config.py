"""`--config FILE` tables [rlaifv.generate], [rlaifv.feedback], [rlaifv.pairs]: read, overridden by flags,
validated by key (exit 2 naming it), and the effective settings in the manifest's config and hash."""

from __future__ import annotations

import json

import pytest

from pipelines import cli as mmcorpus
from pipelines import rlaifv as cli
from rewriter.standin import StandInServer
from schemas.records import Pair
from schemas.rlaifv import canonical_json
from transforms.stage_io import read_manifest, read_table

from .responder import photo_pairs, respond


def _response(i, text, score):
    return {"i": i, "seed": i, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "status": "ok", "text": text,
            "finish_reason": "stop", "claims": [], "questions": [], "answers": [], "score": score}


@pytest.fixture
def feedback_stage(tmp_path):
    import helpers

    doc = {"prompt": "What?", "prompt_source": "pool", "policy_model": "p", "prompt_version": "v",
           "responses": [_response(0, "a", 0), _response(1, "bb", -1), _response(2, "ccc", -3)]}
    pairs = [Pair(key=f"k{i}", caption="c", source="s", meta=canonical_json({"rlaifv": doc})) for i in range(3)]
    return helpers.make_stage_dir(str(tmp_path / "fb"), pairs, stage="rlaifv_feedback", num_shards=1)


def _write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_pairs_config_read_and_flags_override(tmp_path, feedback_stage):
    cfg = _write(tmp_path, "[rewrite]\nmodel = 'other stage, ignored'\n\n"
                           "[rlaifv.pairs]\nmargin = 2\nmax_pairs_per_image = 0\nseed = 5\nnum_shards = 1\n"
                           "balance_lengths = true\n")
    out = str(tmp_path / "pairs")
    assert cli.main(["pairs", "--input", feedback_stage, "--output", out, "--config", cfg]) == 0
    m = read_manifest(out)
    assert m.config["rlaifv_pairs"] == {"margin": 2, "max_pairs_per_image": None, "max_length_ratio": None, "seed": 5,
                                        "balance_lengths": True}
    # scores 0, -1, -3 with margin 2: pairs (0, -3) and (-1, -3) per record, no cap
    assert m.extra["pair_stats"]["pairs"] == 6
    out2 = str(tmp_path / "pairs2")
    assert cli.main(["pairs", "--input", feedback_stage, "--output", out2, "--config", cfg, "--margin", "1"]) == 0
    m2 = read_manifest(out2)
    assert m2.config["rlaifv_pairs"]["margin"] == 1 and m2.config["rlaifv_pairs"]["seed"] == 5
    assert m2.extra["pair_stats"]["pairs"] == 9 and m2.config_hash != m.config_hash


@pytest.mark.parametrize("table, message", [
    ("[rlaifv.pairs]\nmargn = 2\n", "[rlaifv.pairs]: unknown setting(s) ['margn']"),
    ("[rlaifv.pairs]\nmargin = 'two'\n", "[rlaifv.pairs] margin = 'two': expected an integer"),
    ("[rlaifv.pairs]\nmax_length_ratio = true\n", "[rlaifv.pairs] max_length_ratio = True: expected a number"),
    ("[rlaifv.pair]\nmargin = 2\n", "unknown [rlaifv] entry ['pair']"),
    ("[rlaifv.pairs]\ninput = 'x'\n", "[rlaifv.pairs]: unknown setting(s) ['input']"),
    ("[rlaifv.pairs]\nmargin = 0\n", "margin must be >= 1"),
    ("[rlaifv.pairs]\nbalance_lengths = 1\n", "[rlaifv.pairs] balance_lengths = 1: expected true or false"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, feedback_stage, capsys, table, message):
    cfg = _write(tmp_path, table)
    code = mmcorpus.main(["rlaifv", "pairs", "--input", feedback_stage, "--output", str(tmp_path / "p"),
                          "--config", cfg])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_generate_and_feedback_settings_from_config(tmp_path, capsys):
    import helpers

    inp = helpers.make_stage_dir(str(tmp_path / "in"), photo_pairs()[:2], stage="dedup", num_shards=1)
    with StandInServer(respond_body=respond) as srv:
        cfg = _write(tmp_path, f"""
[rlaifv.generate]
policy_endpoint = "{srv.base_url}"
policy_model = "pol"
n = 3
temperature = 0.5
top_p = 0.8
seed = 10
prompt_source = "pool"
num_shards = 1

[rlaifv.feedback]
claims_endpoint = "{srv.base_url}"
claims_model = "llm"
labeler_endpoint = "{srv.base_url}"
labeler_model = "mllm"
logprobs = false
max_claims = 4
num_shards = 1
""")
        assert cli.main(["generate", "--input", inp, "--output", str(tmp_path / "gen"), "--config", cfg,
                         "--top-p", "0.7"]) == 0
        assert len(srv.seen) == 6  # 2 photos x n=3 from the config
        g = read_manifest(str(tmp_path / "gen")).config["rlaifv_generate"]
        assert (g["n"], g["temperature"], g["top_p"], g["seed"], g["prompt_source"]) == (3, 0.5, 0.7, 10, "pool")
        assert (g["policy"]["endpoint"], g["policy"]["model"]) == (srv.base_url, "pol")
        doc = json.loads(read_table(str(tmp_path / "gen")).to_pylist()[0]["meta"])["rlaifv"]
        assert [(r["seed"], r["temperature"], r["top_p"]) for r in doc["responses"]] == \
            [(10, 0.5, 0.7), (11, 0.5, 0.7), (12, 0.5, 0.7)]
        assert cli.main(["feedback", "--input", str(tmp_path / "gen"), "--output", str(tmp_path / "fb"),
                         "--config", cfg]) == 0
        f = read_manifest(str(tmp_path / "fb")).config["rlaifv_feedback"]
        assert (f["logprobs"], f["max_claims"], f["labeler"]["model"]) == (False, 4, "mllm")
        fb_doc = json.loads(read_table(str(tmp_path / "fb")).to_pylist()[0]["meta"])["rlaifv"]
        answers = [a for r in fb_doc["responses"] for a in r["answers"]]
        assert answers and all(a["logprob_yes"] is None and a["logprob_no"] is None for a in answers)  # logprobs = false
    # without the config the endpoints are missing: exit 2 naming the flags and the keys
    code = mmcorpus.main(["rlaifv", "feedback", "--input", str(tmp_path / "gen"), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--claims-endpoint, --claims-model, --labeler-endpoint, --labeler-model required" in err
