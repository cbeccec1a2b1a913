"""`mmcorpus inspect DIR` on a directory of runs at any depth (what `mmcorpus demo` writes: photos/,
cc3m/, laion/ side by side), tables and `--json`, built from copies of one real run of the stages."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines import inspection
from schemas.errors import UserError
from schemas.manifest import MANIFEST_NAME

STAGES = ("filter", "dedup", "rewrite", "pack")


@pytest.fixture()
def runs_tree(demo_run, tmp_path):
    """root/photos/{4 stages}, root/cc3m/{filter,dedup}, root/nightly/2026/11/30/{filter} (depth 4),
    plus a stray directory without outputs."""
    root = tmp_path / "demo"
    layout = {"photos": STAGES, "cc3m": ("filter", "dedup"), "nightly/2026/11/30": ("filter",)}
    for run, stages in layout.items():
        for s in stages:
            shutil.copytree(demo_run[s], root / run / s)
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "models" / "tiny" / "config.json").write_text("{}")
    return root, layout


def _counts(stage_dir) -> dict:
    return json.loads((stage_dir / MANIFEST_NAME).read_text())["counts"]


def test_inspect_directory_of_runs_json(runs_tree, capsys):
    root, layout = runs_tree
    capsys.readouterr()
    assert inspection.main([str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"runs"}
    assert [r["run"] for r in out["runs"]] == [str(root / "cc3m"), str(root / "nightly/2026/11/30"), str(root / "photos")]
    for run in out["runs"]:
        rel = run["run"][len(str(root)) + 1:]
        assert [s["stage"] for s in run["stages"]] == list(layout[rel])
        for s in run["stages"]:
            c = _counts(root / rel / s["stage"])
            assert (s["dir"], s["inputs"], s["outputs"], s["by_status"]) == (
                str(root / rel / s["stage"]), c["inputs"], c["outputs"], c["by_status"])


def test_inspect_directory_of_runs_table_and_relative_path(runs_tree, capsys, monkeypatch):
    root, layout = runs_tree
    monkeypatch.chdir(root.parent)
    capsys.readouterr()
    assert inspection.main(["demo/"]) == 0
    out = capsys.readouterr().out
    for run in ("demo/cc3m", "demo/nightly/2026/11/30", "demo/photos"):
        assert f"run {run}" in out
    assert "3 runs below demo" in out
    # A single run still answers as one run, and a stage output as one stage.
    assert set(json.loads(_json(["demo/photos"], capsys))) == {"run"}
    assert set(json.loads(_json(["demo/photos/pack"], capsys))) == {"describe"}


def _json(argv, capsys) -> str:
    capsys.readouterr()
    assert inspection.main(argv + ["--json"]) == 0
    return capsys.readouterr().out


def test_key_on_a_directory_of_runs_names_the_runs(runs_tree):
    root, _ = runs_tree
    with pytest.raises(UserError, match=r"--key follows a sample through one run, and .* holds 3 runs: pass one of .*cc3m"):
        inspection.main([str(root), "--key", "abc"])
    with pytest.raises(UserError, match="no manifest.json and no stage outputs below it"):
        inspection.main([str(root / "models")])
