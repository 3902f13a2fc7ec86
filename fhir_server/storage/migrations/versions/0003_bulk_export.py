"""Bulk Data export: jobs, their output chunks and Group patients; resources by (type, pk).

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_resource_type_pk", "resource", ["type", "pk"])
    op.create_table(
        "export_job",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("group_id", sa.String(64), nullable=True),
        sa.Column("types", sa.Text, nullable=False),
        sa.Column("since", sa.BigInteger, nullable=True),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("transaction_time", sa.BigInteger, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("type_index", sa.Integer, nullable=False),
        sa.Column("after_pk", sa.BigInteger, nullable=False),
        sa.Column("file_no", sa.Integer, nullable=False),
        sa.Column("part", sa.Integer, nullable=False),
        sa.Column("exported", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "export_chunk",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("export_job.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("file_no", sa.Integer, primary_key=True),
        sa.Column("part", sa.Integer, primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # NDJSON chunks are written once and read once: compressing them costs more CPU than it saves.
        op.execute("ALTER TABLE export_chunk ALTER COLUMN data SET STORAGE EXTERNAL")
    op.create_table(
        "export_patient",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("export_job.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("patient_id", sa.String(64), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("export_patient")
    op.drop_table("export_chunk")
    op.drop_table("export_job")
    op.drop_index("ix_resource_type_pk", "resource")
