"""What tests call: the CLI in-process (fast) or as a real process (for crashes, signals and
locks), JSON-lines files, and looks into a test database."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from executor.cli import app
from executor.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


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


def settings_for(db_path: Path, **flags: object) -> Settings:
    """Settings as the CLI would build them, pointed at a test database."""
    return load_settings({"db": str(db_path), **flags})


def run_cli(
    *args: str,
    db_path: Path | None = None,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `executor ARGS` in this process with Typer's CliRunner (stdin `input`, extra
    `env`); the answer looks like a finished process's. An unexpected exception is raised."""
    extra = dict(env or {})
    if db_path is not None:
        extra["EXECUTOR_DB"] = str(db_path)
    result = CliRunner().invoke(app, list(args), input=input, env=extra)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    done = subprocess.CompletedProcess(
        ["executor", *args], result.exit_code, result.stdout, result.stderr
    )
    if check and done.returncode != 0:
        raise AssertionError(f"executor {' '.join(args)} exited {done.returncode}\n{done.stderr}")
    return done


def run_cli_process(
    *args: str,
    db_path: Path | None = None,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m executor ARGS` as a real process (stdin `input`, extra `env`)."""
    full_env = {**os.environ, **(env or {})}
    if db_path is not None:
        full_env["EXECUTOR_DB"] = str(db_path)
    # Bytes in and out, so that tests can feed invalid UTF-8.
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [sys.executable, "-m", "executor", *args],
        input=data,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    result = subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"executor {' '.join(args)} exited {result.returncode}\n{result.stderr}"
        )
    return result


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def submit_rows(
    tmp_path: Path, db_path: Path | None, model: Path, rows: list[dict], *args: str
) -> int:
    """Write `rows` to a new JSON-lines file and `executor submit` it with `model` (extra
    flags in `args`, e.g. "--db", URL); the job id."""
    path = write_jsonl(tmp_path / f"in-{time.monotonic_ns()}.jsonl", rows)
    done = run_cli("submit", str(path), "--model", str(model), *args, db_path=db_path, check=True)
    return int(done.stdout.strip())


def read_jsonl(path: Path | str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8") if isinstance(path, Path) else path
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tiny_info(**fields: object):
    """A hand-made ModelInfo (6 gemma3-like blocks of one 1-byte tensor), for unit tests of
    the plan's arithmetic; `fields` override any of its values."""
    from executor.gguf.info import ModelInfo, TensorInfo

    n_layer = int(fields.get("n_layer", 6))  # type: ignore[arg-type]
    base: dict[str, object] = dict(
        path="x",
        architecture="gemma3",
        n_layer=n_layer,
        n_embd=1024,
        n_ff=4096,
        n_vocab=1000,
        n_ctx_train=32768,
        n_head=(8,) * n_layer,
        n_head_kv=(4,) * n_layer,
        key_length=128,
        value_length=128,
        n_swa=0,
        swa_layers=(False,) * n_layer,
        tensors=tuple(
            TensorInfo(f"blk.{i}.attn_q.weight", i, "attention", 1) for i in range(n_layer)
        ),
        output_tied=False,
        file_size=1,
    )
    base.update(fields)
    return ModelInfo(**base)  # type: ignore[arg-type]


def table_counts(db_path: Path) -> tuple:
    """(jobs, items, results) in a SQLite database; zeros when there is no file."""
    if not db_path.exists():
        return (0, 0, 0)
    return query(
        db_path,
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM items), "
        "(SELECT count(*) FROM results)",
    )[0]


def generate_in_process(spec, log: Path, requests: list) -> dict[int, str]:
    """Run one batch through a real model process (`spec`: a LoadSpec); item id → output."""
    from executor.engine.protocol import BatchDone, ItemDone, ItemFailed
    from executor.run.supervisor import ModelProcess

    proc = ModelProcess(spec, log)
    proc.start()
    outputs: dict[int, str] = {}
    try:
        for event in proc.run(requests):
            if isinstance(event, ItemDone):
                outputs[event.item_id] = event.record.output
            elif isinstance(event, ItemFailed):
                raise AssertionError(event.reason)
            elif isinstance(event, BatchDone):
                break
    finally:
        proc.stop()
    return outputs
