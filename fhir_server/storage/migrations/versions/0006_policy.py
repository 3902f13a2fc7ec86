"""Access policy: policy fact tables filled at write time (a reindex fills them for existing data),
break-glass records, admin access records, and the export requester's policy attributes.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_FACTS = {
    "policy_subject": ([sa.Column("patient_id", sa.String(64), nullable=False),
                        sa.Column("custodian", sa.String(160)), sa.Column("flags", sa.Integer, nullable=False),
                        sa.Column("data_lo", sa.BigInteger), sa.Column("data_hi", sa.BigInteger)],
                       [("patient_id",), ("resource_pk", "patient_id", "custodian", "flags")]),
    "policy_relationship": ([sa.Column("patient_id", sa.String(64), nullable=False),
                             sa.Column("actor", sa.String(160), nullable=False), sa.Column("until", sa.BigInteger)],
                            [("patient_id", "actor", "until")]),
    "policy_consent": ([sa.Column("patient_id", sa.String(64), nullable=False),
                        sa.Column("depth", sa.Integer, nullable=False), sa.Column("effect", sa.String(24), nullable=False),
                        sa.Column("explicit", sa.Boolean, nullable=False), sa.Column("groups", sa.Integer, nullable=False), sa.Column("lo", sa.BigInteger),
                        sa.Column("hi", sa.BigInteger), sa.Column("data_lo", sa.BigInteger),
                        sa.Column("data_hi", sa.BigInteger), sa.Column("undated", sa.Boolean, nullable=False)],
                       [("patient_id", "effect")]),
    "policy_consent_term": ([sa.Column("kind", sa.String(16), nullable=False), sa.Column("grp", sa.Integer, nullable=False),
                             sa.Column("system", sa.String(255)),
                             sa.Column("code", sa.String(255), nullable=False)],
                            [("resource_pk", "param", "kind", "code")]),
}


def upgrade() -> None:
    for name, (columns, lookups) in _FACTS.items():
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
    op.add_column("export_job", sa.Column("principal", sa.Text, nullable=True))
    op.create_table(
        "break_glass",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("requester", sa.String(512), nullable=False),
        sa.Column("fhir_user", sa.String(255)),
        sa.Column("organization", sa.String(255)),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("started", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_break_glass_requester", "break_glass", ["requester", "expires"])
    op.create_index("ix_break_glass_started", "break_glass", ["started"])
    op.create_table(
        "break_glass_access",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("grant_id", sa.String(36), sa.ForeignKey("break_glass.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("resources", sa.Text, nullable=False),
    )
    op.create_index("ix_break_glass_access_grant", "break_glass_access", ["grant_id", "seq"])
    op.create_table(
        "access_record",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("requester", sa.String(512), nullable=False),
        sa.Column("roles", sa.String(255), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("resources", sa.Text, nullable=False),
    )
    op.create_index("ix_access_record_at", "access_record", ["at"])
    op.create_index("ix_access_record_requester", "access_record", ["requester", "at"])


def downgrade() -> None:
    op.drop_table("access_record")
    op.drop_table("break_glass_access")
    op.drop_table("break_glass")
    op.drop_column("export_job", "principal")
    for name in _FACTS:
        op.drop_table(name)
