"""Time windows: the hours of the day a worker (or a job) may run, in the machine's local time.

`22:00-07:00` runs from ten at night to seven in the morning (a range whose end is not after
its start crosses midnight); several ranges are comma-separated (`22:00-07:00,12:30-13:30`);
seconds may be given (`22:00:30-22:05`). The local time is the machine's: `TZ` when set,
else /etc/localtime. Each day's range is placed on that day's wall clock with zoneinfo, so
a window stays 22:00-07:00 across a change to or from summer time (that night is an hour
shorter or longer).
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")


def local_zone() -> tzinfo:
    """The machine's time zone: TZ, else /etc/localtime's zone, else its current offset."""
    names = []
    if os.environ.get("TZ"):
        names.append(os.environ["TZ"].lstrip(":"))
    with suppress(OSError):
        link = os.readlink("/etc/localtime")
        if "zoneinfo/" in link:
            names.append(link.split("zoneinfo/", 1)[1])
    with suppress(OSError):
        names.append(Path("/etc/timezone").read_text().strip())
    for name in names:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return datetime.now().astimezone().tzinfo or UTC


@dataclass(frozen=True)
class Window:
    """One or more daily ranges of local time."""

    ranges: tuple[tuple[time, time], ...]
    text: str
    zone: tzinfo | None = None  # None: the machine's (read when used)

    @classmethod
    def parse(cls, text: str, zone: tzinfo | None = None) -> Window:
        """`22:00-07:00[,12:30-13:30]`; ValueError saying what is wrong."""
        ranges = []
        for part in str(text).split(","):
            found = _RANGE.match(part)
            if not found:
                raise ValueError(
                    f"not a time window: {part.strip()!r} (write e.g. 22:00-07:00, several "
                    "separated by commas)"
                )
            h1, m1, s1, h2, m2, s2 = (int(x or 0) for x in found.groups())
            if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or s1 > 59 or s2 > 59:
                raise ValueError(f"not a time of day in {part.strip()!r}")
            start = time(h1, m1, s1)
            end = time(0, 0) if h2 == 24 else time(h2, m2, s2)
            if start == end:
                raise ValueError(f"{part.strip()!r} has no length")
            ranges.append((start, end))
        return cls(tuple(ranges), ",".join(p.strip() for p in str(text).split(",")), zone)

    def _spans(self, now: datetime) -> list[tuple[datetime, datetime]]:
        """The ranges as aware intervals on the days around `now`, in order."""
        zone = self.zone or local_zone()
        today = now.astimezone(zone).date()
        spans = []
        for offset in (-1, 0, 1, 2):
            day = today + timedelta(days=offset)
            for start, end in self.ranges:
                begins = datetime.combine(day, start, zone)
                ends = datetime.combine(day + timedelta(days=end <= start), end, zone)
                spans.append((begins.astimezone(UTC), ends.astimezone(UTC)))
        return sorted(spans)

    def is_open(self, now: datetime) -> bool:
        return self.closes_at(now) is not None

    def closes_at(self, now: datetime) -> datetime | None:
        """When the range `now` is in ends (the latest end among overlapping ones); None when
        `now` is outside the window."""
        at = now.astimezone(UTC)
        ends = [e for b, e in self._spans(now) if b <= at < e]
        if not ends:
            return None
        end = max(ends)
        for b, e in self._spans(now):  # ranges that touch run on
            if b <= end < e:
                end = e
        return end

    def opens_at(self, now: datetime) -> datetime:
        """When the window next opens after `now` (now itself if it is open)."""
        at = now.astimezone(UTC)
        for b, e in self._spans(now):
            if b <= at < e:
                return now
            if b > at:
                return b
        raise AssertionError("a daily window opens within two days")

    def open_time(self, start: datetime, seconds: float) -> tuple[datetime, int]:
        """When `seconds` of work that starts at `start` are done, working only inside the
        window, and over how many separate openings (nights) it runs."""
        at, left, openings = start.astimezone(UTC), seconds, 0
        while True:
            opens = self.opens_at(at).astimezone(UTC)
            closes = self.closes_at(opens)
            assert closes is not None
            openings += 1
            if (closes - opens).total_seconds() >= left:
                return opens + timedelta(seconds=left), openings
            left -= (closes - opens).total_seconds()
            at = closes


def local(moment: datetime | None, *, seconds: bool = False) -> str:
    """`Thu 04:00` (`Thu 04:00:30`) in the machine's local time, for messages."""
    if moment is None:
        return "?"
    return moment.astimezone(local_zone()).strftime("%a %H:%M:%S" if seconds else "%a %H:%M")
