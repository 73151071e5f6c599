"""Byte sizes as people write them: `11.5GiB` (powers of two), `12GB` (powers of ten), `90%`."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Cap:
    """A VRAM cap: absolute bytes, or a fraction of the card's total memory."""

    bytes: int | None = None
    fraction: float | None = None
    text: str = ""

    def resolve(self, total: int) -> int:
        """The cap in bytes on a card with `total` bytes."""
        if self.fraction is not None:
            return int(total * self.fraction)
        assert self.bytes is not None
        return self.bytes


def parse_size(text: str) -> int:
    """`12GiB` → 12·2³⁰, `12GB` → 12·10⁹, `512MiB`, plain bytes; ValueError otherwise."""
    match = _SIZE.match(str(text))
    unit = match[2].lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (write e.g. 11.5GiB, 12GB, 800MiB or a number of bytes)"
        )
    value = float(match[1]) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)


def parse_cap(text: str) -> Cap:
    """A size (see parse_size) or a percentage of the card's total memory, e.g. `90%`."""
    percent = _PERCENT.match(str(text))
    if percent:
        value = float(percent[1])
        if not 0 < value <= 100:
            raise ValueError(f"a percentage cap must be in (0, 100], got {text!r}")
        return Cap(fraction=value / 100, text=str(text).strip())
    return Cap(bytes=parse_size(text), text=str(text).strip())


def format_bytes(n: int | float | None) -> str:
    """`11.50 GiB`, `812.0 MiB`, `0 B`."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            digits = 2 if unit == "GiB" else 1
            return f"{sign}{n / size:.{digits}f} {unit}"
    return f"{sign}{int(n)} B"


def format_duration(seconds: float | None) -> str:
    """`1h02m`, `3m05s`, `42s`; `?` when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
