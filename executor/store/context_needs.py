"""The tokens each item's sequence needs (prompt, as the model tokenizes it, + max_tokens),
counted before a job's first load so that the context can be sized from the work."""

from __future__ import annotations

import sqlalchemy as sa

from executor.store.db import Database
from executor.store.queue import CLAIMED_COLUMNS, UNFINISHED, ClaimedItem
from executor.store.schema import items


def items_to_count(
    db: Database, job_id: int, *, after_id: int = 0, limit: int = 2000
) -> list[ClaimedItem]:
    """Unfinished items of a job whose context need is not counted yet, by id."""
    query = (
        sa.select(*CLAIMED_COLUMNS)
        .where(
            items.c.job_id == job_id,
            items.c.status.in_(UNFINISHED),
            items.c.context_need.is_(None),
            items.c.id > after_id,
        )
        .order_by(items.c.id)
        .limit(limit)
    )
    with db.read() as conn:
        return [ClaimedItem(*row) for row in conn.execute(query)]


def set_context_need(db: Database, needs: dict[int, int]) -> None:
    """Record how many tokens each item's sequence needs (prompt + max_tokens)."""
    if not needs:
        return
    with db.write() as conn:
        conn.execute(
            sa.update(items).where(items.c.id == sa.bindparam("item_id")),
            [{"item_id": i, "context_need": n} for i, n in needs.items()],
        )


def context_need(db: Database, job_id: int) -> int | None:
    """The most tokens any unfinished item of the job needs (None: none counted)."""
    with db.read() as conn:
        return conn.execute(
            sa.select(sa.func.max(items.c.context_need)).where(
                items.c.job_id == job_id, items.c.status.in_(UNFINISHED)
            )
        ).scalar()
