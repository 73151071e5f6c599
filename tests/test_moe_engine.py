"""Small models with random weights that llama.cpp really runs: a mixture-of-experts model
loaded with the plan's tensor overrides, and a sliding-window model whose KV cache is planned
exactly as the engine allocates it. CPU only: what the GPU would hold is checked in
test_placement.py against llama.cpp's dry runs of the big shapes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from executor.engine.probes import dry_run
from executor.engine.protocol import LoadSpec
from executor.gguf.info import read_model_info
from executor.params import GenerationRequest
from executor.planning.placement import Placement, rules
from executor.planning.plan import make_plan
from executor.planning.sizes import (
    MiB,
    PlanRequest,
)
from tests.helpers import generate_in_process, query, read_jsonl, run_cli, write_jsonl
from tests.synthetic_gguf import write_moe_gguf

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    return {
        name: write_moe_gguf(folder / f"{name}.gguf", name)
        for name in ("tiny-qwen3moe", "tiny-gpt-oss")
    }


def generate(spec: LoadSpec, log: Path, requests: list[GenerationRequest]) -> dict[int, str]:
    return generate_in_process(spec, log, requests)


def chats(n: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            item_id=i, custom_id=str(i), max_tokens=12, temperature=0.0, top_p=1.0, seed=0,
            messages=[{"role": "user", "content": f"Tell me about number {i}."}],
        )
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("shape", ["tiny-qwen3moe", "tiny-gpt-oss"])
def test_overrides_move_exactly_the_named_tensors_and_change_no_output(tiny, shape, tmp_path):
    info = read_model_info(tiny[shape])
    placement = Placement(info.n_layer + 1, 2, 2, ("ffn_down_exps",))
    overrides = rules(info, placement)
    base = LoadSpec(
        engine="llama", model_path=str(tiny[shape]), n_ctx=256, n_gpu_layers=info.n_layer + 1,
        parallel=2,
    )  # fmt: skip
    plain = generate(base, tmp_path / "plain.log", chats(4))
    with_rules = LoadSpec(
        **{**base.__dict__, "tensor_overrides": tuple(tuple(r.rsplit("=", 1)) for r in overrides)}
    )
    log = tmp_path / "rules.log"
    moved = generate(with_rules, log, chats(4))
    assert moved == plain and all(plain.values())  # greedy: the same tokens either way
    named = set(re.findall(r"tensor (\S+) \(.*\) buffer type overridden to CPU", log.read_text()))
    kinds = ("weight", "bias") if shape == "tiny-gpt-oss" else ("weight",)
    expected = {
        f"blk.{b}.{base}.{kind}"
        for b in (0, 1)
        for base in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        for kind in kinds
    } | {
        f"blk.2.ffn_down_exps.{k}" for k in (("weight", "bias") if "oss" in shape else ("weight",))
    }
    assert named == expected
    assert "buffer type overridden" not in (tmp_path / "plain.log").read_text()


SWA_GRID = [(ctx, par, full) for ctx in (1024, 4096, 8192) for par in (1, 4) for full in (0, 1)]


@pytest.mark.parametrize(("ctx", "parallel", "swa_full"), SWA_GRID)
def test_sliding_window_cache_planned_as_allocated(tiny, ctx, parallel, swa_full):
    """The plan's KV cache equals llama.cpp's dry run and its real allocation (the same
    context parameters the engine uses), with and without full-size SWA caches."""
    info = read_model_info(tiny["tiny-gpt-oss"])
    assert info.n_swa == 32 and sum(info.swa_layers) == 2
    req = PlanRequest(n_ctx=ctx, parallel=parallel, swa_full=bool(swa_full), flash_attn=False)
    planned = make_plan(info, None, req)
    spec = LoadSpec(
        engine="llama", model_path=info.path, n_ctx=ctx, n_gpu_layers=0, parallel=parallel,
        swa_full=bool(swa_full),
    )  # fmt: skip
    predicted = dry_run(spec)
    allocated = dry_run(spec, allocate=True)
    assert not isinstance(predicted, str) and not isinstance(allocated, str)
    # llama.cpp logs each of the two caches in MiB with two decimals.
    assert abs(planned.cpu.kv_cache - allocated.kv_bytes) <= 0.011 * MiB
    assert predicted.kv_bytes == allocated.kv_bytes
    assert (
        abs(planned.cpu.compute_buffer - allocated.compute["CPU"])
        <= 0.05 * allocated.compute["CPU"]
    )


def test_a_job_of_short_prompts_gets_a_small_context(tiny, tmp_path, db_path):
    """ctx auto: the context follows the job's longest prompt + max_tokens; on a card that
    cannot hold the model with a long context, the KV cache saved buys layers on the GPU
    (on this 781.5 MiB card every expert at ctx 256, 3 blocks' in RAM at ctx 4096, one layer
    at ctx 32768), and the plan says so."""
    model = tiny["tiny-gpt-oss"]
    rows = [
        {"custom_id": f"q{i}", "messages": [{"role": "user", "content": f"Hi {i}"}]}
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    job = run_cli(
        "submit", str(path), "--model", str(model), "--max-tokens", "40", db_path=db_path,
        check=True,
    ).stdout.strip()  # fmt: skip
    card = ("--gpu-total", "781.5MiB", "-np", "1", "-ub", "32", "--no-dry-run")
    planned = run_cli("plan", "--job", job, *card, db_path=db_path, check=True).stdout
    assert "context   256 tokens × 1 sequence" in planned
    assert "layers    5 of 5 on the GPU" in planned
    assert f"ctx 256: sized from job {job}'s work" in planned
    assert "at ctx 4096: 5 of 5 layers, routed experts of 3 blocks in RAM" in planned
    needs = query(db_path, "SELECT max(context_need), min(context_need) FROM items")[0]
    assert 40 < needs[1] <= needs[0] < 256  # prompt tokens (chat template included) + 40
    fixed = run_cli("plan", "--job", job, *card, "-c", "32768", db_path=db_path, check=True)
    assert "context   32768 tokens" in fixed.stdout and "layers    1 of 5" in fixed.stdout
    run_cli("run", "--until-empty", db_path=db_path, check=True)
    assert query(db_path, "SELECT DISTINCT n_ctx FROM loads") == [(256,)]
    out = read_jsonl(run_cli("export", job, db_path=db_path, check=True).stdout)
    assert len(out) == 6 and all(r["status"] == "done" for r in out)
