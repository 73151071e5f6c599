"""GPU check: does the VRAM-capped plan hold on a real card? Plan vs NVML-measured VRAM.

    bash benchmarks/gpu_check.sh            # sets up a CUDA build, then runs this script

On an NVIDIA machine: holds all but `--visible` (12 GiB) of the card with a plain CUDA
allocation in a helper process, writes a synthetic 70B-shaped Q4_K_M GGUF (sparse zeros:
41 GB on paper, megabytes on disk), and for each cap (8, 10, 11.5 GiB) runs a two-prompt job
through `executor run --vram-cap CAP`, then prints the plan's layers and predicted VRAM next to
what NVML measured for the model process, and whether the cap held.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.gpu import probe  # noqa: E402
from executor.units import format_bytes, parse_size  # noqa: E402
from tests.synthetic_gguf import write_llama_gguf  # noqa: E402


def hold_vram(nbytes: int, ready: mp.synchronize.Event, done: mp.synchronize.Event) -> None:
    """Allocate `nbytes` on GPU 0 with the CUDA driver API and keep it until `done`."""
    cuda = ctypes.CDLL("libcuda.so.1")
    check = _checker(cuda)
    check(cuda.cuInit(0))
    device = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0))
    context = ctypes.c_void_p()
    check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device))
    pointers = []
    chunk = 1 << 30
    remaining = nbytes
    while remaining > 0:  # in 1 GiB pieces: one huge allocation can fail on fragmentation
        size = min(chunk, remaining)
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


def run_job(model: Path, cap: str, ctx: int, workdir: Path) -> dict:
    """One job under `cap`; returns its load rows (layers, predicted, measured, outcome).

    One database for all caps, so the 41 GB file is hashed once (its hash is cached).
    """
    db = workdir / "check.db"
    env = {**os.environ, "EXECUTOR_DB": str(db), "EXECUTOR_CTX": str(ctx)}
    prompts = workdir / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Hello", "max_tokens": 8}\n{"prompt": "World", "max_tokens": 8}\n'
    )
    cli = [sys.executable, "-m", "executor"]
    subprocess.run(
        [*cli, "submit", str(prompts), "--model", str(model), "--force"],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    run = subprocess.run(
        [*cli, "run", "--until-empty", "--vram-cap", cap, "--allow-swap"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [
        dict(r)
        for r in conn.execute(
            "SELECT n_gpu_layers, predicted_vram, measured_vram, vram_cap, outcome, cause "
            "FROM loads WHERE cap_setting = ? ORDER BY id",
            (cap,),
        )
    ]
    conn.close()
    return {"cap": cap, "loads": rows, "returncode": run.returncode, "log": run.stderr[-3000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visible", default="12GiB", help="VRAM left free for the check")
    parser.add_argument("--caps", default="8GiB,10GiB,11.5GiB")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

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
        print(f"holding {format_bytes(hold)}; free now {format_bytes(probe().gpus[0].free)}")
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_llama_gguf(Path(tmp) / "synthetic-70b.Q4_K_M.gguf", "70b")
            for cap in args.caps.split(","):
                results.append(run_job(model, cap, args.ctx, Path(tmp)))
    finally:
        done.set()
        if holder is not None:
            holder.join(30)
    print(
        f"\n{'cap':>9} {'layers':>7} {'predicted':>11} {'measured':>11} {'meas/pred':>9} "
        f"{'under cap':>9}  outcome"
    )
    for result in results:
        cap_bytes = parse_size(result["cap"])
        for load in result["loads"]:
            measured, predicted = load["measured_vram"], load["predicted_vram"]
            ratio = f"{measured / predicted:.3f}" if measured and predicted else "-"
            under = "-" if measured is None else ("yes" if measured <= cap_bytes else "NO")
            print(
                f"{result['cap']:>9} {load['n_gpu_layers']:>7} {format_bytes(predicted):>11} "
                f"{format_bytes(measured):>11} {ratio:>9} {under:>9}  {load['outcome']}"
            )
        if result["returncode"] != 0:
            print(f"  run exited {result['returncode']}:\n{result['log']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
