"""What the GPUs have: NVML (nvidia-ml-py's `pynvml`) behind a small interface.

`probe()` never raises: no driver, no library or no device is an answer (CPU-only), not an
error. Tests pass a fake NVML object; EXECUTOR_FAKE_NVML (JSON) does the same for the CLI.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Device:
    """A GPU as the plan sees it."""

    name: str
    uuid: str
    total: int
    free: int


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    total: int
    free: int
    used: int

    def as_device(self) -> Device:
        return Device(name=self.name, uuid=self.uuid, total=self.total, free=self.free)


@dataclass(frozen=True)
class Probe:
    """The GPUs found, or why there are none."""

    gpus: list[GpuInfo] = field(default_factory=list)
    driver: str | None = None
    problem: str | None = None  # "no NVIDIA driver", ... when gpus is empty


def load_nvml() -> Any:
    """The NVML module to use: a fake from EXECUTOR_FAKE_NVML (tests: JSON, or @FILE read
    anew each time, so a test can change the card mid-run), else pynvml."""
    fake = os.environ.get("EXECUTOR_FAKE_NVML")
    if fake:
        if fake.startswith("@"):
            with open(fake[1:], encoding="utf-8") as f:
                fake = f.read()
        return FakeNvml.from_json(fake)
    import pynvml

    return pynvml


def probe(nvml: Any | None = None) -> Probe:
    """List NVIDIA GPUs with their memory; a reason instead when there are none."""
    try:
        nvml = nvml or load_nvml()
    except ImportError:
        return Probe(problem="nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return Probe(problem=f"no NVIDIA driver or GPU ({_nvml_reason(exc)})")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    total=int(memory.total),
                    free=int(memory.free),
                    used=int(memory.used),
                )
            )
        if not gpus:
            return Probe(driver=driver, problem="the NVIDIA driver reports no GPU")
        return Probe(gpus=gpus, driver=driver)
    except Exception as exc:
        return Probe(problem=f"NVML failed: {_nvml_reason(exc)}")
    finally:
        with suppress(Exception):
            nvml.nvmlShutdown()


def pick(found: Probe, index: int) -> GpuInfo | None:
    """The GPU of nvidia-smi's index `index`; None without it."""
    for card in found.gpus:
        if card.index == index:
            return card
    return None


class BindingError(ValueError):
    """CUDA_VISIBLE_DEVICES and the worker's own GPU setting disagree, or name no GPU."""


def visible(found: Probe, env: dict[str, str] | None = None) -> list[GpuInfo] | None:
    """The GPUs CUDA_VISIBLE_DEVICES lets this process use, in its order, mapped to NVML's
    cards (NVML lists every card whatever the variable says); None when it is not set.

    A scheduler sets it: Slurm's --gres=gpu, Kubernetes' device plugin, Docker. Entries are
    indices (nvidia-smi's, PCI order) or UUIDs (CUDA takes a unique prefix); empty, -1 or
    NoDevFiles means none."""
    text = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    cards = []
    for entry in (e.strip() for e in text.split(",")):
        if entry in ("", "-1", "NoDevFiles"):
            break  # CUDA stops at the first invalid entry
        if entry.startswith("MIG-"):
            raise BindingError(f"CUDA_VISIBLE_DEVICES={text}: MIG devices are not supported")
        if entry.isdigit():
            card = pick(found, int(entry))
        else:
            matches = [c for c in found.gpus if c.uuid.startswith(entry)]
            card = matches[0] if len(matches) == 1 else None
        if card is None:
            raise BindingError(
                f"CUDA_VISIBLE_DEVICES={text} names GPU {entry}, which NVML does not list "
                f"({', '.join(f'{c.index}: {c.uuid}' for c in found.gpus) or 'no GPU'})"
            )
        cards.append(card)
    return cards


def worker_card(
    found: Probe, index: int, *, explicit: bool, env: dict[str, str] | None = None
) -> GpuInfo | None:
    """The GPU a worker uses. Under a scheduler (CUDA_VISIBLE_DEVICES set) the first card it
    names, or the `gpu` setting (nvidia-smi's index) when given and among them — a setting
    outside them is an error, not someone else's card; else the card of that index."""
    allowed = visible(found, env)
    if allowed is None:
        return pick(found, index)
    if not explicit:
        return allowed[0] if allowed else None
    for card in allowed:
        if card.index == index:
            return card
    text = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    raise BindingError(
        f"gpu {index} is not among the GPUs this process was given "
        f"(CUDA_VISIBLE_DEVICES={text}: {', '.join(str(c.index) for c in allowed) or 'none'})"
    )


def process_vram(pid: int, uuid: str, nvml: Any | None = None) -> int | None:
    """Bytes of VRAM process `pid` holds on GPU `uuid`, per NVML (None if NVML cannot say)."""
    try:
        nvml = nvml or load_nvml()
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid.encode() if isinstance(uuid, str) else uuid)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                used = proc.usedGpuMemory
                return None if used is None else int(used)
        return 0
    except Exception:
        return None
    finally:
        with suppress(Exception):
            nvml.nvmlShutdown()


def card_processes(uuid: str, nvml: Any | None = None) -> list[tuple[int, int]]:
    """(pid, bytes) of every process NVML lists on GPU `uuid`, compute and graphics alike
    (a game is a graphics process); empty when NVML cannot say."""
    try:
        nvml = nvml or load_nvml()
        nvml.nvmlInit()
    except Exception:
        return []
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid.encode() if isinstance(uuid, str) else uuid)
        found: dict[int, int] = {}
        for lister in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            for proc in lister(handle):
                used = int(proc.usedGpuMemory or 0)
                found[int(proc.pid)] = max(found.get(int(proc.pid), 0), used)
        return sorted(found.items())
    except Exception:
        return []
    finally:
        with suppress(Exception):
            nvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


# --- a fake NVML with the same calls, for tests -------------------------------------------------


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Answers like pynvml from a list of devices: {"name", "uuid", "total", "free",
    "processes": {pid: bytes}, "graphics": {pid: bytes}}; `fail` makes nvmlInit raise (no
    driver)."""

    NVMLError = FakeNvmlError

    def __init__(
        self, devices: list[dict[str, Any]], fail: str | None = None, driver: str = "550.00"
    ) -> None:
        self.devices = devices
        self.fail = fail
        self.driver = driver

    @classmethod
    def from_json(cls, text: str) -> FakeNvml:
        data = json.loads(text)
        if isinstance(data, list):
            data = {"devices": data}
        return cls(data.get("devices", []), data.get("fail"))

    def nvmlInit(self) -> None:
        if self.fail:
            raise FakeNvmlError(self.fail)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> dict[str, Any]:
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for device in self.devices:
            if device.get("uuid", f"GPU-fake-{self.devices.index(device)}") == wanted:
                return device
        raise FakeNvmlError(f"no device {wanted}")

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str:
        return handle.get("name", "Fake GPU")

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return handle.get("uuid", f"GPU-fake-{self.devices.index(handle)}")

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> _Memory:
        total = int(handle["total"])
        free = int(handle.get("free", total))
        return _Memory(total=total, free=free, used=total - free)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: dict[str, Any]) -> int:
        """Millijoules: `energy_mj` of the device, growing by `watts` per second read."""
        if "watts" not in handle and "energy_mj" not in handle:
            raise FakeNvmlError("Not Supported")
        now = time.monotonic()
        start = handle.setdefault("_started", now)
        return int(handle.get("energy_mj", 0) + handle.get("watts", 0) * (now - start) * 1000)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: dict[str, Any]) -> list[_Process]:
        return [_Process(int(pid), int(used)) for pid, used in handle.get("processes", {}).items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: dict[str, Any]) -> list[_Process]:
        """`graphics`: {pid: bytes} of the device (a game, a desktop)."""
        return [_Process(int(pid), int(used)) for pid, used in handle.get("graphics", {}).items()]
