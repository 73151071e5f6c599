"""The command line: each command parses its options, calls one service function and renders
the answer (tables in render.py). Domain errors (errors.py) become one message on stderr and
their documented exit code; nothing here runs SQL or decides anything.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from executor.cli.logs import setup_logging
from executor.config import Settings, load_settings, not_utf8, undecodable
from executor.errors import DiskError, ExecutorError, ExitCode, InputError
from executor.redact import printable, redact
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


def _written(func: Callable[..., Any], key: str) -> str:
    """How a user writes parameter `key` of a command: FILE for an argument, else --key."""
    try:
        hint = typing.get_type_hints(func, include_extras=True).get(key)
    except Exception:  # only for a message: the plain form will do
        hint = None
    if any(isinstance(m, typer.models.ArgumentInfo) for m in getattr(hint, "__metadata__", ())):
        return key.upper()
    return "--" + key.replace("_", "-")


def command(
    typer_app: typer.Typer = app, name: str | None = None, **options: Any
) -> Callable[[F], F]:
    """Register a command whose domain errors end it with their message and exit code."""

    def register(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                for key, value in kwargs.items():
                    if undecodable(value):
                        raise not_utf8(_written(func, key))
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

        typer_app.command(name, **options)(run)
        return func

    return register


def _report(exc: ExecutorError) -> None:
    if isinstance(exc, InputError):
        for problem in exc.problems:
            say(problem)
    say(f"executor: error: {exc}")
    if exc.hint:
        say(f"  hint: {exc.hint}")


def settings_for(config: str | None, **flags: Any) -> Settings:
    return load_settings(flags, config=config)


def open_db(settings: Settings, *, create: bool = False) -> Database:
    """The database; only the commands that put work in it (submit, run, run-job, db
    upgrade) create it: a mistyped path elsewhere is an error, not a new empty database."""
    return open_database(settings.db_url, create=create)


def open_existing(settings: Settings) -> Database | None:
    """The database if there is one (plan reads what past loads taught; it needs none)."""
    from executor.errors import NoDatabaseError

    try:
        return open_db(settings)
    except NoDatabaseError:
        return None


def print_json(data: Any) -> None:
    show(json.dumps(data, indent=2, default=str))


def show(text: object) -> None:
    """What a command prints on stdout (tables, ids, data), with secrets masked."""
    typer.echo(redact(str(text)))


def say(message: str) -> None:
    """Human-facing messages go to stderr, so stdout stays clean for ids and data; secrets
    masked and control characters shown as escapes."""
    typer.echo(printable(redact(message), lines=True), err=True)


def warn(message: str) -> None:
    say(f"WARNING: {message}")


def run_events(settings: Settings) -> Any:
    """How a run shows its progress: a bar on a terminal, log lines otherwise."""
    from executor.cli.progress import ProgressDisplay

    return ProgressDisplay(setup_logging(settings.log_format), settings.progress_seconds)


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
        say(f"executor: internal error: {type(exc).__name__}: {exc}")
        say("  hint: rerun with EXECUTOR_DEBUG=1 for the traceback, and report it")
        sys.exit(ExitCode.INTERNAL)
