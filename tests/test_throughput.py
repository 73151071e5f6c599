"""Throughput machinery: threads from physical cores, slots kept full across batches, live
sequences kept on consecutive seq ids, and --parallel auto from measured decode rates.
(Speed itself is measured by benchmarks/throughput.py, never asserted here.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from executor.engine.decode_rates import PROMPT_RATE, candidates, decode_only, pick_parallel
from executor.engine.protocol import LoadSpec
from executor.machine import cpus
from executor.params import GenerationRequest
from tests.helpers import query, run_cli, write_jsonl

FAKE = {"EXECUTOR_ENGINE": "fake"}
GREEDY = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0}

# --- threads ---------------------------------------------------------------------------------


def fake_machine(root: Path, siblings: dict[int, str], cgroup: str, cpu_max: str | None) -> Path:
    """A /sys and /proc with these CPUs' thread siblings and a cgroup v2 CPU limit."""
    for cpu, text in siblings.items():
        topology = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text + "\n")
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(f"0::{cgroup}\n")
    if cpu_max is not None:
        folder = root / "sys" / "fs" / "cgroup" / cgroup.strip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(cpu_max + "\n")
    return root


SMT = {0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"}


@pytest.mark.parametrize(
    ("allowed", "cpu_max", "threads", "reason"),
    [
        (set(range(8)), None, 4, "4 physical cores of 8 logical CPUs"),
        ({0, 4, 1}, None, 2, "2 physical cores of 3 logical CPUs"),  # affinity: taskset
        (set(range(8)), "150000 100000", 2, "capped by the cgroup CPU quota of 1.5"),
        (set(range(8)), "max 100000", 4, "4 physical cores of 8 logical CPUs"),
    ],
)
def test_threads_are_physical_cores_in_affinity_and_quota(
    tmp_path, monkeypatch, allowed, cpu_max, threads, reason
):
    root = fake_machine(tmp_path, SMT, "/job.slice/executor", cpu_max)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: allowed)
    count = cpus.cpu_count(root / "sys", root / "proc")
    assert count.threads == threads
    assert reason in count.reason


def test_a_quota_on_a_parent_cgroup_counts_and_no_sysfs_means_logical_cpus(tmp_path, monkeypatch):
    root = fake_machine(tmp_path, {}, "/a/b", None)
    (root / "sys" / "fs" / "cgroup" / "a").mkdir(parents=True)
    (root / "sys" / "fs" / "cgroup" / "a" / "cpu.max").write_text("300000 100000\n")
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(16)))
    count = cpus.cpu_count(root / "sys", root / "proc")
    assert (count.cores, count.quota, count.threads) == (16, 3.0, 3)


def test_both_thread_counts_of_the_context_are_the_setting():
    from executor.engine.llama_setup import context_params

    cparams = context_params(LoadSpec(engine="llama", model_path="m", n_ctx=256,
                                      n_gpu_layers=0, n_threads=3))  # fmt: skip
    assert (cparams.n_threads, cparams.n_threads_batch) == (3, 3)
    auto = context_params(LoadSpec(engine="llama", model_path="m", n_ctx=256, n_gpu_layers=0))
    assert auto.n_threads == auto.n_threads_batch == cpus.cpu_count().threads


def test_plan_says_the_threads_and_passes_them_on(db_path, tiny_model):
    shown = run_cli("plan", str(tiny_model), "--no-dry-run", db_path=db_path)
    assert shown.returncode == 0, shown.stderr
    assert f"threads   {cpus.cpu_count().threads} (" in shown.stdout
    flags = run_cli("plan", str(tiny_model), "-t", "3", "--llama-args", db_path=db_path)
    assert "-t 3 -tb 3" in flags.stdout
    bad = run_cli("plan", str(tiny_model), "--threads", "many", db_path=db_path)
    assert bad.returncode == 2 and "--threads" in bad.stderr


# --- --parallel auto from measured decode rates ------------------------------------------------


def test_pick_the_most_sequences_within_two_percent_of_the_best():
    rates = {1: 95, 2: 128, 4: 170, 8: 198, 16: 211, 32: 232, 64: 236}
    assert pick_parallel(rates) == 64
    assert pick_parallel({**rates, 64: 220}) == 32  # past the peak: fewer
    assert pick_parallel({1: 10, 2: 20, 4: 30, 8: 29.5, 16: 25}) == 8  # a tie goes to more
    assert pick_parallel(rates, cap=16) == 16
    assert pick_parallel({1: 10, 2: 10.2}) == 2
    assert pick_parallel({}) == 1
    assert pick_parallel(rates, cap=12) == 12  # the rates still grow past 12
    assert pick_parallel({1: 10, 2: 20, 4: 20.1}, cap=3) == 2
    assert candidates(64) == (1, 2, 4, 8, 16, 32, 64)
    assert candidates(12) == (1, 2, 4, 8, 12)
    assert candidates(0) == (1,)


def test_the_real_engine_measures_and_picks(default_model):
    from executor.engine.llama import LlamaEngine

    spec = LoadSpec(engine="llama", model_path=str(default_model), n_ctx=256,
                    n_gpu_layers=0, parallel=8, measure_parallel=(1, 2, 4, 8))  # fmt: skip
    engine = LlamaEngine(spec)
    try:
        rates = decode_only(engine.decode_rates)
        assert set(rates) <= {1, 2, 4, 8} and {1, 2} <= set(rates)
        assert engine.decode_rates[PROMPT_RATE] > 0  # a long prompt's rate, beside them
        assert all(r > 0 for r in rates.values())
        # Which size is fastest is a measurement (benchmarks/throughput.py), not a test: on a
        # busy 2-core machine one short step can beat two. What is tested is the choice.
        assert engine.spec.parallel == pick_parallel(rates) == len(engine.slots)
        assert engine.describe()["parallel"] == engine.spec.parallel
    finally:
        engine.close()


def test_auto_parallel_is_measured_once_then_read_back(tmp_path, db_path, tiny_model):
    rows = [{"prompt": f"w{i} x"} for i in range(20)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    first = run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    assert "decode rates are measured when the model loads" in first.stderr
    # The fake engine's rates are flat from 8 sequences on: the most within 2 % is the job's 20.
    assert "parallel 20: the most sequences within 2% of the best decode rate measured now" in (
        first.stderr
    )
    ((threads, rates),) = query(db_path, "SELECT threads, rates FROM decode_rates")
    assert threads == cpus.cpu_count().threads
    assert json.loads(rates) == {str(n): 100.0 * min(n, 8) for n in candidates(20)}
    run_cli("submit", str(path), "--model", str(tiny_model), "--force", db_path=db_path, check=True)
    second = run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    assert "parallel 20: the most sequences within 2% of the best decode rate measured on this" in (
        second.stderr
    )
    assert "measured now" not in second.stderr
    assert query(db_path, "SELECT parallel FROM loads ORDER BY id") == [(20,), (20,)]
    # A job of 3 items gets at most 3 sequences.
    small = write_jsonl(tmp_path / "small.jsonl", rows[:3])
    run_cli("submit", str(small), "--model", str(tiny_model), db_path=db_path, check=True)
    third = run_cli("run", "--until-empty", db_path=db_path, env=FAKE, check=True)
    assert "at most the job's 3 unfinished items" in third.stderr
    assert query(db_path, "SELECT parallel FROM loads ORDER BY id DESC LIMIT 1") == [(3,)]


# --- slots kept full --------------------------------------------------------------------------


def test_the_next_batch_is_queued_before_the_slots_drain(tmp_path, db_path, tiny_model):
    """Batches of 4 at parallel 4, answers of uneven length: every step but the last few of
    the job runs 4 sequences (without topping up, every batch would end with a drain)."""
    rows = [{"prompt": " ".join(["w"] * (2 + (i * 7) % 11))} for i in range(24)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("submit", str(path), "--model", str(tiny_model), db_path=db_path, check=True)
    trace = tmp_path / "trace.txt"
    env = {**FAKE, "EXECUTOR_FAKE_TRACE": str(trace), "EXECUTOR_FAKE_TOKEN_SECONDS": "0.01"}
    run_cli("run", "--until-empty", "-np", "4", "--batch-size", "4", db_path=db_path,
            env=env, check=True)  # fmt: skip
    steps = [tuple(map(int, line.split())) for line in trace.read_text().splitlines()]
    live = [n for n, _ in steps]
    full_until = max(i for i, n in enumerate(live) if n == 4)
    # Once the queue is empty the job drains (at most the longest answer's steps).
    assert all(n == 4 for n in live[: full_until + 1]), live
    assert len(live) - full_until <= 13
    assert query(db_path, "SELECT count(*) FROM results") == [(24,)]


def test_a_batch_sent_while_one_runs_is_generated_by_the_same_process(tmp_path, tiny_model):
    from executor.engine.protocol import BatchDone, ItemDone
    from executor.run.supervisor import ModelProcess

    spec = LoadSpec(engine="fake", model_path=str(tiny_model), n_ctx=256, n_gpu_layers=0,
                    parallel=2)  # fmt: skip
    proc = ModelProcess(spec, tmp_path / "engine.log")
    proc.start()
    requests = [GenerationRequest.build(i, f"c{i}", {"prompt": f"w{i} x y"}, GREEDY)
                for i in range(6)]  # fmt: skip
    done: list[int] = []
    finished = 0
    try:
        for event in proc.run(requests[:2]):
            if isinstance(event, ItemDone):
                done.append(event.item_id)
                if len(done) == 1:
                    assert proc.extend(requests[2:])
            elif isinstance(event, BatchDone):
                finished += 1
    finally:
        proc.stop()
    assert sorted(done) == list(range(6)) and finished == 1


# --- live sequences on consecutive seq ids -------------------------------------------------------


def test_live_sequences_stay_on_the_lowest_seq_ids_and_outputs_do_not_change(default_model):
    """Answers of uneven length at parallel 4: as sequences finish with nothing waiting,
    the highest live one moves into the lowest free slot (llama.cpp runs consecutive seq ids
    in one ubatch); its answer is the one the sequential path gives."""
    from executor.engine.llama import LlamaEngine

    lengths = [3, 40, 9, 25, 5, 30]
    requests = [
        GenerationRequest.build(
            i, f"c{i}", {"prompt": f"Tell me about the number {i}."}, {**GREEDY, "max_tokens": n}
        )
        for i, n in enumerate(lengths)
    ]

    class Sink:
        def __init__(self):
            self.outputs: dict[int, str] = {}

        def started(self, item_id): ...

        def finished(self, item_id, record):
            self.outputs[item_id] = record.output

        def failed(self, item_id, reason):
            raise AssertionError(reason)

        def dropped(self):
            return set()

        def more(self):
            return []

        def stop_requested(self):
            return False

        def progress(self, tokens): ...

    def run(parallel: int) -> tuple[dict[int, str], list[list[int]]]:
        engine = LlamaEngine(
            LoadSpec(
                engine="llama",
                model_path=str(default_model),
                n_ctx=256,
                n_gpu_layers=0,
                parallel=parallel,
            )
        )
        seen: list[list[int]] = []
        step = engine._step

        def spy(live, sink):
            seen.append([slot.seq_id for slot in live])
            step(live, sink)

        engine._step = spy
        sink = Sink()
        try:
            engine.run_batch(requests, sink)
        finally:
            engine.close()
        return sink.outputs, seen

    sequential, _ = run(1)
    parallel, steps = run(4)
    assert all(ids == list(range(len(ids))) for ids in steps), steps
    assert parallel == sequential
