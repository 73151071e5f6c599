"""The offload plan: sizes, GGUF metadata, placement by hand, and accuracy against llama.cpp."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from executor.engine.probes import dry_run
from executor.engine.protocol import LoadSpec
from executor.gguf.info import read_model_info
from executor.machine.gpu import Device, FakeNvml, probe, process_vram
from executor.planning.placement import Placement
from executor.planning.plan import make_plan
from executor.planning.sizes import (
    CUDA_RESERVE,
    FREE_HEADROOM,
    GiB,
    MiB,
    PlanRequest,
    kv_layer_bytes,
)
from executor.units import format_bytes, parse_cap, parse_size
from tests.helpers import run_cli, tiny_info
from tests.synthetic_gguf import (
    SHAPES,
    tensor_bytes,
    tensor_table,
    write_llama_gguf,
    write_moe_gguf,
)

CARD_12G = Device(name="12 GiB card", uuid="GPU-test", total=12 * GiB, free=12 * GiB)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Sparse synthetic headers: a 41 GB 70B file costs a few megabytes of disk."""
    folder = tmp_path_factory.mktemp("ggufs")
    made = {
        shape: write_llama_gguf(folder / f"{shape}.gguf", shape)
        for shape in ("7b", "13b", "70b", "1b")
    }
    for shape in ("gpt-oss-120b", "qwen3-30b-a3b", "tiny-gpt-oss"):
        made[shape] = write_moe_gguf(folder / f"{shape}.gguf", shape)
    return made


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * 2**30),
        ("11.5GiB", int(11.5 * 2**30)),
        ("12GB", 12 * 10**9),
        ("800MiB", 800 * 2**20),
        ("123456", 123456),
        ("12 gib", 12 * 2**30),
        ("2TB", 2 * 10**12),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12G", "lots", "-3GiB", "12 GiBs", "", "0"])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_percentage_caps():
    assert parse_cap("90%").resolve(10 * GiB) == 9 * GiB
    assert parse_cap("11.5GiB").resolve(999) == int(11.5 * GiB)
    with pytest.raises(ValueError, match="percentage"):
        parse_cap("150%")


# --- GGUF metadata -------------------------------------------------------------------------------


def test_gguf_info_of_a_70b_header(models):
    info = read_model_info(models["70b"])
    assert (info.architecture, info.n_layer, info.n_embd, info.n_ff) == ("llama", 80, 8192, 28672)
    assert set(info.n_head) == {64} and set(info.n_head_kv) == {8}
    assert (info.key_length, info.value_length, info.n_vocab) == (128, 128, 32000)
    assert info.quantization == "Q4_K_M" and not info.output_tied
    expected = {name: tensor_bytes(ne, q) for name, ne, q in tensor_table(SHAPES["70b"], "Q4_K_M")}
    assert info.layer_bytes[0] == sum(v for k, v in expected.items() if k.startswith("blk.0."))
    assert info.output_bytes == expected["output.weight"] + expected["output_norm.weight"]
    assert info.weights_bytes == sum(expected.values())
    assert 41e9 < info.file_size < 42e9  # the size of a real llama-2-70b.Q4_K_M.gguf


def test_gguf_info_of_the_default_model(default_model):
    info = read_model_info(default_model)
    assert (info.n_layer, info.n_embd, info.n_vocab, info.n_ctx_train) == (30, 576, 49152, 8192)
    assert set(info.n_head_kv) == {3} and info.key_length == 64
    assert info.output_tied  # SmolLM2 ties the output layer to the token embedding


def test_not_a_gguf(tmp_path):
    from executor.errors import ModelError

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelError, match="GGUF version 0 is not supported"):
        read_model_info(bad)


# --- placement, by hand --------------------------------------------------------------------------


def test_70b_q4_k_m_on_a_12_gib_card_at_ctx_2048_by_hand(models):
    """The layout a person gets with a pencil, from the tensor table and llama.cpp's rules.

    Cap: 12 GiB free − 256 MiB headroom = 12032 MiB. Fixed GPU parts once any layer is
    offloaded: the output layer (Q6_K 8192×32000 + norm = 205.11 MiB), the CUDA reserve (512
    MiB) and the compute buffer: FFN phase 3·28672·512·4 B = 168 MiB, four hidden states 64 MiB,
    the f16 KQ mask 2048·512·2 B = 2 MiB, plus one RAM weight staged for op offload (the
    largest, a Q6_K ffn_down: 183.75 MiB) = 417.75 MiB. Fixed total 1134.86 MiB, leaving
    10897.14 MiB for blocks. A block is 459.06 MiB, or 518.88 MiB where Q4_K_M keeps attn_v
    and ffn_down at Q6_K (the first and last eighth of the layers and every third between),
    plus its KV cache: 2048 cells × 1024 × (2 + 2) B = 8 MiB. From the last block down:
    blocks 79…69 are Q6_K (11 × 526.88 = 5795.7 MiB); then 68, 67 (467.06 each), 66 (526.88),
    65, 64, 63 (526.88), 62, 61, 60 (526.88), 59: 21 whole blocks, 10645.69 MiB, 251.45 MiB
    left. Block 58 (Q4_K throughout) does not fit whole (467.06 MiB), so it goes in part: its
    attention (q and o 8192×8192 Q4_K, 36 MiB each; k and v 8192×1024, 4.5 MiB each; two norms
    64 KiB: 81.06 MiB) and KV (8 MiB) need 89.06 MiB, its ffn_up (8192×28672 Q4_K, 126 MiB)
    brings that to 215.06 MiB, and ffn_gate would need 126 MiB more than the 36.39 MiB left.
    So n_gpu_layers = 23 (the output layer + 21 blocks + block 58) and one rule sends block
    58's ffn_gate and ffn_down to RAM. The loop below redoes the sum from the file.
    """
    info = read_model_info(models["70b"])
    plan = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048))
    cap = 12 * GiB - FREE_HEADROOM
    sizes = {name: tensor_bytes(ne, q) for name, ne, q in tensor_table(SHAPES["70b"], "Q4_K_M")}
    fixed = (
        info.output_bytes
        + CUDA_RESERVE
        + 3 * 28672 * 512 * 4
        + 4 * 8192 * 512 * 4
        + 2048 * 512 * 2
        + max(sizes.values())  # staged: the largest tensor left in RAM, a Q6_K ffn_down
    )
    kv_per_block = 2048 * 8 * 128 * (2 + 2)
    budget, blocks = cap - fixed, 0
    for layer in reversed(range(info.n_layer)):
        need = info.layer_bytes[layer] + kv_per_block
        if need > budget:
            break
        budget -= need
        blocks += 1
    partial = 79 - blocks
    ffn = {f"blk.{partial}.{m}.weight" for m in ("ffn_up", "ffn_gate", "ffn_down")}
    head = sum(v for k, v in sizes.items() if k.startswith(f"blk.{partial}.") and k not in ffn)
    assert blocks == 21 and partial == 58
    assert head + kv_per_block + sizes[f"blk.{partial}.ffn_up.weight"] <= budget
    assert head + kv_per_block + 2 * sizes[f"blk.{partial}.ffn_up.weight"] > budget
    assert plan.n_gpu_layers == blocks + 2  # the output layer counts as one; block 58 is in
    assert plan.placement == Placement(23, 0, 58, ("ffn_down", "ffn_gate"))
    assert plan.rules == (r"blk\.58\.(ffn_down|ffn_gate)\.=CPU",)
    assert plan.gpu.total <= cap and plan.fits and plan.cap == cap
    assert cap - plan.gpu.total < sizes[f"blk.{partial}.ffn_gate.weight"]
    assert any(note.startswith("the next step (ffn_gate+ffn_up of block 58") for note in plan.notes)


def test_7b_q4_k_m_fits_entirely_on_12_gib(models):
    plan = make_plan(read_model_info(models["7b"]), CARD_12G, PlanRequest(n_ctx=2048))
    assert plan.n_gpu_layers == plan.max_layers == 33
    assert plan.cpu.layer_weights == 0 and plan.cpu.kv_cache == 0
    assert plan.cpu.token_embedding > 0  # the input layer always stays on the CPU


def test_user_cap_below_free_memory_applies(models):
    info = read_model_info(models["70b"])
    loose = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048))
    tight = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048, vram_cap=8 * GiB))
    assert tight.cap == 8 * GiB and tight.cap_reason == "your cap"
    assert tight.n_gpu_layers < loose.n_gpu_layers and tight.gpu.total <= 8 * GiB


def test_free_memory_limits_a_generous_cap(models):
    busy = replace(CARD_12G, free=6 * GiB)
    plan = make_plan(
        read_model_info(models["70b"]), busy, PlanRequest(n_ctx=2048, vram_cap=11 * GiB)
    )
    assert plan.cap == 6 * GiB - FREE_HEADROOM
    assert "below your cap" in plan.cap_reason


def test_longer_context_means_fewer_layers_and_says_why(models):
    info = read_model_info(models["70b"])
    short = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048, flash_attn=False))
    long = make_plan(info, CARD_12G, PlanRequest(n_ctx=16384, flash_attn=False))
    assert long.n_gpu_layers < short.n_gpu_layers
    assert any(n.startswith("KV cache at ctx 16384 takes") for n in long.notes)


def test_no_gpu_means_cpu_only(models):
    plan = make_plan(read_model_info(models["7b"]), None, PlanRequest())
    assert plan.n_gpu_layers == 0 and plan.gpu.total == 0 and plan.cap is None
    assert plan.notes == ("no NVIDIA GPU: the whole model runs on the CPU",)


def test_remembered_layers_and_fixed_layers(models):
    info = read_model_info(models["70b"])
    planned = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048)).n_gpu_layers
    known = Placement(planned - 3)
    remembered = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048, known=known))
    assert remembered.n_gpu_layers == planned - 3
    fixed = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048, gpu_layers=-1))
    assert fixed.n_gpu_layers == 81 and not fixed.fits


def test_ram_check(models):
    info = read_model_info(models["70b"])
    plan = make_plan(info, CARD_12G, PlanRequest(n_ctx=2048, ram_available=16 * GiB))
    assert not plan.ram_ok and "extremely slow" in plan.notes[-1]
    assert make_plan(info, CARD_12G, PlanRequest(n_ctx=2048, ram_available=64 * GiB)).ram_ok


def test_sliding_window_layers_hold_a_window_not_the_context():
    info = tiny_info(n_swa=1024, swa_layers=(True, True, True, True, True, False))
    kv = kv_layer_bytes(info, PlanRequest(n_ctx=16384))
    per_cell = 4 * 128 * 2 * 2
    assert kv[5] == 16384 * per_cell  # full attention: the whole context
    assert kv[0] == (1024 + 512) * per_cell  # pad256(window + ubatch)
    full = kv_layer_bytes(info, PlanRequest(n_ctx=16384, swa_full=True))
    assert full[0] == kv[5]


# --- accuracy against llama.cpp ------------------------------------------------------------------

ACCURACY = [(ctx, par) for ctx in (512, 2048, 8192) for par in (1, 4)]


@pytest.mark.model
def test_default_model_estimate_within_5_percent_of_a_real_load(default_model):
    """Load for real (n_seq_max = parallel) and read llama.cpp's log: KV and compute buffer."""
    info = read_model_info(default_model)
    rows = []
    for ctx, par in ACCURACY:
        spec = LoadSpec(
            engine="llama", model_path=str(default_model), n_ctx=ctx, n_gpu_layers=0, parallel=par
        )
        reported = dry_run(spec, allocate=True)
        assert not isinstance(reported, str), reported
        plan = make_plan(info, None, PlanRequest(n_ctx=ctx, parallel=par, flash_attn=False))
        rows.append(
            (
                ctx,
                par,
                plan.cpu.kv_cache,
                reported.kv_bytes,
                plan.cpu.compute_buffer,
                reported.compute["CPU"],
            )
        )
    print("\n  ctx par  KV predicted / reported   compute predicted / reported")
    for ctx, par, kv_p, kv_r, c_p, c_r in rows:
        print(
            f"{ctx:5} {par:3}  {format_bytes(kv_p)} / {format_bytes(kv_r)}   "
            f"{format_bytes(c_p)} / {format_bytes(c_r)}"
        )
        assert abs(kv_p - kv_r) <= 0.01 * MiB, (ctx, par)
        assert abs(c_p - c_r) <= 0.05 * c_r, (ctx, par)


@pytest.mark.parametrize(
    "shape", ["7b", "13b", "70b", "gpt-oss-120b", "qwen3-30b-a3b", "tiny-gpt-oss"]
)
@pytest.mark.parametrize("flash", [False, True])
def test_every_architecture_within_5_percent_of_llama_cpp_dry_run(models, shape, flash):
    """Dense llama, gpt-oss (MoE, sliding window, attention sinks), qwen3moe: KV exact (to
    llama.cpp's two-decimal MiB), the compute buffer within 5 %, at several contexts and
    sequence counts, sliding-window caches both ways."""
    info = read_model_info(models[shape])
    for ctx in (512, 2048, 8192):
        for parallel in (1, 4):
            for swa_full in (False, True) if info.n_swa else (False,):
                spec = LoadSpec(
                    engine="llama", model_path=str(models[shape]), n_ctx=ctx, n_gpu_layers=0,
                    flash_attn=flash, parallel=parallel, swa_full=swa_full,
                )  # fmt: skip
                result = dry_run(spec)
                assert not isinstance(result, str), result
                req = PlanRequest(n_ctx=ctx, parallel=parallel, flash_attn=flash, swa_full=swa_full)
                plan = make_plan(info, None, req)
                where = (shape, ctx, parallel, swa_full)
                assert abs(plan.cpu.kv_cache - result.kv_bytes) <= 0.011 * MiB, where
                assert abs(plan.cpu.compute_buffer - result.compute["CPU"]) <= (
                    0.05 * result.compute["CPU"]
                ), where


# --- NVML ----------------------------------------------------------------------------------------


def test_probe_with_a_fake_nvml():
    nvml = FakeNvml(
        [
            {
                "name": "NVIDIA RTX 3060",
                "uuid": "GPU-1",
                "total": 12 * GiB,
                "free": 11 * GiB,
                "processes": {"4242": 3 * GiB},
            }
        ]
    )
    found = probe(nvml)
    assert found.problem is None and found.driver == "550.00"
    (card,) = found.gpus
    assert (card.name, card.uuid, card.total, card.free, card.used) == (
        "NVIDIA RTX 3060",
        "GPU-1",
        12 * GiB,
        11 * GiB,
        1 * GiB,
    )
    assert process_vram(4242, "GPU-1", nvml) == 3 * GiB
    assert process_vram(1, "GPU-1", nvml) == 0


def test_no_driver_is_an_answer_not_an_error():
    found = probe(FakeNvml([], fail="NVML Shared Library Not Found"))
    assert found.gpus == [] and "no NVIDIA driver or GPU" in found.problem
    assert probe(FakeNvml([])).problem == "the NVIDIA driver reports no GPU"
    assert process_vram(1, "GPU-1", FakeNvml([], fail="x")) is None


# --- the command ---------------------------------------------------------------------------------


def test_plan_command_for_the_default_model_without_gpu(db_path, default_model):
    result = run_cli("plan", db_path=db_path, check=True)
    assert "layers    0 of 31 on the GPU (everything on the CPU)" in result.stdout
    assert "llama.cpp dry run: compute CPU" in result.stdout
    assert "GPU       none" in result.stdout


def test_plan_command_70b_json_on_a_planned_card(db_path, models):
    result = run_cli(
        "plan",
        str(models["70b"]),
        "--gpu-total",
        "12GiB",
        "--ctx",
        "2048",
        "--parallel",
        "1",
        "--json",
        db_path=db_path,
        check=True,
    )
    data = json.loads(result.stdout)
    expected = make_plan(read_model_info(models["70b"]), CARD_12G, PlanRequest(n_ctx=2048))
    assert data["plan"]["n_gpu_layers"] == expected.n_gpu_layers
    assert data["plan"]["gpu"]["total"] == expected.gpu.total
    assert data["gpu"]["total"] == 12 * GiB and data["model"]["layers"] == 80


def test_plan_command_with_a_fake_gpu_and_percent_cap(db_path, models):
    nvml = json.dumps([{"name": "NVIDIA RTX 3060", "total": 12 * GiB, "free": 11 * GiB}])
    result = run_cli(
        "plan",
        str(models["70b"]),
        "--vram-cap",
        "50%",
        "--no-dry-run",
        "--allow-swap",
        db_path=db_path,
        env={"EXECUTOR_FAKE_NVML": nvml},
        check=True,
    )
    assert "GPU       NVIDIA RTX 3060: 12.00 GiB total, 11.00 GiB free" in result.stdout
    assert "cap       6.00 GiB  (your cap)" in result.stdout


def test_plan_refuses_when_ram_is_short_unless_allowed(db_path, models):
    args = ("plan", str(models["70b"]), "--gpu-total", "12GiB", "--ram-total", "16GiB")
    refused = run_cli(*args, db_path=db_path)
    assert refused.returncode == 8 and "--allow-swap" in refused.stderr
    assert "NOT ENOUGH" in refused.stdout
    assert run_cli(*args, "--allow-swap", db_path=db_path).returncode == 0


def test_bad_cap_is_a_usage_error(db_path, models):
    result = run_cli("plan", str(models["7b"]), "--vram-cap", "12G", db_path=db_path)
    assert result.returncode == 2
    assert "--vram-cap: not a size: '12G'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cap_in_mib_is_meaningful():
    assert format_bytes(11.5 * GiB) == "11.50 GiB" and format_bytes(3 * MiB) == "3.0 MiB"
