"""Commands about the machine and the installation: db, model, serve, config, doctor,
version."""

from __future__ import annotations

from typing import Annotated

import typer

from executor import __version__
from executor.cli import render
from executor.cli.app import (
    command,
    config_app,
    db_app,
    open_db,
    print_json,
    run_events,
    say,
    settings_for,
    show,
)
from executor.cli.options import (
    ConfigOpt,
    DbOpt,
    JsonOpt,
    LogFormatOpt,
)


@command(db_app, "upgrade")
def db_upgrade(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Apply schema migrations (also done automatically whenever a command opens the DB)."""
    database = open_db(settings_for(config, db=db), create=True)
    say(f"{database.display_url} is at revision {database.revision()}")


@command(db_app, "revision")
def db_revision(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Print the database's schema revision and the newest one this version knows."""
    from executor.store.db import revisions

    current, head = revisions(settings_for(config, db=db).db_url)
    show(f"database {current or '(blank)'}, code {head}")


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
    from executor.gguf.models import DEFAULT_MODEL, describe_model

    settings = settings_for(config, model=path)
    info = describe_model(settings.model, settings.models, settings.sources["model"])
    if as_json:
        print_json(info)
        return
    show(f"{info['path']}\n  size   {info['size']:,} bytes\n  sha256 {info['sha256']}")
    if info["default_model"]:
        show(f"  the default model ({DEFAULT_MODEL.name}); hash verified")


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

    settings = settings_for(config, db=db, log_format=log_format)
    run_events(settings)  # logging as `run` does
    run_server(settings, open_db(settings, create=True), host, port, api_key, max_upload)


@command(config_app, "show")
def config_show(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print every setting's effective value and where it came from (flag, env, file,
    default)."""
    from executor.config import OPTIONS

    settings = settings_for(config, db=db)
    values = settings.shown()
    if as_json:
        print_json(
            {
                "config_file": str(settings.config_file) if settings.config_file else None,
                "settings": {
                    k: {"value": values[k], "source": settings.sources[k]} for k in OPTIONS
                },
            }
        )
        return
    show(render.format_settings(settings, values, {k: o.help for k, o in OPTIONS.items()}))


@command()
def doctor(
    as_json: JsonOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check this machine: llama-cpp-python and GPU offload, NVIDIA GPUs, RAM and swap, the
    database and its schema, the default model and its hash. Exit code 9 if a check FAILs
    (a missing GPU is a WARN: everything runs on the CPU)."""
    from executor.cli.doctor import run_checks
    from executor.errors import ChecksFailedError

    checks = run_checks(settings_for(config, db=db))
    if as_json:
        print_json([c.__dict__ for c in checks])
    else:
        show(render.format_checks(checks))
    failed = [c.name for c in checks if c.state == "FAIL"]
    if failed:
        raise ChecksFailedError(f"{len(failed)} check(s) failed: {', '.join(failed)}")


@command()
def version() -> None:
    """Print the version."""
    show(__version__)
