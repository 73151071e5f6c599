"""Generation parameters: their bounds, llama-cpp-python's defaults, and one item's request
with its effective values. Core: the model process and every layer above read it; it
imports nothing of executor's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
# KV cache element types a load may ask for: name → ggml type id (the model process passes
# the id to llama.cpp; gguf/types.py has each type's size, from which the plan sizes the cache).
KV_CACHE_TYPES: dict[str, int] = {"f16": 1, "q8_0": 8, "q4_0": 2}


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
