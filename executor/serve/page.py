"""The status page: what the night's work is doing, as server-rendered HTML and SVG.

`snapshot()` gathers the data (also served as JSON at /api/status); `render_sections()`
turns it into HTML fragments, which the page shows at once and page.js swaps in every few
seconds. No build step, no CDN: the machine may be offline. Everything shown is escaped.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from executor.jobs.status import job_rows
from executor.planning.estimate import Estimator
from executor.store import Database, results
from executor.store import loads as load_store
from executor.store import workers as registry
from executor.units import format_bytes, format_duration

ALIVE_WITHIN = 60.0
SAMPLES = 5000  # the latest rate samples of a job drawn as its tok/s line


def snapshot(
    db: Database, lease_seconds: float = 120.0, estimator: Estimator | None = None
) -> dict[str, Any]:
    """Jobs (with tok/s over time; a job not started yet, its estimate), workers, the current
    load's VRAM and the load history."""
    jobs = job_rows(db, limit=20, estimator=estimator)
    for job in jobs:
        job["timeline"] = _rates(_timeline(db, job))
    loads = load_store.recent_loads(db, 15)
    return {
        "jobs": jobs,
        "workers": [_worker(w) for w in registry.listing(db, max(lease_seconds, ALIVE_WITHIN))],
        "vram": _vram(loads),
        "loads": [_load(x) for x in loads],
    }


def _timeline(db: Database, job: dict[str, Any]) -> list[tuple[datetime, int]]:
    """(when, tokens generated since the point before) from the workers' samples, which
    count tokens as they are generated; a job run before samples existed: its results."""
    samples = registry.rate_samples_of(db, job["id"], SAMPLES)
    if not samples or not job["started_at"]:
        return results.token_timeline(db, job["id"])
    points = [(datetime.fromisoformat(job["started_at"].removesuffix("Z")), 0)]
    cut = len(samples) == SAMPLES  # older samples exist: a worker's first one here is a total
    last: dict[str, int] = {}
    for worker, at, tokens in samples:
        before = last.get(worker)
        last[worker] = tokens
        if before is None and cut:
            continue
        # A worker's samples count from its run's start: a restart begins a new series.
        before = before or 0
        points.append((at, tokens - before if tokens >= before else tokens))
    return points


def _rates(points: list[tuple[datetime, int]], buckets: int = 30) -> list[list[float]]:
    """tok/s in up to `buckets` equal spans of the job's results: [[seconds, tok/s], ...]."""
    if len(points) < 2:
        return []
    start, end = points[0][0], points[-1][0]
    span = max((end - start).total_seconds(), 1e-3)
    width = span / buckets
    sums = [0] * buckets
    for at, tokens in points[1:]:
        index = min(int((at - start).total_seconds() / width), buckets - 1)
        sums[index] += tokens
    return [[round((i + 1) * width, 1), round(s / width, 1)] for i, s in enumerate(sums)]


def _worker(w: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": w["id"],
        "host": w["host"],
        "gpu": w["gpu_name"] or "CPU",
        "alive": w["alive"],
        "model": Path(w["model"]).name if w.get("model") else None,
        "job": w.get("job_id"),
        "tokens_per_s": w.get("tokens_per_s"),
        "state": w.get("state"),
        "resumes_at": w["resumes_at"].isoformat() + "Z" if w.get("resumes_at") else None,
        "heartbeat_age_s": w["heartbeat_age_s"],
        "scheduler": w.get("scheduler"),
    }


def _load(x: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": x["id"],
        "model": Path(x["model_path"]).name,
        "gpu": x["gpu_name"] or "CPU",
        "layers": x["n_gpu_layers"],
        "parallel": x["parallel"],
        "ctx": x["n_ctx"],
        "cap": x["vram_cap"],
        "predicted": x["predicted_vram"],
        "measured": x["measured_vram"],
        "outcome": x["outcome"],
        "cause": (x["cause"] or "")[:300],
        "started_at": x["started_at"].strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _vram(loads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest load on a GPU: its planned parts against the cap, and what was measured."""
    for x in loads:
        gpu = (x.get("plan") or {}).get("gpu") or {}
        if x["gpu_name"] and gpu:
            return {
                "load": x["id"],
                "gpu": x["gpu_name"],
                "cap": x["vram_cap"],
                "weights": sum((gpu.get("weights") or {}).values()),
                "kv": gpu.get("kv_cache", 0),
                "compute": gpu.get("compute_buffer", 0) + gpu.get("output_buffer", 0),
                "reserve": gpu.get("cuda_reserve", 0) + gpu.get("correction", 0),
                "predicted": x["predicted_vram"],
                "measured": x["measured_vram"],
                "outcome": x["outcome"],
            }
    return None


# --- HTML --------------------------------------------------------------------------------------


def render_sections(data: dict[str, Any]) -> dict[str, str]:
    return {
        "jobs": _jobs_html(data["jobs"]),
        "vram": _vram_html(data["vram"]),
        "workers": _workers_html(data["workers"]),
        "loads": _loads_html(data["loads"]),
    }


def _jobs_html(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "<p class=empty>No jobs yet: <code>executor submit FILE</code> queues one.</p>"
    rows = []
    for j in jobs:
        c = j["counts"]
        done, failed = c["done"], c["failed"] + c["invalid"]
        total = max(j["items"], 1)
        rate = "–" if j["tokens_per_s"] is None else f"{j['tokens_per_s']:.1f} tok/s"
        eta = "–" if j["eta_s"] is None else format_duration(j["eta_s"])
        if j.get("estimate") and j["eta_s"] is not None:
            eta = ("~" if j["estimate"]["seconds_expected"] is not None else "≤") + eta
        energy = "–" if j.get("energy_wh") is None else f"{j['energy_wh']:.2f} Wh"
        if j.get("joules_per_token") is not None:
            energy += f", {j['joules_per_token']:.2f} J/tok"
        rows.append(
            f"<tr data-job='{j['id']}'><td>{j['id']}</td><td>{escape(j['name'] or '-')}</td>"
            f"<td class='status {escape(j['status'])}'>{escape(j['status'])}</td>"
            f"<td><div class=bar role=progressbar aria-valuenow={done + failed} "
            f"aria-valuemax={j['items']}><span class=done style='width:{100 * done / total:.1f}%'>"
            f"</span><span class=failed style='width:{100 * failed / total:.1f}%'></span></div>"
            f"<span class=count>{done} done, {failed} failed of {j['items']}</span></td>"
            f"<td>{rate}</td><td>{eta}</td><td>{energy}</td>"
            f"<td>{_sparkline(j['timeline'])}</td></tr>"
        )
    return (
        "<table><thead><tr><th>job</th><th>name</th><th>status</th><th>progress</th>"
        "<th>rate</th><th>ETA</th><th>energy</th><th>tok/s over time</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _sparkline(points: list[list[float]], w: int = 160, h: int = 32) -> str:
    if not points:
        return "<span class=empty>–</span>"
    top = max(p[1] for p in points) or 1
    end = points[-1][0] or 1
    path = " ".join(f"{w * x / end:.1f},{h - 2 - (h - 4) * y / top:.1f}" for x, y in points)
    return (
        f"<svg class=spark width={w} height={h} viewBox='0 0 {w} {h}' role=img "
        f"aria-label='peak {top:.0f} tok/s'><polyline points='{path}' fill=none "
        f"stroke=currentColor stroke-width=1.5 /><title>peak {top:.0f} tok/s</title></svg>"
    )


def _vram_html(v: dict[str, Any] | None) -> str:
    if v is None:
        return "<p class=empty>No model has been loaded on a GPU yet.</p>"
    parts = [
        ("weights", v["weights"]),
        ("KV cache", v["kv"]),
        ("compute", v["compute"]),
        ("reserve", v["reserve"]),
    ]
    scale = max(v["cap"] or 0, sum(n for _, n in parts), v["measured"] or 0, 1)
    width, x, bars = 600, 0.0, []
    for i, (name, n) in enumerate(parts):
        span = width * n / scale
        bars.append(
            f"<rect class='part p{i}' x={x:.1f} y=8 width={span:.1f} height=28>"
            f"<title>{name}: {format_bytes(n)}</title></rect>"
        )
        x += span
    marks = []
    if v["cap"]:
        cx = width * v["cap"] / scale
        marks.append(f"<line class=cap x1={cx:.1f} x2={cx:.1f} y1=0 y2=70 />")
    if v["measured"]:
        mx = width * v["measured"] / scale
        marks.append(
            f"<rect class=measured x=0 y=44 width={mx:.1f} height=12>"
            f"<title>measured {format_bytes(v['measured'])}</title></rect>"
        )
    legend = ", ".join(f"{name} {format_bytes(n)}" for name, n in parts)
    return (
        f"<p>{escape(v['gpu'])}, load {v['load']} ({escape(v['outcome'])}): predicted "
        f"{format_bytes(v['predicted'])}, measured {format_bytes(v['measured'])}, cap "
        f"{format_bytes(v['cap'])}</p><svg class=vram width={width} height=72 "
        f"viewBox='0 0 {width} 72' role=img aria-label='VRAM: {legend}'>{''.join(bars)}"
        f"{''.join(marks)}</svg><p class=legend>{escape(legend)}; the line is the cap, the "
        "thin bar what NVML measured</p>"
    )


def _workers_html(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return "<p class=empty>No worker has run yet: <code>executor run</code>.</p>"
    rows = "".join(
        f"<tr><td>{escape(w['id'])}"
        f"{'<br><small>' + escape(w['scheduler']) + '</small>' if w.get('scheduler') else ''}"
        f"</td><td>{'live' if w['alive'] else 'gone'}"
        f"{' — ' + escape(w['state']) if w['alive'] and w.get('state') else ''}</td>"
        f"<td>{escape(w['gpu'])}</td><td>{escape(w['model'] or '-')}</td>"
        f"<td>{w['job'] or '-'}</td><td>{w['heartbeat_age_s']:.0f} s ago</td></tr>"
        for w in workers
    )
    return (
        "<table><thead><tr><th>worker</th><th>state</th><th>GPU</th><th>model</th><th>job</th>"
        f"<th>heartbeat</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _loads_html(loads: list[dict[str, Any]]) -> str:
    if not loads:
        return "<p class=empty>No loads yet.</p>"
    rows = "".join(
        f"<tr class='{escape(x['outcome'])}'><td>{x['id']}</td><td>{escape(x['started_at'])}"
        f"</td><td>{escape(x['model'])}</td><td>{escape(x['gpu'])}</td><td>{x['layers']}</td>"
        f"<td>{x['parallel']} × {x['ctx']}</td><td>{format_bytes(x['predicted'])}</td>"
        f"<td>{format_bytes(x['measured'])}</td><td>{escape(x['outcome'])}</td>"
        f"<td>{escape(x['cause'])}</td></tr>"
        for x in loads
    )
    return (
        "<table><thead><tr><th>load</th><th>started</th><th>model</th><th>GPU</th>"
        "<th>GPU layers</th><th>seqs × ctx</th><th>predicted</th><th>measured</th>"
        f"<th>outcome</th><th>cause</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def page(sections: dict[str, str]) -> str:
    """The whole page; page.js refreshes its sections from /api/status."""
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>executor</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<link rel=stylesheet href="/static/page.css"><link rel=icon href="data:,"></head>
<body><header><h1>executor</h1><span id=updated>updated now</span></header>
<section><h2>Jobs</h2><div id=jobs>{sections["jobs"]}</div></section>
<section><h2>VRAM of the current load</h2><div id=vram>{sections["vram"]}</div></section>
<section><h2>Workers</h2><div id=workers>{sections["workers"]}</div></section>
<section><h2>Loads</h2><div id=loads>{sections["loads"]}</div></section>
<script src="/static/page.js"></script></body></html>"""


STATIC = {
    "page.js": (
        "application/javascript",
        """// Refresh the sections from /api/status every few seconds (read-only).
"use strict";
const ids = ["jobs", "vram", "workers", "loads"];
async function refresh() {
  try {
    const response = await fetch("/api/status?html=1", {credentials: "same-origin"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    for (const id of ids) document.getElementById(id).innerHTML = data.html[id];
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("updated").textContent = "not updated: " + error.message;
  }
}
setInterval(refresh, 2000);
""",
    ),
    "page.css": (
        "text/css",
        """body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
header { display: flex; gap: 1em; align-items: baseline; }
#updated { color: #777; font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eee; }
td { vertical-align: middle; }
.bar { display: inline-flex; width: 180px; height: 12px; background: #eee; border-radius: 3px;
       overflow: hidden; vertical-align: middle; margin-right: 6px; }
.bar .done { background: #2e8b57; } .bar .failed { background: #c0392b; }
.count { color: #555; font-size: 12px; }
.status.failed, tr.oom td, tr.over_cap td { color: #c0392b; }
.spark { color: #2a6ebb; }
.vram .p0 { fill: #2a6ebb; } .vram .p1 { fill: #8e44ad; } .vram .p2 { fill: #e67e22; }
.vram .p3 { fill: #95a5a6; } .vram .cap { stroke: #c0392b; stroke-width: 2; }
.vram .measured { fill: #2c3e50; }
.empty, .legend { color: #777; }
""",
    ),
}
