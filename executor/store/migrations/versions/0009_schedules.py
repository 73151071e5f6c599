"""job priority and time window; worker state, resume time and scheduler; pauses

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("window", sa.String(200), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("state", sa.String(200), nullable=True))
        batch.add_column(sa.Column("resumes_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("scheduler", sa.String(200), nullable=True))
    op.create_table(
        "pauses",
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("paused_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("target", name="pk_pauses"),
    )


def downgrade() -> None:
    op.drop_table("pauses")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("scheduler")
        batch.drop_column("resumes_at")
        batch.drop_column("state")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("window")
        batch.drop_column("priority")
