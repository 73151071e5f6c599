"""The command line: parse flags, call one service function, turn errors into messages."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from executor import __version__
from executor.config import Settings, load_settings
from executor.errors import ExecutorError, ExitCode, InputError, NotFoundError
from executor.logs import setup_logging
from executor.store import Database, open_database

app = typer.Typer(
    name="executor",
    help=(
        "Run thousands of prompts through a GGUF model on one GPU (or the CPU), overnight, "
        "without babysitting.\n\n"
        "  executor submit prompts.jsonl        # validate, queue, print the job id\n\n"
        "  executor run --until-empty           # load the model once, drain the queue, exit\n\n"
        "  executor status                      # jobs, counts, tokens/s, ETA\n\n"
        "  executor export JOB -o results.jsonl # results in input order\n\n"
        "Settings come from flags, then EXECUTOR_* variables, then the config file "
        "($XDG_CONFIG_HOME/executor/config.yaml or --config), then defaults."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Database schema: show the revision, upgrade to the newest.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
config_app = typer.Typer(
    help="Settings: what applies and where each value comes from.", no_args_is_help=True
)
app.add_typer(config_app, name="config")

# --- options shared by commands ----------------------------------------------------------------

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database: a file path (SQLite) or a SQLAlchemy URL. "
        "[env EXECUTOR_DB; default $XDG_DATA_HOME/executor/executor.db]",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="YAML config file. [env EXECUTOR_CONFIG; default "
        "$XDG_CONFIG_HOME/executor/config.yaml if it exists]",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="Log lines on stderr: plain or json. [env EXECUTOR_LOG_FORMAT]",
        show_default=False,
    ),
]
JobArg = Annotated[int, typer.Argument(help="Job id, as printed by submit or status.")]
VramCapOpt = Annotated[
    str | None,
    typer.Option(
        "--vram-cap",
        help="Most VRAM to use: 11.5GiB (powers of two), 12GB (powers of ten), bytes, "
        "or 90% of the card. [env EXECUTOR_VRAM_CAP; default: free VRAM]",
        show_default=False,
    ),
]
CtxOpt = Annotated[
    int | None,
    typer.Option(
        "--ctx",
        help="Context size in tokens per sequence. [env EXECUTOR_CTX; default 4096]",
        show_default=False,
    ),
]
ParallelOpt = Annotated[
    int | None,
    typer.Option(
        "--parallel",
        help="Sequences decoded together; the KV cache holds ctx × parallel. "
        "[env EXECUTOR_PARALLEL; default 1]",
        show_default=False,
    ),
]
GpuLayersOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-layers",
        help="Layers on the GPU: auto (planned under the cap), all, or a number "
        "(llama.cpp's n_gpu_layers: the output layer counts as one). [env EXECUTOR_GPU_LAYERS]",
        show_default=False,
    ),
]
CacheTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--cache-type", help="KV cache type: f16, q8_0 or q4_0. [default f16]", show_default=False
    ),
]
FlashOpt = Annotated[
    str | None,
    typer.Option(
        "--flash-attn",
        help="auto (on when layers go to a GPU), on or off. [default auto]",
        show_default=False,
    ),
]
AllowSwapOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-swap",
        help="Go ahead even if the CPU part does not fit in RAM (very slow).",
        show_default=False,
    ),
]


def _settings(config: str | None, **flags: Any) -> Settings:
    return load_settings(flags, config=config)


def _open(settings: Settings) -> Database:
    return open_database(settings.db_url)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _say(message: str) -> None:
    """Human-facing messages go to stderr, so stdout stays clean for ids and data."""
    typer.echo(message, err=True)


# --- commands ------------------------------------------------------------------------------------


@app.command()
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
    from executor.jobspec import is_spec
    from executor.submit import submit as submit_file
    from executor.submit import submit_spec

    flags = dict(
        db=db, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    if is_spec(file):
        result = submit_spec(file, flags, config=config, force=force, skip_invalid=skip_invalid)
    else:
        settings = _settings(config, **flags)
        result = submit_file(
            settings,
            _open(settings),
            file,
            name=name,
            force=force,
            skip_invalid=skip_invalid,
            json_schema=_schema_file(json_schema),
            min_vram=_size_flag(min_vram, "--min-vram"),
        )
    if as_json:
        _print_json(result.__dict__)
        return
    if result.created:
        invalid = f" ({result.invalid} invalid, recorded as failed)" if result.invalid else ""
        _say(f"job {result.job_id}: {result.items} prompts queued{invalid}")
    else:
        _say(
            f"job {result.job_id} already has this file with this model and these parameters;"
            " not queued again (--force to queue anew)"
        )
    typer.echo(result.job_id)


def _size_flag(value: str | None, flag: str) -> int | None:
    from executor.errors import UsageError
    from executor.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _schema_file(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from executor.jobspec import read_schema

    return read_schema(Path.cwd(), path, "--json-schema")


@app.command()
def run(
    until_empty: Annotated[
        bool,
        typer.Option(
            "--until-empty",
            help="Exit when the queue is empty (for cron); default: keep waiting for new jobs.",
        ),
    ] = False,
    job: Annotated[int | None, typer.Option("--job", help="Work on this job only.")] = None,
    max_items: Annotated[
        int | None, typer.Option(help="Stop after this many items.", min=1)
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Items claimed at a time. [env EXECUTOR_BATCH_SIZE; default 16]",
            show_default=False,
        ),
    ] = None,
    ctx: CtxOpt = None,
    gpu_layers: GpuLayersOpt = None,
    vram_cap: VramCapOpt = None,
    parallel: ParallelOpt = None,
    cache_type: CacheTypeOpt = None,
    flash_attn: FlashOpt = None,
    allow_swap: AllowSwapOpt = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads. [env EXECUTOR_THREADS; default: llama.cpp's choice]",
            show_default=False,
        ),
    ] = None,
    stop_timeout: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: seconds to let the item in flight finish.")
    ] = 30.0,
    engine: Annotated[
        str | None,
        typer.Option(
            help="llama, or fake (echoes prompts: for testing pipelines). [env EXECUTOR_ENGINE]",
            show_default=False,
            hidden=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
    log_format: LogFormatOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Process queued jobs: load each model once, generate, checkpoint every result.

    The model runs in a child process: if it crashes, the items it was working on go back to
    the queue. Only one `executor run` works on a database at a time; a second one exits at
    once with code 3. SIGTERM or Ctrl-C stops gracefully (a second one stops at once); the
    exit code is then 0 and nothing is lost.
    """
    from executor.progress import Progress
    from executor.worker import RunOptions, run_worker

    settings = _settings(
        config,
        db=db,
        batch_size=batch_size,
        ctx=ctx,
        gpu_layers=gpu_layers,
        threads=threads,
        engine=engine,
        log_format=log_format,
        vram_cap=vram_cap,
        parallel=parallel,
        cache_type=cache_type,
        flash_attn=flash_attn,
        allow_swap=allow_swap,
    )
    status_line = setup_logging(settings.log_format)
    database = _open(settings)
    options = RunOptions(
        until_empty=until_empty, job_id=job, max_items=max_items, stop_timeout=stop_timeout
    )
    if job is not None:
        from executor.store import queue

        if queue.get_job(database, job) is None:
            raise NotFoundError(f"no job {job}", hint="`executor status` lists the jobs")
    started = time.monotonic()
    summary = run_worker(
        settings, database, options, Progress(status_line, settings.progress_seconds)
    )
    elapsed = time.monotonic() - started
    if as_json:
        _print_json({**summary.__dict__, "elapsed_s": round(elapsed, 3)})
    else:
        _say(
            f"run {'stopped' if summary.stopped_by_signal else 'finished'}: {summary.done} done, "
            f"{summary.failed} failed, {summary.completion_tokens} tokens in {elapsed:.1f}s"
        )


@app.command()
def plan(
    model: Annotated[
        str | None,
        typer.Argument(help="GGUF file; default: the configured model, else the default model."),
    ] = None,
    vram_cap: VramCapOpt = None,
    ctx: CtxOpt = None,
    parallel: ParallelOpt = None,
    gpu_layers: GpuLayersOpt = None,
    cache_type: CacheTypeOpt = None,
    flash_attn: FlashOpt = None,
    gpu_total: Annotated[
        str | None,
        typer.Option(
            "--gpu-total",
            help="Plan for an otherwise empty card of this size that is not in "
            "this machine (e.g. 12GiB).",
            show_default=False,
        ),
    ] = None,
    ram_total: Annotated[
        str | None,
        typer.Option(
            "--ram-total",
            help="With --gpu-total: the other machine's available RAM.",
            show_default=False,
        ),
    ] = None,
    allow_swap: AllowSwapOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run/--no-dry-run",
            help="Confirm the estimate with llama.cpp's own dry run (no memory is allocated).",
        ),
    ] = True,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show how a model will be split between GPU and CPU, before anything is loaded.

    The plan puts as many layers on the GPU as fit under the cap (the smaller of --vram-cap
    and the free VRAM minus a headroom), counting for each GPU layer its weights and KV cache,
    plus the output layer, the compute buffer and the CUDA context. It checks that the rest
    fits in RAM and says why more layers did not fit. Exit code 8 if the CPU part would not
    fit in RAM (unless --allow-swap).
    """
    from executor.models import resolve_model
    from executor.planning import format_plan, plan_for

    settings = _settings(
        config,
        db=db,
        model=model,
        vram_cap=vram_cap,
        ctx=ctx,
        parallel=parallel,
        gpu_layers=gpu_layers,
        cache_type=cache_type,
        flash_attn=flash_attn,
        allow_swap=allow_swap,
    )
    path = resolve_model(settings.model)
    report = plan_for(
        settings,
        _open(settings),
        path,
        gpu_total=gpu_total,
        ram_total=ram_total,
        use_dry_run=dry_run,
    )
    if as_json:
        _print_json(report.as_dict())
    else:
        typer.echo(format_plan(report))
    if not report.plan.ram_ok and not settings.allow_swap:
        _say(
            "executor: the CPU part does not fit in RAM: a run would swap and be extremely "
            "slow (pass --allow-swap to run anyway)"
        )
        raise typer.Exit(ExitCode.WOULD_SWAP)


@app.command()
def status(
    job: Annotated[int | None, typer.Argument(help="Only this job.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent jobs.")] = 20,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show jobs: items queued, running, done and failed; tokens, tokens/s and ETA."""
    from executor.report import format_table, job_rows

    settings = _settings(config, db=db)
    rows = job_rows(_open(settings), job, limit)
    if as_json:
        _print_json(rows if job is None else rows[0])
    else:
        typer.echo(format_table(rows))


FormatOpt = Annotated[
    str,
    typer.Option(
        "--format", help="executor (one object per item) or openai (OpenAI Batch API output)."
    ),
]
ErrorsOpt = Annotated[
    str | None,
    typer.Option(
        "--errors",
        help="With --format openai: write failed requests to this file.",
        show_default=False,
    ),
]
ProvenanceOpt = Annotated[
    bool,
    typer.Option(
        "--with-provenance",
        help="Add each result's model sha256, parameters and the load "
        "(GPU layers, cap, measured VRAM) it ran under.",
    ),
]


@app.command()
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
    from executor.export import export_job

    settings = _settings(config, db=db)
    result = export_job(
        _open(settings),
        job,
        output,
        include_failed=include_failed,
        fmt=fmt,
        errors=errors,
        with_provenance=with_provenance,
    )
    _say(_export_note(result, output, errors))


def _export_note(result: Any, output: str | None, errors: str | None) -> str:
    where = "stdout" if output in (None, "-") else output
    note = "" if result.job_status == "done" else f" (job is {result.job_status})"
    failed = f", {result.failed} failed to {errors}" if errors else ""
    return (
        f"job {result.job_id}: exported {result.lines} of {result.item_count} items to "
        f"{where}{failed}{note}"
    )


@app.command()
def cancel(job: JobArg, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Cancel a job: its queued items will not run (finished results stay)."""
    from executor.store import queue

    settings = _settings(config, db=db)
    database = _open(settings)
    if queue.get_job(database, job) is None:
        raise NotFoundError(f"no job {job}", hint="`executor status` lists the jobs")
    n = queue.cancel_job(database, job)
    _say(f"job {job}: cancelled ({n} items will not run; `executor retry {job}` resumes)")


@app.command()
def retry(job: JobArg, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Put a job's failed and cancelled items back in the queue (invalid lines stay failed)."""
    from executor.store import queue

    settings = _settings(config, db=db)
    database = _open(settings)
    if queue.get_job(database, job) is None:
        raise NotFoundError(f"no job {job}", hint="`executor status` lists the jobs")
    n = queue.retry_job(database, job)
    _say(f"job {job}: {n} items queued again")


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Apply schema migrations (also done automatically whenever a command opens the DB)."""
    settings = _settings(config, db=db)
    database = open_database(settings.db_url)
    _say(
        f"{database.url.render_as_string(hide_password=True)} is at revision {database.revision()}"
    )


@db_app.command("revision")
def db_revision(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Print the database's schema revision and the newest one this version knows."""
    from executor.store.db import Database, head_revision

    settings = _settings(config, db=db)
    typer.echo(
        f"database {Database(settings.db_url).revision() or '(blank)'}, code {head_revision()}"
    )


@app.command()
def model(
    path: Annotated[
        str | None,
        typer.Argument(help="A GGUF file; default: the configured model, else the default model."),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show which model jobs would use, and verify it (the default model's sha256 must match).

    Exit code 4 if the model is missing, not GGUF, or the default model's hash is wrong.
    """
    from executor.models import DEFAULT_MODEL, check_default_hash, resolve_model, sha256_file

    settings = _settings(config, model=path)
    resolved = resolve_model(settings.model)
    sha = sha256_file(resolved)
    is_default = check_default_hash(resolved, sha)
    info = {
        "path": str(resolved),
        "size": resolved.stat().st_size,
        "sha256": sha,
        "default_model": is_default,
        "source": settings.sources["model"],
    }
    if as_json:
        _print_json(info)
        return
    typer.echo(f"{resolved}\n  size   {info['size']:,} bytes\n  sha256 {sha}")
    if is_default:
        typer.echo(f"  the default model ({DEFAULT_MODEL.name}); hash verified")


@app.command("run-job")
def run_job(
    spec: Annotated[
        str,
        typer.Argument(
            help="A job spec (.yaml): input, model, settings, output. See jobs/ for examples."
        ),
    ],
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
    from executor.export import export_job
    from executor.jobspec import read_spec, spec_settings
    from executor.progress import Progress
    from executor.store import queue
    from executor.submit import submit as submit_file
    from executor.worker import RunOptions, run_worker

    job_spec = read_spec(spec)
    settings = spec_settings(job_spec, {"db": db, "log_format": log_format}, config)
    status_line = setup_logging(settings.log_format)
    database = _open(settings)
    submitted = submit_file(
        settings,
        database,
        str(job_spec.input),
        name=job_spec.name,
        json_schema=job_spec.json_schema,
        load=job_spec.load,
    )
    _say(
        f"job {submitted.job_id} ({job_spec.name}): {submitted.items} prompts"
        + ("" if submitted.created else " (submitted before; finishing it)")
    )
    summary = run_worker(
        settings,
        database,
        RunOptions(until_empty=True, job_id=submitted.job_id),
        Progress(status_line, settings.progress_seconds),
    )
    job = queue.get_job(database, submitted.job_id)
    assert job is not None
    exported = None
    if job_spec.output is not None:
        exported = export_job(
            database,
            job.id,
            str(job_spec.output),
            fmt=job_spec.format,
            errors=str(job_spec.errors) if job_spec.errors else None,
            include_failed=job_spec.include_failed,
            with_provenance=job_spec.with_provenance,
        )
        _say(
            _export_note(
                exported, str(job_spec.output), str(job_spec.errors) if job_spec.errors else None
            )
        )
    if as_json:
        _print_json(
            {
                "job_id": job.id,
                "status": job.status.value,
                **summary.__dict__,
                "exported": exported.lines if exported else None,
            }
        )
    if job.status.value == "failed":
        _say(f"executor: job {job.id} failed: {job.error}")
        raise typer.Exit(ExitCode.JOB_FAILED)
    if summary.stopped_by_signal:
        _say(f"job {job.id} is not finished (stopped by a signal); run-job again to go on")


@config_app.command("show")
def config_show(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print every setting's effective value and where it came from (flag, env, file,
    default)."""
    from executor.config import OPTIONS

    settings = _settings(config, db=db)
    values = settings.as_dict()
    if as_json:
        _print_json(
            {
                "config_file": str(settings.config_file) if settings.config_file else None,
                "settings": {
                    k: {"value": values[k], "source": settings.sources[k]} for k in OPTIONS
                },
            }
        )
        return
    typer.echo(f"config file: {settings.config_file or 'none'}")
    width = max(map(len, OPTIONS))
    for key, option in OPTIONS.items():
        shown = json.dumps(values[key]) if isinstance(values[key], dict) else values[key]
        typer.echo(f"{key:{width}}  {shown!s:24}  {settings.sources[key]:28}  {option.help}")


@app.command()
def doctor(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check this machine: llama-cpp-python and GPU offload, NVIDIA GPUs, RAM and swap, the
    database and its schema, the default model and its hash. Exit code 9 if a check FAILs
    (a missing GPU is a WARN: everything runs on the CPU)."""
    from executor.doctor import format_checks, run_checks

    checks = run_checks(_settings(config, db=db))
    if as_json:
        _print_json([c.__dict__ for c in checks])
    else:
        typer.echo(format_checks(checks))
    if any(c.state == "FAIL" for c in checks):
        raise typer.Exit(ExitCode.CHECK_FAILED)


@app.command()
def workers(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List workers, live first: host, GPU, model loaded, current job, tokens/s, heartbeat.

    A worker is live while its heartbeat (every third of --lease-seconds) is recent.
    """
    from executor.store import workers as registry

    settings = _settings(config, db=db)
    rows = registry.listing(_open(settings), alive_within=settings.lease_seconds)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo("no workers have run on this database yet")
        return
    typer.echo(f"{'STATE':8} {'HOST':16} {'GPU':28} {'JOB':>5} {'TOK/S':>7} {'BEAT':>8}  MODEL")
    for r in rows:
        state = "live" if r["alive"] else ("stopped" if r["stopped_at"] else "dead")
        gpu = f"{r['gpu_name'] or 'cpu'} {r['gpu_uuid'][:12] if r['gpu_uuid'] != 'cpu' else ''}"
        typer.echo(
            f"{state:8} {r['host'][:16]:16} {gpu.strip()[:28]:28} {r['job_id'] or '-':>5} "
            f"{r['tokens_per_s'] if r['tokens_per_s'] is not None else '-':>7} "
            f"{r['heartbeat_age_s']:>7.0f}s  {Path(r['model']).name if r['model'] else '-'}"
        )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; domain errors become one message and a documented exit code."""
    debug = os.environ.get("EXECUTOR_DEBUG") == "1"
    try:
        # Standalone mode: Typer prints usage errors itself (exit 2) and exits after a command.
        app(args=argv, prog_name="executor")
    except ExecutorError as exc:
        if debug:
            raise
        if isinstance(exc, InputError):
            for problem in exc.problems:
                _say(problem)
        _say(f"executor: error: {exc}")
        if exc.hint:
            _say(f"  hint: {exc.hint}")
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        _say(f"executor: internal error: {type(exc).__name__}: {exc}")
        _say("  hint: rerun with EXECUTOR_DEBUG=1 for the traceback, and report it")
        sys.exit(ExitCode.INTERNAL)
