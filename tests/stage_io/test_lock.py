"""The run lock: a live run refuses a second one (naming it), a dead run's lock on this host is taken
over, a lock from another host is never broken automatically, a torn lock is cleared."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from schemas.errors import UserError
from storage import lock as L
from storage.lock import LOCK_NAME, RunLock, process_start_ticks


def _write_lock(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    info = {"stage": "filter", "started": "2026-11-30T10:00:00+00:00", "token": "t0", "host": socket.gethostname()}
    info.update(fields)
    (out / LOCK_NAME).write_text(json.dumps(info))
    return info


def test_lock_file_names_pid_host_and_start_and_is_removed_on_exit(tmp_path):
    out = tmp_path / "out"
    with RunLock(str(out), "dedup"):
        held = json.loads((out / LOCK_NAME).read_text())
        assert (held["pid"], held["host"], held["stage"]) == (os.getpid(), socket.gethostname(), "dedup")
        assert held["started"].endswith("+00:00") and held["start_ticks"] == process_start_ticks(os.getpid())
    assert not (out / LOCK_NAME).exists()


def test_second_run_refuses_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with RunLock(str(out), "filter"):
        with pytest.raises(UserError) as e:
            RunLock(str(out), "filter").acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg
    assert msg.startswith(f"{out} is in use by a running mmcorpus filter run")
    assert str(out / LOCK_NAME) in msg


def test_live_process_on_this_host_is_not_stale(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "out", pid=child.pid, start_ticks=process_start_ticks(child.pid))
        with pytest.raises(UserError, match=f"pid {child.pid} on host"):
            RunLock(str(tmp_path / "out"), "filter").acquire()
    finally:
        child.kill()
        child.wait()


def test_dead_and_zombie_processes_leave_stale_locks(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: the pid no longer exists
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        for name, pid in (("dead", dead.pid), ("zombie", zombie.pid)):
            out = tmp_path / name
            _write_lock(out, pid=pid)
            with RunLock(str(out), "pack") as lk:
                assert json.loads((out / LOCK_NAME).read_text())["token"] == lk.token
            assert os.listdir(out) == []  # no aside copies left behind
    finally:
        zombie.wait()


def test_reused_pid_is_stale(tmp_path):
    # our own pid, but the lock says the process started at another time: the pid was reused
    _write_lock(tmp_path / "out", pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()) - 1)
    with RunLock(str(tmp_path / "out"), "filter"):
        pass


def test_lock_from_another_host_is_never_broken(tmp_path):
    _write_lock(tmp_path / "out", pid=999999999, host="elsewhere-node-7")
    with pytest.raises(UserError) as e:
        RunLock(str(tmp_path / "out"), "filter").acquire()
    assert "pid 999999999 on host elsewhere-node-7" in str(e.value)
    assert "never broken automatically" in str(e.value)
    assert (tmp_path / "out" / LOCK_NAME).exists()


def test_torn_lock_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "TORN_LOCK_SECONDS", 0.2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_NAME).write_bytes(b"")  # crash between create and write
    with RunLock(str(tmp_path / "out"), "filter"):
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_release_leaves_a_lock_it_does_not_hold(tmp_path):
    out = tmp_path / "out"
    lk = RunLock(str(out), "filter")
    lk.acquire()
    _write_lock(out, pid=1, token="someone-else")
    lk.release()
    assert json.loads((out / LOCK_NAME).read_text())["token"] == "someone-else"


def test_the_lock_appears_whole_never_empty(tmp_path, monkeypatch):
    """The lock name comes into existence already holding its JSON (hard link of a written private
    file): a run paused right after creating an empty lock looked torn to a second run, which removed
    it and ran too (seen in CI under load: test_crash's reference filter run)."""
    out = tmp_path / "out"
    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append((json.loads(open(src).read())["stage"], os.path.exists(dst)))
        return real_link(src, dst)

    monkeypatch.setattr(L.os, "link", link)
    with RunLock(str(out), "pack"):
        assert seen == [("pack", False)]  # content written before the lock's name existed
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # the private file is gone
        with pytest.raises(UserError):
            RunLock(str(out), "pack").acquire()  # the link fails on the existing lock: refused
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    assert os.listdir(out) == []
