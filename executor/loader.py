"""Loading a model under the VRAM cap: plan, load, measure, and on out-of-memory shrink.

The sequence for one model:
  1. plan (planning.plan_for): the most layers whose predicted footprint fits the cap, never
     more than a count remembered to work or a ceiling lowered by an OOM earlier in this run;
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

from executor import gpu
from executor.config import Settings
from executor.engine.faults import Faults
from executor.errors import ModelError
from executor.models import check_default_hash, check_gguf, model_sha256
from executor.plan import kv_layer_bytes, parts_for
from executor.planning import PlanReport, flash_attn_for, load_spec, plan_for
from executor.store import Database
from executor.store import loads as load_store
from executor.store.schema import LoadOutcome
from executor.supervisor import Died, ModelLoadFailed, ModelProcess
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
        spec = load_spec(
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
