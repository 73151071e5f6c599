"""Sizes, as llama.cpp (the version llama-cpp-python vendors) allocates them:
- weights: each tensor's bytes from the GGUF table, on the device its layer and the -ot
  rules give it (placement.assign applies the rules exactly as llama.cpp does);
- KV cache (llama-kv-cache.cpp): per layer, cells × KV heads × (key + value length) × bytes
  per element, on the layer's device. The context is padded to 256; each parallel sequence
  has its own stream. Sliding-window layers hold pad256(min(n_ctx_seq, n_swa + n_ubatch))
  cells per stream unless swa_full (llama-kv-cache-iswa.cpp);
- compute buffer (llama-context.cpp reserves the worst-case graph of one ubatch): the largest
  of the output phase (logits n_vocab × ubatch × 4 B), the attention phase (without flash
  attention the KQ matrix heads × n_kv × ubatch × 4 B), the dense FFN phase (3 × n_ff ×
  ubatch × 4 B) and the MoE phase (3 × experts used × n_ff_exp × ubatch × 4 B and the
  router's logits), plus the KQ mask; and with op offload one weight in RAM staged on the GPU
  at a time (ggml-backend copies a RAM weight into the GPU's compute buffer for a batch of 32+
  tokens and starts a new split per such weight; for expert tensors it copies only the used
  experts, into a buffer of the whole tensor's size): the largest tensor left in RAM.

`tests/test_plan.py` checks these against llama.cpp's own numbers (dry runs and real loads)
for dense, MoE and sliding-window models.
"""

from __future__ import annotations

from dataclasses import dataclass

from executor.gguf.info import ModelInfo
from executor.gguf.types import GGML_TYPES
from executor.params import KV_CACHE_TYPES
from executor.planning.placement import Placement

MiB = 2**20
GiB = 2**30
CUDA_RESERVE = 512 * MiB  # CUDA context, cuBLAS workspace and pools of the model process
FREE_HEADROOM = 256 * MiB  # left free on the card for the driver and other processes
OS_RESERVE = 1 * GiB  # system RAM the operating system keeps for itself


def kv_type_bytes(name: str) -> float:
    """Bytes per element of a KV cache type: ggml's block bytes / elements per block."""
    _, elements, size = GGML_TYPES[KV_CACHE_TYPES[name]]
    return size / elements


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
    by_tensor: bool = True  # place single tensors (-ot), not only whole layers
    vram_cap: int | None = None  # the user's cap in bytes (None: free VRAM is the limit)
    gpu_layers: int | None = None  # a fixed n_gpu_layers (the plan only reports on it)
    correction: int = 0  # bytes measured beyond the estimate on this model/card before
    known: Placement | None = None  # a placement remembered to have worked here
    ram_available: int | None = None  # system RAM available (None: not checked)
    # Why there is no device to plan for: no card, or one this llama.cpp build cannot use.
    cpu_reason: str = "no NVIDIA GPU"


def kv_cells(model: ModelInfo, req: PlanRequest) -> tuple[int, int, int]:
    """(n_ctx_seq, cells of a full layer, cells of a sliding-window layer), all streams."""
    n_ctx = pad(req.n_ctx * req.parallel)
    n_ctx_seq = pad(n_ctx // req.parallel)
    ubatch = ubatch_of(req)
    swa_cells = n_ctx_seq if req.swa_full else pad(min(n_ctx_seq, model.n_swa + ubatch))
    return n_ctx_seq, n_ctx_seq * req.parallel, swa_cells * req.parallel


def ubatch_of(req: PlanRequest) -> int:
    """The physical batch llama.cpp uses: n_ubatch, at most n_batch and the whole context."""
    return min(req.n_ubatch, req.n_batch, pad(req.n_ctx * req.parallel))


def kv_layer_bytes(model: ModelInfo, req: PlanRequest) -> list[int]:
    """KV cache bytes of every layer."""
    _, full, swa = kv_cells(model, req)
    size_k = kv_type_bytes(req.cache_type_k)
    size_v = kv_type_bytes(req.cache_type_v)
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
    tokens = ubatch_of(req)
    hidden = model.n_embd * tokens * 4  # one f32 hidden state of the ubatch
    kv_hidden = max(model.n_head_kv) * model.key_length * tokens * 4
    n_kv = n_ctx_seq  # worst case: the whole stream is attended to
    # The KQ mask is a graph input: it stays allocated until the last layer's attention.
    mask = n_kv * tokens * (2 if req.flash_attn else 4)
    phases = [hidden]  # the input embedding rows, on whichever device gets them
    if output:
        # With MoE layers the logits land after the last block's expert activations, which
        # the allocator has not reclaimed into one piece (measured on gpt-oss and qwen3moe).
        moe_tail = model.n_expert_used * model.n_ff_exp * tokens * 4 if model.moe else 0
        phases.append(model.n_vocab * tokens * 4 + 2 * hidden + moe_tail)
    if layers:
        kq = 0 if req.flash_attn else max(model.n_head) * n_kv * tokens * 4
        phases.append(kq + 5 * hidden + 2 * kv_hidden + mask)
        # Without flash attention V is stored transposed; its copy outlives the attention.
        v_copy = 0 if req.flash_attn else kv_hidden
        phases.append(3 * model.n_ff * tokens * 4 + 4 * hidden + mask + v_copy)
        if model.moe:
            experts = 3 * model.n_expert_used * model.n_ff_exp * tokens * 4
            router = 2 * model.n_expert * tokens * 4
            phases.append(experts + router + 4 * hidden + mask + v_copy)
    return max(phases) + staging
