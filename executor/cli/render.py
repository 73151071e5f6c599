"""Everything the CLI draws for people: the tables of status, plan, doctor, workers and
settings, and the one-line notes after export and run. Pure functions of data; no I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from executor.planning.plan import describe
from executor.redact import printable
from executor.units import format_bytes, format_duration

if TYPE_CHECKING:
    from executor.cli.doctor import Check
    from executor.config import Settings
    from executor.jobs.export import Exported
    from executor.planning.gather import PlanReport
    from executor.run.worker import RunSummary


def _energy(row: dict[str, Any]) -> str:
    """`12.3 Wh, 0.85 J/tok`, or `-` when it was not measured."""
    if row.get("energy_wh") is None:
        return "-"
    per = row.get("joules_per_token")
    return f"{row['energy_wh']:.2f} Wh" + (f", {per:.2f} J/tok" if per is not None else "")


def format_jobs(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for people."""
    if not rows:
        return "no jobs yet: `executor submit FILE` queues one"
    header = (
        "JOB",
        "NAME",
        "STATUS",
        "QUEUED",
        "RUNNING",
        "DONE",
        "FAILED",
        "TOKENS",
        "TOK/S",
        "ETA",
        "ENERGY",
    )
    table = [header]
    for r in rows:
        c = r["counts"]
        table.append(
            (
                str(r["id"]),
                printable(r["name"] or "-")[:24],
                r["status"],
                str(c["queued"]),
                str(c["running"]),
                str(c["done"]),
                str(c["failed"] + c["invalid"]),
                str(r["completion_tokens"]),
                "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                _eta(r),
                _energy(r),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]
    errors = [f"job {r['id']}: {printable(r['error'])}" for r in rows if r["error"]]
    return "\n".join(lines + errors)


def _eta(row: dict[str, Any]) -> str:
    estimate = row.get("estimate")
    if estimate is not None:  # not started: `~6m` expected, `≤14m` at most
        if estimate["seconds_expected"] is not None:
            return f"~{format_duration(estimate['seconds_expected'])}"
        if estimate["seconds_most"] is not None:
            return f"≤{format_duration(estimate['seconds_most'])}"
    return "-" if row["eta_s"] is None else format_duration(row["eta_s"])


def worker_states(workers: list[dict[str, Any]]) -> list[str]:
    """One line per live worker that is not working: why, and until when."""
    return [
        f"worker {printable(w['id'])}: {printable(w['state'])}"
        for w in workers
        if w["alive"] and w.get("state") not in (None, "working", "idle", "starting", "stopped")
    ]


CLASS_LABELS = {
    "attention": "attention",
    "ffn": "dense FFN",
    "router": "router",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "other": "other block tensors",
    "output": "output layer",
    "token_embedding": "token embedding",
}


def format_plan(report: PlanReport) -> str:
    """The plan as a table for people: per kind of tensor, what is on the GPU and in RAM."""
    m, plan = report.model, report.plan
    kind = f"MoE, {m.n_expert} experts, {m.n_expert_used} used" if m.moe else "dense"
    window = f", sliding window {m.n_swa}" if m.n_swa else ""
    lines = [
        f"model     {printable(Path(m.path).name)}  ({m.architecture}, {m.n_layer} blocks, {kind}"
        f"{window}, {m.quantization or '?'}, {format_bytes(m.file_size)})",
    ]
    if report.offload_warning:
        lines.append("GPU       not used: this llama-cpp-python cannot offload (see the warning)")
    elif plan.device is None:
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
        f"KV {r.cache_type_k}{', full-size SWA' if r.swa_full and m.n_swa else ''}, "
        f"flash attention {'on' if r.flash_attn else 'off'}, ubatch {plan.n_ubatch}"
    )
    lines.append(f"threads   {report.threads} ({report.threads_note})")
    chosen = {k: v for k, v in report.origins().items() if v != "default"}
    if chosen:
        settings = report.settings
        shown = ", ".join(f"{k} {getattr(settings, k)} ({v})" for k, v in chosen.items())
        lines.append(f"settings  {shown}")
    where = (
        f"the output layer + last {plan.gpu_blocks} blocks"
        if plan.n_gpu_layers
        else "everything on the CPU"
    )
    lines.append(f"layers    {plan.n_gpu_layers} of {plan.max_layers} on the GPU ({where})")
    for rule in plan.rules:
        lines.append(f"rule      -ot {rule}")
    if report.known is not None:
        lines.append(
            f"memory    {describe(m, report.known)} loaded and ran on this card before with "
            "these settings"
        )
    lines.append("")
    rows: list[tuple[str, int | None, int | None]] = []
    for cls, label in CLASS_LABELS.items():
        g, c = plan.gpu.weights.get(cls, 0), plan.cpu.weights.get(cls, 0)
        if g or c:
            rows.append((label, g, c))
    rows += [
        ("KV cache", plan.gpu.kv_cache, plan.cpu.kv_cache),
        ("compute buffer", plan.gpu.compute_buffer, plan.cpu.compute_buffer),
        ("output buffer", None, plan.cpu.output_buffer),
        ("CUDA reserve", plan.gpu.cuda_reserve, None),
    ]
    if plan.gpu.correction:
        rows.append(("measured excess", plan.gpu.correction, None))
    rows.append(("total", plan.gpu.total, plan.cpu.total))
    lines.append(f"{'':20}{'GPU':>12}{'RAM':>12}")
    for label, g, c in rows:
        lines.append(f"{label:20}{_cell(g, plan.device is not None):>12}{_cell(c, True):>12}")
    lines.append("")
    if plan.ram_available is not None:
        state = "OK" if plan.ram_ok else "NOT ENOUGH"
        lines.append(
            f"RAM       {format_bytes(plan.ram_available)} available for the RAM part: {state}"
        )
    if plan.cap is not None and plan.n_gpu_layers:
        share = plan.gpu.total / plan.cap if plan.cap else 0
        lines.append(f"GPU use   {share:.0%} of the cap")
    if report.dry_run is not None:
        compute = ", ".join(f"{k} {format_bytes(v)}" for k, v in report.dry_run.compute.items())
        lines.append(
            f"llama.cpp dry run: compute {compute}; KV {format_bytes(report.dry_run.kv_bytes)}"
        )
    if report.dry_run_note:
        lines.append(report.dry_run_note)
    notes = (report.context_note, report.parallel_note, report.ubatch_note)
    lines += [f"note      {n}" for n in notes if n]
    lines += [f"note      {n}" for n in plan.notes]
    return "\n".join(lines)


def _cell(value: int | None, shown: bool) -> str:
    if value is None or not shown:
        return "-"
    return format_bytes(value)


def format_checks(checks: list[Check]) -> str:
    """One line per check: state, name, detail; a hint below when there is one."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.state:4}  {c.name:{width}}  {c.detail}")
        if c.hint:
            lines.append(f"{'':4}  {'':{width}}  hint: {c.hint}")
    return "\n".join(lines)


def format_workers(rows: list[dict[str, Any]]) -> str:
    """`executor workers`: live ones first."""
    if not rows:
        return "no workers have run on this database yet"
    lines = [f"{'STATE':8} {'HOST':16} {'GPU':28} {'JOB':>5} {'TOK/S':>7} {'BEAT':>8}  MODEL"]
    for r in rows:
        state = "live" if r["alive"] else ("stopped" if r["stopped_at"] else "dead")
        gpu = f"{r['gpu_name'] or 'cpu'} {r['gpu_uuid'][:12] if r['gpu_uuid'] != 'cpu' else ''}"
        lines.append(
            f"{state:8} {printable(r['host'])[:16]:16} {printable(gpu.strip())[:28]:28} "
            f"{r['job_id'] or '-':>5} "
            f"{r['tokens_per_s'] if r['tokens_per_s'] is not None else '-':>7} "
            f"{r['heartbeat_age_s']:>7.0f}s  "
            f"{printable(Path(r['model']).name) if r['model'] else '-'}"
            # Which Slurm task or pod this is: where its log lives, what to scancel.
            + (f"  ({printable(r['scheduler'])})" if r.get("scheduler") else "")
        )
    return "\n".join(lines + worker_states(rows))


def format_settings(settings: Settings, values: dict[str, Any], helps: dict[str, str]) -> str:
    """`executor config show`: every setting, its value, where it came from, what it does."""
    lines = [f"config file: {settings.config_file or 'none'}"]
    width = max(map(len, values))
    for key, value in values.items():
        shown = json.dumps(value) if isinstance(value, dict) else value
        lines.append(f"{key:{width}}  {shown!s:24}  {settings.sources[key]:28}  {helps[key]}")
    return "\n".join(lines)


def export_note(result: Exported, output: str | None, errors: str | None) -> str:
    """`job 3: exported 120 of 300 items to out.jsonl (job is running)`"""
    where = "stdout" if output in (None, "-") else output
    note = "" if result.job_status == "done" else f" (job is {result.job_status})"
    failed = f", {result.failed} failed to {errors}" if errors else ""
    return (
        f"job {result.job_id}: exported {result.lines} of {result.item_count} items to "
        f"{where}{failed}{note}"
    )


def run_note(summary: RunSummary, elapsed: float) -> str:
    """`run finished: 12 done, 0 failed, 1532 tokens in 24.1s`"""
    whole = f" ({len(summary.failed_jobs)} job(s) failed as a whole)" if summary.failed_jobs else ""
    return (
        f"run {'stopped' if summary.stopped_by_signal else 'finished'}: {summary.done} done, "
        f"{summary.failed} failed{whole}, {summary.completion_tokens} tokens in {elapsed:.1f}s"
    )
