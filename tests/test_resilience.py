"""Never lose work: OOM backoff, crashes, poison items, signals, locks, a busy database.

Real processes, real signals and a real SQLite file; GPU truths come from the fake NVML
(EXECUTOR_FAKE_NVML) and injected faults (EXECUTOR_FAULT_*).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from executor.planning.sizes import GiB
from tests.helpers import (
    count_items,
    model_pids,
    query,
    read_jsonl,
    run_cli,
    start_cli,
    submit_rows,
    wait_for,
    write_jsonl,
)
from tests.synthetic_gguf import write_llama_gguf

BIG_CARD = json.dumps(
    [{"name": "Fake H100", "uuid": "GPU-big", "total": 80 * GiB, "free": 80 * GiB}]
)


@pytest.fixture
def model_1b(tmp_path: Path) -> Path:
    """A 29-block (30-layer) llama-shaped file of 830 MB, sparse on disk."""
    return write_llama_gguf(tmp_path / "m1b.gguf", "1b")


def fake_env(**extra: str) -> dict[str, str]:
    return {
        "EXECUTOR_ENGINE": "fake",
        "EXECUTOR_FAKE_NVML": BIG_CARD,
        "EXECUTOR_BACKOFF_SECONDS": "0.01",
        **extra,
    }


def submit(
    tmp_path: Path,
    db_path: Path,
    model: Path,
    n: int,
    words: int = 4,
    marker: dict[int, str] | None = None,
) -> str:
    """`n` prompts of `words` words (a marker word appended to some, for fault injection)."""
    rows = [
        {
            "custom_id": f"c{i}",
            "prompt": " ".join([f"w{i}"] * words)
            + (f" {marker[i]}" if marker and i in marker else ""),
        }
        for i in range(n)
    ]
    return str(submit_rows(tmp_path, db_path, model, rows))


def exported(db_path: Path, job: str, *flags: str) -> list[dict]:
    return read_jsonl(run_cli("export", job, *flags, db_path=db_path, check=True).stdout)


def assert_exactly_once_all_done(db_path: Path, job: str, n: int) -> None:
    rows = exported(db_path, job, "--include-failed")
    assert sorted(r["custom_id"] for r in rows) == sorted(f"c{i}" for i in range(n))
    assert all(r["status"] == "done" for r in rows), [r for r in rows if r["status"] != "done"]
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(n, n)]


def slow_worker(tmp_path: Path, db_path: Path, *flags: str) -> subprocess.Popen:
    """A worker process at parallel 1 and 20 tokens/s, a second into its first item."""
    worker = start_cli(
        "run", "--until-empty", "--parallel", "1", *flags,
        db_path=db_path, env=fake_env(EXECUTOR_FAKE_TOKEN_SECONDS="0.05"),
    )  # fmt: skip
    wait_for(lambda: model_pids(tmp_path / "xdg" / "state"), what="the model process")
    time.sleep(1)
    return worker


def load_rows(db_path: Path) -> list[tuple]:
    return query(db_path, "SELECT n_gpu_layers, outcome FROM loads ORDER BY id")


# --- OOM backoff ---------------------------------------------------------------------------------


def test_oom_at_load_shrinks_layers_and_remembers(tmp_path, db_path, model_1b):
    """OOM at load above 20 layers of a 30-layer plan: 30 → 27 → 24 → 21 → 18, then it runs."""
    job = submit(tmp_path, db_path, model_1b, 6)
    env = fake_env(EXECUTOR_FAULT_OOM_LOAD_ABOVE="20")
    run = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert run.returncode == 0, run.stderr
    assert load_rows(db_path) == [
        (30, "oom"),
        (27, "oom"),
        (24, "oom"),
        (21, "oom"),
        (18, "loaded"),
    ]
    causes = query(db_path, "SELECT cause FROM loads WHERE outcome = 'oom'")
    assert all("cudaMalloc failed: out of memory" in c for (c,) in causes)
    assert "out of memory at load with 30 GPU layers: next try with 27" in run.stderr
    assert_exactly_once_all_done(db_path, job, 6)
    assert query(
        db_path, "SELECT DISTINCT l.n_gpu_layers FROM results r JOIN loads l ON l.id = r.load_id"
    ) == [(18,)]
    # The next run starts where the last one ended up.
    submit(tmp_path, db_path, model_1b, 3, words=2)
    run_cli("run", "--until-empty", db_path=db_path, env=env, check=True)
    assert load_rows(db_path)[5:] == [(18, "loaded")]
    plan = run_cli("plan", str(model_1b), "--no-dry-run", db_path=db_path, env=env, check=True)
    assert "layers    18 of 30 on the GPU" in plan.stdout
    assert "18 of 30 layers loaded and ran on this card before" in plan.stdout


def test_parallel_can_shrink_before_layers(tmp_path, db_path, model_1b):
    submit(tmp_path, db_path, model_1b, 4)
    env = fake_env(
        EXECUTOR_FAULT_OOM_LOAD_ABOVE="28",
        EXECUTOR_SHRINK_PARALLEL_FIRST="1",
        EXECUTOR_PARALLEL="4",
    )
    run_cli("run", "--until-empty", db_path=db_path, env=env, check=True)
    rows = query(db_path, "SELECT parallel, n_gpu_layers, outcome FROM loads ORDER BY id")
    assert rows == [(4, 30, "oom"), (2, 30, "oom"), (1, 30, "oom"), (1, 27, "loaded")]


def test_oom_during_decode_shrinks_and_finishes_the_batch(tmp_path, db_path, model_1b):
    job = submit(tmp_path, db_path, model_1b, 8)
    env = fake_env(EXECUTOR_FAULT_OOM_DECODE_ABOVE="25")
    run = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "CUDA error: out of memory" in run.stderr
    assert load_rows(db_path) == [(30, "oom"), (27, "oom"), (24, "loaded")]
    assert_exactly_once_all_done(db_path, job, 8)
    # The crashes counted attempts on the item in flight, but did not fail it.
    assert query(db_path, "SELECT max(attempts) FROM items") == [(2,)]


def test_when_even_the_cpu_cannot_load_the_job_fails_with_the_reason(tmp_path, db_path, model_1b):
    job = submit(tmp_path, db_path, model_1b, 2)
    env = fake_env(
        EXECUTOR_FAULT_OOM_LOAD_ABOVE="-1", EXECUTOR_SHRINK_STEP="0.5", EXECUTOR_PARALLEL="1"
    )
    run = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert run.returncode == 6 and "failed as a whole" in run.stderr, run.stderr
    rows = load_rows(db_path)
    assert [layers for layers, _ in rows] == [30, 15, 7, 3, 1, 0]
    assert {outcome for _, outcome in rows} == {"oom"}
    status = json.loads(run_cli("status", job, "--json", db_path=db_path, check=True).stdout)
    assert status["status"] == "failed"
    assert "did not load" in status["error"] and "out of memory" in status["error"]


def test_measured_vram_above_the_cap_shrinks(tmp_path, db, model_1b):
    """NVML says the process uses more than the cap: kill, shrink by the overshoot, reload."""
    from executor.config import load_settings
    from executor.machine.gpu import FakeNvml
    from executor.run.loader import ModelLoader
    from executor.run.worker import engine_log_path

    settings = load_settings(
        {"db": str(db.sqlite_path), "engine": "fake", "vram_cap": "1GiB", "backoff_seconds": 0}
    )
    nvml = FakeNvml([{"name": "Fake 4G", "uuid": "GPU-4", "total": 4 * GiB}])
    measured: list[int] = []

    def measure(pid: int, uuid: str) -> int:
        # The first load overshoots by 100 MiB; later ones come in under the cap.
        measured.append(pid)
        return GiB + 100 * 2**20 if len(measured) == 1 else GiB - 2**20

    loader = ModelLoader(settings, db, "w", engine_log_path(db), nvml=nvml, measure=measure)
    loaded = loader.load(str(model_1b))
    loaded.proc.stop()
    rows = query(db.sqlite_path, "SELECT n_gpu_layers, outcome, measured_vram FROM loads")
    first, second = rows
    assert first[1] == "over_cap" and first[2] == GiB + 100 * 2**20
    assert second[1] == "loaded" and second[0] < first[0]
    per_layer = 28 * 2**20  # a block of this model is ~27.3 MiB: 100 MiB over → ≥ 4 fewer
    assert first[0] - second[0] >= 100 * 2**20 // per_layer + 1
    # The excess is remembered: the next plan on this card adds it.
    again = loader.load(str(model_1b))
    again.proc.stop()
    assert again.report.plan.gpu.correction == GiB - 2**20 - _predicted(db.sqlite_path)


def _predicted(db_path: Path) -> int:
    return query(db_path, "SELECT predicted_vram FROM loads ORDER BY id DESC LIMIT 1 OFFSET 1")[0][
        0
    ]


# --- crashes and poison --------------------------------------------------------------------------


def test_abort_mid_decode_reruns_in_flight_without_duplicates(tmp_path, db_path, model_1b):
    job = submit(tmp_path, db_path, model_1b, 10, words=6)
    env = fake_env(EXECUTOR_FAULT_ABORT_AFTER_TOKENS="17")
    run = run_cli("run", "--until-empty", "--batch-size", "4", db_path=db_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "was killed by SIGABRT while generating" in run.stderr
    assert 'fault injected") failed: abort after 17 tokens' in run.stderr
    assert [o for _, o in load_rows(db_path)] == ["crashed", "loaded"]
    assert_exactly_once_all_done(db_path, job, 10)


def test_poison_item_fails_after_three_crashes_and_the_rest_complete(tmp_path, db_path, model_1b):
    job = submit(tmp_path, db_path, model_1b, 6, marker={2: "POISON"})
    env = fake_env(EXECUTOR_FAULT_ABORT_ON="POISON")
    run = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert run.returncode == 0, run.stderr
    rows = {r["custom_id"]: r for r in exported(db_path, job, "--include-failed")}
    assert rows["c2"]["status"] == "failed"
    assert rows["c2"]["error"].startswith(
        "crashed the worker 3 times; last: model process was killed by SIGABRT"
    )
    assert all(rows[f"c{i}"]["status"] == "done" for i in (0, 1, 3, 4, 5))
    assert query(db_path, "SELECT attempts FROM items WHERE custom_id = 'c2'") == [(3,)]
    # A plain crash is not an OOM: the layers stayed where they were.
    assert {layers for layers, _ in load_rows(db_path)} == {30}


# --- signals, locks, leases, a busy database -----------------------------------------------------


def test_sigterm_mid_batch_exits_cleanly_and_loses_nothing(tmp_path, db_path, model_1b):
    job = submit(tmp_path, db_path, model_1b, 10, words=10)
    worker = start_cli(
        "run",
        "--until-empty",
        "--batch-size",
        "10",
        "--parallel",
        "2",
        "--stop-timeout",
        "20",
        db_path=db_path,
        env=fake_env(EXECUTOR_FAKE_TOKEN_SECONDS="0.05"),
    )
    wait_for(lambda: count_items(db_path, "done") >= 2, what="two results")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert time.monotonic() - sent < 20
    assert "run stopped:" in err
    assert count_items(db_path, "running") == 0
    assert query(db_path, "SELECT count(*) FROM items WHERE lease_owner IS NOT NULL") == [(0,)]
    done = count_items(db_path, "done")
    assert 2 <= done < 10 and count_items(db_path, "queued") == 10 - done
    assert query(db_path, "SELECT max(attempts) FROM items") == [(0,)]
    run_cli("run", "--until-empty", db_path=db_path, env=fake_env(), check=True)
    assert_exactly_once_all_done(db_path, job, 10)


def test_second_signal_stops_at_once(tmp_path, db_path, model_1b):
    submit(tmp_path, db_path, model_1b, 4, words=200)  # each item takes ~10 s
    worker = slow_worker(tmp_path, db_path)
    worker.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert time.monotonic() - sent < 5
    assert "stopping now: releasing 1 items in flight" in err
    assert count_items(db_path, "running") == 0 and count_items(db_path, "queued") == 4


def test_stop_timeout_bounds_the_wait(tmp_path, db_path, model_1b):
    submit(tmp_path, db_path, model_1b, 2, words=400)  # ~20 s per item
    worker = slow_worker(tmp_path, db_path, "--stop-timeout", "2")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0 and time.monotonic() - sent < 10, err
    assert count_items(db_path, "queued") == 2 and count_items(db_path, "running") == 0


def test_five_runs_at_once_exactly_one_loads(tmp_path, db_path, model_1b):
    submit(tmp_path, db_path, model_1b, 6, words=20)
    env = fake_env(EXECUTOR_FAKE_TOKEN_SECONDS="0.05", EXECUTOR_PARALLEL="1")
    run_cli("db", "upgrade", db_path=db_path, check=True)
    workers = [start_cli("run", "--until-empty", db_path=db_path, env=env) for _ in range(5)]
    codes = [w.wait(timeout=120) for w in workers]
    assert sorted(codes) == [0, 3, 3, 3, 3]
    for w, code in zip(workers, codes, strict=True):
        if code == 3:
            assert "another executor run is already working" in w.stderr.read()
    assert len(model_pids(tmp_path / "xdg" / "state")) == 1
    assert count_items(db_path, "done") == 6


def test_heartbeat_keeps_leases_alive(tmp_path, db_path, model_1b):
    submit(tmp_path, db_path, model_1b, 3, words=120)  # ~6 s per item, lease 10 s
    worker = start_cli(
        "run",
        "--until-empty",
        "--parallel",
        "1",
        db_path=db_path,
        env=fake_env(EXECUTOR_FAKE_TOKEN_SECONDS="0.05", EXECUTOR_LEASE_SECONDS="10"),
    )
    wait_for(lambda: count_items(db_path, "done") >= 1, timeout=60, what="a result")
    time.sleep(8)  # past the first lease: only renewals keep the last items leased
    leases = query(
        db_path,
        "SELECT lease_until > strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "FROM items WHERE status = 'running'",
    )
    assert leases and all(alive for (alive,) in leases)
    worker.communicate(timeout=60)
    assert count_items(db_path, "done") == 3


def test_a_busy_database_does_not_lose_a_result(tmp_path, db_path, model_1b):
    job = submit(tmp_path, db_path, model_1b, 8, words=6)
    worker = start_cli(
        "run", "--until-empty", db_path=db_path, env=fake_env(EXECUTOR_FAKE_TOKEN_SECONDS="0.05")
    )
    wait_for(lambda: count_items(db_path, "done") >= 1, what="a result")

    def hold_the_write_lock() -> None:
        conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(4)  # several items finish meanwhile; their commits must wait, not fail
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    holder.join()
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert "locked" not in err
    assert_exactly_once_all_done(db_path, job, 8)


@pytest.mark.model
def test_kill_9_of_the_parent_at_random_moments_with_the_real_model(
    tmp_path, db_path, default_model
):
    """Ten kill -9s at random moments of real runs; the export has every item exactly once."""
    import random

    rows = [
        {"custom_id": f"c{i}", "prompt": f"Count from {i} to {i + 20}:", "max_tokens": 24}
        for i in range(16)
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli("submit", str(path), db_path=db_path, check=True).stdout.strip()
    rng = random.Random(7)
    state = tmp_path / "xdg" / "state"
    kills = 0
    while kills < 10 and count_items(db_path, "done") < len(rows):
        worker = start_cli("run", "--until-empty", "--batch-size", "4", db_path=db_path)
        wait_for(
            lambda n=len(model_pids(state)): len(model_pids(state)) > n,
            timeout=60,
            what="a model process",
        )
        time.sleep(rng.uniform(0.1, 1.5))
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        kills += 1
        # The orphaned model process dies with its parent (PR_SET_PDEATHSIG).
        wait_for(lambda: not _alive(model_pids(state)[-1]), what="the model process to die")
    assert kills == 10
    run_cli("run", "--until-empty", db_path=db_path, check=True)
    out = exported(db_path, job, "--include-failed")
    assert sorted(r["custom_id"] for r in out) == sorted(r["custom_id"] for r in rows)
    assert all(r["status"] == "done" for r in out)
    assert query(db_path, "SELECT count(*), count(DISTINCT item_id) FROM results") == [(16, 16)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_oom_with_a_moe_model_gives_up_experts_before_attention(tmp_path, db_path):
    """A gpt-oss-like model (12 blocks of 32 MXFP4 experts, 690 MB) on a card where all of it
    fits, but an OOM hits whenever more than 300 MB of weights go to the GPU: each reload sends
    more blocks' experts to RAM and keeps every layer (attention) on the GPU; the export's
    provenance carries the -ot rules the items ran under."""
    from tests.synthetic_gguf import write_moe_gguf

    model = write_moe_gguf(tmp_path / "moe.gguf", "small-moe")
    job = submit(tmp_path, db_path, model, 3)
    card = json.dumps([{"name": "Fake 4G", "uuid": "GPU-4", "total": 4 * GiB}])
    env = fake_env(
        EXECUTOR_FAKE_NVML=card,
        EXECUTOR_FAULT_OOM_LOAD_WEIGHTS_ABOVE=str(300 * 10**6),
        EXECUTOR_PARALLEL="1",
        EXECUTOR_CTX="8192",
    )
    run = run_cli("run", "--until-empty", db_path=db_path, env=env)
    assert run.returncode == 0, run.stderr
    rows = query(db_path, "SELECT n_gpu_layers, placement, outcome FROM loads ORDER BY id")
    assert [outcome for *_, outcome in rows][-1] == "loaded"
    assert {layers for layers, _, _ in rows} == {13}  # attention never left the GPU
    in_ram = [json.loads(p)["cpu_experts"] for _, p, _ in rows]
    assert in_ram == sorted(in_ram) and in_ram[0] < in_ram[-1]
    assert "experts of" in run.stderr and "blocks in RAM: next try with" in run.stderr
    (line,) = exported(db_path, job, "--with-provenance")[:1]
    rules = line["provenance"]["load"]["tensor_overrides"]
    assert rules and all(r.endswith("=CPU") for r in rules)
    # The next run starts from the placement that worked (no OOM on the way).
    submit(tmp_path, db_path, model, 2, words=2)
    run_cli("run", "--until-empty", db_path=db_path, env=env, check=True)
    last = query(db_path, "SELECT placement, outcome FROM loads ORDER BY id DESC LIMIT 1")
    assert last == [(rows[-1][1], "loaded")]
