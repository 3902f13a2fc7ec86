"""Database engines: SQLite (embedded default) and PostgreSQL (production), set up the same way.

SQLite runs in WAL mode so readers never wait for the writer; write transactions start with
`BEGIN IMMEDIATE`, which takes the write lock up front: two writers can never both read version n
and both write n+1, and never dead-lock upgrading a read lock. Each connection keeps a page cache
of CAREBROKER_SQLITE_CACHE_MB (default 64; SQLite's own default is 2 MB): a search probes index
pages all over a large file, and at 100k patients the 2 MB cache made searches about three times
slower (bench/README.md). It fills only as pages are read.
"""
from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event

MIGRATIONS = Path(__file__).with_name("migrations")
WRITE = "carebroker_write"  # execution option marking a connection that will write
NO_TRANSACTION = "carebroker_no_transaction"  # SQLite: one statement, no BEGIN/COMMIT
SQLITE_CACHE_ENV = "CAREBROKER_SQLITE_CACHE_MB"
PSYCOPG_CACHED_STATEMENT_BYTES = 64 * 1024
GENERIC_PLANS = "carebroker_generic_plans"  # a pooled PostgreSQL connection's info: its plan_cache_mode


def create_engine(url: str, **kwargs: object) -> sa.Engine:
    """An engine with the per-dialect settings carebroker relies on."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                  pool_size=8, max_overflow=16, **kwargs)
        _configure_sqlite(engine)
        return engine
    engine = sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, **kwargs)
    _configure_postgresql(engine)
    return engine


def _configure_postgresql(engine: sa.Engine) -> None:
    _cache_long_statements()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # No JIT compilation: it pays off for long analytical queries, not for a FHIR server's
        # short ones. PostgreSQL compiles whenever a plan's estimated cost passes jit_above_cost,
        # and estimates of plans made without the parameters' values often do: a search that runs
        # in 7 ms took 110 ms (bench/README.md).
        dbapi_conn.execute("SET jit = off")
        dbapi_conn.commit()


def _cache_long_statements() -> None:
    """psycopg rewrites a statement's `%(name)s` placeholders at every execution unless its text is
    at most 4 KB (its cache of rewrites skips longer ones, meant for generated multi-row INSERTs,
    which its limit of 50 parameters still keeps out). A search under an access policy is 5 KB or
    more, the same text each time: the rewrite cost 0.25 ms per search (bench/README.md)."""
    from psycopg import _queries

    _queries.MAX_CACHED_STATEMENT_LENGTH = max(_queries.MAX_CACHED_STATEMENT_LENGTH, PSYCOPG_CACHED_STATEMENT_BYTES)


def use_generic_plans(conn: sa.Connection, generic: bool) -> None:
    """PostgreSQL: whether `conn`'s session plans prepared statements once (generic plans) or
    for each execution's values (the default). Set for the session, outside any transaction (no
    rollback undoes it), and only when it changes: a `SET LOCAL` in every transaction cost a round
    trip, about 10% of a short search's time under load (bench/README.md)."""
    record = conn.connection
    if record.info.get(GENERIC_PLANS, False) == generic:
        return
    dbapi_conn = record.dbapi_connection
    assert dbapi_conn is not None
    before = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    try:
        dbapi_conn.execute(f"SET plan_cache_mode = {'force_generic_plan' if generic else 'auto'}")
    finally:
        dbapi_conn.autocommit = before
    record.info[GENERIC_PLANS] = generic  # forgotten with the connection if the pool replaces it


def _configure_sqlite(engine: sa.Engine) -> None:
    cache_kib = int(float(os.environ.get(SQLITE_CACHE_ENV) or 64) * 1024)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the client hears "201 Created".
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute(f"PRAGMA cache_size=-{cache_kib}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        options = conn.get_execution_options()
        if not options.get(NO_TRANSACTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (default: the newest); an upgrade keeps the data."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
