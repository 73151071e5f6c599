"""llama.cpp's side of a load, apart from generating: the model and context parameters of a
load spec (its -ot rules as tensor buffer overrides), the decode rates measured at each
parallel size, what the installed build can do, and dry runs (no memory allocated) that
report what a load would allocate. llama_cpp is imported only under engine/."""

from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import replace
from typing import Any

import llama_cpp
from llama_cpp import _logger as llama_logger

from executor.engine import LoadError
from executor.engine.decode_rates import FLAT, PROMPT_RATE
from executor.engine.protocol import DryRun, LoadSpec
from executor.machine.cpus import threads_for
from executor.params import KV_CACHE_TYPES


class _BuftOverride(ctypes.Structure):
    """llama.cpp's struct llama_model_tensor_buft_override (llama.h): llama-cpp-python binds
    the field as a bare pointer, so the NULL-terminated array is built here."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _cpu_buffer_type() -> int:
    """ggml_backend_cpu_buffer_type() from the ggml that llama_cpp loaded (the loader compares
    an override's buffer type with this very pointer)."""
    lib_dir = os.path.dirname(llama_cpp.llama_cpp._lib._name)
    names = [n for n in os.listdir(lib_dir) if n.startswith("libggml-base.")]
    base = ctypes.CDLL(os.path.join(lib_dir, sorted(names, key=len)[0]))
    base.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    return base.ggml_backend_cpu_buffer_type()


def model_params(spec: LoadSpec) -> tuple[Any, Any]:
    """llama.cpp model parameters for a spec, and the override array they point to (which must
    outlive the model: llama.cpp reads the patterns while loading)."""
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = spec.n_gpu_layers
    if not spec.tensor_overrides:
        return mparams, None
    if len(spec.tensor_overrides) >= llama_cpp.llama_max_tensor_buft_overrides():
        raise LoadError(f"{len(spec.tensor_overrides)} tensor overrides: llama.cpp takes fewer")
    array = (_BuftOverride * (len(spec.tensor_overrides) + 1))()
    cpu = _cpu_buffer_type()
    for i, (pattern, buft) in enumerate(spec.tensor_overrides):
        if buft != "CPU":
            raise LoadError(f"tensor override {pattern}={buft}: only CPU is supported")
        array[i].pattern = pattern.encode()
        array[i].buft = cpu
    array[len(spec.tensor_overrides)] = _BuftOverride(None, None)
    mparams.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
    return mparams, array


def context_params(spec: LoadSpec) -> Any:
    """llama.cpp context parameters for a spec (the engine and the dry run use the same)."""
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = spec.n_ctx * spec.parallel
    cparams.n_seq_max = spec.parallel
    cparams.kv_unified = False  # one stream per sequence (see LlamaEngine)
    cparams.n_batch = spec.n_batch
    cparams.n_ubatch = spec.n_ubatch
    # One thread per physical core for both kinds of step, as llama.cpp's own tools do
    # (llama-cpp-python's cpu_count // 2 for single-token steps idles half of a VM's cores).
    threads = spec.n_threads or threads_for("auto")[0]
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.flash_attn_type = 1 if spec.flash_attn else 0
    cparams.swa_full = spec.swa_full
    cparams.type_k = KV_CACHE_TYPES[spec.cache_type_k]
    cparams.type_v = KV_CACHE_TYPES[spec.cache_type_v]
    # With no layer on the GPU keep every op on the CPU too, so that a CPU-only plan really
    # uses no VRAM (op offload would stage weights on the card).
    cparams.op_offload = spec.op_offload and spec.n_gpu_layers != 0
    cparams.no_perf = True
    return cparams


MEASURE_PROMPT = 64  # tokens in each measured sequence's cache (a short chat prompt)
MEASURE_PREFILL = 256  # tokens of the one prompt whose processing rate is measured


def measure_decode_rates(model: Any, spec: LoadSpec, sizes: tuple[int, ...]) -> dict[int, float]:
    """Tokens per second of one decode step with n sequences generating, for each n in
    `sizes` (see executor.engine.decode_rates): a throwaway context with a KV stream per sequence
    as the real one has, a 64-token prompt decoded once (it also pages the weights in) and
    copied to every sequence, then the fastest of three steps per size. Stops early once two
    doublings in a row (from 8 sequences on) gained under 2 %: on a small model one step of
    2 sequences can cost as much as two of 1 (a matrix-vector kernel against a small
    matrix-matrix one) while 4, 8 … 64 keep gaining (147, 147, 200, 249 … 322 tok/s here),
    so a single flat doubling is no end. Empty if llama.cpp cannot make the context."""
    most = max(sizes)
    spec_batch = max(most, MEASURE_PROMPT, MEASURE_PREFILL)
    cparams = context_params(
        replace(spec, n_ctx=MEASURE_PREFILL, parallel=most, n_batch=spec_batch,
                n_ubatch=min(spec.n_ubatch, spec_batch))
    )  # fmt: skip
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        return {}
    batch = llama_cpp.llama_batch_init(spec_batch, 0, most)
    memory = llama_cpp.llama_get_memory(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def decode(entries: list[tuple[int, int]], last_only: bool = False) -> float:
        """Seconds of one llama_decode of these (sequence, position) tokens; logits for
        every token, or (a prompt) for its last only."""
        batch.n_tokens = 0
        for i, (seq, pos) in enumerate(entries):
            batch.token[i] = (pos * 7919 + 11) % n_vocab  # any tokens: the cost is the same
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = not last_only or i == len(entries) - 1
            batch.n_tokens = i + 1
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while measuring")
        return time.perf_counter() - started

    rates: dict[int, float] = {}
    flat = 0  # doublings in a row that gained less than FLAT
    try:
        decode([(0, pos) for pos in range(MEASURE_PROMPT)])
        for seq in range(1, most):
            llama_cpp.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        for n in sorted(sizes):
            fastest = min(
                decode([(seq, MEASURE_PROMPT + rep) for seq in range(n)]) for rep in range(3)
            )
            for seq in range(n):
                llama_cpp.llama_memory_seq_rm(memory, seq, MEASURE_PROMPT, -1)
            rates[n] = n / fastest
            before = max((m for m in rates if m < n), default=None)
            flat = flat + 1 if before is not None and rates[n] < rates[before] * FLAT else 0
            if flat >= 2 and n >= 8:
                break  # compute-bound: more sequences would only add memory
        # Prompt processing: one long prompt decoded at once (a matrix-matrix pass, many
        # times the decode rate per token), the faster of two; the estimate needs both.
        for seq in range(most):
            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        timings = []
        for _ in range(2):
            llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
            timings.append(decode([(0, pos) for pos in range(MEASURE_PREFILL)], last_only=True))
        rates[PROMPT_RATE] = MEASURE_PREFILL / min(timings)
    except RuntimeError:
        pass  # what was measured so far still counts
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return rates


def capabilities() -> dict[str, Any]:
    """What this llama-cpp-python build can do (for `executor doctor`)."""
    return {
        "version": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }


def dry_run(spec: LoadSpec, *, allocate: bool = False) -> DryRun:
    """Ask llama.cpp what it would allocate for this spec, without allocating (no_alloc).

    Weights are not read (the model file may be sparse); the sizes come from llama.cpp's own
    log lines, which it prints in this mode exactly as in a real load. With `allocate` it
    loads for real instead (same log lines), e.g. to check the dry run itself.
    """
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    model = ctx = None
    try:
        mparams, overrides = model_params(spec)
        if not allocate:
            mparams.no_alloc = True
            mparams.load_mode = 0  # LLAMA_LOAD_MODE_NONE: the dry run must not mmap weights
        model = llama_cpp.llama_model_load_from_file(spec.model_path.encode(), mparams)
        del overrides  # read while loading
        if not model:
            raise LoadError(f"llama.cpp could not read {spec.model_path}")
        cparams = context_params(spec)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise LoadError("llama.cpp could not plan a context for this model")
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        if model:
            llama_cpp.llama_model_free(model)
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return parse_allocation_log("".join(lines))


_MIB = 2**20


def parse_allocation_log(text: str) -> DryRun:
    """The buffer sizes llama.cpp logs while loading (real or no_alloc). Sizes are logged in
    MiB with two decimals; a sliding-window model logs two KV caches, which are summed."""
    compute = {
        m[1]: int(float(m[2]) * _MIB)
        for m in re.finditer(r"(\S+) compute buffer size =\s+([\d.]+) MiB", text)
    }
    weights: dict[str, int] = {}
    for m in re.finditer(r"(\S+) model buffer size =\s+([\d.]+) MiB", text):
        weights[m[1]] = weights.get(m[1], 0) + int(float(m[2]) * _MIB)
    kv = re.findall(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells", text)
    output = re.search(r"output buffer size =\s+([\d.]+) MiB", text)
    n_ctx = re.search(r"llama_context: n_ctx\s+= (\d+)", text)
    n_ctx_seq = re.search(r"llama_context: n_ctx_seq\s+= (\d+)", text)
    flash = re.search(r"llama_context: flash_attn\s+= (\w+)", text)
    devices = {int(m[1]): m[2] for m in re.finditer(r"layer\s+(\d+): dev = (\S+)", text)}
    overridden = re.findall(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)", text)
    return DryRun(
        compute=compute,
        kv_bytes=sum(int(float(size) * _MIB) for size, _ in kv),
        kv_cells=int(kv[0][1]) if kv else 0,
        output_bytes=int(float(output[1]) * _MIB) if output else 0,
        layer_devices=devices,
        gpu_offload_supported=bool(llama_cpp.llama_supports_gpu_offload()),
        n_ctx=int(n_ctx[1]) if n_ctx else 0,
        n_ctx_seq=int(n_ctx_seq[1]) if n_ctx_seq else 0,
        flash_attn=flash[1] if flash else "",
        weights=weights,
        overridden=dict(overridden),
    )
