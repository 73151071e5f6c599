"""A one-node Slurm cluster for the tests (scripts/ensure-slurm start/stop), and the calls the
tests make to it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "ensure-slurm"


class SlurmCluster:
    """slurmctld + slurmd + munged with their files in a temporary folder."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="executor-slurm-"))
        done = subprocess.run(
            [str(SCRIPT), "start", str(self.folder)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1])
        self.conf = self.folder / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env(env), timeout=60, check=True
        )
        return done.stdout.strip()

    def sbatch(self, script: Path, *args: str, env: dict[str, str], cwd: Path) -> str:
        """Submit (one CPU a task: the node has this machine's few); the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", "--cpus-per-task=1", *args, str(script)],
            capture_output=True, text=True, env=self.env(env), cwd=cwd, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.strip().split(";")[0]

    def tasks(self, job: str) -> list[tuple[str, str]]:
        """(task id, state) of a job's tasks still in the queue."""
        out = self.run("squeue", "-h", "-j", job, "-o", "%i %T")
        return [tuple(line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def wait_done(self, job: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while tasks := self.tasks(job):
            if time.monotonic() > deadline:
                why = self.run("squeue", "-h", "-j", job, "-o", "%i %T %r")
                raise AssertionError(f"Slurm job {job} still runs: {tasks} ({why})")
            time.sleep(0.5)

    def job_state(self, job: str) -> dict[str, str]:
        """scontrol show job's fields of a finished job (kept for MinJobAge)."""
        out = self.run("scontrol", "-o", "show", "job", job)
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.folder)], capture_output=True, timeout=60)
