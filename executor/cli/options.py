"""The options commands share, declared once (Typer reads them from the annotations)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

# --- options shared by commands ----------------------------------------------------------------

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database: a file path (SQLite) or a SQLAlchemy URL. "
        "[env EXECUTOR_DB; default $XDG_DATA_HOME/executor/executor.db]",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="YAML config file. [env EXECUTOR_CONFIG; default "
        "$XDG_CONFIG_HOME/executor/config.yaml if it exists]",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
AllowCpuOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-cpu",
        help="Run on the CPU even though --gpu-layers (or a job spec) asks for GPU layers and "
        "this llama-cpp-python cannot offload (build it with: make setup GPU=cuda).",
        show_default=False,
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="Log lines on stderr: plain or json. [env EXECUTOR_LOG_FORMAT]",
        show_default=False,
    ),
]
JobArg = Annotated[int, typer.Argument(help="Job id, as printed by submit or status.")]
VramCapOpt = Annotated[
    str | None,
    typer.Option(
        "--vram-cap",
        help="Most VRAM to use: 11.5GiB (powers of two), 12GB (powers of ten), bytes, "
        "or 90% of the card. [env EXECUTOR_VRAM_CAP; default: free VRAM]",
        show_default=False,
    ),
]
CtxOpt = Annotated[
    str | None,
    typer.Option(
        "--ctx",
        "-c",
        help="Tokens per sequence: auto (the job's longest prompt + its max_tokens, rounded up "
        "to 256) or a number. [env EXECUTOR_CTX; default auto]",
        show_default=False,
    ),
]
ParallelOpt = Annotated[
    str | None,
    typer.Option(
        "--parallel",
        "-np",
        help="Sequences decoded together: auto or a number; the KV cache holds ctx × "
        "parallel. [env EXECUTOR_PARALLEL; default auto]",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    str | None,
    typer.Option(
        "--threads",
        "-t",
        help="CPU threads for llama.cpp, single-token and batch steps alike: auto (one per "
        "physical core this process may use, as llama.cpp's tools count them) or a number. "
        "[env EXECUTOR_THREADS; default auto]",
        show_default=False,
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="The GPU to use, nvidia-smi's index. Under a scheduler that sets "
        "CUDA_VISIBLE_DEVICES (Slurm --gres, Kubernetes, Docker): the first GPU it gives, and "
        "--gpu must be one of them. [env EXECUTOR_GPU; default 0]",
        show_default=False,
    ),
]
GpuLayersOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-layers",
        "-ngl",
        help="Layers on the GPU: auto (planned under the cap), all, or a number "
        "(llama.cpp's n_gpu_layers: the output layer counts as one; no tensor rules). "
        "[env EXECUTOR_GPU_LAYERS]",
        show_default=False,
    ),
]
UbatchOpt = Annotated[
    str | None,
    typer.Option(
        "--ubatch",
        "-ub",
        help="Physical batch (llama.cpp's n_ubatch): auto (512; on a GPU up to 2048 when it "
        "costs no block) or a number. [env EXECUTOR_N_UBATCH]",
        show_default=False,
    ),
]
PlacementOpt = Annotated[
    str | None,
    typer.Option(
        "--placement",
        help="tensors (MoE: routed experts to RAM first, attention on the GPU; partial "
        "blocks) or layers (whole layers only). [env EXECUTOR_PLACEMENT; default tensors]",
        show_default=False,
    ),
]
SwaFullOpt = Annotated[
    str | None,
    typer.Option(
        "--swa-full",
        help="Sliding-window layers keep the whole context: auto (on without a GPU, off with "
        "one: the memory goes to weights), on (every shared prompt prefix reusable), off. "
        "[env EXECUTOR_SWA_FULL; default auto]",
        show_default=False,
    ),
]
CacheTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--cache-type", help="KV cache type: f16, q8_0 or q4_0. [default f16]", show_default=False
    ),
]
FlashOpt = Annotated[
    str | None,
    typer.Option(
        "--flash-attn",
        help="auto (on when layers go to a GPU), on or off. [default auto]",
        show_default=False,
    ),
]
AllowSwapOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-swap",
        help="Go ahead even if the CPU part does not fit in RAM (very slow).",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format", help="executor (one object per item) or openai (OpenAI Batch API output)."
    ),
]
ErrorsOpt = Annotated[
    str | None,
    typer.Option(
        "--errors",
        help="With --format openai: write failed requests to this file.",
        show_default=False,
    ),
]
ProvenanceOpt = Annotated[
    bool,
    typer.Option(
        "--with-provenance",
        help="Add each result's model sha256, parameters and the load "
        "(GPU layers, cap, measured VRAM) it ran under.",
    ),
]


# The load flags `run` and `plan` share, declared once: parameter → (setting, option).
LOAD_FLAGS: dict[str, tuple[str, Any]] = {
    "gpu": ("gpu", GpuOpt),
    "ctx": ("ctx", CtxOpt),
    "gpu_layers": ("gpu_layers", GpuLayersOpt),
    "vram_cap": ("vram_cap", VramCapOpt),
    "parallel": ("parallel", ParallelOpt),
    "ubatch": ("n_ubatch", UbatchOpt),
    "placement": ("placement", PlacementOpt),
    "swa_full": ("swa_full", SwaFullOpt),
    "cache_type": ("cache_type", CacheTypeOpt),
    "flash_attn": ("flash_attn", FlashOpt),
    "threads": ("threads", ThreadsOpt),
    "allow_swap": ("allow_swap", AllowSwapOpt),
    "allow_cpu": ("allow_cpu", AllowCpuOpt),
}

F = TypeVar("F", bound=Callable[..., Any])


def with_load_flags(func: F) -> F:
    """Give a command the shared load flags; it receives them as `load`, a dict of settings
    keys (None where the flag was not given), in place of twelve parameters."""
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "load"]
    flags = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
        for name, (_, option) in LOAD_FLAGS.items()
    ]

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        load = {key: kwargs.pop(name) for name, (key, _) in LOAD_FLAGS.items()}
        return func(*args, load=load, **kwargs)

    command.__signature__ = signature.replace(parameters=own + flags)  # type: ignore[attr-defined]
    return command  # type: ignore[return-value]
