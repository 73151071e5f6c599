"""The errors the CLI knows how to print, each with its documented exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; the README documents the same table."""

    OK = 0
    INTERNAL = 1  # a bug: an unexpected exception (traceback with EXECUTOR_DEBUG=1)
    USAGE = 2  # bad flags, bad config, bad input file
    LOCKED = 3  # another `executor run` holds the worker lock
    MODEL = 4  # model missing, corrupt or failed to load
    NOT_FOUND = 5  # no such job
    JOB_FAILED = 6  # `run-job`/`run --job`: the job ended with failures it could not recover from
    DATABASE = 7  # database unreachable or at an unknown schema revision
    WOULD_SWAP = 8  # `plan`: the CPU part does not fit in RAM (pass --allow-swap)
    CHECK_FAILED = 9  # `doctor`: a check failed
    DISK = 10  # a disk is full or a folder is not writable (nothing was lost)


class ExecutorError(Exception):
    """Base of all errors that end a command with a message instead of a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(ExecutorError):
    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A setting has an unknown key or a bad value."""


class InputError(UsageError):
    """An input file has invalid lines; `problems` holds one message per bad line."""

    def __init__(
        self,
        message: str,
        problems: list[str] | None = None,
        total: int = 0,
        *,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.problems = problems or []
        self.total = total or len(self.problems)


class LockedError(ExecutorError):
    exit_code = ExitCode.LOCKED


class ModelError(ExecutorError):
    exit_code = ExitCode.MODEL


class NotFoundError(ExecutorError):
    exit_code = ExitCode.NOT_FOUND


class JobFailedError(ExecutorError):
    """`run-job`: the job failed as a whole (its model would not load, even on the CPU)."""

    exit_code = ExitCode.JOB_FAILED


class DatabaseError(ExecutorError):
    exit_code = ExitCode.DATABASE


class NoDatabaseError(DatabaseError):
    """A SQLite database that does not exist (and the command does not create one)."""


class DatabaseGone(DatabaseError):
    """The SQLite file a process opened was deleted or replaced under it."""


class DiskError(ExecutorError):
    """A file executor must write cannot be written: a full disk, a read-only folder."""

    exit_code = ExitCode.DISK


class UnstorableResult(ExecutorError):
    """A model's answer holds what the database cannot store (a NUL, a lone surrogate): that
    item fails with the reason; the run goes on."""


class WouldSwapError(ExecutorError):
    """`plan`: the CPU part of the model does not fit in RAM."""

    exit_code = ExitCode.WOULD_SWAP


class ChecksFailedError(ExecutorError):
    """`doctor`: at least one check failed."""

    exit_code = ExitCode.CHECK_FAILED
