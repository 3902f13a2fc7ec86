"""Tables. Alembic migrations (storage/migrations) create them; this module is what the code queries.

- `resource`: one head row per logical resource (type, id) with its current version; search index
  tables hang off its integer `pk`.
- `resource_version`: one row per version, holding the canonical JSON (JSONB on PostgreSQL) with
  `meta.versionId`/`meta.lastUpdated` already in it, so a read serves the stored bytes as they are.
  `seq` orders every write in the server: history is paged by it (keyset, stable under writes).
- `search_token`: token values extracted at write time (for now `identifier`, which conditional
  create/update/delete rely on); the search engine adds its own parameter tables beside it.

Times are integer microseconds since the Unix epoch, UTC: exact, portable and cheap to compare.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeDecorator, UserDefinedType

metadata = sa.MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits.
BigPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class _JsonbText(UserDefinedType):
    """PostgreSQL JSONB column that takes text in and text out: the server never parses it to serve it."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "JSONB"

    def bind_expression(self, bindvalue):  # type: ignore[no-untyped-def]
        return sa.cast(sa.cast(bindvalue, sa.Text), postgresql.JSONB)

    def column_expression(self, colexpr):  # type: ignore[no-untyped-def]
        return sa.cast(colexpr, sa.Text)


class JsonText(TypeDecorator):
    """Canonical JSON as `str`: TEXT on SQLite, JSONB on PostgreSQL (queryable, and cast back to text on read)."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(_JsonbText())
        return dialect.type_descriptor(sa.Text())


resource = sa.Table(
    "resource", metadata,
    sa.Column("pk", BigPK, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("last_updated", sa.BigInteger, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.UniqueConstraint("type", "id", name="uq_resource_type_id"),
    sa.Index("ix_resource_type_last_updated", "type", "last_updated"),
)

resource_version = sa.Table(
    "resource_version", metadata,
    sa.Column("seq", BigPK, primary_key=True, autoincrement=True),
    sa.Column("resource_pk", sa.BigInteger, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("last_updated", sa.BigInteger, nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("content", JsonText, nullable=True),  # NULL for a delete (tombstone)
    sa.UniqueConstraint("resource_pk", "version_id", name="uq_resource_version"),
    sa.Index("ix_resource_version_type_seq", "type", "seq"),
)

search_token = sa.Table(
    "search_token", metadata,
    sa.Column("resource_pk", sa.BigInteger, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("param", sa.String(64), nullable=False),
    sa.Column("system", sa.String(255), nullable=True),
    sa.Column("code", sa.String(255), nullable=False),
    sa.Index("ix_search_token_lookup", "type", "param", "code", "system"),
    sa.Index("ix_search_token_resource", "resource_pk"),
)
