"""Throughput on chat-shaped and long work: executor against the strongest plain loop and
llama.cpp's own llama-batched-bench, same model, same machine, same threads, one run.

    .venv/bin/python benchmarks/throughput.py [--workload chat,long] [--prompts 32]
        [--max-tokens 128] [--parallel auto,1,4,8,16] [--rounds 2]

- plain loop: benchmarks/plain_loop.py, one `Llama` with n_threads = n_threads_batch = the
  physical cores, one call per prompt (create_chat_completion for chat work);
- executor: `run --until-empty --parallel N` (auto = its default) after a `submit`, the
  whole `run` process timed (start-up, model load, claims, checkpoints);
- llama-batched-bench: -npp (the workload's mean prompt tokens) -ntg max_tokens -npl N,
  -t and -tb at the physical cores; every sequence generates all max_tokens (no EOS, no
  tail), so it is a ceiling, not a peer: B·TG over its total time (prompt + generation).

Rates are completion tokens per second over whole processes (the plain loop's and executor's
include Python start-up and the model load; batched-bench's table excludes its load), and
`gen` rates over generation only. Each round repeats everything, so the spread between rounds
shows the machine's noise. Built from the llama.cpp source vendored in the llama-cpp-python
sdist of the installed version (downloaded from PyPI once, built with the same CMake flags
as executor's llama.cpp into benchmarks/.cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
sys.path.insert(0, str(ROOT))

from benchmarks.common import WORKLOADS, executor_run, plain_loop, threads  # noqa: E402
from executor.gguf.models import resolve_model  # noqa: E402


def batched_bench_binary() -> Path | str:
    """llama-batched-bench built from the vendored llama.cpp, or why it is not available."""
    import llama_cpp

    version = llama_cpp.__version__
    binary = CACHE / f"llama.cpp-{version}" / "build" / "bin" / "llama-batched-bench"
    if binary.exists():
        return binary
    if not shutil.which("cmake"):
        return "cmake is not installed"
    CACHE.mkdir(exist_ok=True)
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(CACHE),
                f"llama-cpp-python=={version}",
            ],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        return f"could not download the llama-cpp-python {version} sdist: {exc.stderr[-300:]}"
    sdist = next(CACHE.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(CACHE, filter="data")
    source = CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = binary.parent.parent
    print(f"building llama-batched-bench from {source} (a few minutes, once)", flush=True)
    try:
        subprocess.run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                # The flags executor's own llama.cpp is built with (no AMX: see the script).
                *subprocess.run(
                    [str(ROOT / "scripts" / "llama-cmake-args")],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split(),
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=ON",
                "-DLLAMA_BUILD_TOOLS=ON",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build),
                "--target",
                "llama-batched-bench",
                "-j",
                str(os.cpu_count() or 2),
            ],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        return f"building llama-batched-bench failed: {exc.stderr[-500:]!r}"
    return binary if binary.exists() else "llama-batched-bench was not produced by the build"


def batched_bench(
    binary: Path, model: Path, parallels: list[int], prompt_tokens: int, new_tokens: int, t: int
) -> dict[int, float]:
    """B·TG / T per parallel count, from llama-batched-bench's table."""
    out = subprocess.run(
        [str(binary), "-m", str(model), "-c", str(max(parallels) * (prompt_tokens + new_tokens)
         + 256), "-b", "2048", "-ub", "512", "-npp", str(prompt_tokens), "-ntg",
         str(new_tokens), "-npl", ",".join(map(str, parallels)), "-t", str(t), "-tb", str(t),
         "-fa", "off"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    rates = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]):
            tg, b, total = int(cells[1]), int(cells[2]), float(cells[8])
            rates[b] = b * tg / total
    return rates


def mean_prompt_tokens(model: Path, rows: list[dict]) -> int:
    """The workload's prompts in the model's tokens, chat template included (what
    batched-bench's -npp should be to compare like with like)."""
    code = (
        "import json,sys\n"
        "from llama_cpp import Llama\n"
        "llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False, vocab_only=True)\n"
        "rows = json.loads(sys.stdin.read())\n"
        "from llama_cpp.llama_chat_format import Jinja2ChatFormatter\n"
        "t = llm.metadata.get('tokenizer.chat_template')\n"
        "fmt = Jinja2ChatFormatter(t, eos_token='', bos_token='') if t else None\n"
        "n = []\n"
        "for r in rows:\n"
        "    text = fmt(messages=r['messages']).prompt if 'messages' in r else r['prompt']\n"
        "    n.append(len(llm.tokenize(text.encode(), add_bos=True, special=True)))\n"
        "print(round(sum(n) / len(n)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model)],
        input=json.dumps(rows), check=True, capture_output=True, text=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="chat,long")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--parallel", default="auto,1,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = resolve_model(os.environ.get("EXECUTOR_MODEL"))
    parallels = args.parallel.split(",")
    t = threads()
    bench = batched_bench_binary()
    print(
        f"model {model.name}; {args.prompts} prompts, max_tokens {args.max_tokens}, greedy; "
        f"{os.cpu_count()} CPUs, {t} threads for everyone (physical cores)"
    )
    if isinstance(bench, str):
        print(f"llama-batched-bench: not run ({bench})")
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workload.split(","):
            rows = WORKLOADS[workload](args.prompts, args.max_tokens)
            npp = mean_prompt_tokens(model, rows)
            print(f"\n== {workload}: prompts of {npp} tokens on average ==", flush=True)
            table: dict[str, list[float]] = {}
            extra: dict[str, list[dict]] = {}
            for rnd in range(1, args.rounds + 1):
                line = one_round(model, rows, Path(tmp) / workload, parallels, bench, npp, t,
                                 args.max_tokens, table, extra)  # fmt: skip
                print(f"round {rnd}: " + " | ".join(line), flush=True)
            report(table, extra)


def one_round(
    model: Path,
    rows: list[dict],
    workdir: Path,
    parallels: list[str],
    bench: Path | str,
    npp: int,
    t: int,
    max_tokens: int,
    table: dict[str, list[float]],
    extra: dict[str, list[dict]],
) -> list[str]:
    """Everything once: the plain loop, batched-bench, executor at each --parallel."""
    workdir.mkdir(exist_ok=True)
    plain = plain_loop(model, rows, workdir, n_threads=t)
    table.setdefault("plain loop", []).append(plain["tok_s"])
    extra.setdefault("plain loop", []).append(plain)
    line = [
        f"plain {plain['tok_s']:.1f} tok/s ({plain['tokens']} tok, {plain['wall_s']:.1f}s; "
        f"load {plain['load_s']:.1f}s)"
    ]
    if not isinstance(bench, str):
        numeric = sorted({int(p) for p in parallels if p != "auto"})
        for b, rate in batched_bench(bench, model, numeric, npp, max_tokens, t).items():
            table.setdefault(f"batched-bench N={b}", []).append(rate)
    for p in parallels:
        # auto keeps one database across rounds, as a nightly user's does: round 1 pays for
        # measuring decode rates, later rounds read them back.
        db = workdir / "auto.db" if p == "auto" else None
        ours = executor_run(rows, workdir, parallel=p, db=db)
        name = f"executor -np {p}"
        table.setdefault(name, []).append(ours["tok_s"])
        extra.setdefault(name, []).append(ours)
        line.append(
            f"{name} {ours['tok_s']:.1f} ({ours['tokens']} tok, run {ours['run_s']:.1f}s, "
            f"start-up {ours['startup_s']:.1f}s, N={ours['parallel']})"
        )
    return line


def report(table: dict[str, list[float]], extra: dict[str, list[dict]]) -> None:
    """Means over rounds (min–max) and ratios of the means."""
    plain = statistics.mean(table["plain loop"])
    print(f"\n{'':22}{'tok/s':>8}  {'(min–max)':14}{'× plain':>8}{'× bench':>9}  gen tok/s")
    for name, values in table.items():
        mean = statistics.mean(values)
        vs_bench = ""
        runs = extra.get(name, [])
        n = runs[0]["parallel"] if runs and "parallel" in runs[0] else None
        if n is not None and f"batched-bench N={n}" in table:
            vs_bench = f"{mean / statistics.mean(table[f'batched-bench N={n}']):.2f}"
        gen = f"{statistics.mean(r['gen_tok_s'] for r in runs):.1f}" if runs else ""
        label = name + (f" (N={n})" if name.endswith("auto") and n else "")
        print(
            f"{label:22}{mean:8.1f}  ({min(values):.1f}–{max(values):.1f})".ljust(46)
            + f"{mean / plain:8.2f}{vs_bench:>9}  {gen}"
        )
    starts = [r["startup_s"] for k, v in extra.items() if k != "plain loop" for r in v]
    loads = [r["load_s"] for r in extra["plain loop"]]
    print(
        f"start-up: executor run {statistics.mean(starts):.2f}s to the first claim "
        f"(imports, model process, load); plain loop {statistics.mean(loads):.2f}s to a "
        "loaded model (import + load)"
    )


if __name__ == "__main__":
    main()
