"""GPU check: does the capped plan hold on a real card, and does what it promises happen?

    benchmarks/gpu_check.sh          # on the GPU machine: builds llama.cpp, then runs this

Holds all but `--visible` (12 GiB) of the card with plain cudaMalloc allocations in a
helper process (never managed memory), writes sparse GGUFs of real shapes (zeros: tens of
GB on paper, megabytes on disk) and runs real `executor` processes against them:

1. plan vs measured: a 70B-shaped dense file at caps of 8 and 11.5 GiB and a Qwen3-30B-A3B-
   shaped MoE file at 11.5 GiB: layers/experts on the GPU, predicted VRAM beside what NVML
   measured for the model process; the cap must hold;
2. a real CUDA out-of-memory: NVML is made to say the card has 24 GiB free while 12 GiB
   are, so the plan overshoots; the run must shrink, load and finish every item;
3. tensor placement vs whole layers on the MoE file: generation tok/s, same card and cap;
4. --parallel 1 / 8 / 16 on a 7B-shaped file that fits the card: completion tok/s.

Zero weights compute as fast as real ones (greedy picks the same token every step, so
every sequence runs to max_tokens): the speeds are those of the shapes, not of a model.
Prints one table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.machine.gpu import probe  # noqa: E402
from executor.units import format_bytes, parse_size  # noqa: E402
from tests.synthetic_gguf import write_llama_gguf, write_moe_gguf  # noqa: E402

GiB = 2**30


def hold_vram(nbytes: int, ready: Any, done: Any) -> None:
    """Allocate `nbytes` on GPU 0 with the CUDA driver API and keep it until `done`."""
    cuda = ctypes.CDLL("libcuda.so.1")
    check = _checker(cuda)
    check(cuda.cuInit(0))
    device = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0))
    context = ctypes.c_void_p()
    check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device))
    pointers = []
    remaining = nbytes
    while remaining > 0:  # in 1 GiB pieces: one huge allocation can fail on fragmentation
        size = min(GiB, remaining)
        pointer = ctypes.c_uint64()
        check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size)))
        pointers.append(pointer)
        remaining -= size
    ready.set()
    done.wait()


def _checker(cuda: ctypes.CDLL):
    def check(result: int) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            cuda.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"CUDA driver error {result} ({name.value!r})")

    return check


class Runner:
    """Real `executor` processes on one database (each big file is hashed once)."""

    def __init__(self, workdir: Path, ctx: int) -> None:
        self.workdir = workdir
        self.env = {**os.environ, "EXECUTOR_DB": str(workdir / "check.db"),
                    "EXECUTOR_CTX": str(ctx), "EXECUTOR_BACKOFF_SECONDS": "0.5"}  # fmt: skip
        self.jobs = 0

    def job(
        self,
        model: Path,
        prompts: int,
        max_tokens: int,
        *flags: str,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Submit `prompts` prompts, run them with `flags`; the loads, tok/s and exports."""
        self.jobs += 1
        path = self.workdir / f"prompts-{self.jobs}.jsonl"
        rows = [{"prompt": f"Item {self.jobs}.{i}: once upon a time", "max_tokens": max_tokens}
                for i in range(prompts)]  # fmt: skip
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        cli = [sys.executable, "-m", "executor"]
        env = {**self.env, **(env or {})}
        job = subprocess.run(
            [*cli, "submit", str(path), "--model", str(model), "--force"],
            env=env, cwd=ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        job_id = int(job.stdout.strip())
        conn = sqlite3.connect(self.workdir / "check.db")
        (before,) = conn.execute("SELECT coalesce(max(id), 0) FROM loads").fetchone()
        conn.close()
        started = time.perf_counter()
        run = subprocess.run([*cli, "run", "--until-empty", "--job", str(job_id),
                              "--allow-swap", *flags],
                             env=env, cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - started
        out = subprocess.run([*cli, "export", str(job_id)], env=env, cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        lines = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        conn = sqlite3.connect(self.workdir / "check.db")
        conn.row_factory = sqlite3.Row
        loads = [dict(r) for r in conn.execute(
            "SELECT id, n_gpu_layers, placement, predicted_vram, measured_vram, vram_cap, "
            "parallel, outcome, cause FROM loads WHERE id > ? ORDER BY id", (before,))]  # fmt: skip
        # Generation: from the job's first claim (the model is loaded) to its last result.
        first, last, tokens = conn.execute(
            "SELECT j.started_at, max(r.created_at), sum(r.completion_tokens) FROM jobs j "
            "JOIN items i ON i.job_id = j.id JOIN results r ON r.item_id = i.id "
            "WHERE j.id = ?", (job_id,)
        ).fetchone()  # fmt: skip
        conn.close()
        gen = (
            (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
            if first and last
            else 0
        )
        return {
            "flags": list(flags), "returncode": run.returncode, "wall_s": round(wall, 1),
            "tokens": tokens or 0, "tok_s": round((tokens or 0) / gen, 1) if gen > 0 else 0,
            "done": sum(1 for x in lines if x.get("status") == "done"), "prompts": prompts,
            "loads": loads, "log": run.stderr[-2500:],
        }  # fmt: skip


def placement_text(load: dict[str, Any]) -> str:
    """`-ngl 37, 25 blocks' experts in RAM, +part of 1` from the load's placement."""
    p = json.loads(load["placement"]) if load.get("placement") else {}
    text = f"-ngl {load['n_gpu_layers']}"
    if p.get("cpu_experts"):
        text += f", {p['cpu_experts']} blocks' experts in RAM"
    if p.get("partial_block") is not None:
        text += f", +part of {p['partial_block']}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visible", default="12GiB", help="VRAM left free for the check")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: 1,2,3,4")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    found = probe()
    if not found.gpus:
        print(f"no GPU: {found.problem}; this check needs an NVIDIA card", file=sys.stderr)
        return 2
    card = found.gpus[0]
    print(f"GPU {card.name}: {format_bytes(card.total)} total, {format_bytes(card.free)} free")
    hold = card.free - parse_size(args.visible)
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = None
    if hold > 0:
        holder = ctx.Process(target=hold_vram, args=(hold, ready, done), daemon=True)
        holder.start()
        if not ready.wait(120):
            print("could not allocate the VRAM to hold", file=sys.stderr)
            return 1
    free = probe().gpus[0].free
    print(f"holding {format_bytes(max(hold, 0))}; free now {format_bytes(free)}", flush=True)
    rows: list[dict[str, Any]] = []

    def add(part: str, what: str, result: dict[str, Any], cap: str | None) -> None:
        cap_bytes = parse_size(cap) if cap else None
        for load in result["loads"]:
            measured, predicted = load["measured_vram"], load["predicted_vram"]
            rows.append({
                "part": part, "what": what, "placement": placement_text(load),
                "predicted": predicted, "measured": measured,
                "under_cap": None if measured is None or cap_bytes is None
                else measured <= cap_bytes,
                "outcome": load["outcome"], "cause": (load["cause"] or "")[:80],
                "done": f"{result['done']}/{result['prompts']}", "tok_s": result["tok_s"],
                "returncode": result["returncode"],
            })  # fmt: skip
        if result["returncode"] != 0:
            print(f"  {what}: run exited {result['returncode']}\n{result['log']}", flush=True)
        print(f"  {part} {what}: {len(result['loads'])} load(s), {result['done']}/"
              f"{result['prompts']} done, {result['tok_s']} tok/s", flush=True)  # fmt: skip

    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            runner = Runner(work, args.ctx)
            dense = write_llama_gguf(work / "synthetic-70b.Q4_K_M.gguf", "70b")
            moe = write_moe_gguf(work / "synthetic-qwen3-30b-a3b.gguf", "qwen3-30b-a3b")
            if "1" not in skip:
                for cap in ("8GiB", "11.5GiB"):
                    result = runner.job(dense, 2, 8, "--vram-cap", cap)
                    add("1", f"70B dense, cap {cap}", result, cap)
                add("1", "30B-A3B MoE, cap 11.5GiB",
                    runner.job(moe, 2, 8, "--vram-cap", "11.5GiB"), "11.5GiB")  # fmt: skip
            if "2" not in skip:
                lie = json.dumps([{"name": card.name, "uuid": card.uuid, "total": card.total,
                                   "free": free + 12 * GiB}])  # fmt: skip
                add("2", "70B, NVML says 12 GiB more free",
                    runner.job(dense, 4, 8, env={"EXECUTOR_FAKE_NVML": lie}), None)  # fmt: skip
            if "3" not in skip:
                for placement in ("tensors", "layers"):
                    add("3", f"30B-A3B MoE, --placement {placement}",
                        runner.job(moe, 8, 64, "--vram-cap", "11.5GiB", "--placement", placement,
                                   "--parallel", "8"), "11.5GiB")  # fmt: skip
            if "4" not in skip:
                small = write_llama_gguf(work / "synthetic-7b.Q4_K_M.gguf", "7b")
                for n in (1, 8, 16):
                    add("4", f"7B on the GPU, --parallel {n}",
                        runner.job(small, 16, 64, "--parallel", str(n)), None)  # fmt: skip
    finally:
        done.set()
        if holder is not None:
            holder.join(30)
    print(f"\n{'part':4} {'what':36} {'placement':26} {'predicted':>10} {'measured':>10} "
          f"{'<=cap':>5} {'outcome':9} {'done':>6} {'gen tok/s':>9}")  # fmt: skip
    for r in rows:
        under = "-" if r["under_cap"] is None else ("yes" if r["under_cap"] else "NO")
        print(f"{r['part']:4} {r['what'][:36]:36} {r['placement'][:26]:26} "
              f"{format_bytes(r['predicted']):>10} {format_bytes(r['measured']):>10} {under:>5} "
              f"{r['outcome']:9} {r['done']:>6} {r['tok_s']:>9}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if r["under_cap"] is False or r["returncode"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
