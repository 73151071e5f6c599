"""Model loads (each attempt, with plan, placement, measured VRAM, outcome) and the placement
remembered to work per configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.schema import LoadOutcome, decode_rates, known_configs, loads, utcnow
from executor.store.upsert import upsert


@dataclass(frozen=True)
class ConfigKey:
    """What makes two loads comparable: same file, card, cap, context, sequences, ubatch."""

    model_sha256: str
    gpu_uuid: str  # "cpu" without a GPU
    cap_setting: str  # the cap as written ("11.5GiB", "90%"), "" for none
    n_ctx: int
    parallel: int
    n_ubatch: int = 512

    def where(self, table: sa.Table, *, any_ctx: bool = False) -> sa.ColumnElement[bool]:
        """This configuration; with `any_ctx`, at any context size."""
        fields = asdict(self)
        if any_ctx:
            del fields["n_ctx"]
        return sa.and_(*(table.c[k] == v for k, v in fields.items()))


def start_load(
    db: Database,
    key: ConfigKey,
    *,
    worker_id: str,
    model_path: str,
    gpu_name: str | None,
    vram_cap: int | None,
    placement: dict[str, Any],
    tensor_overrides: list[str],
    predicted_vram: int | None,
    plan: dict[str, Any] | None,
) -> int:
    """Record an attempt to load; returns its id (results point at it)."""
    with db.write() as conn:
        return conn.execute(
            sa.insert(loads)
            .values(
                **asdict(key),
                worker_id=worker_id,
                model_path=model_path,
                gpu_name=gpu_name,
                vram_cap=vram_cap,
                n_gpu_layers=placement["n_gpu_layers"],
                placement=placement,
                tensor_overrides=tensor_overrides,
                predicted_vram=predicted_vram,
                plan=plan,
                outcome=LoadOutcome.LOADING,
                started_at=utcnow(),
            )
            .returning(loads.c.id)
        ).scalar_one()


def update_load(
    db: Database,
    load_id: int,
    *,
    outcome: LoadOutcome | None = None,
    cause: str | None = None,
    measured_vram: int | None = None,
    parallel: int | None = None,
    ended: bool = False,
) -> None:
    """Record what happened to a load: measured VRAM, outcome and cause, the parallel the
    model process picked (measured decode rates), end time."""
    values: dict[str, Any] = {}
    if parallel is not None:
        values["parallel"] = parallel
    if outcome is not None:
        values["outcome"] = outcome
    if cause is not None:
        values["cause"] = cause
    if measured_vram is not None:
        values["measured_vram"] = measured_vram
    if ended:
        values["ended_at"] = utcnow()
    if values:
        with db.write() as conn:
            conn.execute(sa.update(loads).where(loads.c.id == load_id).values(**values))


def known_placement(db: Database, key: ConfigKey) -> dict[str, Any] | None:
    """The placement that last loaded and ran on this configuration (Placement.as_dict), at
    the largest context not above `key`'s: what fit there is a ceiling for any longer
    context too (more KV cache), which matters when each job sizes its own context."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(known_configs.c.n_gpu_layers, known_configs.c.placement)
            .where(key.where(known_configs, any_ctx=True), known_configs.c.n_ctx <= key.n_ctx)
            .order_by(known_configs.c.n_ctx.desc())
            .limit(1)
        ).first()
    if row is None:
        return None
    return row.placement or {"n_gpu_layers": row.n_gpu_layers}


def remember_placement(db: Database, key: ConfigKey, placement: dict[str, Any]) -> None:
    """Store the placement that works on this configuration (replacing the old one)."""
    with db.write() as conn:
        row = {"n_gpu_layers": placement["n_gpu_layers"], "placement": placement}
        upsert(conn, known_configs, {**asdict(key), **row, "updated_at": utcnow()})


def measured_excess(db: Database, key: ConfigKey) -> int:
    """How far the latest measurement on this configuration (at any context: the excess is
    the card's and the build's, not the cache's) exceeded its prediction (≥ 0)."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(loads.c.predicted_vram, loads.c.measured_vram)
            .where(
                key.where(loads, any_ctx=True),
                loads.c.measured_vram.is_not(None),
                loads.c.predicted_vram.is_not(None),
                loads.c.n_gpu_layers > 0,
            )
            .order_by(loads.c.id.desc())
            .limit(1)
        ).first()
    if row is None:
        return 0
    return max(row.measured_vram - row.predicted_vram, 0)


def decode_rates_for(db: Database, model_sha256: str, host: str, threads: int) -> dict[int, float]:
    """Decode rates measured before for this model on this host with this many threads."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(decode_rates.c.rates).where(
                decode_rates.c.model_sha256 == model_sha256,
                decode_rates.c.host == host,
                decode_rates.c.threads == threads,
            )
        ).first()
    return {int(n): float(r) for n, r in row.rates.items()} if row else {}


def remember_decode_rates(
    db: Database, model_sha256: str, host: str, threads: int, rates: dict[int, float]
) -> None:
    """Keep what a load measured (replacing an older measurement)."""
    row = {
        "model_sha256": model_sha256,
        "host": host,
        "threads": threads,
        "rates": {str(n): round(r, 2) for n, r in sorted(rates.items())},
        "measured_at": utcnow(),
    }
    with db.write() as conn:
        upsert(conn, decode_rates, row)


def recent_loads(db: Database, limit: int = 20) -> list[dict[str, Any]]:
    """The latest loads, newest first (the status page's history: OOM shrinks show here)."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(
                loads.c.id, loads.c.worker_id, loads.c.model_path, loads.c.gpu_name,
                loads.c.vram_cap, loads.c.n_ctx, loads.c.parallel, loads.c.n_gpu_layers,
                loads.c.predicted_vram, loads.c.measured_vram, loads.c.plan, loads.c.outcome,
                loads.c.cause, loads.c.started_at, loads.c.ended_at,
            )
            .order_by(loads.c.id.desc())
            .limit(limit)
        ).all()  # fmt: skip
    return [dict(r._mapping) for r in rows]
