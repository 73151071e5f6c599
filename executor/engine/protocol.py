"""What crosses between the worker and the model process: load specs, dry-run answers and
the messages on the pipe. Plain frozen dataclasses, imported by both sides; nothing here
imports the store or llama.cpp, so the model process stays free of SQLAlchemy.

Pipe messages, in order of a model process's life:
  parent → child  Load(spec, faults) (the process is spawned first, while the parent plans)
  child → parent  Ready(info) | LoadFailed(reason)
  parent → child  Batch(requests, number), then at any time more Batch (appended to the
                  queue while the first runs: slots never drain between batches),
                  Drop(item_ids) or Stop()
  child → parent  ItemStarted(id), Progress(tokens) now and then, ItemDone(id, record) |
                  ItemFailed(id, reason, code), BatchDone(number) when idle: every batch up
                  to `number` is through
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from executor.outcomes import FailCode, ResultRecord
from executor.params import GenerationRequest

__all__ = ["FailCode", "GenerationRequest", "ResultRecord"]  # what messages carry


@dataclass(frozen=True)
class LoadSpec:
    """Everything the model process needs to load a model."""

    engine: str  # "llama" or "fake"
    model_path: str
    n_ctx: int  # tokens per sequence
    n_gpu_layers: int
    n_threads: int | None = None
    # threads: auto: step the threads down while other processes hold some of our cores,
    # and back up when they leave (machine.cpus.CpuWatch)
    adapt_threads: bool = False
    seed: int = 0
    parallel: int = 1  # sequences; with measure_parallel, the most the engine may pick
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    op_offload: bool = True
    swa_full: bool = False  # sliding-window layers keep the whole context (llama.cpp's default)
    # llama.cpp's -ot rules, in order (the first match decides): (regex, buffer type name)
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    gpu_uuid: str | None = None  # the one GPU the model process may see
    # Measure decode rates at these sizes after loading and pick the parallel from them
    # (--parallel auto on the CPU, the first load on this host); empty: use `parallel`.
    measure_parallel: tuple[int, ...] = ()


@dataclass(frozen=True)
class DryRun:
    """What llama.cpp says it would allocate (a load with no_alloc: nothing is allocated)."""

    compute: dict[str, int]  # compute buffer per buffer type: "CPU", "CUDA0", ...
    kv_bytes: int  # the whole KV cache
    kv_cells: int  # cells per stream
    output_bytes: int  # the host output (logits) buffer
    layer_devices: dict[int, str]  # layer → device
    gpu_offload_supported: bool
    n_ctx: int
    n_ctx_seq: int
    flash_attn: str
    weights: dict[str, int] = field(default_factory=dict)  # model buffers per buffer type
    overridden: dict[str, str] = field(default_factory=dict)  # tensor → buffer type (-ot)


# --- pipe messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    spec: LoadSpec
    faults: Any = None  # executor.engine.faults.Faults (the engine's own test hooks)


@dataclass(frozen=True)
class AskCapabilities:
    """Parent → a spare model process: what can this build do? (answered by Capabilities)"""


@dataclass(frozen=True)
class Capabilities:
    version: str
    gpu_offload: bool  # llama_supports_gpu_offload(): built with CUDA (or another GPU backend)


@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]


@dataclass(frozen=True)
class LoadFailed:
    reason: str


@dataclass(frozen=True)
class Batch:
    requests: list[GenerationRequest]
    number: int = 1  # counts up over a model process's life


@dataclass(frozen=True)
class Drop:
    item_ids: list[int]


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class ItemStarted:
    item_id: int


@dataclass(frozen=True)
class ItemDone:
    item_id: int
    record: ResultRecord


@dataclass(frozen=True)
class ItemFailed:
    """This item alone failed (prompt too long, a template error); the batch goes on."""

    item_id: int
    reason: str
    code: FailCode = FailCode.FAILED


@dataclass(frozen=True)
class Progress:
    """The model is decoding (sent at most once a second): a process that stops sending
    anything while items are in flight is hung, and the parent kills it. `tokens`: what
    each item in flight has generated so far (live tok/s and ETA before any item ends)."""

    tokens: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchDone:
    """The model process is idle: every batch up to `number` is generated (or dropped)."""

    number: int = 1
