"""The real engine: llama-cpp-python. The only module that imports llama_cpp."""

from __future__ import annotations

import re
import time
from typing import Any

import llama_cpp
from llama_cpp import Llama
from llama_cpp._logger import set_verbose

from executor.engine import GenerationRequest, ItemError, LoadError, LoadSpec
from executor.store.queue import ResultRecord

_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


class LlamaEngine:
    """One model loaded once through llama-cpp-python; generates one request at a time."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        try:
            # verbose during load: llama.cpp's log (buffer sizes, CUDA errors) goes to the engine
            # log file, where the parent reads the cause when a load fails.
            self.llm = Llama(
                model_path=spec.model_path,
                n_ctx=spec.n_ctx,
                n_batch=min(512, spec.n_ctx),
                n_gpu_layers=spec.n_gpu_layers,
                n_threads=spec.n_threads,
                seed=spec.seed,
                verbose=True,
            )
        except ValueError as exc:  # "Failed to load model from file", "... llama_context"
            raise LoadError(str(exc)) from None
        # After load only errors: per-call timing prints would grow the log by lines per item.
        self.llm.verbose = False
        set_verbose(False)

    def generate(self, request: GenerationRequest) -> ResultRecord:
        started = time.perf_counter()
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        sampling: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": request.stop or None,
        }
        try:
            if request.messages is not None:
                out = self.llm.create_chat_completion(messages=request.messages, **sampling)
                text = out["choices"][0]["message"]["content"] or ""
            else:
                out = self.llm.create_completion(prompt=request.prompt, **sampling)
                text = out["choices"][0]["text"]
        except ValueError as exc:
            too_long = _TOO_LONG.search(str(exc))
            if too_long:
                raise ItemError(
                    f"prompt is {too_long[1]} tokens; the context holds {too_long[2]} "
                    "(raise --ctx or shorten the prompt)"
                ) from None
            raise ItemError(str(exc)) from None
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        usage = out["usage"]
        return ResultRecord(
            output=text,
            finish_reason=out["choices"][0]["finish_reason"] or "stop",
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            total_ms=(time.perf_counter() - started) * 1000,
            prompt_ms=perf.t_p_eval_ms,
            generation_ms=perf.t_eval_ms,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "llama",
            "llama_cpp_python": llama_cpp.__version__,
            "n_ctx": self.llm.n_ctx(),
            "n_gpu_layers": self.spec.n_gpu_layers,
            "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        }

    def close(self) -> None:
        self.llm.close()
