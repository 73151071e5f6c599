"""What a cluster scheduler tells the worker it started: who it is, and when it must end.

Slurm sets SLURM_JOB_ID (and, in a job array, SLURM_ARRAY_JOB_ID and SLURM_ARRAY_TASK_ID)
and ends a job at its time limit: SIGTERM (or the `--signal=B:TERM@120` the script asks for,
ahead of the limit), then SIGKILL after KillWait. The worker reads the job's end time
(SLURM_JOB_END_TIME where Slurm sets it, else `squeue -o %e`) and stops claiming early
enough that the items in flight finish within --stop-timeout before it: no item is cut by
the limit. Kubernetes sets KUBERNETES_SERVICE_HOST; a pod's name is its HOSTNAME, and an
Indexed Job's index is JOB_COMPLETION_INDEX.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime

MARGIN_SECONDS = 10.0  # beyond --stop-timeout: the worker's own exit, the registry's last write


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def label(env: Mapping[str, str] | None = None) -> str | None:
    """`slurm job 4242_3` (array job 4242, task 3), `slurm job 4242`, `kubernetes pod
    w-0-abcde (index 0)`; None when no scheduler started this process."""
    e = _env(env)
    if e.get("SLURM_JOB_ID"):
        if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm job {e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
        return f"slurm job {e['SLURM_JOB_ID']}"
    if e.get("KUBERNETES_SERVICE_HOST") and e.get("HOSTNAME"):
        index = e.get("JOB_COMPLETION_INDEX")
        return f"kubernetes pod {e['HOSTNAME']}" + (f" (index {index})" if index else "")
    return None


def allocation(env: Mapping[str, str] | None = None) -> str | None:
    """A short tag of this allocation for a worker without a GPU: several may share a host
    (CPU inference on a cluster), and each must be a worker of its own."""
    text = label(env)
    return (
        None
        if text is None
        else text.replace("slurm job ", "slurm-").split(" (")[0].replace("kubernetes pod ", "k8s-")
    )


def end_time(env: Mapping[str, str] | None = None) -> datetime | None:
    """When the scheduler will end this job (its time limit), if it has one."""
    e = _env(env)
    if e.get("SLURM_JOB_END_TIME", "").isdigit():
        return datetime.fromtimestamp(int(e["SLURM_JOB_END_TIME"]), UTC)
    job = e.get("SLURM_JOB_ID")
    if not job or not shutil.which("squeue"):
        return None
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%e"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        stamp = done.stdout.strip().splitlines()[0]
        # Slurm prints local time without a zone: this host's.
        return datetime.fromisoformat(stamp).astimezone(UTC)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None  # "UNLIMITED", no such job, no Slurm after all
