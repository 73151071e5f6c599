"""Model loads (each attempt, with plan, layers, measured VRAM, outcome) and remembered configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.schema import LoadOutcome, known_configs, loads, utcnow


@dataclass(frozen=True)
class ConfigKey:
    """What makes two loads comparable: same file, same card, same cap, same context."""

    model_sha256: str
    gpu_uuid: str  # "cpu" without a GPU
    cap_setting: str  # the cap as written ("11.5GiB", "90%"), "" for none
    n_ctx: int
    parallel: int

    def where(self, table: sa.Table) -> sa.ColumnElement[bool]:
        return sa.and_(*(table.c[k] == v for k, v in asdict(self).items()))


def start_load(
    db: Database,
    key: ConfigKey,
    *,
    worker_id: str,
    model_path: str,
    gpu_name: str | None,
    vram_cap: int | None,
    n_gpu_layers: int,
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
                n_gpu_layers=n_gpu_layers,
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
    ended: bool = False,
) -> None:
    """Record what happened to a load: measured VRAM, outcome and cause, end time."""
    values: dict[str, Any] = {}
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


def known_layers(db: Database, key: ConfigKey) -> int | None:
    """The layer count that last loaded and ran on this configuration."""
    with db.read() as conn:
        return conn.execute(
            sa.select(known_configs.c.n_gpu_layers).where(key.where(known_configs))
        ).scalar()


def remember_layers(db: Database, key: ConfigKey, n_gpu_layers: int) -> None:
    """Store the layer count that works on this configuration (replacing the old one)."""
    with db.write() as conn:
        conn.execute(sa.delete(known_configs).where(key.where(known_configs)))
        conn.execute(
            sa.insert(known_configs).values(
                **asdict(key), n_gpu_layers=n_gpu_layers, updated_at=utcnow()
            )
        )


def measured_excess(db: Database, key: ConfigKey) -> int:
    """How far the latest measurement on this configuration exceeded its prediction (≥ 0)."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(loads.c.predicted_vram, loads.c.measured_vram)
            .where(
                key.where(loads),
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
