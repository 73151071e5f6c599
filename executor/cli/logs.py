"""Logging: one plain (or JSON) line per event on stderr; on a terminal, around a progress bar."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from executor.redact import printable, redact

# Extra fields a log call may carry (logging's `extra=`); JSON lines include them as keys.
FIELDS = ("job", "item", "done", "total", "in_flight", "failed", "tokens", "tokens_per_s", "eta_s",
          "layers", "cause")  # fmt: skip


class PlainFormatter(logging.Formatter):
    """`2026-11-27T10:00:00Z INFO message` — greppable, one line per event."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # Secrets masked; a job's name or a file's never moves the cursor (its control
        # characters are shown as escapes); a message meant to span lines still does.
        message = printable(redact(record.getMessage()), lines=True)
        text = f"{stamp} {record.levelname} {message}"
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key in FIELDS:
            if hasattr(record, key):
                data[key] = getattr(record, key)
        if record.exc_info:
            data["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


class StatusLine:
    """The one redrawable line at the bottom of a terminal (the progress bar)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text = ""

    def show(self, text: str) -> None:
        self.text = text
        self.stream.write("\r\033[K" + text)
        self.stream.flush()

    def clear(self) -> None:
        if self.text:
            self.stream.write("\r\033[K")
            self.text = ""
            self.stream.flush()


class TerminalHandler(logging.StreamHandler):
    """Prints log lines above the status line, then redraws it."""

    def __init__(self, stream: TextIO, status: StatusLine) -> None:
        super().__init__(stream)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        kept = self.status.text
        if kept:
            self.stream.write("\r\033[K")
        super().emit(record)
        if kept:
            self.status.show(kept)


def setup_logging(
    log_format: str = "plain", *, verbose: bool = False, stream: TextIO | None = None
) -> StatusLine | None:
    """Configure the root logger; return the status line when stderr is a terminal."""
    stream = stream or sys.stderr
    interactive = stream.isatty() and log_format == "plain"
    status = StatusLine(stream) if interactive else None
    handler: logging.Handler = (
        TerminalHandler(stream, status) if status else logging.StreamHandler(stream)
    )
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return status
