"""What the benchmarks share: a seeded synthetic UK population, loaded in-process through
`FhirService.bulk_put` by a pool of worker processes; fresh databases; `carebroker serve`; the
machine and code facts every result records.

The population: about 10 resources per patient (Patient, 4-10 Encounters, a CareTeam and a CarePlan),
plus 200 GP practices and 2,000 practitioners; nobody real (NHS numbers from the 999 test range).
Its policy variant (`Population(..., policy=True)`, for the access-policy runs) adds what the
policy reads: every record entry names its custodian (the patient's GP practice), and about 5% of
patients have a Consent (opt-outs, some with nested permits or a nested deny; National Data Opt-outs).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import sqlalchemy as sa
from joserfc import jwt
from joserfc.jwk import RSAKey

import fhir_server
from conformance.nhs_number import NHS_NUMBER_SYSTEM, nhs_check_digit
from fhir_server.search.values import normalise
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine, migrate
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import resource

RESULTS = Path(__file__).resolve().parent / "results"
CODE_DIRS = ("fhir_server", "conformance", "consent")  # what the loader, the server and the plans run
PG_DEFAULT = "postgresql+psycopg://127.0.0.1:5432/test"

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

# -- the policy variant: custodians and Consents (consent/facts.py reads them) ---------------------
CUSTODIAN_SYSTEM = "https://carebroker.example/CodeSystem/custodian"  # consent.facts.CUSTODIAN_SYSTEM
CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
NDOO_CODE = "827241000000103"  # Type 1 dissent: secondary use only
# (kind, share of patients): drawn per patient from its own seeded stream, so adding them changes
# nothing else of the population.
CONSENT_KINDS = (
    ("opt-out", 0.02),  # OPTOUT: nothing of theirs leaves the custodian organisation
    ("opt-out-careteam", 0.01),  # ... except to their care team (a nested permit naming CareTeam/ct<n>)
    ("opt-out-named-gp", 0.005),  # ... except to one named GP (a nested permit naming Practitioner/pr<team[0]>)
    ("no-encounters-2016-2018", 0.005),  # OPTIN, with a nested deny of Encounters dated 2016-2018
    ("ndoo", 0.01),  # National Data Opt-out (Type 1): a deny for research purposes only
)
ENCOUNTER_DENY_FROM, ENCOUNTER_DENY_TO = date(2016, 1, 1), date(2018, 12, 31)  # dataPeriod, inclusive


def seeded_rng(seed: int, *key: object) -> random.Random:
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
    consent: str | None = None  # one of CONSENT_KINDS, or none (used by the policy variant only)


def person(seed: int, n: int) -> Person:
    rng = seeded_rng(seed, "patient", n)
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
                  f"07700 900{rng.randrange(1000):03d}", f"{rng.randint(1, 250)} {rng.choice(STREETS)}", postcode,
                  consent_kind(seed, n))


def consent_kind(seed: int, n: int) -> str | None:
    roll, bound = seeded_rng(seed, "consent", n).random(), 0.0
    for kind, share in CONSENT_KINDS:
        bound += share
        if roll < bound:
            return kind
    return None


def _instant(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def patient_resources(p: Person, policy: bool = False) -> list[dict[str, Any]]:
    """Patient, Encounters, CareTeam and CarePlan of one person (valid FHIR R4). `policy`: each
    names its custodian (the GP practice). (The person's Consent, if any: `consent_resource`.)"""
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
    return [_with_custodian(r, p) for r in out] if policy else out


def _with_custodian(r: dict[str, Any], p: Person) -> dict[str, Any]:
    return {**r, "meta": {"tag": [{"system": CUSTODIAN_SYSTEM, "code": f"Organization/org{p.org}"}]}}


def consent_resource(p: Person) -> dict[str, Any]:
    """The person's privacy Consent (see CONSENT_KINDS), shaped as the policy tests' Consents."""
    def actor(ref: str) -> dict[str, Any]:
        return {"role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]}, "reference": {"reference": ref}}

    rule, category = "OPTOUT", {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}
    provision: dict[str, Any] | None = None
    if p.consent == "opt-out-careteam":
        provision = {"type": "deny", "provision": [{"type": "permit", "actor": [actor(f"CareTeam/ct{p.n}")]}]}
    elif p.consent == "opt-out-named-gp":
        provision = {"type": "deny", "provision": [{"type": "permit", "actor": [actor(f"Practitioner/pr{p.team[0]}")]}]}
    elif p.consent == "no-encounters-2016-2018":
        rule = "OPTIN"
        provision = {"type": "permit", "provision": [{
            "type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Encounter"}],
            "dataPeriod": {"start": ENCOUNTER_DENY_FROM.isoformat(), "end": ENCOUNTER_DENY_TO.isoformat()}}]}
    elif p.consent == "ndoo":
        category = {"coding": [{"system": SNOMED, "code": NDOO_CODE}]}
        provision = {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HRESCH"}]}
    body: dict[str, Any] = {
        "resourceType": "Consent", "id": f"consent{p.n}", "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [category], "patient": {"reference": f"Patient/p{p.n}"},
        "dateTime": p.encounters[0][0].date().isoformat(),
        "policyRule": {"coding": [{"system": V3_ACT_CODE, "code": rule}]},
    }
    if provision is not None:
        body["provision"] = provision
    return _with_custodian(body, p)


def fixed_resources(seed: int) -> list[dict[str, Any]]:
    """The GP practices and the practitioners, loaded before the patients."""
    out: list[dict[str, Any]] = []
    for k in range(N_ORGS):
        rng = seeded_rng(seed, "org", k)
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
        rng = seeded_rng(seed, "practitioner", j)
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

    def __init__(self, seed: int, size: int, policy: bool = False) -> None:
        self.seed, self.size, self.policy = seed, size, policy  # policy: the variant (see the module docstring)
        self.people = [person(seed, n) for n in range(size)]
        self.families = Counter(normalise(p.family) for p in self.people)
        self.births = sorted(p.birth for p in self.people)
        self.by_practitioner: dict[int, set[int]] = defaultdict(set)
        for p in self.people:
            for j in p.team:
                self.by_practitioner[j].add(p.n)
        self.resources = N_ORGS + N_PRACTITIONERS + sum(3 + len(p.encounters) for p in self.people)
        self.consents = sum(p.consent is not None for p in self.people) if policy else 0
        self.resources += self.consents

    def expected_counts(self) -> dict[str, int]:
        """Resources per type, as stored."""
        counts = {"Organization": N_ORGS, "Practitioner": N_PRACTITIONERS, "Patient": self.size,
                  "CareTeam": self.size, "CarePlan": self.size,
                  "Encounter": sum(len(p.encounters) for p in self.people)}
        if self.consents:
            counts["Consent"] = self.consents
        return counts

    def describe(self) -> dict[str, Any]:
        """What identifies the population (a reused database must hold the same one)."""
        return {"seed": self.seed, "patients": self.size, "policy": self.policy, "resources": self.resources}

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


def _worker_init(url: str, seed: int, validate: bool, policy: bool = False) -> None:
    engine = create_engine(url)
    _worker.update(service=FhirService(Store(engine)), seed=seed, validate=validate, policy=policy)


def _worker_load(span: tuple[int, int]) -> int:
    batch = [r for n in range(*span) for r in patient_resources(person(_worker["seed"], n), _worker["policy"])]
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
    with ctx.Pool(args.processes, initializer=_worker_init, initargs=(url, pop.seed, validate, pop.policy)) as pool:
        for count in pool.imap_unordered(_worker_load, spans):
            done += count
            if done / patients_total >= next_report:
                elapsed = time.perf_counter() - t0
                log(f"  loaded {done:,}/{patients_total:,} patient resources, {done / elapsed:,.0f}/s")
                next_report += 0.1
    patients_s = time.perf_counter() - t0
    consents_s = 0.0
    if pop.policy:
        t1 = time.perf_counter()
        done += put_consents(url, [p for p in pop.people if p.consent], validate)
        consents_s = time.perf_counter() - t1
    total_s = time.perf_counter() - started
    if done != patients_total:
        raise BenchError(f"loader stored {done} patient resources, expected {patients_total}")
    return {"resources": pop.resources, "fixed_resources": len(fixed), "patient_resources": patients_total,
            "seconds": round(total_s, 1), "resources_per_s": round(pop.resources / total_s),
            "patient_phase_seconds": round(patients_s, 1),
            "patient_phase_resources_per_s": round((patients_total - pop.consents) / patients_s),
            "fixed_phase_seconds": round(fixed_s, 1), "validate": validate, "processes": args.processes,
            "batch_resources": args.batch, **({"consent_phase_seconds": round(consents_s, 1)} if pop.policy else {})}


def put_consents(url: str, people: list[Person], validate: bool) -> int:
    """The Consents of the policy variant, after the patients they are about, in bulk_put batches of
    up to about 1,000 that each hold at least one Consent with condition terms (actor, class,
    purpose): a batch whose Consents have none fails, because `Store.insert_many` then executes an
    empty batch of policy_consent_term rows as `INSERT ... DEFAULT VALUES` (NOT NULL constraint).
    If there is no such Consent at all, they go one by one through `update`."""
    engine = create_engine(url)
    service = FhirService(Store(engine))
    try:
        termed = [consent_resource(p) for p in people if p.consent != "opt-out"]
        plain = [consent_resource(p) for p in people if p.consent == "opt-out"]
        if not termed:
            for body in plain:
                service.update("Consent", body["id"], body)
            return len(plain)
        k = min(len(termed), -(-(len(termed) + len(plain)) // 1000))
        return sum(service.bulk_put(termed[i::k] + plain[i::k], validate=validate) for i in range(k))
    finally:
        engine.dispose()


def after_load(url: str, db: str, pop: Population, args: argparse.Namespace) -> dict[str, Any]:
    """Count what was stored (must be everything), settle the database, measure its size."""
    engine = create_engine(url)
    facts: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            counts = dict(conn.execute(sa.select(resource.c.type, sa.func.count()).group_by(resource.c.type)).all())
        expected = pop.expected_counts()
        if counts != expected:
            raise BenchError(f"stored resources {counts} differ from the population {expected}")
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
def database(db: str, name: str, workdir: Path, args: argparse.Namespace) -> Iterator[str]:
    """A fresh, empty database named after the run (`search-10000`); removed afterwards unless --keep.
    With `args.reuse` (scripts that offer --reuse): the database of that name is kept across runs
    (the SQLite file `<workdir>/<name>.db`, the PostgreSQL schema `bench_<name>_kept`), made empty if
    it does not exist yet; the caller checks what it holds (see `stored_population`)."""
    reuse = getattr(args, "reuse", False)
    if db == "sqlite":
        path = workdir / f"{name}.db"
        if not reuse:
            for f in workdir.glob(path.name + "*"):
                f.unlink()
        try:
            yield f"sqlite:///{path}"
        finally:
            if args.keep or reuse:
                log(f"kept {path}")
            else:
                for f in workdir.glob(path.name + "*"):
                    f.unlink()
        return
    schema = f"bench_{name.replace('-', '_')}_" + ("kept" if reuse else secrets.token_hex(3))
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {'IF NOT EXISTS ' if reuse else ''}{schema}")
    try:
        yield f"{args.pg}?options=-csearch_path%3D{schema}"
    finally:
        if args.keep or reuse:
            log(f"kept PostgreSQL schema {schema}")
        else:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def population_marker(url: str, workdir: Path) -> Path:
    """The file beside a reused database that says which population was loaded into it."""
    tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    return workdir / f"population-{tag}.json"


def stored_population(url: str, workdir: Path, pop: Population) -> dict[str, Any] | None:
    """For --reuse: the load figures of the run that loaded `pop` into the database (then loading is
    skipped), or None if it is empty; a BenchError if it holds something else or an unfinished load."""
    engine = create_engine(url)
    try:
        if not sa.inspect(engine).has_table("resource"):
            return None
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(resource)).scalar_one()
    finally:
        engine.dispose()
    if stored == 0:
        return None
    marker = population_marker(url, workdir)
    found = json.loads(marker.read_text()) if marker.exists() else {}
    if found.get("population") != pop.describe() or stored != pop.resources:
        raise BenchError(f"--reuse: {url} holds {stored:,} resources of {found.get('population') or 'an unknown population'}, "
                         f"not {pop.describe()}: remove it, or run without --reuse")
    return {**found["load"], "reused": True}


def remember_population(url: str, workdir: Path, pop: Population, load_figures: dict[str, Any]) -> None:
    """For --reuse: note which population a database holds, and how its load went."""
    population_marker(url, workdir).write_text(json.dumps({"population": pop.describe(), "load": load_figures}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def carebroker_command() -> str:
    found = shutil.which("carebroker", path=str(Path(sys.executable).parent)) or shutil.which("carebroker")
    if found is None:
        raise SystemExit("carebroker CLI not found: run this script with the project's virtualenv python")
    return found


class Server(NamedTuple):
    base: str  # the FHIR base URL
    pid: int  # the `carebroker serve` process (uvicorn's workers are its children)


@contextlib.contextmanager
def server(url: str, workers: int, log_path: Path, env: dict[str, str] | None = None,
           issuer: BenchIssuer | None = None) -> Iterator[Server]:
    """`carebroker serve` on the database (`env`: extra environment); yields it once /fhir/metadata answers.
    It runs with `--auth off` (these benchmarks time the FHIR engine, and their clients send no
    tokens; bench/rest.py measures what token checks cost) unless `issuer` is given: then with token
    checks, trusting that issuer, and every request must carry one of its tokens."""
    port = free_port()
    env = {**os.environ, **(env or {})}
    auth = ["--auth", "off"]
    if issuer is not None:
        env["CAREBROKER_TRUSTED_ISSUERS"], auth = issuer.trusted_issuers(), []
    with open(log_path, "w") as out:
        proc = subprocess.Popen([carebroker_command(), "serve", "--port", str(port), "--database", url,
                                 "--workers", str(workers), "--log-level", "warning", *auth],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
        yield Server(base, proc.pid)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets uvicorn stop its workers; SIGKILL to the server's own process group if it hangs."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn's workers are children of the server process)."""
    pids = [pid]
    for parent in pids:  # grows while we walk it
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(child) for child in children.read_text().split()]
    return pids


class BenchIssuer:
    """A token issuer for a run: an RSA key made for it, its JWKS in a file the server trusts through
    CAREBROKER_TRUSTED_ISSUERS, and a fixed audience (so tokens do not depend on the server's port)."""

    ISSUER = "https://bench.carebroker.invalid"
    AUDIENCE = "carebroker-bench"

    def __init__(self, workdir: Path) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "bench"})
        self.jwks = workdir / "bench-jwks.json"
        self.jwks.write_text(json.dumps({"keys": [self.key.as_dict(private=False)]}))

    def trusted_issuers(self) -> str:
        return json.dumps([{"issuer": self.ISSUER, "jwks": str(self.jwks), "audience": self.AUDIENCE}])

    def claims(self, **claims: Any) -> dict[str, Any]:
        """A token's claims, valid for a day; `claims` add to or replace the standard ones."""
        now = int(time.time())
        return {"iss": self.ISSUER, "aud": self.AUDIENCE, "iat": now, "exp": now + 86400,
                "jti": secrets.token_hex(8), **claims}

    def token(self, claims: dict[str, Any]) -> str:
        return jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": "bench"}, claims, self.key, algorithms=["RS256"])


class BenchError(Exception):
    """A wrong answer or a failed step: the figures would be worthless."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model.group(1) if model else "unknown",
            "python": platform.python_version(), "platform": platform.platform(),
            "wrk": (wrk.stdout or wrk.stderr).splitlines()[0], "shared_machine": True}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every population benchmark takes: databases, where they live, loading, the server."""
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--workdir", type=Path, help="where the SQLite files go (default: a new temporary directory)")
    parser.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL database in which a fresh schema is made per run")
    parser.add_argument("--keep", action="store_true", help="keep the SQLite files and PostgreSQL schemas")
    parser.add_argument("--processes", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--batch", type=int, default=1000, help="about this many resources per bulk_put")
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")


def databases(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    if unknown := [d for d in dbs if d not in ("sqlite", "postgresql")]:
        parser.error(f"unknown database(s) {unknown}")
    return dbs


def workdir_for(args: argparse.Namespace, stack: contextlib.ExitStack, prefix: str) -> Path:
    """--workdir, or a new temporary directory (removed with `stack` unless --keep)."""
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir
    if args.keep:
        return Path(tempfile.mkdtemp(prefix=prefix))
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


# -- wrk ------------------------------------------------------------------------------------------

RESULT_MARK = "BENCH_RESULT "

# The start of every wrk script here: numbers each wrk thread by `setup` (so `init` can seed or
# offset by `tid`), and prints the figures as one JSON line behind RESULT_MARK, because wrk's
# `--latency` table has no p99.9 and no machine-readable form.
WRK_LUA_REPORT = r"""
local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
  thread:set("tid", #threads)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'MARK{"requests":%d,"duration_us":%d,"bytes":%d,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d,"non_2xx_3xx":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
""".replace("MARK", RESULT_MARK)


def wrk_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The figures a WRK_LUA_REPORT script printed, with `socket_errors` summed up."""
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    r = json.loads(line.removeprefix(RESULT_MARK))
    r["socket_errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r
