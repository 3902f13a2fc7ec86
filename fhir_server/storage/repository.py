"""Storage primitives: the only code that reads or writes the resource tables.

The service layer composes these inside one transaction per interaction; nothing here knows FHIR
rules beyond "a version is a row".
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fhir_server.storage.engine import NO_TRANSACTION, WRITE, use_generic_plans
from fhir_server.storage.schema import INDEX_TABLES, resource, resource_version, server_state


@dataclass(frozen=True)
class Head:
    """The current state of a logical resource (no content)."""

    pk: int
    version_id: int
    last_updated: int
    deleted: bool


@dataclass(frozen=True)
class Version:
    """One stored version; `content` is the canonical JSON text, None for a delete."""

    type: str
    id: str
    version_id: int
    last_updated: int
    method: str
    content: str | None
    seq: int = 0

    @property
    def deleted(self) -> bool:
        return self.content is None


_CURRENT = (
    sa.select(resource_version.c.type, resource_version.c.id, resource_version.c.version_id,
              resource_version.c.last_updated, resource_version.c.method, resource_version.c.content,
              resource_version.c.seq)
    .select_from(resource.join(resource_version, sa.and_(resource_version.c.resource_pk == resource.c.pk,
                                                         resource_version.c.version_id == resource.c.version_id)))
)


def _joins_atomic(opener: Callable[..., Iterator[sa.Connection]]) -> Callable[..., AbstractContextManager[sa.Connection]]:
    """A connection opener (a generator, as for @contextmanager) that, inside an `atomic()` block,
    hands out the block's transaction instead of opening its own."""
    @functools.wraps(opener)
    @contextmanager
    def joined(store: Store, **kwargs: Any) -> Iterator[sa.Connection]:
        if (ambient := store._ambient.get()) is not None:
            yield ambient
        else:
            yield from opener(store, **kwargs)
    return joined


class Store:
    """Transactions and row-level primitives over one engine."""

    # SQLite statistics go stale as data grows; refresh them after this many written resources.
    STATISTICS_EVERY = 20_000

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._written = 0
        # SQLite has one writer at a time; threads of this process queue here, where they are woken
        # as soon as the lock is free, instead of in SQLite's busy handler, which polls with sleeps
        # of up to 100 ms (measured: p99 create latency 1.5 s at 16 concurrent clients).
        self._sqlite_writer = threading.Lock() if not self.is_postgres else None
        # The transaction of an `atomic()` block in this thread/task, if any.
        self._ambient: ContextVar[sa.Connection | None] = ContextVar(f"carebroker-atomic-{id(self)}",
                                                                    default=None)

    @property
    def in_atomic(self) -> bool:
        return self._ambient.get() is not None

    @contextmanager
    def atomic(self) -> Iterator[sa.Connection]:
        """One write transaction for everything done inside the block (a transaction Bundle):
        reading(), single_read() and writing() inside it use this transaction, so each step sees
        the steps before it and all commit or roll back together."""
        with self.writing() as conn:
            token = self._ambient.set(conn)
            try:
                yield conn
            finally:
                self._ambient.reset(token)

    @_joins_atomic
    def reading(self, generic_plans: bool = False) -> Iterator[sa.Connection]:
        """A read transaction: one consistent snapshot for everything read inside it.
        `generic_plans`: PostgreSQL plans each prepared statement once (a generic plan) instead of
        at every execution: for statements that take longer to plan than to run, as an access
        policy's conditions do (about 5 ms to plan, against 0.3 ms without them, at 100k patients).
        Inside an `atomic()` block the block's transaction keeps its plans. SQLite keeps its
        prepared statements anyway."""
        with self._connect(generic_plans) as conn:
            with conn.begin():
                yield conn

    @_joins_atomic
    def single_read(self) -> Iterator[sa.Connection]:
        """For one SELECT: no BEGIN/COMMIT round trips (a single statement is consistent on its own)."""
        options = {"isolation_level": "AUTOCOMMIT"} if self.is_postgres else {NO_TRANSACTION: True}
        with self._connect(**options) as conn:
            yield conn

    @_joins_atomic
    def writing(self) -> Iterator[sa.Connection]:
        """A write transaction, committed (durably) when the block ends without error."""
        with self._sqlite_writer or nullcontext():
            with self._connect(**{WRITE: True}) as conn:
                with conn.begin():
                    yield conn

    @contextmanager
    def _connect(self, generic_plans: bool = False, **options: Any) -> Iterator[sa.Connection]:
        """A pooled connection with these execution options, planning as `generic_plans` says."""
        with self.engine.connect().execution_options(**options) as conn:
            if self.is_postgres:
                use_generic_plans(conn, generic_plans)
            yield conn

    # -- reads ----------------------------------------------------------------------------------

    def current(self, conn: sa.Connection, rtype: str, rid: str) -> Version | None:
        row = conn.execute(_CURRENT.where(resource.c.type == rtype, resource.c.id == rid)).first()
        return Version(*row) if row else None

    def version(self, conn: sa.Connection, rtype: str, rid: str, version_id: int) -> Version | None:
        row = conn.execute(
            sa.select(resource_version.c.type, resource_version.c.id, resource_version.c.version_id,
                      resource_version.c.last_updated, resource_version.c.method, resource_version.c.content,
                      resource_version.c.seq)
            .where(resource_version.c.type == rtype, resource_version.c.id == rid,
                   resource_version.c.version_id == version_id)
        ).first()
        return Version(*row) if row else None

    def current_by_pks(self, conn: sa.Connection, pks: Sequence[int]) -> list[Version]:
        """Current versions of the given resources, in the order of `pks`."""
        if not pks:
            return []
        rows = conn.execute(_CURRENT.add_columns(resource.c.pk).where(resource.c.pk.in_(pks))).all()
        by_pk = {r[-1]: Version(*r[:-1]) for r in rows}
        return [by_pk[pk] for pk in pks if pk in by_pk]

    def head(self, conn: sa.Connection, rtype: str, rid: str, lock: bool = False) -> Head | None:
        """The head row; `lock` holds it (PostgreSQL row lock) until the transaction ends."""
        q = sa.select(resource.c.pk, resource.c.version_id, resource.c.last_updated, resource.c.deleted).where(
            resource.c.type == rtype, resource.c.id == rid)
        if lock and self.is_postgres:
            q = q.with_for_update()
        row = conn.execute(q).first()
        return Head(*row) if row else None

    def history(self, conn: sa.Connection, rtype: str | None, rid: str | None, since: int | None,
                before_seq: int | None, after_seq: int | None, limit: int,
                *within: sa.Select[Any]) -> list[Version]:
        """Versions newest first; keyset-paged by `seq` so pages stay stable while others write.
        `after_seq` pages backwards (towards newer versions). `within`: queries of resource pks the
        versions must belong to (a caller's access policy)."""
        c = resource_version.c
        q = sa.select(c.type, c.id, c.version_id, c.last_updated, c.method, c.content, c.seq)
        for pks in within:
            q = q.where(c.resource_pk.in_(pks))
        if rtype is not None:
            q = q.where(c.type == rtype)
        if rid is not None:
            q = q.where(c.id == rid)
        if since is not None:
            q = q.where(c.last_updated >= since)
        if before_seq is not None:
            q = q.where(c.seq < before_seq)
        if after_seq is not None:
            rows = conn.execute(q.where(c.seq > after_seq).order_by(c.seq.asc()).limit(limit)).all()
            return [Version(*r) for r in reversed(rows)]
        return [Version(*r) for r in conn.execute(q.order_by(c.seq.desc()).limit(limit)).all()]

    def count_history(self, conn: sa.Connection, rtype: str, rid: str, since: int | None) -> int:
        c = resource_version.c
        q = sa.select(sa.func.count()).where(c.type == rtype, c.id == rid)
        if since is not None:
            q = q.where(c.last_updated >= since)
        return int(conn.execute(q).scalar_one())

    # -- writes ---------------------------------------------------------------------------------

    def write(self, conn: sa.Connection, head: Head | None, rtype: str, rid: str, version_id: int,
              last_updated: int, method: str, content: str | None,
              index: Mapping[str, Iterable[tuple[Any, ...]]] | None = None) -> Version:
        """Write version `version_id` of (rtype, rid) and move the head to it.

        The head moves only if it is still at the version the caller read (compare-and-set), so a
        concurrent writer can never be silently overwritten; `StaleHead` tells the caller to retry.
        """
        head_row = {"version_id": version_id, "last_updated": last_updated, "deleted": content is None}
        if head is None:
            pk = conn.execute(_INSERT_HEAD, {"type": rtype, "id": rid, **head_row}).scalar_one()
        else:
            pk = head.pk
            moved = conn.execute(_MOVE_HEAD, {"pk_": pk, "from_version": head.version_id, **head_row}).rowcount
            if moved != 1:
                raise StaleHead(rtype, rid)
            for statement in _DELETE_INDEX:
                conn.execute(statement, {"pk_": pk})
        seq = conn.execute(_INSERT_VERSION, {"resource_pk": pk, "type": rtype, "id": rid, "version_id": version_id,
                                             "last_updated": last_updated, "method": method,
                                             "content": content}).scalar_one()
        self.insert_index(conn, pk, rtype, index or {})
        return Version(rtype, rid, version_id, last_updated, method, content, seq)

    def replace_index(self, conn: sa.Connection, rows: Mapping[int, tuple[str, Mapping[str, Iterable[tuple[Any, ...]]]]]) -> None:
        """Rebuild the index rows of the given resources: pk -> (type, rows)."""
        for table in INDEX_TABLES.values():
            conn.execute(table.delete().where(table.c.resource_pk.in_(list(rows))))
        for pk, (rtype, index) in rows.items():
            self.insert_index(conn, pk, rtype, index)

    def live_batches(self, batch: int) -> Iterator[list[tuple[int, str]]]:
        """(pk, content) of every live resource, in batches, each read in its own short transaction."""
        last = 0
        while True:
            with self.reading() as conn:
                rows = conn.execute(_CURRENT.with_only_columns(resource.c.pk, resource_version.c.content)
                                    .where(resource.c.pk > last, resource.c.deleted.is_(False))
                                    .order_by(resource.c.pk).limit(batch)).all()
            if not rows:
                return
            last = rows[-1][0]
            yield [(int(pk), content) for pk, content in rows]

    def note_written(self, count: int) -> None:
        """Count written resources; refresh SQLite's statistics every STATISTICS_EVERY of them."""
        before, self._written = self._written, self._written + count
        if before // self.STATISTICS_EVERY != self._written // self.STATISTICS_EVERY:
            self.refresh_statistics()

    def refresh_statistics(self) -> None:
        """SQLite plans joins well only with table statistics (a _has search went from 20 ms to
        under 1 ms at 10k patients); a sampled ANALYZE takes well under a second even on GBs.
        PostgreSQL's autovacuum keeps its own statistics."""
        if not self.is_postgres:
            with self.engine.connect().execution_options(**{NO_TRANSACTION: True}) as conn:
                conn.exec_driver_sql("PRAGMA analysis_limit=1000")
                conn.exec_driver_sql("ANALYZE")

    def state(self, conn: sa.Connection, key: str) -> str | None:
        return conn.execute(sa.select(server_state.c.value).where(server_state.c.key == key)).scalar()

    def set_state(self, conn: sa.Connection, key: str, value: str) -> None:
        conn.execute(server_state.delete().where(server_state.c.key == key))
        conn.execute(server_state.insert().values(key=key, value=value))

    def existing_ids(self, conn: sa.Connection, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        by_type: dict[str, list[str]] = {}
        for rtype, rid in keys:
            by_type.setdefault(rtype, []).append(rid)
        for rtype, ids in by_type.items():
            rows = conn.execute(sa.select(resource.c.id).where(resource.c.type == rtype, resource.c.id.in_(ids)))
            found.update((rtype, rid) for rid in rows.scalars())
        return found

    def insert_many(self, conn: sa.Connection,
                    items: Sequence[tuple[str, str, str, Mapping[str, Iterable[tuple[Any, ...]]]]], stamp: int) -> None:
        """Insert version 1 of many new resources, (type, id, content, index rows) each, in few statements."""
        if not items:
            return
        pks = conn.execute(
            resource.insert().returning(resource.c.pk, sort_by_parameter_order=True),
            [{"type": t, "id": i, "version_id": 1, "last_updated": stamp, "deleted": False} for t, i, _, _ in items],
        ).scalars().all()
        conn.execute(resource_version.insert(), [
            {"resource_pk": pk, "type": t, "id": i, "version_id": 1, "last_updated": stamp, "method": "PUT",
             "content": c} for pk, (t, i, c, _) in zip(pks, items)])
        batches: dict[str, list[dict[str, Any]]] = {}
        for pk, (t, _, _, index) in zip(pks, items):
            for kind, rows in index.items():
                columns = _INDEX_COLUMNS[kind]
                batches.setdefault(kind, []).extend(
                    {"resource_pk": pk, "type": t, **dict(zip(columns, row))} for row in rows)
        for kind, batch in batches.items():
            if batch:  # a kind can come with no rows (a Consent with no condition terms)
                conn.execute(INDEX_TABLES[kind].insert(), batch)

    @staticmethod
    def insert_index(conn: sa.Connection, pk: int, rtype: str, index: Mapping[str, Iterable[tuple[Any, ...]]]) -> None:
        """Insert search index rows: per parameter type, tuples in the table's column order."""
        for kind, rows in index.items():
            columns = _INDEX_COLUMNS[kind]
            batch = [{"resource_pk": pk, "type": rtype, **dict(zip(columns, row))} for row in rows]
            if batch:
                conn.execute(INDEX_TABLES[kind].insert(), batch)

    def lock_key(self, conn: sa.Connection, key: str) -> None:
        """Serialise writers that would decide on the same search (conditional create) on PostgreSQL;
        SQLite write transactions are already serial (BEGIN IMMEDIATE)."""
        if self.is_postgres:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})


# The write path's statements, built once: SQLAlchemy then reuses their compiled form (building
# `insert().values(...)` per call cost about a tenth of a create).
_INSERT_HEAD = resource.insert().returning(resource.c.pk)
_MOVE_HEAD = (resource.update()
              .where(resource.c.pk == sa.bindparam("pk_"), resource.c.version_id == sa.bindparam("from_version")))
_DELETE_INDEX = [table.delete().where(table.c.resource_pk == sa.bindparam("pk_")) for table in INDEX_TABLES.values()]
_INSERT_VERSION = resource_version.insert().returning(resource_version.c.seq)

_INDEX_COLUMNS = {kind: [c.name for c in table.columns if c.name not in ("resource_pk", "type")]
                  for kind, table in INDEX_TABLES.items()}


class StaleHead(Exception):
    """Another transaction moved the resource on between our read and our write."""

    def __init__(self, rtype: str, rid: str) -> None:
        super().__init__(f"{rtype}/{rid} changed concurrently")


def select_live_pks(rtype: str) -> sa.Select[Any]:
    """Base query for searches: live (not deleted) resources of a type."""
    return sa.select(resource.c.pk).where(resource.c.type == rtype, resource.c.deleted.is_(False))
