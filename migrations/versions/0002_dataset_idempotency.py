"""Idempotency-Key on POST /v1/datasets: idempotency_keys may point at a dataset instead of a job

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=True)
        batch_op.add_column(sa.Column("dataset_id", sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_idempotency_keys_dataset_id_datasets"),
            "datasets",
            ["dataset_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE job_id IS NULL")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_idempotency_keys_dataset_id_datasets"), type_="foreignkey")
        batch_op.drop_column("dataset_id")
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=False)
