"""tensor placement: loads and known configs keep the placement and ubatch; items their
context need

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

KEY = ["model_sha256", "gpu_uuid", "cap_setting", "n_ctx", "parallel"]


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("context_need", sa.Integer(), nullable=True))

    with op.batch_alter_table("loads", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("n_ubatch", sa.Integer(), server_default="512", nullable=False)
        )
        batch_op.add_column(sa.Column("placement", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("tensor_overrides", sa.JSON(), nullable=True))
        batch_op.drop_index("ix_loads_config")
        batch_op.create_index("ix_loads_config", [*KEY, "n_ubatch"], unique=False)

    # Remembered layer counts were learned at llama.cpp's default ubatch of 512.
    with op.batch_alter_table("known_configs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("n_ubatch", sa.Integer(), server_default="512", nullable=False)
        )
        batch_op.add_column(sa.Column("placement", sa.JSON(), nullable=True))
        batch_op.drop_constraint("pk_known_configs", type_="primary")
        batch_op.create_primary_key("pk_known_configs", [*KEY, "n_ubatch"])


def downgrade() -> None:
    with op.batch_alter_table("known_configs", schema=None) as batch_op:
        batch_op.drop_constraint("pk_known_configs", type_="primary")
        batch_op.create_primary_key("pk_known_configs", KEY)
        batch_op.drop_column("placement")
        batch_op.drop_column("n_ubatch")

    with op.batch_alter_table("loads", schema=None) as batch_op:
        batch_op.drop_index("ix_loads_config")
        batch_op.create_index("ix_loads_config", KEY, unique=False)
        batch_op.drop_column("tensor_overrides")
        batch_op.drop_column("placement")
        batch_op.drop_column("n_ubatch")

    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("context_need")
