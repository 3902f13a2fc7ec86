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
import bisect
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import sqlalchemy as sa

import fhir_server
from conformance.nhs_number import NHS_NUMBER_SYSTEM, nhs_check_digit
from fhir_server.search.engine import parse_search
from fhir_server.search.values import normalise
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine, migrate
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import resource

RESULTS = Path(__file__).resolve().parent / "results"
CODE_DIRS = ("fhir_server", "conformance")  # what the loader, the server and the plans run
PG_DEFAULT = "postgresql+psycopg://127.0.0.1:5432/test"
RESULT_MARK = "BENCH_RESULT "

ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
GMC_SYSTEM = "https://fhir.hl7.org.uk/Id/gmc-number"
ORG_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SNOMED = "http://snomed.info/sct"

N_ORGS = 200
N_PRACTITIONERS = 2000  # pr{j} works at practice org{j % N_ORGS}
BIRTH_FROM, BIRTH_TO = date(1920, 1, 1), date(2020, 12, 31)
ENCOUNTERS_FROM, ENCOUNTER_DAYS = datetime(2016, 1, 1, tzinfo=UTC), 3650
ENCOUNTERS_PER_PATIENT = (4, 10)  # uniform: 7 on average, so ~10 resources per patient
MAX_PATIENTS = 900_000  # NHS numbers below are unique up to here
PAGE_SIZE = 50  # the server's default _count

# -- synthetic population (nobody real: NHS numbers from the 999 test range, Ofcom drama phones) ---------

FAMILY = tuple(dict.fromkeys("""
Smith Jones Williams Taylor Brown Davies Evans Wilson Thomas Johnson Roberts Robinson Thompson Wright
Walker White Edwards Hughes Green Hall Lewis Harris Clarke Patel Jackson Wood Turner Martin Cooper Hill
Ward Morris Moore Clark Lee King Baker Harrison Morgan Allen James Scott Phillips Watson Davis Parker
Price Bennett Young Griffiths Mitchell Kelly Cook Carter Richardson Bailey Collins Bell Shaw Murphy
Miller Cox Richards Khan Marshall Anderson Simpson Ellis Adams Singh Begum Wilkinson Foster Chapman
Powell Webb Rogers Gray Mason Ali Hunt Hussain Campbell Matthews Owen Palmer Holmes Mills Barnes Knight
Lloyd Butler Russell Barker Fisher Stevens Jenkins Murray Dixon Harvey Graham Pearson Ahmed Fletcher
Walsh Kaur Gibson Howard Andrews Stewart Elliott Reynolds Saunders Payne Fox Ford Pearce Day Brooks West
Lawrence Cole Atkinson Bradley Spencer Gill Dawson Ball Burton O'Brien Watts Rose Booth Perry Ryan Grant
Wells Armstrong Francis Rees Hayes Hart Hudson Newman Barrett Webster Hunter Gregory Carr Lowe Page Marsh
Riley Dunn Woods Parsons Berry Stone Reid Holland Hawkins Harding Porter Robertson Newton Oliver Reed
Kennedy Williamson Bird Gardner Shah Dean Lane Cooke Bates Henderson Parry Burgess Bishop Walton Burns
Nicholson Shepherd Ross Cross Long Freeman Warren Nicholls Hamilton Byrne Sutton McDonald Yates Hodgson
Robson Curtis Hopkins O'Connor Harper Coleman Watkins Moss McCarthy Chambers O'Neill Griffin Sharp Hardy
Wheeler Potter Osborne Johnston Gordon Doyle Wallace George Jordan Hutchinson Rowe Burke May Pritchard
Gilbert Willis Higgins Read Miles Stevenson Stephenson Hammond Arnold Buckley Walters Hewitt Barber
Nelson Slater Austin Sullivan Whitehead Mann Frost Lambert Stephens Blake Akhtar Lynch Goodwin Barton
Woodward Thomson Cunningham Quinn Barnett Baxter Bibi Clayton Nash Greenwood Jennings Holt Kemp Poole
Gallagher Bond Stokes Tucker Davidson Fowler Heath Norman Middleton Lawson Banks French Stanley Jarvis
Gibbs Ferguson Hayward Carroll Farrell Duncan Nowak Kowalski Wisniewski Lewandowski Okafor Mensah Osei
Adeyemi Okonkwo Boateng Asante Ibrahim Mohamed Hassan Rahman Islam Uddin Miah Chowdhury Hossain Iqbal
Malik Qureshi Sharma Kumar Gupta Mistry Joshi Desai Mehta Chauhan Bhatt Sandhu Dhillon Grewal Bains Nguyen
Tran Chen Wang Zhang Liu Wong Chan Kaya Yilmaz Demir Papadopoulos Rossi Ferrari Silva Santos Pereira Costa
Oliveira Fernandes Kaminski Novak Horvat Popescu Ionescu Dimitrov Ivanova Petrov O'Sullivan McLaughlin
McKenzie MacLeod Fraser Sinclair Munro Cameron Douglas Llewellyn Pugh Vaughan Prosser Bevan Howells
Meredith Rowlands Gwynne Cadwallader Trevelyan Penrose Tremayne Pascoe Nankivell Hussey Ashworth Blackburn
Whitfield Hargreaves Butterworth Ramsbottom Sidebottom Crabtree Haworth Pickering Hebden Kershaw
Greenhalgh Openshaw Entwistle Brierley Duckworth Fairclough Atherton Sowerby Thwaite Metcalfe Dinsdale
Calvert Featherstone Armitage Boothroyd Ackroyd Hirst Illingworth Sutcliffe Wainwright Womack Yardley
Zaman Zielinski Xu Upton Underwood Vickers Vincent Verma Quigley Quayle Ingram Irving Ives Eaton Emery
Everett Abbott Ashton Acton Aziz Kowalczyk Oduya Agyeman Danso Nkemelu Eze Obi Adebayo Ogunleye Balogun
""".split()))
GIVEN = {
    "female": tuple("""
Olivia Amelia Isla Ava Mia Ivy Lily Isabella Rosie Sophia Grace Freya Willow Florence Emily Ella Poppy
Evie Elsie Charlotte Evelyn Sienna Sofia Daisy Phoebe Sophie Alice Harper Matilda Ruby Emilia Maya Millie
Isabelle Eva Margaret Patricia Susan Janet Christine Carol Elizabeth Mary Joan Eileen Doreen Irene
Barbara Jean Pauline Helen Sarah Claire Rachel Emma Laura Rebecca Nicola Joanne Kelly Aisha Fatima
Zainab Maryam Priya Nisha Anjali Simran Harpreet Agnieszka Katarzyna Magdalena Chloe Amara Chiamaka
Abena Adaeze Siobhan Niamh Aoife Bethan Cerys Catrin Megan Rhiannon Ffion Hannah Jessica Lauren
""".split()),
    "male": tuple("""
Oliver George Noah Arthur Muhammad Leo Harry Oscar Archie Henry Theodore Freddie Jack Charlie Theo Alfie
Jacob Thomas Finley Arlo William Lucas Roman Tommy Isaac Teddy Alexander Luca Edward James Joshua Albert
Max Mason Ethan Harrison Benjamin Reggie Ronnie Sebastian David John Michael Peter Paul Robert Richard
Stephen Andrew Mark Christopher Anthony Kevin Gary Brian Keith Colin Derek Trevor Graham Mohammed Ahmed
Imran Bilal Hamza Omar Yusuf Arjun Ravi Vikram Harjit Gurpreet Rajesh Sanjay Tomasz Piotr Krzysztof
Jakub Kwame Kofi Chidi Emeka Oluwaseun Tunde Sean Ciaran Declan Patrick Rhys Dafydd Gareth Owain Iwan
Callum Ewan Angus Hamish
""".split()),
    "other": ("Alex", "Sam", "Jordan", "Charlie", "Robin", "Jamie", "Riley", "Morgan"),
    "unknown": ("Alex", "Sam", "Jordan", "Charlie", "Robin", "Jamie", "Riley", "Morgan"),
}
GENDER_ROLLS = ((0.49, "female"), (0.98, "male"), (0.99, "other"), (1.0, "unknown"))
STREETS = ("Acacia Avenue", "Elm Grove", "Station Road", "Church Lane", "Victoria Road", "Park View",
           "Queens Walk", "Mill Lane", "Cedar Close", "Orchard Way", "Kingsley Road", "Meadow Rise",
           "High Street", "Albert Road", "Green Lane", "Manor Road", "The Crescent", "Springfield Road",
           "Windsor Avenue", "Grange Road", "Chapel Street", "Brook Lane", "Heath Road", "Larch Drive")
# (town, postcode districts): England and Wales, where NHS numbers are issued.
TOWNS = (
    ("London", ("W13", "NW10", "SE15", "E17", "N1", "SW9", "E1", "N17", "SE1", "W6")),
    ("Manchester", ("M14", "M20", "M8", "M13")), ("Birmingham", ("B15", "B29", "B11", "B23")),
    ("Leeds", ("LS6", "LS11", "LS8")), ("Liverpool", ("L8", "L15", "L4")), ("Sheffield", ("S10", "S2", "S8")),
    ("Bristol", ("BS3", "BS7", "BS5")), ("Newcastle upon Tyne", ("NE1", "NE6", "NE4")),
    ("Nottingham", ("NG7", "NG3")), ("Leicester", ("LE2", "LE4")), ("Coventry", ("CV1", "CV6")),
    ("Bradford", ("BD7", "BD3")), ("Cardiff", ("CF10", "CF24", "CF5")), ("Swansea", ("SA1", "SA2")),
    ("Plymouth", ("PL4", "PL1")), ("Southampton", ("SO14", "SO15")), ("Norwich", ("NR2", "NR3")),
    ("York", ("YO10", "YO31")), ("Hull", ("HU5", "HU3")), ("Exeter", ("EX4", "EX1")),
    ("Brighton", ("BN1", "BN2")), ("Reading", ("RG1", "RG30")), ("Oxford", ("OX4", "OX1")),
    ("Cambridge", ("CB1", "CB4")), ("Derby", ("DE1", "DE22")), ("Stoke-on-Trent", ("ST4", "ST1")),
    ("Sunderland", ("SR2",)), ("Preston", ("PR1",)), ("Bolton", ("BL1",)), ("Lincoln", ("LN1",)),
    ("Ipswich", ("IP1",)), ("Wrexham", ("LL11",)), ("Carlisle", ("CA1",)),
)
POSTCODE_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # inward-code letters
PRACTICE_KINDS = ("Surgery", "Medical Centre", "Health Centre", "Medical Practice", "Family Practice")
ENCOUNTER_TYPES = (("11429006", "Consultation"), ("185317003", "Telephone encounter"),
                   ("390906007", "Follow-up encounter"))
TEAM_ROLES = (("62247001", "General practitioner"), ("224535009", "Registered nurse"),
              ("106328005", "Social worker"))


def _rng(seed: int, *key: object) -> random.Random:
    return random.Random(":".join(map(str, (seed, *key))))  # str seeds hash with SHA-512: stable


def nhs_number(n: int) -> str:
    """A unique valid 999-range NHS number for patient n (n < 900,000): nine patients share each
    eight-digit stem, each taking a different ninth digit that admits a Modulus 11 check digit."""
    stem_index, slot = divmod(n, 9)
    stem = f"999{(stem_index * 7919 + 12345) % 100_000:05d}"  # 7919 is prime to 10^5: a bijection
    ninth = [d for d in "0123456789" if nhs_check_digit(stem + d) is not None][slot]
    return f"{stem}{ninth}{nhs_check_digit(stem + ninth)}"


@dataclass(frozen=True)
class Person:
    """What the benchmark needs to know about one patient, generated from (seed, n) alone."""

    n: int
    family: str
    given: str
    gender: str
    birth: date
    nhs: str
    org: int
    team: tuple[int, ...]  # practitioner numbers in the CareTeam
    encounters: tuple[tuple[datetime, int, int], ...]  # (start, minutes, practitioner), index = e{i}
    phone: str
    line: str
    postcode: str


def person(seed: int, n: int) -> Person:
    rng = _rng(seed, "patient", n)
    roll = rng.random()
    gender = next(g for bound, g in GENDER_ROLLS if roll < bound)
    family, given = rng.choice(FAMILY), rng.choice(GIVEN[gender])
    birth = BIRTH_FROM + timedelta(days=rng.randrange((BIRTH_TO - BIRTH_FROM).days + 1))
    org = rng.randrange(N_ORGS)
    own = rng.sample(range(N_PRACTITIONERS // N_ORGS), 2)
    team = [org + N_ORGS * m for m in own]
    while len(team) < 3:  # one more from anywhere: community nurse, social worker
        j = rng.randrange(N_PRACTITIONERS)
        if j not in team:
            team.append(j)
    days = rng.sample(range(ENCOUNTER_DAYS), rng.randint(*ENCOUNTERS_PER_PATIENT))  # distinct days
    encounters = tuple((ENCOUNTERS_FROM + timedelta(days=d, hours=rng.randint(8, 17), minutes=rng.randrange(0, 60, 5)),
                        rng.choice((10, 15, 20, 30)), rng.choice(team[:2])) for d in days)
    _, districts = TOWNS[org % len(TOWNS)]
    postcode = (f"{rng.choice(districts)} {rng.randint(1, 9)}"
                f"{rng.choice(POSTCODE_LETTERS)}{rng.choice(POSTCODE_LETTERS)}")
    return Person(n, family, given, gender, birth, nhs_number(n), org, tuple(team), encounters,
                  f"07700 900{rng.randrange(1000):03d}", f"{rng.randint(1, 250)} {rng.choice(STREETS)}", postcode)


def _instant(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def patient_resources(p: Person) -> list[dict[str, Any]]:
    """Patient, Encounters, CareTeam and CarePlan of one person (valid FHIR R4)."""
    town, _ = TOWNS[p.org % len(TOWNS)]
    pid = f"p{p.n}"
    out: list[dict[str, Any]] = [{
        "resourceType": "Patient", "id": pid,
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": p.nhs}],
        "active": True,
        "name": [{"use": "official", "family": p.family, "given": [p.given]}],
        "telecom": [{"system": "phone", "value": p.phone, "use": "mobile"}],
        "gender": p.gender,
        "birthDate": p.birth.isoformat(),
        "address": [{"use": "home", "line": [p.line], "city": town, "postalCode": p.postcode, "country": "GB"}],
        "generalPractitioner": [{"reference": f"Organization/org{p.org}"}],
    }]
    for i, (start, minutes, pr) in enumerate(p.encounters):
        code, display = ENCOUNTER_TYPES[i % len(ENCOUNTER_TYPES)]
        out.append({
            "resourceType": "Encounter", "id": f"{pid}-e{i}", "status": "finished",
            "class": {"system": V3_ACT_CODE, "code": "AMB", "display": "ambulatory"},
            "type": [{"coding": [{"system": SNOMED, "code": code, "display": display}]}],
            "subject": {"reference": f"Patient/{pid}"},
            "participant": [{"individual": {"reference": f"Practitioner/pr{pr}"}}],
            "period": {"start": _instant(start), "end": _instant(start + timedelta(minutes=minutes))},
            "serviceProvider": {"reference": f"Organization/org{p.org}"},
        })
    out.append({
        "resourceType": "CareTeam", "id": f"ct{p.n}", "status": "active",
        "name": f"Care team for {p.given} {p.family}",
        "subject": {"reference": f"Patient/{pid}"},
        "participant": [{"role": [{"coding": [{"system": SNOMED, "code": TEAM_ROLES[k][0],
                                               "display": TEAM_ROLES[k][1]}]}],
                         "member": {"reference": f"Practitioner/pr{j}"}} for k, j in enumerate(p.team)],
        "managingOrganization": [{"reference": f"Organization/org{p.org}"}],
    })
    out.append({
        "resourceType": "CarePlan", "id": f"cp{p.n}", "status": "active", "intent": "plan",
        "title": "Personalised care and support plan",
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": p.encounters[0][0].date().isoformat()},
        "careTeam": [{"reference": f"CareTeam/ct{p.n}"}],
    })
    return out


def fixed_resources(seed: int) -> list[dict[str, Any]]:
    """The GP practices and the practitioners, loaded before the patients."""
    out: list[dict[str, Any]] = []
    for k in range(N_ORGS):
        rng = _rng(seed, "org", k)
        town, districts = TOWNS[k % len(TOWNS)]
        street = rng.choice(STREETS)
        out.append({
            "resourceType": "Organization", "id": f"org{k}", "active": True,
            "identifier": [{"system": ODS_SYSTEM, "value": f"Y{90000 + k:05d}"}],
            "type": [{"coding": [{"system": ORG_TYPE_SYSTEM, "code": "prov", "display": "Healthcare Provider"}]}],
            "name": f"{street.split()[0]} {rng.choice(PRACTICE_KINDS)} ({town})",
            "address": [{"line": [f"{rng.randint(1, 120)} {street}"], "city": town,
                         "postalCode": f"{rng.choice(districts)} {rng.randint(1, 9)}"
                                       f"{rng.choice(POSTCODE_LETTERS)}{rng.choice(POSTCODE_LETTERS)}",
                         "country": "GB"}],
        })
    for j in range(N_PRACTITIONERS):
        rng = _rng(seed, "practitioner", j)
        gender = rng.choice(("female", "male"))
        out.append({
            "resourceType": "Practitioner", "id": f"pr{j}", "active": True,
            "identifier": [{"system": GMC_SYSTEM, "value": f"{7_000_000 + j}"}],
            "name": [{"family": rng.choice(FAMILY), "given": [rng.choice(GIVEN[gender])], "prefix": ["Dr"]}],
            "gender": gender,
        })
    return out


class Population:
    """Everything the checks need, recomputed from the seed (the loader's workers generate the same)."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed, self.size = seed, size
        self.people = [person(seed, n) for n in range(size)]
        self.families = Counter(normalise(p.family) for p in self.people)
        self.births = sorted(p.birth for p in self.people)
        self.by_practitioner: dict[int, set[int]] = defaultdict(set)
        for p in self.people:
            for j in p.team:
                self.by_practitioner[j].add(p.n)
        self.resources = N_ORGS + N_PRACTITIONERS + sum(3 + len(p.encounters) for p in self.people)

    def family_count(self, prefix: str) -> int:
        norm = normalise(prefix)
        return sum(c for fam, c in self.families.items() if fam.startswith(norm))

    def birth_count(self, lo: date, hi: date) -> int:
        return bisect.bisect_left(self.births, hi) - bisect.bisect_left(self.births, lo)


# -- the code under test ---------------------------------------------------------------------------------

def code_fingerprint() -> dict[str, str]:
    """Where the server code comes from, its git HEAD, and a hash of its source as it is on disk now.
    Others commit to this checkout while benchmarks run: a run whose code changed half-way measured
    two servers. (To measure one commit regardless, run from an exported copy: see the docstring.)"""
    root = Path(fhir_server.__file__).resolve().parent.parent  # the copy this process imports
    digest = hashlib.sha256()
    for top in CODE_DIRS:
        for f in sorted((root / top).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".json", ".ini", ".mako") and "__pycache__" not in f.parts:
                digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *CODE_DIRS],
                           capture_output=True, text=True)
    marker = root / "COMMIT"  # an exported copy may say which commit it is
    return {"root": str(root),
            "git_head": head.stdout.strip() if head.returncode == 0 else
            f"export of {marker.read_text().strip()}" if marker.exists() else "not a git checkout",
            "uncommitted_changes": head.returncode == 0 and bool(dirty.stdout.strip()),
            "source_sha256": digest.hexdigest()[:16]}


def check_code(run: dict[str, Any], when: str) -> None:
    now = code_fingerprint()
    run.setdefault("code_checks", []).append({"when": when, **now})
    if now["source_sha256"] != run["code"]["source_sha256"]:
        run["code_changed"] = True
        log(f"\n!!! the server code changed during this run ({when}: {run['code']['git_head']} -> "
            f"{now['git_head']}): its figures mix two versions !!!\n")


# -- loading ---------------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _worker_init(url: str, seed: int, validate: bool) -> None:
    engine = create_engine(url)
    _worker.update(service=FhirService(Store(engine)), seed=seed, validate=validate)


def _worker_load(span: tuple[int, int]) -> int:
    batch = [r for n in range(*span) for r in patient_resources(person(_worker["seed"], n))]
    return _worker["service"].bulk_put(batch, validate=_worker["validate"])


def load(url: str, pop: Population, args: argparse.Namespace) -> dict[str, Any]:
    """Fill the database; returns the load figures."""
    engine = create_engine(url)
    migrate(engine)
    service = FhirService(Store(engine))
    service.reindex_if_needed()  # empty: marks the index as built by this version
    validate = not args.no_validate
    started = time.perf_counter()
    fixed = fixed_resources(pop.seed)
    for i in range(0, len(fixed), 1000):
        service.bulk_put(fixed[i:i + 1000], validate=validate)
    engine.dispose()
    fixed_s = time.perf_counter() - started

    per_batch = max(1, args.batch // 10)  # ~10 resources per patient
    spans = [(s, min(s + per_batch, pop.size)) for s in range(0, pop.size, per_batch)]
    done, next_report, t0 = 0, 0.1, time.perf_counter()
    patients_total = pop.resources - len(fixed)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.processes, initializer=_worker_init, initargs=(url, pop.seed, validate)) as pool:
        for count in pool.imap_unordered(_worker_load, spans):
            done += count
            if done / patients_total >= next_report:
                elapsed = time.perf_counter() - t0
                log(f"  loaded {done:,}/{patients_total:,} patient resources, {done / elapsed:,.0f}/s")
                next_report += 0.1
    patients_s = time.perf_counter() - t0
    total_s = time.perf_counter() - started
    if done != patients_total:
        raise BenchError(f"loader stored {done} patient resources, expected {patients_total}")
    return {"resources": pop.resources, "fixed_resources": len(fixed), "patient_resources": patients_total,
            "seconds": round(total_s, 1), "resources_per_s": round(pop.resources / total_s),
            "patient_phase_seconds": round(patients_s, 1),
            "patient_phase_resources_per_s": round(patients_total / patients_s),
            "fixed_phase_seconds": round(fixed_s, 1), "validate": validate, "processes": args.processes,
            "batch_resources": args.batch}


def after_load(url: str, db: str, pop: Population, args: argparse.Namespace) -> dict[str, Any]:
    """Count what was stored (must be everything), settle the database, measure its size."""
    engine = create_engine(url)
    facts: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            counts = dict(conn.execute(sa.select(resource.c.type, sa.func.count()).group_by(resource.c.type)).all())
        expected = Counter({"Organization": N_ORGS, "Practitioner": N_PRACTITIONERS, "Patient": pop.size,
                            "CareTeam": pop.size, "CarePlan": pop.size,
                            "Encounter": sum(len(p.encounters) for p in pop.people)})
        if counts != dict(expected):
            raise BenchError(f"stored resources {counts} differ from the population {dict(expected)}")
        facts["counts"] = counts
        t0 = time.perf_counter()
        if db == "postgresql":
            # ANALYZE for the planner; VACUUM sets hint bits and the visibility map now rather than
            # letting autovacuum do it in the middle of the measurements.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
                facts["size_bytes"] = int(conn.exec_driver_sql(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                    "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'").scalar() or 0)
            facts["settle"] = "VACUUM ANALYZE"
        else:
            raw = engine.raw_connection()
            try:
                if args.sqlite_analyze:
                    raw.execute("ANALYZE")
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                has_stats = raw.execute("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()[0]
                stats = raw.execute("SELECT count(*) FROM sqlite_stat1").fetchone()[0] if has_stats else 0
            finally:
                raw.close()
            facts["sqlite_stat1_rows"] = stats
            facts["settle"] = ("full ANALYZE by the bench" if args.sqlite_analyze else
                               f"no ANALYZE by the bench; sqlite_stat1 has {stats} rows (from the server's own ANALYZE)"
                               if stats else "no ANALYZE by the bench; no statistics")
            path = Path(engine.url.database or "")
            facts["size_bytes"] = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
        facts["settle_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        engine.dispose()
    return facts


# -- databases and the server ---------------------------------------------------------------------------

@contextlib.contextmanager
def database(db: str, patients: int, workdir: Path, args: argparse.Namespace) -> Iterator[str]:
    """A fresh, empty database; removed afterwards unless --keep."""
    if db == "sqlite":
        path = workdir / f"search-{patients}.db"
        for f in workdir.glob(path.name + "*"):
            f.unlink()
        try:
            yield f"sqlite:///{path}"
        finally:
            if args.keep:
                log(f"kept {path}")
            else:
                for f in workdir.glob(path.name + "*"):
                    f.unlink()
        return
    schema = f"bench_search_{patients}_{secrets.token_hex(3)}"
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{args.pg}?options=-csearch_path%3D{schema}"
    finally:
        if args.keep:
            log(f"kept PostgreSQL schema {schema}")
        else:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def carebroker_command() -> str:
    found = shutil.which("carebroker", path=str(Path(sys.executable).parent)) or shutil.which("carebroker")
    if found is None:
        raise SystemExit("carebroker CLI not found: run this script with the project's virtualenv python")
    return found


@contextlib.contextmanager
def server(url: str, workers: int, log_path: Path) -> Iterator[str]:
    """`carebroker serve` on the database; yields the FHIR base once /fhir/metadata answers."""
    port = free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([carebroker_command(), "serve", "--port", str(port), "--database", url,
                                 "--workers", str(workers), "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        deadline, answered = time.monotonic() + 180, 0
        while answered < 5:  # a few answers: with 2 workers, give the second a chance to be up too
            if proc.poll() is not None:
                raise BenchError(f"carebroker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"carebroker did not answer within 180 s:\n{log_path.read_text()[-3000:]}")
            try:
                answered += httpx.get(f"{base}/metadata", timeout=5).status_code == 200
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the searches and their checks ----------------------------------------------------------------------

class BenchError(Exception):
    """A wrong answer or a failed step: the figures would be worthless."""


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


LUA_WRK = r"""
local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
  thread:set("tid", #threads)
end

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

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non_2xx_3xx":%d,"socket_errors":%d}\n',
    "MARK", summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
""".replace("MARK", RESULT_MARK)


def run_wrk(base: str, queries: list[Query], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    script, urls = workdir / "search.lua", workdir / "urls.txt"
    script.write_text(LUA_WRK)
    prefix = httpx.URL(base).path
    urls.write_text("".join(f"{prefix}/{q.path}\n" for q in queries))
    cmd = ["wrk", f"-t{args.wrk_threads}", f"-c{args.wrk_connections}", f"-d{args.wrk_seconds}s",
           "--timeout", "10s", "-s", str(script), base.rsplit("/fhir", 1)[0], "--", str(urls)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    r = json.loads(line.removeprefix(RESULT_MARK))
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

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_one(db: str, pop: Population, workdir: Path, args: argparse.Namespace,
              code: dict[str, str]) -> dict[str, Any]:
    """`code`: the fingerprint when this script started (and imported the server code it runs in-process)."""
    run: dict[str, Any] = {"db": db, "patients": pop.size, "seed": pop.seed, "code": code,
                           "code_changed": False,
                           "load_average_before": Path("/proc/loadavg").read_text().split()[:3]}
    with database(db, pop.size, workdir, args) as url:
        log(f"[{db} {pop.size:,}] loading {pop.resources:,} resources "
            f"({'validated' if not args.no_validate else 'not validated'}, {args.processes} processes)")
        run["load"] = load(url, pop, args)
        log(f"[{db} {pop.size:,}] loaded in {run['load']['seconds']} s: {run['load']['resources_per_s']:,} resources/s")
        run["database"] = after_load(url, db, pop, args)
        log(f"[{db} {pop.size:,}] settled ({run['database']['settle']}, {run['database']['settle_seconds']} s), "
            f"size {run['database']['size_bytes'] / 1e6:,.0f} MB")

        check_code(run, "after loading")
        rng = _rng(pop.seed, "queries", db, pop.size)
        n_latency = args.warmup + args.requests
        run["searches"] = {}
        with server(url, args.workers, workdir / f"server-{db}-{pop.size}.log") as base:
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
            plan_rng = _rng(pop.seed, "plans", db, pop.size)
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

def machine_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model.group(1) if model else "unknown",
            "python": platform.python_version(), "platform": platform.platform(),
            "wrk": (wrk.stdout or wrk.stderr).splitlines()[0], "shared_machine": True}


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
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--workdir", type=Path, help="where the SQLite files go (default: a new temporary directory)")
    parser.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL database in which a fresh schema is made per run")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite files and PostgreSQL schemas")
    parser.add_argument("--no-validate", action="store_true", help="bulk_put(validate=False): skip fhir.resources")
    parser.add_argument("--processes", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--batch", type=int, default=1000, help="about this many resources per bulk_put")
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
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
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    if unknown := [d for d in dbs if d not in ("sqlite", "postgresql")]:
        parser.error(f"unknown database(s) {unknown}")
    if max(scales) > MAX_PATIENTS:
        parser.error(f"at most {MAX_PATIENTS:,} patients (NHS numbers would repeat)")
    RESULTS.mkdir(exist_ok=True)
    facts = machine_facts()
    code = code_fingerprint()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        elif args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="carebroker-search-"))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="carebroker-search-")))
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
