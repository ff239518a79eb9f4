"""The machine and the checkout a measurement or a test run happened on.

One helper for every record that names them: ``make bench``'s results (``bench.run``,
``bench.batching``, ``bench.many_streams``) and the contract run's ``findings.json``
(``tests/run_facts.py``). The facts are read from the things themselves (``/proc``, the
interpreter, git), never from configuration that could disagree with them. Standard library
only: the tests import this without the bench's own dependencies.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VERSIONED = (
    "qwen3-moe-serve",
    "llama-cpp-python",
    "fastapi",
    "starlette",
    "uvicorn",
    "sse-starlette",
    "pydantic",
    "starlette-context",
    "uvloop",
    "httptools",
)
"""What a bench result depends on: the servers, their engine and their HTTP stacks."""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def busiest_processes() -> list[str]:
    """The processes using most CPU right now (``ps``), to judge whether the host was quiet."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return [" ".join(line.split()) for line in listing.splitlines()[:5]]
    return []


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """The checked-out commit (full hash) and whether tracked files differ from it."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, (bool(status) if status is not None else None)


def machine(root: Path) -> dict[str, Any]:
    """The host and the checkout at ``root``."""
    commit, dirty = git_state(root)
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": commit,
        "git_dirty": dirty,
    }


def commit_label(facts: Mapping[str, Any]) -> str:
    """``abc1234``, ``abc1234-dirty`` (tracked files changed) or ``unknown``, for a report."""
    commit = facts.get("git_commit")
    if not commit:
        return "unknown"
    return str(commit)[:7] + ("-dirty" if facts.get("git_dirty") else "")


def versions() -> dict[str, str]:
    """The installed version of each of ``VERSIONED`` that is installed."""
    found = {}
    for name in VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def run_machine(root: Path) -> dict[str, Any]:
    """``machine`` plus how busy the host is as a measurement starts (``load_average.end`` is
    the caller's to add when it ends)."""
    return {
        **machine(root),
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "busiest_processes_at_start": busiest_processes(),
    }
