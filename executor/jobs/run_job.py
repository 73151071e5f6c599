"""A job spec end to end: submit what it describes, or submit it, run it and export it
(`executor run-job`, the one line for cron)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from executor.config import Settings
from executor.jobs.export import Exported, export_job
from executor.jobs.jobspec import JobSpec, read_spec, spec_settings
from executor.jobs.submit import Submitted, submit
from executor.planning.gather import build_can_offload, check_offload
from executor.run.events import RunEvents
from executor.run.worker import RunOptions, RunSummary, run_worker
from executor.store import Database, open_database, queue
from executor.store.queue import Job

log = logging.getLogger(__name__)


def spec_and_settings(
    spec_path: str, flags: dict[str, Any], config: str | None = None
) -> tuple[JobSpec, Settings]:
    """The spec and the settings its job runs with (the command's flags win over the spec)."""
    spec = read_spec(spec_path)
    return spec, spec_settings(spec, flags, config)


def submit_spec(
    spec: JobSpec,
    settings: Settings,
    db: Database | None = None,
    *,
    force: bool = False,
    skip_invalid: bool = False,
) -> Submitted:
    """Submit the job a spec describes (its input, model, settings, schema and min_vram)."""
    return submit(
        settings,
        db or open_database(settings.db_url),
        str(spec.input),
        name=spec.name,
        force=force,
        skip_invalid=skip_invalid,
        json_schema=spec.json_schema,
        load=spec.load,
        min_vram=spec.min_vram,
        priority=spec.priority,
        window=spec.window,
    )


@dataclass(frozen=True)
class SpecRun:
    """What `run-job` did: the job, how it ended, the run and the export."""

    submitted: Submitted
    job: Job
    summary: RunSummary
    exported: Exported | None


def run_spec(
    spec: JobSpec, settings: Settings, db: Database, events: RunEvents | None = None
) -> SpecRun:
    """Submit the spec's job (or find it, if submitted before), run it to the end and export
    it where the spec says. Run again, it finishes only what is left. A spec that asks for
    GPU layers on a build that cannot offload is refused before anything is queued."""
    check_offload(settings, None, build_can_offload)
    submitted = submit_spec(spec, settings, db)
    log.info(
        "job %s (%s): %d prompts%s",
        submitted.job_id,
        spec.name,
        submitted.items,
        "" if submitted.created else " (submitted before; finishing it)",
        extra={"job": submitted.job_id},
    )
    summary = run_worker(
        settings,
        db,
        RunOptions(until_empty=True, job_id=submitted.job_id, stop_timeout=settings.stop_timeout),
        events,
    )
    job = queue.require_job(db, submitted.job_id)
    exported = None
    if spec.output is not None:
        exported = export_job(
            db,
            job.id,
            str(spec.output),
            fmt=spec.format,
            errors=str(spec.errors) if spec.errors else None,
            include_failed=spec.include_failed,
            with_provenance=spec.with_provenance,
        )
    return SpecRun(submitted, job, summary, exported)
