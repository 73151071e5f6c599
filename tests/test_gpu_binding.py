"""Which GPU a worker takes: the one a scheduler gives (CUDA_VISIBLE_DEVICES, in every form
CUDA reads), or the `gpu` setting; a contradiction is a usage error, never someone else's
card. And what a scheduler tells the worker: its label and its end time."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from executor.machine import gpu
from executor.run import scheduler
from tests.helpers import run_cli

GiB = 2**30
CARDS = [
    gpu.GpuInfo(
        index=i, name=f"Card {i}", uuid=f"GPU-{i}a{i}b-0000", total=24 * GiB, free=24 * GiB, used=0
    )
    for i in range(4)
]
FOUR = gpu.Probe(gpus=CARDS, driver="555.0")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", [2]),
        ("3,1", [3, 1]),  # CUDA's order is the variable's
        (" 1 , 0 ", [1, 0]),
        ("GPU-2a2b-0000", [2]),
        ("GPU-3a", [3]),  # a unique prefix, as CUDA takes it
        ("", []),
        ("-1", []),
        ("NoDevFiles", []),  # Slurm's "none"
        ("1,-1,2", [1]),  # CUDA stops at the first invalid entry
    ],
)
def test_cuda_visible_devices_in_every_form_maps_to_nvml_cards(text, expected):
    cards = gpu.visible(FOUR, {"CUDA_VISIBLE_DEVICES": text})
    assert [c.index for c in cards] == expected


def test_without_the_variable_nothing_is_restricted():
    assert gpu.visible(FOUR, {}) is None
    assert gpu.worker_card(FOUR, 2, explicit=True, env={}).index == 2
    assert gpu.worker_card(FOUR, 0, explicit=False, env={}).index == 0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("7", "names GPU 7, which NVML does not list"),
        ("GPU-", "names GPU GPU-,"),  # a prefix of all four is no one card
        ("GPU-9", "names GPU GPU-9"),
        ("MIG-GPU-1a1b-0000/1/0", "MIG devices are not supported"),
    ],
)
def test_a_variable_naming_no_single_card_is_refused(text, words):
    with pytest.raises(gpu.BindingError, match=words.replace("(", r"\(")):
        gpu.visible(FOUR, {"CUDA_VISIBLE_DEVICES": text})


def test_a_worker_under_a_scheduler_takes_the_first_card_it_was_given():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert gpu.worker_card(FOUR, 0, explicit=False, env=env).index == 2
    # --gpu among the given ones picks it; outside them it is an error, not card 0.
    assert gpu.worker_card(FOUR, 3, explicit=True, env=env).index == 3
    with pytest.raises(gpu.BindingError, match=r"gpu 0 is not among .*2, 3"):
        gpu.worker_card(FOUR, 0, explicit=True, env=env)
    # Given no GPU at all: a CPU worker, unless it insisted on one.
    assert gpu.worker_card(FOUR, 0, explicit=False, env={"CUDA_VISIBLE_DEVICES": ""}) is None
    with pytest.raises(gpu.BindingError, match="none"):
        gpu.worker_card(FOUR, 1, explicit=True, env={"CUDA_VISIBLE_DEVICES": "-1"})


FAKE = json.dumps([{"name": f"Fake {i}", "uuid": f"GPU-fake-{i}", "total": 24 * GiB}
                   for i in range(4)])  # fmt: skip


def test_plan_uses_the_scheduler_card_and_refuses_a_contradicting_gpu_flag(db_path, tiny_model):
    env = {"EXECUTOR_FAKE_NVML": FAKE, "CUDA_VISIBLE_DEVICES": "2"}
    args = ("plan", str(tiny_model), "--json")
    given = run_cli(*args, db_path=db_path, env=env, check=True)
    assert json.loads(given.stdout)["gpu"]["uuid"] == "GPU-fake-2"
    same = run_cli(*args, "--gpu", "2", db_path=db_path, env=env, check=True)
    assert json.loads(same.stdout)["gpu"]["uuid"] == "GPU-fake-2"
    refused = run_cli(*args, "--gpu", "0", db_path=db_path, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "gpu 0 is not among the GPUs this process was given" in refused.stderr
    assert "hint: leave --gpu" in refused.stderr and "Traceback" not in refused.stderr
    garbage = run_cli(*args, db_path=db_path, env={**env, "CUDA_VISIBLE_DEVICES": "GPU-zz"})
    assert garbage.returncode == 2 and "NVML does not list" in garbage.stderr
    # Without the variable, --gpu picks any card.
    free = run_cli(*args, "--gpu", "3", db_path=db_path, env={"EXECUTOR_FAKE_NVML": FAKE})
    assert json.loads(free.stdout)["gpu"]["uuid"] == "GPU-fake-3"


SLURM_ARRAY = {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"}
POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "w-0-abcde",
       "JOB_COMPLETION_INDEX": "0"}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "label", "tag"),
    [
        (SLURM_ARRAY, "slurm job 4242_3", "slurm-4242_3"),
        ({"SLURM_JOB_ID": "77"}, "slurm job 77", "slurm-77"),
        (POD, "kubernetes pod w-0-abcde (index 0)", "k8s-w-0-abcde"),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "p"}, "kubernetes pod p", "k8s-p"),
        ({"HOSTNAME": "laptop"}, None, None),
        ({}, None, None),
    ],
)
def test_a_scheduler_names_the_worker(env, label, tag):
    assert scheduler.label(env) == label
    assert scheduler.allocation(env) == tag


def test_the_end_time_comes_from_slurm_or_is_unknown(monkeypatch):
    end = scheduler.end_time({"SLURM_JOB_ID": "5", "SLURM_JOB_END_TIME": "1800000000"})
    assert end == datetime.fromtimestamp(1800000000, UTC)
    assert scheduler.end_time({}) is None
    # A job id but no squeue to ask (not on a cluster after all): unknown, not an error.
    monkeypatch.setattr(scheduler.shutil, "which", lambda name: None)
    assert scheduler.end_time({"SLURM_JOB_ID": "5"}) is None
