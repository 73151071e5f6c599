"""Loading a model under the VRAM cap: gather what the plan needs, plan, load, measure, shrink.

The sequence for one model:
  1. gather (plan_for): the model's tensor table, the GPU and its free memory (NVML), the RAM,
     and what past loads on this card taught (a layer count that worked, a measured excess);
     then the pure plan (executor.plan): the most layers whose predicted footprint fits the
     cap, never more than a count remembered to work or a ceiling lowered by an OOM earlier in
     this run; on a GPU, llama.cpp's own dry run confirms (or corrects) the compute buffer;
  2. start the model process with that many layers;
  3. measure the process's VRAM with NVML; above the cap (the cap is a ceiling, not a hint)
     kill it and shrink by the overshoot;
  4. an OOM at load (llama.cpp's allocation messages) or a crash while loading shrinks the
     layers by a step (10 % of them, at least one) and retries after an exponential backoff
     with jitter (tenacity), down to 0 layers; if even the CPU-only load fails, the job fails.
Every attempt is a row in `loads`; the count that loaded is remembered per (model, GPU, cap,
context, parallel) so the next run starts there.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_never,
    wait_random_exponential,
)

from executor import gpu, system
from executor.config import Settings
from executor.engine.faults import Faults
from executor.errors import ConfigError, ModelError
from executor.gguf_info import ModelInfo, read_model_info
from executor.gpu import Device
from executor.models import cached_model_sha256, check_default_hash, check_gguf, model_sha256
from executor.plan import Plan, PlanRequest, choose_parallel, kv_layer_bytes, make_plan, parts_for
from executor.records import DryRun, LoadSpec
from executor.store import Database
from executor.store import loads as load_store
from executor.store.loads import ConfigKey
from executor.store.schema import LoadOutcome
from executor.supervisor import Died, ModelLoadFailed, ModelProcess, dry_run
from executor.units import format_bytes, parse_cap, parse_size

log = logging.getLogger(__name__)

OOM = re.compile(
    r"out of memory|cudaMalloc failed|failed to allocate|unable to allocate|"
    r"ErrorOutOfDeviceMemory|std::bad_alloc|CUBLAS_STATUS_ALLOC_FAILED",
    re.IGNORECASE,
)


def is_oom(text: str) -> bool:
    """Whether llama.cpp/CUDA's words for running out of memory appear in `text`."""
    return bool(OOM.search(text))


# --- gathering and planning ----------------------------------------------------------------


@dataclass(frozen=True)
class PlanReport:
    """A plan with everything that went into it, for `executor plan` and the worker."""

    model: ModelInfo
    plan: Plan
    key: ConfigKey
    probe: gpu.Probe | None  # None when planning for a card given by --gpu-total
    known_layers: int | None
    dry_run: DryRun | None = None
    dry_run_note: str = ""

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


def plan_for(
    settings: Settings,
    db: Database,
    model_path: str | Path,
    *,
    nvml: Any | None = None,
    gpu_total: str | None = None,
    ram_total: str | None = None,
    use_dry_run: bool | None = None,
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
    parallel = settings.parallel
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
    report = PlanReport(info, plan, key, probe, known)
    if gpu_total:
        return replace(
            report, dry_run_note="no dry run: the card is not in this machine (--gpu-total)"
        )
    if settings.engine == "llama" and (use_dry_run or (use_dry_run is None and device)):
        return _confirm_with_dry_run(settings, report, device, request)
    return report


def flash_attn_for(settings: Settings, device: Device | None) -> bool:
    """auto: on when layers go to a GPU (it keeps the compute buffer small), off on the CPU."""
    if settings.flash_attn == "auto":
        return device is not None
    return settings.flash_attn == "on"


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
    device: Device | None,
    request: PlanRequest,
) -> PlanReport:
    """Ask llama.cpp for its exact buffer sizes; correct the plan if the GPU needs more."""
    info = report.model
    for _ in range(2):  # the corrected plan may move the layer count once
        spec = LoadSpec.from_settings(
            settings,
            info.path,
            report.plan.n_gpu_layers,
            flash_attn=request.flash_attn,
            parallel=request.parallel,
        )
        result = dry_run(spec)
        if isinstance(result, str):
            return replace(report, dry_run_note=f"llama.cpp dry run not available: {result}")
        report = replace(report, dry_run=result)
        if device is not None and not result.gpu_offload_supported:
            cpu_plan = make_plan(info, None, request)
            note = (
                "this llama-cpp-python was built without GPU offload: everything runs on "
                "the CPU (reinstall it with CMAKE_ARGS=-DGGML_CUDA=on)"
            )
            return replace(report, plan=replace(cpu_plan, notes=(note, *cpu_plan.notes)))
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


# --- loading --------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model process that is up, with the plan and the load row it runs under."""

    proc: ModelProcess
    load_id: int
    report: PlanReport
    n_gpu_layers: int
    parallel: int
    model_path: str
    sha256: str
    overrides: dict[str, Any] = field(default_factory=dict)  # the job's load settings


class _Retry(Exception):
    """This attempt failed in a way that fewer layers may fix."""


class ModelLoader:
    """Loads models for one worker and remembers what the card can take."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        worker_id: str,
        log_path: Path,
        *,
        nvml: Any | None = None,
        measure: Callable[[int, str], int | None] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        faults: Faults | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.worker_id = worker_id
        self.log_path = log_path
        self.nvml = nvml
        self.measure = measure or (lambda pid, uuid: gpu.process_vram(pid, uuid, nvml))
        self.stopping = stopping
        self.faults = faults or Faults.from_env()
        self.processes = 0
        # Per configuration: the most layers allowed after an OOM in this run.
        self.ceilings: dict[load_store.ConfigKey, int] = {}

    def load(self, model_path: str, overrides: dict[str, Any] | None = None) -> Loaded:
        """Plan and load `model_path`; shrink and retry on OOM. ModelError if it cannot load.

        `overrides`: settings a job asks for its model (ctx, parallel, vram_cap).
        """
        settings = replace(self.settings, **overrides) if overrides else self.settings
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        check_gguf(path)
        sha = model_sha256(self.db, path)
        check_default_hash(path, sha)
        report = plan_for(settings, self.db, path, nvml=self.nvml, sha256=sha)
        plan = report.plan
        if not plan.ram_ok and not settings.allow_swap:
            raise ModelError(
                f"{plan.notes[-1]}; refusing to load",
                hint="fewer CPU layers (a larger --vram-cap), a smaller --ctx, or --allow-swap "
                "to run anyway; then `executor retry JOB`",
            )
        state = {
            "layers": min(plan.n_gpu_layers, self.ceilings.get(report.key, 10**6)),
            "parallel": plan.request.parallel,
        }
        retrying = Retrying(
            retry=retry_if_exception_type(_Retry),
            wait=wait_random_exponential(multiplier=settings.backoff_seconds, max=60),
            stop=stop_never,
            reraise=True,
            before_sleep=self._log_backoff,
        )
        for attempt in retrying:
            with attempt:
                loaded = self._attempt(settings, path, sha, report, state)
                loaded.overrides = overrides or {}
                return loaded
        raise AssertionError("unreachable")

    def _attempt(
        self, settings: Settings, path: Path, sha: str, report: PlanReport, state: dict[str, int]
    ) -> Loaded:
        if self.stopping():
            raise ModelError("stopping: the model was not loaded")
        layers, parallel = state["layers"], state["parallel"]
        plan = report.plan
        device = plan.device
        predicted, estimate = self._predicted(report, layers)
        key = (
            replace(report.key, parallel=parallel)
            if parallel != report.key.parallel
            else report.key
        )
        load_id = load_store.start_load(
            self.db,
            key,
            worker_id=self.worker_id,
            model_path=str(path),
            gpu_name=device.name if device else None,
            vram_cap=plan.cap,
            n_gpu_layers=layers,
            predicted_vram=estimate if device else None,
            plan=plan.as_dict(),
        )
        spec = LoadSpec.from_settings(
            settings,
            str(path),
            layers,
            parallel=parallel,
            flash_attn=flash_attn_for(settings, device),
            gpu_uuid=device.uuid if device else None,
        )
        self.processes += 1
        proc = ModelProcess(
            spec, self.log_path, replace(self.faults, process_number=self.processes)
        )
        log.info(
            "loading %s with %d of %d layers on the GPU (predicted %s; cap %s; log %s)",
            path.name,
            layers,
            plan.max_layers,
            format_bytes(predicted),
            format_bytes(plan.cap),
            self.log_path,
            extra={"layers": layers},
        )
        try:
            proc.start(abort=self.stopping)
        except ModelLoadFailed as exc:
            reason = str(exc)
            oom = is_oom(reason)
            outcome = (
                LoadOutcome.OOM
                if oom
                else LoadOutcome.CRASHED
                if exc.crashed
                else LoadOutcome.FAILED
            )
            load_store.update_load(self.db, load_id, outcome=outcome, cause=reason, ended=True)
            if self.stopping():
                raise ModelError("stopping: the model was not loaded") from None
            why = f"{'out of memory' if oom else 'crashed'} at load"
            if (oom or exc.crashed) and self._shrink(state, report, why):
                raise _Retry(reason) from None
            raise ModelError(f"model {path} did not load: {reason}") from None
        if device is not None and layers != 0 and proc.pid is not None:
            measured = self.measure(proc.pid, device.uuid)
            if measured is not None:
                load_store.update_load(self.db, load_id, measured_vram=measured)
                log.info(
                    "VRAM measured %s (predicted %s, cap %s)",
                    format_bytes(measured),
                    format_bytes(predicted),
                    format_bytes(plan.cap),
                )
                if plan.cap is not None and measured > plan.cap:
                    proc.kill()
                    cause = (
                        f"measured {format_bytes(measured)} of VRAM, above the cap of "
                        f"{format_bytes(plan.cap)}"
                    )
                    load_store.update_load(
                        self.db, load_id, outcome=LoadOutcome.OVER_CAP, cause=cause, ended=True
                    )
                    if not self._shrink(state, report, cause, over=measured - plan.cap):
                        raise ModelError(f"model {path}: {cause}, even with no GPU layer")
                    raise _Retry(cause)
        load_store.update_load(self.db, load_id, outcome=LoadOutcome.LOADED)
        load_store.remember_layers(self.db, key, layers)
        if not proc.info.get("gpu_offload_supported", True) and layers:
            log.warning(
                "this llama-cpp-python was built without GPU offload: the model runs "
                "on the CPU (reinstall with CMAKE_ARGS=-DGGML_CUDA=on)"
            )
        return Loaded(proc, load_id, report, layers, parallel, str(path), sha)

    def crashed(self, loaded: Loaded, died: Died) -> None:
        """The model process died while generating: record it; on OOM lower the ceiling."""
        oom = is_oom(died.reason)
        load_store.update_load(
            self.db,
            loaded.load_id,
            outcome=LoadOutcome.OOM if oom else LoadOutcome.CRASHED,
            cause=died.reason,
            ended=True,
        )
        if oom and loaded.n_gpu_layers != 0:
            state = {"layers": loaded.n_gpu_layers, "parallel": loaded.parallel}
            self._shrink(state, loaded.report, "out of memory while generating")
            load_store.remember_layers(self.db, loaded.report.key, state["layers"])

    def closed(self, loaded: Loaded) -> None:
        """The model process was stopped normally."""
        load_store.update_load(self.db, loaded.load_id, ended=True)

    def _shrink(self, state: dict[str, int], report: PlanReport, why: str, over: int = 0) -> bool:
        """Fewer GPU layers (by a step, or by the measured overshoot); fewer parallel sequences
        first if configured, or last when no layer is left. False: nothing left to shrink."""
        layers = report.plan.max_layers if state["layers"] < 0 else state["layers"]
        halve = (
            state["parallel"] > 1
            and not over
            and (self.settings.shrink_parallel_first or layers == 0)
        )
        if halve:
            state["parallel"] //= 2
            log.warning(
                "%s at parallel %d: next try at parallel %d",
                why,
                state["parallel"] * 2,
                state["parallel"],
                extra={"cause": why},
            )
            return True
        if layers == 0:
            return False
        step = max(1, math.ceil(layers * self.settings.shrink_step))
        if over:
            per_layer = max(sum(report.model.layer_bytes) // max(report.model.n_layer, 1), 1)
            step = max(step, math.ceil(over / per_layer) + 1)
        state["layers"] = max(layers - step, 0)
        self.ceilings[report.key] = state["layers"]
        log.warning(
            "%s with %d GPU layers: next try with %d",
            why,
            layers,
            state["layers"],
            extra={"layers": state["layers"], "cause": why},
        )
        return True

    def _predicted(self, report: PlanReport, layers: int) -> tuple[int, int]:
        """(prediction with the learned correction, the pure estimate) for `layers`.

        The pure estimate is what `loads` stores, so that measured − predicted stays the
        whole excess that the next plan adds back.
        """
        plan = report.plan
        if plan.device is None or layers == 0:
            return 0, 0
        k = plan.max_layers if layers < 0 else layers
        gpu_part, _ = parts_for(
            report.model, plan.request, k, kv_layer_bytes(report.model, plan.request), True
        )
        return gpu_part.total, gpu_part.total - gpu_part.correction

    @staticmethod
    def _log_backoff(state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0
        log.info("reloading in %.1fs (attempt %d)", wait, state.attempt_number + 1)
