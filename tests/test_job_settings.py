"""One rule for a job's load settings, whichever way the job is planned or run: the job's
own settings win over the worker's flags, environment and config; of two VRAM caps the
smaller applies; every value says where it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from executor.config import load_settings
from executor.planning.gather import plan_for
from executor.planning.job_settings import settings_for_job
from executor.store import open_database, queue
from tests.helpers import query, run_cli, run_cli_process, write_jsonl

GiB = 2**30
CARD = json.dumps([{"name": "Fake GPU", "uuid": "GPU-fake-0", "total": 24 * GiB}])


@pytest.fixture
def spec_job(tmp_path: Path, db_path: Path, tiny_model: Path) -> int:
    """A queued job whose spec sets ctx 512, parallel 2, gpu_layers 3 and a 10 GiB cap."""
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"item {i}"} for i in range(4)])
    spec = tmp_path / "night.yaml"
    spec.write_text(yaml.safe_dump({
        "input": "in.jsonl", "model": str(tiny_model), "ctx": 512, "parallel": 2,
        "gpu_layers": 3, "vram_cap": "10GiB",
    }))  # fmt: skip
    return int(run_cli("submit", str(spec), db_path=db_path, check=True).stdout)


def test_the_job_wins_over_flags_and_the_smaller_cap_applies(db_path, spec_job, monkeypatch):
    monkeypatch.setenv("EXECUTOR_FAKE_NVML", CARD)
    flags = {"db": str(db_path), "ctx": 1024, "parallel": 4, "gpu_layers": 5, "vram_cap": "12GiB"}
    db = open_database(f"sqlite:///{db_path}")
    job = queue.require_job(db, spec_job)
    merged = settings_for_job(load_settings(flags), job, 24 * GiB)
    assert (merged.ctx, merged.parallel, merged.gpu_layers, merged.vram_cap) == (512, 2, 3, "10GiB")
    assert {merged.sources[k] for k in ("ctx", "parallel", "gpu_layers", "vram_cap")} == {
        f"job {spec_job}"
    }
    # The worker's cap is the smaller one: it stays, and says so.
    smaller = settings_for_job(load_settings({**flags, "vram_cap": "8GiB"}), job, 24 * GiB)
    assert (smaller.vram_cap, smaller.sources["vram_cap"]) == ("8GiB", "flag")
    # A percentage against a size, on this card: 30 % of 24 GiB is 7.2 GiB < 10 GiB.
    percent = settings_for_job(load_settings({**flags, "vram_cap": "30%"}), job, 24 * GiB)
    assert percent.vram_cap == "30%"
    # plan_for, which `plan --job` and the loader both call, plans with exactly these.
    report = plan_for(load_settings(flags), db, job.model, job=job, use_dry_run=False)
    request = report.plan.request
    assert (request.n_ctx, request.parallel, report.plan.n_gpu_layers) == (512, 2, 3)
    assert report.plan.cap == 10 * GiB
    assert report.origins()["ctx"] == f"job {spec_job}"
    db.dispose()


def test_plan_and_run_agree_on_the_job_and_say_where_each_value_came_from(
    db_path, spec_job, monkeypatch
):
    monkeypatch.setenv("EXECUTOR_FAKE_NVML", CARD)
    flags = ["--ctx", "1024", "--parallel", "4", "--gpu-layers", "5", "--vram-cap", "12GiB"]
    planned = run_cli_process(
        "plan", "--job", str(spec_job), "--json", "--no-dry-run", *flags, db_path=db_path
    )
    assert planned.returncode == 0, planned.stderr
    data = json.loads(planned.stdout)
    assert data["plan"]["request"]["n_ctx"] == 512 and data["plan"]["request"]["parallel"] == 2
    assert data["plan"]["n_gpu_layers"] == 3 and data["plan"]["cap"] == 10 * GiB
    assert data["origins"]["ctx"] == data["origins"]["vram_cap"] == f"job {spec_job}"
    table = run_cli_process(
        "plan", "--job", str(spec_job), "--no-dry-run", *flags, db_path=db_path
    ).stdout
    assert f"ctx 512 (job {spec_job})" in table and f"vram_cap 10GiB (job {spec_job})" in table

    ran = run_cli_process(
        "run", "--until-empty", *flags, db_path=db_path, env={"EXECUTOR_ENGINE": "fake"}
    )
    assert ran.returncode == 0, ran.stderr
    assert f"plan: ctx 512 (job {spec_job})" in ran.stderr
    assert query(
        db_path, "SELECT n_ctx, parallel, n_gpu_layers, vram_cap, cap_setting FROM loads"
    ) == [(512, 2, 3, 10 * GiB, "10GiB")]
    assert query(db_path, "SELECT count(*) FROM items WHERE status = 'done'") == [(4,)]


def test_min_vram_is_stored_once(tmp_path, db_path, tiny_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    run_cli("submit", str(path), "--model", str(tiny_model), "--min-vram", "20GiB",
            db_path=db_path, check=True)  # fmt: skip
    ((params, column),) = query(db_path, "SELECT params, min_vram FROM jobs")
    assert column == 20 * GiB and "min_vram" not in json.loads(params)
    again = run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    assert again.stdout.strip() == "2"  # another min_vram: another job
