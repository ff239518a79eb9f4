"""Servers for the tests: the app's settings, a real uvicorn in a thread, the console script.

``LiveServer`` serves an app built in the test (its backend the test's own) over a real
loopback socket. ``ServerProcess`` runs the console script as a separate process, for tests
that must survive what they send: a request that crashes the engine (a segfault in llama.cpp)
would take an in-process test run down with it; against a separate process the test sees the
crash as a dead process and says so (the hostile-input tests, the fuzz suite, SIGTERM).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from app.settings import Settings


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``python -m app.cli --model MODEL ARGS...`` on a free loopback port, until stopped."""

    def __init__(self, model: Path, *args: str, cache_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command: Sequence[str] = [
            sys.executable, "-m", "app.cli", "--model", str(model), "--port", str(self.port),
            "--cache-dir", str(cache_dir), "--log-level", "warning", *args,
        ]  # fmt: skip
        self._log = cache_dir / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        with self._log.open("wb") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while True:
                if not self.alive:
                    raise RuntimeError(f"the server exited at start:\n{self.log()}")
                try:
                    if http.get("/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become healthy:\n{self.log()}")
                time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self, tail: int | None = 4000) -> str:
        """What the server printed (its last ``tail`` characters; None: all of it)."""
        text = self._log.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def settings_for(**overrides: object) -> Settings:
    """Settings for an app around an injected backend (``model`` unset: the demo model's id).

    Transport tests see the model's raw text (``reasoning_format`` ``none``), so the whole
    demo script is ``content``; the Qwen3 semantics tests set what they test.
    """
    values: dict[str, object] = {"sse_keepalive_s": 15.0, "reasoning_format": "none"}
    values.update(overrides)
    return Settings.model_validate(values)


class LiveServer:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture
def live_server(demo_backend: LlamaBackend) -> Iterator[LiveServer]:
    """The app around the one-slot demo engine, on a real socket."""
    with LiveServer(create_app(settings_for(), backend=demo_backend)) as server:
        yield server
