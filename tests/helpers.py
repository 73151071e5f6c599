"""Helpers for tests that drive real `executor` processes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT


def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "condition"):
    """Poll until `condition()` is truthy; return its value (fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def count_items(db_path: Path, status: str | None = None) -> int:
    """Items in the database (of one status), read with plain sqlite3."""
    if not db_path.exists():
        return 0
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        if status is None:
            return conn.execute("SELECT count(*) FROM items").fetchone()[0]
        return conn.execute("SELECT count(*) FROM items WHERE status = ?", (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def query(db_path: Path, sql: str, *args: object) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def start_cli(*args: str, db_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -m executor ARGS` in the background (its own session, for signals)."""
    full_env = {**os.environ, "EXECUTOR_DB": str(db_path), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "executor", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
    )


def engine_log(state_home: Path) -> str:
    logs = sorted((state_home / "executor").glob("engine-*.log"))
    return "".join(p.read_text(errors="replace") for p in logs)


def model_pids(state_home: Path) -> list[int]:
    """Pids of model processes started so far, as they announce themselves in the engine log."""
    return [
        int(p) for p in re.findall(r"executor model process (\d+): loading", engine_log(state_home))
    ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
