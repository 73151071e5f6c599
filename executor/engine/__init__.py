"""The model side: what the model process is asked to load and to generate, and its answers.

Only `executor.engine.llama` imports llama_cpp; the fake engine in `executor.engine.fake` answers
deterministically for tests. Both run inside the child process (`executor.engine.child`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from executor.store.queue import ResultRecord

if TYPE_CHECKING:
    from executor.engine.faults import Faults


class ItemError(Exception):
    """This one item cannot be generated (e.g. its prompt is longer than the context)."""


class LoadError(Exception):
    """The model could not be loaded (missing, corrupt, or out of memory)."""


@dataclass(frozen=True)
class LoadSpec:
    """Everything the model process needs to load a model."""

    engine: str  # "llama" or "fake"
    model_path: str
    n_ctx: int  # tokens per sequence
    n_gpu_layers: int
    n_threads: int | None = None
    seed: int = 0
    parallel: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    op_offload: bool = True
    gpu_uuid: str | None = None  # the one GPU the model process may see


@dataclass(frozen=True)
class GenerationRequest:
    """One item to generate, with its effective parameters (job defaults + line overrides)."""

    item_id: int
    custom_id: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON schema
    # llama-cpp-python's defaults, so that a line without them samples as create_completion.
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        """The generation parameters, for the result's provenance."""
        params: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        for key, default in (("top_k", 40), ("min_p", 0.05), ("repeat_penalty", 1.0)):
            if getattr(self, key) != default:
                params[key] = getattr(self, key)
        if self.stop:
            params["stop"] = self.stop
        if self.json_schema is not None:
            params["json_schema"] = self.json_schema
        return params

    @property
    def text(self) -> str:
        """The prompt, or the messages' contents joined (for logs and fault injection)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages or [])

    @classmethod
    def build(
        cls, item_id: int, custom_id: str, request: dict[str, Any], defaults: dict[str, Any]
    ) -> GenerationRequest:
        """Merge a stored item request with its job's generation defaults."""
        params = {**defaults, **request.get("params", {})}
        return cls(
            item_id=item_id,
            custom_id=custom_id,
            prompt=request.get("prompt"),
            messages=request.get("messages"),
            max_tokens=int(params["max_tokens"]),
            temperature=float(params["temperature"]),
            top_p=float(params["top_p"]),
            seed=int(params["seed"]),
            stop=list(params.get("stop") or []),
            json_schema=request.get("json_schema", defaults.get("json_schema")),
            top_k=int(params.get("top_k", 40)),
            min_p=float(params.get("min_p", 0.05)),
            repeat_penalty=float(params.get("repeat_penalty", 1.0)),
        )


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


class BatchSink(Protocol):
    """Where an engine reports on a batch, and learns what the parent asked meanwhile."""

    def started(self, item_id: int) -> None: ...

    def finished(self, item_id: int, record: ResultRecord) -> None: ...

    def failed(self, item_id: int, reason: str) -> None:
        """This item alone failed (prompt too long, template error); the batch goes on."""
        ...

    def dropped(self) -> set[int]:
        """Items of the batch not to start (the parent released them)."""
        ...

    def stop_requested(self) -> bool: ...


class Engine(Protocol):
    """A loaded model that generates a batch of requests, several at a time if it can."""

    def run_batch(self, requests: list[GenerationRequest], sink: BatchSink) -> None:
        """Generate every request not dropped, reporting each through `sink` as it ends."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded model for the logs (context size, GPU layers, ...)."""
        ...

    def close(self) -> None: ...


def create_engine(spec: LoadSpec, faults: Faults | None = None) -> Engine:
    """Load the engine named by the spec (inside the model process)."""
    from executor.engine.faults import Faults

    faults = faults or Faults()
    if spec.engine == "fake":
        from executor.engine.fake import FakeEngine

        return FakeEngine(spec, faults)
    from executor.engine.llama import LlamaEngine

    return LlamaEngine(spec, faults)
