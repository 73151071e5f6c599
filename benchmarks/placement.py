"""Placement on 8, 12, 16 and 24 GiB cards: executor's plan beside what llama.cpp's own fit
(common/fit.cpp, on by default since early 2026 and what Ollama runs) chooses for the same card.

    .venv/bin/python benchmarks/placement.py [--ctx 8192]

Models: a gpt-oss-120b-shaped file (36 blocks of 128 MXFP4 experts, 63 GB) and a
Llama-3.3-70B Q5_K_M-shaped one (80 dense blocks, 50 GB), sparse headers written here.

Both sides are costed with the same per-tensor accounting (executor.planning.plan: weights by the
tensor table, KV cache, compute buffer with the staged RAM weight), so the table compares the
algorithms, not two estimators. fit.cpp's steps for one GPU, as the vendored source has them:
  1. keep a margin of 1 GiB free (fit_params_target);
  2. MoE: place "dense-only" layers back to front by false position: all routed experts in RAM
     except those of the lowest GPU layer (set_ngl_tensor_split_tbo counts the output layer
     as the one full layer, at the front); dense: whole layers back to front, nothing partial;
  3. MoE, if every dense part fits: convert layers to full ones front to back (the experts of
     the FIRST blocks come onto the GPU), then try one more partial layer: up on the GPU
     (LAYER_FRACTION_UP), then up and gate (LAYER_FRACTION_GATE).
executor: everything but routed experts, then experts of the LAST blocks, then one partial
block, under min(cap, free − 256 MiB) with a 512 MiB CUDA reserve counted (fit's margin
covers the CUDA context instead).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.gguf.info import EXPERTS, ModelInfo, read_model_info  # noqa: E402
from executor.machine.gpu import Device  # noqa: E402
from executor.planning.placement import EXPERT_PATTERN, assign, first_gpu_block  # noqa: E402
from executor.planning.plan import make_plan  # noqa: E402
from executor.planning.sizes import (  # noqa: E402
    CUDA_RESERVE,
    GiB,
    PlanRequest,
    compute_bytes,
    kv_layer_bytes,
)
from tests.synthetic_gguf import write_llama_gguf, write_moe_gguf  # noqa: E402

FIT_MARGIN = 1 * GiB


def footprint(model: ModelInfo, req: PlanRequest, ngl: int, rules: tuple[str, ...]) -> dict:
    """GPU bytes of a layout given as llama.cpp flags, without the CUDA reserve."""
    placed = assign(model, ngl, rules)
    kv = kv_layer_bytes(model, req)
    first = first_gpu_block(model, ngl)
    weights: dict[str, int] = {}
    staging = 0
    for t in model.tensors:
        if placed[t.name]:
            weights[t.kind] = weights.get(t.kind, 0) + t.n_bytes
        elif t.block is not None:
            staging = max(staging, t.n_bytes)
    if model.output_tied and ngl >= 1:
        weights["output"] = weights.get("output", 0) + model.token_embd_bytes
    compute = compute_bytes(model, req, layers=ngl > 1, output=True, staging=staging) if ngl else 0
    total = sum(weights.values()) + (sum(kv[first:]) if ngl else 0) + compute
    return {"weights": weights, "total": total, "rules": rules, "ngl": ngl}


def _moe_rules(model: ModelInfo, ngl: int, full: int, extra: str = "") -> tuple[str, ...]:
    """fit.cpp's overrides: of the GPU layers, the first `full` keep their experts; the rest
    (the output 'layer' included, which matches nothing) send them to RAM; `extra` names the
    overflow of the first partial layer (up / gate), as LAYER_FRACTION_UP / _GATE do."""
    il0 = model.n_layer + 1 - ngl + full
    rules = []
    for il in range(il0, model.n_layer + 1):
        if il == il0 and extra == "up":
            rules.append(rf"blk\.{il}\.ffn_(gate|gate_up|down).*=CPU")
        elif il == il0 and extra == "gate":
            rules.append(rf"blk\.{il}\.ffn_down.*=CPU")
        else:
            rules.append(rf"blk\.{il}\.{EXPERT_PATTERN}=CPU")
    return tuple(rules)


def fit_cpp(model: ModelInfo, req: PlanRequest, free: int) -> dict:
    """What llama.cpp's fit chooses on one GPU with `free` bytes (see the module docstring)."""
    target = free - FIT_MARGIN
    n = model.n_layer
    if footprint(model, req, n + 1, ())["total"] <= target:
        return footprint(model, req, n + 1, ())
    if not model.moe:
        best = footprint(model, req, 0, ())
        for ngl in range(1, n + 2):  # false position converges to the largest that fits
            layout = footprint(model, req, ngl, ())
            if layout["total"] <= target:
                best = layout
        return best
    best = footprint(model, req, 0, ())
    for ngl in range(1, n + 2):
        layout = footprint(model, req, ngl, _moe_rules(model, ngl, 1))
        if layout["total"] <= target:
            best = layout
    if best["ngl"] < n + 1:
        return best
    for full in range(1, n + 1):
        layout = footprint(model, req, n + 1, _moe_rules(model, n + 1, full))
        if layout["total"] > target:
            break
        best = layout
    full = _full_layers(model, best)
    for extra in ("up", "gate"):
        layout = footprint(model, req, n + 1, _moe_rules(model, n + 1, full, extra))
        if layout["total"] < target:
            best = layout
    return best


def _full_layers(model: ModelInfo, layout: dict) -> int:
    placed = assign(model, layout["ngl"], layout["rules"])
    return sum(
        1
        for b in range(model.n_layer)
        if all(placed[t.name] for t in model.tensors if t.block == b and t.kind == EXPERTS)
    )


def expert_blocks(model: ModelInfo, ngl: int, rules: tuple[str, ...]) -> str:
    """MoE: the blocks whose experts are on the GPU; dense: the partial block, if any."""
    placed = assign(model, ngl, rules)
    if not model.moe:
        part = {t.block for t in model.tensors if t.block is not None and not placed[t.name]}
        first = first_gpu_block(model, ngl)
        split = sorted(b for b in part if b >= first)
        return f"block {split[0]} in part" if split else "-"
    full, part = [], []
    for b in range(model.n_layer):
        on = [placed[t.name] for t in model.tensors if t.block == b and t.kind == EXPERTS]
        if all(on):
            full.append(b)
        elif any(on):
            part.append(b)
    text = f"{len(full)}" + (f" ({_span(full)})" if full else "")
    return text + (f" + part of {part[0]}" if part else "")


def _span(blocks: list[int]) -> str:
    return f"{blocks[0]}–{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--cards", default="8,12,16,24")
    args = parser.parse_args()
    req = PlanRequest(n_ctx=args.ctx, n_ubatch=512)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "gpt-oss-120b (MXFP4, 63 GB)": write_moe_gguf(Path(tmp) / "g.gguf", "gpt-oss-120b"),
            "Llama-3.3-70B Q5_K_M (50 GB)": write_llama_gguf(
                Path(tmp) / "l.gguf", "llama3-70b", quant="Q5_K_M"
            ),
        }
        print(f"ctx {args.ctx}, 1 sequence, ubatch 512, flash attention; GiB on the GPU\n")
        header = (
            f"{'model':30} {'card':>5} | {'executor: layers':>16} {'experts / part':>18} "
            f"{'attn':>5} {'experts/ffn':>11} {'total':>6} {'of cap':>6} | "
            f"{'fit.cpp: layers':>15} {'experts / part':>18} {'attn':>5} {'experts/ffn':>11} "
            f"{'total':>6} | weights ×"
        )
        print(header)
        print("-" * len(header))
        for name, path in files.items():
            model = read_model_info(path)
            for card in (int(c) for c in args.cards.split(",")):
                device = Device(f"{card} GiB", "bench", card * GiB, card * GiB)
                plan = make_plan(model, device, req)
                ours = footprint(model, req, plan.n_gpu_layers, plan.rules)
                theirs = fit_cpp(model, req, card * GiB)
                big = EXPERTS if model.moe else "ffn"
                ours_w = sum(ours["weights"].values())
                theirs_w = sum(theirs["weights"].values())
                print(
                    f"{name:30} {card:>5} | {plan.n_gpu_layers:>16} "
                    f"{expert_blocks(model, plan.n_gpu_layers, plan.rules):>18} "
                    f"{ours['weights'].get('attention', 0) / GiB:>5.2f} "
                    f"{ours['weights'].get(big, 0) / GiB:>11.2f} "
                    f"{(ours['total'] + CUDA_RESERVE) / GiB:>6.2f} "
                    f"{(ours['total'] + CUDA_RESERVE) / plan.cap:>6.0%} | "
                    f"{theirs['ngl']:>15} "
                    f"{expert_blocks(model, theirs['ngl'], theirs['rules']):>18} "
                    f"{theirs['weights'].get('attention', 0) / GiB:>5.2f} "
                    f"{theirs['weights'].get(big, 0) / GiB:>11.2f} "
                    f"{theirs['total'] / GiB:>6.2f} | {ours_w / max(theirs_w, 1):.2f}"
                )
        print(
            "\n'of cap': executor's GPU total (with its 512 MiB CUDA reserve) over its cap "
            "(free − 256 MiB).\nfit.cpp's total has no CUDA reserve; it keeps 1 GiB free instead."
            "\n'weights ×': bytes of weights on the GPU, executor over fit.cpp."
        )


if __name__ == "__main__":
    main()
