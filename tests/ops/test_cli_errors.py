"""How `mmcorpus` ends a failed command: a stage its engine could not finish (``StageFailed``, e.g.
Dask's KilledWorker) prints one ``mmcorpus NAME: error: ...`` line and exits 1 with no traceback,
unless ``MMCORPUS_LOG_LEVEL=DEBUG``; bugs keep their traceback. The engine failure itself, on a real
Dask cluster, is in tests/engine/test_dask_poison.py; here the stage's main() is replaced by one that
raises (fault injection)."""

from __future__ import annotations

import pytest

from pipelines import cli
from pipelines import filter as filter_
from schemas.errors import StageFailed

MESSAGE = ("Dask engine: a task's workers died repeatedly (Attempted to run task x on 2 different workers); "
           "the stage did not finish and its output has no manifest. Check the workers' memory limit and logs, "
           "then rerun the stage")


def _raising(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_stage_failure_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.delenv("MMCORPUS_LOG_LEVEL", raising=False)
    try:
        raise RuntimeError("distributed.scheduler.KilledWorker: the cause")
    except RuntimeError as cause:
        failure = StageFailed(MESSAGE)
        failure.__cause__ = cause
    monkeypatch.setattr(filter_, "main", _raising(failure))
    assert cli.main(["filter", "--input", "x", "--output", "y"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"mmcorpus filter: error: {MESSAGE}\n"
    assert captured.out == ""


def test_run_script_ends_the_same_way(monkeypatch, capsys):
    # `python pipelines/filter.py ...`, as Airflow's Beam operator runs a stage.
    monkeypatch.delenv("MMCORPUS_LOG_LEVEL", raising=False)
    monkeypatch.setattr("sys.argv", ["pipelines/filter.py", "--input", "x"])
    with pytest.raises(SystemExit) as ended:
        cli.run_script(_raising(StageFailed(MESSAGE)), "filter")
    assert ended.value.code == 1
    assert capsys.readouterr().err == f"mmcorpus filter: error: {MESSAGE}\n"


def test_debug_log_level_keeps_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("MMCORPUS_LOG_LEVEL", "DEBUG")
    monkeypatch.setattr(filter_, "main", _raising(StageFailed(MESSAGE)))
    with pytest.raises(StageFailed, match="workers died repeatedly"):
        cli.main(["filter"])
    assert "error:" not in capsys.readouterr().err


def test_a_bug_is_not_dressed_up_as_a_stage_failure(monkeypatch, capsys):
    monkeypatch.delenv("MMCORPUS_LOG_LEVEL", raising=False)
    monkeypatch.setattr(filter_, "main", _raising(RuntimeError("something else broke")))
    with pytest.raises(RuntimeError, match="something else broke"):
        cli.main(["filter"])
    assert capsys.readouterr().err == ""


def test_user_errors_still_exit_2(monkeypatch, capsys):
    assert cli.main(["filter", "--input", "/nonexistent/input.tsv", "--output", "/nonexistent/out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmcorpus filter: error: ") and "/nonexistent/input.tsv" in err, err
