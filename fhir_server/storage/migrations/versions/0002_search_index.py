"""Search index tables for every parameter type; server_state.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TEXT = sa.String(255).with_variant(sa.String(255, collation="C"), "postgresql")
_TABLES = {
    "search_string": ([sa.Column("value", _TEXT, nullable=False), sa.Column("exact", sa.Text, nullable=False)],
                      [("type", "param", "value")]),
    "search_date": ([sa.Column("lo", sa.BigInteger, nullable=False), sa.Column("hi", sa.BigInteger, nullable=False),
                     sa.Column("narrow", sa.Boolean, nullable=False)],
                    [("type", "param", "narrow", "lo")]),
    "search_reference": ([sa.Column("target_type", sa.String(64)), sa.Column("target_id", sa.String(64)),
                          sa.Column("url", sa.String(512))],
                         [("type", "param", "target_id", "target_type"), ("target_type", "target_id"), ("url",)]),
    "search_number": ([sa.Column("value", sa.Float, nullable=False)], [("type", "param", "value")]),
    "search_quantity": ([sa.Column("system", sa.String(255)), sa.Column("code", sa.String(255)),
                         sa.Column("value", sa.Float, nullable=False)], [("type", "param", "code", "value")]),
    "search_uri": ([sa.Column("uri", sa.String(512), nullable=False)], [("type", "param", "uri")]),
}


def upgrade() -> None:
    with op.batch_alter_table("search_token") as batch:
        batch.alter_column("param", type_=sa.String(100), existing_nullable=False)
    for name, (columns, lookups) in _TABLES.items():
        op.create_table(
            name,
            sa.Column("resource_pk", sa.BigInteger, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False),
            sa.Column("type", sa.String(64), nullable=False),
            sa.Column("param", sa.String(100), nullable=False),
            *columns,
        )
        for i, cols in enumerate(lookups):
            op.create_index(f"ix_{name}_lookup{i or ''}", name, list(cols))
        op.create_index(f"ix_{name}_resource", name, ["resource_pk"])
    op.create_table("server_state", sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text, nullable=False))


def downgrade() -> None:
    op.drop_table("server_state")
    for name in _TABLES:
        op.drop_table(name)
