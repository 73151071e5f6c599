"""The model side: what the model process is asked to load and to generate, and its answers.

Only `executor.engine.llama` imports llama_cpp; the fake engine in `executor.engine.fake` answers
deterministically for tests. Both run inside the child process (`executor.engine.child`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from executor.store.queue import ResultRecord


class ItemError(Exception):
    """This one item cannot be generated (e.g. its prompt is longer than the context)."""


class LoadError(Exception):
    """The model could not be loaded (missing, corrupt, or out of memory)."""


@dataclass(frozen=True)
class LoadSpec:
    """Everything the model process needs to load a model."""

    engine: str  # "llama" or "fake"
    model_path: str
    n_ctx: int
    n_gpu_layers: int
    n_threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One item to generate, with its effective parameters (job defaults + line overrides)."""

    item_id: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, item_id: int, request: dict[str, Any], defaults: dict[str, Any]
    ) -> GenerationRequest:
        """Merge a stored item request with its job's generation defaults."""
        params = {**defaults, **request.get("params", {})}
        return cls(
            item_id=item_id,
            prompt=request.get("prompt"),
            messages=request.get("messages"),
            max_tokens=int(params["max_tokens"]),
            temperature=float(params["temperature"]),
            top_p=float(params["top_p"]),
            seed=int(params["seed"]),
            stop=list(params.get("stop") or []),
        )


class Engine(Protocol):
    """A loaded model that turns one request into one result."""

    def generate(self, request: GenerationRequest) -> ResultRecord:
        """Generate; raise ItemError when the failure belongs to this item alone."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded model for the logs (context size, GPU layers, ...)."""
        ...

    def close(self) -> None: ...


def create_engine(spec: LoadSpec) -> Engine:
    """Load the engine named by the spec (inside the model process)."""
    if spec.engine == "fake":
        from executor.engine.fake import FakeEngine

        return FakeEngine(spec)
    from executor.engine.llama import LlamaEngine

    return LlamaEngine(spec)
