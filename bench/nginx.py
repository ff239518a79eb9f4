"""The shipped ``deploy/nginx/nginx.conf``, run for real on loopback (tests and ``bench.replicas``).

``render`` takes the shipped file and changes only what a run outside Docker must change:
the upstream's ``server`` lines name the given replicas (keeping their parameters), nginx
listens on a loopback port, Docker's resolver and the ``resolve`` parameter go (they need
Docker's DNS and nginx 1.27.3; the Debian package is older), and the process stays in the
foreground with its pid file and temporary files in its own folder. Every change must apply
exactly where expected, or ``render`` raises: a reworded shipped file then fails the tests
that run it instead of quietly running something else. ``balance`` swaps the load-balancing
line for another, for the bench's comparison with what the file said before.

Decision: one renderer for the tests and the bench, so both run the same file the same way;
the alternative, a test-only copy of the configuration, would prove nothing about the shipped
one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "nginx" / "nginx.conf"
UPSTREAM = "qwen3_moe_serve"
NGINX_ENV = "NGINX"

_UPSTREAM_BLOCK = re.compile(rf"(upstream\s+{UPSTREAM}\s*\{{)(.*?)(\n\s*\}})", re.DOTALL)
_SERVER_LINE = re.compile(
    r"^([ \t]*)server\s+[\w.-]+:\d+((?:\s+[^;\s]+)*)\s*;[ \t]*\n", re.MULTILINE
)
_BALANCE_LINE = re.compile(r"^([ \t]*)(least_conn|ip_hash|random[^;]*|hash\s[^;]*);", re.MULTILINE)
_RESOLVER_LINE = re.compile(r"^\s*resolver\s[^;]*;[ \t]*\n", re.MULTILINE)
_LISTEN_LINE = re.compile(r"^([ \t]*)listen\s+\d+\s*;", re.MULTILINE)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> Path | None:
    """``$NGINX``, else ``nginx`` on ``PATH``, else the Debian package's ``/usr/sbin/nginx``."""
    named = os.environ.get(NGINX_ENV)
    candidates = [named] if named else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate)
    return None


def _one(pattern: re.Pattern[str], text: str, what: str) -> re.Match[str]:
    found = list(pattern.finditer(text))
    if len(found) != 1:
        raise ValueError(f"{SHIPPED.name}: expected one {what}, found {len(found)}")
    return found[0]


def render(
    replicas: Sequence[str],
    port: int,
    prefix: Path,
    *,
    balance: str | None = None,
    shipped: str | None = None,
) -> str:
    """The shipped configuration for ``replicas`` (``host:port``), listening on
    ``127.0.0.1:port``, with its pid and temporary files under ``prefix``."""
    text = SHIPPED.read_text(encoding="utf-8") if shipped is None else shipped
    if not replicas:
        raise ValueError("no replicas")
    text = text.replace(_one(_RESOLVER_LINE, text, "resolver line").group(0), "", 1)
    block = _one(_UPSTREAM_BLOCK, text, f"upstream {UPSTREAM} block")
    body = block.group(2)
    servers = list(_SERVER_LINE.finditer(body))
    if not servers:
        raise ValueError(f"{SHIPPED.name}: the upstream has no server lines")
    indent = servers[0].group(1)
    parameters = " ".join(p for p in servers[0].group(2).split() if p != "resolve")
    lines = "".join(f"{indent}server {r} {parameters};\n".replace(" ;", ";") for r in replicas)
    body = body[: servers[0].start()] + lines + _SERVER_LINE.sub("", body[servers[0].start() :])
    if balance is not None:
        line = _one(_BALANCE_LINE, body, "load-balancing line")
        body = body[: line.start(2)] + balance.rstrip(";") + body[line.end(2) :]
    text = text[: block.start(2)] + body + text[block.end(2) :]
    listen = _one(_LISTEN_LINE, text, "listen line")
    loopback = f"{listen.group(1)}listen 127.0.0.1:{port};"
    text = text[: listen.start()] + loopback + text[listen.end() :]
    temp = "".join(f"    {kind}_temp_path {prefix / kind};\n" for kind in _TEMP_PATHS)
    http = _one(re.compile(r"^http\s*\{\n", re.MULTILINE), text, "http block")
    text = text[: http.end()] + temp + text[http.end() :]
    # Workers run as the master's user: nginx started as root would otherwise hand them to
    # 'nobody', which cannot reach temporary files inside a private test folder.
    head = f"daemon off;\npid {prefix / 'nginx.pid'};\n"
    if os.geteuid() == 0:
        head += "user root;\n"
    return head + text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Nginx:
    """``nginx -p PREFIX -c PREFIX/nginx.conf`` in the foreground, until stopped.

    Its access log (the shipped ``access_log /dev/stdout``) and error log go to
    ``PREFIX/nginx.log``.
    """

    def __init__(self, binary: Path, config: str, prefix: Path, port: int) -> None:
        self.binary = binary
        self.prefix = prefix
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = prefix / "nginx.conf"
        self.log_path = prefix / "nginx.log"
        self._config = config
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config, encoding="utf-8")
        command = [
            str(self.binary), "-p", str(self.prefix), "-c", str(self.config_path),
            "-e", str(self.prefix / "startup-error.log"),
        ]  # fmt: skip
        with self.log_path.open("wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"nginx did not listen on {self.port}:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        """What nginx wrote: its access lines and its errors."""
        parts = [self.log_path, self.prefix / "startup-error.log"]
        return "".join(p.read_text(errors="replace") for p in parts if p.is_file())

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
