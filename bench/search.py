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

The client, wrk and the server share the machine, so on a small machine the figures are lower
bounds. Results: a table per database and scale on stdout, JSON in bench/results/search-<db>-<n>.json.

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import sqlalchemy as sa

from conformance.nhs_number import NHS_NUMBER_SYSTEM
from fhir_server.search.engine import parse_search
from fhir_server.search.values import normalise
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import resource

from common import (BIRTH_FROM, BIRTH_TO, MAX_PATIENTS, N_PRACTITIONERS, RESULTS, WRK_LUA_REPORT, BenchError,
                    Population, add_run_arguments, after_load, check_code, code_fingerprint, database, databases,
                    load, log, machine_facts, seeded_rng, server, workdir_for, wrk_result)

PAGE_SIZE = 50  # the server's default _count


# -- the searches and their checks ----------------------------------------------------------------------

@dataclass
class Query:
    params: list[tuple[str, str]]
    rtype: str
    check: Callable[[dict[str, Any]], int]  # raises BenchError; returns the total

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


def identifier_query(pop: Population, rng: random.Random) -> Query:
    p = pop.people[rng.randrange(pop.size)]

    def check(b: dict[str, Any]) -> int:
        m = _paged(b, 1, "Patient")
        _expect(m[0]["id"] == f"p{p.n}" and m[0]["identifier"][0]["value"] == p.nhs, f"got {_ids(m)}, expected p{p.n}")
        return 1
    return Query([("identifier", f"{NHS_NUMBER_SYSTEM}|{p.nhs}")], "Patient", check)


def family_query(pop: Population, rng: random.Random) -> Query:
    prefix = pop.people[rng.randrange(pop.size)].family[:3]
    total = pop.family_count(prefix)

    def check(b: dict[str, Any]) -> int:
        m = _paged(b, total, "Patient")
        bad = [r["id"] for r in m if not normalise(r["name"][0]["family"]).startswith(normalise(prefix))]
        _expect(not bad, f"{bad} do not have a family name starting with {prefix!r}")
        return total
    return Query([("family", prefix)], "Patient", check)


def birthdate_query(pop: Population, rng: random.Random) -> Query:
    month = rng.randrange((BIRTH_TO.year - BIRTH_FROM.year) * 12 + 11)  # windows inside 1920-01..2020-12
    lo = date(BIRTH_FROM.year + month // 12, month % 12 + 1, 1)
    hi_month = month + 2
    hi = date(BIRTH_FROM.year + hi_month // 12, hi_month % 12 + 1, 1)
    total = pop.birth_count(lo, hi)

    def check(b: dict[str, Any]) -> int:
        m = _paged(b, total, "Patient")
        bad = [r["id"] for r in m if not lo.isoformat() <= r["birthDate"] < hi.isoformat()]
        _expect(not bad, f"{bad} born outside [{lo}, {hi})")
        return total
    return Query([("birthdate", f"ge{lo}"), ("birthdate", f"lt{hi}")], "Patient", check)


def careplan_include_query(pop: Population, rng: random.Random) -> Query:
    n = rng.randrange(pop.size)

    def check(b: dict[str, Any]) -> int:
        _expect(b.get("total") == 1, f"total {b.get('total')}, expected 1")
        m, inc = _entries(b, "match"), _entries(b, "include")
        _expect(_ids(m) == [f"cp{n}"] and m[0]["resourceType"] == "CarePlan", f"matches {_ids(m)}, expected cp{n}")
        _expect(_ids(inc) == [f"ct{n}"] and inc[0]["resourceType"] == "CareTeam",
                f"included {_ids(inc)}, expected ct{n}")
        return 1
    return Query([("patient", f"Patient/p{n}"), ("_include", "CarePlan:care-team")], "CarePlan", check)


def careplan_subject_query(pop: Population, rng: random.Random) -> Query:
    n = rng.randrange(pop.size)

    def check(b: dict[str, Any]) -> int:
        m = _paged(b, 1, "CarePlan")
        _expect(_ids(m) == [f"cp{n}"], f"matches {_ids(m)}, expected cp{n}")
        return 1
    return Query([("subject", f"Patient/p{n}")], "CarePlan", check)


def has_query(pop: Population, rng: random.Random) -> Query:
    j = rng.randrange(N_PRACTITIONERS)
    expected = pop.by_practitioner.get(j, set())

    def check(b: dict[str, Any]) -> int:
        m = _paged(b, len(expected), "Patient")
        bad = [i for i in _ids(m) if int(i[1:]) not in expected]
        _expect(not bad, f"{bad} have no CareTeam with pr{j}")
        return len(expected)
    return Query([("_has:CareTeam:patient:participant", f"Practitioner/pr{j}")], "Patient", check)


def encounter_query(pop: Population, rng: random.Random) -> Query:
    p = pop.people[rng.randrange(pop.size)]
    newest = sorted(range(len(p.encounters)), key=lambda i: p.encounters[i][0], reverse=True)
    expected = [f"p{p.n}-e{i}" for i in newest[:5]]

    def check(b: dict[str, Any]) -> int:
        m = _paged(b, len(p.encounters), "Encounter", page=5)
        _expect(_ids(m) == expected, f"got {_ids(m)}, expected newest first {expected}")
        return len(p.encounters)
    return Query([("patient", f"Patient/p{p.n}"), ("_sort", "-date"), ("_count", "5")], "Encounter", check)


SEARCHES: dict[str, tuple[str, Callable[[Population, random.Random], Query]]] = {
    "identifier": ("Patient?identifier=<nhs-number system>|<value>", identifier_query),
    "family": ("Patient?family=<3-letter prefix>", family_query),
    "birthdate": ("Patient?birthdate=ge<d>&birthdate=lt<d + 2 months>", birthdate_query),
    "careplan+include": ("CarePlan?patient=Patient/p<n>&_include=CarePlan:care-team", careplan_include_query),
    "careplan-subject": ("CarePlan?subject=Patient/p<n>", careplan_subject_query),
    "has-careteam": ("Patient?_has:CareTeam:patient:participant=Practitioner/pr<j>", has_query),
    "encounter-sort": ("Encounter?patient=Patient/p<n>&_sort=-date&_count=5", encounter_query),
}
PLAN_SEARCHES = ("identifier", "has-careteam")  # the two the brief-style plans are printed for


# -- measuring --------------------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def measure_latency(client: httpx.Client, base: str, queries: list[Query], warmup: int) -> dict[str, Any]:
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
            total = q.check(bundle)
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
            "total_max": max(totals)}


LUA_WRK = WRK_LUA_REPORT + r"""
local urls = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do urls[#urls + 1] = line end
  i = ((tid - 1) * 7919) % #urls  -- threads start at different places in the list
end

function request()
  i = i % #urls + 1
  return wrk.format(nil, urls[i])
end
"""


def run_wrk(base: str, queries: list[Query], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    script, urls = workdir / "search.lua", workdir / "urls.txt"
    script.write_text(LUA_WRK)
    prefix = httpx.URL(base).path
    urls.write_text("".join(f"{prefix}/{q.path}\n" for q in queries))
    cmd = ["wrk", f"-t{args.wrk_threads}", f"-c{args.wrk_connections}", f"-d{args.wrk_seconds}s",
           "--timeout", "10s", "-s", str(script), base.rsplit("/fhir", 1)[0], "--", str(urls)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    r = wrk_result(proc)
    seconds = r["duration_us"] / 1e6
    out = {"requests": r["requests"], "seconds": round(seconds, 2), "requests_per_s": round(r["requests"] / seconds, 1),
           "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "non_2xx": r["non_2xx_3xx"],
           "socket_errors": r["socket_errors"], "urls": len(queries)}
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


def server_statements_plans(engine: sa.Engine, db: str, query: Query) -> list[dict[str, Any]]:
    """Every SELECT the service runs for the search (captured in-process), with its plan and time."""
    service = FhirService(Store(engine))
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
                           "code_changed": False,
                           "load_average_before": Path("/proc/loadavg").read_text().split()[:3]}
    with database(db, f"search-{pop.size}", workdir, args) as url:
        log(f"[{db} {pop.size:,}] loading {pop.resources:,} resources "
            f"({'validated' if not args.no_validate else 'not validated'}, {args.processes} processes)")
        run["load"] = load(url, pop, args)
        log(f"[{db} {pop.size:,}] loaded in {run['load']['seconds']} s: {run['load']['resources_per_s']:,} resources/s")
        run["database"] = after_load(url, db, pop, args)
        log(f"[{db} {pop.size:,}] settled ({run['database']['settle']}, {run['database']['settle_seconds']} s), "
            f"size {run['database']['size_bytes'] / 1e6:,.0f} MB")

        check_code(run, "after loading")
        rng = seeded_rng(pop.seed, "queries", db, pop.size)
        n_latency = args.warmup + args.requests
        run["searches"] = {}
        with server(url, args.workers, workdir / f"server-{db}-{pop.size}.log") as (base, _):
            with httpx.Client(timeout=60) as client:
                for name, (label, make) in SEARCHES.items():
                    latency = measure_latency(client, base, [make(pop, rng) for _ in range(n_latency)], args.warmup)
                    wrk = run_wrk(base, [make(pop, rng) for _ in range(args.wrk_urls)], workdir, args)
                    run["searches"][name] = {"search": label, "latency": latency, "wrk": wrk}
                    log(f"[{db} {pop.size:,}] {name:<17} p50 {latency['p50_ms']:7.2f} ms  "
                        f"p99 {latency['p99_ms']:7.2f} ms  wrk {wrk['requests_per_s']:8.1f} req/s  "
                        f"(totals {latency['total_min']}..{latency['total_max']}, all {latency['checked']} checked)")
        run["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
        check_code(run, "after measuring")

        engine = create_engine(url)
        try:
            plan_rng = seeded_rng(pop.seed, "plans", db, pop.size)
            run["plans"] = {}
            for name, (label, make) in SEARCHES.items():
                q = make(pop, plan_rng)
                if name == "birthdate":  # mid-century: each open-ended half covers about half the patients
                    q = Query([("birthdate", "ge1970-03-01"), ("birthdate", "lt1970-05-01")], "Patient", q.check)
                entry: dict[str, Any] = {"url": q.path, "statements": server_statements_plans(engine, db, q)}
                if name in PLAN_SEARCHES:
                    entry["where_only"] = where_plan(engine, db, q.rtype, [p for p in q.params
                                                                           if not p[0].startswith("_") or p[0].startswith("_has")])
                run["plans"][name] = entry
        finally:
            engine.dispose()
    return run


# -- report --------------------------------------------------------------------------------------------------

def print_run(run: dict[str, Any]) -> None:
    ld, dbf = run["load"], run["database"]
    print(f"\n== {run['db']}, {run['patients']:,} patients ({ld['resources']:,} resources, "
          f"{dbf['size_bytes'] / 1e6:,.0f} MB; {dbf['settle']}) ==")
    print(f"load: {ld['seconds']} s, {ld['resources_per_s']:,} resources/s overall "
          f"(patient phase {ld['patient_phase_resources_per_s']:,}/s), validate={'on' if ld['validate'] else 'off'}, "
          f"{ld['processes']} processes, ~{ld['batch_resources']} resources per bulk_put")
    print(f"load average before/after: {' '.join(run['load_average_before'])} / {' '.join(run['load_average_after'])}; "
          f"code {run['code']['git_head']} (source {run['code']['source_sha256']}"
          f"{', uncommitted changes' if run['code']['uncommitted_changes'] else ''})")
    if run["code_changed"]:
        print("!!! THE SERVER CODE CHANGED DURING THIS RUN: these figures mix two versions !!!")
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


def print_statement_plans(run: dict[str, Any]) -> None:
    print(f"\n== statements the server runs per search: {run['db']}, {run['patients']:,} patients ==")
    for name, entry in run["plans"].items():
        print(f"\n-- {name}: {entry['url']}")
        for st in entry["statements"]:
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
    args = parser.parse_args(argv)

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
            pop = Population(args.seed, patients)
            for db in dbs:
                run = bench_one(db, pop, workdir, args, code)
                run["machine"] = facts
                run["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                (RESULTS / f"search-{db}-{patients}.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
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
