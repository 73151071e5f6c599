"""What crosses between the worker and the model process: load specs, requests, results and
the messages on the pipe. Plain frozen dataclasses, imported by both sides; nothing here
imports the store or llama.cpp, so the model process stays free of SQLAlchemy.

Pipe messages, in order of a model process's life:
  parent → child  Load(spec, faults) (the process is spawned first, while the parent plans)
  child → parent  Ready(info) | LoadFailed(reason)
  parent → child  Batch(requests, number), then at any time more Batch (appended to the
                  queue while the first runs: slots never drain between batches),
                  Drop(item_ids) or Stop()
  child → parent  ItemStarted(id), Progress() now and then, ItemDone(id, record) |
                  ItemFailed(id, reason), BatchDone(number) when idle: every batch up to
                  `number` is through
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from executor.cpus import threads_for

if TYPE_CHECKING:
    from executor.config import Settings

# Generation parameters: llama-cpp-python's defaults for the ones a line may leave out, so that
# a line without them samples exactly as create_completion does.
SAMPLING_DEFAULTS: dict[str, Any] = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
MAX_SEED = 2**32 - 1
# (lowest, highest) of every numeric generation parameter; None: no upper bound.
PARAM_BOUNDS: dict[str, tuple[float, float | None]] = {
    "max_tokens": (1, None),
    "temperature": (0.0, 5.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, None),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.0, 5.0),
    "seed": (0, MAX_SEED),
}
INTEGER_PARAMS = ("max_tokens", "top_k", "seed")
# The parameters a job sets for all its lines (submit's flags, a spec's keys, the settings).
JOB_PARAMS = ("max_tokens", "temperature", "top_p", "seed")


class FailCode(StrEnum):
    """Why one item failed, kept with it: OpenAI's batch output answers the request's own
    faults with a 400 and the server's with a 500 (`CLIENT_FAULTS`)."""

    INVALID_REQUEST = "invalid_request"  # the line was refused (n > 1, an unknown model, ...)
    CONTEXT_LENGTH = "context_length_exceeded"  # the prompt does not fit the context
    BAD_SCHEMA = "invalid_json_schema"  # no grammar can be made from its json_schema
    BAD_PROMPT = "invalid_prompt"  # its messages cannot be rendered with the chat template
    CRASHED = "crashed"  # it crashed the model process max_attempts times
    UNSTORABLE = "unstorable_output"  # the answer holds what no database can store
    MODEL_FAILED = "model_failed"  # the job's model would not load at all
    FAILED = "generation_failed"  # anything else


CLIENT_FAULTS = frozenset(
    {FailCode.INVALID_REQUEST, FailCode.CONTEXT_LENGTH, FailCode.BAD_SCHEMA, FailCode.BAD_PROMPT}
)


@dataclass(frozen=True)
class LoadSpec:
    """Everything the model process needs to load a model."""

    engine: str  # "llama" or "fake"
    model_path: str
    n_ctx: int  # tokens per sequence
    n_gpu_layers: int
    n_threads: int | None = None
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

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        model_path: str,
        *,
        n_ctx: int,
        n_gpu_layers: int,
        parallel: int,
        n_ubatch: int,
        flash_attn: bool,
        swa_full: bool,
        tensor_overrides: tuple[tuple[str, str], ...] = (),
        gpu_uuid: str | None = None,
        measure_parallel: tuple[int, ...] = (),
    ) -> LoadSpec:
        """The load of a plan: its context, layers, rules and batch; the rest from settings."""
        return cls(
            engine=settings.engine,
            model_path=model_path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=threads_for(settings.threads)[0],
            seed=settings.seed,
            parallel=parallel,
            n_batch=max(settings.n_batch, n_ubatch),
            n_ubatch=n_ubatch,
            flash_attn=flash_attn,
            cache_type_k=settings.cache_type,
            cache_type_v=settings.cache_type,
            swa_full=swa_full,
            tensor_overrides=tensor_overrides,
            gpu_uuid=gpu_uuid,
            measure_parallel=measure_parallel,
        )


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
    top_k: int = SAMPLING_DEFAULTS["top_k"]
    min_p: float = SAMPLING_DEFAULTS["min_p"]
    repeat_penalty: float = SAMPLING_DEFAULTS["repeat_penalty"]

    @property
    def params(self) -> dict[str, Any]:
        """The generation parameters, for the result's provenance (defaults left out)."""
        params: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        for key, default in SAMPLING_DEFAULTS.items():
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
        params = {**SAMPLING_DEFAULTS, **defaults, **request.get("params", {})}
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
            top_k=int(params["top_k"]),
            min_p=float(params["min_p"]),
            repeat_penalty=float(params["repeat_penalty"]),
        )


@dataclass(frozen=True)
class ResultRecord:
    """What the model process returns for one item."""

    output: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    total_ms: float
    prompt_ms: float | None = None
    generation_ms: float | None = None


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
