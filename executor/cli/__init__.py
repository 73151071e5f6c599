"""The command line (Typer): `app` and the entry point `main`. Each command parses its
options, calls one service and renders the answer (render.py, progress.py); the commands live
in job_commands.py, run_commands.py and admin_commands.py, registered on import."""

from executor.cli import admin_commands, job_commands, run_commands  # noqa: F401 - registers
from executor.cli.app import app, main

# The order `executor --help` lists them in: the everyday ones first.
ORDER = ("submit", "run", "status", "estimate", "export", "plan", "cancel", "retry",
         "priority", "run-job", "pause", "resume", "workers", "serve", "model", "doctor",
         "version")  # fmt: skip
app.registered_commands.sort(
    key=lambda c: ORDER.index(c.name or c.callback.__name__.replace("_", "-"))  # type: ignore[union-attr]
)

__all__ = ["app", "main"]
