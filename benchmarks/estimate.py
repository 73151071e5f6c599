"""How close `executor estimate` comes to the real time, on the default model.

One earlier job of the model runs first (as on any machine after its first night: its decode
rates are measured at that load, and its answers' lengths are known). Then, for a 200-prompt
chat job and a prompt-heavy job (long passages, short answers): the estimate is read, the
job is run, and its real time (first claim to last result, which the estimate predicts; the
whole `run` process beside it) is compared.

    .venv/bin/python benchmarks/estimate.py [--chat 200] [--heavy 100]

Prints predicted (expected and upper bound) against actual and the ratio (aim: ±20 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import PASSAGE, _utc, chat_rows, write_rows  # noqa: E402


def heavy_rows(n: int) -> list[dict]:
    """~400-token prompts with 16-token answers: prompt processing dominates."""
    return [
        {"custom_id": f"h{i}", "prompt": f"{PASSAGE * 6} ({i}) In one sentence:",
         "max_tokens": 16}
        for i in range(n)
    ]  # fmt: skip


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "executor", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout


def job_span(db: Path, job: int) -> float:
    conn = sqlite3.connect(db)
    first, last = conn.execute(
        "SELECT j.started_at, max(r.created_at) FROM jobs j JOIN items i ON i.job_id = j.id "
        "JOIN results r ON r.item_id = i.id WHERE j.id = ?",
        (job,),
    ).fetchone()
    conn.close()
    return (_utc(last) - _utc(first)).total_seconds()


def measure(env: dict[str, str], db: Path, work: Path, name: str, rows: list[dict]) -> dict:
    job = int(cli(env, "submit", "--force", str(write_rows(rows, work / f"{name}.jsonl"))))
    estimate = json.loads(cli(env, "estimate", str(job), "--json"))
    started = time.perf_counter()
    cli(env, "run", "--until-empty")
    wall = time.perf_counter() - started
    actual = job_span(db, job)
    return {"name": name, "items": len(rows), "estimate": estimate, "actual": actual, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat", type=int, default=200)
    parser.add_argument("--heavy", type=int, default=100)
    parser.add_argument("--earlier", type=int, default=32, help="prompts of the earlier job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = work / "estimate.db"
        env = {**os.environ, "EXECUTOR_DB": str(db), "XDG_STATE_HOME": str(work / "state")}
        earlier = measure(env, db, work, "earlier", chat_rows(args.earlier))
        print(f"earlier job: {args.earlier} chat prompts in {earlier['actual']:.1f} s (its "
              "rates and answer lengths are what the estimates learn from)")  # fmt: skip
        results = [
            measure(env, db, work, "chat", chat_rows(args.chat)),
            measure(env, db, work, "prompt-heavy", heavy_rows(args.heavy)),
        ]
    print("\n| job | items | predicted (expected) | upper bound | actual | predicted ÷ actual |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        e = r["estimate"]
        expected = e["seconds_expected"]
        print(
            f"| {r['name']} | {r['items']} | {expected:.1f} s | {e['seconds_most']:.1f} s | "
            f"{r['actual']:.1f} s (run {r['wall']:.1f} s) | {expected / r['actual']:.2f} |"
        )
    for r in results:
        print(f"\n{r['name']}: " + "; ".join(r["estimate"]["basis"]))


if __name__ == "__main__":
    main()
