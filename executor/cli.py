"""The command line: each command parses its options, calls one service function and renders
the answer (tables in report.py). Domain errors (errors.py) become one message on stderr and
their documented exit code; nothing here runs SQL or decides anything.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from executor import __version__, report
from executor.cli_options import (
    AllowCpuOpt,
    AllowSwapOpt,
    CacheTypeOpt,
    ConfigOpt,
    CtxOpt,
    DbOpt,
    ErrorsOpt,
    FlashOpt,
    FormatOpt,
    GpuLayersOpt,
    JobArg,
    JsonOpt,
    LogFormatOpt,
    ParallelOpt,
    PlacementOpt,
    ProvenanceOpt,
    SwaFullOpt,
    ThreadsOpt,
    UbatchOpt,
    VramCapOpt,
)
from executor.config import Settings, load_settings
from executor.errors import DiskError, ExecutorError, ExitCode, InputError, UsageError
from executor.logs import setup_logging
from executor.redact import redact
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

F = TypeVar("F", bound=Callable[..., Any])


def command(typer_app: typer.Typer = app, name: str | None = None) -> Callable[[F], F]:
    """Register a command whose domain errors end it with their message and exit code."""

    def register(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                try:
                    return func(*args, **kwargs)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    where = f" ({exc.filename})" if exc.filename else ""
                    raise DiskError(
                        f"no space left on the device{where}",
                        hint="free some space and run it again; nothing was lost",
                    ) from None
            except ExecutorError as exc:
                if os.environ.get("EXECUTOR_DEBUG") == "1":
                    raise
                _report(exc)
                raise typer.Exit(exc.exit_code) from None

        typer_app.command(name)(run)
        return func

    return register


def _report(exc: ExecutorError) -> None:
    if isinstance(exc, InputError):
        for problem in exc.problems:
            _say(problem)
    _say(redact(f"executor: error: {exc}"))
    if exc.hint:
        _say(redact(f"  hint: {exc.hint}"))


def _settings(config: str | None, **flags: Any) -> Settings:
    return load_settings(flags, config=config)


def _open(settings: Settings, *, create: bool = False) -> Database:
    """The database; only the commands that put work in it (submit, run, run-job, db
    upgrade) create it: a mistyped path elsewhere is an error, not a new empty database."""
    return open_database(settings.db_url, create=create)


def _open_existing(settings: Settings) -> Database | None:
    """The database if there is one (plan reads what past loads taught; it needs none)."""
    from executor.errors import NoDatabaseError

    try:
        return _open(settings)
    except NoDatabaseError:
        return None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _say(message: str) -> None:
    """Human-facing messages go to stderr, so stdout stays clean for ids and data."""
    typer.echo(message, err=True)


def _warn(message: str) -> None:
    typer.echo(f"WARNING: {message}", err=True)


def _events(settings: Settings) -> Any:
    """How a run shows its progress: a bar on a terminal, log lines otherwise."""
    from executor.progress import ProgressDisplay

    return ProgressDisplay(setup_logging(settings.log_format), settings.progress_seconds)


# --- commands ------------------------------------------------------------------------------------


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
    from executor.jobspec import is_spec, read_schema
    from executor.pipeline import spec_and_settings, submit_spec
    from executor.submit import submit as submit_file

    flags = dict(
        db=db, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    if is_spec(file):
        spec, settings = spec_and_settings(file, flags, config)
        result = submit_spec(spec, settings, force=force, skip_invalid=skip_invalid)
    else:
        settings = _settings(config, **flags)
        result = submit_file(
            settings,
            _open(settings, create=True),
            file,
            name=name,
            force=force,
            skip_invalid=skip_invalid,
            json_schema=read_schema(Path.cwd(), json_schema, "--json-schema"),
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
    from executor.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


@command()
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
    ubatch: UbatchOpt = None,
    placement: PlacementOpt = None,
    swa_full: SwaFullOpt = None,
    cache_type: CacheTypeOpt = None,
    flash_attn: FlashOpt = None,
    allow_swap: AllowSwapOpt = None,
    allow_cpu: AllowCpuOpt = None,
    threads: ThreadsOpt = None,
    stop_timeout: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: seconds to let the item in flight finish.")
    ] = 30.0,
    engine: Annotated[
        str | None,
        typer.Option(
            help="llama, or fake (echoes prompts: for testing pipelines). [env EXECUTOR_ENGINE]",
            show_default=False,
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
    from executor.loader import build_can_offload, check_offload
    from executor.store import queue
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
        n_ubatch=ubatch,
        placement=placement,
        swa_full=swa_full,
        cache_type=cache_type,
        flash_attn=flash_attn,
        allow_swap=allow_swap,
        allow_cpu=allow_cpu,
    )
    # --gpu-layers on a build that cannot offload: refused before anything is claimed.
    check_offload(settings, None, build_can_offload)
    events = _events(settings)
    database = _open(settings, create=True)
    if job is not None:
        queue.require_job(database, job)
    options = RunOptions(
        until_empty=until_empty, job_id=job, max_items=max_items, stop_timeout=stop_timeout
    )
    started = time.monotonic()
    summary = run_worker(settings, database, options, events)
    elapsed = time.monotonic() - started
    if as_json:
        _print_json({**summary.__dict__, "elapsed_s": round(elapsed, 3)})
    else:
        _say(report.run_note(summary, elapsed))


@command()
def plan(
    model: Annotated[
        str | None,
        typer.Argument(
            help="GGUF file or a name from `models:`; default: the job's model (--job), the "
            "configured model, else the default model."
        ),
    ] = None,
    job: Annotated[
        int | None,
        typer.Option(
            "--job",
            help="Plan for this queued job: its model, its load settings, and a context "
            "sized from its prompts (ctx auto).",
            show_default=False,
        ),
    ] = None,
    vram_cap: VramCapOpt = None,
    ctx: CtxOpt = None,
    parallel: ParallelOpt = None,
    gpu_layers: GpuLayersOpt = None,
    ubatch: UbatchOpt = None,
    placement: PlacementOpt = None,
    swa_full: SwaFullOpt = None,
    cache_type: CacheTypeOpt = None,
    flash_attn: FlashOpt = None,
    threads: ThreadsOpt = None,
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
    allow_cpu: AllowCpuOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run/--no-dry-run",
            help="Confirm the estimate with llama.cpp's own dry run (no memory is allocated).",
        ),
    ] = True,
    llama_args: Annotated[
        bool,
        typer.Option(
            "--llama-args",
            help="Print only the llama-server / llama-cli flags that load the model as the "
            "plan does (-ngl, -ot, -c, -np, -ub, -fa, ...).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show how a model will be split between GPU and RAM, before anything is loaded.

    Mixture-of-experts models: attention, norms, router and shared experts of every block,
    the output layer, KV cache and compute buffer go on the GPU and routed experts to RAM;
    then the experts of as many blocks as fit come onto the GPU (from the last block down),
    then part of one more block. Dense models: whole layers, then part of one more. All
    under the cap: the smaller of --vram-cap and the free VRAM minus a headroom. The table
    shows each kind of tensor on the GPU and in RAM, and the notes say why no more fit.
    Exit code 8 if the RAM part would not fit in RAM (unless --allow-swap).
    """
    from executor.errors import WouldSwapError
    from executor.loader import plan_for
    from executor.plan import llama_args_line

    flags = dict(
        db=db,
        vram_cap=vram_cap,
        ctx=ctx,
        parallel=parallel,
        gpu_layers=gpu_layers,
        n_ubatch=ubatch,
        placement=placement,
        swa_full=swa_full,
        cache_type=cache_type,
        flash_attn=flash_attn,
        allow_swap=allow_swap,
        allow_cpu=allow_cpu,
        threads=threads,
    )
    settings, path, queued = _plan_target(config, flags, model, job)
    planned = plan_for(
        settings,
        _open_existing(settings),
        path,
        job=queued,
        gpu_total=gpu_total,
        ram_total=ram_total,
        use_dry_run=dry_run,
    )
    if planned.offload_warning:
        _warn(planned.offload_warning)
    if llama_args:
        typer.echo(llama_args_line(planned.plan, planned.threads))
    elif as_json:
        _print_json(planned.as_dict())
    else:
        typer.echo(report.format_plan(planned))
    if not planned.plan.ram_ok and not settings.allow_swap:
        raise WouldSwapError(
            "the RAM part does not fit in RAM: a run would swap and be extremely slow",
            hint="pass --allow-swap to run anyway, or a larger --vram-cap / smaller --ctx",
        )


def _plan_target(
    config: str | None, flags: dict[str, Any], model: str | None, job: int | None
) -> tuple[Settings, Path, Any]:
    """The settings, model file and queued job (if any) that `plan` plans for."""
    from executor.models import resolve_model
    from executor.store import queue

    settings = _settings(config, **flags)
    if job is None:
        settings = _settings(config, **flags, model=model)
        return settings, resolve_model(settings.model, settings.models), None
    queued = queue.require_job(_open(settings), job)
    load = queued.params.get("load") or {}
    settings = _settings(config, **{**load, **{k: v for k, v in flags.items() if v is not None}})
    return settings, resolve_model(model or queued.model, settings.models), queued


@command()
def status(
    job: Annotated[int | None, typer.Argument(help="Only this job.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent jobs.")] = 20,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show jobs: items queued, running, done and failed; tokens, tokens/s and ETA."""
    from executor.status import job_rows

    settings = _settings(config, db=db)
    database = _open_existing(settings) if job is None else _open(settings)
    if database is None:  # a fresh machine, or a mistyped path: say which, create nothing
        _say(f"no database at {redact(settings.db_url)} yet (`executor submit` creates it)")
    rows = job_rows(database, job, limit) if database else []
    if as_json:
        _print_json(rows if job is None else rows[0])
    else:
        typer.echo(report.format_jobs(rows))


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
    _say(report.export_note(result, output, errors))


@command()
def cancel(job: JobArg, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Cancel a job: its queued items will not run (finished results stay)."""
    from executor.store import queue

    n = queue.cancel_job(_open(_settings(config, db=db)), job)
    _say(f"job {job}: cancelled ({n} items will not run; `executor retry {job}` resumes)")


@command()
def retry(job: JobArg, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Put a job's failed and cancelled items back in the queue (invalid lines stay failed)."""
    from executor.store import queue

    n = queue.retry_job(_open(_settings(config, db=db)), job)
    _say(f"job {job}: {n} items queued again")


@command(db_app, "upgrade")
def db_upgrade(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Apply schema migrations (also done automatically whenever a command opens the DB)."""
    database = _open(_settings(config, db=db), create=True)
    _say(f"{database.display_url} is at revision {database.revision()}")


@command(db_app, "revision")
def db_revision(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Print the database's schema revision and the newest one this version knows."""
    from executor.store.db import revisions

    current, head = revisions(_settings(config, db=db).db_url)
    typer.echo(f"database {current or '(blank)'}, code {head}")


@command()
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
    from executor.models import DEFAULT_MODEL, describe_model

    settings = _settings(config, model=path)
    info = describe_model(settings.model, settings.models, settings.sources["model"])
    if as_json:
        _print_json(info)
        return
    typer.echo(f"{info['path']}\n  size   {info['size']:,} bytes\n  sha256 {info['sha256']}")
    if info["default_model"]:
        typer.echo(f"  the default model ({DEFAULT_MODEL.name}); hash verified")


@command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8484,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="EXECUTOR_API_KEY",
            help="Clients must send it (Authorization: Bearer KEY; a browser: any user, the "
            "key as password).",
            show_default=False,
        ),
    ] = None,
    max_upload: Annotated[
        str, typer.Option("--max-upload", help="Largest file accepted (OpenAI's is 200MB).")
    ] = "200MB",
    log_format: LogFormatOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve OpenAI's Batch API (/v1/files, /v1/batches) and a status page at /.

    Code written for OpenAI's batch API works unchanged against it, given
    base_url="http://127.0.0.1:8484/v1" and any api_key. The models run in `executor run` next to
    it (or on other machines sharing the database); body.model resolves through `models:`
    of the config file, as in `submit`. Binds 127.0.0.1 by default; any other address
    needs --api-key. Files live beside the SQLite database (else the data folder).
    """
    from executor.serve.server import serve as run_server

    settings = _settings(config, db=db, log_format=log_format)
    _events(settings)  # logging as `run` does
    run_server(settings, _open(settings, create=True), host, port, api_key, max_upload)


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
    from executor.pipeline import run_spec, spec_and_settings

    job_spec, settings = spec_and_settings(
        spec, {"db": db, "log_format": log_format, "allow_cpu": allow_cpu}, config
    )
    events = _events(settings)
    done = run_spec(job_spec, settings, _open(settings, create=True), events)
    job = done.job
    if done.exported is not None:
        errors = str(job_spec.errors) if job_spec.errors else None
        _say(report.export_note(done.exported, str(job_spec.output), errors))
    if as_json:
        _print_json(
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
        _say(f"job {job.id} is not finished (stopped by a signal); run-job again to go on")


@command(config_app, "show")
def config_show(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print every setting's effective value and where it came from (flag, env, file,
    default)."""
    from executor.config import OPTIONS

    settings = _settings(config, db=db)
    values = settings.shown()
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
    typer.echo(report.format_settings(settings, values, {k: o.help for k, o in OPTIONS.items()}))


@command()
def doctor(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check this machine: llama-cpp-python and GPU offload, NVIDIA GPUs, RAM and swap, the
    database and its schema, the default model and its hash. Exit code 9 if a check FAILs
    (a missing GPU is a WARN: everything runs on the CPU)."""
    from executor.doctor import run_checks
    from executor.errors import ChecksFailedError

    checks = run_checks(_settings(config, db=db))
    if as_json:
        _print_json([c.__dict__ for c in checks])
    else:
        typer.echo(report.format_checks(checks))
    failed = [c.name for c in checks if c.state == "FAIL"]
    if failed:
        raise ChecksFailedError(f"{len(failed)} check(s) failed: {', '.join(failed)}")


@command()
def workers(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List workers, live first: host, GPU, model loaded, current job, tokens/s, heartbeat.

    A worker is live while its heartbeat (every few seconds) is recent.
    """
    from executor.store import workers as registry

    settings = _settings(config, db=db)
    database = _open_existing(settings)
    if database is None:
        _say(f"no database at {redact(settings.db_url)} yet (`executor submit` creates it)")
    rows = registry.listing(database, alive_within=settings.lease_seconds) if database else []
    if as_json:
        _print_json(rows)
    else:
        typer.echo(report.format_workers(rows))


@command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Commands turn domain errors into exit codes themselves; anything else is a
    bug, reported in one line (the traceback with EXECUTOR_DEBUG=1)."""
    try:
        # Standalone mode: Typer prints usage errors itself (exit 2) and exits after a command.
        app(args=argv, prog_name="executor")
    except Exception as exc:
        if os.environ.get("EXECUTOR_DEBUG") == "1":
            raise
        _say(redact(f"executor: internal error: {type(exc).__name__}: {exc}"))
        _say("  hint: rerun with EXECUTOR_DEBUG=1 for the traceback, and report it")
        sys.exit(ExitCode.INTERNAL)
