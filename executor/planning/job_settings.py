"""The one rule for the settings a job's model is loaded with.

A job may carry load settings of its own (a job spec's `ctx`, `parallel`, `vram_cap`,
`gpu_layers`), stored with it for whichever worker runs it. They win over the worker's flags,
environment and config file: whoever wrote the job sized them for its work. The VRAM cap is
the exception: the smaller of the job's and the worker's applies, since the machine's owner
sets the ceiling. Every value keeps its origin (`job 3`, `flag`, `env …`, `file …`,
`default`), which the log, `plan` and the loads' provenance show. `executor run`, `plan --job`
and the worker all go through `settings_for_job`.
"""

from __future__ import annotations

from typing import Any

from executor.config import Settings
from executor.store.queue import Job
from executor.units import parse_cap

LOAD_KEYS = ("ctx", "parallel", "vram_cap", "gpu_layers")  # what a job may set for its load


def job_load(job: Job | None) -> dict[str, Any]:
    """A job's own load settings, as stored (empty: it leaves them to the worker)."""
    if job is None:
        return {}
    stored = job.params.get("load") or {}
    return {k: stored[k] for k in LOAD_KEYS if stored.get(k) is not None}


def settings_for_job(settings: Settings, job: Job | None, card_total: int | None) -> Settings:
    """`settings` with `job`'s load settings applied by the rule above; `card_total`: the
    GPU's memory, to compare a percentage cap with a size (None: no GPU, where the cap does
    not matter and the job's is kept)."""
    load = job_load(job)
    if not load or job is None:
        return settings
    origin = f"job {job.id}"
    cap = load.pop("vram_cap", None)
    merged = settings.overridden(load, origin)
    if cap is not None and _smaller(str(cap), settings.vram_cap, card_total):
        merged = merged.overridden({"vram_cap": cap}, origin)
    return merged


def _smaller(job_cap: str, worker_cap: str | None, total: int | None) -> bool:
    """Whether the job's cap is below the worker's (ties keep the worker's)."""
    if worker_cap is None:
        return True
    if total is None:
        return False
    return parse_cap(job_cap).resolve(total) < parse_cap(worker_cap).resolve(total)
