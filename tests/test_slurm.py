"""On a real Slurm (a one-node cluster started by scripts/ensure-slurm): job arrays of
examples/slurm/executor-workers.sbatch drain a PostgreSQL queue; a cancelled or requeued task
loses nothing; a task near its time limit stops claiming in time; each task takes the GPU
Slurm gives it (CUDA_VISIBLE_DEVICES, with a fake NVML of four cards). The Kubernetes example
cannot run here (no cluster): its settings, command and config file are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

from executor.config import OPTIONS
from tests.helpers import ROOT, run_cli, submit_rows, wait_for
from tests.test_postgres import counts

SCRIPT = ROOT / "examples" / "slurm" / "executor-workers.sbatch"
CARDS = json.dumps(
    [{"name": f"Fake GPU {i}", "uuid": f"GPU-fake-{i}", "total": 24 * 2**30} for i in range(4)]
)


def task_env(pg_url: str, **extra: str) -> dict[str, str]:
    return {
        "EXECUTOR": str(Path(sys.executable).parent / "executor"),
        "EXECUTOR_DB": pg_url,
        "EXECUTOR_FAKE_NVML": CARDS,
        "EXECUTOR_LEASE_SECONDS": "10",
        "EXECUTOR_POLL_SECONDS": "0.5",
        **extra,
    }


def workers(pg_url: str) -> list[dict]:
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM workers")]
    engine.dispose()
    return rows


def exactly_once(pg_url: str, n: int) -> None:
    c = counts(pg_url)
    assert c.get("done") == n and c["results"] == c["distinct"] == n, c


def test_an_array_drains_the_queue_each_task_on_its_own_gpu(slurm, tmp_path, pg_url, tiny_model,
                                                             default_model):  # fmt: skip
    submit_rows(tmp_path, None, tiny_model, [{"prompt": f"item {i}"} for i in range(600)],
                "--db", pg_url)  # fmt: skip
    env = task_env(pg_url, EXECUTOR_ENGINE="fake", EXECUTOR_FAKE_TOKEN_SECONDS="0.002")
    job = slurm.sbatch(SCRIPT, "--array=0-2", "--output=task-%A_%a.log", env=env, cwd=tmp_path)
    slurm.wait_done(job)
    exactly_once(pg_url, 600)
    seen = workers(pg_url)
    assert sorted(w["scheduler"] for w in seen) == [f"slurm job {job}_{i}" for i in range(3)]
    # Slurm gave each task its own card (CUDA_VISIBLE_DEVICES): three identities.
    assert len({w["gpu_uuid"] for w in seen}) == 3
    assert {w["gpu_uuid"] for w in seen} <= {f"GPU-fake-{i}" for i in range(4)}
    table = run_cli("workers", "--db", pg_url, check=True).stdout
    assert all(f"(slurm job {job}_{i})" in table for i in range(3)), table
    logs = "".join(p.read_text() for p in tmp_path.glob("task-*.log"))
    assert "Traceback" not in logs and "run finished" in logs
    # A small job on the default model, through the same script.
    submit_rows(tmp_path, None, default_model,
                [{"prompt": f"Count to {i}.", "max_tokens": 8} for i in range(6)],
                "--db", pg_url)  # fmt: skip
    real = task_env(pg_url, EXECUTOR_CTX="256", EXECUTOR_FAKE_GPU_OFFLOAD="0")
    job = slurm.sbatch(SCRIPT, "--array=0-1", "--output=model-%A_%a.log", env=real, cwd=tmp_path)
    slurm.wait_done(job)
    exactly_once(pg_url, 606)


def test_a_cancelled_and_a_requeued_task_lose_nothing(slurm, tmp_path, pg_url, tiny_model):
    submit_rows(tmp_path, None, tiny_model, [{"prompt": "w " * 10} for _ in range(300)],
                "--db", pg_url)  # fmt: skip
    env = task_env(pg_url, EXECUTOR_ENGINE="fake", EXECUTOR_FAKE_TOKEN_SECONDS="0.02",
                   EXECUTOR_PARALLEL="2", EXECUTOR_STOP_TIMEOUT="20")  # fmt: skip
    job = slurm.sbatch(SCRIPT, "--array=0-2", "--output=task-%A_%a.log", env=env, cwd=tmp_path)
    wait_for(lambda: counts(pg_url).get("done", 0) >= 20, timeout=120, what="work under way")
    # SIGTERM, then SIGKILL after KillWait (5 s) while the worker waits for its items in
    # flight (stop_timeout 20 s): the leases it held expire and others take them.
    slurm.run("scancel", f"{job}_1")
    wait_for(lambda: counts(pg_url).get("done", 0) >= 60, timeout=120, what="more work")
    slurm.run("scontrol", "requeue", f"{job}_2")
    # Slurm holds a requeued task back (BeginTime) for a while: let it start again now.
    wait_for(lambda: (f"{job}_2", "PENDING") in slurm.tasks(job), timeout=60, what="requeue")
    slurm.run("scontrol", "update", f"JobId={job}_2", "StartTime=now")
    slurm.wait_done(job, timeout=600)
    exactly_once(pg_url, 300)


def test_a_task_near_its_time_limit_stops_claiming_in_time(slurm, tmp_path, pg_url, tiny_model):
    submit_rows(tmp_path, None, tiny_model, [{"prompt": "w " * 10} for _ in range(2000)],
                "--db", pg_url)  # fmt: skip
    env = task_env(pg_url, EXECUTOR_ENGINE="fake", EXECUTOR_FAKE_TOKEN_SECONDS="0.05",
                   EXECUTOR_PARALLEL="2", EXECUTOR_STOP_TIMEOUT="5")  # fmt: skip
    started = time.monotonic()
    # The script's own --signal (SIGTERM 120 s ahead) would come first, and Slurm may send it
    # up to 60 s early; here it sends SIGURG, which the worker ignores: only its own reading
    # of the end time can stop it, in time.
    job = slurm.sbatch(SCRIPT, "--time=1", "--signal=B:URG@3", "--output=limit-%j.log",
                       env=env, cwd=tmp_path)  # fmt: skip
    slurm.wait_done(job, timeout=180)
    assert time.monotonic() - started < 60 + 30  # it ended; Slurm did not have to kill it
    state = slurm.job_state(job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", state
    log = (tmp_path / f"limit-{job}.log").read_text()
    assert "the scheduler ends this job at" in log and "stopping in time" in log
    assert "run finished" in log  # by its own stop, not a signal's
    c = counts(pg_url)
    assert c.get("running", 0) == 0 and 0 < c.get("done", 0) < 2000
    assert c["results"] == c["distinct"]  # nothing cut, nothing twice


def test_the_kubernetes_example_uses_real_settings_and_commands(tmp_path):
    """No cluster here: its config map is a valid config file, its variables are settings,
    its command is a command, and a pod's stop fits in its grace period."""
    docs = list(
        yaml.safe_load_all((ROOT / "examples/kubernetes/executor-workers.yaml").read_text())
    )
    config_map, job = docs
    config = tmp_path / "config.yaml"
    config.write_text(config_map["data"]["config.yaml"])
    shown = run_cli("config", "show", "--config", str(config), check=True).stdout
    assert "stop_timeout" in shown and "config file: " + str(config) in shown
    pod = job["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["command"][:2] == ["executor", "run"]
    assert run_cli(*worker["command"][1:], "--help", check=True).returncode == 0
    env = {e["name"]: e.get("value", "x") for e in worker["env"]}
    settings = {f"EXECUTOR_{k.upper()}" for k in OPTIONS} | {"EXECUTOR_CONFIG"}
    assert set(env) <= settings, set(env) - settings
    assert run_cli("config", "show", env={**env, "EXECUTOR_CONFIG": str(config)}).returncode == 0
    assert (
        yaml.safe_load(config_map["data"]["config.yaml"])["stop_timeout"]
        < pod["terminationGracePeriodSeconds"]
    )
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_sbatch_script_is_valid_bash_and_refuses_without_a_database(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "EXECUTOR_DB"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set EXECUTOR_DB" in done.stderr
