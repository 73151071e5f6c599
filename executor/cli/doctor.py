"""`executor doctor`: is this machine ready? One line per check: OK, WARN or FAIL, with a hint."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.config import Settings
from executor.engine.probes import engine_capabilities
from executor.errors import ExecutorError, NoDatabaseError
from executor.gguf.models import DEFAULT_MODEL, check_default_hash, resolve_model, sha256_file
from executor.machine import gpu, system
from executor.planning.gather import REBUILD_FOR_GPU
from executor.redact import redact
from executor.store.db import head_revision, open_database
from executor.units import format_bytes


@dataclass(frozen=True)
class Check:
    name: str
    state: str  # OK, WARN or FAIL
    detail: str
    hint: str = ""


def run_checks(settings: Settings, nvml: Any | None = None) -> list[Check]:
    """Every check, in the order a person would look."""
    probe = gpu.probe(nvml)
    return [
        _python(),
        _llama(probe),
        _gpus(probe),
        _memory(),
        _database(settings),
        _default_model(),
        *([_configured_model(settings)] if settings.model else []),
        _config(settings),
    ]


def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 11)
    return Check("python", "OK" if ok else "FAIL", version, "" if ok else "needs Python 3.11+")


def _llama(probe: gpu.Probe) -> Check:
    caps = engine_capabilities()
    if isinstance(caps, str):
        return Check(
            "llama-cpp-python",
            "FAIL",
            caps,
            "reinstall it: pip install --force-reinstall llama-cpp-python",
        )
    offload = "built with GPU offload" if caps["gpu_offload"] else "CPU-only build"
    if caps["gpu_offload"]:
        return Check("llama-cpp-python", "OK", f"{caps['version']}, {offload}")
    if probe.gpus:
        return Check(
            "llama-cpp-python",
            "FAIL",
            f"{caps['version']}, {offload}: the GPU here sits idle and models run on the CPU",
            f"build it with CUDA: {REBUILD_FOR_GPU}",
        )
    return Check(
        "llama-cpp-python",
        "WARN",
        f"{caps['version']}, {offload}",
        f"no GPU here, so nothing is lost; on a machine with an NVIDIA GPU: {REBUILD_FOR_GPU}",
    )


def _gpus(probe: gpu.Probe) -> Check:
    if not probe.gpus:
        return Check(
            "GPU",
            "WARN",
            probe.problem or "none",
            "runs on the CPU; for a GPU install the NVIDIA driver",
        )
    cards = "; ".join(
        f"{g.index}: {g.name}, {format_bytes(g.free)} free of {format_bytes(g.total)}"
        for g in probe.gpus
    )
    return Check("GPU", "OK", f"driver {probe.driver}; {cards}")


def _memory() -> Check:
    available, swap = system.ram_available(), system.swap_total()
    if available is None:
        return Check("memory", "WARN", "cannot read /proc/meminfo")
    detail = f"{format_bytes(available)} RAM available, swap {format_bytes(swap or 0)}"
    if available < 2 * 2**30:
        return Check("memory", "WARN", detail, "little RAM: keep models small or on the GPU")
    return Check("memory", "OK", detail)


def _database(settings: Settings) -> Check:
    shown = redact(settings.db_url)
    try:
        db = open_database(settings.db_url, create=False)
        revision = db.revision()
        db.dispose()
    except NoDatabaseError:
        return Check("database", "OK", f"none yet at {shown} (`executor submit` creates it)")
    except ExecutorError as exc:
        return Check("database", "FAIL", str(exc), exc.hint or "check --db / EXECUTOR_DB")
    head = head_revision()
    if revision != head:
        return Check(
            "database",
            "FAIL",
            f"{shown} at revision {revision}, code expects {head}",
            "executor db upgrade",
        )
    return Check("database", "OK", f"{shown} (schema {revision})")


def _default_model() -> Check:
    try:
        path = resolve_model(None)
    except ExecutorError as exc:
        return Check("default model", "FAIL", str(exc), exc.hint or "")
    try:
        check_default_hash(path, sha256_file(path))
    except ExecutorError as exc:
        return Check("default model", "FAIL", str(exc), exc.hint or "")
    return Check("default model", "OK", f"{DEFAULT_MODEL.name} at {path}, sha256 verified")


def _configured_model(settings: Settings) -> Check:
    try:
        path = resolve_model(settings.model, settings.models)
    except ExecutorError as exc:
        return Check("configured model", "FAIL", str(exc), "fix `model` in the settings")
    return Check(
        "configured model",
        "OK",
        f"{path} ({format_bytes(path.stat().st_size)}, from {settings.sources['model']})",
    )


def _config(settings: Settings) -> Check:
    if settings.config_file is None:
        return Check("config file", "OK", "none (defaults and EXECUTOR_* variables)")
    return Check("config file", "OK", str(Path(settings.config_file)))
