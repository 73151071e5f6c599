"""From submit to first claim on PostgreSQL: an idle worker that polls against one that
listens (LISTEN/NOTIFY).

A throwaway PostgreSQL server (tests/pg_server.py) and one idle `executor run` worker (the
fake engine: the claim, not generation, is measured) polling every `--poll` seconds, with
notifications off and then on; each round submits a one-item job and takes, from the
database, the time from the job's commit to its item's claim (the lease taken).

    .venv/bin/python benchmarks/wake.py [--rounds 8] [--poll 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from tests.pg_server import PgDatabases, PgServer  # noqa: E402
from tests.synthetic_gguf import write_tiny_gguf  # noqa: E402


def latency(url: str, model: Path, work: Path, n: int, env: dict[str, str]) -> float:
    """Seconds from the job's commit (its created_at) to its item's claim (its lease taken:
    updated_at), both stamped by the processes on this host's clock."""
    path = work / f"one-{n}.jsonl"
    path.write_text(json.dumps({"prompt": f"wake {n}"}) + "\n")
    subprocess.run(
        [sys.executable, "-m", "executor", "submit", str(path), "--model", str(model)],
        env=env, cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            while True:
                row = conn.exec_driver_sql(
                    "SELECT j.created_at, min(i.updated_at) FROM items i JOIN jobs j "
                    "ON j.id = i.job_id WHERE j.input_path = %s AND i.status != 'queued' "
                    "GROUP BY j.created_at",
                    (str(path.resolve()),),
                ).first()
                conn.rollback()
                if row is not None:
                    return (row[1] - row[0]).total_seconds()
                time.sleep(0.01)
    finally:
        engine.dispose()


def measure(
    url: str, model: Path, work: Path, rounds: int, poll: float, listen: bool
) -> list[float]:
    env = {**os.environ, "EXECUTOR_DB": url, "EXECUTOR_ENGINE": "fake",
           "EXECUTOR_POLL_SECONDS": str(poll), "EXECUTOR_WAKE_ON_NOTIFY": "1" if listen else "0",
           "XDG_STATE_HOME": str(work / "state")}  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "executor", "run"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(3)  # started and idle
        out = []
        for n in range(rounds):
            out.append(latency(url, model, work, n + (1000 if listen else 0), env))
            time.sleep(poll * (0.3 + 0.6 * n / max(rounds - 1, 1)))  # spread over the poll
        return out
    finally:
        worker.terminate()
        worker.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--poll", type=float, default=5.0)
    args = parser.parse_args()
    server = PgServer()
    try:
        databases = PgDatabases(server.url())
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = write_tiny_gguf(work / "tiny.gguf")
            results = {}
            for listen in (False, True):
                url = databases.create()
                results[listen] = measure(url, model, work, args.rounds, args.poll, listen)
        databases.admin.dispose()
    finally:
        server.stop()
    print(f"a job's commit → its first claim, one idle worker polling every {args.poll:g} s, "
          f"{args.rounds} rounds:\n")  # fmt: skip
    print("| worker | median | mean | max |")
    print("| --- | ---: | ---: | ---: |")
    for listen, label in ((False, "polling"), (True, "LISTEN/NOTIFY")):
        v = results[listen]
        print(f"| {label} | {statistics.median(v):.3f} s | {statistics.mean(v):.3f} s | "
              f"{max(v):.3f} s |")  # fmt: skip
    ratio = statistics.median(results[False]) / statistics.median(results[True])
    print(f"\nnotification is {ratio:.1f}× faster to the first claim (median)")


if __name__ == "__main__":
    main()
