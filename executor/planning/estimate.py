"""How long a job will take on this worker, said before it starts.

Two measured rates make the model. A decode step costs about `a + b·n` seconds for `n`
sequences generating: `a` is one pass over the weights, `b` the work per token, both fitted
to the decode rates the model process measured on this host at 1, 2, 4 … sequences. Prompt
tokens are processed many at a time, at the prompt rate measured beside them (one long
prompt). A job then takes about

    (new tokens / P) · a + new tokens · b  +  computed prompt tokens / prompt rate  +  items · c

at the P sequences the plan picks. "Computed" prompt tokens: a prefix shared with an
earlier prompt (a common system prompt, a repeated passage) is copied in the cache, not
computed again, so each prompt counts only its part past the longest prefix it shares with
the prompts before it. What the formula leaves out — claiming, checkpointing, admitting each
prompt, copying its cached prefix, sampling — is added per item, as much as it took in
earlier jobs of this model on this host (their real time from first claim to last result,
less the formula's). Without measured rates (a GPU load measures none) the earlier jobs' own
pace is used alone. The new tokens are a range: the share of max_tokens earlier jobs of the
model used (the expected time) up to every answer using all of it (the upper bound); without
earlier jobs only the upper bound is known, and it is said so. Energy: the joules per token
earlier jobs used. With a time window, the hours are laid on its openings: "about 3 nights,
done Thu 04:00".
"""

from __future__ import annotations

import socket
import statistics
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from executor.config import Settings
from executor.engine.decode_rates import PROMPT_RATE, SIZES, decode_only, pick_parallel
from executor.gguf.models import cached_model_sha256
from executor.machine.cpus import threads_for
from executor.store import Database
from executor.store import loads as load_store
from executor.store import results as result_store
from executor.store.queue import Job
from executor.units import format_duration
from executor.windows import Window, local

CHARS_PER_TOKEN = 4.0  # a prompt not counted yet: about four characters a token


@dataclass(frozen=True)
class Estimate:
    job_id: int
    items: int  # unfinished
    prompt_tokens: int
    budget: int  # the unfinished items' max_tokens, summed: the most new tokens
    expected_tokens: int | None  # at the share earlier jobs used (None: unknown)
    parallel: int
    seconds_expected: float | None
    seconds_most: float | None  # None: nothing to estimate from yet
    basis: list[str] = field(default_factory=list)
    wh_expected: float | None = None
    wh_most: float | None = None
    window: str | None = None
    done_at: datetime | None = None  # with a window: when the expected work ends
    nights: int | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["done_at"] = self.done_at.isoformat() if self.done_at else None
        return data

    def short(self) -> str:
        """`~6m` (expected), `≤14m` (only the upper bound), `?`; for tables."""
        if self.seconds_expected is not None:
            return f"~{format_duration(self.seconds_expected)}"
        if self.seconds_most is not None:
            return f"≤{format_duration(self.seconds_most)}"
        return "?"


class Estimator:
    """Estimates jobs; what it learns about a model (rates, earlier jobs) is read once."""

    def __init__(self, settings: Settings, db: Database, host: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.host = host or socket.gethostname()
        self.threads = threads_for(settings.threads)[0]
        self._rates: dict[str, dict[int, float]] = {}
        self._past: dict[str, list[result_store.PastJob]] = {}

    def estimate(
        self, job: Job, *, parallel: int | None = None, now: datetime | None = None
    ) -> Estimate:
        work = result_store.unfinished_work(self.db, job.id)
        budget = prompt = 0
        guessed = False
        default_max = int(job.params.get("max_tokens", self.settings.max_tokens))
        for request, need in work:
            limit = int((request.get("params") or {}).get("max_tokens", default_max))
            budget += limit
            if need is not None:
                prompt += max(need - limit, 0)
            else:
                prompt += int(len(_text(request)) / CHARS_PER_TOKEN) + 1
                guessed = True
        computed = int(prompt * unshared_share([request for request, _ in work]))
        past = self._past_jobs(job)
        rates = self._rates_of(job.model)
        basis = []
        if guessed:
            basis.append("prompt tokens guessed from their length (counted at the first load)")
        share = _share(past)
        expected_tokens = int(budget * share) if share is not None else None
        if share is not None:
            basis.append(
                f"answers use {share:.0%} of max_tokens, as in {len(past)} earlier job(s) "
                "of this model here"
            )
        else:
            basis.append("no earlier job of this model here: only the upper bound is known")
        p = parallel or (past[0].parallel if past and past[0].parallel else None)
        if p is None:
            p = pick_parallel(rates, cap=min(max(len(work), 1), SIZES[-1])) if rates else 1
        p = max(1, min(p, max(len(work), 1)))
        if computed < prompt:
            basis.append(
                f"{prompt - computed:,} of the {prompt:,} prompt tokens are prefixes shared with "
                "earlier prompts: copied in the cache, not computed"
            )
        seconds = self._seconds_fn(rates, past, basis)
        most = seconds(computed, budget, p, len(work)) if seconds else None
        expected = (
            seconds(computed, expected_tokens, p, len(work))
            if seconds and expected_tokens is not None
            else None
        )
        joules = _joules_per_token(past)
        estimate = Estimate(
            job_id=job.id,
            items=len(work),
            prompt_tokens=prompt,
            budget=budget,
            expected_tokens=expected_tokens,
            parallel=p,
            seconds_expected=expected,
            seconds_most=most,
            basis=basis,
            wh_expected=joules * expected_tokens / 3600 if joules and expected_tokens else None,
            wh_most=joules * budget / 3600 if joules else None,
        )
        text = job.window or self.settings.window
        if text and (most is not None):
            window = Window.parse(text)
            at = now or datetime.now().astimezone()
            done_at, nights = window.open_time(at, expected if expected is not None else most)
            estimate = _with_window(estimate, text, done_at, nights)
        return estimate

    def _seconds_fn(
        self, rates: dict[int, float], past: list[result_store.PastJob], basis: list[str]
    ) -> Any:
        """seconds(computed prompt tokens, new tokens, parallel, items), or None with nothing
        to go on."""
        fit = _fit(decode_only(rates))
        if fit is not None:
            a, b = fit
            prompt_rate = rates.get(PROMPT_RATE) or (1 / b if b else None)

            def prompts(tokens: int) -> float:
                return tokens / prompt_rate if prompt_rate else 0.0

            def decoding(new: int, p: int) -> float:
                return (new / max(p, 1)) * a + new * b

            # What the formula leaves out of earlier jobs (claims, checkpoints, admitting each
            # prompt, copying its cached prefix, sampling) costs about the same per item.
            residuals = [
                (
                    job.seconds
                    - prompts(int(job.prompt_tokens * unshared_share(job.requests)))
                    - decoding(job.completion_tokens, job.parallel or 1)
                )
                / job.items
                for job in past[:5]
                if job.completion_tokens and job.items
            ]
            per_item = max(statistics.median(residuals), 0.0) if residuals else 0.0
            basis.append(
                f"decode and prompt rates measured here ({_rates_text(rates)})"
                + (
                    f", and {per_item * 1000:.0f} ms an item besides, as earlier jobs took"
                    if residuals
                    else ""
                )
            )
            return lambda prompt, new, p, items: (
                decoding(new, p) + prompts(prompt) + per_item * items
            )
        done = [job for job in past if job.completion_tokens]
        if not done:
            return None
        seconds = sum(j.seconds for j in done)
        tokens = sum(j.completion_tokens + j.prompt_tokens for j in done)
        basis.append(f"the pace of {len(done)} earlier job(s) of this model here")
        return lambda prompt, new, p, items: (prompt + new) * seconds / max(tokens, 1)

    def _rates_of(self, model: str) -> dict[int, float]:
        if model not in self._rates:
            try:  # the hash a load here cached (nothing is hashed or written to estimate)
                sha = cached_model_sha256(self.db, Path(model)) or ""
            except OSError:  # the model is not on this machine: no rates measured here
                sha = ""
            self._rates[model] = (
                load_store.decode_rates_for(self.db, sha, self.host, self.threads) if sha else {}
            )
        return self._rates[model]

    def _past_jobs(self, job: Job) -> list[result_store.PastJob]:
        if job.model not in self._past:
            self._past[job.model] = result_store.past_jobs(self.db, job.model, self.host)
        return [p for p in self._past[job.model] if p.job_id != job.id]


def _fit(rates: dict[int, float]) -> tuple[float, float] | None:
    """(a, b) of a step costing a + b·n seconds, least squares over the measured sizes."""
    points = [(n, n / r) for n, r in rates.items() if r > 0]
    if len(points) < 2:
        return None
    mean_n = statistics.fmean(n for n, _ in points)
    mean_t = statistics.fmean(t for _, t in points)
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    b = sum((n - mean_n) * (t - mean_t) for n, t in points) / spread if spread else 0.0
    a = mean_t - b * mean_n
    if a <= 0 or b < 0:  # noisy rates: a flat pass cost, the per-token part from the slope
        b = max(b, 0.0)
        a = max(mean_t - b * mean_n, min(t for _, t in points) * 0.5)
    return a, b


def _share(past: list[result_store.PastJob]) -> float | None:
    used = sum(j.completion_tokens for j in past)
    budgets = sum(j.max_tokens for j in past)
    return min(used / budgets, 1.0) if budgets else None


def _joules_per_token(past: list[result_store.PastJob]) -> float | None:
    measured = [j for j in past if j.energy_mj and j.completion_tokens]
    if not measured:
        return None
    return sum(j.energy_mj for j in measured) / 1000 / sum(j.completion_tokens for j in measured)  # type: ignore[misc]


def _rates_text(rates: dict[int, float]) -> str:
    decode = decode_only(rates)
    best = max(decode, key=lambda n: decode[n])
    text = f"{best} sequences: {decode[best]:.0f} tok/s"
    if PROMPT_RATE in rates:
        text += f", prompts {rates[PROMPT_RATE]:.0f} tok/s"
    return text


def unshared_share(requests: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> float:
    """The share of the prompts' text that is computed: each prompt past the longest prefix
    it shares with one of the prompts before it (which the engine copies in its cache)."""
    total = computed = 0
    seen: list[str] = []
    for request in requests:
        text = _text(request)
        shared = max((_common(text, before) for before in seen[-RECENT:]), default=0)
        total += len(text)
        computed += len(text) - shared
        seen.append(text)
    return computed / total if total else 1.0


RECENT = 64  # prompts a new one is compared with (the engine's slots hold about as many)


def _common(a: str, b: str) -> int:
    """The length of the prefix `a` and `b` share (binary search: slices compare in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _text(request: dict[str, Any]) -> str:
    if "prompt" in request:
        return str(request["prompt"])
    return "".join(str(m.get("content", "")) for m in request.get("messages") or [])


def _with_window(estimate: Estimate, text: str, done_at: datetime, nights: int) -> Estimate:
    return replace(estimate, window=text, done_at=done_at, nights=nights)


def describe(estimate: Estimate) -> str:
    """The estimate for people, a few lines."""
    e = estimate
    lines = [
        f"job {e.job_id}: {e.items} items left, {e.prompt_tokens:,} prompt tokens, up to "
        f"{e.budget:,} new tokens, at {e.parallel} sequence{'s' * (e.parallel != 1)}"
    ]
    if e.seconds_most is None:
        lines.append("  no estimate yet: nothing measured for this model on this host (run a "
                     "job of it once: its rates are measured at the first load)")  # fmt: skip
    elif e.seconds_expected is not None:
        lines.append(
            f"  about {format_duration(e.seconds_expected)} ({e.expected_tokens:,} new tokens "
            f"expected); at most {format_duration(e.seconds_most)} (every answer using all "
            "its max_tokens)"
        )
    else:
        lines.append(f"  at most {format_duration(e.seconds_most)} (every answer using all "
                     "its max_tokens)")  # fmt: skip
    if e.wh_most is not None:
        wh = f"about {e.wh_expected:.2f} Wh, " if e.wh_expected is not None else ""
        lines.append(f"  energy: {wh}at most {e.wh_most:.2f} Wh (as earlier jobs used)")
    if e.window and e.done_at is not None and e.nights:
        span = (
            "night"
            if any(end <= start for start, end in Window.parse(e.window).ranges)
            else "opening"
        )
        lines.append(
            f"  in the window {e.window}: about {e.nights} {span}{'s' * (e.nights != 1)}, "
            f"done {local(e.done_at)}"
        )
    lines += [f"  ({b})" for b in e.basis]
    return "\n".join(lines)
