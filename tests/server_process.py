"""The console script as a real server process, for tests that must survive what they send.

A request that crashes the engine (a segfault in llama.cpp) would take an in-process test run
down with it; against a separate process the test sees the crash as a dead process and says
so. Used by the hostile-input tests and the fuzz suite.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
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
