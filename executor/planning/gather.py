"""Gathering what the plan needs, then planning: the model's tensor table, the GPU and its
free memory (NVML), the RAM, the context the job's prompts need (workload.py), the threads
and parallel sequences, and what past loads on this card taught (the placement that worked,
a measured excess); then the pure plan (plan.py): the most on the GPU that fits the cap,
never more than a placement remembered to work or a ceiling lowered by an OOM earlier in
this run; on a GPU, llama.cpp's own dry run of that placement confirms (or corrects) the
compute buffer. `plan_for` is what `executor plan`, the loader and the doctor call.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from executor.config import Settings
from executor.engine import decode_rates
from executor.engine.probes import dry_run, engine_capabilities
from executor.engine.protocol import DryRun, LoadSpec
from executor.errors import ConfigError, ModelError
from executor.gguf.info import ModelInfo, read_model_info
from executor.gguf.models import quick_sha256
from executor.machine import gpu, system
from executor.machine.cpus import threads_for
from executor.machine.gpu import Device
from executor.planning.job_settings import settings_for_job
from executor.planning.placement import Placement
from executor.planning.plan import (
    Plan,
    choose_parallel,
    describe,
    make_plan,
    most_parallel_in_ram,
    rank,
)
from executor.planning.sizes import PlanRequest
from executor.planning.workload import DEFAULT_CTX, context_for, job_context_need
from executor.store import Database, results
from executor.store import loads as load_store
from executor.store.loads import ConfigKey
from executor.store.queue import Job
from executor.units import format_bytes, parse_cap, parse_size

log = logging.getLogger(__name__)

# The settings that shape a load, whose origins a plan states.
ORIGIN_KEYS = ("ctx", "parallel", "vram_cap", "gpu_layers", "n_ubatch", "placement",
               "flash_attn", "cache_type", "swa_full", "threads")  # fmt: skip

UBATCH_CHOICES = (2048, 1024, 512)


# --- gathering and planning ----------------------------------------------------------------


@dataclass(frozen=True)
class PlanReport:
    """A plan with everything that went into it, for `executor plan` and the worker."""

    model: ModelInfo
    plan: Plan
    key: ConfigKey
    probe: gpu.Probe | None  # None when planning for a card given by --gpu-total
    known: Placement | None  # remembered to work on this configuration
    dry_run: DryRun | None = None
    dry_run_note: str = ""
    context_note: str = ""  # how the context was chosen
    ubatch_note: str = ""  # what a larger ubatch would trade
    threads: int = 1  # CPU threads for llama.cpp
    threads_note: str = ""  # why that many
    parallel_note: str = ""  # how --parallel auto chose on the CPU
    measure_parallel: tuple[int, ...] = ()  # sizes the model process measures at load
    offload_warning: str = ""  # a GPU is here and this llama.cpp build cannot use it
    # The settings planned with: the worker's, with the job's load settings applied
    # (job_settings.py); their sources say where each value came from.
    settings: Settings | None = None

    def origins(self) -> dict[str, str]:
        """Where each load setting came from: flag, env, config file, job N or default."""
        if self.settings is None:
            return {}
        return {k: self.settings.sources.get(k, "default") for k in ORIGIN_KEYS}

    def as_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": {
                "path": m.path,
                "architecture": m.architecture,
                "layers": m.n_layer,
                "experts": m.n_expert,
                "experts_used": m.n_expert_used,
                "sliding_window": m.n_swa,
                "file_size": m.file_size,
                "weights": m.weights_bytes,
                "weights_by_class": m.class_bytes(),
                "quantization": m.quantization,
                "sha256": self.key.model_sha256 or None,
                "sha256_note": None
                if self.key.model_sha256
                else "not hashed yet: the first `executor run` hashes it once and keeps it",
            },
            "gpu": None if self.plan.device is None else vars(self.plan.device),
            "gpu_problem": self.probe.problem if self.probe else None,
            "plan": self.plan.as_dict(),
            "remembered": None if self.known is None else self.known.as_dict(),
            "dry_run": None if self.dry_run is None else vars(self.dry_run),
            "dry_run_note": self.dry_run_note,
            "context_note": self.context_note,
            "ubatch_note": self.ubatch_note,
            "threads": self.threads,
            "threads_note": self.threads_note,
            "parallel_note": self.parallel_note,
            "measure_parallel": list(self.measure_parallel),
            "offload_warning": self.offload_warning or None,
            "origins": self.origins(),
        }


def plan_for(
    settings: Settings,
    db: Database | None,
    model_path: str | Path,
    *,
    job: Job | None = None,
    nvml: Any | None = None,
    gpu_total: str | None = None,
    ram_total: str | None = None,
    use_dry_run: bool | None = None,
    sha256: str | None = None,
    ceiling: Placement | None = None,
    build_offloads: Callable[[], bool | None] | None = None,
) -> PlanReport:
    """Plan a load of `model_path` on this machine's GPU (or a card of `gpu_total`), for
    `job`'s work when given (its context need sizes `ctx: auto`).

    With `gpu_total` the plan is for another machine: its RAM is `ram_total` if given, and
    this machine's RAM is not checked. `use_dry_run`: ask llama.cpp to confirm the sizes
    (None: only when a GPU is there, where the compute buffer matters most). `ceiling`: at
    most this placement (an OOM earlier in this run). `build_offloads`: whether this
    llama.cpp build can use a GPU (default: asked of a throwaway process, only when it
    matters); a GPU it cannot use is planned without, and said loudly.
    """
    path = Path(model_path)
    info = read_model_info(path)
    probe, device = device_for(settings, nvml, gpu_total)
    settings = settings_for_job(settings, job, device.total if device else None)
    offload_warning = ""
    cpu_reason = PlanRequest.cpu_reason
    if not gpu_total:
        ask = build_offloads or build_can_offload
        unused = device
        offload_warning, device = check_offload(settings, device, ask)
        if unused is not None and device is None:
            cpu_reason = f"{unused.name} is not used (this llama-cpp-python cannot offload)"
    cap = (
        parse_cap(settings.vram_cap).resolve(device.total) if settings.vram_cap and device else None
    )
    n_ctx, context_note = _context(settings, db, info, job)
    base = _request(settings, device, n_ctx, 1, 512, cap, gpu_total, ram_total)
    # Hashing a 64 GB file takes minutes: plan from the cached hash (small files are hashed
    # now); the worker hashes once and caches.
    sha256 = sha256 or quick_sha256(db, path) or ""
    threads, threads_note = threads_for(settings.threads)
    parallel = settings.parallel
    measure: tuple[int, ...] = ()
    parallel_note = ""
    if parallel == "auto":
        parallel = choose_parallel(info, device, base)
        if parallel is None:
            parallel, measure, parallel_note = _cpu_parallel(db, info, base, job, sha256, threads)
    n_ubatch, ubatch_note = _ubatch(settings, info, device, replace(base, parallel=parallel))
    key = ConfigKey(
        model_sha256=sha256,
        gpu_uuid=device.uuid if device else "cpu",
        cap_setting=settings.vram_cap or "",
        n_ctx=n_ctx,
        parallel=int(parallel),
        n_ubatch=n_ubatch,
    )
    remembered = db is not None and device is not None and bool(sha256)
    stored = load_store.known_placement(db, key) if remembered else None  # type: ignore[arg-type]
    known = Placement.from_dict(stored) if stored else None
    request = replace(
        base,
        cpu_reason=cpu_reason,
        parallel=int(parallel),
        n_ubatch=n_ubatch,
        n_batch=max(settings.n_batch, n_ubatch),
        correction=load_store.measured_excess(db, key) if remembered else 0,  # type: ignore[arg-type]
        known=_lowest(info, request_by_tensor(settings), known, ceiling),
    )
    plan = make_plan(info, device, request)
    if job is not None and settings.ctx == "auto" and device is not None and n_ctx < DEFAULT_CTX:
        context_note += _what_the_context_bought(info, device, request, plan)
    report = PlanReport(
        info, plan, key, probe, known, context_note=context_note, ubatch_note=ubatch_note,
        threads=threads, threads_note=threads_note, parallel_note=parallel_note,
        measure_parallel=measure, offload_warning=offload_warning, settings=settings,
    )  # fmt: skip
    if gpu_total:
        return replace(
            report, dry_run_note="no dry run: the card is not in this machine (--gpu-total)"
        )
    if settings.engine == "llama" and (use_dry_run or (use_dry_run is None and device)):
        return _confirm_with_dry_run(settings, report, device, request)
    return report


REBUILD_FOR_GPU = "make setup GPU=cuda (README: With an NVIDIA GPU)"


def build_can_offload() -> bool | None:
    """llama_supports_gpu_offload() of the installed llama-cpp-python, from a throwaway
    process (the parent never imports llama.cpp); None when it cannot say."""
    caps = engine_capabilities()
    return None if isinstance(caps, str) else bool(caps["gpu_offload"])


def check_offload(
    settings: Settings, device: Device | None, build_offloads: Callable[[], bool | None]
) -> tuple[str, Device | None]:
    """(warning, the device to plan for) when the llama.cpp build cannot use a GPU.

    A GPU this build cannot use is planned without and said loudly: on a real card a
    night's work would run at a twentieth of the speed. GPU layers asked for explicitly
    (--gpu-layers, config, a job spec's load) on such a build are refused unless
    --allow-cpu: the user meant the GPU, not a silent CPU run. ModelError then.
    """
    asked = settings.gpu_layers not in ("auto", 0)
    if settings.engine != "llama" or (device is None and not asked):
        return "", device
    # Tests that plan for a fake GPU (EXECUTOR_FAKE_NVML) on a CPU build say "1" here.
    fake = os.environ.get("EXECUTOR_FAKE_GPU_OFFLOAD")
    offloads = fake == "1" if fake in ("0", "1") else build_offloads()
    if offloads is not False:
        return "", device  # it can, or it cannot say (doctor says more)
    if asked and not settings.allow_cpu:
        layers = "all" if settings.gpu_layers == -1 else settings.gpu_layers
        source = settings.sources.get("gpu_layers", "")
        raise ModelError(
            f"gpu_layers {layers}{f' ({source})' if source else ''} asks for layers on a GPU, "
            "but this llama-cpp-python was built without GPU offload",
            hint=f"build it with CUDA: {REBUILD_FOR_GPU}; or pass --allow-cpu "
            "(EXECUTOR_ALLOW_CPU=1) to run on the CPU",
        )
    if device is None:
        return "", None
    return (
        f"{device.name} is here but this llama-cpp-python was built without GPU offload: "
        f"the model runs on the CPU, many times slower. Fix: {REBUILD_FOR_GPU}"
    ), None


def request_by_tensor(settings: Settings) -> bool:
    return settings.placement == "tensors"


def _lowest(model: ModelInfo, by_tensor: bool, *placements: Placement | None) -> Placement | None:
    given = [p for p in placements if p is not None]
    return max(given, key=lambda p: rank(model, p, by_tensor), default=None)


def _cpu_parallel(
    db: Database | None,
    info: ModelInfo,
    single: PlanRequest,
    job: Job | None,
    sha256: str,
    threads: int,
) -> tuple[int, tuple[int, ...], str]:
    """`--parallel auto` on the CPU: from decode rates measured on this host before, else
    the most allowed, to be measured at load. At most the job's unfinished items (more
    sequences would idle) and what fits in RAM. (parallel, sizes to measure, note)."""
    most = decode_rates.SIZES[-1]
    why = ""
    if job is not None and db is not None:
        (progress,) = results.progress(db, [job])
        left = max(1, job.item_count - progress.finished)
        if left < most:
            items = "item" if left == 1 else "items"
            most, why = left, f"; at most the job's {left} unfinished {items}"
    in_ram = most_parallel_in_ram(info, single, most)
    if in_ram < most:
        most, why = in_ram, f"; at most {in_ram}, whose KV cache fits in RAM"
    rates = (
        load_store.decode_rates_for(db, sha256, socket.gethostname(), threads)
        if db is not None and sha256
        else {}
    )
    if rates and not decode_rates.worth_more(rates, most):
        n = decode_rates.pick_parallel(rates, most)
        return (
            n,
            (),
            (
                f"parallel {n}: the most sequences within {decode_rates.WITHIN:.0%} of the best "
                f"decode rate measured on this host ({decode_rates.describe(rates)}){why}"
            ),
        )
    again = (
        f" (those measured before stop at {max(decode_rates.decode_only(rates))} sequences "
        "and were still growing)"
        if rates
        else ""
    )
    return (
        most,
        decode_rates.candidates(most),
        (
            f"parallel up to {most}: decode rates are measured when the model loads (once per "
            f"model, host and thread count){again} and the most sequences within "
            f"{decode_rates.WITHIN:.0%} of the best are used{why}"
        ),
    )


def device_for(
    settings: Settings, nvml: Any | None, gpu_total: str | None
) -> tuple[gpu.Probe | None, Device | None]:
    if gpu_total:
        try:
            total = parse_size(gpu_total)
        except ValueError as exc:
            raise ConfigError(f"--gpu-total: {exc}") from None
        name = f"a {format_bytes(total)} card (--gpu-total)"
        return None, Device(name=name, uuid="planned", total=total, free=total)
    probe = gpu.probe(nvml)
    card = card_for(settings, probe)
    return probe, card.as_device() if card else None


def card_for(settings: Settings, probe: gpu.Probe) -> gpu.GpuInfo | None:
    """This worker's GPU: the scheduler's (CUDA_VISIBLE_DEVICES) or the `gpu` setting's;
    ConfigError (exit 2) when the two disagree."""
    try:
        return gpu.worker_card(
            probe, settings.gpu, explicit=settings.sources.get("gpu", "default") != "default"
        )
    except gpu.BindingError as exc:
        raise ConfigError(
            str(exc),
            hint="leave --gpu / gpu: unset under a scheduler (it takes the first GPU it "
            "gives), or give one of the listed ones",
        ) from None


def _context(settings: Settings, db: Database, info: ModelInfo, job: Job | None) -> tuple[int, str]:
    """The context per sequence: the setting if fixed, else what the job's items need."""
    if settings.ctx != "auto":
        return int(settings.ctx), f"ctx {settings.ctx} ({settings.sources.get('ctx', 'set')})"
    if job is None or db is None:
        return DEFAULT_CTX, (
            f"ctx {DEFAULT_CTX}: no job to size it from (--job ID plans for a queued job's "
            "prompts; --ctx fixes it)"
        )
    need = job_context_need(db, job, settings.engine)
    ctx = context_for(need, info.n_ctx_train)
    if ctx is None:
        return DEFAULT_CTX, f"ctx {DEFAULT_CTX}: job {job.id} has no unfinished items"
    capped = " (the model's trained context)" if need and ctx < need else ""
    return ctx, (
        f"ctx {ctx}{capped}: sized from job {job.id}'s work (its longest prompt + max_tokens "
        f"needs {need} tokens)"
    )


def _what_the_context_bought(
    info: ModelInfo, device: Device, request: PlanRequest, plan: Plan
) -> str:
    """`; at ctx 4096: 3 of 5 layers instead` when the smaller context bought something."""
    default = make_plan(info, device, replace(request, n_ctx=DEFAULT_CTX, known=None))
    if default.placement == plan.placement:
        return ""
    return f"; at ctx {DEFAULT_CTX}: {describe(info, default.placement)} instead"


def _ubatch(
    settings: Settings, info: ModelInfo, device: Device | None, req: PlanRequest
) -> tuple[int, str]:
    """n_ubatch: the setting if fixed; on a GPU the largest of 2048/1024/512 that costs at
    most one block (of experts or of a layer) against 512 — with weights in RAM a bigger
    physical batch processes prompts several times faster (llama.cpp measured 203 → 2,090
    tok/s from 128 to 2048 with experts on the CPU); on the CPU 512."""
    if settings.n_ubatch != "auto":
        return int(settings.n_ubatch), ""
    if device is None:
        return 512, ""
    base = make_plan(info, device, req)
    if base.n_gpu_layers == 0:
        return 512, ""
    blocks = max(info.layer_bytes, default=0)
    for ubatch in UBATCH_CHOICES[:-1]:
        bigger = make_plan(info, device, replace(req, n_ubatch=ubatch, n_batch=ubatch))
        lost = base.gpu.layer_weights + base.gpu.output_layer
        lost -= bigger.gpu.layer_weights + bigger.gpu.output_layer
        if bigger.n_gpu_layers == base.n_gpu_layers and lost <= blocks:
            note = f"ubatch {ubatch}: prompts are processed {ubatch // 512}× more at a time" + (
                f", for {format_bytes(lost)} of weights moved to RAM" if lost > 0 else ""
            )
            return ubatch, note
    return 512, "ubatch 512: a larger one would move more than a block's weights to RAM"


def _request(
    settings: Settings,
    device: Device | None,
    n_ctx: int,
    parallel: int,
    n_ubatch: int,
    cap: int | None,
    gpu_total: str | None,
    ram_total: str | None,
) -> PlanRequest:
    """The plan request the settings describe, before memory of past loads is added."""
    return PlanRequest(
        n_ctx=n_ctx,
        parallel=parallel,
        cache_type_k=settings.cache_type,
        cache_type_v=settings.cache_type,
        n_batch=max(settings.n_batch, n_ubatch),
        n_ubatch=n_ubatch,
        flash_attn=flash_attn_for(settings, device),
        swa_full=swa_full_for(settings, device),
        by_tensor=request_by_tensor(settings),
        vram_cap=cap,
        gpu_layers=None if settings.gpu_layers == "auto" else int(settings.gpu_layers),
        ram_available=_ram(gpu_total, ram_total),
    )


def flash_attn_for(settings: Settings, device: Device | None) -> bool:
    """auto: on when layers go to a GPU (it keeps the compute buffer small), off on the CPU."""
    if settings.flash_attn == "auto":
        return device is not None
    return settings.flash_attn == "on"


def swa_full_for(settings: Settings, device: Device | None) -> bool:
    """auto: full-size sliding-window caches without a GPU, the window only with one.

    Measured (benchmarks/swa.py, window 32, a shared 300-word system prompt): the window only
    holds 0.69× the KV memory of full-size caches, and as long as answers are short the
    shared prompt prefix is still in the cache when the next prompt wants it (the same 1,002
    of 14,086 prompt tokens computed); with 800-token answers the prefix has left the window
    and 10.6× more prompt tokens are computed. On a GPU the memory buys routed experts or
    layers, which every token uses; in RAM memory is cheap and reuse saves prompt work."""
    if settings.swa_full == "auto":
        return device is None
    return settings.swa_full == "on"


def _ram(gpu_total: str | None, ram_total: str | None) -> int | None:
    if ram_total:
        try:
            return parse_size(ram_total)
        except ValueError as exc:
            raise ConfigError(f"--ram-total: {exc}") from None
    return None if gpu_total else system.ram_available()


def load_spec(
    settings: Settings, plan: Plan, model_path: str, gpu_uuid: str | None = None
) -> LoadSpec:
    """The model process's load for a plan: its context, layers, rules and batch; the rest
    (engine, threads, seed, KV type) from the settings."""
    req = plan.request
    return LoadSpec(
        engine=settings.engine,
        model_path=model_path,
        n_ctx=req.n_ctx,
        n_gpu_layers=plan.n_gpu_layers,
        n_threads=threads_for(settings.threads)[0],
        adapt_threads=settings.threads == "auto",
        seed=settings.seed,
        parallel=req.parallel,
        n_batch=max(settings.n_batch, plan.n_ubatch),
        n_ubatch=plan.n_ubatch,
        flash_attn=req.flash_attn,
        cache_type_k=settings.cache_type,
        cache_type_v=settings.cache_type,
        swa_full=req.swa_full,
        tensor_overrides=tuple(tuple(r.rsplit("=", 1)) for r in plan.rules),  # type: ignore[misc]
        gpu_uuid=gpu_uuid,
    )


def _confirm_with_dry_run(
    settings: Settings, report: PlanReport, device: Device | None, request: PlanRequest
) -> PlanReport:
    """Ask llama.cpp for its exact buffer sizes; correct the plan if the GPU needs more."""
    info = report.model
    for _ in range(2):  # the corrected plan may move the placement once
        result = dry_run(load_spec(settings, report.plan, info.path))
        if isinstance(result, str):
            return replace(report, dry_run_note=f"llama.cpp dry run not available: {result}")
        report = replace(report, dry_run=result)
        gpu_compute = sum(
            size
            for name, size in result.compute.items()
            if name != "CPU" and not name.endswith("_Host")
        )
        if (
            device is None
            or report.plan.n_gpu_layers == 0
            or gpu_compute <= report.plan.gpu.compute_buffer
        ):
            return replace(report, dry_run_note="llama.cpp dry run confirms the compute buffer")
        extra = gpu_compute - report.plan.gpu.compute_buffer
        request = replace(request, correction=request.correction + extra)
        report = replace(
            report,
            plan=make_plan(info, device, request),
            dry_run_note=(
                f"llama.cpp dry run: the GPU compute buffer is {format_bytes(extra)} larger "
                "than estimated; plan corrected"
            ),
        )
    return report
