"""The `carebroker` command: demo start, migrations; and that a schema upgrade keeps data."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import httpx
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from fhir_server.demo import demo_resources
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import alembic_config, create_engine, migrate
from fhir_server.storage.repository import Store

from conftest import AUTH


def fresh_url(backends, backend: str, tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'demo.db'}" if backend == "sqlite" else backends.pg_schema_url()


def test_serve_demo_loads_the_population_idempotently(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = fresh_url(backends, backend, tmp_path)
    base = backends.start_server(url, "--demo")
    expected = demo_resources()
    for res in random.Random(7).sample(expected, 60):
        got = httpx.get(f"{base}/{res['resourceType']}/{res['id']}", headers=AUTH)
        assert got.status_code == 200, (res["resourceType"], res["id"])
        assert {k: v for k, v in got.json().items() if k != "meta"} == {k: v for k, v in res.items() if k != "meta"}
    patients = [r for r in expected if r["resourceType"] == "Patient"]
    assert len(patients) >= 45
    # a second --demo start (same database) changes nothing: no new versions
    base2 = backends.start_server(url, "--demo")
    history = httpx.get(f"{base2}/_history", params={"_count": 1000}, headers=AUTH).json()
    assert {e["resource"]["meta"]["versionId"] for e in history["entry"]} == {"1"}
    assert len(history["entry"]) == min(len(expected), 1000)


def test_upgrade_from_first_schema_keeps_data_and_indexes_it(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A database made by revision 0001 (before search) is upgraded by `carebroker migrate`: its
    resources survive and become searchable; running migrate again changes nothing."""
    url = fresh_url(backends, backend, tmp_path)
    engine = create_engine(url)
    migrate(engine, "0001")
    store = Store(engine)
    body = {"resourceType": "Patient", "id": "kept", "meta": {"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"},
            "name": [{"family": "Ó Súilleabháin"}]}
    with store.writing() as conn:
        store.write(conn, None, "Patient", "kept", 1, 0, "PUT", json.dumps(body))
    cli = [sys.executable, "-m", "fhir_server.cli", "migrate", "--database", url]
    subprocess.run(cli, check=True, capture_output=True)
    subprocess.run(cli, check=True, capture_output=True)
    with engine.connect() as conn:
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == head
    page, matches, _, _ = FhirService(store).search(
        ("Patient",), [("family", "o suilleabhain")], strict=True, base_url="", count=10, cursor=None,
        want_total=True)
    assert [m.id for m in matches] == ["kept"] and page.total == 1
    engine.dispose()


def test_sqlite_connections_keep_a_large_page_cache(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """SQLite's 2 MB default made searches of a large database about three times slower."""
    def cache_kib() -> int:
        engine = create_engine(f"sqlite:///{tmp_path / 'cache.db'}")
        try:
            with engine.connect() as conn:
                return -int(conn.exec_driver_sql("PRAGMA cache_size").scalar_one())
        finally:
            engine.dispose()

    monkeypatch.delenv("CAREBROKER_SQLITE_CACHE_MB", raising=False)
    assert cache_kib() == 64 * 1024
    monkeypatch.setenv("CAREBROKER_SQLITE_CACHE_MB", "8")
    assert cache_kib() == 8 * 1024


def test_postgresql_plans_policy_statements_once(backends) -> None:  # type: ignore[no-untyped-def]
    """reading(generic_plans=True): generic plans on that connection while it serves such reads;
    every other use of it (plain reads, single reads, writes) gets the default back, whatever
    happened to the transaction before."""
    engine = create_engine(backends.fresh_url("postgresql"))  # used by one thread: one pooled connection
    store = Store(engine)

    def mode(conn: sa.Connection) -> str:
        return conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one()

    try:
        with store.reading() as conn:
            assert mode(conn) == "auto"
        with store.reading(generic_plans=True) as conn:
            assert mode(conn) == "force_generic_plan"
        with pytest.raises(sa.exc.DataError), store.reading(generic_plans=True) as conn:
            conn.exec_driver_sql("SELECT 1 / 0")  # rolled back: the session's setting stays
        with store.reading(generic_plans=True) as conn:
            assert mode(conn) == "force_generic_plan"
        for opener in (store.single_read, store.writing, store.reading):
            with opener() as conn:
                assert mode(conn) == "auto", opener
            with store.reading(generic_plans=True) as conn:
                assert mode(conn) == "force_generic_plan"
        with store.atomic(), store.reading(generic_plans=True) as conn:
            assert mode(conn) == "auto"  # a transaction Bundle's reads join its write transaction
    finally:
        engine.dispose()


def test_postgresql_long_statements_are_converted_once(backends) -> None:  # type: ignore[no-untyped-def]
    """psycopg rewrites the placeholders of a statement over 4 KB at every execution unless told
    otherwise; a search under an access policy is longer than that."""
    from psycopg import _queries

    engine = create_engine(backends.fresh_url("postgresql"))
    long_sql = "SELECT %(a)s::text WHERE " + " AND ".join(["1 = 1"] * 1000)  # about 8 KB
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(long_sql, {"a": "x"}).all()
            hits = _queries._query2pg.cache_info().hits
            assert conn.exec_driver_sql(long_sql, {"a": "y"}).scalar_one() == "y"
            assert _queries._query2pg.cache_info().hits == hits + 1
    finally:
        engine.dispose()


def test_postgresql_connections_do_not_jit(backends) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(backends.fresh_url("postgresql"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW jit").scalar_one() == "off"
    finally:
        engine.dispose()
