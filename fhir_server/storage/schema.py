"""Tables. Alembic migrations (storage/migrations) create them; this module is what the code queries.

- `resource`: one head row per logical resource (type, id) with its current version; search index
  tables hang off its integer `pk`.
- `resource_version`: one row per version, holding the canonical JSON (JSONB on PostgreSQL) with
  `meta.versionId`/`meta.lastUpdated` already in it, so a read serves the stored bytes as they are.
  `seq` orders every write in the server: history is paged by it (keyset, stable under writes).
- `search_*`: one table per search-parameter type, filled at write time in the same transaction.

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
    sa.Index("ix_resource_type_pk", "type", "pk"),  # keyset batches of one type in pk order (bulk export)
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

# Search index tables: one per parameter type, rows extracted at write time (search/index.py).
# Every row names its resource (pk), the resource type and the parameter code.
SortableText = sa.String(255).with_variant(sa.String(255, collation="C"), "postgresql")


def _index_table(name: str, *columns: sa.Column, lookups: tuple[tuple[str, ...], ...]) -> sa.Table:
    table = sa.Table(
        name, metadata,
        sa.Column("resource_pk", sa.BigInteger, sa.ForeignKey("resource.pk", ondelete="CASCADE"), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("param", sa.String(100), nullable=False),
        *columns,
    )
    for i, cols in enumerate(lookups):
        sa.Index(f"ix_{name}_lookup{i or ''}", *(table.c[c] for c in cols))
    sa.Index(f"ix_{name}_resource", table.c.resource_pk)
    return table


search_token = _index_table(
    "search_token",
    sa.Column("system", sa.String(255), nullable=True),
    sa.Column("code", sa.String(255), nullable=False),
    lookups=(("type", "param", "code", "system"),))
search_string = _index_table(
    "search_string",
    sa.Column("value", SortableText, nullable=False),  # normalised: case- and accent-free
    sa.Column("exact", sa.Text, nullable=False),
    lookups=(("type", "param", "value"),))
search_date = _index_table(
    "search_date",
    sa.Column("lo", sa.BigInteger, nullable=False),  # [lo, hi) microseconds
    sa.Column("hi", sa.BigInteger, nullable=False),
    # narrow: at most a day long, so a bound on hi is a bound on lo too (see search/params.py)
    sa.Column("narrow", sa.Boolean, nullable=False),
    lookups=(("type", "param", "narrow", "lo"),))
search_reference = _index_table(
    "search_reference",
    sa.Column("target_type", sa.String(64), nullable=True),
    sa.Column("target_id", sa.String(64), nullable=True),
    sa.Column("url", sa.String(512), nullable=True),  # absolute or canonical references
    lookups=(("type", "param", "target_id", "target_type"), ("target_type", "target_id"), ("url",)))
search_number = _index_table(
    "search_number",
    sa.Column("value", sa.Float, nullable=False),
    lookups=(("type", "param", "value"),))
search_quantity = _index_table(
    "search_quantity",
    sa.Column("system", sa.String(255), nullable=True),
    sa.Column("code", sa.String(255), nullable=True),
    sa.Column("value", sa.Float, nullable=False),
    lookups=(("type", "param", "code", "value"),))
search_uri = _index_table(
    "search_uri",
    sa.Column("uri", sa.String(512), nullable=False),
    lookups=(("type", "param", "uri"),))

# Policy facts (consent/facts.py): what the access policy needs of each resource, extracted at write
# time like search values, so the policy is a few index probes inside the search query.
# `policy_subject`: the patients whose record a resource is part of (its Patient compartment; a
# Patient is its own), with the resource's custodian organisation, its label flags and its clinical
# date range. `param` is the compartment parameter ("_self" for a Patient).
policy_subject = _index_table(
    "policy_subject",
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("custodian", sa.String(160), nullable=True),  # Organization/<id>
    sa.Column("flags", sa.Integer, nullable=False),  # consent/facts.py: SENSITIVE | RESTRICTED | HIDDEN
    sa.Column("data_lo", sa.BigInteger, nullable=True),  # [lo, hi) microseconds; NULL: no clinical date
    sa.Column("data_hi", sa.BigInteger, nullable=True),
    # the policy probes a row's subjects by resource: covering, so they never visit the table
    lookups=(("patient_id",), ("resource_pk", "patient_id", "custodian", "flags")))
# Care relationships a resource states (an active CareTeam's participants, an active Encounter's
# participants, a Patient's registered GP): `param` says which; `until` is when it lapses (NULL: open).
policy_relationship = _index_table(
    "policy_relationship",
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(160), nullable=False),  # Practitioner/<id>, PractitionerRole/<id>, Organization/<id>, ...
    sa.Column("until", sa.BigInteger, nullable=True),
    lookups=(("patient_id", "actor", "until"),))
# An active Consent's provisions, flattened: one row per provision (`param` its path: "0", "0.1",
# ...). `effect`: permit | deny, or secondary-opt-out (a National Data Opt-out / Type 1 dissent).
# A provision applies when each of its `groups` condition groups (its own and its ancestors' actor,
# class, label, purpose and data lists) has a matching term, within its periods.
policy_consent = _index_table(
    "policy_consent",
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("depth", sa.Integer, nullable=False),
    sa.Column("effect", sa.String(24), nullable=False),
    sa.Column("explicit", sa.Boolean, nullable=False),  # names actors or labels: the patient's own choice
    sa.Column("groups", sa.Integer, nullable=False),
    sa.Column("lo", sa.BigInteger, nullable=True),  # in force from (NULL: always)
    sa.Column("hi", sa.BigInteger, nullable=True),  # in force until (NULL: no end)
    sa.Column("data_lo", sa.BigInteger, nullable=True),  # dataPeriod, its own and its ancestors' intersected
    sa.Column("data_hi", sa.BigInteger, nullable=True),
    sa.Column("undated", sa.Boolean, nullable=False),  # applies to a resource with no clinical date
    lookups=(("patient_id", "effect"),))
# The values a flattened provision's condition groups name; `param` is the provision's path, `grp`
# the group. actor: (None, "Type/id"), class: (None, type), label: (system, code), purpose:
# (system, code), data: (None, "Type/id").
policy_consent_term = _index_table(
    "policy_consent_term",
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("grp", sa.Integer, nullable=False),
    sa.Column("system", sa.String(255), nullable=True),
    sa.Column("code", sa.String(255), nullable=False),
    lookups=(("resource_pk", "param", "kind", "code"),))

INDEX_TABLES: dict[str, sa.Table] = {
    "token": search_token, "string": search_string, "date": search_date, "reference": search_reference,
    "number": search_number, "quantity": search_quantity, "uri": search_uri,
    "policy_subject": policy_subject, "policy_relationship": policy_relationship,
    "policy_consent": policy_consent, "policy_consent_term": policy_consent_term,
}

# Key-value facts about the stored data itself, e.g. which version of index extraction built it.
server_state = sa.Table(
    "server_state", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Bulk Data export jobs (service/export.py): durable, so any server node can run, report or serve
# any job, and a job survives a restart. `type_index`/`after_pk` is the checkpoint: the next
# resource to export; `file_no`/`part` name the next chunk to write.
export_job = sa.Table(
    "export_job", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # queued | running | completed | failed
    sa.Column("level", sa.String(16), nullable=False),  # system | patient | group
    sa.Column("group_id", sa.String(64), nullable=True),
    sa.Column("types", sa.Text, nullable=False),  # comma-separated, in export order
    sa.Column("since", sa.BigInteger, nullable=True),
    sa.Column("request", sa.Text, nullable=False),  # the kick-off URL, for the manifest
    sa.Column("transaction_time", sa.BigInteger, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False),  # removed with its files after this
    sa.Column("owner", sa.String(64), nullable=True),  # the worker holding the lease
    sa.Column("lease_until", sa.BigInteger, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("type_index", sa.Integer, nullable=False),
    sa.Column("after_pk", sa.BigInteger, nullable=False),
    sa.Column("file_no", sa.Integer, nullable=False),
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("exported", sa.BigInteger, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    # Who kicked it off (`issuer|subject` of the token; None without authentication): only they
    # may poll, download or cancel it.
    sa.Column("requester", sa.String(512), nullable=True),
    # The requester's policy attributes (consent/policy.py), JSON: the worker exports what they may see.
    sa.Column("principal", sa.Text, nullable=True),
)

# The NDJSON output: each file is a run of chunks (~1 MB each), written and served one at a time.
export_chunk = sa.Table(
    "export_chunk", metadata,
    sa.Column("job_id", sa.String(36), sa.ForeignKey("export_job.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("file_no", sa.Integer, primary_key=True),
    sa.Column("part", sa.Integer, primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# A Group export's patients, taken from the Group's members at kick-off.
export_patient = sa.Table(
    "export_patient", metadata,
    sa.Column("job_id", sa.String(36), sa.ForeignKey("export_job.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("patient_id", sa.String(64), primary_key=True),
)

# Built-in authorization server (fhir_server/auth). Times here are whole seconds since the epoch,
# as in JWT `exp`/`iat`. Secrets and passwords are stored as scrypt hashes, codes as SHA-256.
auth_key = sa.Table(
    "auth_key", metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("alg", sa.String(16), nullable=False),
    sa.Column("private_jwk", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("retired_at", sa.BigInteger, nullable=True),  # NULL: the current signing key
)
auth_client = sa.Table(
    "auth_client", metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column("name", sa.Text, nullable=True),
    sa.Column("jwks", sa.Text, nullable=True),  # inline JWKS (public keys) for private_key_jwt
    sa.Column("jku", sa.Text, nullable=True),  # the one JWKS URL this client may name
    sa.Column("secret_hash", sa.Text, nullable=True),  # client_secret_basic when set
    sa.Column("scope", sa.Text, nullable=False),  # space-separated scopes it may be granted
    sa.Column("redirect_uris", sa.Text, nullable=False),  # space-separated, matched exactly
    sa.Column("roles", sa.Text, nullable=False),
    sa.Column("fhir_user", sa.String(255), nullable=True),
    sa.Column("organization", sa.String(255), nullable=True),
    sa.Column("purpose_of_use", sa.String(32), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
auth_user = sa.Table(
    "auth_user", metadata,
    sa.Column("username", sa.String(255), primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("roles", sa.Text, nullable=False),
    sa.Column("fhir_user", sa.String(255), nullable=True),
    sa.Column("organization", sa.String(255), nullable=True),
    sa.Column("patient", sa.String(64), nullable=True),  # a patient user's own Patient id
    sa.Column("purpose_of_use", sa.String(32), nullable=True),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
auth_code = sa.Table(
    "auth_code", metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("redirect_uri", sa.Text, nullable=False),
    sa.Column("username", sa.String(255), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("code_challenge", sa.String(128), nullable=False),
    sa.Column("nonce", sa.Text, nullable=True),
    sa.Column("patient", sa.String(64), nullable=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    # Set when the code is exchanged: a second use revokes the token it gave (RFC 6749 4.1.2).
    sa.Column("token_jti", sa.String(64), nullable=True),
    sa.Column("token_expires_at", sa.BigInteger, nullable=True),
    sa.Index("ix_auth_code_expires", "expires_at"),
)
auth_assertion_jti = sa.Table(
    "auth_assertion_jti", metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column("jti", sa.String(255), primary_key=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_auth_assertion_jti_expires", "expires_at"),
)
auth_revoked = sa.Table(
    "auth_revoked", metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_auth_revoked_expires", "expires_at"),
)

# Break-glass (consent/break_glass.py): a clinician's emergency access to one patient's record,
# with the reason they gave, and every request made under it. Kept for IG review.
break_glass = sa.Table(
    "break_glass", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("requester", sa.String(512), nullable=False),  # issuer|subject
    sa.Column("fhir_user", sa.String(255), nullable=True),
    sa.Column("organization", sa.String(255), nullable=True),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("started", sa.BigInteger, nullable=False),  # microseconds since the epoch
    sa.Column("expires", sa.BigInteger, nullable=False),
    sa.Index("ix_break_glass_requester", "requester", "expires"),
    sa.Index("ix_break_glass_started", "started"),
)
break_glass_access = sa.Table(
    "break_glass_access", metadata,
    sa.Column("seq", BigPK, primary_key=True, autoincrement=True),
    sa.Column("grant_id", sa.String(36), sa.ForeignKey("break_glass.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("resources", sa.Text, nullable=False),  # JSON list of "Type/id" read
    sa.Index("ix_break_glass_access_grant", "grant_id", "seq"),
)

# Privileged access (consent/access_log.py): every request by an `admin`, who sees everything, with
# what it returned; written in batches off the request path. The audit log will take these over.
access_record = sa.Table(
    "access_record", metadata,
    sa.Column("seq", BigPK, primary_key=True, autoincrement=True),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("requester", sa.String(512), nullable=False),
    sa.Column("roles", sa.String(255), nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("resources", sa.Text, nullable=False),  # JSON list of "Type/id" returned
    sa.Index("ix_access_record_at", "at"),
    sa.Index("ix_access_record_requester", "requester", "at"),
)
