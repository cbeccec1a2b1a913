"""One run per output directory: a lock file holding pid, host and start time, with stale-lock detection.

Rule: a lock is stale only when it was written on this host (same ``socket.gethostname()``) and its
process is gone (no such pid, a zombie, or a pid reused by a process that started later). A lock
written on another host is never broken automatically: its process cannot be checked from here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from schemas.errors import UserError
from storage.files import exists, is_remote, join, read_bytes, write_bytes_atomic

LOCK_NAME = ".mmcorpus.lock"
# A lock file that stays empty or unreadable this long was torn by a crash between create and write.
TORN_LOCK_SECONDS = 2.0

log = logging.getLogger("mmcorpus")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid from the original."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` (started at ``start_ticks``, when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _proc_stat(pid)
    if fields is not None:
        if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
            return False
        if start_ticks is not None and len(fields) > 19 and int(fields[19]) != start_ticks:
            return False  # the pid was reused
    return True


class RunLock:
    """``with RunLock(output_dir, stage):`` — refuse (``UserError``) while another run holds the
    directory; take over a stale lock (see the module docstring for the rule).

    On local paths the lock is written whole to a private file and hard-linked into place (``link``
    fails when the lock exists), so two runs that start at the same moment cannot both get it, and a
    lock is never seen empty: a holder paused between creating and writing it (``O_CREAT | O_EXCL``
    then ``write``, as before) looked torn to a second run after ``TORN_LOCK_SECONDS`` and was removed. On object stores (gs://, s3://) there is no exclusive create: the lock
    is written, read back, and the run proceeds only if it still holds its own token (best effort).
    """

    def __init__(self, output_dir: str, stage: str):
        self.output_dir = output_dir
        self.stage = stage
        self.path = join(output_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        pid = os.getpid()
        self.info = {
            "pid": pid,
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stage": stage,
            "start_ticks": process_start_ticks(pid),
            "token": self.token,
        }

    # --- acquire / release -----------------------------------------------------------------------

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(5):
            if self._try_create():
                return
            holder = self._read_holder()
            if holder is None:
                continue  # vanished or torn and now cleared: try again
            if not self._is_stale(holder):
                raise UserError(self._refusal(holder))
            log.warning("%s: taking over a stale lock of %s", self.output_dir, _describe(holder))
            self._break(holder)
        raise UserError(f"{self.path}: could not take the run lock (another run keeps replacing it); retry")

    def release(self) -> None:
        holder = self._read(self.path)
        if holder is not None and holder.get("token") == self.token:
            if is_remote(self.path):
                _delete(self.path)
            else:
                os.remove(self.path)

    # --- internals ---------------------------------------------------------------------------------

    def _payload(self) -> bytes:
        return (json.dumps(self.info, sort_keys=True) + "\n").encode("utf-8")

    def _try_create(self) -> bool:
        if is_remote(self.path):
            if exists(self.path):
                return False
            write_bytes_atomic(self.path, self._payload())
            time.sleep(0.5)  # let a concurrent writer's object land, then see who holds it
            holder = self._read(self.path)
            return holder is not None and holder.get("token") == self.token
        os.makedirs(self.output_dir, exist_ok=True)
        private = f"{self.path}.new-{self.token}"
        with open(private, "wb") as f:
            f.write(self._payload())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            return self._create_exclusive()
        finally:
            os.remove(private)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
            f.flush()
            os.fsync(f.fileno())
        return True

    @staticmethod
    def _read(path: str) -> dict[str, Any] | None:
        try:
            d = json.loads(read_bytes(path).decode("utf-8"))
        except Exception:  # absent, empty (torn) or not JSON
            return None
        return d if isinstance(d, dict) else None

    def _read_holder(self) -> dict[str, Any] | None:
        """The current holder, waiting out a lock being written; a lock still unreadable after
        ``TORN_LOCK_SECONDS`` was torn by a crash and is removed (None is returned)."""
        deadline = time.monotonic() + TORN_LOCK_SECONDS
        while True:
            holder = self._read(self.path)
            if holder is not None or not exists(self.path):
                return holder
            if time.monotonic() > deadline:
                log.warning("%s: removing an unreadable (torn) lock file", self.path)
                _delete(self.path)
                return None
            time.sleep(0.1)

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != self.info["host"]:
            return False
        try:
            pid = int(holder["pid"])
        except (KeyError, TypeError, ValueError):
            return True
        return not pid_alive(pid, holder.get("start_ticks"))

    def _break(self, holder: dict[str, Any]) -> None:
        """Remove a stale lock without ever removing a live one another run put there meanwhile:
        move it aside (atomic locally), then check it was the stale one."""
        if is_remote(self.path):
            _delete(self.path)
            return
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            try:  # we moved a fresh lock: put it back (fails only if yet another run locked meanwhile)
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.remove(aside)

    def _refusal(self, holder: dict[str, Any]) -> str:
        same_host = holder.get("host") == self.info["host"]
        how = (
            "wait for it to finish or stop it"
            if same_host
            else "wait for it to finish; if that run is dead, delete the lock file by hand "
            "(a lock from another host is never broken automatically)"
        )
        return f"{self.output_dir} is in use by a running {_describe(holder)} (lock file {self.path}); {how}"


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"mmcorpus {holder.get('stage', '?')} run (pid {holder.get('pid')} on host {holder.get('host')}, "
        f"started {holder.get('started')})"
    )


def _delete(path: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.exists(path):
        FileSystems.delete([path])
