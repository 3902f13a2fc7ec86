"""Break-glass grants and their access records (consent/break_glass.py), and `carebroker policy
break-glass` reading them back, on both databases."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consent.break_glass import BreakGlassLog
from fhir_server.storage.engine import create_engine, migrate
from fhir_server.storage.repository import Store

from conftest import Backends

T0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z, in microseconds
HOUR = 3_600_000_000
DR_A = "https://issuer.carebroker.test|dr-a"
DR_B = "https://issuer.carebroker.test|dr-b"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(backends: Backends, backend: str) -> Iterator[tuple[str, BreakGlassLog]]:
    """A fresh database (grants are counted) and a log over it."""
    url = backends.fresh_url(backend)
    engine = create_engine(url)
    migrate(engine)
    yield url, BreakGlassLog(Store(engine), ttl=3600)
    engine.dispose()


def test_open_reuses_an_unexpired_grant_and_opens_anew_after_expiry(db: tuple[str, BreakGlassLog]) -> None:
    _, log = db
    first = log.open(DR_A, "Practitioner/pa", "Organization/o1", "p1", "  unconscious in A&E  ", now=T0)
    assert (first.reason, first.started, first.expires) == ("unconscious in A&E", T0, T0 + HOUR)
    again = log.open(DR_A, "Practitioner/pa", "Organization/o1", "p1", "still unconscious", now=T0 + HOUR - 1)
    assert again == first  # not stacked, not extended
    later = log.open(DR_A, "Practitioner/pa", "Organization/o1", "p1", "readmitted", now=T0 + HOUR)
    assert later.id != first.id and later.reason == "readmitted" and later.expires == T0 + 2 * HOUR
    assert log.open(DR_B, None, None, "p1", "covering", now=T0).id != first.id  # another clinician: their own
    assert len(log.list()) == 3


def test_reason_is_required_and_capped(db: tuple[str, BreakGlassLog]) -> None:
    _, log = db
    for blank in ("", "   \t "):
        with pytest.raises(ValueError):
            log.open(DR_A, None, None, "p1", blank, now=T0)
    assert log.list() == []
    assert log.open(DR_A, None, None, "p1", " " + "x" * 2000, now=T0).reason == "x" * 1000


def test_ttl_from_the_environment(db: tuple[str, BreakGlassLog], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBROKER_BREAK_GLASS_TTL", "60")
    log = BreakGlassLog(db[1].store)
    assert log.open(DR_A, None, None, "p1", "why", now=T0).expires == T0 + 60_000_000
    assert log.open(DR_A, None, None, "p2", "why", ttl=5, now=T0).expires == T0 + 5_000_000


def test_active_is_the_requesters_unexpired_grants(db: tuple[str, BreakGlassLog]) -> None:
    _, log = db
    g1 = log.open(DR_A, None, None, "p1", "why", now=T0)
    g2 = log.open(DR_A, None, None, "p2", "why", now=T0 + HOUR // 2)
    g3 = log.open(DR_B, None, None, "p3", "why", now=T0)
    assert log.active(DR_A, now=T0 + 1) == {"p1": g1.id, "p2": g2.id}
    assert log.active(DR_A, now=T0 + HOUR) == {"p2": g2.id}
    assert log.active(DR_A, now=T0 + 2 * HOUR) == {}
    assert log.active(DR_B, now=T0 + 1) == {"p3": g3.id}
    assert log.active("https://issuer.carebroker.test|dr-c", now=T0) == {}


def test_record_and_list(db: tuple[str, BreakGlassLog]) -> None:
    _, log = db
    g1 = log.open(DR_A, "Practitioner/pa", "Organization/o1", "p1", "why", now=T0)
    g2 = log.open(DR_A, "Practitioner/pa", "Organization/o1", "p2", "why", now=T0 + 10)
    g3 = log.open(DR_B, "Practitioner/pb", None, "p1", "covering", now=T0 + HOUR * 24)
    log.record([g1.id], "GET", "http://x/fhir/Patient/p1", 200, ["Patient/p1"])
    log.record([g1.id, g2.id, g1.id], "GET", "http://x/fhir/Observation?patient=p1,p2", 200,
               ["Observation/o2", "Observation/o1", "Observation/o2", "Patient/p2"])
    log.record([g1.id], "GET", "http://x/fhir/Patient/p1/Condition", 403, [])
    log.record([], "GET", "http://x/fhir/ignored", 200, ["Patient/p1"])

    listed = log.list()
    assert [g for g, _ in listed] == [g3, g2, g1]  # newest first
    accesses = {g.id: a for g, a in listed}
    assert [(a["url"], a["status"], a["resources"]) for a in accesses[g1.id]] == [
        ("http://x/fhir/Patient/p1", 200, ["Patient/p1"]),
        ("http://x/fhir/Observation?patient=p1,p2", 200, ["Observation/o2", "Observation/o1", "Patient/p2"]),
        ("http://x/fhir/Patient/p1/Condition", 403, [])]
    assert [a["url"] for a in accesses[g2.id]] == ["http://x/fhir/Observation?patient=p1,p2"]
    assert accesses[g3.id] == []
    assert all(a["method"] == "GET" and isinstance(a["at"], int) for a in accesses[g1.id])

    assert [g.id for g, _ in log.list(patient_id="p1")] == [g3.id, g1.id]
    assert [g.id for g, _ in log.list(requester="dr-a")] == [g2.id, g1.id]
    assert [g.id for g, _ in log.list(requester=DR_B)] == [g3.id]
    assert log.list(requester="dr-%") == []  # a substring, not a pattern
    assert [g.id for g, _ in log.list(since=T0 + 10)] == [g3.id, g2.id]
    assert [g.id for g, _ in log.list(patient_id="p1", since=T0 + 1, requester="dr-b")] == [g3.id]
    assert [len(a) for _, a in log.list(patient_id="p2")] == [1]


def _policy_cli(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhir_server.cli", "policy", "break-glass", "--database", url,
                           *extra], check=False, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_cli_lists_grants_for_review(db: tuple[str, BreakGlassLog]) -> None:
    url, log = db
    g1 = log.open(DR_A, "Practitioner/pa", "Organization/o1", "p1", "collapsed in clinic, no GP record", now=T0)
    g2 = log.open(DR_B, None, None, "p2", "overdose, unresponsive", now=T0 + HOUR)
    reads = [f"Observation/o{i}" for i in range(7)]
    log.record([g1.id], "GET", "http://x/fhir/Patient/p1/$everything", 200, ["Patient/p1", *reads])
    log.record([g2.id], "GET", "http://x/fhir/MedicationStatement?patient=p2", 200, [])

    text = _policy_cli(url)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert out.index(g2.id) < out.index(g1.id)  # newest first
    for shown in ("collapsed in clinic, no GP record", "overdose, unresponsive", "Patient/p1", "Patient/p2",
                  DR_A, "Practitioner/pa", "Organization/o1", "2023-11-14T22:13:20.000+00:00",
                  "2023-11-14T23:13:20.000+00:00",
                  "GET http://x/fhir/Patient/p1/$everything  200  8 resources: Patient/p1, Observation/o0",
                  "http://x/fhir/MedicationStatement?patient=p2  200  0 resources"):
        assert shown in out
    assert "Observation/o6" not in out  # the text shows the first few; --json has them all

    as_json = _policy_cli(url, "--json", "--patient", "Patient/p1")
    assert as_json.returncode == 0, as_json.stderr
    [grant] = json.loads(as_json.stdout)
    assert {k: grant[k] for k in ("id", "requester", "fhirUser", "organization", "patient", "reason", "started",
                                  "expires")} == {
        "id": g1.id, "requester": DR_A, "fhirUser": "Practitioner/pa", "organization": "Organization/o1",
        "patient": "p1", "reason": "collapsed in clinic, no GP record",
        "started": "2023-11-14T22:13:20.000+00:00", "expires": "2023-11-14T23:13:20.000+00:00"}
    [access] = grant["accesses"]
    assert (access["method"], access["url"], access["status"], access["resources"]) == (
        "GET", "http://x/fhir/Patient/p1/$everything", 200, ["Patient/p1", *reads])
    assert access["at"].endswith("+00:00")

    filtered = _policy_cli(url, "--user", "dr-b", "--since", "2023-11-14T23:00:00+00:00")
    assert filtered.returncode == 0, filtered.stderr
    assert "overdose, unresponsive" in filtered.stdout and "collapsed" not in filtered.stdout
    assert _policy_cli(url, "--since", "2030-01-01", "--json").stdout.strip() == "[]"
    bad = _policy_cli(url, "--since", "last tuesday")
    assert bad.returncode == 2 and "last tuesday" in bad.stderr
