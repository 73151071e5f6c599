"""Executor's own cost per item: `--parallel 1` against the strongest plain loop, one run.

    .venv/bin/python benchmarks/overhead.py [--workload chat] [--prompts 32]
        [--max-tokens 128] [--rounds 2]

(a) plain loop: benchmarks/plain_loop.py, one `Llama` with n_threads = n_threads_batch = the
    physical cores, one call per prompt (create_chat_completion for chat work);
(b) executor: `submit` → `run --until-empty --parallel 1` → `export`, the same threads (its
    default), one sequence at a time: everything it adds (the queue, a model process,
    checkpoints, per-token Python) and nothing that batching buys back.

Two ratios b/a: over whole processes (start-up and load included, what a cron user pays)
and over generation only (first claim to last checkpoint against the loop's calls). Rounds
alternate (a, b, a, b) so that drift of the machine shows up as spread, not as bias.
Target: whole process >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import WORKLOADS, executor_run, plain_loop, threads  # noqa: E402
from executor.gguf.models import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="chat", choices=sorted(WORKLOADS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = resolve_model(os.environ.get("EXECUTOR_MODEL"))
    rows = WORKLOADS[args.workload](args.prompts, args.max_tokens)
    t = threads()
    print(
        f"model {model.name}, {args.workload} work, {args.prompts} prompts, max_tokens "
        f"{args.max_tokens}, greedy, {os.cpu_count()} CPUs, {t} threads for both"
    )
    whole, gen = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            a = plain_loop(model, rows, Path(tmp), n_threads=t)
            b = executor_run(rows, Path(tmp), parallel=1)
            whole.append(b["tok_s"] / a["tok_s"])
            gen.append(b["gen_tok_s"] / a["gen_tok_s"])
            print(
                f"round {rnd}: plain {a['tok_s']:6.1f} tok/s whole ({a['tokens']} tok in "
                f"{a['wall_s']:.1f}s), {a['gen_tok_s']:6.1f} gen | executor {b['tok_s']:6.1f} "
                f"whole ({b['tokens']} tok, run {b['run_s']:.1f}s, start-up "
                f"{b['startup_s']:.2f}s), {b['gen_tok_s']:6.1f} gen | ratio whole "
                f"{whole[-1]:.3f}, gen {gen[-1]:.3f}",
                flush=True,
            )
    print(
        f"executor / plain loop: whole process mean {statistics.mean(whole):.3f} "
        f"(min {min(whole):.3f}, max {max(whole):.3f}); generation only mean "
        f"{statistics.mean(gen):.3f}; target >= 0.95 whole"
    )


if __name__ == "__main__":
    main()
