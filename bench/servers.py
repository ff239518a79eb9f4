"""The servers under test: how each is found, started with matching settings, and stopped.

Every server gets the same model, context, CPU threads, batch size and number of parallel
sequences, and all layers on the GPU when the build has one. A peer that cannot be found is
*skipped* with the reason, never replaced by something else. llama-cpp-python's bundled server
runs with ``--interrupt_requests False``: its default ends a running stream early whenever
another request arrives, which would turn every concurrent level into a list of cut streams
rather than a measurement of serving them.

Every bench starts its servers here (``bench.run``, ``bench.batching``,
``bench.many_streams``), so a setting means the same flags everywhere. A *variant* is one of
these servers with flags of its own added (``--no-kv-unified``): a flag the server's
``--help`` does not list makes the variant skipped, with the reason, rather than a server
that refuses to start or silently means something else.

Peak memory is the kernel's high-water mark of the server's resident set (``VmHWM``), read
just before it is stopped: exact, and no polling thread competes for the CPU. CPU time is the
process's own (``/proc/PID/stat``), read before and after a measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OURS = "qwen3-moe-serve"
LLAMA_CPP_PYTHON = "llama-cpp-python server"
LLAMA_SERVER = "llama-server"
ALL_SERVERS = (OURS, LLAMA_CPP_PYTHON, LLAMA_SERVER)

LLAMA_SERVER_ENV = "LLAMA_SERVER"
_ROOT = Path(__file__).resolve().parent.parent
"""The checkout: where ``python -m app.cli`` is found."""
BUNDLED_SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context")
"""What ``python -m llama_cpp.server`` imports beyond llama-cpp-python (its ``[server]`` extra)."""


FlashAttn = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ServerSettings:
    """What every server is started with."""

    model: Path
    n_ctx: int
    """Context per sequence."""
    n_threads: int
    n_batch: int
    parallel: int
    flash_attn: FlashAttn
    """``auto`` is each engine's own choice (llama.cpp turns it on for CPU and CUDA)."""
    host: str = "127.0.0.1"
    max_queue: int | None = None
    """This server's ``--max-queue`` (requests waiting for a slot), when set."""


@dataclass
class Server:
    """A server to measure, or the reason it is skipped."""

    name: str
    """Which server: ``OURS``, ``LLAMA_CPP_PYTHON`` or ``LLAMA_SERVER``."""
    command: list[str] = field(default_factory=list)
    version: str | None = None
    skipped: str | None = None
    label: str = ""
    """How reports name it (the name and what sets this variant apart); the name if empty."""
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.label = self.label or self.name


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_llama_server(flag: Path | None, root: Path) -> tuple[Path | None, str]:
    """``--llama-server``, else ``$LLAMA_SERVER``, else ``PATH``, else a build under ``.cache/``.

    Returns the binary (or None) and how it was found (or why not).
    """
    if flag is not None:
        if flag.is_file() and os.access(flag, os.X_OK):
            return flag, "--llama-server"
        return None, f"--llama-server {flag} is not an executable file"
    env = os.environ.get(LLAMA_SERVER_ENV)
    if env:
        path = Path(env)
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"${LLAMA_SERVER_ENV}"
        return None, f"${LLAMA_SERVER_ENV}={env} is not an executable file"
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path), "PATH"
    pattern = str(root / ".cache" / "llama-server" / "**" / "bin" / "llama-server")
    for candidate in sorted(glob.glob(pattern, recursive=True)):
        if os.access(candidate, os.X_OK):
            return Path(candidate), ".cache/llama-server"
    return None, (
        "no llama-server binary (give --llama-server PATH or $LLAMA_SERVER, put one on PATH, "
        "or build one under .cache/llama-server/)"
    )


def _binary_version(binary: Path) -> str | None:
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    return None


def server(
    name: str,
    settings: ServerSettings,
    llama_server: Path | None,
    root: Path,
    *,
    extra_args: Sequence[str] = (),
    label: str = "",
) -> Server:
    """One server with its command (``extra_args`` last), or its reason to be skipped."""
    s = settings
    threads, batch = str(s.n_threads), str(s.n_batch)
    found = Server(name, label=label, extra_args=tuple(extra_args))
    if name == OURS:
        found.version = _version("qwen3-moe-serve")
        found.command = [
            sys.executable, "-m", "app.cli", "--model", str(s.model), "--host", s.host,
            "--n-ctx", str(s.n_ctx), "--n-threads", threads, "--n-batch", batch,
            "--parallel", str(s.parallel), "--flash-attn", s.flash_attn, "--log-level", "warning",
        ]  # fmt: skip
        if s.max_queue is not None:
            found.command += ["--max-queue", str(s.max_queue)]
    elif name == LLAMA_CPP_PYTHON:
        found.version = _version("llama-cpp-python")
        missing = [m for m in BUNDLED_SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            found.skipped = (
                f"llama-cpp-python's server needs {', '.join(missing)} (pip install -e '.[bench]')"
            )
        elif s.parallel != 1:
            found.skipped = "it decodes one request at a time (no --parallel)"
        elif s.flash_attn == "auto":
            found.skipped = "its --flash_attn is true or false, not auto"
        found.command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(s.model),
            "--host", s.host, "--n_ctx", str(s.n_ctx), "--n_threads", threads,
            "--n_threads_batch", threads, "--n_batch", batch, "--n_ubatch", batch,
            "--n_gpu_layers", "-1", "--flash_attn", str(s.flash_attn == "on"),
            "--interrupt_requests", "False",
        ]  # fmt: skip
    elif name == LLAMA_SERVER:
        binary, how = find_llama_server(llama_server, root)
        if binary is None:
            found.skipped = how
        else:
            found.version = _binary_version(binary)
            found.command = [
                str(binary), "--model", str(s.model), "--host", s.host,
                "--ctx-size", str(s.n_ctx * s.parallel), "--parallel", str(s.parallel),
                "--threads", threads, "--threads-batch", threads,
                "--batch-size", batch, "--ubatch-size", batch,
                "--n-gpu-layers", "999", "--flash-attn", s.flash_attn, "--no-webui",
            ]  # fmt: skip
    else:
        raise ValueError(f"unknown server {name!r}; known: {', '.join(ALL_SERVERS)}")
    if extra_args and found.skipped is None:
        # The program without its settings: ``python -m app.cli``, the llama-server binary.
        program = found.command[: found.command.index("--model")]
        unknown = [
            flag for flag in extra_args if flag.startswith("-") and not _lists(program, flag)
        ]
        if unknown:
            shown = " ".join(["python" if part == sys.executable else part for part in program])
            found.skipped = f"{name} has no {', '.join(unknown)} (not in `{shown} --help`)"
    found.command += list(extra_args)
    return found


def servers(
    wanted: tuple[str, ...], settings: ServerSettings, llama_server: Path | None, root: Path
) -> list[Server]:
    """The servers to measure, in order, each with its command or its reason to be skipped."""
    return [server(name, settings, llama_server, root) for name in wanted]


@functools.cache
def _help_text(program: tuple[str, ...]) -> str:
    try:
        done = subprocess.run(
            [*program, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=_ROOT,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def _lists(program: list[str], flag: str) -> bool:
    """Whether ``program --help`` lists ``flag`` as a whole flag (not a prefix of a longer one)."""
    name = flag.split("=", 1)[0]
    return (
        re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", _help_text(tuple(program))) is not None
    )


def peak_rss_bytes(pid: int) -> int | None:
    """The process's resident-set high-water mark (Linux ``VmHWM``), or None elsewhere."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _process_cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds the process has used: all its threads (those that ended included) and the
    children it has waited for; None where ``/proc`` has no such process.

    ``/proc/PID/stat`` counts in clock ticks (10 ms), coarse for a short window, so the
    process's own part comes from the kernel's per-process CPU clock
    (``clock_getcpuclockid``: nanoseconds) where it can be read, the children's from the
    ticks (``cutime + cstime``).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / tick
    children = (int(fields[13]) + int(fields[14])) / tick
    clock = _cpu_clock(pid)
    if clock is not None:
        with contextlib.suppress(OSError):
            own = time.clock_gettime(clock)
    return own + children


def _cpu_clock(pid: int) -> int | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clock = ctypes.c_int()
        if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return clock.value


def _busy_cpu_ticks() -> int:
    """CPU time the whole host spent busy (all of /proc/stat's first line but idle, iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


class OtherLoad:
    """How many CPUs other processes kept busy while a server was measured.

    Host busy time minus this process's and the server's, over the wall-clock time: the
    figure to read next to every latency, on a host shared with other work. None where
    ``/proc`` is missing.
    """

    def __init__(self, server_pid: int) -> None:
        self._pids = {os.getpid(), server_pid}  # a floor measured here passes its own pid
        self._start = self._read()

    def _read(self) -> tuple[float, int, int] | None:
        try:
            busy = _busy_cpu_ticks()
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), busy, sum(_process_cpu_ticks(p) for p in self._pids)

    def cores(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(max(other, 0) / ticks / (end[0] - self._start[0]), 3)


@dataclass
class Running:
    """A started server: where it listens and what it cost to start."""

    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    ready_s: float
    peak_rss: int | None = None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve(
    server: Server, settings: ServerSettings, log_path: Path, ready_timeout_s: float
) -> Iterator[Running]:
    """Start ``server`` on a free loopback port, wait until ``/v1/models`` answers 200, and
    stop it (recording its peak RSS) on exit."""
    if server.skipped:
        raise ValueError(f"{server.label} is skipped: {server.skipped}")
    port = free_port(settings.host)
    command = [*server.command, "--port", str(port)]  # the same flag on all three
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        running = Running(server.label, settings.host, port, process, ready_s=0.0)
        try:
            url = f"http://{settings.host}:{port}/v1/models"
            deadline = time.monotonic() + ready_timeout_s
            while not _ready(url):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{server.label} exited with status {process.returncode} "
                        f"before it was ready (log: {log_path})"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{server.label} was not ready within {ready_timeout_s:g} s "
                        f"(log: {log_path})"
                    )
                time.sleep(0.1)
            running.ready_s = time.perf_counter() - started
            yield running
        finally:
            running.peak_rss = peak_rss_bytes(process.pid)
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Raised in the main thread, so every ``serve`` block stops its server on the way out
    # (Python's default would end this process and leave the server running).
    raise SystemExit(128 + signum)


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM unwind this process, so that ``serve`` stops the server it started."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
