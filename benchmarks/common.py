"""What the benchmarks share: the workloads, and timing whole processes from outside.

Every rate here is completion tokens per second over a whole process's wall time (start-up,
imports, model load included) unless it says `gen`: a user running a nightly job pays all of
it. Everyone gets the same threads: one per physical core (executor's default; the plain loop
and llama-batched-bench are given the same number explicitly).
"""

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
sys.path.insert(0, str(ROOT))

from executor.machine.cpus import cpu_count  # noqa: E402

TOPICS = [
    "the sea", "a lighthouse", "bread", "rain", "mountains", "a library", "trains", "the moon",
    "bees", "winter", "a market", "clocks", "rivers", "owls", "glass", "a garden",
]  # fmt: skip

PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
    "steps as his father had taught him, and at the top he wiped the great lens, lit "
    "the lamp and watched the ships pass in the dark water below. One night"
)


def chat_rows(n: int, max_tokens: int = 128) -> list[dict]:
    """Chat prompts of the kind users send: short answers of uneven length, most ending at
    EOS before max_tokens (so batches have a tail of half-empty steps)."""
    return [
        {
            "custom_id": f"c{i}",
            "max_tokens": max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}"
                    + (f" (take {i // len(TOPICS) + 1})." if i >= len(TOPICS) else "."),
                }
            ],
        }
        for i in range(n)
    ]


def long_rows(n: int, new_tokens: int = 128) -> list[dict]:
    """~64-token raw prompts that invite a long continuation: every one generates all
    `new_tokens` (the kindest case for batching: no tail)."""
    return [
        {"custom_id": f"l{i}", "prompt": f"{PASSAGE} ({i})", "max_tokens": new_tokens}
        for i in range(n)
    ]


WORKLOADS = {"chat": chat_rows, "long": long_rows}


def threads() -> int:
    return cpu_count().threads


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_loop(model: Path, rows: list[dict], workdir: Path, *, n_threads: int) -> dict:
    """benchmarks/plain_loop.py as its own process, timed from outside."""
    path = write_rows(rows, workdir / "plain.jsonl")
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), str(model), str(path),
         "--threads", str(n_threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        **inner,
        "wall_s": wall,
        "tok_s": inner["tokens"] / wall,
        "gen_tok_s": inner["tokens"] / inner["gen_s"],
    }


def executor_run(
    rows: list[dict],
    workdir: Path,
    *,
    parallel: int | str = "auto",
    ctx: int | str = "auto",
    extra_env: dict[str, str] | None = None,
    db: Path | None = None,
) -> dict:
    """submit → run --until-empty → export, as a user runs them, each process timed.

    `tok_s`: completion tokens over the `run` process's wall time; `gen_tok_s`: from the
    job's first claim to its last checkpoint; `startup_s`: from starting `run` to the first
    claim (imports, the model process, the load); submit and export have their own times.
    A fresh database unless `db` is given (the same one across runs keeps what executor
    learns once per model and host, as a nightly user's does: decode rates, placements).
    """
    db = db or workdir / f"bench-{time.monotonic_ns()}.db"
    env = {**os.environ, "EXECUTOR_DB": str(db), "EXECUTOR_CTX": str(ctx), **(extra_env or {})}
    prompts = write_rows(rows, workdir / "prompts.jsonl")
    cli = [sys.executable, "-m", "executor"]

    def timed(*args: str) -> tuple[float, str, str]:
        started = time.perf_counter()
        done = subprocess.run(
            [*cli, *args], env=env, check=True, cwd=ROOT, capture_output=True, text=True
        )
        return time.perf_counter() - started, done.stdout, done.stderr

    submit_s, job, _ = timed("submit", "--force", str(prompts))
    job_id = int(job.strip())
    run_started = datetime.now().astimezone()
    run_s, _, log = timed("run", "--until-empty", "--parallel", str(parallel))
    export_s, _, _ = timed("export", str(job_id), "-o", str(workdir / "out.jsonl"))
    conn = sqlite3.connect(db)
    first, last, tokens = conn.execute(
        "SELECT j.started_at, max(r.created_at), sum(r.completion_tokens) FROM jobs j "
        "JOIN items i ON i.job_id = j.id JOIN results r ON r.item_id = i.id WHERE j.id = ?",
        (job_id,),
    ).fetchone()
    (picked,) = conn.execute("SELECT parallel FROM loads ORDER BY id DESC LIMIT 1").fetchone()
    conn.close()
    first_at = _utc(first)
    gen = (_utc(last) - first_at).total_seconds()
    return {
        "tokens": tokens,
        "tok_s": tokens / run_s,
        "gen_tok_s": tokens / gen,
        "run_s": run_s,
        "startup_s": (first_at - run_started).total_seconds(),
        "submit_s": submit_s,
        "export_s": export_s,
        "parallel": picked,
        "log": log,
    }


def _utc(stamp: str) -> datetime:
    """The store's naive UTC timestamps, made aware."""
    from datetime import UTC

    return datetime.fromisoformat(stamp).replace(tzinfo=UTC)
