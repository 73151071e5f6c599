"""batch leases (validate, finalize once), item error codes, live progress of workers

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_batches") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("error_code", sa.String(40), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("tokens_in_flight", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("items_in_flight", sa.Float(), nullable=True))
    op.create_table(
        "rate_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_rate_samples_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rate_samples"),
    )
    op.create_index("ix_rate_samples_job", "rate_samples", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_rate_samples_job", table_name="rate_samples")
    op.drop_table("rate_samples")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("items_in_flight")
        batch.drop_column("tokens_in_flight")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("error_code")
    with op.batch_alter_table("api_batches") as batch:
        batch.drop_column("lease_until")
