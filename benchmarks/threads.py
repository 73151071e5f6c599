"""Threads on a shared CPU: `--threads auto` against every fixed count, alone and beside a
busy neighbour.

A workstation is a shared machine. llama.cpp's threads spin at a barrier after each
operation; when another process holds one of their cores, every barrier waits for a
scheduler slice. `auto` starts with the physical cores and the model process steps its
threads down to the cores others leave it (machine.cpus.CpuWatch), and back up when they
leave. Here: the default model, `--parallel 2`, long continuations, whole `executor run`
processes timed (start-up included); the neighbour is one Python busy loop per core given
(`--neighbours`), started before the run and stopped after.

    .venv/bin/python benchmarks/threads.py [--rounds 2] [--neighbours 1] [--tokens 96]

Prints each configuration's wall time and tok/s, and `auto` against the best fixed count in
the same conditions (aim: within 20 %).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import executor_run, long_rows, threads  # noqa: E402

BUSY = "while True: pass"


def run(rows: list[dict], workdir: Path, setting: str) -> dict:
    env = {"EXECUTOR_THREADS": setting}
    return executor_run(rows, workdir, parallel=2, ctx=512, extra_env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--neighbours", type=int, default=1, help="busy loops beside the run")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()
    cores = threads()
    settings = ["auto", *map(str, range(1, cores + 1))]
    rows = long_rows(args.prompts, args.tokens)
    print(f"{cores} physical cores; {args.prompts} prompts x {args.tokens} tokens, parallel 2")
    table: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for neighbours in (0, args.neighbours):
            label = "alone" if neighbours == 0 else f"beside {neighbours} busy loop(s)"
            table[label] = {s: [] for s in settings}
            for _ in range(args.rounds):
                for setting in settings:
                    busy = [
                        subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(neighbours)
                    ]
                    try:
                        result = run(rows, workdir, setting)
                    finally:
                        for proc in busy:
                            proc.kill()
                            proc.wait()
                    table[label][setting].append(result["run_s"])
                    print(
                        f"  {label:24} threads {setting:4} {result['run_s']:6.1f} s  "
                        f"{result['tok_s']:6.1f} tok/s",
                        flush=True,
                    )
    print("\n| conditions | " + " | ".join(f"threads {s}" for s in settings)
          + " | auto ÷ best fixed |")  # fmt: skip
    print("| --- | " + " | ".join("---:" for _ in settings) + " | ---: |")
    for label, times in table.items():
        means = {s: mean(v) for s, v in times.items()}
        best = min(means[s] for s in settings[1:])
        cells = " | ".join(f"{means[s]:.1f} s" for s in settings)
        print(f"| {label} | {cells} | {means['auto'] / best:.2f} |")


if __name__ == "__main__":
    main()
