"""The GPU user's first hour on this (CPU-only) build: a GPU that would sit idle is said
loudly and recorded; GPU layers asked for are refused unless --allow-cpu; `make setup
GPU=cuda` without nvcc fails with one clear message.

These tests drop EXECUTOR_FAKE_GPU_OFFLOAD (conftest sets it so that other tests can plan
for a fake GPU): llama.cpp itself is asked what this build can do, and it answers no.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import query, read_jsonl, run_cli, run_cli_process, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
CARD = json.dumps(
    [{"name": "NVIDIA GeForce RTX 3060", "uuid": "GPU-fake-3060", "total": 12 * 2**30}]
)


@pytest.fixture(autouse=True)
def real_build_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXECUTOR_FAKE_GPU_OFFLOAD", raising=False)


def prompts(tmp_path: Path, n: int = 2) -> Path:
    rows = [{"prompt": f"Count to {i}:", "max_tokens": 4} for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_plan_warns_and_plans_for_the_cpu(db_path, default_model):
    result = run_cli(
        "plan", str(default_model), "--no-dry-run", db_path=db_path,
        env={"EXECUTOR_FAKE_NVML": CARD},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "WARNING: NVIDIA GeForce RTX 3060 is here but this llama-cpp-python was built "
        "without GPU offload" in result.stderr
    )
    assert "make setup GPU=cuda" in result.stderr
    assert "GPU       not used" in result.stdout
    data = json.loads(
        run_cli(
            "plan", str(default_model), "--json", "--no-dry-run", db_path=db_path,
            env={"EXECUTOR_FAKE_NVML": CARD}, check=True,
        ).stdout
    )  # fmt: skip
    assert data["plan"]["n_gpu_layers"] == 0 and data["gpu"] is None
    assert "make setup GPU=cuda" in data["offload_warning"]


def test_plan_without_a_gpu_says_nothing_of_it(db_path, default_model):
    result = run_cli("plan", str(default_model), "--no-dry-run", db_path=db_path, check=True)
    assert "WARNING" not in result.stderr
    assert (
        json.loads(
            run_cli("plan", str(default_model), "--json", "--no-dry-run", db_path=db_path).stdout
        )["offload_warning"]
        is None
    )


def test_run_warns_every_time_and_records_it_with_the_load(tmp_path, db_path, default_model):
    env = {"EXECUTOR_FAKE_NVML": CARD, "EXECUTOR_CTX": "512", "EXECUTOR_PARALLEL": "2"}
    for n in range(2):
        run_cli("submit", str(prompts(tmp_path, 2 + n)), "--model", str(default_model),
                db_path=db_path, check=True)  # fmt: skip
        done = run_cli_process("run", "--until-empty", db_path=db_path, env=env, check=True)
        assert "WARNING" in done.stderr and "built without GPU offload" in done.stderr
        assert "make setup GPU=cuda" in done.stderr
    loads = query(db_path, "SELECT n_gpu_layers, gpu_uuid, plan FROM loads ORDER BY id")
    assert len(loads) == 2
    for layers, uuid, plan in loads:
        assert (layers, uuid) == (0, "cpu")
        (warning,) = json.loads(plan)["warnings"]
        assert "NVIDIA GeForce RTX 3060 is here" in warning
    assert query(db_path, "SELECT count(*) FROM results") == [(5,)]


def test_gpu_layers_on_a_cpu_build_are_refused_before_anything_is_claimed(
    tmp_path, db_path, default_model
):
    run_cli("submit", str(prompts(tmp_path)), "--model", str(default_model), db_path=db_path,
            check=True)  # fmt: skip
    env = {"EXECUTOR_FAKE_NVML": CARD, "EXECUTOR_CTX": "512"}
    refused = run_cli_process("run", "--until-empty", "-ngl", "20", db_path=db_path, env=env)
    assert refused.returncode == 4
    assert (
        "gpu_layers 20 (flag) asks for layers on a GPU, but this llama-cpp-python was built "
        "without GPU offload" in refused.stderr
    )
    assert "--allow-cpu" in refused.stderr and "Traceback" not in refused.stderr
    assert query(db_path, "SELECT status, count(*) FROM items GROUP BY status") == [("queued", 2)]
    # The same from the environment (and without a GPU at all), then accepted on purpose.
    no_gpu = {"EXECUTOR_CTX": "512", "EXECUTOR_GPU_LAYERS": "all"}
    refused = run_cli_process("run", "--until-empty", db_path=db_path, env=no_gpu)
    assert refused.returncode == 4 and "gpu_layers all (env EXECUTOR_GPU_LAYERS)" in refused.stderr
    accepted = run_cli_process(
        "run", "--until-empty", "-ngl", "20", "--allow-cpu", db_path=db_path, env=env
    )
    assert accepted.returncode == 0, accepted.stderr
    assert query(db_path, "SELECT count(*) FROM results") == [(2,)]


def test_a_job_spec_asking_for_gpu_layers_is_refused_unless_allowed(
    tmp_path, db_path, default_model
):
    prompts(tmp_path)
    spec = tmp_path / "nightly.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"input": "prompts.jsonl", "model": str(default_model), "ctx": 512,
             "gpu_layers": 12, "output": "out.jsonl"}
        )
    )  # fmt: skip
    refused = run_cli_process("run-job", str(spec), db_path=db_path)
    assert refused.returncode == 4 and "gpu_layers 12" in refused.stderr
    assert "make setup GPU=cuda" in refused.stderr
    assert not db_path.exists() or query(db_path, "SELECT count(*) FROM jobs") == [(0,)]
    done = run_cli_process("run-job", str(spec), "--allow-cpu", db_path=db_path)
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2


def test_the_fake_engine_is_not_asked(tmp_path, db_path, tiny_model):
    """The fake engine plays a GPU build: pipelines tested with it keep their fake GPU."""
    result = run_cli(
        "plan", str(tiny_model), "--json", "--no-dry-run", db_path=db_path,
        env={"EXECUTOR_FAKE_NVML": CARD, "EXECUTOR_ENGINE": "fake"}, check=True,
    )  # fmt: skip
    data = json.loads(result.stdout)
    assert data["offload_warning"] is None and data["gpu"]["name"] == "NVIDIA GeForce RTX 3060"


# --- make setup GPU=cuda ---------------------------------------------------------------------


def _without_nvcc(tmp_path: Path) -> dict[str, str]:
    """PATH with the tools make and the script use, and no nvcc anywhere."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "make", "cat", "grep", "head", "dirname", "mktemp", "uname", "nproc",
                 "cut", "rm", "tail", "python3", "env"):  # fmt: skip
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k != "CUDACXX"}
    env["PATH"] = str(bin_dir)
    env["CUDA_HOME"] = str(tmp_path / "no-cuda")  # where install-llama looks besides PATH
    return env


def test_make_setup_gpu_cuda_without_nvcc_says_what_to_install(tmp_path):
    env = _without_nvcc(tmp_path)
    stamp = ROOT / ".venv" / ".llama-build"
    before = stamp.read_text() if stamp.exists() else None
    # -o: the venv counts as made (this test must not rebuild it whatever the file times).
    done = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "setup", "GPU=cuda"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "a CUDA build needs the CUDA toolkit's compiler, nvcc" in done.stderr
    assert "make setup GPU=cuda" in done.stderr and "CPU build is left as it was" in done.stderr
    assert "CMake" not in done.stderr and len(done.stderr.splitlines()) < 8
    assert (stamp.read_text() if stamp.exists() else None) == before


def test_install_llama_names_the_builds_it_knows(tmp_path):
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-llama"), str(tmp_path / "venv"), "rocm"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown build 'rocm': GPU=cuda for NVIDIA cards, GPU=cpu for none" in done.stderr


# --- the bundle that carries the GPU check to a machine without network ------------------------


def test_the_gpu_bundle_travels_under_the_limit(tmp_path):
    """scripts/gpu-bundle: the pruned llama.cpp a library build needs, llama-cpp-python's
    Python package and cp312 wheels of what the GPU machine lacks, under 64 MiB with the tree."""
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-bundle"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    total = re.search(r"total\s+([\d.]+) MiB of 64 MiB", done.stdout)
    assert total and float(total[1]) < 64, done.stdout
    tree = out / "llama.cpp"
    for needed in ("CMakeLists.txt", "ggml/src/ggml-cuda/CMakeLists.txt", "ggml/src/ggml-cpu",
                   "src/llama.cpp", "include/llama.h", "vendor/nlohmann"):  # fmt: skip
        assert (tree / needed).exists(), needed
    for pruned in ("models", "docs", "tools", "ggml/src/ggml-vulkan", "ggml/src/ggml-metal"):
        assert not (tree / pruned).exists(), pruned
    assert (out / "python" / "llama_cpp" / "llama_cpp.py").exists()
    assert not (out / "python" / "llama_cpp" / "lib").exists()  # built there, not carried
    wheels = {p.name.split("-")[0].lower() for p in (out / "wheels").glob("*.whl")}
    assert {"sqlalchemy", "alembic", "tenacity", "gguf", "diskcache", "typer"} <= wheels
    assert not wheels & {"numpy", "pyyaml", "jinja2", "llama_cpp_python"}  # there already
    assert all("cp312" in p.name or "py3" in p.name for p in (out / "wheels").glob("*.whl"))


def test_gpu_check_without_a_bundle_says_how_to_make_one(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env={**os.environ, "GPU_BUNDLE": str(tmp_path / "none"), "GPU_WORK": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "run scripts/gpu-bundle first" in done.stderr
