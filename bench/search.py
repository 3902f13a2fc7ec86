"""FHIR search latency and throughput at 10k and 100k patients, on SQLite and PostgreSQL.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/search.py                                  # 10k and 100k, both databases
    .venv/bin/python bench/search.py --patients 1000 --db sqlite      # a quick smoke run
    .venv/bin/python bench/search.py --patients 100000 --db postgresql --no-validate --keep

For each database and scale: a fresh database (a new SQLite file, or a new PostgreSQL schema) is
filled in-process through `FhirService.bulk_put` by a pool of worker processes, from a seeded
synthetic UK population (about 10 resources per patient: Patient, 4-10 Encounters, a CareTeam and a
CarePlan, plus 200 GP practices and 2,000 practitioners). Then `carebroker serve --workers 2` is
started on it and each search is timed over HTTP:

  - latency: sequential httpx requests, each with a different random value (20 warm-up, 200 timed);
    every response is checked against the population (status, searchset, total, the entries);
  - throughput: `wrk -t2 -c8 -d5s` cycling through 1,000 pre-generated URLs of the same search.

Afterwards the query plans are printed: the search conditions compiled as the engine builds them
(identifier and _has), and every statement the server runs for each search, captured in-process
(EXPLAIN QUERY PLAN on SQLite; EXPLAIN ANALYZE on PostgreSQL) with its in-process time.

With `--policy`, the access-policy run (consent/policy.py): the population's policy variant (every
entry names its custodian, the patient's GP practice; about 5% of patients have a Consent: opt-outs,
opt-outs with a nested permit for their care team or a named GP, an opt-in with a nested deny of
2016-2018 Encounters, National Data Opt-outs), and `carebroker serve` with token checks. The same
URLs are timed with two bearer tokens of a bench issuer: a system-level client's (`system/*.rs`, no
role: no row conditions) and a clinician's (role clinician, `user/*.rs`, fhirUser a GP of a practice
of average list size, the practice as `organization`, purpose TREAT), 90% of the values drawn from
the clinician's related patients and practice colleagues (`--clinician-share`), so their searches
mostly find something. Each answer is checked as that token must see it (relationships and Consents
modelled in `ClinicianView`), spot checks cover each Consent kind (identifier search 1 or 0, read 200,
404 or 403, Encounters shown), wrk runs alternate between the tokens (`--rounds`), and the table gives
both throughputs and their ratio (the target: the clinician keeps >= 70%), then the clinician's
statements with their plans. `--reuse` (with `--workdir`) keeps the loaded database for later runs:

    .venv/bin/python bench/search.py --patients 100000 --db sqlite --policy --workdir /tmp/bench --reuse

The client, wrk and the server share the machine, so on a small machine the figures are lower
bounds. Results: a table per database and scale on stdout, JSON in bench/results/search-<db>-<n>.json
(search-policy-<db>-<n>.json for --policy).

The run records which server code it measured and warns (exit status 3) if that code changed on
disk during the run. To measure one commit while others keep working in the checkout, export it
and put it first on the path (the loader, the plans and `carebroker serve` then all import it):

    git archive HEAD fhir_server conformance consent mappings | tar -x -C /tmp/snap
    git rev-parse --short HEAD > /tmp/snap/COMMIT
    PYTHONPATH=/tmp/snap .venv/bin/python bench/search.py
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import sqlalchemy as sa

from consent.policy import PolicyDecisionPoint
from conformance.nhs_number import NHS_NUMBER_SYSTEM
from conformance.validation import supported_resource_types
from fhir_server.auth.principal import principal_from_claims
from fhir_server.search.engine import parse_search
from fhir_server.search.values import normalise
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import resource

from common import (BIRTH_FROM, BIRTH_TO, CONSENT_KINDS, ENCOUNTER_DENY_FROM, ENCOUNTER_DENY_TO, MAX_PATIENTS, N_ORGS,
                    N_PRACTITIONERS, RESULTS, WRK_LUA_REPORT, BenchError, BenchIssuer, Person, Population,
                    add_run_arguments, after_load, check_code, code_fingerprint, database, databases, load, log,
                    machine_facts, remember_population, seeded_rng, server, stored_population, workdir_for,
                    wrk_result)

PAGE_SIZE = 50  # the server's default _count


# -- who is asking, and what they may see -------------------------------------------------------------

class View:
    """What a token may see of the population: everything (no token, or a system-level one)."""

    name = "system"
    patients: list[int] | None = None  # the only patients it can see anything of (None: all)

    def record(self, p: Person, rtype: str, when: tuple[datetime, datetime] | None = None) -> bool:
        """Whether it sees patient p's `rtype` entry (`when`: the entry's clinical period, if dated)."""
        return True

    def nested(self, p: Person) -> bool:
        """Whether it reaches p's rows inside `_has` and chains."""
        return True


EVERYTHING = View()


def encounter_period(start: datetime, minutes: int) -> tuple[datetime, datetime]:
    return start, start + timedelta(minutes=minutes)


class ClinicianView(View):
    """A clinician (Practitioner/pr<k>, of the practice org<g>, purpose of use TREAT), as
    consent/rules.py and consent/policy.py decide: the patients with a legitimate relationship
    (registered at org<g>, or pr<k> in their care team; the bench's Encounters are finished, so
    they state none), minus what their Consents withhold from a user outside the custodian (every
    entry's custodian is the patient's practice): see CONSENT_KINDS in common.py."""

    name = "clinician"
    DENY_FROM = datetime.combine(ENCOUNTER_DENY_FROM, datetime.min.time(), UTC)
    DENY_TO = datetime.combine(ENCOUNTER_DENY_TO + timedelta(days=1), datetime.min.time(), UTC)

    def __init__(self, pop: Population, k: int) -> None:
        self.k, self.g = k, k % N_ORGS
        self.patients = [p.n for p in pop.people if self.related(p)]
        self.careteams = [n for n in self.patients if k in pop.people[n].team]

    def related(self, p: Person) -> bool:
        return p.org == self.g or self.k in p.team

    def record(self, p: Person, rtype: str, when: tuple[datetime, datetime] | None = None) -> bool:
        if not self.related(p):
            return False
        if p.org == self.g or p.consent is None:  # the custodian's own user, or nothing withheld
            return True
        if p.consent == "opt-out":
            return False
        if p.consent == "opt-out-careteam":  # permitted to members of CareTeam/ct<n>
            return self.k in p.team
        if p.consent == "opt-out-named-gp":
            return self.k == p.team[0]
        if p.consent == "no-encounters-2016-2018":
            return not (rtype == "Encounter" and when is not None and when[0] < self.DENY_TO and when[1] > self.DENY_FROM)
        return True  # ndoo: about research, not direct care

    def nested(self, p: Person) -> bool:
        """consent/policy.py `_care_rows_strict`: outside the custodian, nothing of a patient with
        any privacy Consent (every kind here has privacy provisions)."""
        return self.related(p) and (p.org == self.g or p.consent is None)

    def claims(self) -> dict[str, Any]:
        return {"sub": f"bench-clinician-pr{self.k}", "client_id": "bench-ehr", "scope": "openid fhirUser user/*.rs",
                "fhirUser": f"Practitioner/pr{self.k}", "organization": f"Organization/org{self.g}",
                "roles": ["clinician"], "purpose_of_use": "TREAT"}


SYSTEM_CLAIMS = {"sub": "bench-system", "client_id": "bench-system", "scope": "system/*.rs"}  # no role


def choose_clinician(pop: Population) -> ClinicianView:
    """A GP at a practice of about the average list size (size / 200 registered patients), the one
    of its ten practitioners in the most care teams."""
    lists = Counter(p.org for p in pop.people)
    g = min(range(N_ORGS), key=lambda o: (abs(lists[o] - pop.size / N_ORGS), o))
    k = max(range(g, N_PRACTITIONERS, N_ORGS), key=lambda j: (len(pop.by_practitioner.get(j, ())), -j))
    return ClinicianView(pop, k)


class Picker:
    """Where search values come from: uniformly from the population, or, with `focus`, a `share`
    of them from the focus clinician's patients and practice colleagues (so that the clinician's
    searches mostly find something), the rest uniformly (mostly patients they may not see)."""

    def __init__(self, pop: Population, rng: random.Random, focus: ClinicianView | None = None,
                 share: float = 0.9) -> None:
        self.pop, self.rng, self.focus, self.share = pop, rng, focus, share

    def _focused(self) -> bool:
        return self.focus is not None and self.rng.random() < self.share

    def patient(self) -> Person:
        if self._focused():
            assert self.focus is not None and self.focus.patients
            return self.pop.people[self.rng.choice(self.focus.patients)]
        return self.pop.people[self.rng.randrange(self.pop.size)]

    def practitioner(self) -> int:
        if self._focused():
            assert self.focus is not None
            return self.rng.choice(range(self.focus.g, N_PRACTITIONERS, N_ORGS))
        return self.rng.randrange(N_PRACTITIONERS)

    def birth_month(self, months: int) -> int:
        """The first month of a two-month window, counted from BIRTH_FROM."""
        if self._focused():
            born = self.patient().birth
            first = (born.year - BIRTH_FROM.year) * 12 + born.month - 1 - self.rng.randrange(2)
            return min(max(first, 0), months - 1)
        return self.rng.randrange(months)


class OnePatient(Picker):
    """Always the same patient."""

    def __init__(self, pop: Population, p: Person) -> None:
        super().__init__(pop, random.Random(0))
        self.p = p

    def patient(self) -> Person:
        return self.p


# -- the searches and their checks ----------------------------------------------------------------------

@dataclass
class Query:
    params: list[tuple[str, str]]
    rtype: str
    check: Callable[[dict[str, Any], View], int]  # raises BenchError; returns the total

    @property
    def path(self) -> str:
        return f"{self.rtype}?{urlencode(self.params)}"


def _entries(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise BenchError(what)


def _ids(resources: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in resources]


def _paged(bundle: dict[str, Any], total: int, rtype: str, page: int = PAGE_SIZE) -> list[dict[str, Any]]:
    got = bundle.get("total")
    _expect(got == total, f"total {got}, expected {total}")
    matches = _entries(bundle, "match")
    _expect(len(matches) == min(total, page), f"{len(matches)} entries, expected {min(total, page)}")
    _expect(all(r["resourceType"] == rtype for r in matches), f"an entry is not a {rtype}")
    _expect(not _entries(bundle, "include"), "unexpected included entries")
    return matches


def _seen(view: View, pop: Population, ids: list[str]) -> list[str]:
    """Patient ids (p<n>) among `ids` that `view` may not see."""
    return [i for i in ids if not view.record(pop.people[int(i[1:])], "Patient")]


def identifier_query(pop: Population, pick: Picker) -> Query:
    p = pick.patient()

    def check(b: dict[str, Any], view: View) -> int:
        total = int(view.record(p, "Patient"))
        m = _paged(b, total, "Patient")
        _expect(not m or (m[0]["id"] == f"p{p.n}" and m[0]["identifier"][0]["value"] == p.nhs),
                f"got {_ids(m)}, expected p{p.n}")
        return total
    return Query([("identifier", f"{NHS_NUMBER_SYSTEM}|{p.nhs}")], "Patient", check)


def family_query(pop: Population, pick: Picker) -> Query:
    prefix = pick.patient().family[:3]
    norm = normalise(prefix)

    def check(b: dict[str, Any], view: View) -> int:
        total = pop.family_count(prefix) if view.patients is None else sum(
            1 for n in view.patients if normalise(pop.people[n].family).startswith(norm)
            and view.record(pop.people[n], "Patient"))
        m = _paged(b, total, "Patient")
        bad = [r["id"] for r in m if not normalise(r["name"][0]["family"]).startswith(norm)]
        _expect(not bad, f"{bad} do not have a family name starting with {prefix!r}")
        _expect(not (hidden := _seen(view, pop, _ids(m))), f"{hidden} are not for the {view.name} to see")
        return total
    return Query([("family", prefix)], "Patient", check)


def birthdate_query(pop: Population, pick: Picker) -> Query:
    month = pick.birth_month((BIRTH_TO.year - BIRTH_FROM.year) * 12 + 11)  # windows inside 1920-01..2020-12
    lo = date(BIRTH_FROM.year + month // 12, month % 12 + 1, 1)
    hi_month = month + 2
    hi = date(BIRTH_FROM.year + hi_month // 12, hi_month % 12 + 1, 1)

    def check(b: dict[str, Any], view: View) -> int:
        total = pop.birth_count(lo, hi) if view.patients is None else sum(
            1 for n in view.patients if lo <= pop.people[n].birth < hi and view.record(pop.people[n], "Patient"))
        m = _paged(b, total, "Patient")
        bad = [r["id"] for r in m if not lo.isoformat() <= r["birthDate"] < hi.isoformat()]
        _expect(not bad, f"{bad} born outside [{lo}, {hi})")
        _expect(not (hidden := _seen(view, pop, _ids(m))), f"{hidden} are not for the {view.name} to see")
        return total
    return Query([("birthdate", f"ge{lo}"), ("birthdate", f"lt{hi}")], "Patient", check)


def careplan_include_query(pop: Population, pick: Picker) -> Query:
    p = pick.patient()
    n = p.n

    def check(b: dict[str, Any], view: View) -> int:
        total = int(view.record(p, "CarePlan"))
        _expect(b.get("total") == total, f"total {b.get('total')}, expected {total}")
        m, inc = _entries(b, "match"), _entries(b, "include")
        want_inc = [f"ct{n}"] if total and view.record(p, "CareTeam") else []
        _expect(_ids(m) == [f"cp{n}"][:total] and all(r["resourceType"] == "CarePlan" for r in m),
                f"matches {_ids(m)}, expected {[f'cp{n}'][:total]}")
        _expect(_ids(inc) == want_inc and all(r["resourceType"] == "CareTeam" for r in inc),
                f"included {_ids(inc)}, expected {want_inc}")
        return total
    return Query([("patient", f"Patient/p{n}"), ("_include", "CarePlan:care-team")], "CarePlan", check)


def careplan_subject_query(pop: Population, pick: Picker) -> Query:
    p = pick.patient()

    def check(b: dict[str, Any], view: View) -> int:
        total = int(view.record(p, "CarePlan"))
        m = _paged(b, total, "CarePlan")
        _expect(_ids(m) == [f"cp{p.n}"][:total], f"matches {_ids(m)}, expected {[f'cp{p.n}'][:total]}")
        return total
    return Query([("subject", f"Patient/p{p.n}")], "CarePlan", check)


def has_query(pop: Population, pick: Picker) -> Query:
    j = pick.practitioner()
    members = pop.by_practitioner.get(j, set())

    def check(b: dict[str, Any], view: View) -> int:
        expected = members if view.patients is None else {
            n for n in members if view.record(pop.people[n], "Patient") and view.nested(pop.people[n])}
        m = _paged(b, len(expected), "Patient")
        bad = [i for i in _ids(m) if int(i[1:]) not in expected]
        _expect(not bad, f"{bad} have no CareTeam with pr{j} that the {view.name} may see")
        return len(expected)
    return Query([("_has:CareTeam:patient:participant", f"Practitioner/pr{j}")], "Patient", check)


def encounter_query(pop: Population, pick: Picker) -> Query:
    p = pick.patient()
    newest = sorted(range(len(p.encounters)), key=lambda i: p.encounters[i][0], reverse=True)

    def check(b: dict[str, Any], view: View) -> int:
        shown = [i for i in newest if view.record(p, "Encounter", encounter_period(*p.encounters[i][:2]))]
        expected = [f"p{p.n}-e{i}" for i in shown[:5]]
        m = _paged(b, len(shown), "Encounter", page=5)
        _expect(_ids(m) == expected, f"got {_ids(m)}, expected newest first {expected}")
        return len(shown)
    return Query([("patient", f"Patient/p{p.n}"), ("_sort", "-date"), ("_count", "5")], "Encounter", check)


SEARCHES: dict[str, tuple[str, Callable[[Population, Picker], Query]]] = {
    "identifier": ("Patient?identifier=<nhs-number system>|<value>", identifier_query),
    "family": ("Patient?family=<3-letter prefix>", family_query),
    "birthdate": ("Patient?birthdate=ge<d>&birthdate=lt<d + 2 months>", birthdate_query),
    "careplan+include": ("CarePlan?patient=Patient/p<n>&_include=CarePlan:care-team", careplan_include_query),
    "careplan-subject": ("CarePlan?subject=Patient/p<n>", careplan_subject_query),
    "has-careteam": ("Patient?_has:CareTeam:patient:participant=Practitioner/pr<j>", has_query),
    "encounter-sort": ("Encounter?patient=Patient/p<n>&_sort=-date&_count=5", encounter_query),
}
PLAN_SEARCHES = ("identifier", "has-careteam")  # the two the brief-style plans are printed for
POLICY_TARGET = 0.70  # a clinician's searches keep at least this share of a system token's throughput


# -- measuring --------------------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def measure_latency(client: httpx.Client, base: str, queries: list[Query], warmup: int,
                    view: View = EVERYTHING) -> dict[str, Any]:
    """`client` carries the token of `view`, if any; each answer is checked as `view` must see it."""
    times, totals = [], []
    for i, q in enumerate(queries):
        url = f"{base}/{q.path}"
        t0 = time.perf_counter()
        resp = client.get(url)
        elapsed = time.perf_counter() - t0
        try:
            _expect(resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:500]}")
            bundle = resp.json()
            _expect(bundle.get("resourceType") == "Bundle" and bundle.get("type") == "searchset",
                    "not a searchset Bundle")
            _expect(not _entries(bundle, "outcome"), f"the server reported: {_entries(bundle, 'outcome')}")
            total = q.check(bundle, view)
        except (BenchError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"WRONG ANSWER for GET {url}: {exc}") from None
        if i >= warmup:
            times.append(elapsed * 1000)
            totals.append(total)
    times.sort()
    return {"requests": len(times), "warmup": warmup, "p50_ms": round(percentile(times, 50), 2),
            "p90_ms": round(percentile(times, 90), 2), "p99_ms": round(percentile(times, 99), 2),
            "max_ms": round(times[-1], 2), "mean_ms": round(statistics.fmean(times), 2),
            "checked": len(queries), "total_min": min(totals), "total_median": statistics.median(totals),
            "total_max": max(totals), "nonempty": sum(t > 0 for t in totals)}


LUA_WRK = WRK_LUA_REPORT + r"""
local urls = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do urls[#urls + 1] = line end
  i = ((tid - 1) * 7919) % #urls  -- threads start at different places in the list
  if args[2] then wrk.headers["Authorization"] = "Bearer " .. args[2] end
end

function request()
  i = i % #urls + 1
  return wrk.format(nil, urls[i])
end
"""


def run_wrk(base: str, queries: list[Query], workdir: Path, args: argparse.Namespace,
            token: str | None = None) -> dict[str, Any]:
    script, urls = workdir / "search.lua", workdir / "urls.txt"
    script.write_text(LUA_WRK)
    prefix = httpx.URL(base).path
    urls.write_text("".join(f"{prefix}/{q.path}\n" for q in queries))
    cmd = ["wrk", f"-t{args.wrk_threads}", f"-c{args.wrk_connections}", f"-d{args.wrk_seconds}s",
           "--timeout", "10s", "-s", str(script), base.rsplit("/fhir", 1)[0], "--", str(urls),
           *([token] if token else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    r = wrk_result(proc)
    seconds = r["duration_us"] / 1e6
    out = {"requests": r["requests"], "seconds": round(seconds, 2), "requests_per_s": round(r["requests"] / seconds, 1),
           "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "non_2xx": r["non_2xx_3xx"],
           "socket_errors": r["socket_errors"], "urls": len(queries),
           "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    if out["non_2xx"] or out["socket_errors"]:
        raise BenchError(f"wrk saw {out['non_2xx']} HTTP errors and {out['socket_errors']} socket errors in "
                         f"{out['requests']} requests of {queries[0].path}...")
    return out


# -- query plans -------------------------------------------------------------------------------------------

def explain(conn: sa.Connection, db: str, sql: str, params: Any = None, analyze: bool = False) -> list[str]:
    if db == "sqlite":
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params or ()).all()
        depth: dict[int, int] = {0: -1}
        lines = []
        for node, parent, _, detail in rows:
            depth[node] = depth.get(parent, -1) + 1
            lines.append("  " * depth[node] + detail)
        return lines
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
    return [row[0] for row in conn.exec_driver_sql(prefix + sql, params or {}).all()]


def where_plan(engine: sa.Engine, db: str, rtype: str, params: list[tuple[str, str]]) -> dict[str, Any]:
    """The search conditions as the engine builds them, on their own: the SQL and its plan."""
    search = parse_search((rtype,), params, strict=True, base_url="")
    stmt = sa.select(resource.c.pk).where(resource.c.type == rtype, resource.c.deleted.is_(False), *search.conditions)
    sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        return {"sql": sql, "plan": explain(conn, db, sql)}


def policy_service(engine: sa.Engine, claims: dict[str, Any]) -> tuple[FhirService, bool]:
    """The service as the router gives it to a caller with these token claims: (service, whether
    the caller's policy is unrestricted, i.e. no row conditions at all)."""
    service = FhirService(Store(engine))
    policy = PolicyDecisionPoint(service, frozenset(supported_resource_types())).for_principal(
        principal_from_claims(claims), "")
    return (service, True) if policy.unrestricted else (service.restricted(policy), False)


def server_statements_plans(engine: sa.Engine, db: str, query: Query,
                            service: FhirService | None = None) -> list[dict[str, Any]]:
    """Every SELECT the service (default: unrestricted) runs for the search (captured in-process),
    with its plan and time."""
    service = service or FhirService(Store(engine))
    captured: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            captured.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        service.search((query.rtype,), query.params, strict=True, base_url="", count=_page_size(query),
                       cursor=None, want_total=True)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    out = []
    with engine.connect() as conn:
        for sql, params in captured:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                conn.exec_driver_sql(sql, params).all()
                times.append((time.perf_counter() - t0) * 1000)
            out.append({"sql": " ".join(sql.split()), "params": repr(params)[:300],
                        "in_process_ms_median_of_5": round(statistics.median(times), 3),
                        "plan": explain(conn, db, sql, params, analyze=True)})
    return out


def _page_size(query: Query) -> int:
    return next((int(v) for k, v in query.params if k == "_count"), PAGE_SIZE)


# -- one database at one scale ------------------------------------------------------------------------------

def bench_one(db: str, pop: Population, workdir: Path, args: argparse.Namespace,
              code: dict[str, str]) -> dict[str, Any]:
    """`code`: the fingerprint when this script started (and imported the server code it runs in-process)."""
    run: dict[str, Any] = {"db": db, "patients": pop.size, "seed": pop.seed, "code": code,
                           "code_changed": False, "policy_population": pop.policy,
                           "load_average_before": Path("/proc/loadavg").read_text().split()[:3]}
    name = f"search-{'policy-' if pop.policy else ''}{pop.size}"
    with database(db, name, workdir, args) as url:
        reused = stored_population(url, workdir, pop) if args.reuse else None
        if reused is not None:
            run["load"] = reused
            log(f"[{db} {pop.size:,}] --reuse: the database already holds the population ({pop.resources:,} resources)")
        else:
            log(f"[{db} {pop.size:,}] loading {pop.resources:,} resources "
                f"({'validated' if not args.no_validate else 'not validated'}, {args.processes} processes)")
            run["load"] = load(url, pop, args)
            log(f"[{db} {pop.size:,}] loaded in {run['load']['seconds']} s: {run['load']['resources_per_s']:,} resources/s")
            if args.reuse:
                remember_population(url, workdir, pop, run["load"])
        run["database"] = after_load(url, db, pop, args)
        log(f"[{db} {pop.size:,}] settled ({run['database']['settle']}, {run['database']['settle_seconds']} s), "
            f"size {run['database']['size_bytes'] / 1e6:,.0f} MB")

        check_code(run, "after loading")
        if args.policy:
            run["policy"] = measure_policy(url, db, pop, workdir, args)
        else:
            run["searches"] = measure_searches(url, db, pop, workdir, args)
        run["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
        check_code(run, "after measuring")

        engine = create_engine(url)
        try:
            if args.policy:
                run["policy"]["plans"] = policy_plans(engine, db, pop)
            else:
                run["plans"] = plans(engine, db, pop)
        finally:
            engine.dispose()
    return run


def measure_searches(url: str, db: str, pop: Population, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Each search without a token (serve --auth off): latency, then throughput."""
    pick = Picker(pop, seeded_rng(pop.seed, "queries", db, pop.size))
    n_latency = args.warmup + args.requests
    out: dict[str, Any] = {}
    with server(url, args.workers, workdir / f"server-{db}-{pop.size}.log") as (base, _):
        with httpx.Client(timeout=60) as client:
            for name, (label, make) in SEARCHES.items():
                latency = measure_latency(client, base, [make(pop, pick) for _ in range(n_latency)], args.warmup)
                wrk = run_wrk(base, [make(pop, pick) for _ in range(args.wrk_urls)], workdir, args)
                out[name] = {"search": label, "latency": latency, "wrk": wrk}
                log(f"[{db} {pop.size:,}] {name:<17} p50 {latency['p50_ms']:7.2f} ms  "
                    f"p99 {latency['p99_ms']:7.2f} ms  wrk {wrk['requests_per_s']:8.1f} req/s  "
                    f"(totals {latency['total_min']}..{latency['total_max']}, all {latency['checked']} checked)")
    return out


def plans(engine: sa.Engine, db: str, pop: Population) -> dict[str, Any]:
    plan_rng = seeded_rng(pop.seed, "plans", db, pop.size)
    out: dict[str, Any] = {}
    for name, (label, make) in SEARCHES.items():
        q = make(pop, Picker(pop, plan_rng))
        if name == "birthdate":  # mid-century: each open-ended half covers about half the patients
            q = Query([("birthdate", "ge1970-03-01"), ("birthdate", "lt1970-05-01")], "Patient", q.check)
        entry: dict[str, Any] = {"url": q.path, "statements": server_statements_plans(engine, db, q)}
        if name in PLAN_SEARCHES:
            entry["where_only"] = where_plan(engine, db, q.rtype, [p for p in q.params
                                                                   if not p[0].startswith("_") or p[0].startswith("_has")])
        out[name] = entry
    return out


# -- the policy run: a clinician's searches against a system-level token's ---------------------------------

def measure_policy(url: str, db: str, pop: Population, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same URLs with a system-level token and with a clinician's: latency (every answer checked
    as that token must see it), then wrk in alternating rounds (system, clinician, clinician, system,
    ...) so drifting machine load weighs on both alike."""
    clinician = choose_clinician(pop)
    issuer = BenchIssuer(workdir)
    claims = {"system": SYSTEM_CLAIMS, "clinician": clinician.claims()}
    tokens = {who: issuer.token(issuer.claims(**c)) for who, c in claims.items()}
    views: dict[str, View] = {"system": EVERYTHING, "clinician": clinician}
    out: dict[str, Any] = {
        "clinician": {"claims": claims["clinician"], "related_patients": len(clinician.patients),
                      "registered_at_practice": sum(pop.people[n].org == clinician.g for n in clinician.patients),
                      "care_teams": len(clinician.careteams),
                      "related_with_consent": dict(Counter(pop.people[n].consent for n in clinician.patients
                                                           if pop.people[n].consent))},
        "system": {"claims": SYSTEM_CLAIMS},
        "consents": dict(Counter(p.consent for p in pop.people if p.consent)),
        "clinician_share": args.clinician_share, "rounds": args.rounds, "searches": {}}
    log(f"[{db} {pop.size:,}] clinician Practitioner/pr{clinician.k} of Organization/org{clinician.g}: "
        f"{len(clinician.patients)} related patients ({out['clinician']['registered_at_practice']} registered at the "
        f"practice, {len(clinician.careteams)} care teams); {pop.consents:,} Consents in the population")
    n_latency = args.warmup + args.requests
    with server(url, args.workers, workdir / f"server-policy-{db}-{pop.size}.log", issuer=issuer) as (base, _):
        clients = {who: httpx.Client(timeout=60, headers={"Authorization": f"Bearer {t}"}) for who, t in tokens.items()}
        try:
            out["spot_checks"] = spot_checks(base, pop, issuer, clinician)
            log(f"[{db} {pop.size:,}] spot checks: {len(out['spot_checks'])} cases as expected")
            pick = Picker(pop, seeded_rng(pop.seed, "policy-queries", db, pop.size), clinician, args.clinician_share)
            for name, (label, make) in SEARCHES.items():
                latency_queries = [make(pop, pick) for _ in range(n_latency)]
                wrk_queries = [make(pop, pick) for _ in range(args.wrk_urls)]
                entry: dict[str, Any] = {"search": label}
                for who in ("system", "clinician"):
                    entry[who] = {"latency": measure_latency(clients[who], base, latency_queries, args.warmup, views[who]),
                                  "wrk_rounds": []}
                for r in range(args.rounds):
                    for who in (("system", "clinician") if r % 2 == 0 else ("clinician", "system")):
                        entry[who]["wrk_rounds"].append(run_wrk(base, wrk_queries, workdir, args, tokens[who]))
                for who in ("system", "clinician"):
                    rounds = entry[who]["wrk_rounds"]
                    entry[who]["requests_per_s"] = round(statistics.fmean(w["requests_per_s"] for w in rounds), 1)
                    entry[who]["wrk_p50_ms"] = round(statistics.fmean(w["p50_ms"] for w in rounds), 2)
                entry["ratio"] = round(entry["clinician"]["requests_per_s"] / entry["system"]["requests_per_s"], 3)
                entry["round_ratios"] = [round(c["requests_per_s"] / s["requests_per_s"], 3) for s, c in
                                         zip(entry["system"]["wrk_rounds"], entry["clinician"]["wrk_rounds"])]
                out["searches"][name] = entry
                sl, cl = entry["system"]["latency"], entry["clinician"]["latency"]
                log(f"[{db} {pop.size:,}] {name:<17} system {entry['system']['requests_per_s']:7.1f} req/s "
                    f"p50 {sl['p50_ms']:6.2f} ms | clinician {entry['clinician']['requests_per_s']:7.1f} req/s "
                    f"p50 {cl['p50_ms']:6.2f} ms | ratio {entry['ratio']:.2f} {entry['round_ratios']} "
                    f"(clinician found something in {cl['nonempty']}/{cl['checked']}; load {' '.join(Path('/proc/loadavg').read_text().split()[:3])})")
        finally:
            for c in clients.values():
                c.close()
    return out


def spot_checks(base: str, pop: Population, issuer: BenchIssuer, main: ClinicianView) -> list[dict[str, Any]]:
    """One patient per rule, asked about by a clinician the rule concerns: the identifier search
    (1 or 0), a read of the Patient (200; 404 for a related patient whose record is withheld; 403
    without a relationship) and the Encounter search (the ones it may see)."""
    def find(pred: Callable[[Person], bool]) -> Person | None:
        return next((p for p in pop.people if pred(p)), None)

    def foreign_member(p: Person) -> bool:  # the third care-team member works elsewhere
        return p.team[2] % N_ORGS != p.org

    cases: list[tuple[str, Person | None, Callable[[Person], int]]] = [
        ("registered at the clinician's practice", find(lambda p: p.org == main.g and p.consent is None), lambda p: main.k),
        ("no relationship", find(lambda p: not main.related(p)), lambda p: main.k),
        ("care-team member from another practice", find(lambda p: p.consent is None and foreign_member(p)),
         lambda p: p.team[2]),
        ("opted out; asked by their own practice's GP (the custodian)", find(lambda p: p.consent == "opt-out"),
         lambda p: p.team[0]),
    ]
    for kind in (k for k, _ in CONSENT_KINDS):
        cases.append((f"{kind}; asked by a care-team member from another practice",
                      find(lambda p, kind=kind: p.consent == kind and foreign_member(p) and (
                          kind != "no-encounters-2016-2018" or len({ClinicianView.DENY_FROM <= s < ClinicianView.DENY_TO
                                                                     for s, _, _ in p.encounters}) == 2)),
                      lambda p: p.team[2]))
    out, views = [], {main.k: main}
    for label, p, who in cases:
        if p is None:
            raise BenchError(f"spot check: no patient in the population for '{label}'")
        k = who(p)
        view = views.setdefault(k, ClinicianView(pop, k))
        token = issuer.token(issuer.claims(**view.claims()))
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
            fixed = OnePatient(pop, p)
            found = {}
            for qname, make in (("identifier", identifier_query), ("encounters", encounter_query)):
                q = make(pop, fixed)
                resp = client.get(f"{base}/{q.path}")
                try:
                    _expect(resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:300]}")
                    found[qname] = q.check(resp.json(), view)
                except BenchError as exc:
                    raise BenchError(f"WRONG ANSWER in spot check '{label}' (pr{k}, p{p.n}): GET {q.path}: {exc}") from None
            status = client.get(f"{base}/Patient/p{p.n}").status_code
            want = 200 if view.record(p, "Patient") else 404 if view.related(p) else 403
            if status != want:
                raise BenchError(f"WRONG ANSWER in spot check '{label}' (pr{k}, p{p.n}): read {status}, expected {want}")
        out.append({"case": label, "practitioner": f"pr{k}", "patient": f"p{p.n}", "identifier_total": found["identifier"],
                    "encounters": f"{found['encounters']} of {len(p.encounters)}", "read": status})
    return out


def policy_plans(engine: sa.Engine, db: str, pop: Population) -> dict[str, Any]:
    """Every statement of each search with each token, with its plan and in-process time."""
    clinician = choose_clinician(pop)
    services = {who: policy_service(engine, claims) for who, claims in
                (("system", {"iss": BenchIssuer.ISSUER, **SYSTEM_CLAIMS}),
                 ("clinician", {"iss": BenchIssuer.ISSUER, **clinician.claims()}))}
    if not services["system"][1] or services["clinician"][1]:
        raise BenchError(f"the system token should be unrestricted and the clinician's not: {services}")
    pick = Picker(pop, seeded_rng(pop.seed, "policy-plans", db, pop.size), clinician, share=1.0)
    out: dict[str, Any] = {}
    for name, (label, make) in SEARCHES.items():
        q = make(pop, pick)
        out[name] = {"url": q.path, **{who: server_statements_plans(engine, db, q, service)
                                       for who, (service, _) in services.items()}}
    return out


# -- report --------------------------------------------------------------------------------------------------

def print_run(run: dict[str, Any]) -> None:
    ld, dbf = run["load"], run["database"]
    print(f"\n== {run['db']}, {run['patients']:,} patients ({ld['resources']:,} resources, "
          f"{dbf['size_bytes'] / 1e6:,.0f} MB; {dbf['settle']}) ==")
    print(f"load{' (by an earlier run: --reuse)' if ld.get('reused') else ''}: {ld['seconds']} s, "
          f"{ld['resources_per_s']:,} resources/s overall "
          f"(patient phase {ld['patient_phase_resources_per_s']:,}/s), validate={'on' if ld['validate'] else 'off'}, "
          f"{ld['processes']} processes, ~{ld['batch_resources']} resources per bulk_put")
    print(f"load average before/after: {' '.join(run['load_average_before'])} / {' '.join(run['load_average_after'])}; "
          f"code {run['code']['git_head']} (source {run['code']['source_sha256']}"
          f"{', uncommitted changes' if run['code']['uncommitted_changes'] else ''})")
    if run["code_changed"]:
        print("!!! THE SERVER CODE CHANGED DURING THIS RUN: these figures mix two versions !!!")
    if "policy" in run:
        print_policy(run)
        return
    header = f"{'search':<18}{'p50 ms':>9}{'p99 ms':>9}{'wrk req/s':>11}{'wrk p50':>9}  sanity"
    print(header + "\n" + "-" * (len(header) + 40))
    for name, s in run["searches"].items():
        lat, wrk = s["latency"], s["wrk"]
        totals = (f"total {lat['total_min']}" if lat["total_min"] == lat["total_max"]
                  else f"totals {lat['total_min']}..{lat['total_max']} (median {lat['total_median']:g})")
        print(f"{name:<18}{lat['p50_ms']:>9.2f}{lat['p99_ms']:>9.2f}{wrk['requests_per_s']:>11.1f}"
              f"{wrk['p50_ms']:>9.2f}  {lat['checked']}/{lat['checked']} ok, {totals}; wrk 0 errors")
    for name in PLAN_SEARCHES:
        where = run["plans"][name]["where_only"]
        print(f"\nplan of {name} conditions ({run['db']}, {run['patients']:,}):")
        print("  " + where["sql"].replace("\n", "\n  "))
        print("  --")
        print("  " + "\n  ".join(where["plan"]))


def print_policy(run: dict[str, Any]) -> None:
    pol = run["policy"]
    c = pol["clinician"]
    print(f"clinician: {c['claims']['fhirUser']} of {c['claims']['organization']}, roles clinician, {c['claims']['scope']!r}, "
          f"purpose TREAT: {c['related_patients']} related patients ({c['registered_at_practice']} registered at the "
          f"practice, in {c['care_teams']} care teams; with Consents: {c['related_with_consent'] or 'none'}); "
          f"system token: {pol['system']['claims']['scope']!r}, no role")
    print(f"Consents in the population: {pol['consents']}; {pol['clinician_share']:.0%} of the search values from the "
          f"clinician's patients and colleagues; wrk: {pol['rounds']} rounds per token, alternating")
    header = (f"{'search':<18}{'system req/s':>13}{'clinician':>11}{'ratio':>7}  {'rounds':<14}{'system p50/p99':>16}"
              f"{'clinician p50/p99':>19}  clinician found")
    print(header + "\n" + "-" * (len(header) + 10))
    for name, e in pol["searches"].items():
        sl, cl = e["system"]["latency"], e["clinician"]["latency"]
        flag = "" if e["ratio"] >= POLICY_TARGET else f"  << below {POLICY_TARGET:.0%}"
        print(f"{name:<18}{e['system']['requests_per_s']:>13.1f}{e['clinician']['requests_per_s']:>11.1f}"
              f"{e['ratio']:>7.2f}  {'/'.join(f'{r:.2f}' for r in e['round_ratios']):<14}"
              f"{sl['p50_ms']:>8.2f} /{sl['p99_ms']:>6.1f}{cl['p50_ms']:>11.2f} /{cl['p99_ms']:>6.1f}  "
              f"{cl['nonempty']}/{cl['checked']} (totals {cl['total_min']}..{cl['total_max']}; system "
              f"{sl['total_min']}..{sl['total_max']}){flag}")
    print("every answer checked against the population as each token must see it; wrk 0 errors")
    print("spot checks (identifier total, encounters shown, read status):")
    for sc in pol["spot_checks"]:
        print(f"  {sc['case']:<70} {sc['practitioner']:>7} {sc['patient']:>8}: {sc['identifier_total']}, "
              f"{sc['encounters']}, {sc['read']}")
    worst = min(pol["searches"], key=lambda n: pol["searches"][n]["ratio"])
    shown = ["identifier"] + ([worst] if worst != "identifier" and pol["searches"][worst]["ratio"] < POLICY_TARGET else [])
    for name in shown:
        entry = pol["plans"][name]
        print(f"\nclinician's {name} search ({run['db']}, {run['patients']:,}): {entry['url']}")
        for st in entry["clinician"]:
            print(f"  [{st['in_process_ms_median_of_5']} ms in-process; the system token's statements: "
                  f"{' + '.join(str(x['in_process_ms_median_of_5']) for x in entry['system'])} ms]")
            print("  " + st["sql"])
            print("  params " + st["params"])
            print("    " + "\n    ".join(st["plan"]))


def print_statement_plans(run: dict[str, Any]) -> None:
    print(f"\n== statements the server runs per search: {run['db']}, {run['patients']:,} patients ==")
    plans = run["policy"]["plans"] if "policy" in run else run["plans"]
    for name, entry in plans.items():
        for who in ("system", "clinician") if "policy" in run else ("statements",):
            print(f"\n-- {name}{'' if who == 'statements' else ' as ' + who}: {entry['url']}")
            for st in entry[who]:
                print(f"   [{st['in_process_ms_median_of_5']} ms] {st['sql'][:400]}")
                print("     " + "\n     ".join(st["plan"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", default="10000,100000", help="comma-separated scales (default 10000,100000)")
    add_run_arguments(parser)
    parser.add_argument("--no-validate", action="store_true", help="bulk_put(validate=False): skip fhir.resources")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per search (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first (default 20)")
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=8)
    parser.add_argument("--wrk-urls", type=int, default=1000, help="distinct URLs wrk cycles through per search")
    parser.add_argument("--sqlite-analyze", action="store_true",
                        help="also run a full ANALYZE on SQLite after loading (the server samples statistics itself at start-up and every 20,000 writes)")
    parser.add_argument("--all-plans", action="store_true", help="also print every statement's plan")
    parser.add_argument("--policy", action="store_true",
                        help="the access-policy run: the policy population (custodians, Consents), the server with "
                             "token checks, each search with a system-level token and with a clinician's")
    parser.add_argument("--rounds", type=int, default=2, help="--policy: wrk runs per token and search, alternating (default 2)")
    parser.add_argument("--clinician-share", type=float, default=0.9,
                        help="--policy: share of search values from the clinician's patients and colleagues (default 0.9)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the database (<workdir>/search-[policy-]<n>.db, schema bench_search_[policy_]<n>_kept) "
                             "and load it only if empty; needs --workdir")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.reuse and not args.workdir:
        parser.error("--reuse needs --workdir (where the SQLite files and the notes of what was loaded stay)")

    scales = [int(s) for s in args.patients.split(",") if s.strip()]
    dbs = databases(args, parser)
    if max(scales) > MAX_PATIENTS:
        parser.error(f"at most {MAX_PATIENTS:,} patients (NHS numbers would repeat)")
    RESULTS.mkdir(exist_ok=True)
    facts = machine_facts()
    code = code_fingerprint()
    with contextlib.ExitStack() as stack:
        workdir = workdir_for(args, stack, "carebroker-search-")
        free = shutil.disk_usage(workdir).free
        log(f"code {code['git_head']} from {code['root']} (source {code['source_sha256']}); workdir {workdir}: {free / 1e9:,.0f} GB free; {facts['nproc']} CPUs, "
            f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
        runs = []
        for patients in scales:
            log(f"generating the population of {patients:,} patients (seed {args.seed})")
            pop = Population(args.seed, patients, policy=args.policy)
            for db in dbs:
                run = bench_one(db, pop, workdir, args, code)
                run["machine"] = facts
                run["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                (RESULTS / f"search-{'policy-' if args.policy else ''}{db}-{patients}.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
                runs.append(run)
                print_run(run)
                if args.all_plans:
                    print_statement_plans(run)
                sys.stdout.flush()
    changed = [f"{r['db']} {r['patients']}" for r in runs if r["code_changed"]]
    if changed:
        print(f"\n!!! server code changed during: {', '.join(changed)}; rerun those !!!")
    print(f"\nmachine: {facts['nproc']} CPUs ({facts['cpu_model']}), shared with other work; client, wrk and "
          f"server on the same CPUs: figures are lower bounds. JSON in {RESULTS}/search-<db>-<patients>.json")
    return 3 if changed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\n!!! BENCHMARK FAILED: {exc}", file=sys.stderr)
        sys.exit(2)
