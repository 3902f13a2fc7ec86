"""Built-in authorization server: signing keys, clients, users, authorization codes, used client
assertion jtis and revoked token jtis.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_key",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("private_jwk", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("retired_at", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "auth_client",
        sa.Column("client_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.Text, nullable=True),
        sa.Column("jwks", sa.Text, nullable=True),
        sa.Column("jku", sa.Text, nullable=True),
        sa.Column("secret_hash", sa.Text, nullable=True),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("redirect_uris", sa.Text, nullable=False),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("fhir_user", sa.String(255), nullable=True),
        sa.Column("organization", sa.String(255), nullable=True),
        sa.Column("purpose_of_use", sa.String(32), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_user",
        sa.Column("username", sa.String(255), primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("fhir_user", sa.String(255), nullable=True),
        sa.Column("organization", sa.String(255), nullable=True),
        sa.Column("patient", sa.String(64), nullable=True),
        sa.Column("purpose_of_use", sa.String(32), nullable=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_code",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("nonce", sa.Text, nullable=True),
        sa.Column("patient", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("token_jti", sa.String(64), nullable=True),
        sa.Column("token_expires_at", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_auth_code_expires", "auth_code", ["expires_at"])
    op.create_table(
        "auth_assertion_jti",
        sa.Column("client_id", sa.String(255), primary_key=True),
        sa.Column("jti", sa.String(255), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_auth_assertion_jti_expires", "auth_assertion_jti", ["expires_at"])
    op.create_table(
        "auth_revoked",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_auth_revoked_expires", "auth_revoked", ["expires_at"])


def downgrade() -> None:
    op.drop_table("auth_revoked")
    op.drop_table("auth_assertion_jti")
    op.drop_table("auth_code")
    op.drop_table("auth_user")
    op.drop_table("auth_client")
    op.drop_table("auth_key")
