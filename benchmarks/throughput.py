"""Throughput: executor at parallel 1/4/8/16 against a plain llama-cpp-python loop and
llama.cpp's own llama-batched-bench, same model, same machine, one run.

    .venv/bin/python benchmarks/throughput.py [--prompts 32] [--new-tokens 128] [--rounds 2]

(a) plain loop: one `Llama`, `create_completion` per prompt, greedy, 128 new tokens;
(b) executor end to end: `submit` → `run --until-empty --parallel N` → `export`;
(c) llama-batched-bench (-npp 64 -ntg 128 -npl N), built from the llama.cpp source vendored
    in the llama-cpp-python sdist of the installed version (downloaded from PyPI once and
    built into benchmarks/.cache; said so when that is not possible).

Rates are completion tokens per second: for (a) over the generation loop, for (b) from the
job's first claim to its last checkpoint (model load excluded from both; (b)'s wall time with
start-up, load and export is printed too), for (c) B·TG / T from its table. Each round
repeats everything, so the spread between rounds shows the machine's noise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
sys.path.insert(0, str(ROOT))

from benchmarks.common import executor_run  # noqa: E402
from executor.models import resolve_model  # noqa: E402

PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
    "steps as his father had taught him, and at the top he wiped the great lens, lit "
    "the lamp and watched the ships pass in the dark water below. One night"
)


def prompt_rows(n: int, new_tokens: int) -> list[dict]:
    """About 64-token raw prompts that invite a long continuation."""
    return [
        {"custom_id": f"b{i}", "prompt": f"{PASSAGE} ({i})", "max_tokens": new_tokens}
        for i in range(n)
    ]


def plain_loop(model: Path, rows: list[dict]) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=2048, seed=0, verbose=False)
    tokens = 0
    started = time.perf_counter()
    for row in rows:
        out = llm.create_completion(
            prompt=row["prompt"], max_tokens=row["max_tokens"], temperature=0.0, top_p=1.0, seed=0
        )
        tokens += out["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    llm.close()
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


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
                "-DLLAMA_CURL=OFF",
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


def batched_bench(binary: Path, model: Path, parallels: list[int], new_tokens: int) -> dict:
    """B·TG / T per parallel count, from llama-batched-bench's table."""
    cores = os.cpu_count() or 1
    out = subprocess.run(
        [
            str(binary),
            "-m",
            str(model),
            "-c",
            str(max(parallels) * (64 + new_tokens) + 256),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            "64",
            "-ntg",
            str(new_tokens),
            "-npl",
            ",".join(map(str, parallels)),
            "-t",
            str(max(cores // 2, 1)),
            "-tb",
            str(cores),
            "-fa",
            "off",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]):
            tg, b, t = int(cells[1]), int(cells[2]), float(cells[8])
            rates[b] = b * tg / t
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--parallel", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = resolve_model(os.environ.get("EXECUTOR_MODEL"))
    parallels = [int(p) for p in args.parallel.split(",")]
    rows = prompt_rows(args.prompts, args.new_tokens)
    bench = batched_bench_binary()
    print(
        f"model {model.name}; {args.prompts} prompts of ~64 tokens, {args.new_tokens} new "
        f"tokens, greedy; {os.cpu_count()} CPUs"
    )
    if isinstance(bench, str):
        print(f"llama-batched-bench: not run ({bench})")
    table: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            plain = plain_loop(model, rows)
            table.setdefault("plain", []).append(plain["tok_s"])
            line = [f"round {rnd}: plain {plain['tok_s']:.1f} tok/s ({plain['tokens']} tok)"]
            ref = (
                batched_bench(bench, model, parallels, args.new_tokens)
                if not isinstance(bench, str)
                else {}
            )
            for p in parallels:
                ours = executor_run(rows, Path(tmp), parallel=p, ctx=1024)
                table.setdefault(f"executor p{p}", []).append(ours["tok_s"])
                vs_bench = ""
                if p in ref:
                    table.setdefault(f"batched-bench p{p}", []).append(ref[p])
                    vs_bench = f", {ours['tok_s'] / ref[p]:.2f}× bench {ref[p]:.1f}"
                line.append(
                    f"p{p} {ours['tok_s']:.1f} ({ours['tokens']} tok, "
                    f"{ours['tok_s'] / plain['tok_s']:.2f}× plain{vs_bench}; wall "
                    f"{ours['wall_s']:.1f}s)"
                )
            print(" | ".join(line), flush=True)
    print("\nmean completion tokens/s over rounds (min–max), and ratios of the means:")
    plain_mean = statistics.mean(table["plain"])
    for name, values in table.items():
        mean = statistics.mean(values)
        extra = ""
        if name.startswith("executor"):
            p = name.split("p")[-1]
            extra = f"   {mean / plain_mean:.2f}× plain"
            bench_values = table.get(f"batched-bench p{p}")
            if bench_values:
                extra += f", {mean / statistics.mean(bench_values):.2f}× batched-bench"
        print(f"  {name:18} {mean:7.1f}  ({min(values):.1f}–{max(values):.1f}){extra}")


if __name__ == "__main__":
    main()
