"""A deterministic stand-in for the model: echoes the prompt, one word per token.

Used by the queue and crash tests (and `--engine fake` dry runs of a pipeline). Setting
EXECUTOR_FAKE_TOKEN_SECONDS makes each token take that long, so tests can act mid-batch.
"""

from __future__ import annotations

import os
import time
from typing import Any

from executor.engine import GenerationRequest, ItemError, LoadSpec
from executor.store.queue import ResultRecord


class FakeEngine:
    """Answers `echo: <last user text>`, cut at max_tokens words or at the first stop string."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.token_seconds = float(os.environ.get("EXECUTOR_FAKE_TOKEN_SECONDS", "0"))

    def generate(self, request: GenerationRequest) -> ResultRecord:
        started = time.perf_counter()
        if request.prompt is not None:
            text = request.prompt
        else:
            assert request.messages is not None
            text = next(m["content"] for m in reversed(request.messages) if m["role"] == "user")
        prompt_tokens = len(text.split()) + 1
        if prompt_tokens > self.spec.n_ctx:
            raise ItemError(
                f"prompt is {prompt_tokens} tokens; the context holds {self.spec.n_ctx}"
            )
        words = ["echo:", *text.split()]
        finish = "stop"
        if len(words) > request.max_tokens:
            words, finish = words[: request.max_tokens], "length"
        output = " ".join(words)
        for stop in request.stop:
            if stop in output:
                output, finish = output[: output.index(stop)], "stop"
        for _ in words:
            if self.token_seconds:
                time.sleep(self.token_seconds)
        total_ms = (time.perf_counter() - started) * 1000
        return ResultRecord(
            output=output,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(words),
            total_ms=total_ms,
            prompt_ms=0.0,
            generation_ms=total_ms,
        )

    def describe(self) -> dict[str, Any]:
        return {"engine": "fake", "n_ctx": self.spec.n_ctx, "n_gpu_layers": 0}

    def close(self) -> None:
        pass
