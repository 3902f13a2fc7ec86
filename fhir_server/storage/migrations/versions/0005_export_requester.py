"""Export jobs remember who kicked them off, so only they may poll, download or cancel them.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("export_job", sa.Column("requester", sa.String(512), nullable=True))


def downgrade() -> None:
    op.drop_column("export_job", "requester")
