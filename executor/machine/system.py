"""System memory, as the plan needs it."""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def meminfo(key: str, path: Path = MEMINFO) -> int | None:
    """A /proc/meminfo value in bytes (Linux: `MemAvailable`, `SwapTotal`, ...); None where
    it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def ram_available() -> int | None:
    """RAM available to new processes without swapping, in bytes."""
    return meminfo("MemAvailable")


def swap_total() -> int | None:
    return meminfo("SwapTotal")
