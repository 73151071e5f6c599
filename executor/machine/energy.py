"""Energy counters: how many joules a job's work cost, where the machine can say.

NVML's total-energy counter (millijoules since the driver loaded; Volta and later) for the
worker's GPU; on the CPU, Linux powercap's RAPL package counter (microjoules, wrapping at
its range) when readable (often root-only); else nothing, and the job's energy is unknown.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

RAPL = Path("/sys/class/powercap")


class Meter(Protocol):
    source: str

    def read(self) -> int | None:
        """The counter now, in millijoules (None: it cannot be read any more)."""


class NvmlMeter:
    def __init__(self, nvml: Any, uuid: str) -> None:
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid.encode())
        self.source = f"nvml:{uuid}"

    def read(self) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception:  # an older GPU or driver: no counter
            return None


class RaplMeter:
    def __init__(self, zone: Path) -> None:
        self.zone = zone
        self.range_uj = int((zone / "max_energy_range_uj").read_text())
        self.source = "rapl"
        self._last: int | None = None
        self._wraps = 0

    def read(self) -> int | None:
        try:
            now = int((self.zone / "energy_uj").read_text())
        except (OSError, ValueError):
            return None
        if self._last is not None and now < self._last:
            self._wraps += 1  # the counter wrapped around since the last read
        self._last = now
        return (now + self._wraps * self.range_uj) // 1000


def meter(nvml: Any | None, gpu_uuid: str | None) -> Meter | None:
    """The meter for this worker's device, or None when its energy cannot be read."""
    if nvml is not None and gpu_uuid:
        with suppress(Exception):
            nvml.nvmlInit()  # reference-counted by NVML; held for the worker's life
            m = NvmlMeter(nvml, gpu_uuid)
            if m.read() is not None:
                return m
        return None
    for zone in sorted(RAPL.glob("intel-rapl:[0-9]*")):  # package domains, not subzones
        with suppress(OSError, ValueError):
            m = RaplMeter(zone)
            if m.read() is not None:
                return m
    return None


def describe(energy_mj: int | None, completion_tokens: int) -> dict[str, float | None]:
    """Wh for the job and joules per generated token (None when unknown)."""
    if energy_mj is None:
        return {"energy_wh": None, "joules_per_token": None}
    joules = energy_mj / 1000
    return {
        "energy_wh": round(joules / 3600, 4),
        "joules_per_token": round(joules / completion_tokens, 4) if completion_tokens else None,
    }
