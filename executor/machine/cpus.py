"""How many threads llama.cpp should use here: the physical cores this process may run on.

llama.cpp's own tools default to `cpu_get_num_math()`: one thread per physical core (a
hyper-thread sibling shares the core's vector units, and a second thread on it only adds
contention). llama-cpp-python instead guesses `cpu_count // 2` for single-token steps, which
on a machine without SMT (most cloud VMs) leaves half the cores idle. Here: the CPUs in this
process's affinity mask, grouped by core (sysfs thread siblings), capped by a cgroup CPU quota
(a container limited to 1.5 CPUs gets 2 threads, not the host's 64).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CpuCount:
    threads: int  # what llama.cpp gets for both single-token and batch steps
    logical: int  # CPUs this process may run on
    cores: int  # physical cores among them
    quota: float | None  # cgroup CPU limit, in CPUs, if any

    @property
    def reason(self) -> str:
        """Why this many threads, for the load log and `plan`."""
        parts = [f"{self.cores} physical core{'s' if self.cores != 1 else ''}"]
        if self.logical != self.cores:
            parts.append(f"of {self.logical} logical CPUs")
        if self.quota is not None and math.ceil(self.quota) < self.cores:
            parts.append(f"capped by the cgroup CPU quota of {self.quota:g}")
        return " ".join(parts)


def cpu_count(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> CpuCount:
    """Physical cores this process may use (roots are parameters for the tests)."""
    allowed = sorted(_affinity())
    cores = _cores(allowed, sys_root)
    quota = _cgroup_quota(sys_root, proc_root)
    threads = cores if quota is None else max(1, min(cores, math.ceil(quota)))
    return CpuCount(threads=threads, logical=len(allowed), cores=cores, quota=quota)


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _cores(allowed: list[int], sys_root: Path) -> int:
    """Distinct cores among `allowed` CPUs: CPUs listed as each other's thread siblings share
    one. Without sysfs topology every CPU counts as a core."""
    seen: set[frozenset[int]] = set()
    for cpu in allowed:
        topology = sys_root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        siblings = None
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                siblings = parse_cpu_list((topology / name).read_text())
                break
            except (OSError, ValueError):
                continue
        seen.add(frozenset(siblings & set(allowed)) if siblings else frozenset({cpu}))
    return max(len(seen), 1)


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' → {0, 1, 2, 3, 8, 10, 11} (the kernel's CPU list format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _cgroup_quota(sys_root: Path, proc_root: Path) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors: cgroup v2
    `cpu.max` ("200000 100000" = 2 CPUs; "max" = none), or v1 `cpu.cfs_quota_us`."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = sys_root / "fs" / "cgroup"
            limits += _walk(base, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                base = sys_root / "fs" / "cgroup" / mount
                if base.is_dir():
                    limits += _walk(base, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _walk(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits found in `base/path` and every folder above it up to `base`."""
    found = []
    folder = base / path.strip("/")
    while True:
        limit = read(folder)
        if limit is not None:
            found.append(limit)
        if folder == base or base not in folder.parents:
            return found
        folder = folder.parent


def _v2_limit(folder: Path) -> float | None:
    try:
        fields = (folder / "cpu.max").read_text().split()
    except OSError:
        return None
    return _ratio(fields[0], fields[1]) if len(fields) == 2 else None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = (folder / "cpu.cfs_quota_us").read_text().strip()
        period = (folder / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None


def threads_for(setting: int | str | None) -> tuple[int, str]:
    """The threads for a `threads` setting ("auto" or a number), and why."""
    if isinstance(setting, int):
        return setting, "set by --threads / EXECUTOR_THREADS / config"
    count = cpu_count()
    return count.threads, count.reason


class CpuWatch:
    """How many of this process's cores others leave it, sampled as it runs.

    llama.cpp's threads spin at a barrier after every operation of a step: if another process
    holds one of their cores, each barrier waits for a scheduler time slice, and a step that
    took 10 ms takes hundreds (measured in benchmarks/threads.py: 2 threads on 2 cores beside
    one busy process ran many times slower than 1 thread). So the model process samples, every
    `every` seconds, the CPU time of the CPUs it may run on (/proc/stat) minus its own and its
    parent worker's (/proc/PID/stat): what other processes use. The threads it should have
    are the cores left, rounded: at start from what others used while the model loaded, then
    a change only when two samples in a row agree (no flapping); back up when the neighbour
    leaves.
    """

    def __init__(
        self, most: int, every: float = 0.5, proc_root: Path = Path("/proc"), clock: Any = None
    ) -> None:
        self.most = most
        self.every = every
        self.proc_root = proc_root
        self.clock = clock or time.monotonic
        self.cpus = sorted(_affinity())
        self.threads = most
        self._last = self._sample()
        self._wanted: int | None = None

    def start(self) -> int:
        """The threads to start with, from what others used since this watch was made (the
        model's load): no second sample is waited for, nothing was running yet to flap."""
        wanted = self._wanted_now()
        if wanted is not None:
            self.threads = wanted
        return self.threads

    def poll(self) -> int | None:
        """The new thread count when it should change now, else None (cheap to call often)."""
        if self.clock() - self._last[0] < self.every:
            return None
        wanted = self._wanted_now()
        if wanted is None or wanted == self.threads:
            self._wanted = None
            return None
        if self._wanted != wanted:  # seen once: wait for a second sample to agree
            self._wanted = wanted
            return None
        self.threads, self._wanted = wanted, None
        return wanted

    def _wanted_now(self) -> int | None:
        """The cores other processes left us since the last sample, as a thread count."""
        sample = self._sample()
        last, self._last = self._last, sample
        if sample[1] is None or last[1] is None:
            return None
        wall = sample[0] - last[0]
        busy = (sample[1] - last[1]) / TICKS  # CPU-seconds on our CPUs, everyone's
        ours = (sample[2] - last[2]) / TICKS  # CPU-seconds of this process
        others = max(busy - ours, 0.0) / max(wall, 1e-6)  # cores other processes held
        return max(1, min(self.most, round(len(self.cpus) - others)))

    def _sample(self) -> tuple[float, int | None, int]:
        """(now, busy ticks of our CPUs, this process's ticks)."""
        now = self.clock()
        busy = None
        try:
            wanted = {f"cpu{c}" for c in self.cpus}
            busy = 0
            for line in (self.proc_root / "stat").read_text().splitlines():
                name, _, rest = line.partition(" ")
                if name in wanted:
                    v = [int(x) for x in rest.split()]
                    busy += sum(v[:8]) - v[3] - v[4]  # everything but idle and iowait
            ours = sum(self._ticks(p) for p in ("self", str(os.getppid())))
        except (OSError, ValueError, IndexError):
            return now, None, 0
        return now, busy, ours

    def _ticks(self, pid: str) -> int:
        """utime + stime of every thread of a process; 0 when it cannot be read (the
        worker that started this process counts as ours: it plans while the model loads)."""
        try:
            stat = (self.proc_root / pid / "stat").read_text()
        except OSError:
            return 0
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
