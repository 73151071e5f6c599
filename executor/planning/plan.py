"""The VRAM-capped offload plan: a pure function from a model's tensor table and a card to a
placement of every tensor under a hard cap, stated in llama.cpp's terms (-ngl, -ot).

Order of placement, for a mixture-of-experts model (the 64 GB models people run on 12 GB cards):
  1. attention, norms, router and shared experts of *every* block, the output layer, the KV
     cache and the compute buffer on the GPU, routed experts in RAM: each token then reads
     only its few chosen experts from RAM, and the CPU never runs attention;
  2. then the routed experts of as many blocks as fit, from the last block down (llama.cpp's
     `--n-cpu-moe N` order: the experts of blocks 0…N-1 in RAM). Every block's experts cost
     the same to read, so which blocks get them does not change the speed; taking the last
     ones keeps the rule a contiguous range, equal to --n-cpu-moe, and the GPU-resident run
     ends at the output layer, like -ngl's;
  3. then part of one more block: its expert tensors one by one, up first, then gate (down
     goes to RAM first), as llama.cpp's fit does;
  if (1) does not fit, blocks leave the GPU whole from the lowest up, each keeping its
  experts in RAM (the dense-only layers of llama.cpp's fit).
For a dense model: whole layers from the last down, then one partial block (attention, KV and
some FFN matrices on the GPU, the rest in RAM). Unlike llama.cpp's `--fit`, which keeps a
margin from whatever is free, the cap here is a ceiling: the plan is the most that fits under
min(your cap, free VRAM − headroom), and the worker checks the real process against it.

The sizes of each part, as llama.cpp allocates them, are sizes.py's.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, replace
from typing import Any

from executor.gguf.info import BLOCK_CLASSES, CLASSES, EMBEDDING, EXPERTS, OUTPUT, ModelInfo
from executor.machine.gpu import Device
from executor.planning.placement import Placement, assign, candidates, first_gpu_block, rules
from executor.planning.sizes import (
    CUDA_RESERVE,
    FREE_HEADROOM,
    OS_RESERVE,
    PlanRequest,
    compute_bytes,
    kv_cells,
    kv_layer_bytes,
    ubatch_of,
)
from executor.units import format_bytes


@dataclass(frozen=True)
class Parts:
    """Bytes of each part of the model's footprint on one side (GPU or CPU)."""

    weights: dict[str, int]  # per tensor class (gguf_info.CLASSES)
    kv_cache: int = 0
    compute_buffer: int = 0
    cuda_reserve: int = 0
    output_buffer: int = 0
    correction: int = 0

    @property
    def layer_weights(self) -> int:
        return sum(self.weights.get(c, 0) for c in BLOCK_CLASSES)

    @property
    def output_layer(self) -> int:
        return self.weights.get(OUTPUT, 0)

    @property
    def token_embedding(self) -> int:
        return self.weights.get(EMBEDDING, 0)

    @property
    def total(self) -> int:
        return (
            sum(self.weights.values())
            + self.kv_cache
            + self.compute_buffer
            + self.cuda_reserve
            + self.output_buffer
            + self.correction
        )


@dataclass(frozen=True)
class Plan:
    """Where every tensor goes and what each side is predicted to hold."""

    placement: Placement
    rules: tuple[str, ...]  # llama.cpp -ot rules, in order
    max_layers: int  # n_layer + 1: everything on the GPU
    by_tensor: bool  # tensors were placed one by one (False: whole layers only)
    moe: bool
    device: Device | None
    cap: int | None  # the cap that applies, in bytes
    cap_reason: str
    gpu: Parts
    cpu: Parts
    n_ctx_seq: int
    n_ubatch: int
    kv_cells: int  # cells of a full-attention layer, all streams
    ram_available: int | None
    ram_ok: bool
    request: PlanRequest
    notes: tuple[str, ...] = ()

    @property
    def n_gpu_layers(self) -> int:
        return self.placement.n_gpu_layers

    @property
    def gpu_blocks(self) -> int:
        return max(self.n_gpu_layers - 1, 0)

    @property
    def output_on_gpu(self) -> bool:
        return self.n_gpu_layers >= 1

    @property
    def fits(self) -> bool:
        return self.cap is None or self.gpu.total <= self.cap

    def experts_on_gpu(self, model: ModelInfo) -> tuple[int, int] | None:
        """The blocks whose routed experts are all on the GPU, as (first, last); None: none."""
        if not self.moe or self.n_gpu_layers == 0:
            return None
        first = first_gpu_block(model, self.n_gpu_layers) + self.placement.cpu_experts
        if self.placement.partial_block is not None:
            first += 1
        return (first, model.n_layer - 1) if first < model.n_layer else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["n_gpu_layers"] = self.n_gpu_layers
        data["tensor_overrides"] = list(self.rules)
        data["gpu"]["total"] = self.gpu.total
        data["cpu"]["total"] = self.cpu.total
        data["fits"] = self.fits
        return data


# --- sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    """Per-block sums the search adds up (the final plan re-counts tensor by tensor)."""

    total: tuple[int, ...]
    movable: tuple[dict[str, int], ...]  # partial-able tensors per block (placement.movable)
    experts: tuple[int, ...]  # routed expert bytes per block
    largest: tuple[int, ...]  # the largest tensor per block
    largest_expert: tuple[int, ...]
    output: int


def _blocks(model: ModelInfo) -> _Blocks:
    from executor.planning.placement import movable

    n = model.n_layer
    total, experts, largest, largest_expert = [0] * n, [0] * n, [0] * n, [0] * n
    for t in model.tensors:
        if t.block is None:
            continue
        total[t.block] += t.n_bytes
        largest[t.block] = max(largest[t.block], t.n_bytes)
        if t.kind == EXPERTS:
            experts[t.block] += t.n_bytes
            largest_expert[t.block] = max(largest_expert[t.block], t.n_bytes)
    return _Blocks(
        tuple(total),
        tuple(movable(model, b) for b in range(n)),
        tuple(experts),
        tuple(largest),
        tuple(largest_expert),
        model.output_bytes,
    )


def _gpu_bytes(
    model: ModelInfo, req: PlanRequest, p: Placement, kv: list[int], blocks: _Blocks
) -> int:
    """The GPU total of a placement, from per-block sums (fast, for the search)."""
    k = p.n_gpu_layers
    if k == 0:
        return 0
    first = first_gpu_block(model, k)
    weights = blocks.output + sum(blocks.total[first:])
    staging = max(blocks.largest[:first], default=0)
    ram_expert_blocks = range(first, first + p.cpu_experts)
    for b in ram_expert_blocks:
        weights -= blocks.experts[b]
        staging = max(staging, blocks.largest_expert[b])
    if p.partial_block is not None:
        for base in p.partial_cpu:
            size = blocks.movable[p.partial_block].get(base, 0)
            weights -= size
            staging = max(staging, size)
    staging = staging if req.op_offload else 0
    compute = compute_bytes(model, req, layers=k > 1, output=True, staging=staging)
    return weights + sum(kv[first:]) + compute + CUDA_RESERVE + req.correction


def parts_for(
    model: ModelInfo, req: PlanRequest, p: Placement, kv: list[int], gpu_present: bool
) -> tuple[Parts, Parts, tuple[str, ...]]:
    """The GPU and CPU parts of a placement, tensor by tensor as llama.cpp assigns them, and
    the -ot rules that make it."""
    overrides = rules(model, p)
    placed = assign(model, p.n_gpu_layers, overrides)
    gpu_w, cpu_w = dict.fromkeys(CLASSES, 0), dict.fromkeys(CLASSES, 0)
    staging = 0
    for t in model.tensors:
        if placed[t.name]:
            gpu_w[t.kind] += t.n_bytes
        else:
            cpu_w[t.kind] += t.n_bytes
            if t.block is not None:
                staging = max(staging, t.n_bytes)
    if model.output_tied and p.n_gpu_layers >= 1:
        # A tied output layer on the GPU is a copy of the token embedding (TENSOR_DUPLICATED);
        # on the CPU it is the token embedding itself (the same mmap'd bytes).
        gpu_w[OUTPUT] += model.token_embd_bytes
    first = first_gpu_block(model, p.n_gpu_layers)
    k = p.n_gpu_layers
    on_gpu = k >= 1 and gpu_present
    gpu = Parts(
        weights=gpu_w,
        kv_cache=sum(kv[first:]) if k >= 1 else 0,
        compute_buffer=compute_bytes(
            model, req, layers=k > 1, output=True, staging=staging if req.op_offload else 0
        )
        if on_gpu
        else 0,
        cuda_reserve=CUDA_RESERVE if on_gpu else 0,
        correction=req.correction if on_gpu else 0,
    )
    cpu = Parts(
        weights=cpu_w,
        kv_cache=sum(kv[:first]),
        compute_buffer=compute_bytes(model, req, layers=first > 0, output=k == 0),
        output_buffer=model.n_vocab * 4 * req.parallel,
    )
    return gpu, cpu, overrides


# --- choosing --------------------------------------------------------------------------------


def best_placement(model: ModelInfo, req: PlanRequest, kv: list[int], cap: int | None) -> Placement:
    """The placement with the most on the GPU whose predicted footprint fits under `cap`."""
    by_tensor = req.by_tensor and not model.recurrent
    if cap is None:
        return Placement(model.n_layer + 1)
    blocks = _blocks(model)
    for p in candidates(model, by_tensor):
        if _gpu_bytes(model, req, p, kv, blocks) <= cap:
            return p
    return Placement(0)


def rank(model: ModelInfo, p: Placement, by_tensor: bool) -> int:
    """Position in the candidate order (0: everything on the GPU): to compare placements.
    A placement outside the order (a whole-layer one in a by-tensor order) is ranked by
    its GPU layers."""
    order = list(candidates(model, by_tensor))
    if p in order:
        return order.index(p)
    return next((i for i, c in enumerate(order) if c.n_gpu_layers <= p.n_gpu_layers), len(order))


def make_plan(model: ModelInfo, device: Device | None, req: PlanRequest) -> Plan:
    """Choose the placement with the most on the GPU whose footprint stays under the cap."""
    kv = kv_layer_bytes(model, req)
    max_layers = model.n_layer + 1
    by_tensor = req.by_tensor and not model.recurrent
    cap, cap_reason = applied_cap(device, req.vram_cap)
    notes: list[str] = []
    if model.n_swa and any(model.swa_layers):
        n_ctx_seq, _, swa = kv_cells(model, req)
        swa //= req.parallel
        layers = sum(model.swa_layers)
        notes.append(
            f"{layers} of {model.n_layer} layers use a {model.n_swa}-token sliding window: "
            + (
                "they keep the whole context (swa_full), so every shared prompt prefix "
                "can be reused"
                if req.swa_full
                else f"they hold {swa} cells per sequence, not {n_ctx_seq} (window + ubatch); "
                "a shared prompt prefix is reused only while it is in the window"
            )
        )
    if model.recurrent and req.by_tensor:
        notes.append(
            f"{model.architecture} is a recurrent or hybrid model: not planned at tensor "
            "level (whole layers), and its recurrent state is not counted as KV cache"
        )
    if device is None:
        placement = Placement(0)
        notes.append(f"{req.cpu_reason}: the whole model runs on the CPU")
    elif req.gpu_layers is not None:
        k = max_layers if req.gpu_layers < 0 else min(req.gpu_layers, max_layers)
        placement = Placement(k)
        notes.append(f"n_gpu_layers fixed at {k} by the settings (no tensor rules)")
        by_tensor = False
    else:
        placement = best_placement(model, req, kv, cap)
        known = req.known
        if known is not None and rank(model, known, by_tensor) > rank(model, placement, by_tensor):
            notes.append(
                f"at most {describe(model, known)}: what loaded and ran on this card before "
                "(or what is left after an out-of-memory); the estimate alone allows "
                f"{describe(model, placement)}"
            )
            placement = known
    gpu, cpu, overrides = parts_for(model, req, placement, kv, device is not None)
    n_ctx_seq, full_cells, _ = kv_cells(model, req)
    ram_ok = req.ram_available is None or cpu.total + OS_RESERVE <= req.ram_available
    plan = Plan(
        placement=placement,
        rules=overrides,
        max_layers=max_layers,
        by_tensor=by_tensor,
        moe=model.moe,
        device=device,
        cap=cap,
        cap_reason=cap_reason,
        gpu=gpu,
        cpu=cpu,
        n_ctx_seq=n_ctx_seq,
        n_ubatch=ubatch_of(req),
        kv_cells=full_cells,
        ram_available=req.ram_available,
        ram_ok=ram_ok,
        request=req,
    )
    if device is not None and req.gpu_layers is None:
        if notes and notes[-1].startswith("at most"):  # the ceiling binds, not the cap
            notes.extend(explain(model, replace(plan, cap=None), kv))
        else:
            notes.extend(explain(model, plan, kv))
    if not ram_ok:
        notes.append(
            f"RAM: the CPU part ({format_bytes(cpu.total)}) plus {format_bytes(OS_RESERVE)} for "
            f"the system does not fit in {format_bytes(req.ram_available)} available: the run "
            "would page from disk and be extremely slow"
        )
    return replace(plan, notes=tuple(notes))


def applied_cap(device: Device | None, user_cap: int | None) -> tuple[int | None, str]:
    """The smaller of the user's cap and the card's free memory minus a headroom."""
    if device is None:
        return None, "no GPU"
    usable = max(device.free - FREE_HEADROOM, 0)
    if user_cap is not None and user_cap <= usable:
        return user_cap, "your cap"
    if user_cap is not None:
        return usable, (
            f"free VRAM {format_bytes(device.free)} minus "
            f"{format_bytes(FREE_HEADROOM)} headroom is below your cap of "
            f"{format_bytes(user_cap)}"
        )
    return usable, (
        f"free VRAM {format_bytes(device.free)} minus "
        f"{format_bytes(FREE_HEADROOM)} headroom (no cap set)"
    )


def describe(model: ModelInfo, p: Placement) -> str:
    """`37 of 37 layers, routed experts of 5 blocks in RAM` / `22 of 81 layers`."""
    text = f"{p.n_gpu_layers} of {model.n_layer + 1} layers"
    if p.cpu_experts or p.partial_block is not None:
        text += f", routed experts of {p.cpu_experts} blocks in RAM"
        if p.partial_block is not None:
            text += f" and part of block {p.partial_block}'s"
    return text


def explain(model: ModelInfo, plan: Plan, kv: list[int]) -> list[str]:
    """Where the experts are, and why no more fit, with what would change it."""
    lines = []
    p = plan.placement
    if plan.moe and plan.by_tensor and p.n_gpu_layers:
        lines.append(expert_note(model, plan))
    if plan.cap is None or p == Placement(model.n_layer + 1):
        return lines
    req = plan.request
    blocks = _blocks(model)
    order = list(candidates(model, plan.by_tensor))
    here = order.index(p) if p in order else None
    if here is not None and here > 0:
        better = order[here - 1]
        need = _gpu_bytes(model, req, better, kv, blocks) - _gpu_bytes(model, req, p, kv, blocks)
        left = plan.cap - plan.gpu.total
        lines.append(f"the next step ({step_name(model, better)}) needs {format_bytes(need)} "
                     f"more; {format_bytes(max(left, 0))} is left under the cap")  # fmt: skip
    if p.n_gpu_layers == 0:
        alone = _gpu_bytes(model, req, Placement(1), kv, blocks)
        lines.append(
            f"even the output layer alone needs {format_bytes(alone)} on the GPU (with the "
            f"compute buffer and CUDA reserve); the cap is {format_bytes(plan.cap)}"
        )
    alternatives = []
    if req.n_ctx >= 512:
        kv_note = (
            f"KV cache at ctx {req.n_ctx} takes {format_bytes(plan.gpu.kv_cache)} on the GPU; "
            if plan.gpu.kv_cache
            else ""
        )
        alternatives.append(
            (f"{kv_note}at ctx {req.n_ctx // 2}", replace(req, n_ctx=req.n_ctx // 2))
        )
    if req.parallel > 1:
        alternatives.append(("at parallel 1", replace(req, parallel=1)))
    if req.cache_type_k == "f16" and plan.gpu.kv_cache:
        alternatives.append(
            ("with a q8_0 KV cache", replace(req, cache_type_k="q8_0", cache_type_v="q8_0"))
        )
    for label, other in alternatives:
        other = replace(other, known=None)
        gained = _gain(
            model, plan, best_placement(model, other, kv_layer_bytes(model, other), plan.cap)
        )
        if gained:
            lines.append(f"{label}, {gained}")
    return lines


def _gain(model: ModelInfo, plan: Plan, better: Placement) -> str:
    """What `better` puts on the GPU beyond the plan's placement, in words ('' if nothing)."""
    p = plan.placement
    layers = better.n_gpu_layers - p.n_gpu_layers
    if layers > 0:
        return f"{layers} more layer{'s' * (layers > 1)} fit"
    if plan.moe and plan.by_tensor and better.n_gpu_layers == p.n_gpu_layers:
        blocks = p.cpu_experts - better.cpu_experts
        if blocks > 0:
            return f"the experts of {blocks} more block{'s' * (blocks > 1)} fit"
    return ""


def step_name(model: ModelInfo, p: Placement) -> str:
    if p.partial_block is not None:
        return f"{'+'.join(sorted(set(_kept(model, p))))} of block {p.partial_block} on the GPU"
    if model.moe and p.n_gpu_layers == model.n_layer + 1:
        block = p.cpu_experts  # the lowest block whose experts are on the GPU
        return f"the experts of block {block}"
    return f"layer {p.n_gpu_layers}"


def _kept(model: ModelInfo, p: Placement) -> list[str]:
    from executor.planning.placement import movable

    assert p.partial_block is not None
    return [b for b in movable(model, p.partial_block) if b not in p.partial_cpu]


def expert_note(model: ModelInfo, plan: Plan) -> str:
    """`routed experts of blocks 31–35 on the GPU, of blocks 0–30 in RAM`."""
    on_gpu = plan.experts_on_gpu(model)
    first = first_gpu_block(model, plan.n_gpu_layers)
    if on_gpu is None:
        text = f"routed experts of every block in RAM (blocks {first}–{model.n_layer - 1})"
    elif on_gpu[0] == first:
        return "routed experts of every block on the GPU"
    else:
        ram_last = on_gpu[0] - 1
        text = (
            f"routed experts of blocks {on_gpu[0]}–{on_gpu[1]} on the GPU, "
            f"of blocks {first}–{ram_last} in RAM"
        )
    p = plan.placement
    if p.partial_block is not None:
        kept = _kept(model, p)
        text += (
            f"; block {p.partial_block} keeps {', '.join(kept)} on the GPU and "
            f"{', '.join(p.partial_cpu)} in RAM"
        )
    return text


# --- shrinking after an out-of-memory ------------------------------------------------------


def shrink(
    model: ModelInfo,
    req: PlanRequest,
    p: Placement,
    step: float,
    over: int = 0,
    by_tensor: bool = True,
) -> Placement | None:
    """Less on the GPU: routed experts before attention, then whole layers. One step drops
    `step` (a share, at least one) of the expert blocks on the GPU, or else of the GPU layers;
    with `over` (bytes measured above the cap) it goes on one unit at a time until the
    estimate has dropped by that much, and one unit more. None: nothing is left to drop."""
    by_tensor = by_tensor and req.by_tensor and not model.recurrent
    smaller = _shrink_once(model, p, step, by_tensor)
    if smaller is None or not over:
        return smaller
    kv = kv_layer_bytes(model, req)
    blocks = _blocks(model)
    start = _gpu_bytes(model, req, p, kv, blocks)
    while start - _gpu_bytes(model, req, smaller, kv, blocks) < over:
        nxt = _shrink_once(model, smaller, 0, by_tensor)
        if nxt is None:
            return smaller
        smaller = nxt
    return _shrink_once(model, smaller, 0, by_tensor) or smaller


def _shrink_once(model: ModelInfo, p: Placement, step: float, by_tensor: bool) -> Placement | None:
    n = model.n_layer
    if model.moe and by_tensor and p.n_gpu_layers == n + 1:
        partial = 1 if p.partial_block is not None else 0
        on_gpu = n - p.cpu_experts - partial  # blocks with all their experts on the GPU
        if on_gpu > 0 or partial:
            drop = max(1, math.ceil(on_gpu * step)) if on_gpu > 0 else 0
            return Placement(n + 1, min(n, p.cpu_experts + partial + drop))
    k = p.n_gpu_layers
    if k == 0:
        return None
    k = max(k - max(1, math.ceil(k * step)), 0)
    return Placement(k, max(k - 1, 0)) if model.moe and by_tensor else Placement(k)


# --- parallel sequences and llama.cpp's flags -------------------------------------------------

# Measured on 2 CPU cores with the default model (benchmarks/throughput.py): completion
# tokens/s 61, 91, 114 and 125 at parallel 1, 2, 4 and 8. Past 8 the gain flattens while each
# sequence adds a whole context of KV cache.
GPU_PARALLEL_CHOICES = (16, 8, 4, 2)


def choose_parallel(info: ModelInfo, device: Device | None, single: PlanRequest) -> int | None:
    """`--parallel auto` on a GPU: the most sequences whose KV cache fits under the cap
    without moving a single layer or expert block off the GPU. None when the model runs on
    the CPU: there the choice is measured (executor.engine.decode_rates)."""
    if device is None:
        return None
    base = make_plan(info, device, single)
    if base.n_gpu_layers == 0:
        return None
    by_tensor = base.by_tensor
    here = rank(info, base.placement, by_tensor)
    for parallel in GPU_PARALLEL_CHOICES:
        plan = make_plan(info, device, replace(single, parallel=parallel))
        if rank(info, plan.placement, by_tensor) <= here and plan.fits:
            return parallel
    return 1


def most_parallel_in_ram(info: ModelInfo, single: PlanRequest, most: int) -> int:
    """The most sequences (≤ `most`) whose KV cache and buffers still fit in RAM."""
    n = most
    while n > 1 and not make_plan(info, None, replace(single, parallel=n)).ram_ok:
        n //= 2
    return n


def llama_args(plan: Plan, threads: int | None = None) -> list[str]:
    """llama-server / llama-cli flags that load the model as this plan does."""
    req = plan.request
    args = ["-ngl", str(plan.n_gpu_layers)]
    for rule in plan.rules:
        args += ["-ot", rule]
    args += ["-c", str(req.n_ctx * req.parallel), "-np", str(req.parallel)]
    args += ["-b", str(max(req.n_batch, req.n_ubatch)), "-ub", str(plan.n_ubatch)]
    args += ["-fa", "on" if req.flash_attn else "off"]
    if req.cache_type_k != "f16" or req.cache_type_v != "f16":
        args += ["-ctk", req.cache_type_k, "-ctv", req.cache_type_v]
    if req.swa_full:
        args.append("--swa-full")
    if req.parallel > 1:
        args.append("--no-kv-unified")  # one KV stream per sequence, as executor runs them
    if not req.op_offload or plan.n_gpu_layers == 0:
        args.append("--no-op-offload")
    if threads:
        args += ["-t", str(threads), "-tb", str(threads)]
    args += ["--fit", "off"]  # the plan is the fit; llama.cpp must not second-guess it
    return args


def llama_args_line(plan: Plan, threads: int | None = None) -> str:
    return shlex.join(llama_args(plan, threads))
