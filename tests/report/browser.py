"""A real headless Chromium driven over the DevTools protocol: load a file URL, collect console
errors, failed loads, uncaught exceptions and JavaScript dialogs, evaluate DOM queries."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]


@dataclass
class PageEvents:
    console_errors: list[str] = field(default_factory=list)  # console.error/assert, uncaught exceptions, Log errors
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt messages


class Chromium:
    """One browser process (own temporary profile), one page at a time."""

    def __init__(self, timeout: float = 90.0):
        from websockets.sync.client import connect

        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="mmcorpus-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = pathlib.Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start its DevTools endpoint (exit {self.proc.returncode})")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self._conn = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=timeout)
        self.ws = self._conn.__enter__()
        self._id = 0
        self._events: list[dict] = []
        self._replies: dict[int, dict] = {}

    def _post(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        return self._id

    def _receive(self, timeout: float) -> None:
        """One message: replies are kept by id, events in order. A dialog blocks its page (and its
        load event) until answered, so it is answered at once (without waiting for the reply)."""
        msg = json.loads(self.ws.recv(timeout=timeout))
        if "id" in msg:
            self._replies[msg["id"]] = msg
            return
        self._events.append(msg)
        if msg.get("method") == "Page.javascriptDialogOpening":
            self._post("Page.handleJavaScriptDialog", {"accept": True}, session=msg.get("sessionId"))

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        mid = self._post(method, params, session)
        deadline = time.monotonic() + self.timeout
        while mid not in self._replies:
            self._receive(max(0.1, deadline - time.monotonic()))
        reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _pump(self, until, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until():
                return
            try:
                self._receive(0.2)
            except TimeoutError:
                continue

    def open(self, url: str, width: int = 1280, height: int = 4000) -> tuple[str, PageEvents]:
        """Open ``url`` in a new tab; returns (session id, what happened while it loaded)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self._events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        self._pump(lambda: any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                               for e in self._events), self.timeout)
        self._pump(lambda: False, 0.5)  # late console messages
        return session, self._collect(session)

    def _collect(self, session: str) -> PageEvents:
        ev = PageEvents()
        for e in self._events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                ev.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                ev.console_errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                ev.console_errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif m == "Page.javascriptDialogOpening":
                ev.dialogs.append(p.get("message", ""))
        return ev

    def evaluate(self, session: str, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.send("Browser.close")
                except Exception:  # the browser may close the socket before answering
                    pass
                self._conn.__exit__(None, None, None)
        finally:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
            shutil.rmtree(self.profile, ignore_errors=True)


def screenshot(url: str, out_png: str | os.PathLike, width: int = 1280, height: int = 2000, timeout: float = 120) -> None:
    """``chromium --headless --screenshot`` of ``url`` (own temporary profile)."""
    profile = tempfile.mkdtemp(prefix="mmcorpus-chromium-")
    try:
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out_png}", url], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def dump_dom(url: str, timeout: float = 120) -> str:
    """``chromium --headless --dump-dom``: the DOM after the page loaded, serialised."""
    profile = tempfile.mkdtemp(prefix="mmcorpus-chromium-")
    try:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url], check=True,
                              timeout=timeout, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
