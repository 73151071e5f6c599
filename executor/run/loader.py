"""Loading a model under the VRAM cap: plan (planning/gather.py), load, measure, shrink.

The sequence for one model:
  1. plan_for: the most on the GPU that fits the cap (see planning/gather.py);
  2. start the model process with that placement (-ngl and -ot rules);
  3. measure the process's VRAM with NVML; above the cap (the cap is a ceiling, not a hint)
     kill it and shrink by the overshoot;
  4. an OOM at load (llama.cpp's allocation messages) or a crash while loading shrinks the
     placement by a step (routed experts before attention, then layers: 10 % of them, at
     least one) and retries after an exponential backoff with jitter (tenacity), down to
     nothing on the GPU; if even the CPU-only load fails, the job fails.
Every attempt is a row in `loads`; the placement that loaded is remembered per (model, GPU,
cap, context, parallel, ubatch) so the next run starts there.
"""

from __future__ import annotations

import logging
import re
import socket
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

from executor.config import Settings
from executor.engine import decode_rates
from executor.engine.faults import Faults
from executor.errors import ModelError, WouldSwapError
from executor.gguf.info import ModelInfo
from executor.gguf.models import check_default_hash, check_gguf, model_sha256
from executor.machine import gpu
from executor.machine.cpus import threads_for
from executor.planning.gather import (
    REBUILD_FOR_GPU,
    PlanReport,
    device_for,
    load_spec,
    plan_for,
)
from executor.planning.job_settings import job_load
from executor.planning.placement import Placement
from executor.planning.plan import (
    Plan,
    make_plan,
    shrink,
)
from executor.run.supervisor import (
    Died,
    ModelLoadFailed,
    ModelProcess,
    Spare,
)
from executor.store import Database
from executor.store import loads as load_store
from executor.store.loads import ConfigKey
from executor.store.queue import Job
from executor.store.schema import LoadOutcome
from executor.units import format_bytes

log = logging.getLogger(__name__)

OOM = re.compile(
    r"out of memory|cudaMalloc failed|failed to allocate|unable to allocate|"
    r"ErrorOutOfDeviceMemory|std::bad_alloc|CUBLAS_STATUS_ALLOC_FAILED",
    re.IGNORECASE,
)


def is_oom(text: str) -> bool:
    """Whether llama.cpp/CUDA's words for running out of memory appear in `text`."""
    return bool(OOM.search(text))


# --- loading --------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model process that is up, with the plan and the load row it runs under."""

    proc: ModelProcess
    load_id: int
    report: PlanReport
    plan: Plan  # the plan of the attempt that loaded (after any shrinking)
    key: ConfigKey  # the configuration that loaded (its parallel may have been halved)
    model_path: str
    sha256: str
    job_load: dict[str, Any] = field(default_factory=dict)  # the job's own load settings

    @property
    def settings(self) -> Settings:
        """The settings it was loaded with (the job's load settings applied)."""
        assert self.report.settings is not None
        return self.report.settings

    @property
    def n_gpu_layers(self) -> int:
        return self.plan.n_gpu_layers

    @property
    def parallel(self) -> int:
        return self.plan.request.parallel

    @property
    def n_ctx(self) -> int:
        return self.plan.request.n_ctx


class _Retry(Exception):
    """This attempt failed in a way that less on the GPU may fix."""


@dataclass
class _Attempt:
    placement: Placement
    parallel: int


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
        # Per configuration: the most allowed after an OOM in this run.
        self.ceilings: dict[ConfigKey, Placement] = {}
        self._spare: Spare | None = None  # a model process started ahead of its plan

    def load(self, model_path: str, job: Job | None = None) -> Loaded:
        """Plan and load `model_path` for `job` (its own load settings applied by
        planning/job_settings.py); shrink and retry on OOM. ModelError if it cannot load."""
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        check_gguf(path)
        sha = model_sha256(self.db, path)
        check_default_hash(path, sha)
        # The model process starts (Python, llama.cpp's import) while the prompts are
        # counted and the plan made; it is killed if nothing comes of it.
        _, device = device_for(self.settings, self.nvml, None)
        self._spare = Spare(self.log_path, self.settings.engine, device.uuid if device else None)
        try:
            return self._load(path, sha, job)
        finally:
            if self._spare is not None:
                self._spare.kill()
                self._spare = None

    def _load(self, path: Path, sha: str, job: Job | None) -> Loaded:
        spare = self._spare
        report = plan_for(
            self.settings, self.db, path, job=job, nvml=self.nvml, sha256=sha,
            build_offloads=spare.gpu_offload if spare else None,
        )  # fmt: skip
        report = self._under_ceiling(report, job, sha)
        assert report.settings is not None
        settings = report.settings  # the job's load settings applied
        plan = report.plan
        if report.offload_warning:
            log.warning("%s", report.offload_warning)
        if not plan.ram_ok and not settings.allow_swap:
            origins = ", ".join(
                f"{k} {getattr(settings, k)} ({v})"
                for k, v in report.origins().items()
                if k in ("ctx", "parallel", "vram_cap") and v != "default"
            )
            raise WouldSwapError(
                f"{plan.notes[-1]}" + (f" with {origins}" if origins else ""),
                hint="less in RAM: a larger --vram-cap, a smaller --ctx or --parallel, or "
                "--allow-swap to run anyway",
            )
        for note in (report.context_note, report.parallel_note, report.ubatch_note, *plan.notes):
            if note:
                log.info("plan: %s", note)
        state = _Attempt(plan.placement, plan.request.parallel)
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
                loaded.job_load = job_load(job)
                return loaded
        raise AssertionError("unreachable")

    def _under_ceiling(self, report: PlanReport, job: Job | None, sha: str) -> PlanReport:
        ceiling = self.ceilings.get(report.key)
        if ceiling is None:
            return report
        spare = self._spare
        return plan_for(
            self.settings, self.db, report.model.path, job=job, nvml=self.nvml, sha256=sha,
            ceiling=ceiling, build_offloads=spare.gpu_offload if spare else None,
        )  # fmt: skip

    def _attempt_plan(self, report: PlanReport, state: _Attempt) -> Plan:
        """The plan at this attempt's parallel, at most this attempt's placement."""
        req = replace(report.plan.request, parallel=state.parallel, known=state.placement)
        return make_plan(report.model, report.plan.device, req)

    def _attempt(
        self, settings: Settings, path: Path, sha: str, report: PlanReport, state: _Attempt
    ) -> Loaded:
        if self.stopping():
            raise ModelError("stopping: the model was not loaded")
        plan = self._attempt_plan(report, state)
        device = plan.device
        key = replace(report.key, parallel=state.parallel)
        predicted = plan.gpu.total if device and plan.n_gpu_layers else 0
        # Stored without the learned correction, so measured − predicted stays the whole
        # excess that the next plan adds back.
        estimate = predicted - plan.gpu.correction if predicted else 0
        load_id = load_store.start_load(
            self.db,
            key,
            worker_id=self.worker_id,
            model_path=str(path),
            gpu_name=device.name if device else None,
            vram_cap=plan.cap,
            placement=plan.placement.as_dict(),
            tensor_overrides=list(plan.rules),
            predicted_vram=estimate if device else None,
            # Warnings travel with the load: `status` and provenance can say why it was slow.
            plan={**plan.as_dict(), "warnings": [w for w in (report.offload_warning,) if w]},
        )
        spec = load_spec(settings, plan, str(path), device.uuid if device else None)
        if report.measure_parallel and plan.n_gpu_layers == 0:
            spec = replace(spec, measure_parallel=report.measure_parallel)
        self.processes += 1
        weights = plan.gpu.layer_weights + plan.gpu.output_layer
        faults = replace(self.faults, process_number=self.processes, gpu_weights=weights)
        proc = ModelProcess(spec, self.log_path, faults, spare=self._spare)
        self._spare = None
        log.info(
            "loading %s with %d of %d layers on the GPU%s (predicted %s; cap %s; ctx %d × %d; "
            "%d threads: %s; log %s)",
            path.name,
            plan.n_gpu_layers,
            plan.max_layers,
            f", {len(plan.rules)} tensor rules" if plan.rules else "",
            format_bytes(predicted),
            format_bytes(plan.cap),
            plan.request.n_ctx,
            plan.request.parallel,
            spec.n_threads,
            report.threads_note,
            self.log_path,
            extra={"layers": plan.n_gpu_layers},
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
            if (oom or exc.crashed) and self._shrink(state, report, plan, why):
                raise _Retry(reason) from None
            raise ModelError(f"model {path} did not load: {reason}") from None
        try:
            return self._check_loaded(proc, plan, key, load_id, state, report, path, sha)
        except BaseException:
            proc.kill()  # whatever went wrong, no model process is left behind
            raise

    def _check_loaded(
        self,
        proc: ModelProcess,
        plan: Plan,
        key: ConfigKey,
        load_id: int,
        state: _Attempt,
        report: PlanReport,
        path: Path,
        sha: str,
    ) -> Loaded:
        """Measure what the loaded process holds; above the cap, kill it and shrink."""
        device = plan.device
        predicted = plan.gpu.total if device and plan.n_gpu_layers else 0
        if device is not None and plan.n_gpu_layers != 0 and proc.pid is not None:
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
                    if not self._shrink(state, report, plan, cause, over=measured - plan.cap):
                        raise ModelError(f"model {path}: {cause}, even with nothing on the GPU")
                    raise _Retry(cause)
        plan, key = self._measured_parallel(proc, report.model, plan, key, load_id, sha)
        load_store.update_load(self.db, load_id, outcome=LoadOutcome.LOADED)
        load_store.remember_placement(self.db, key, plan.placement.as_dict())
        if not proc.info.get("gpu_offload_supported", True) and plan.n_gpu_layers:
            # Only when the build could not be asked before the plan.
            log.warning(
                "this llama-cpp-python was built without GPU offload: the model runs "
                "on the CPU. Fix: %s",
                REBUILD_FOR_GPU,
            )
        return Loaded(proc, load_id, report, plan, key, str(path), sha)

    def _measured_parallel(
        self,
        proc: ModelProcess,
        model: ModelInfo,
        plan: Plan,
        key: ConfigKey,
        load_id: int,
        sha: str,
    ) -> tuple[Plan, ConfigKey]:
        """Keep the decode rates a CPU load measured, and plan at the parallel it picked."""
        rates = {int(n): float(r) for n, r in (proc.info.get("decode_rates") or {}).items()}
        if not rates:
            return plan, key
        threads = proc.spec.n_threads or threads_for("auto")[0]
        if sha:
            load_store.remember_decode_rates(self.db, sha, socket.gethostname(), threads, rates)
        picked = int(proc.info.get("parallel", plan.request.parallel))
        log.info(
            "parallel %d: the most sequences within %.0f%% of the best decode rate measured "
            "now with %d threads (%s)",
            picked,
            decode_rates.WITHIN * 100,
            threads,
            decode_rates.describe(rates),
        )
        if picked == plan.request.parallel:
            return plan, key
        load_store.update_load(self.db, load_id, parallel=picked)
        plan = make_plan(model, plan.device, replace(plan.request, parallel=picked))
        return plan, replace(key, parallel=picked)

    def crashed(self, loaded: Loaded, died: Died) -> None:
        """The model process died while generating: record it; on OOM lower the ceiling and
        remember the smaller placement under the configuration that had loaded."""
        oom = is_oom(died.reason)
        load_store.update_load(
            self.db,
            loaded.load_id,
            outcome=LoadOutcome.OOM if oom else LoadOutcome.CRASHED,
            cause=died.reason,
            ended=True,
        )
        if oom and loaded.n_gpu_layers != 0:
            state = _Attempt(loaded.plan.placement, loaded.parallel)
            self._shrink(state, loaded.report, loaded.plan, "out of memory while generating")
            load_store.remember_placement(self.db, loaded.key, state.placement.as_dict())

    def closed(self, loaded: Loaded) -> None:
        """The model process was stopped normally."""
        load_store.update_load(self.db, loaded.load_id, ended=True)

    def _shrink(
        self, state: _Attempt, report: PlanReport, plan: Plan, why: str, over: int = 0
    ) -> bool:
        """Less on the GPU (a step, or by the measured overshoot); fewer parallel sequences
        first if configured, or last when nothing is left on the GPU. False: nothing left."""
        nothing_left = state.placement.n_gpu_layers == 0
        halve = (
            state.parallel > 1
            and not over
            and (self.settings.shrink_parallel_first or nothing_left)
        )
        if halve:
            state.parallel //= 2
            log.warning(
                "%s at parallel %d: next try at parallel %d",
                why,
                state.parallel * 2,
                state.parallel,
                extra={"cause": why},
            )
            return True
        smaller = shrink(
            report.model,
            plan.request,
            state.placement,
            self.settings.shrink_step,
            over=over,
            by_tensor=plan.by_tensor,
        )
        if smaller is None:
            return False
        log.warning(
            "%s with %s: next try with %s",
            why,
            _short(report.model, state.placement),
            _short(report.model, smaller),
            extra={"layers": smaller.n_gpu_layers, "cause": why},
        )
        state.placement = smaller
        self.ceilings[replace(report.key, parallel=state.parallel)] = smaller
        self.ceilings[report.key] = smaller
        return True

    @staticmethod
    def _log_backoff(state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0
        log.info("reloading in %.1fs (attempt %d)", wait, state.attempt_number + 1)


def _short(model: ModelInfo, p: Placement) -> str:
    """`30 GPU layers`, or `37 GPU layers, experts of 12 blocks in RAM`."""
    text = f"{p.n_gpu_layers} GPU layers"
    if model.moe and (p.cpu_experts or p.partial_block is not None):
        ram = p.cpu_experts + (1 if p.partial_block is not None else 0)
        text += f", experts of {ram} blocks in RAM"
    return text
