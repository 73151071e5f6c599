"""Placement by tensor: MoE shapes on a 12 GiB card by hand, llama.cpp's -ot rules applied as
llama.cpp applies them, the shrink order, and the flags that reproduce a plan."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shlex
from pathlib import Path

import pytest

from executor.engine.probes import dry_run
from executor.engine.protocol import LoadSpec
from executor.gguf.info import EXPERTS, read_model_info
from executor.machine.gpu import Device
from executor.planning.placement import Placement, assign, candidates, int_range_regex
from executor.planning.plan import (
    _blocks,
    _gpu_bytes,
    llama_args,
    make_plan,
    shrink,
)
from executor.planning.sizes import (
    GiB,
    MiB,
    PlanRequest,
    kv_layer_bytes,
)
from tests.helpers import run_cli, tiny_info
from tests.synthetic_gguf import write_llama_gguf, write_moe_gguf

CARD_12G = Device(name="12 GiB card", uuid="GPU-test", total=12 * GiB, free=12 * GiB)
AT_8K = PlanRequest(n_ctx=8192, n_ubatch=512)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe")
    return {
        "gpt-oss-120b": write_moe_gguf(folder / "gpt-oss-120b.gguf", "gpt-oss-120b"),
        "qwen3-30b-a3b": write_moe_gguf(folder / "qwen3-30b-a3b.gguf", "qwen3-30b-a3b"),
        "llama3-70b": write_llama_gguf(folder / "llama3-70b.gguf", "llama3-70b", quant="Q5_K_M"),
    }


def test_the_shapes_are_the_published_files(moe):
    gpt = read_model_info(moe["gpt-oss-120b"])
    assert 63.0e9 < gpt.file_size < 63.6e9  # gpt-oss-120b-mxfp4.gguf: 63.4 GB
    assert (gpt.n_layer, gpt.n_expert, gpt.n_expert_used, gpt.n_swa) == (36, 128, 4, 128)
    assert gpt.swa_layers[:4] == (True, False, True, False)  # every other layer slides
    qwen = read_model_info(moe["qwen3-30b-a3b"])
    assert (qwen.n_layer, qwen.n_expert, qwen.n_expert_used, qwen.n_ff_exp) == (48, 128, 8, 768)
    assert 49.5e9 < read_model_info(moe["llama3-70b"]).file_size < 50.5e9  # Q5_K_M: 49.9 GB


def test_tensor_classes_of_gpt_oss(moe):
    info = read_model_info(moe["gpt-oss-120b"])
    kinds = {t.name: t.kind for t in info.tensors if t.block == 0}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.0.attn_sinks.weight"] == "attention"
    assert kinds["blk.0.post_attention_norm.weight"] == "attention"
    assert kinds["blk.0.ffn_gate_inp.weight"] == kinds["blk.0.ffn_gate_inp.bias"] == "router"
    assert kinds["blk.0.ffn_up_exps.weight"] == kinds["blk.0.ffn_down_exps.bias"] == EXPERTS
    classes = info.class_bytes()
    expert = 128 * 2880 * 2880 * 17 // 32  # MXFP4: 17 bytes per 32 weights
    assert classes[EXPERTS] == 36 * 3 * (expert + 2880 * 128 * 4)  # weights and biases
    assert sum(classes.values()) - classes["output"] + 586.82 * MiB == pytest.approx(
        info.weights_bytes, rel=1e-4
    )


def test_gpt_oss_120b_on_a_12_gib_card_at_ctx_8192_by_hand(moe):
    """gpt-oss-120b (36 blocks of 128 MXFP4 experts) on a 12 GiB card, ctx 8192, ubatch 512.

    Cap: 12 GiB − 256 MiB headroom = 12032 MiB. On the GPU whatever happens: the attention of
    all 36 blocks (q and o 2880×4096 Q8_0, 11.953 MiB each; k and v 2880×512, 1.494 MiB each;
    norms, biases and sinks 0.053 MiB: 26.947 MiB a block, 970.10 MiB), the routers (1.406
    MiB + bias: 50.64 MiB), the output layer (2880×201088 Q8_0 + norm: 586.83 MiB), the KV
    cache (18 full layers × 8192 cells × 8 KV heads × 64 × (2 + 2) B = 16 MiB each; 18 sliding
    layers hold pad256(128 + 512) = 768 cells, 1.5 MiB each: 315 MiB), the compute buffer (the
    logits 201088 × 512 × 4 B = 392.75 MiB, two hidden states 11.25 MiB and the last block's
    expert activations 4 × 2880 × 512 × 4 B = 22.5 MiB, plus one expert tensor staged from RAM,
    537.89 MiB: 964.39 MiB) and the CUDA reserve (512 MiB): 3398.96 MiB, leaving 8633.04 MiB.
    A block's routed experts are 3 × (537.891 + 1.406 bias) = 1617.89 MiB: five blocks take
    8089.46 MiB, 543.58 MiB is left; the sixth block's ffn_up_exps (539.30 MiB) fits, its
    ffn_gate_exps does not. So: experts of blocks 31–35 on the GPU, block 30 keeps its up
    experts, blocks 0–29 keep theirs in RAM; 12027.72 MiB on the GPU.
    """
    info = read_model_info(moe["gpt-oss-120b"])
    plan = make_plan(info, CARD_12G, AT_8K)
    assert plan.placement == Placement(37, 30, 30, ("ffn_down_exps", "ffn_gate_exps"))
    assert plan.rules == (
        r"blk\.30\.(ffn_down_exps|ffn_gate_exps)=CPU",
        r"blk\.(\d|[12]\d)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU",
    )
    gpu = plan.gpu
    assert gpu.weights["attention"] == pytest.approx(970.10 * MiB, abs=0.01 * MiB)
    assert gpu.weights["router"] == pytest.approx(50.64 * MiB, abs=0.01 * MiB)
    assert gpu.weights["output"] == pytest.approx(586.83 * MiB, abs=0.01 * MiB)
    expert, bias = 128 * 2880 * 2880 * 17 // 32, 2880 * 128 * 4  # MXFP4 tensor, f32 bias
    assert gpu.weights[EXPERTS] == 5 * 3 * (expert + bias) + expert + bias
    assert gpu.kv_cache == 315 * MiB
    assert gpu.compute_buffer == pytest.approx(964.39 * MiB, abs=0.01 * MiB)
    assert gpu.total == pytest.approx(12027.72 * MiB, abs=0.01 * MiB) and plan.fits
    assert plan.cpu.weights[EXPERTS] == info.class_bytes()[EXPERTS] - gpu.weights[EXPERTS]
    assert plan.cpu.weights["attention"] == 0 and plan.cpu.kv_cache == 0
    assert plan.experts_on_gpu(info) == (31, 35)
    assert plan.notes[1].startswith("routed experts of blocks 31–35 on the GPU, of blocks 0–30")
    assert "block 30 keeps ffn_up_exps on the GPU" in plan.notes[1]


def test_qwen3_30b_a3b_on_a_12_gib_card_at_ctx_8192_by_hand(moe):
    """Qwen3-30B-A3B at Q4_K_M (48 blocks of 128 experts: gate/up Q4_K 108 MiB, down Q6_K
    157.5 MiB) on a 12 GiB card, ctx 8192, ubatch 512.

    Fixed on the GPU: attention 486.42 MiB, FFN norms 0.38, routers 48, output layer 243.44
    (2048×151936 Q6_K + norm), KV 48 × 8192 × 4 × 128 × 4 B = 768 MiB, compute 296.75 (logits)
    + 8 (hidden) + 12 (expert activations 8 × 768 × 512 × 4 B) + 157.5 staged (the largest
    expert tensor, a Q6_K ffn_down_exps) = 474.25, CUDA reserve 512: 2532.49 MiB of 12032.
    A block's experts are 373.5 MiB: 25 blocks take 9337.5 of the 9499.51 MiB left; block
    22's ffn_up_exps (108 MiB) fits in the 162.01 MiB after them, its ffn_gate_exps does not.
    """
    info = read_model_info(moe["qwen3-30b-a3b"])
    plan = make_plan(info, CARD_12G, AT_8K)
    assert plan.placement == Placement(49, 22, 22, ("ffn_down_exps", "ffn_gate_exps"))
    assert plan.rules[1] == r"blk\.(\d|1\d|2[01])\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"
    assert plan.gpu.weights[EXPERTS] == (25 * 373.5 + 108) * MiB
    assert plan.gpu.compute_buffer == pytest.approx(474.25 * MiB, abs=0.01 * MiB)
    assert plan.gpu.total == pytest.approx((12032 - 54.01) * MiB, abs=0.02 * MiB)
    assert plan.experts_on_gpu(info) == (23, 47)


def test_when_the_dense_part_does_not_fit_blocks_leave_whole_with_experts_in_ram(moe):
    info = read_model_info(moe["gpt-oss-120b"])
    small = Device(name="3 GiB", uuid="s", total=3 * GiB, free=3 * GiB)
    plan = make_plan(info, small, AT_8K)
    k = plan.n_gpu_layers
    assert 1 < k < info.n_layer + 1
    assert plan.placement == Placement(k, k - 1)  # every GPU block's experts in RAM
    assert plan.gpu.weights[EXPERTS] == 0 and plan.gpu.total <= plan.cap
    bigger = _gpu_bytes(
        info, AT_8K, Placement(k + 1, k), kv_layer_bytes(info, AT_8K), _blocks(info)
    )
    assert bigger > plan.cap


def test_placing_by_layer_is_worse_for_moe(moe):
    """Whole layers put 6 of 37 layers on the card and leave 30 blocks' attention to the
    CPU; by tensor every block's attention and 5 blocks' experts are on the GPU."""
    info = read_model_info(moe["gpt-oss-120b"])
    by_layer = make_plan(info, CARD_12G, PlanRequest(n_ctx=8192, n_ubatch=512, by_tensor=False))
    by_tensor = make_plan(info, CARD_12G, AT_8K)
    assert by_layer.rules == () and by_layer.n_gpu_layers < 10
    assert by_layer.cpu.weights["attention"] > 0 and by_tensor.cpu.weights["attention"] == 0
    assert by_tensor.gpu.weights[EXPERTS] > by_layer.gpu.weights[EXPERTS] - 2 * GiB


@pytest.mark.parametrize("shape", ["gpt-oss-120b", "qwen3-30b-a3b", "llama3-70b"])
def test_rules_give_what_the_search_counted(moe, shape):
    """For every candidate placement: llama.cpp's rule semantics (assign) and the search's
    per-block sums agree to the byte."""
    info = read_model_info(moe[shape])
    kv = kv_layer_bytes(info, AT_8K)
    blocks = _blocks(info)
    from executor.planning.plan import parts_for

    for p in list(candidates(info, True))[::3]:
        gpu, _, _ = parts_for(info, AT_8K, p, kv, True)
        assert gpu.total == _gpu_bytes(info, AT_8K, p, kv, blocks), p


def test_llama_cpp_applies_the_rules_as_planned(moe, tmp_path):
    """llama.cpp itself (a no_alloc load with the plan's -ot rules) moves exactly the tensors
    the plan puts in RAM among the GPU layers, and no other."""
    info = read_model_info(moe["gpt-oss-120b"])
    plan = make_plan(info, CARD_12G, AT_8K)
    spec = LoadSpec(
        engine="llama", model_path=str(moe["gpt-oss-120b"]), n_ctx=1024,
        n_gpu_layers=plan.n_gpu_layers,
        tensor_overrides=tuple(tuple(r.rsplit("=", 1)) for r in plan.rules),  # type: ignore
    )  # fmt: skip
    result = dry_run(spec)
    assert not isinstance(result, str), result
    placed = assign(info, plan.n_gpu_layers, plan.rules)
    in_ram = {t.name for t in info.tensors if not placed[t.name] and t.block is not None}
    assert set(result.overridden) == in_ram
    assert set(result.overridden.values()) == {"CPU"}
    assert len(in_ram) == 30 * 6 + 4  # 30 blocks × 3 experts (weights + biases), block 30's 2


def test_int_range_regex_matches_exactly_the_range():
    for lo in range(0, 120):
        for hi in range(lo, 120):
            pattern = re.compile(rf"blk\.({int_range_regex(lo, hi)})\.x")
            found = {i for i in range(1000) if pattern.search(f"blk.{i}.x")}
            assert found == set(range(lo, hi + 1)), (lo, hi)
    rng = random.Random(3)
    for _ in range(200):
        lo = rng.randrange(1000)
        hi = rng.randrange(lo, 1000)
        pattern = re.compile(rf"blk\.({int_range_regex(lo, hi)})\.x")
        assert {i for i in range(1100) if pattern.search(f"blk.{i}.x")} == set(range(lo, hi + 1))
    assert "," not in "".join(int_range_regex(0, n) for n in range(400))  # -ot splits at commas


def test_rules_are_first_match_wins():
    from executor.gguf.info import TensorInfo

    info = tiny_info(
        tensors=(
            TensorInfo("blk.0.ffn_up_exps.weight", 0, EXPERTS, 10),
            TensorInfo("blk.1.ffn_up_exps.weight", 1, EXPERTS, 10),
        ),
        n_layer=2,
    )
    placed = assign(info, 3, (r"blk\.0\.=CUDA0", r"ffn_up_exps=CPU"))
    assert placed == {"blk.0.ffn_up_exps.weight": True, "blk.1.ffn_up_exps.weight": False}


def test_shrinking_takes_experts_before_attention(moe):
    info = read_model_info(moe["gpt-oss-120b"])
    p = Placement(37)
    seen = []
    while p is not None:
        seen.append(p)
        p = shrink(info, AT_8K, p, 0.1)
    in_ram = [q.cpu_experts for q in seen if q.n_gpu_layers == 37]
    assert in_ram[0] == 0 and in_ram[-1] == 36  # then no expert is left on the GPU
    for before, after in itertools.pairwise(in_ram):
        assert after - before == max(1, math.ceil(0.1 * (36 - before)))  # 10 %, at least 1
    layer_steps = [q.n_gpu_layers for q in seen if q.n_gpu_layers < 37]
    assert layer_steps == sorted(layer_steps, reverse=True) and layer_steps[-1] == 0
    # From a partial block, the first step gives up the partial block too.
    partial = Placement(37, 30, 30, ("ffn_down_exps", "ffn_gate_exps"))
    assert shrink(info, AT_8K, partial, 0.1) == Placement(37, 32)


def test_shrinking_by_a_measured_overshoot(moe):
    info = read_model_info(moe["gpt-oss-120b"])
    start = Placement(37, 30)
    kv, blocks = kv_layer_bytes(info, AT_8K), _blocks(info)
    smaller = shrink(info, AT_8K, start, 0.1, over=2 * GiB)
    assert smaller is not None
    freed = _gpu_bytes(info, AT_8K, start, kv, blocks) - _gpu_bytes(
        info, AT_8K, smaller, kv, blocks
    )
    assert freed >= 2 * GiB + 1600 * MiB  # the overshoot, and one expert block more


def test_llama_args_reproduce_the_plan(moe):
    info = read_model_info(moe["gpt-oss-120b"])
    plan = make_plan(
        info, CARD_12G, PlanRequest(n_ctx=8192, parallel=2, n_ubatch=1024, n_batch=1024)
    )
    args = llama_args(plan, threads=8)
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert args[:2] == ["-ngl", "37"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "-ot"] == list(plan.rules)
    assert pairs["-c"] == "16384" and pairs["-np"] == "2" and pairs["-ub"] == "1024"
    assert "--no-kv-unified" in args and args[-2:] == ["--fit", "off"]
    assert args[args.index("-fa") : args.index("-fa") + 2] == ["-fa", "on"]
    swa = make_plan(info, CARD_12G, PlanRequest(n_ctx=8192, swa_full=True))
    assert "--swa-full" in llama_args(swa)


def test_plan_command_json_and_llama_args(moe, db_path):
    model = str(moe["gpt-oss-120b"])
    flags = ("--gpu-total", "12GiB", "--ctx", "8192", "--ubatch", "512", "--allow-swap")
    data = json.loads(run_cli("plan", model, *flags, "--json", db_path=db_path, check=True).stdout)
    assert data["plan"]["n_gpu_layers"] == 37
    assert data["plan"]["tensor_overrides"][1].startswith(r"blk\.(\d|[12]\d)\.ffn_")
    assert data["model"]["weights_by_class"][EXPERTS] > 60 * 10**9
    line = run_cli("plan", model, *flags, "--llama-args", db_path=db_path, check=True).stdout
    assert shlex.split(line)[:4] == ["-ngl", "37", "-ot", data["plan"]["tensor_overrides"][0]]
    table = run_cli("plan", model, *flags, db_path=db_path, check=True).stdout
    assert "routed experts of blocks 31–35 on the GPU, of blocks 0–30 in RAM" in table
    for label in ("attention", "router", "routed experts", "output layer", "token embedding"):
        assert re.search(rf"^{label}\s+\S+ \S+\s+\S+", table, re.M), label
    short = run_cli(
        "plan", model, "-ngl", "10", "-c", "4096", "-ub", "512", "--gpu-total", "12GiB",
        "--allow-swap", "--llama-args", db_path=db_path, check=True,
    )  # fmt: skip
    assert shlex.split(short.stdout)[:2] == ["-ngl", "10"] and "-ot" not in short.stdout


def test_more_weights_on_the_card_than_llama_cpp_fit(moe):
    """benchmarks/placement.py's comparison, as a check: on a 12 GiB card executor puts at
    least as many weight bytes on the GPU as llama.cpp's fit would, for both shapes, and
    uses at least 90 % of its cap."""
    from benchmarks.placement import fit_cpp, footprint

    for shape in ("gpt-oss-120b", "llama3-70b"):
        info = read_model_info(moe[shape])
        plan = make_plan(info, CARD_12G, AT_8K)
        ours = footprint(info, AT_8K, plan.n_gpu_layers, plan.rules)
        theirs = fit_cpp(info, AT_8K, 12 * GiB)
        assert sum(ours["weights"].values()) >= sum(theirs["weights"].values()), shape
        assert plan.gpu.total >= 0.9 * plan.cap, shape
