"""Commands that run or plan a model: run, plan, and the workers that run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

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
    warn,
)
from executor.cli.options import ConfigOpt, DbOpt, JsonOpt, LogFormatOpt, with_load_flags
from executor.config import Settings
from executor.errors import JobFailedError
from executor.redact import redact


@command()
@with_load_flags
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
    stop_timeout: Annotated[
        str | None,
        typer.Option(
            help="On SIGTERM/Ctrl-C: seconds the items in flight may take to finish. "
            "[env EXECUTOR_STOP_TIMEOUT; default 30]",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="llama, or fake (echoes prompts: for testing pipelines). [env EXECUTOR_ENGINE]",
            show_default=False,
        ),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option(
            help="Run only in these hours, local time: 22:00-07:00 (several: "
            "22:00-07:00,12:30-13:30). At the end the model is unloaded; outside it the "
            "worker waits with nothing loaded (--until-empty: exits). [env EXECUTOR_WINDOW]",
            show_default=False,
        ),
    ] = None,
    yield_gpu: Annotated[
        bool | None,
        typer.Option(
            "--yield-gpu/--no-yield-gpu",
            help="Step aside (unload) while another process uses the GPU (a game, your own "
            "work), and resume once it has been free for a while. [env EXECUTOR_YIELD_GPU]",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
    log_format: LogFormatOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    load: dict[str, Any] | None = None,
) -> None:
    """Process queued jobs: load each model once, generate, checkpoint every result.

    The model runs in a child process: if it crashes, the items it was working on go back to
    the queue. Only one `executor run` works on a database at a time; a second one exits at
    once with code 3. SIGTERM or Ctrl-C stops gracefully (a second one stops at once); the
    exit code is then 0 and nothing is lost. A model that cannot fit this machine as
    configured (RAM) stops the worker with code 8 before anything is claimed, its items
    left queued; with --until-empty or --job, a job whose model would not load at all (a
    truncated file) ends the run with code 6, naming it.
    """
    from executor.planning.gather import build_can_offload, check_offload
    from executor.run.worker import RunOptions, run_worker
    from executor.store import queue

    settings = settings_for(
        config,
        db=db,
        batch_size=batch_size,
        engine=engine,
        log_format=log_format,
        stop_timeout=stop_timeout,
        window=window,
        yield_gpu=yield_gpu,
        **(load or {}),
    )
    # --gpu-layers on a build that cannot offload: refused before anything is claimed.
    check_offload(settings, None, build_can_offload)
    events = run_events(settings)
    database = open_db(settings, create=True)
    if job is not None:
        queue.require_job(database, job)
    options = RunOptions(
        until_empty=until_empty, job_id=job, max_items=max_items, stop_timeout=settings.stop_timeout
    )
    started = time.monotonic()
    summary = run_worker(settings, database, options, events)
    elapsed = time.monotonic() - started
    if as_json:
        print_json({**summary.__dict__, "elapsed_s": round(elapsed, 3)})
    else:
        say(render.run_note(summary, elapsed))
    if summary.failed_jobs and (until_empty or job is not None):
        # A service worker goes on after a job that cannot run; a draining one says so.
        raise JobFailedError(
            "; ".join(f"job {j} failed as a whole: {why}" for j, why in summary.failed_jobs.items())
        )


@command()
@with_load_flags
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
    load: dict[str, Any] | None = None,
) -> None:
    """Show how a model will be split between GPU and RAM, before anything is loaded.

    Mixture-of-experts models: attention, norms, router and shared experts of every block,
    the output layer, KV cache and compute buffer go on the GPU and routed experts to RAM;
    then the experts of as many blocks as fit come onto the GPU (from the last block down),
    then part of one more block. Dense models: whole layers, then part of one more. All
    under the cap: the smaller of --vram-cap and the free VRAM minus a headroom. The table
    shows each kind of tensor on the GPU and in RAM, and the notes say why no more fit.
    Exit code 8 if the RAM part would not fit in RAM (unless --allow-swap). With --job, the
    job's own load settings (a job spec's ctx, parallel, gpu_layers) win over these flags, as
    on any worker; of two VRAM caps the smaller applies.
    """
    from executor.errors import WouldSwapError
    from executor.planning.gather import plan_for
    from executor.planning.plan import llama_args_line

    settings, path, queued = _plan_target(config, {"db": db, **(load or {})}, model, job)
    planned = plan_for(
        settings,
        open_existing(settings),
        path,
        job=queued,
        gpu_total=gpu_total,
        ram_total=ram_total,
        use_dry_run=dry_run,
    )
    if planned.offload_warning:
        warn(planned.offload_warning)
    if llama_args:
        show(llama_args_line(planned.plan, planned.threads))
    elif as_json:
        print_json(planned.as_dict())
    else:
        show(render.format_plan(planned))
    if not planned.plan.ram_ok and not settings.allow_swap:
        raise WouldSwapError(
            "the RAM part does not fit in RAM: a run would swap and be extremely slow",
            hint="pass --allow-swap to run anyway, or a larger --vram-cap / smaller --ctx",
        )


def _plan_target(
    config: str | None, flags: dict[str, Any], model: str | None, job: int | None
) -> tuple[Settings, Path, Any]:
    """The settings, model file and queued job (if any) that `plan` plans for. A job's own
    load settings are applied by plan_for, by the rule every worker follows."""
    from executor.gguf.models import resolve_model
    from executor.store import queue

    settings = settings_for(config, **flags, model=model if job is None else None)
    if job is None:
        return settings, resolve_model(settings.model, settings.models), None
    queued = queue.require_job(open_db(settings), job)
    return settings, resolve_model(model or queued.model, settings.models), queued


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

    settings = settings_for(config, db=db)
    database = open_existing(settings)
    if database is None:
        say(f"no database at {redact(settings.db_url)} yet (`executor submit` creates it)")
    rows = registry.listing(database, alive_within=settings.lease_seconds) if database else []
    if as_json:
        print_json(rows)
    else:
        show(render.format_workers(rows))


@command()
def pause(
    worker: Annotated[
        str | None,
        typer.Option(
            "--worker",
            help="Only this worker (its id, as `executor workers` shows it, or a host name); "
            "default: every worker on this database.",
            show_default=False,
        ),
    ] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Give the GPU back now: workers stop claiming, let their items in flight finish
    (--stop-timeout), put the rest back and unload the model. Through the database, so it
    reaches workers on other hosts; `executor resume` lifts it. Nothing is lost."""
    from executor.store import workers as registry

    database = open_db(settings_for(config, db=db))
    target = worker or "*"
    fresh = registry.pause(database, target)
    who = "every worker" if target == "*" else f"worker {target}"
    say(f"{'paused' if fresh else 'already paused'}: {who} (`executor resume` lifts it)")


@command()
def resume(
    worker: Annotated[
        str | None,
        typer.Option(
            "--worker", help="Only this worker's pause; default: every pause.", show_default=False
        ),
    ] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Lift `executor pause`: paused workers load their model and go on."""
    from executor.store import workers as registry

    database = open_db(settings_for(config, db=db))
    lifted = registry.resume(database, worker)
    say(
        f"resumed: {lifted} pause{'s' if lifted != 1 else ''} lifted"
        if lifted
        else "nothing was paused"
    )
