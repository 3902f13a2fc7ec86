"""The `carebroker` command: demo start, migrations; and that a schema upgrade keeps data."""
from __future__ import annotations

import random
import subprocess
import sys

import httpx
import sqlalchemy as sa

from fhir_server.demo import demo_resources
from fhir_server.storage.engine import create_engine


def fresh_url(backends, backend: str, tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'demo.db'}" if backend == "sqlite" else backends.pg_schema_url()


def test_serve_demo_loads_the_population_idempotently(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = fresh_url(backends, backend, tmp_path)
    base = backends.start_server(url, "--demo")
    expected = demo_resources()
    for res in random.Random(7).sample(expected, 60):
        got = httpx.get(f"{base}/{res['resourceType']}/{res['id']}")
        assert got.status_code == 200, (res["resourceType"], res["id"])
        assert {k: v for k, v in got.json().items() if k != "meta"} == {k: v for k, v in res.items() if k != "meta"}
    patients = [r for r in expected if r["resourceType"] == "Patient"]
    assert len(patients) >= 45
    # a second --demo start (same database) changes nothing: no new versions
    base2 = backends.start_server(url, "--demo")
    history = httpx.get(f"{base2}/_history", params={"_count": 1000}).json()
    assert {e["resource"]["meta"]["versionId"] for e in history["entry"]} == {"1"}
    assert len(history["entry"]) == min(len(expected), 1000)


def test_migrate_command_is_idempotent_and_keeps_data(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = fresh_url(backends, backend, tmp_path)
    cli = [sys.executable, "-m", "fhir_server.cli", "migrate", "--database", url]
    subprocess.run(cli, check=True, capture_output=True)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO resource (type, id, version_id, last_updated, deleted) "
                             "VALUES ('Patient', 'kept', 1, 0, false)")
    subprocess.run(cli, check=True, capture_output=True)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM resource")).scalars().all() == ["kept"]
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0001"
    engine.dispose()
