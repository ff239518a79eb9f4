"""How much host memory this process may use, for ``--cache-ram auto``.

The prompt cache's default size is derived from the machine, not fixed as llama-server's
8192 MiB is: that holds only a few long Qwen3-30B-A3B conversations on a GPU host with far more
free, and is an OOM kill in a container limited to less. So ``auto`` is a share of what is
available when the model has loaded: ``MemAvailable``, or less where the process's cgroup (a
container's memory limit) has less headroom, minus the model's own weights where they stay in
host memory (a CPU model is read through mmap: its pages count as available but must stay
resident). The cache allocates only what it holds, so the size is a ceiling, not a
reservation.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

AUTO_SHARE = 0.25
"""Share of the available host memory ``--cache-ram auto`` may fill."""
MIB = 1024 * 1024


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(cgroup_root: Path) -> int | None:
    """The cgroup v2 limit less the current usage of this process's cgroup, or None when no
    limit is set (``max``) or none can be read."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        relative = line.split(":", 2)[2].lstrip("/")
    except (OSError, IndexError):
        relative = ""
    for folder in (cgroup_root / relative, cgroup_root):
        try:
            limit = (folder / "memory.max").read_text().strip()
            if limit == "max":
                return None
            return max(int(limit) - int((folder / "memory.current").read_text().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def available_bytes(
    meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Host memory this process could still use, or None where it cannot be read."""
    found = [
        value
        for value in (_meminfo_available(meminfo), _cgroup_headroom(cgroup_root))
        if value is not None
    ]
    return min(found) if found else None


def auto_prompt_cache_mib(weights_in_host_memory: int, available: int | None) -> int:
    """``--cache-ram auto``: ``AUTO_SHARE`` of ``available`` less the weights that must stay
    resident; 0 (off) where nothing can be read, never a guess."""
    if available is None:
        logger.warning("--cache-ram auto: host memory cannot be read; the prompt cache is off")
        return 0
    usable = max(available - weights_in_host_memory, 0)
    return int(usable * AUTO_SHARE) // MIB
