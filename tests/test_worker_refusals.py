"""A worker's mistakes stay the worker's: a load that cannot fit this machine leaves the job
queued (exit 8); a model file broken after submit fails its job by name (exit 6); a database
deleted or replaced under a running worker stops it (exit 7) before it reports work that no
longer exists; a full disk is exit 10 however it shows."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from executor.machine.cpus import CpuWatch
from tests.helpers import (
    ROOT,
    count_items,
    query,
    run_cli_process,
    start_cli,
    submit_rows,
    wait_for,
    write_jsonl,
)

FAKE = {"EXECUTOR_ENGINE": "fake"}


@pytest.mark.parametrize("flag", [["--parallel", "1000000"], ["--ctx", "10000000"]])
def test_a_load_this_machine_cannot_hold_leaves_the_job_queued(tmp_path, db_path, tiny_model, flag):
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": f"p{i}"} for i in range(3)])
    done = run_cli_process("run", "--until-empty", *flag, db_path=db_path, env=FAKE)
    assert done.returncode == 8, done.stderr
    assert "does not fit this worker" in done.stderr and "stay queued" in done.stderr
    assert flag[0].lstrip("-") in done.stderr  # the setting and where it came from
    assert count_items(db_path, "queued") == 3
    assert query(db_path, "SELECT status FROM jobs") == [("queued",)]
    # A worker that can runs it.
    assert run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE).returncode == 0
    assert count_items(db_path, "done") == 3


def test_a_model_file_broken_after_submit_fails_its_job_by_name(tmp_path, db_path, tiny_model):
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": f"p{i}"} for i in range(3)])
    with open(tiny_model, "r+b") as f:
        f.truncate(os.path.getsize(tiny_model) // 2)
    done = run_cli_process("run", "--until-empty", db_path=db_path, env=FAKE)
    assert done.returncode == 6, done.stderr
    assert str(tiny_model) in done.stderr and "job 1 failed as a whole" in done.stderr
    assert "0 done, 3 failed (1 job(s) failed as a whole)" in done.stderr
    assert count_items(db_path, "failed") == 3


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_mid_run_stops_the_worker(
    tmp_path, db_path, tiny_model, how
):
    submit_rows(tmp_path, db_path, tiny_model, [{"prompt": "w " * 40} for _ in range(50)])
    env = {**FAKE, "EXECUTOR_FAKE_TOKEN_SECONDS": "0.05", "EXECUTOR_PARALLEL": "2"}
    worker = start_cli("run", "--until-empty", db_path=db_path, env=env)
    try:
        wait_for(lambda: count_items(db_path, "done") >= 1, what="a first result")
        if how == "deleted":
            for suffix in ("", "-wal", "-shm"):
                (db_path.parent / (db_path.name + suffix)).unlink(missing_ok=True)
        else:
            other = tmp_path / "other.db"
            sqlite3.connect(other).close()
            os.replace(other, db_path)
        _, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 7, err
    assert f"{db_path} was {'deleted' if how == 'deleted' else 'replaced by another file'}" in err
    assert "run finished" not in err and "Traceback" not in err


def test_a_full_disk_is_exit_10_however_it_shows(tmp_path, db_path, tiny_model):
    """A file size limit (ulimit -f) makes SQLite's writes fail as a disk I/O error."""
    rows = [{"prompt": "x" * 200, "custom_id": f"c{i}"} for i in range(2000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    env = {**os.environ, "EXECUTOR_DB": str(db_path)}

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    done = subprocess.run(
        [sys.executable, "-m", "executor", "submit", str(path), "--model", str(tiny_model)],
        capture_output=True, text=True, env=env, cwd=ROOT, preexec_fn=limited,
    )  # fmt: skip
    assert done.returncode == 10, done.stderr
    assert "the disk is full, or a file size limit" in done.stderr
    assert query(db_path, "SELECT count(*) FROM jobs") == [(0,)]


# --- threads on a shared CPU --------------------------------------------------------------------


class FakeProc:
    """/proc/stat and /proc/self/stat of a 2-CPU machine, advanced by hand."""

    def __init__(self, root):
        self.root = root
        (root / "self").mkdir(parents=True)
        self.busy = [0, 0]
        self.ours = 0
        self.now = 0.0
        self.write()

    def write(self):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{i} {b} 0 0 {10_000 - b} 0 0 0 0 0 0" for i, b in enumerate(self.busy)]
        (self.root / "stat").write_text("\n".join(lines) + "\n")
        fields = ["S"] + ["0"] * 10 + [str(self.ours), "0"] + ["0"] * 30
        (self.root / "self" / "stat").write_text(f"1 (python (x)) {' '.join(fields)}\n")

    def run(self, seconds, ours_cores, others_cores):
        """`seconds` pass with this process on `ours_cores` and others on `others_cores`."""
        ticks = int(seconds * 100)
        self.ours += int(ours_cores * ticks)
        total = (ours_cores + others_cores) * ticks
        self.busy = [b + int(total / 2) for b in self.busy]
        self.now += seconds
        self.write()


def test_threads_step_down_beside_a_busy_neighbour_and_back_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    proc = FakeProc(tmp_path)
    watch = CpuWatch(2, every=1.0, proc_root=tmp_path, clock=lambda: proc.now)
    proc.run(1, 2, 0)
    assert watch.poll() is None and watch.threads == 2  # alone: both cores
    proc.run(1, 1.0, 1.0)
    assert watch.poll() is None  # one sample says 1: wait for a second
    proc.run(1, 1.0, 1.0)
    assert watch.poll() == 1 and watch.threads == 1
    proc.run(1, 1.0, 0.2)  # a light neighbour: still 1 (2 - 0.2 rounds to 2, seen once)
    assert watch.poll() is None
    proc.run(1, 1.0, 0.0)
    assert watch.poll() == 2  # the neighbour left: back up
    proc.run(0.5, 2, 0)
    assert watch.poll() is None  # not a second yet: nothing read
    # At start, what others used while the model loaded decides at once.
    fresh = CpuWatch(2, every=1.0, proc_root=tmp_path, clock=lambda: proc.now)
    proc.run(2, 0.5, 1.0)
    assert fresh.start() == 1


def test_the_engine_log_says_when_threads_change(tmp_path, db_path, default_model):
    """A real run beside a busy loop: the model process steps its threads down."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        rows = [{"prompt": f"Tell a story {i}", "max_tokens": 64} for i in range(4)]
        submit_rows(tmp_path, db_path, default_model, rows)
        done = run_cli_process(
            "run", "--until-empty", "--parallel", "2", "--ctx", "256", db_path=db_path
        )
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0, done.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "xdg" / "state" / "executor").glob("*.log"))
    if shutil.which("nproc") and os.cpu_count() == 2:
        assert "threads: 1 (other processes use this machine's CPUs)" in logs
