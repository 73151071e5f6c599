"""System memory, as the plan needs it."""

from __future__ import annotations

from pathlib import Path


def ram_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (Linux); None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def swap_total(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """SwapTotal in bytes (Linux); None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
