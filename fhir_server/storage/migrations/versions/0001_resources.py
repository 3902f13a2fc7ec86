"""Resources, their versions and the token index used by conditional operations.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

from fhir_server.storage.schema import BigPK, JsonText

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resource",
        sa.Column("pk", BigPK, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.UniqueConstraint("type", "id", name="uq_resource_type_id"),
    )
    op.create_index("ix_resource_type_last_updated", "resource", ["type", "last_updated"])
    op.create_table(
        "resource_version",
        sa.Column("seq", BigPK, primary_key=True, autoincrement=True),
        sa.Column("resource_pk", sa.BigInteger, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("content", JsonText, nullable=True),
        sa.UniqueConstraint("resource_pk", "version_id", name="uq_resource_version"),
    )
    op.create_index("ix_resource_version_type_seq", "resource_version", ["type", "seq"])
    op.create_table(
        "search_token",
        sa.Column("resource_pk", sa.BigInteger, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("system", sa.String(255), nullable=True),
        sa.Column("code", sa.String(255), nullable=False),
    )
    op.create_index("ix_search_token_lookup", "search_token", ["type", "param", "code", "system"])
    op.create_index("ix_search_token_resource", "search_token", ["resource_pk"])


def downgrade() -> None:
    op.drop_table("search_token")
    op.drop_table("resource_version")
    op.drop_table("resource")
