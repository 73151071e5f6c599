"""Commands about jobs: submit, status, export, cancel, retry, and run-job for cron."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from executor.cli import render
from executor.cli.app import (
    command,
    open_db,
    open_existing,
    print_json,
    run_events,
    say,
    settings_for,
    show,
)
from executor.cli.options import (
    AllowCpuOpt,
    ConfigOpt,
    DbOpt,
    ErrorsOpt,
    FormatOpt,
    JobArg,
    JsonOpt,
    LogFormatOpt,
    ProvenanceOpt,
)
from executor.config import Settings
from executor.errors import UsageError
from executor.redact import redact
from executor.store import Database, queue
from executor.store.queue import Job


@command()
def submit(
    file: Annotated[
        str, typer.Argument(help="Prompt file (JSON lines), - for stdin, or a job spec (.yaml).")
    ],
    name: Annotated[str | None, typer.Option(help="Job name (default: the file name).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="GGUF model path. [env EXECUTOR_MODEL; default: SmolLM2-135M-Instruct]",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Completion length per prompt unless a line says otherwise. [default 256]",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Sampling temperature; 0 is greedy. [default 0]", show_default=False),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling. [default 1.0]", show_default=False)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Sampling seed. [default 0]", show_default=False)
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Queue a new job even if this exact submission exists.")
    ] = False,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid",
            help="Queue the valid lines; record each bad line as a failed item.",
        ),
    ] = False,
    json_schema: Annotated[
        str | None,
        typer.Option(
            "--json-schema",
            help="A JSON schema file: every line without its own schema must "
            "produce JSON that matches it.",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(
            help="Higher runs first (any integer; default 0). `executor priority JOB N` "
            "changes it later.",
            show_default=False,
        ),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option(
            help="The hours this job may run in, local time (22:00-07:00); workers take it "
            "only then.",
            show_default=False,
        ),
    ] = None,
    min_vram: Annotated[
        str | None,
        typer.Option(
            "--min-vram",
            help="Only workers whose GPU has this much memory take the job (e.g. 40GiB).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Validate a prompt file and queue it as a job; print the job id.

    Each line is a JSON object: {"prompt": "..."} for a raw completion or {"messages": [...]}
    for a chat (the model's own chat template applies), with optional "custom_id" (default:
    the line number), "max_tokens", "temperature", "top_p", "seed", "stop", "json_schema" and
    "metadata". OpenAI Batch API lines ({"custom_id", "method", "url", "body"}) work too; their
    body.model is looked up in `models:` of the config file. Blank lines are skipped. If any
    line is invalid, each is reported as FILE:LINE: reason, nothing is queued, and the exit
    code is 2.

    A job spec (.yaml) names the input file, the model and the settings (see jobs/).

    Submitting the same content with the same model and parameters again prints the existing
    job id (safe from cron); --force queues it anew.
    """
    from executor.jobs.jobspec import is_spec, read_schema
    from executor.jobs.run_job import spec_and_settings, submit_spec
    from executor.jobs.submit import submit as submit_file

    flags = dict(
        db=db, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    if is_spec(file):
        spec, settings = spec_and_settings(file, flags, config)
        spec = replace(
            spec,
            priority=spec.priority if priority is None else priority,
            window=window or spec.window,
        )
        result = submit_spec(spec, settings, force=force, skip_invalid=skip_invalid)
    else:
        settings = settings_for(config, **flags)
        result = submit_file(
            settings,
            open_db(settings, create=True),
            file,
            name=name,
            force=force,
            skip_invalid=skip_invalid,
            json_schema=read_schema(Path.cwd(), json_schema, "--json-schema"),
            min_vram=_size_flag(min_vram, "--min-vram"),
            priority=priority or 0,
            window=window,
        )
    if as_json:
        print_json(result.__dict__)
        return
    if result.created:
        invalid = f" ({result.invalid} invalid, recorded as failed)" if result.invalid else ""
        say(f"job {result.job_id}: {result.items} prompts queued{invalid}")
    else:
        say(
            f"job {result.job_id} already has this file with this model and these parameters;"
            " not queued again (--force to queue anew)"
        )
    show(result.job_id)


def _size_flag(value: str | None, flag: str) -> int | None:
    from executor.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


@command()
def status(
    job: Annotated[int | None, typer.Argument(help="Only this job.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent jobs.")] = 20,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show jobs: items queued, running, done and failed; tokens, tokens/s and ETA (a job
    that has not started: its estimate, `~` expected or `≤` at most); and what workers that
    do not work are doing (outside their window, paused, yielding the GPU)."""
    from executor.jobs.status import job_rows
    from executor.planning.estimate import Estimator
    from executor.store import workers as registry

    settings = settings_for(config, db=db)
    database = open_existing(settings) if job is None else open_db(settings)
    if database is None:  # a fresh machine, or a mistyped path: say which, create nothing
        say(f"no database at {redact(settings.db_url)} yet (`executor submit` creates it)")
    rows = job_rows(database, job, limit, Estimator(settings, database)) if database else []
    if as_json:
        print_json(rows if job is None else rows[0])
        return
    show(render.format_jobs(rows))
    listing = registry.listing(database, settings.lease_seconds) if database else []
    for line in render.worker_states(listing):
        show(line)


@command()
def export(
    job: JobArg,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="Write here (atomically: a temporary file, then renamed). Default: stdout.",
        ),
    ] = None,
    include_failed: Annotated[
        bool,
        typer.Option(
            "--include-failed",
            help="Also export failed, invalid and cancelled items, with their error.",
        ),
    ] = False,
    fmt: FormatOpt = "executor",
    errors: ErrorsOpt = None,
    with_provenance: ProvenanceOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write a job's results as JSON lines, in input order.

    Our format: custom_id, line, status, output, finish_reason, prompt_tokens,
    completion_tokens, timings (ms) and error. --format openai writes OpenAI Batch API output
    lines ({"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}).
    While the job runs, you get what is done so far.
    """
    from executor.jobs.export import export_job

    settings = settings_for(config, db=db)
    result = export_job(
        open_db(settings),
        job,
        output,
        include_failed=include_failed,
        fmt=fmt,
        errors=errors,
        with_provenance=with_provenance,
    )
    say(render.export_note(result, output, errors))


@command()
def cancel(job: JobArg, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Cancel a job: its queued items will not run (finished results stay)."""
    n = queue.cancel_job(open_db(settings_for(config, db=db)), job)
    say(f"job {job}: cancelled ({n} items will not run; `executor retry {job}` resumes)")


@command()
def retry(job: JobArg, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Put a job's failed and cancelled items back in the queue (invalid lines stay failed)."""
    n = queue.retry_job(open_db(settings_for(config, db=db)), job)
    say(f"job {job}: {n} items queued again")


@command(name="run-job")
def run_job(
    spec: Annotated[
        str,
        typer.Argument(
            help="A job spec (.yaml): input, model, settings, output. See jobs/ for examples."
        ),
    ],
    allow_cpu: AllowCpuOpt = None,
    as_json: JsonOpt = False,
    log_format: LogFormatOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Submit a job spec, run it to the end and export its results: one line for cron.

    Idempotent like submit: run again, it finds the same job and only finishes what is left.
    Exit code 0 when the job is done (failed items are in the output or error file), 6 when
    the job failed as a whole (e.g. the model would not load), 3 if another run holds the
    worker lock.
    """
    from executor.errors import JobFailedError
    from executor.jobs.run_job import run_spec, spec_and_settings

    job_spec, settings = spec_and_settings(
        spec, {"db": db, "log_format": log_format, "allow_cpu": allow_cpu}, config
    )
    events = run_events(settings)
    done = run_spec(job_spec, settings, open_db(settings, create=True), events)
    job = done.job
    if done.exported is not None:
        errors = str(job_spec.errors) if job_spec.errors else None
        say(render.export_note(done.exported, str(job_spec.output), errors))
    if as_json:
        print_json(
            {
                "job_id": job.id,
                "status": job.status.value,
                **done.summary.__dict__,
                "exported": done.exported.lines if done.exported else None,
            }
        )
    if job.failed:
        raise JobFailedError(f"job {job.id} failed: {job.error}")
    if done.summary.stopped_by_signal:
        say(f"job {job.id} is not finished (stopped by a signal); run-job again to go on")
    elif job.status.value in ("queued", "running"):
        say(f"job {job.id} is not finished (outside its window, or paused); run-job again in "
            "its window to go on")  # fmt: skip


@command(context_settings={"ignore_unknown_options": True})  # a negative priority is no flag
def priority(
    job: JobArg,
    value: Annotated[int, typer.Argument(help="The new priority: higher runs first.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Change a queued or running job's priority (higher runs first; new jobs have 0). A
    worker on a job of lower priority switches after its current batch, never in the middle
    of a sequence."""
    from executor.store import schedule

    changed = schedule.set_priority(open_db(settings_for(config, db=db)), job, value)
    say(f"job {changed.id}: priority {changed.priority}")


@command()
def estimate(
    job: JobArg,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Say how long a job will take on this worker before it starts: a range of hours (and
    watt-hours where energy was measured), from the decode rates measured here, the prompt
    tokens (counted now if they were not), and how long answers of this model ran in
    earlier jobs; with a --window / the job's window, when it will be done."""
    from executor.planning.estimate import Estimator, describe

    settings = settings_for(config, db=db)
    database = open_db(settings)
    queued = queue.require_job(database, job)
    parallel = _planned_parallel(settings, database, queued)
    result = Estimator(settings, database).estimate(queued, parallel=parallel)
    if as_json:
        print_json(result.as_dict())
    else:
        show(describe(result))


def _planned_parallel(settings: Settings, database: Database, job: Job) -> int | None:
    """The sequences the plan would run `job` at here (its prompts counted first, as a
    worker counts them); None when it cannot tell (the model is not here, say)."""
    from executor.errors import ExecutorError
    from executor.planning.gather import plan_for
    from executor.planning.workload import job_context_need

    try:
        job_context_need(database, job, settings.engine)
        report = plan_for(settings, database, job.model, job=job, use_dry_run=False)
    except ExecutorError:
        return None
    return None if report.measure_parallel else report.plan.request.parallel
