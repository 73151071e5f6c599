"""Claim throughput: items claimed and completed per second by 1, 2 and 4 workers (fake
engine) on PostgreSQL, and by the one worker SQLite allows; ratios to one worker.

    .venv/bin/python benchmarks/claims.py [--items 2000] [--batch-size 32]

Each worker is a real `executor run --until-empty` process with the fake engine (no model
time), so the rate is the queue's: claim, lease, checkpoint, release. PostgreSQL runs on a
throwaway local server (Unix socket), as in the tests; EXECUTOR_TEST_PG_URL uses another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pg_server import PgDatabases, PgServer  # noqa: E402
from tests.synthetic_gguf import write_tiny_gguf  # noqa: E402


def drain(db_url: str, model: Path, items: int, workers: int, batch: int, tmp: Path) -> float:
    """Seconds for `workers` processes to drain `items` (from their start to the last exit)."""
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i}"}) + "\n" for i in range(items)))
    env = {**os.environ, "EXECUTOR_DB": db_url, "EXECUTOR_ENGINE": "fake"}
    cli = [sys.executable, "-m", "executor"]
    subprocess.run(
        [*cli, "submit", str(prompts), "--model", str(model), "--force"],
        env=env,
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    started = time.perf_counter()
    procs = []
    for n in range(workers):
        gpu = json.dumps([{"name": f"bench {n}", "uuid": f"GPU-bench-{n}", "total": 24 * 2**30}])
        procs.append(
            subprocess.Popen(
                [*cli, "run", "--until-empty", "--batch-size", str(batch), "--parallel", "8"],
                env={**env, "EXECUTOR_FAKE_NVML": gpu},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a worker exited {proc.returncode}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    server = None if os.environ.get("EXECUTOR_TEST_PG_URL") else PgServer()
    rows = []
    try:
        databases = PgDatabases(os.environ.get("EXECUTOR_TEST_PG_URL") or server.url())
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            model = write_tiny_gguf(tmp / "tiny.gguf")
            sqlite = drain(
                f"sqlite:///{tmp / 'bench.db'}", model, args.items, 1, args.batch_size, tmp
            )
            rows.append(("SQLite", 1, args.items / sqlite))
            for workers in (1, 2, 4):
                url = databases.create()
                seconds = drain(url, model, args.items, workers, args.batch_size, tmp)
                databases.drop(url)
                rows.append(("PostgreSQL", workers, args.items / seconds))
        databases.admin.dispose()
    finally:
        if server is not None:
            server.stop()
    base = {backend: rate for backend, workers, rate in rows if workers == 1}
    print(
        f"{args.items} items, fake engine, batch size {args.batch_size}, "
        f"{os.cpu_count()} CPUs; times include each worker's start-up"
    )
    print(f"{'backend':11} {'workers':>7} {'items/s':>9} {'× one worker':>13}")
    for backend, workers, rate in rows:
        print(f"{backend:11} {workers:>7} {rate:>9.1f} {rate / base[backend]:>13.2f}")


if __name__ == "__main__":
    main()
