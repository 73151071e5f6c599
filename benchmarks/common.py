"""What the benchmarks share: running a prompt set through executor end to end."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def executor_run(rows: list[dict], workdir: Path, *, parallel: int, ctx: int) -> dict:
    """submit → run --until-empty → export, as a user runs them.

    `tok_s` is completion tokens per second from the job's first claim to its last
    checkpoint (the model load excluded, as from the baselines); `wall_s` is the whole thing.
    """
    db = workdir / f"bench-p{parallel}-{time.monotonic_ns()}.db"
    env = {**os.environ, "EXECUTOR_DB": str(db), "EXECUTOR_CTX": str(ctx)}
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = [sys.executable, "-m", "executor"]
    started = time.perf_counter()
    job = subprocess.run(
        [*cli, "submit", str(prompts)],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(
        [*cli, "run", "--until-empty", "--parallel", str(parallel)],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    subprocess.run(
        [*cli, "export", job, "-o", str(workdir / "out.jsonl")],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    wall = time.perf_counter() - started
    conn = sqlite3.connect(db)
    first, last, tokens = conn.execute(
        "SELECT j.started_at, max(r.created_at), sum(r.completion_tokens) FROM jobs j "
        "JOIN items i ON i.job_id = j.id JOIN results r ON r.item_id = i.id"
    ).fetchone()
    conn.close()
    seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "wall_s": wall}
