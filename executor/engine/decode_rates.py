"""`--parallel auto` on the CPU, from a measurement on this machine.

More sequences per decode step share one pass over the weights, so tokens per second grow
with them until the CPU is compute-bound; where that happens depends on the model, the CPU,
its cores and memory bandwidth. So the model process measures it once after loading (one
decode step of 1, 2, 4, … sequences, the fastest of a few tries each) and the worker keeps
the rates per (model, host, threads). The choice is the most sequences whose rate is within
2 % of the best measured (ties within noise go to more sequences): whole runs gain more from
more sequences than single decode steps show — prompts are batched together and a job runs
in fewer waves — so on this project's machine 16 sequences were within 2 % of 32 by step
rates and 4–9 % slower end to end, on chat and long work alike. Memory is what more
sequences cost, and the cap the worker passes in already holds them to what fits in RAM.
"""

from __future__ import annotations

SIZES = (1, 2, 4, 8, 16, 32, 64)  # sequences per step, measured up to the cap
WITHIN = 0.02  # the most sequences within this share of the best rate
FLAT = 1.02  # stop measuring once two doublings in a row (from 8 on) gain less than this
PROMPT_RATE = 0  # the key under which the rates keep prompt tokens/s (one long prompt)


def candidates(cap: int) -> tuple[int, ...]:
    """The sizes worth measuring under `cap` (memory, the job's items): the cap itself too."""
    cap = max(1, cap)
    sizes = [s for s in SIZES if s <= cap]
    if cap < SIZES[-1] and cap not in sizes:
        sizes.append(cap)
    return tuple(sizes)


def decode_only(rates: dict[int, float]) -> dict[int, float]:
    """The decode rates alone (without the prompt rate kept beside them)."""
    return {n: r for n, r in rates.items() if n != PROMPT_RATE}


def pick_parallel(rates: dict[int, float], cap: int | None = None) -> int:
    """The most sequences whose decode rate is within WITHIN of the best (at most `cap`;
    the cap itself where the rates still grow past it)."""
    rates = decode_only(rates)
    usable = {n: r for n, r in rates.items() if cap is None or n <= cap}
    if not usable:
        return 1 if cap is None else cap
    best = max(usable.values())
    if (
        cap is not None
        and cap not in usable
        and any(r > best * (1 + WITHIN) for n, r in rates.items() if n > cap)
    ):
        return cap
    return max(n for n, r in usable.items() if r >= best * (1 - WITHIN))


def worth_more(rates: dict[int, float], cap: int) -> bool:
    """Whether rates measured before (for a smaller job) stop below `cap` sequences while
    still growing: then they are measured again, up to the cap."""
    decode = decode_only(rates)
    if not decode:
        return True
    top = max(decode)
    below = [n for n in decode if n < top]
    return top < min(cap, SIZES[-1]) and (not below or decode[top] >= decode[max(below)] * FLAT)


def describe(rates: dict[int, float]) -> str:
    """'1: 95, 2: 128, 4: 170 … tok/s; prompts 1480 tok/s' for notes and logs."""
    text = ", ".join(f"{n}: {r:.0f}" for n, r in sorted(decode_only(rates).items())) + " tok/s"
    if PROMPT_RATE in rates:
        text += f"; prompts {rates[PROMPT_RATE]:.0f} tok/s"
    return text
