"""Gathering what the plan needs (model, card, cap, memory of past loads) and showing it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from executor import gpu, system
from executor.config import Settings
from executor.engine import DryRun, LoadSpec
from executor.errors import ConfigError
from executor.gguf_info import ModelInfo, read_model_info
from executor.models import cached_model_sha256
from executor.plan import Device, Plan, PlanRequest, make_plan
from executor.store import Database
from executor.store import loads as load_store
from executor.store.loads import ConfigKey
from executor.supervisor import dry_run
from executor.units import format_bytes, parse_cap, parse_size


@dataclass
class PlanReport:
    """A plan with everything that went into it, for `executor plan` and the worker."""

    model: ModelInfo
    plan: Plan
    key: ConfigKey
    probe: gpu.Probe | None  # None when planning for a card given by --gpu-total
    known_layers: int | None
    dry_run: DryRun | None = None
    dry_run_note: str = ""
    estimated_gpu_compute: int = 0  # the pure estimate, before a dry run corrected it

    def as_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": {
                "path": m.path,
                "architecture": m.architecture,
                "layers": m.n_layer,
                "file_size": m.file_size,
                "weights": m.weights_bytes,
                "quantization": m.quantization,
                "sha256": self.key.model_sha256,
            },
            "gpu": None if self.plan.device is None else vars(self.plan.device),
            "gpu_problem": self.probe.problem if self.probe else None,
            "plan": self.plan.as_dict(),
            "remembered_layers": self.known_layers,
            "dry_run": None if self.dry_run is None else vars(self.dry_run),
            "dry_run_note": self.dry_run_note,
        }


def load_spec(
    settings: Settings,
    model_path: str,
    n_gpu_layers: int,
    *,
    flash_attn: bool,
    parallel: int,
    gpu_uuid: str | None = None,
) -> LoadSpec:
    """The model process's load parameters from the settings."""
    return LoadSpec(
        engine=settings.engine,
        model_path=model_path,
        n_ctx=settings.ctx,
        n_gpu_layers=n_gpu_layers,
        n_threads=settings.threads,
        seed=settings.seed,
        parallel=parallel,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        flash_attn=flash_attn,
        cache_type_k=settings.cache_type,
        cache_type_v=settings.cache_type,
        gpu_uuid=gpu_uuid,
    )


def flash_attn_for(settings: Settings, device: Device | None) -> bool:
    """auto: on when layers go to a GPU (it keeps the compute buffer small), off on the CPU."""
    if settings.flash_attn == "auto":
        return device is not None
    return settings.flash_attn == "on"


def plan_for(
    settings: Settings,
    db: Database,
    model_path: str | Path,
    *,
    nvml: Any | None = None,
    gpu_total: str | None = None,
    ram_total: str | None = None,
    use_dry_run: bool | None = None,
    parallel: int | None = None,
    sha256: str | None = None,
) -> PlanReport:
    """Plan a load of `model_path` on this machine's first GPU (or a card of `gpu_total`).

    With `gpu_total` the plan is for another machine: its RAM is `ram_total` if given, and
    this machine's RAM is not checked. `use_dry_run`: ask llama.cpp to confirm the sizes
    (None: only when a GPU is there, where the compute buffer matters most).
    """
    path = Path(model_path)
    info = read_model_info(path)
    probe: gpu.Probe | None = None
    if gpu_total:
        try:
            total = parse_size(gpu_total)
        except ValueError as exc:
            raise ConfigError(f"--gpu-total: {exc}") from None
        device: Device | None = Device(
            name=f"a {format_bytes(total)} card (--gpu-total)",
            uuid="planned",
            total=total,
            free=total,
        )
    else:
        probe = gpu.probe(nvml)
        card = gpu.pick(probe, settings.gpu)
        device = card.as_device() if card else None
    cap = (
        parse_cap(settings.vram_cap).resolve(device.total) if settings.vram_cap and device else None
    )
    parallel = parallel or settings.parallel
    if parallel == "auto":
        parallel = choose_parallel(
            info, device, _request(settings, device, 1, cap, gpu_total, ram_total)
        )
    # Hashing a 64 GB file takes minutes: plan from the cached hash; the worker hashes.
    sha256 = sha256 or cached_model_sha256(db, path) or ""
    key = ConfigKey(
        model_sha256=sha256,
        gpu_uuid=device.uuid if device else "cpu",
        cap_setting=settings.vram_cap or "",
        n_ctx=settings.ctx,
        parallel=parallel,
    )
    remembered = device is not None and bool(sha256)
    known = load_store.known_layers(db, key) if remembered else None
    request = replace(
        _request(settings, device, parallel, cap, gpu_total, ram_total),
        correction=load_store.measured_excess(db, key) if remembered else 0,
        known_layers=known,
    )
    plan = make_plan(info, device, request)
    report = PlanReport(
        info, plan, key, probe, known, estimated_gpu_compute=plan.gpu.compute_buffer
    )
    if gpu_total:
        report.dry_run_note = "no dry run: the card is not in this machine (--gpu-total)"
    elif settings.engine == "llama" and (use_dry_run or (use_dry_run is None and device)):
        _confirm_with_dry_run(settings, report, info, device, request)
    return report


def _request(
    settings: Settings,
    device: Device | None,
    parallel: int,
    cap: int | None,
    gpu_total: str | None,
    ram_total: str | None,
) -> PlanRequest:
    """The plan request the settings describe, before memory of past loads is added."""
    return PlanRequest(
        n_ctx=settings.ctx,
        parallel=parallel,
        cache_type_k=settings.cache_type,
        cache_type_v=settings.cache_type,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        flash_attn=flash_attn_for(settings, device),
        vram_cap=cap,
        gpu_layers=None if settings.gpu_layers == "auto" else int(settings.gpu_layers),
        ram_available=_ram(gpu_total, ram_total),
    )


# Measured on 2 CPU cores with the default model (benchmarks/throughput.py): completion
# tokens/s 61, 91, 114 and 125 at parallel 1, 2, 4 and 8. Past 8 the gain flattens while each
# sequence adds a whole context of KV cache.
CPU_PARALLEL = 8
GPU_PARALLEL_CHOICES = (16, 8, 4, 2)


def choose_parallel(info: ModelInfo, device: Device | None, single: PlanRequest) -> int:
    """`--parallel auto`: on the CPU a fixed 8; on a GPU the most sequences whose KV cache
    fits under the cap without moving a single layer off the GPU."""
    if device is None:
        return CPU_PARALLEL
    layers = make_plan(info, device, single).n_gpu_layers
    if layers == 0:
        return CPU_PARALLEL
    for parallel in GPU_PARALLEL_CHOICES:
        plan = make_plan(info, device, replace(single, parallel=parallel))
        if plan.n_gpu_layers >= layers and plan.fits:
            return parallel
    return 1


def _ram(gpu_total: str | None, ram_total: str | None) -> int | None:
    if ram_total:
        try:
            return parse_size(ram_total)
        except ValueError as exc:
            raise ConfigError(f"--ram-total: {exc}") from None
    return None if gpu_total else system.ram_available()


def _confirm_with_dry_run(
    settings: Settings,
    report: PlanReport,
    info: ModelInfo,
    device: Device | None,
    request: PlanRequest,
) -> None:
    """Ask llama.cpp for its exact buffer sizes; correct the plan if the GPU needs more."""
    for _ in range(2):  # the corrected plan may move the layer count once
        spec = load_spec(
            settings,
            info.path,
            report.plan.n_gpu_layers,
            flash_attn=request.flash_attn,
            parallel=request.parallel,
        )
        result = dry_run(spec)
        if isinstance(result, str):
            report.dry_run_note = f"llama.cpp dry run not available: {result}"
            return
        report.dry_run = result
        if device is not None and not result.gpu_offload_supported:
            report.plan = make_plan(info, None, request)
            report.plan.notes.insert(
                0,
                "this llama-cpp-python was built without GPU offload: "
                "everything runs on the CPU (reinstall it with "
                "CMAKE_ARGS=-DGGML_CUDA=on)",
            )
            return
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
            report.dry_run_note = "llama.cpp dry run confirms the compute buffer"
            return
        extra = gpu_compute - report.plan.gpu.compute_buffer
        request = replace(request, correction=request.correction + extra)
        report.plan = make_plan(info, device, request)
        report.dry_run_note = (
            f"llama.cpp dry run: the GPU compute buffer is "
            f"{format_bytes(extra)} larger than estimated; plan corrected"
        )


def format_plan(report: PlanReport) -> str:
    """The plan as a table for people."""
    m, plan = report.model, report.plan
    lines = [
        f"model     {Path(m.path).name}  ({m.architecture}, {m.n_layer} blocks, "
        f"{m.quantization or '?'}, {format_bytes(m.file_size)})",
    ]
    if plan.device is None:
        problem = report.probe.problem if report.probe else None
        lines.append(f"GPU       none{f' ({problem})' if problem else ''}")
    else:
        d = plan.device
        lines.append(
            f"GPU       {d.name}: {format_bytes(d.total)} total, {format_bytes(d.free)} free"
        )
        lines.append(f"cap       {format_bytes(plan.cap)}  ({plan.cap_reason})")
    r = plan.request
    lines.append(
        f"context   {r.n_ctx} tokens × {r.parallel} sequence{'s' * (r.parallel > 1)}, "
        f"KV {r.cache_type_k}, flash attention {'on' if r.flash_attn else 'off'}, "
        f"ubatch {plan.n_ubatch}"
    )
    where = (
        f"the output layer + last {plan.gpu_blocks} blocks"
        if plan.n_gpu_layers
        else "everything on the CPU"
    )
    lines.append(f"layers    {plan.n_gpu_layers} of {plan.max_layers} on the GPU ({where})")
    if report.known_layers is not None:
        lines.append(
            f"memory    {report.known_layers} layers loaded and ran on this card "
            "before with these settings"
        )
    lines.append("")
    rows = [
        ("layer weights", plan.gpu.layer_weights, plan.cpu.layer_weights),
        ("output layer", plan.gpu.output_layer, plan.cpu.output_layer),
        ("token embedding", None, plan.cpu.token_embedding),
        ("KV cache", plan.gpu.kv_cache, plan.cpu.kv_cache),
        ("compute buffer", plan.gpu.compute_buffer, plan.cpu.compute_buffer),
        ("output buffer", None, plan.cpu.output_buffer),
        ("CUDA reserve", plan.gpu.cuda_reserve, None),
    ]
    if plan.gpu.correction:
        rows.append(("measured excess", plan.gpu.correction, None))
    rows.append(("total", plan.gpu.total, plan.cpu.total))
    lines.append(f"{'':18}{'GPU':>12}{'CPU':>12}")
    for label, g, c in rows:
        lines.append(f"{label:18}{_cell(g, plan.device is not None):>12}{_cell(c, True):>12}")
    lines.append("")
    if plan.ram_available is not None:
        state = "OK" if plan.ram_ok else "NOT ENOUGH"
        lines.append(
            f"RAM       {format_bytes(plan.ram_available)} available for the CPU part: {state}"
        )
    if report.dry_run is not None:
        compute = ", ".join(f"{k} {format_bytes(v)}" for k, v in report.dry_run.compute.items())
        lines.append(
            f"llama.cpp dry run: compute {compute}; KV {format_bytes(report.dry_run.kv_bytes)}"
        )
    if report.dry_run_note:
        lines.append(report.dry_run_note)
    lines += [f"note      {n}" for n in plan.notes]
    return "\n".join(lines)


def _cell(value: int | None, shown: bool) -> str:
    if value is None or not shown:
        return "-"
    return format_bytes(value)
