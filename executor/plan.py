"""The VRAM-capped offload plan: a pure function from a model's shape and a card to a layout.

It follows what llama.cpp (the version llama-cpp-python vendors) allocates:

- Placement (llama-model.cpp, load_tensors): `n_gpu_layers = k` puts the output layer and
  the last k-1 repeating blocks on the GPU (the output layer counts as one layer and goes
  first); the token embedding always stays on the CPU. k ranges over 0 … n_layer + 1.
- KV cache (llama-kv-cache.cpp): per layer, cells × KV heads × (key + value length) × bytes
  per element, on the layer's device. The context is padded to 256; with P parallel sequences
  each sequence gets its own stream of n_ctx_seq cells. Sliding-window layers hold
  pad256(min(n_ctx_seq, n_swa + n_ubatch)) cells per stream unless swa_full.
- Compute buffer (llama-context.cpp reserves the worst-case prompt graph of n_ubatch tokens):
  the largest of the output phase (logits: n_vocab × n_ubatch × 4 bytes, plus two hidden
  states), the attention phase (without flash attention the KQ matrix: heads × n_kv ×
  n_ubatch × 4) and the FFN phase (3 × n_ff × n_ubatch × 4), the last two plus the KQ mask,
  on each device that holds layers. With op offload, a partly offloaded model also stages one
  CPU weight at a time on the GPU (ggml-backend starts a split per offloaded weight).

`tests/test_plan.py` checks these against llama.cpp's own numbers (its dry run and its load
log) for the default model and for 7B/13B/70B-shaped synthetic headers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from executor.gguf_info import ModelInfo
from executor.gpu import Device
from executor.units import format_bytes

MiB = 2**20
GiB = 2**30
CUDA_RESERVE = 512 * MiB  # CUDA context, cuBLAS workspace and pools of the model process
FREE_HEADROOM = 256 * MiB  # left free on the card for the driver and other processes
OS_RESERVE = 1 * GiB  # system RAM the operating system keeps for itself
# Bytes per element of each KV cache type: ggml block size / elements per block.
KV_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}


def pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class PlanRequest:
    """How the model will be run."""

    n_ctx: int = 4096  # tokens per sequence
    parallel: int = 1  # sequences decoded together
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    swa_full: bool = False
    op_offload: bool = True
    vram_cap: int | None = None  # the user's cap in bytes (None: free VRAM is the limit)
    gpu_layers: int | None = None  # a fixed n_gpu_layers (the plan only reports on it)
    correction: int = 0  # bytes measured beyond the estimate on this model/card before
    known_layers: int | None = None  # a layer count remembered to have worked here
    ram_available: int | None = None  # system RAM available (None: not checked)


@dataclass(frozen=True)
class Parts:
    """Bytes of each part of the model's footprint on one side (GPU or CPU)."""

    layer_weights: int = 0
    output_layer: int = 0
    token_embedding: int = 0
    kv_cache: int = 0
    compute_buffer: int = 0
    cuda_reserve: int = 0
    output_buffer: int = 0
    correction: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass(frozen=True)
class Plan:
    """How many layers go to the GPU and what each side is predicted to hold."""

    n_gpu_layers: int  # llama.cpp's value: the output layer counts as one
    max_layers: int  # n_layer + 1: everything on the GPU
    gpu_blocks: int
    output_on_gpu: bool
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
    def fits(self) -> bool:
        return self.cap is None or self.gpu.total <= self.cap

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu"]["total"] = self.gpu.total
        data["cpu"]["total"] = self.cpu.total
        data["fits"] = self.fits
        return data


def kv_cells(model: ModelInfo, req: PlanRequest) -> tuple[int, int, int]:
    """(n_ctx_seq, cells of a full layer, cells of a sliding-window layer), all streams."""
    n_ctx = pad(req.n_ctx * req.parallel)
    n_ctx_seq = pad(n_ctx // req.parallel)
    ubatch = min(req.n_ubatch, req.n_batch, n_ctx)
    swa_cells = n_ctx_seq if req.swa_full else pad(min(n_ctx_seq, model.n_swa + ubatch))
    return n_ctx_seq, n_ctx_seq * req.parallel, swa_cells * req.parallel


def kv_layer_bytes(model: ModelInfo, req: PlanRequest) -> list[int]:
    """KV cache bytes of every layer."""
    _, full, swa = kv_cells(model, req)
    size_k = KV_TYPE_BYTES[req.cache_type_k]
    size_v = KV_TYPE_BYTES[req.cache_type_v]
    out = []
    for il in range(model.n_layer):
        cells = swa if model.swa_layers[il] else full
        k, v = model.kv_width(il)
        out.append(int(cells * (k * size_k + v * size_v)))
    return out


def compute_bytes(
    model: ModelInfo, req: PlanRequest, *, layers: bool, output: bool, staging: int = 0
) -> int:
    """The compute buffer of one device that holds some blocks and/or the output layer."""
    n_ctx_seq, _, _ = kv_cells(model, req)
    tokens = min(req.n_ubatch, req.n_batch, pad(req.n_ctx * req.parallel))
    hidden = model.n_embd * tokens * 4  # one f32 hidden state of the ubatch
    kv_hidden = max(model.n_head_kv) * model.key_length * tokens * 4
    n_kv = n_ctx_seq  # worst case: the whole stream is attended to
    # The KQ mask is a graph input: it stays allocated until the last layer's attention.
    mask = n_kv * tokens * (2 if req.flash_attn else 4)
    phases = [hidden]  # the input embedding rows, on whichever device gets them
    if output:
        phases.append(model.n_vocab * tokens * 4 + 2 * hidden)
    if layers:
        kq = 0 if req.flash_attn else max(model.n_head) * n_kv * tokens * 4
        phases.append(kq + 5 * hidden + 2 * kv_hidden + mask)
        phases.append(3 * model.n_ff * tokens * 4 + 4 * hidden + mask)
    return max(phases) + staging


def parts_for(
    model: ModelInfo, req: PlanRequest, k: int, kv: list[int], gpu_present: bool
) -> tuple[Parts, Parts]:
    """The GPU and CPU parts when llama.cpp's n_gpu_layers is `k`."""
    k = max(0, min(k, model.n_layer + 1))
    blocks = max(k - 1, 0)
    first_gpu = model.n_layer - blocks
    output_gpu = k >= 1
    gpu_weights = sum(model.layer_bytes[first_gpu:])
    cpu_weights = sum(model.layer_bytes[:first_gpu])
    gpu_kv = sum(kv[first_gpu:])
    cpu_kv = sum(kv[:first_gpu])
    cpu_blocks = first_gpu > 0
    staging = model.largest_layer_tensor if (cpu_blocks and k >= 1 and req.op_offload) else 0
    on_gpu = k >= 1 and gpu_present
    gpu = (
        Parts(
            layer_weights=gpu_weights,
            output_layer=model.output_bytes if output_gpu else 0,
            kv_cache=gpu_kv,
            compute_buffer=compute_bytes(
                model, req, layers=blocks > 0, output=output_gpu, staging=staging
            )
            if on_gpu
            else 0,
            cuda_reserve=CUDA_RESERVE if on_gpu else 0,
            correction=req.correction if on_gpu else 0,
        )
        if k >= 1
        else Parts()
    )
    # A tied output layer on the CPU is the token embedding itself (same mmap'd bytes); on the
    # GPU llama.cpp loads a copy.
    cpu_output = model.output_bytes - (model.token_embd_bytes if model.output_tied else 0)
    cpu = Parts(
        layer_weights=cpu_weights,
        output_layer=0 if output_gpu else cpu_output,
        token_embedding=model.token_embd_bytes,
        kv_cache=cpu_kv,
        compute_buffer=compute_bytes(model, req, layers=cpu_blocks, output=not output_gpu),
        output_buffer=model.n_vocab * 4 * req.parallel,
    )
    return gpu, cpu


def make_plan(model: ModelInfo, device: Device | None, req: PlanRequest) -> Plan:
    """Choose the most GPU layers whose predicted footprint stays under the cap."""
    kv = kv_layer_bytes(model, req)
    max_layers = model.n_layer + 1
    cap, cap_reason = applied_cap(device, req.vram_cap)
    notes: list[str] = []
    if device is None:
        k = 0
        notes.append("no NVIDIA GPU: the whole model runs on the CPU")
    elif req.gpu_layers is not None:
        k = max_layers if req.gpu_layers < 0 else min(req.gpu_layers, max_layers)
        notes.append(f"n_gpu_layers fixed at {k} by the settings")
    else:
        k = best_layers(model, req, kv, cap)
        if req.known_layers is not None and req.known_layers < k:
            notes.append(
                f"starting at {req.known_layers} layers: {k} failed on this card "
                "before (remembered configuration)"
            )
            k = req.known_layers
    gpu, cpu = parts_for(model, req, k, kv, device is not None)
    n_ctx_seq, full_cells, _ = kv_cells(model, req)
    ram_ok = req.ram_available is None or cpu.total + OS_RESERVE <= req.ram_available
    if not ram_ok:
        ram_note = (
            f"RAM: the CPU part ({format_bytes(cpu.total)}) plus {format_bytes(OS_RESERVE)} for "
            f"the system does not fit in {format_bytes(req.ram_available)} available: the run "
            "would page from disk and be extremely slow"
        )
    plan = Plan(
        n_gpu_layers=k,
        max_layers=max_layers,
        gpu_blocks=max(k - 1, 0),
        output_on_gpu=k >= 1,
        device=device,
        cap=cap,
        cap_reason=cap_reason,
        gpu=gpu,
        cpu=cpu,
        n_ctx_seq=n_ctx_seq,
        n_ubatch=min(req.n_ubatch, req.n_batch, pad(req.n_ctx * req.parallel)),
        kv_cells=full_cells,
        ram_available=req.ram_available,
        ram_ok=ram_ok,
        request=req,
    )
    if device is not None:
        notes.extend(explain(model, plan, kv))
    if not ram_ok:
        notes.append(ram_note)
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


def best_layers(model: ModelInfo, req: PlanRequest, kv: list[int], cap: int | None) -> int:
    """The largest n_gpu_layers whose GPU part fits under `cap`."""
    if cap is None:
        return model.n_layer + 1
    best = 0
    for k in range(1, model.n_layer + 2):
        gpu, _ = parts_for(model, req, k, kv, True)
        if gpu.total <= cap:
            best = k
    return best


def explain(model: ModelInfo, plan: Plan, kv: list[int]) -> list[str]:
    """Why the remaining layers did not fit, with what would change it."""
    req = plan.request
    k = plan.n_gpu_layers
    if k >= plan.max_layers or plan.cap is None or req.gpu_layers is not None:
        return []
    lines = []
    left = plan.cap - plan.gpu.total if k else plan.cap
    nxt, _ = parts_for(model, req, k + 1, kv, True)
    need = nxt.total - plan.gpu.total
    if k == 0:
        lines.append(
            f"even one layer needs {format_bytes(nxt.total)} on the GPU (the output "
            f"layer, compute buffer and CUDA reserve); the cap is "
            f"{format_bytes(plan.cap)}"
        )
    else:
        added_block = model.layer_bytes[model.n_layer - k] if k <= model.n_layer else 0
        added_kv = kv[model.n_layer - k] if k <= model.n_layer else 0
        lines.append(
            f"one more layer needs {format_bytes(need)} (weights {format_bytes(added_block)}, "
            f"KV cache {format_bytes(added_kv)}); {format_bytes(max(left, 0))} is left under "
            "the cap"
        )
    gpu_kv = plan.gpu.kv_cache
    if req.n_ctx >= 512:
        half = replace(req, n_ctx=req.n_ctx // 2, known_layers=None)
        more = best_layers(model, half, kv_layer_bytes(model, half), plan.cap) - k
        if more > 0 and gpu_kv:
            lines.append(
                f"KV cache at ctx {req.n_ctx} takes {format_bytes(gpu_kv)} on the GPU; "
                f"at ctx {req.n_ctx // 2}, {more} more layer{'s' * (more > 1)} fit"
            )
    if req.parallel > 1:
        single = replace(req, parallel=1, known_layers=None)
        more = best_layers(model, single, kv_layer_bytes(model, single), plan.cap) - k
        if more > 0:
            lines.append(
                f"with {req.parallel} parallel sequences the KV cache is "
                f"{req.parallel}× larger; at parallel 1, {more} more layers fit"
            )
    if req.cache_type_k == "f16" and gpu_kv:
        q8 = replace(req, cache_type_k="q8_0", cache_type_v="q8_0", known_layers=None)
        more = best_layers(model, q8, kv_layer_bytes(model, q8), plan.cap) - k
        if more > 0:
            lines.append(f"with a q8_0 KV cache, {_more_fit(more)}")
    return lines


def _more_fit(n: int) -> str:
    return "1 more layer fits" if n == 1 else f"{n} more layers fit"


# Measured on 2 CPU cores with the default model (benchmarks/throughput.py): completion
# tokens/s 61, 91, 114 and 125 at parallel 1, 2, 4 and 8. Past 8 the gain flattens while each
# sequence adds a whole context of KV cache.
CPU_PARALLEL = 8
GPU_PARALLEL_CHOICES = (16, 8, 4, 2)


def choose_parallel(info: ModelInfo, device: Device | None, single: PlanRequest) -> int:
    """`--parallel auto`: on the CPU a fixed 8; on a GPU the most sequences whose KV cache
    fits under the cap without moving a single layer off the GPU."""
    if device is None:
        return CPU_PARALLEL
    layers = make_plan(info, device, single).n_gpu_layers
    if layers == 0:
        return CPU_PARALLEL
    for parallel in GPU_PARALLEL_CHOICES:
        plan = make_plan(info, device, replace(single, parallel=parallel))
        if plan.n_gpu_layers >= layers and plan.fits:
            return parallel
    return 1
