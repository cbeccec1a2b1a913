"""Bad `select` configs exit 2 before any work, with the exact message naming the key (and nothing
written); good edge configs (a stage's target of the other kind, quotas over default weights) load."""

from __future__ import annotations

import pathlib
import sys

import pytest

from pipelines import cli
from schemas.records import Pair
from transforms.selection import load_select_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from helpers import make_stage_dir  # noqa: E402


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("selcfg")
    pairs = [Pair(key=f"cc3m-{i}", caption=f"a caption number {i}", source="t", dataset="cc3m", lang="en")
             for i in range(6)]
    pairs += [Pair(key=f"laion-{i}", caption=f"another caption {i}", source="t", dataset="laion", lang="zh")
              for i in range(4)]
    data = make_stage_dir(str(root / "dedup"), pairs, stage="dedup")
    return root, data


CASES = [
    ("weights_sum", "[select]\ntarget_pairs = 5\n[select.weights]\ncc3m = 0.5\nlaion = 0.4\n",
     "{cfg} [select] weights: shares sum to 0.9, they must sum to 1"),
    ("languages_sum", "[select]\ntarget_pairs = 5\n[select.languages]\nen = 0.7\nzh = 0.2\n",
     "{cfg} [select] languages: shares sum to 0.9, they must sum to 1"),
    ("unknown_source", "[select]\ntarget_pairs = 5\n[select.weights]\ncc3m = 0.5\nwukong = 0.5\n",
     "{cfg} weights: unknown source name(s) ['wukong']; the input holds ['cc3m', 'laion']"),
    ("unknown_quota_source", "[select]\n[select.quotas]\ncc3m = 2\ncoyo = 3\n",
     "{cfg} quotas: unknown source name(s) ['coyo']; the input holds ['cc3m', 'laion']"),
    ("unknown_language", "[select]\ntarget_pairs = 5\n[select.languages]\nen = 0.5\nfr = 0.5\n",
     "{cfg} languages: no input record has language ['fr']; the input holds ['en', 'zh'] (records without a "
     "lang count as 'und')"),
    ("target_above_pool", "[select]\ntarget_pairs = 11\n",
     "{cfg} target_pairs: 11 is larger than the input's 10 records and on_short is not 'upsample'; lower "
     "target_pairs or set on_short = \"upsample\""),
    ("both_targets", "[select]\ntarget_pairs = 5\ntarget_tokens = 500\n",
     "{cfg} [select]: set target_pairs or target_tokens, not both"),
    ("both_targets_in_stage", "[select]\ntarget_pairs = 5\n[select.stage1]\ntarget_pairs = 5\ntarget_tokens = 500\n",
     "{cfg} [select.stage1]: set target_pairs or target_tokens, not both"),
    ("weights_and_quotas", "[select]\ntarget_pairs = 5\n[select.weights]\ncc3m = 1.0\n[select.quotas]\ncc3m = 5\n",
     "{cfg} [select]: set weights or quotas, not both"),
    ("no_target", "[select]\non_short = \"report\"\n",
     "{cfg} [select]: no target; set target_pairs (pairs) or target_tokens (tokens, the pack stage's accounting)"),
    ("bad_target_tokens", "[select]\ntarget_tokens = 0\n",
     "{cfg} [select] target_tokens: must be an integer >= 1, got 0"),
    ("quota_sum", "[select]\ntarget_pairs = 6\n[select.quotas]\ncc3m = 2\nlaion = 3\n",
     "{cfg} [select] target_pairs: 6 differs from the quotas' sum 5; drop one"),
    ("query_num_with_pairs", "[select]\ntarget_pairs = 5\nquery_num = 64\n",
     "{cfg} [select] query_num: only used with target_tokens (token accounting); drop it"),
    ("bad_query_num", "[select]\ntarget_tokens = 500\nquery_num = 32\n",
     "{cfg} [select] query_num: must be one of [96, 64], got 32"),
    ("missing_tokenizer", "[select]\ntarget_tokens = 500\ntokenizer = \"/nonexistent/tok.json\"\n",
     "{cfg} tokenizer: /nonexistent/tok.json does not exist (a tokenizer.json or a tokenizer dir)"),
    ("bad_on_short", "[select]\ntarget_pairs = 5\non_short = \"pad\"\n",
     "{cfg} [select] on_short: must be one of ['report', 'upsample'], got 'pad'"),
    ("bad_overlap", "[select]\ntarget_pairs = 5\noverlap = \"some\"\n",
     "{cfg} [select] overlap: must be one of ['disjoint', 'allow'], got 'some'"),
    ("bad_text_rich_share", "[select]\ntarget_pairs = 5\ntext_rich_share = 1.5\n",
     "{cfg} [select] text_rich_share: must be a number in [0, 1], got 1.5"),
    ("negative_weight", "[select]\ntarget_pairs = 5\n[select.weights]\ncc3m = 1.5\nlaion = -0.5\n",
     "{cfg} [select] weights.laion: share must be a number >= 0, got -0.5"),
    ("earlier_not_select", "[select]\ntarget_pairs = 5\nearlier = \"{data}\"\n",
     "{cfg} earlier: {data} is a 'dedup' output, not a select output"),
    ("unknown_key", "[select]\ntarget_pairs = 5\nweigths = 1\n",
     "{cfg} [select]: unknown key(s) ['weigths']; known: ['allow_upscale', 'earlier', 'languages', 'min_side', "
     "'on_short', 'overlap', 'query_num', 'quotas', 'salt', 'target_pairs', 'target_tokens', 'text_rich_share', "
     "'tokenizer', 'weights']"),
    ("no_select_table", "[selection]\ntarget_pairs = 5\n",
     "{cfg}: no [select] table; see docs/selection.md for an example mix.toml"),
]


@pytest.mark.parametrize("name, toml, message", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_the_key(stage_dirs, tmp_path, capsys, name, toml, message):
    _, data = stage_dirs
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(toml.replace("{data}", data))
    out = tmp_path / "out"
    assert cli.main(["select", "--input", data, "--stage", "1", "--config", str(cfg), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"mmcorpus select: error: {message.format(cfg=cfg, data=data)}\n"
    assert not out.exists()


def test_a_stage_target_or_split_of_the_other_kind_replaces_the_default():
    doc = {"select": {"target_pairs": 100, "weights": {"a": 0.5, "b": 0.5},
                      "stage3": {"target_tokens": 5000, "quotas": {"a": 4000, "b": 1000}}}}
    s1, s3 = load_select_config(doc, 1), load_select_config(doc, 3)
    assert (s1.target_pairs, s1.target_tokens, s1.unit, s1.weights) == (100, None, "pairs", (("a", 0.5), ("b", 0.5)))
    assert (s3.target_pairs, s3.target_tokens, s3.unit, s3.weights, s3.quotas) == (
        None, 5000, "tokens", (), (("a", 4000), ("b", 1000)))
