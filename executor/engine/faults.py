"""Fault injection for tests (not for users): simulated out-of-memory and aborts.

The parent reads EXECUTOR_FAULT_* once and hands them to each model process with its number
(1 for the first process of a run), so a fault can hit only the first process or every one.
Both engines honour them:

  EXECUTOR_FAULT_OOM_LOAD_ABOVE=N      loading with more than N GPU layers fails with CUDA's
                                       out-of-memory messages
  EXECUTOR_FAULT_OOM_LOAD_WEIGHTS_ABOVE=BYTES  the same when the plan puts more weight bytes
                                       on the GPU (so tensor placements shrink too)
  EXECUTOR_FAULT_OOM_DECODE_ABOVE=N    with more than N GPU layers, decoding aborts the process
                                       after a few tokens, as a CUDA OOM during decode does
  EXECUTOR_FAULT_ABORT_AFTER_TOKENS=K  the first model process aborts after K tokens
  EXECUTOR_FAULT_ABORT_ON=TEXT         any process aborts on an item whose prompt contains TEXT
  EXECUTOR_FAULT_HANG_ON=TEXT          any process stops forever (a hung kernel or driver) on
                                       an item whose prompt contains TEXT
  EXECUTOR_FAULT_BAD_OUTPUT_ON=TEXT    an item whose prompt contains TEXT answers with a lone
                                       UTF-16 surrogate, which no database can store
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from executor.engine import LoadError


@dataclass(frozen=True)
class Faults:
    oom_load_above: int | None = None
    oom_decode_above: int | None = None
    abort_after_tokens: int | None = None
    abort_on: str | None = None
    hang_on: str | None = None
    bad_output_on: str | None = None
    oom_load_weights_above: int | None = None
    process_number: int = 1
    gpu_weights: int = 0  # what the parent planned on the GPU for this process

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        env = os.environ if env is None else env

        def number(name: str) -> int | None:
            value = env.get(f"EXECUTOR_FAULT_{name}")
            return int(value) if value not in (None, "") else None

        return cls(
            oom_load_above=number("OOM_LOAD_ABOVE"),
            oom_decode_above=number("OOM_DECODE_ABOVE"),
            abort_after_tokens=number("ABORT_AFTER_TOKENS"),
            abort_on=env.get("EXECUTOR_FAULT_ABORT_ON") or None,
            hang_on=env.get("EXECUTOR_FAULT_HANG_ON") or None,
            bad_output_on=env.get("EXECUTOR_FAULT_BAD_OUTPUT_ON") or None,
            oom_load_weights_above=number("OOM_LOAD_WEIGHTS_ABOVE"),
        )

    def output(self, text: str, prompt_text: str) -> str:
        """The output as generated, or made unstorable when a fault says so."""
        if self.bad_output_on is not None and self.bad_output_on in prompt_text:
            return text + "\ud800"
        return text

    def check_load(self, n_gpu_layers: int) -> None:
        """Fail a load the way llama.cpp does when CUDA runs out of memory."""
        too_many = self.oom_load_above is not None and _layers(n_gpu_layers) > self.oom_load_above
        limit = self.oom_load_weights_above
        too_heavy = limit is not None and self.gpu_weights > limit
        if too_many or too_heavy:
            print(
                "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 812.00 MiB on device 0: "
                "cudaMalloc failed: out of memory\n"
                "alloc_tensor_range: failed to allocate CUDA0 buffer of size 851443712\n"
                "(fault injected: EXECUTOR_FAULT_OOM_LOAD_"
                + (f"ABOVE={self.oom_load_above})" if too_many else f"WEIGHTS_ABOVE={limit})"),
                file=sys.stderr,
                flush=True,
            )
            raise LoadError("Failed to load model from file: unable to allocate CUDA0 buffer")

    def check_token(self, n_gpu_layers: int, tokens_in_process: int, prompt_text: str) -> None:
        """Abort mid-decode when a fault says so (called once per generated token)."""
        if self.hang_on is not None and self.hang_on in prompt_text:
            print(f"fault injected: hanging on {self.hang_on!r}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if self.abort_on is not None and self.abort_on in prompt_text:
            _abort(
                f'GGML_ASSERT(!"fault injected") failed: EXECUTOR_FAULT_ABORT_ON {self.abort_on!r}'
            )
        if (
            self.oom_decode_above is not None
            and _layers(n_gpu_layers) > self.oom_decode_above
            and tokens_in_process >= 3
        ):
            _abort(
                "CUDA error: out of memory\n  current device: 0, in function "
                "ggml_backend_cuda_graph_compute (fault injected: "
                f"EXECUTOR_FAULT_OOM_DECODE_ABOVE={self.oom_decode_above})\n"
                'GGML_ASSERT(!"CUDA error") failed'
            )
        if (
            self.abort_after_tokens is not None
            and self.process_number == 1
            and tokens_in_process >= self.abort_after_tokens
        ):
            _abort(
                f'GGML_ASSERT(!"fault injected") failed: abort after '
                f"{self.abort_after_tokens} tokens"
            )


def _layers(n_gpu_layers: int) -> int:
    return 10**9 if n_gpu_layers < 0 else n_gpu_layers


def _abort(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os.abort()
