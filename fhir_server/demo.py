"""Synthetic integrated-care population for demos, tests and load checks.

A North West London style system: four GP practices, an acute trust, a community and mental-health
trust and a borough council's adult social care, sharing records of 50 people. Nothing here is a
real person: NHS numbers come from the 999 range NHS England reserves for testing, telephone
numbers from Ofcom's ranges reserved for drama, e-mail addresses from example.com. Organisation
names and ODS codes are invented (an invented code can still coincide with a real one).

Every resource has a client-assigned id so the list can be loaded with PUT, and the list is ordered
so each reference points to a resource earlier in it: a server that checks referential integrity can
load it front to back. The clock is never read, so a seed always gives the same population.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from conformance.nhs_number import NHS_NUMBER_SYSTEM, nhs_check_digit
from consent.facts import CUSTODIAN_SYSTEM

Resource = dict[str, Any]

ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
ODS_ROLE_SYSTEM = "https://fhir.nhs.uk/England/CodeSystem/England-ODSOrganisationRoleCode"
ORG_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
SDS_USER_SYSTEM = "https://fhir.nhs.uk/Id/sds-user-id"
SDS_ROLE_SYSTEM = "https://fhir.nhs.uk/Id/sds-role-profile-id"
GMC_SYSTEM = "https://fhir.hl7.org.uk/Id/gmc-number"
NMC_SYSTEM = "https://fhir.hl7.org.uk/Id/nmc-number"
# Social Work England has no published FHIR identifier system; this one is local to carebroker.
SWE_SYSTEM = "https://carebroker.example/Id/social-work-england-number"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DMD = "https://dmd.nhs.uk"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
V3_ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
V3_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
NDOP_SNOMED = "827241000000103"

# "Today" for the population: fixed so output never depends on when it is generated.
AS_OF = date(2026, 1, 12)

# Load order: every type refers only to types before it.
TYPE_ORDER = (
    "Organization", "Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Consent",
    "Appointment", "Encounter", "Condition", "Observation", "AllergyIntolerance",
    "MedicationStatement", "CareTeam", "CarePlan",
)

PATIENT_COUNT = 50

# (ODS code, name, address line, postcode, borough, postcode districts of its patients)
_PRACTICES = (
    ("E85990", "Larkspur Road Surgery", "14 Larkspur Road", "W13 8QT", "Ealing", ("W13", "W7", "W5")),
    ("E85991", "Kestrel Park Medical Centre", "2 Kestrel Parade", "UB1 3HN", "Ealing", ("UB1", "UB2")),
    ("E84990", "Willowmere Health Centre", "88 Willowmere Lane", "NW10 4RD", "Brent", ("NW10", "HA0")),
    ("E87990", "Ferndale Lane Practice", "31 Ferndale Lane", "W6 9JS", "Hammersmith and Fulham",
     ("W6", "W12")),
)

_CONDITIONS: dict[str, tuple[str, str]] = {
    "diabetes": ("44054006", "Diabetes mellitus type 2"),
    "hypertension": ("38341003", "Hypertensive disorder, systemic arterial"),
    "copd": ("13645005", "Chronic obstructive lung disease"),
    "heart_failure": ("84114007", "Heart failure"),
    "af": ("49436004", "Atrial fibrillation"),
    "ckd": ("709044004", "Chronic kidney disease"),
    "dementia": ("52448006", "Dementia"),
    "depression": ("35489007", "Depressive disorder"),
    "anxiety": ("197480006", "Anxiety disorder"),
    "asthma": ("195967001", "Asthma"),
    "schizophrenia": ("58214004", "Schizophrenia"),
}
# Chance of each condition for (under 65, 65 and over): rough shape of a London GP list.
_PREVALENCE: dict[str, tuple[float, float]] = {
    "diabetes": (0.12, 0.30), "hypertension": (0.15, 0.50), "copd": (0.03, 0.18),
    "heart_failure": (0.01, 0.15), "af": (0.01, 0.14), "ckd": (0.03, 0.15), "dementia": (0.0, 0.14),
    "depression": (0.18, 0.12), "anxiety": (0.12, 0.06), "asthma": (0.12, 0.05),
    "schizophrenia": (0.04, 0.02),
}
_MENTAL_HEALTH = frozenset({"dementia", "depression", "anxiety", "schizophrenia"})

# dm+d codes. Only Furosemide 40mg tablets (317972000) was checked against NHS documentation;
# the others are illustrative "dm+d-like" codes for demos, not for prescribing.
_MEDICINES: dict[str, tuple[tuple[str, str, str, int | None], ...]] = {
    "diabetes": (("325278007", "Metformin 500mg tablets", "One tablet twice a day with food", 2),),
    "hypertension": (("319283006", "Amlodipine 5mg tablets", "One tablet once a day", 1),),
    "heart_failure": (
        ("317972000", "Furosemide 40mg tablets", "One tablet each morning", 1),
        ("318590006", "Bisoprolol 2.5mg tablets", "One tablet once a day", 1),
    ),
    "copd": (
        ("320176004", "Salbutamol 100micrograms/dose inhaler CFC free", "Two puffs when required", None),
        ("407898006", "Tiotropium 18microgram inhalation powder capsules", "Inhale one capsule daily", 1),
    ),
    "af": (("703907006", "Apixaban 5mg tablets", "One tablet twice a day", 2),),
    "dementia": (("407587004", "Donepezil 5mg tablets", "One tablet at night", 1),),
    "depression": (("321949006", "Sertraline 50mg tablets", "One tablet once a day", 1),),
    "asthma": (("320162005", "Beclometasone 100micrograms/dose inhaler CFC free",
                "Two puffs twice a day", 2),),
    "schizophrenia": (("386849001", "Olanzapine 10mg tablets", "One tablet at night", 1),),
}

# (code, display, category, type, criticality, reaction code, reaction display, severity)
_ALLERGIES = (
    ("91936005", "Allergy to penicillin", "medication", "allergy", "high",
     "271807003", "Eruption of skin", "moderate"),
    ("91935009", "Allergy to peanuts", "food", "allergy", "high", "39579001", "Anaphylaxis", "severe"),
    ("300913006", "Allergy to shellfish", "food", "allergy", "low", "247472004", "Weal", "mild"),
    ("418689008", "Allergy to grass pollen", "environment", "allergy", "low", "76067001", "Sneezing",
     "mild"),
    ("419511003", "Propensity to adverse reactions to drug", "medication", "intolerance", "low",
     "422587007", "Nausea", "mild"),
)

_MALE = ("James", "Mohammed", "Oliver", "Harjit", "David", "Kwame", "Tomasz", "Daniel", "Arjun",
         "George", "Patrick", "Samuel", "Imran", "Michael", "Chidi", "Peter", "Ravi", "William")
_FEMALE = ("Margaret", "Aisha", "Sarah", "Priya", "Joan", "Fatima", "Emily", "Grace", "Agnieszka",
           "Olivia", "Patricia", "Nisha", "Helen", "Amara", "Eileen", "Sophie", "Zainab", "Ruth")
_NEUTRAL = ("Alex", "Sam", "Jordan", "Charlie")
_FAMILY = ("Smith", "Patel", "Khan", "Jones", "Williams", "Brown", "Taylor", "Ahmed", "Singh",
           "Begum", "O'Connor", "Nowak", "Okafor", "Mensah", "Hussain", "Davies", "Evans", "Wilson",
           "Thomas", "Roberts", "Shah", "Ali", "Kowalski", "Ibrahim", "Murphy", "Clarke", "Gill",
           "Osei", "Walker", "Hughes", "Mistry", "Campbell")
_STREETS = ("Acacia Avenue", "Elm Grove", "Station Road", "Church Lane", "Victoria Road", "Park View",
            "Queens Walk", "Mill Lane", "Cedar Close", "Orchard Way", "Kingsley Road", "Meadow Rise",
            "Brook Street", "Rowan Court", "Windmill Road", "Grange Park")
_POSTCODE_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # inward-code letters (C, I, K, M, O, V never used)


# -- small builders ------------------------------------------------------------------------------

def _ref(resource: Resource) -> dict[str, str]:
    """Relative reference, with the target's display name when it has one (`_display`, removed
    before output)."""
    out = {"reference": f"{resource['resourceType']}/{resource['id']}"}
    if "_display" in resource:
        out["display"] = resource["_display"]
    return out


def _cc(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text:
        concept["text"] = text
    return concept


def _instant(day: date, hour: int, minute: int = 0) -> str:
    return f"{day.isoformat()}T{hour:02d}:{minute:02d}:00Z"


def _home_address(rng: random.Random, districts: Sequence[str], borough: str) -> Resource:
    letters = rng.choice(_POSTCODE_LETTERS) + rng.choice(_POSTCODE_LETTERS)
    return {
        "use": "home", "type": "both",
        "line": [f"{rng.randint(1, 180)} {rng.choice(_STREETS)}"],
        "city": "London", "district": borough,
        "postalCode": f"{rng.choice(districts)} {rng.randint(1, 9)}{letters}",
        "country": "GB",
    }


class _Numbers:
    """Unique synthetic numbers: Ofcom drama phone ranges and made-up registration numbers."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        while (value := make()) in self._used:
            pass
        self._used.add(value)
        return value

    def landline(self) -> str:
        return self._unique(lambda: f"020 7946 0{self._rng.randint(0, 999):03d}")

    def mobile(self) -> str:
        return self._unique(lambda: f"07700 900{self._rng.randint(0, 999):03d}")

    def digits(self, count: int) -> str:
        return self._unique(lambda: str(self._rng.randint(10 ** (count - 1), 10 ** count - 1)))

    def nhs_number(self) -> str:
        """999 test-range number with a valid check digit."""
        while True:
            first_nine = f"999{self._rng.randint(0, 999_999):06d}"
            check = nhs_check_digit(first_nine)
            if check is not None and (value := f"{first_nine}{check}") not in self._used:
                self._used.add(value)
                return value

    def nmc_pin(self) -> str:
        rng = self._rng
        return self._unique(lambda: f"{rng.randint(0, 99):02d}{rng.choice('ABCDEFGHJ')}"
                                    f"{rng.randint(0, 9999):04d}{rng.choice('ENOSW')}")


# -- organisations and staff ---------------------------------------------------------------------

def _organization(oid: str, ods: str, name: str, role: tuple[str, str], hl7_type: tuple[str, str],
                  type_text: str, address: Resource, phone: str) -> Resource:
    return {
        "resourceType": "Organization", "id": oid, "_display": name,
        "identifier": [{"system": ODS_SYSTEM, "value": ods}],
        "active": True,
        "type": [{
            "coding": [{"system": ODS_ROLE_SYSTEM, "code": role[0], "display": role[1]},
                       {"system": ORG_TYPE_SYSTEM, "code": hl7_type[0], "display": hl7_type[1]}],
            "text": type_text,
        }],
        "name": name,
        "telecom": [{"system": "phone", "value": phone, "use": "work"}],
        "address": [address],
    }


def _org_address(line: str, postcode: str, borough: str) -> Resource:
    return {"use": "work", "type": "both", "line": [line], "city": "London", "district": borough,
            "postalCode": postcode, "country": "GB"}


@dataclass(frozen=True)
class _Orgs:
    practices: tuple[Resource, ...]
    acute: Resource
    community: Resource
    council: Resource
    districts: dict[str, tuple[str, tuple[str, ...]]]  # practice id -> (borough, postcode districts)

    def all(self) -> list[Resource]:
        return [*self.practices, self.acute, self.community, self.council]


def _organizations(numbers: _Numbers) -> _Orgs:
    provider = ("prov", "Healthcare Provider")
    practices = tuple(
        _organization(f"org-{ods.lower()}", ods, name, ("RO76", "GP PRACTICE"), provider,
                      "GP practice", _org_address(line, postcode, borough), numbers.landline())
        for ods, name, line, postcode, borough, _ in _PRACTICES
    )
    districts = {org["id"]: (spec[4], spec[5]) for org, spec in zip(practices, _PRACTICES)}
    acute = _organization(
        "org-rz9", "RZ9", "Westbrook University Hospitals NHS Trust", ("RO197", "NHS TRUST"), provider,
        "Acute hospital trust", _org_address("Uxbridge Road", "W5 2HW", "Ealing"), numbers.landline())
    community = _organization(
        "org-rz8", "RZ8", "Meridian Community and Mental Health NHS Trust", ("RO197", "NHS TRUST"),
        provider, "Community and mental health trust",
        _org_address("350 Harrow Road", "NW10 5QA", "Brent"), numbers.landline())
    council = _organization(
        "org-z9l", "Z9L", "London Borough of Westbrook Adult Social Care", ("RO141", "LOCAL AUTHORITY"),
        ("govt", "Government"), "Local authority adult social care",
        _org_address("Civic Centre, 14 Perceval Walk", "W5 5HL", "Westbrook"), numbers.landline())
    return _Orgs(practices, acute, community, council, districts)


@dataclass(frozen=True)
class _Job:
    role: tuple[str, str]  # SNOMED occupation
    role_text: str
    specialty: tuple[str, str] | None
    register: str  # identifier system of the professional register
    prefix: str | None


_GP = _Job(("62247001", "General practitioner"), "General practitioner",
           ("394814009", "General practice"), GMC_SYSTEM, "Dr")
_PRACTICE_NURSE = _Job(("159002008", "Practice nurse"), "Practice nurse",
                       ("394814009", "General practice"), NMC_SYSTEM, None)
_GERIATRICIAN = _Job(("309343006", "Physician"), "Consultant geriatrician",
                     ("394811001", "Geriatric medicine"), GMC_SYSTEM, "Dr")
_RESPIRATORY = _Job(("309343006", "Physician"), "Consultant respiratory physician",
                    ("418112009", "Pulmonary medicine"), GMC_SYSTEM, "Dr")
_CPN = _Job(("224563006", "Mental health nurse"), "Community psychiatric nurse",
            ("394587001", "Psychiatry"), NMC_SYSTEM, None)
_DISTRICT_NURSE = _Job(("158997000", "District nurse"), "District nurse", None, NMC_SYSTEM, None)
_SOCIAL_WORKER = _Job(("106328005", "Social worker"), "Social worker", None, SWE_SYSTEM, None)


@dataclass
class _Staff:
    """Practitioners and their roles, looked up by what a care team needs."""

    practitioners: list[Resource] = field(default_factory=list)
    roles: list[Resource] = field(default_factory=list)
    by_job: dict[tuple[str, str], list[tuple[Resource, Resource]]] = field(default_factory=dict)

    def add(self, rng: random.Random, numbers: _Numbers, job: _Job, org: Resource) -> None:
        index = len(self.practitioners) + 1
        gender = rng.choice(("female", "male"))
        given = rng.choice(_FEMALE if gender == "female" else _MALE)
        family = rng.choice(_FAMILY)
        display = " ".join(p for p in (job.prefix, given, family) if p)
        if job.register == GMC_SYSTEM:
            register_number = numbers.digits(7)
        elif job.register == NMC_SYSTEM:
            register_number = numbers.nmc_pin()
        else:
            register_number = f"SW{numbers.digits(5)}"
        name: Resource = {"use": "official", "family": family, "given": [given]}
        if job.prefix:
            name["prefix"] = [job.prefix]
        practitioner = {
            "resourceType": "Practitioner", "id": f"prac-{index:03d}", "_display": display,
            "identifier": [{"system": SDS_USER_SYSTEM, "value": numbers.digits(12)},
                           {"system": job.register, "value": register_number}],
            "active": True,
            "name": [name],
            "telecom": [{"system": "email", "value": f"{given}.{family}@example.com".lower()
                         .replace("'", ""), "use": "work"}],
            "gender": gender,
        }
        role: Resource = {
            "resourceType": "PractitionerRole", "id": f"role-{index:03d}",
            "_display": f"{display} ({job.role_text}, {org['name']})",
            "identifier": [{"system": SDS_ROLE_SYSTEM, "value": numbers.digits(12)}],
            "active": True,
            "period": {"start": (AS_OF - timedelta(days=rng.randint(200, 5000))).isoformat()},
            "practitioner": _ref(practitioner),
            "organization": _ref(org),
            "code": [_cc(SNOMED, *job.role, text=job.role_text)],
            "telecom": [{"system": "phone", "value": org["telecom"][0]["value"], "use": "work"}],
        }
        if job.specialty:
            role["specialty"] = [_cc(SNOMED, *job.specialty)]
        self.practitioners.append(practitioner)
        self.roles.append(role)
        self.by_job.setdefault((job.role_text, org["id"]), []).append((practitioner, role))

    def pick(self, rng: random.Random, job: _Job, org: Resource) -> tuple[Resource, Resource]:
        return rng.choice(self.by_job[(job.role_text, org["id"])])


def _staff(rng: random.Random, numbers: _Numbers, orgs: _Orgs) -> _Staff:
    staff = _Staff()
    for practice in orgs.practices:
        for job in (_GP, _GP, _PRACTICE_NURSE):
            staff.add(rng, numbers, job, practice)
    for job in (_GERIATRICIAN, _RESPIRATORY):
        staff.add(rng, numbers, job, orgs.acute)
    for job in (_CPN, _CPN, _DISTRICT_NURSE, _DISTRICT_NURSE):
        staff.add(rng, numbers, job, orgs.community)
    for job in (_SOCIAL_WORKER, _SOCIAL_WORKER):
        staff.add(rng, numbers, job, orgs.council)
    return staff


# -- people --------------------------------------------------------------------------------------

@dataclass
class _Person:
    patient: Resource
    practice: Resource
    age: int
    conditions: list[str]
    carer: Resource | None = None
    condition_resources: dict[str, Resource] = field(default_factory=dict)


def _patient(rng: random.Random, numbers: _Numbers, index: int, practice: Resource,
             orgs: _Orgs) -> _Person:
    roll = rng.random()
    gender = "other" if roll < 0.03 else ("female" if roll < 0.52 else "male")
    given = rng.choice({"female": _FEMALE, "male": _MALE}.get(gender, _NEUTRAL))
    middle = rng.choice(_FEMALE if gender == "female" else _MALE) if rng.random() < 0.3 else None
    family = rng.choice(_FAMILY)
    age = rng.choice((rng.randint(18, 64), rng.randint(65, 97), rng.randint(65, 97)))
    birth = AS_OF - timedelta(days=365 * age + rng.randint(0, 364))
    prefix = {"female": rng.choice(("Mrs", "Ms", "Miss")), "male": "Mr"}.get(gender, "Mx")
    borough, districts = orgs.districts[practice["id"]]
    telecom: list[Resource] = [{"system": "phone", "value": numbers.mobile(), "use": "mobile"}]
    if rng.random() < 0.5:
        telecom.append({"system": "email", "value": f"{given}.{family}{index}@example.com".lower()
                        .replace("'", ""), "use": "home"})
    patient = {
        "resourceType": "Patient", "id": f"pat-{index:03d}", "_display": f"{given} {family}",
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": numbers.nhs_number()}],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [g for g in (given, middle) if g],
                  "prefix": [prefix]}],
        "telecom": telecom,
        "gender": gender,
        "birthDate": birth.isoformat(),
        "address": [_home_address(rng, districts, borough)],
        "generalPractitioner": [_ref(practice)],
        "managingOrganization": _ref(practice),
    }
    older = age >= 65
    conditions = [name for name, chances in _PREVALENCE.items()
                  if rng.random() < chances[older] and not (name == "dementia" and age < 70)]
    return _Person(patient, practice, age, conditions)


def _related_person(rng: random.Random, numbers: _Numbers, person: _Person, rid: str,
                    carer: bool) -> Resource:
    gender = rng.choice(("female", "male"))
    given = rng.choice(_FEMALE if gender == "female" else _MALE)
    family = person.patient["name"][0]["family"]
    if person.age >= 60:
        kin = ("DAU", "daughter") if gender == "female" else ("SON", "natural son")
    else:
        kin = ("WIFE", "wife") if gender == "female" else ("HUSB", "husband")
    relationship = [_cc(V3_ROLE_CODE, *kin)]
    relationship.append(_cc(SNOMED, "133932002", "Caregiver", text="Carer") if carer else
                        _cc("http://terminology.hl7.org/CodeSystem/v2-0131", "N", "Next-of-Kin"))
    return {
        "resourceType": "RelatedPerson", "id": rid, "_display": f"{given} {family}",
        "active": True,
        "patient": _ref(person.patient),
        "relationship": relationship,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": numbers.mobile(), "use": "mobile"}],
        "gender": gender,
        "address": copy.deepcopy(person.patient["address"]),
        "period": {"start": (AS_OF - timedelta(days=rng.randint(90, 2000))).isoformat()},
    }


# -- consent -------------------------------------------------------------------------------------

def _consent(rng: random.Random, cid: str, person: _Person, *, opt_out: bool,
             national_data_opt_out: bool = False) -> Resource:
    """Record-sharing consent: OPTIN permit, OPTOUT deny, or the patient's National Data Opt-out.

    The National Data Opt-out only stops use for research and planning (not direct care), so its
    deny provision is limited to those purposes.
    """
    category = [_cc(LOINC, "59284-0", "Patient Consent")]
    dissent = opt_out or national_data_opt_out
    rule = ("OPTOUT", "opt-out") if dissent else ("OPTIN", "opt-in")
    recorded = AS_OF - timedelta(days=rng.randint(30, 1500))
    provision: Resource = {"type": "deny" if dissent else "permit",
                           "period": {"start": recorded.isoformat()}}
    consent: Resource = {
        "resourceType": "Consent", "id": cid,
        "status": "active",
        "scope": _cc(CONSENT_SCOPE, "patient-privacy", "Privacy Consent"),
        "category": category,
        "patient": _ref(person.patient),
        "dateTime": _instant(recorded, rng.randint(9, 16), rng.choice((0, 15, 30, 45))),
        "performer": [_ref(person.patient)],
        "organization": [_ref(person.practice)],
        "policyRule": _cc(V3_ACT_CODE, *rule),
        "provision": provision,
    }
    if national_data_opt_out:
        category.append(_cc(SNOMED, NDOP_SNOMED,
                            "Dissent from secondary use of GP patient identifiable data",
                            text="National Data Opt-out"))
        consent["policy"] = [{"uri": "https://digital.nhs.uk/services/national-data-opt-out"}]
        provision["purpose"] = [
            {"system": V3_ACT_REASON, "code": "HRESCH", "display": "healthcare research"},
            {"system": V3_ACT_REASON, "code": "HOPERAT", "display": "healthcare operations"},
        ]
    return consent


# -- clinical record -----------------------------------------------------------------------------

class _Ids:
    """Sequential ids per resource type, e.g. enc-001, enc-002."""

    _PREFIX = {"Appointment": "appt", "Encounter": "enc", "Condition": "cond", "Observation": "obs",
               "AllergyIntolerance": "allergy", "MedicationStatement": "medstmt",
               "CareTeam": "careteam", "CarePlan": "careplan", "Consent": "consent",
               "RelatedPerson": "relp"}

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def __call__(self, resource_type: str) -> str:
        self._next[resource_type] = self._next.get(resource_type, 0) + 1
        return f"{self._PREFIX[resource_type]}-{self._next[resource_type]:03d}"


def _participant(actor: Resource, *, performer: bool = True) -> Resource:
    out: Resource = {"actor": _ref(actor), "required": "required", "status": "accepted"}
    if performer:
        out["type"] = [_cc(V3_PARTICIPATION, "PPRF", "primary performer")]
    return out


def _appointment(ids: _Ids, person: _Person, role: Resource, day: date, hour: int, minutes: int,
                 status: str, description: str, service: tuple[str, str]) -> Resource:
    start, end = _instant(day, hour), _instant(day, hour, minutes)  # minutes < 60
    return {
        "resourceType": "Appointment", "id": ids("Appointment"),
        "status": status,
        "serviceType": [_cc(SNOMED, *service)],
        "appointmentType": _cc("http://terminology.hl7.org/CodeSystem/v2-0276", "ROUTINE",
                               "Routine appointment - default if not valued"),
        "description": description,
        "start": start, "end": end, "minutesDuration": minutes,
        "created": (day - timedelta(days=14)).isoformat(),
        "participant": [_participant(person.patient, performer=False), _participant(role)],
    }


def _encounter(ids: _Ids, person: _Person, role: Resource, org: Resource, *, klass: tuple[str, str],
               kind: tuple[str, str], start: str, end: str, appointment: Resource | None = None
               ) -> Resource:
    encounter: Resource = {
        "resourceType": "Encounter", "id": ids("Encounter"),
        "status": "finished",
        "class": {"system": V3_ACT_CODE, "code": klass[0], "display": klass[1]},
        "type": [_cc(SNOMED, *kind)],
        "subject": _ref(person.patient),
        "participant": [{"type": [_cc(V3_PARTICIPATION, "PPRF", "primary performer")],
                         "individual": _ref(role)}],
        "period": {"start": start, "end": end},
        "serviceProvider": _ref(org),
    }
    if appointment:
        encounter["appointment"] = [_ref(appointment)]
    return encounter


def _condition(ids: _Ids, person: _Person, code: tuple[str, str], recorder: Resource, onset: date,
               encounter: Resource | None = None) -> Resource:
    condition: Resource = {
        "resourceType": "Condition", "id": ids("Condition"),
        "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active",
                              "Active"),
        "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                  "confirmed", "Confirmed"),
        "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category",
                         *(("encounter-diagnosis", "Encounter Diagnosis") if encounter else
                           ("problem-list-item", "Problem List Item")))],
        "code": _cc(SNOMED, *code),
        "subject": _ref(person.patient),
        "onsetDateTime": onset.isoformat(),
        "recordedDate": onset.isoformat(),
        "recorder": _ref(recorder),
    }
    if encounter:
        condition["encounter"] = _ref(encounter)
    return condition


def _quantity(value: float, unit: str, code: str) -> Resource:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _observation(ids: _Ids, person: _Person, category: tuple[str, str], code: tuple[str, str],
                 text: str, when: str, performer: Resource, encounter: Resource | None,
                 **value: Any) -> Resource:
    observation: Resource = {
        "resourceType": "Observation", "id": ids("Observation"),
        "status": "final",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", *category)],
        "code": _cc(LOINC, *code, text=text),
        "subject": _ref(person.patient),
        "effectiveDateTime": when,
        "issued": when,
        "performer": [_ref(performer)],
        **value,
    }
    if encounter:
        observation["encounter"] = _ref(encounter)
    return observation


def _blood_pressure(ids: _Ids, rng: random.Random, person: _Person, encounter: Resource,
                    performer: Resource) -> Resource:
    systolic = rng.randint(112, 168) + (8 if "hypertension" in person.conditions else 0)
    diastolic = rng.randint(68, 96)
    component = [
        {"code": _cc(LOINC, "8480-6", "Systolic blood pressure"),
         "valueQuantity": _quantity(systolic, "mmHg", "mm[Hg]")},
        {"code": _cc(LOINC, "8462-4", "Diastolic blood pressure"),
         "valueQuantity": _quantity(diastolic, "mmHg", "mm[Hg]")},
    ]
    return _observation(ids, person, ("vital-signs", "Vital Signs"),
                        ("85354-9", "Blood pressure panel with all children optional"),
                        "Blood pressure", encounter["period"]["start"], performer, encounter,
                        component=component)


def _hba1c(ids: _Ids, rng: random.Random, person: _Person, day: date, lab: Resource) -> Resource:
    value = rng.randint(44, 86)
    return _observation(ids, person, ("laboratory", "Laboratory"),
                        ("59261-8", "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol"),
                        "HbA1c", _instant(day, 11, 20), lab, None,
                        valueQuantity=_quantity(value, "mmol/mol", "mmol/mol"),
                        referenceRange=[{"high": _quantity(47, "mmol/mol", "mmol/mol"),
                                         "text": "Target 48 mmol/mol or below for most adults "
                                                 "with type 2 diabetes"}])


def _allergy(ids: _Ids, rng: random.Random, person: _Person, recorder: Resource) -> Resource:
    code, display, category, kind, criticality, reaction, reaction_display, severity = rng.choice(
        _ALLERGIES)
    return {
        "resourceType": "AllergyIntolerance", "id": ids("AllergyIntolerance"),
        "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                              "active", "Active"),
        "verificationStatus": _cc(
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed",
            "Confirmed"),
        "type": kind,
        "category": [category],
        "criticality": criticality,
        "code": _cc(SNOMED, code, display),
        "patient": _ref(person.patient),
        "recordedDate": (AS_OF - timedelta(days=rng.randint(100, 4000))).isoformat(),
        "recorder": _ref(recorder),
        "reaction": [{"manifestation": [_cc(SNOMED, reaction, reaction_display)],
                      "severity": severity}],
    }


def _medication_statement(ids: _Ids, rng: random.Random, person: _Person,
                          medicine: tuple[str, str, str, int | None], reason: Resource,
                          source: Resource) -> Resource:
    code, display, instruction, per_day = medicine
    dosage: Resource = {"text": instruction}
    if per_day is None:
        dosage["asNeededBoolean"] = True
    else:
        dosage["timing"] = {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}}
    if "tablet" in display:
        dosage["route"] = _cc(SNOMED, "26643006", "Oral route")
    stopped = rng.random() < 0.1
    start = AS_OF - timedelta(days=rng.randint(60, 2500))
    period = {"start": start.isoformat()}
    if stopped:
        period["end"] = (start + timedelta(days=rng.randint(30, 50))).isoformat()
    return {
        "resourceType": "MedicationStatement", "id": ids("MedicationStatement"),
        "status": "stopped" if stopped else "active",
        "medicationCodeableConcept": _cc(DMD, code, display),
        "subject": _ref(person.patient),
        "effectivePeriod": period,
        "dateAsserted": (AS_OF - timedelta(days=rng.randint(1, 60))).isoformat(),
        "informationSource": _ref(source),
        "reasonReference": [_ref(reason)],
        "dosage": [dosage],
    }


def _random_day(rng: random.Random, earliest: int, latest: int) -> date:
    """A weekday between `earliest` and `latest` days from AS_OF (negative = past)."""
    day = AS_OF + timedelta(days=rng.randint(earliest, latest))
    return day - timedelta(days=max(0, day.weekday() - 4))


def _record(rng: random.Random, ids: _Ids, person: _Person, orgs: _Orgs, staff: _Staff
            ) -> list[Resource]:
    """Appointments, encounters, problems, results, allergies and medicines for one person."""
    out: list[Resource] = []
    _, gp_role = staff.pick(rng, _GP, person.practice)
    _, nurse_role = staff.pick(rng, _PRACTICE_NURSE, person.practice)

    # Past GP review: appointment fulfilled, encounter records what happened.
    day = _random_day(rng, -300, -7)
    hour = rng.randint(8, 16)
    review = _appointment(ids, person, gp_role, day, hour, 15, "fulfilled", "GP review",
                          ("394814009", "General practice"))
    visit = _encounter(ids, person, gp_role, person.practice, klass=("AMB", "ambulatory"),
                       kind=("11429006", "Consultation"), start=review["start"], end=review["end"],
                       appointment=review)
    out += [review, visit]

    # Future appointment: practice nurse for physical long-term conditions, CPN for mental health.
    if person.conditions:
        mental = _MENTAL_HEALTH.intersection(person.conditions)
        role = staff.pick(rng, _CPN, orgs.community)[1] if mental else nurse_role
        description = "Mental health review" if mental else "Long-term condition review"
        service = ("394587001", "Psychiatry") if mental else ("394814009", "General practice")
        out.append(_appointment(ids, person, role, _random_day(rng, 7, 60), rng.randint(9, 16), 30,
                                "booked", description, service))

    # Long-term conditions on the problem list, recorded by the GP.
    for name in person.conditions:
        onset = AS_OF - timedelta(days=rng.randint(365, 365 * min(person.age - 17, 25)))
        condition = _condition(ids, person, _CONDITIONS[name], gp_role, onset)
        person.condition_resources[name] = condition
        out.append(condition)

    out.append(_blood_pressure(ids, rng, person, visit, gp_role))
    if "diabetes" in person.conditions:
        out.append(_hba1c(ids, rng, person, day - timedelta(days=rng.randint(3, 10)), orgs.acute))

    # Frail people: district nurse home visit; some were admitted to hospital.
    if {"heart_failure", "copd", "dementia"}.intersection(person.conditions):
        _, district_nurse = staff.pick(rng, _DISTRICT_NURSE, orgs.community)
        home_day = _random_day(rng, -120, -2)
        out.append(_encounter(ids, person, district_nurse, orgs.community, klass=("HH", "home health"),
                              kind=("439708006", "Home visit"), start=_instant(home_day, 10),
                              end=_instant(home_day, 10, 45)))
        if rng.random() < 0.5:
            job = _RESPIRATORY if "copd" in person.conditions else _GERIATRICIAN
            _, consultant = staff.pick(rng, job, orgs.acute)
            admitted = _random_day(rng, -200, -20)
            stay = _encounter(ids, person, consultant, orgs.acute, klass=("IMP", "inpatient encounter"),
                              kind=("183452005", "Emergency hospital admission"),
                              start=_instant(admitted, rng.randint(0, 23), 30),
                              end=_instant(admitted + timedelta(days=rng.randint(2, 9)), 14))
            stay["hospitalization"] = {"dischargeDisposition": _cc(
                "http://terminology.hl7.org/CodeSystem/discharge-disposition", "home", "Home")}
            diagnosis = (("195951007", "Acute exacerbation of chronic obstructive airways disease")
                         if "copd" in person.conditions else ("233604007", "Pneumonia"))
            out += [stay, _condition(ids, person, diagnosis, consultant, admitted, encounter=stay)]

    if rng.random() < 0.25:
        out.append(_allergy(ids, rng, person, gp_role))

    for name in person.conditions:
        for medicine in _MEDICINES.get(name, ()):
            out.append(_medication_statement(ids, rng, person, medicine,
                                             person.condition_resources[name], gp_role))
    return out


# -- integrated care -----------------------------------------------------------------------------

def _needs_care_team(person: _Person) -> bool:
    complex_needs = {"dementia", "heart_failure", "schizophrenia"}.intersection(person.conditions)
    return bool(complex_needs) or len(person.conditions) >= 2


def _team_member(member: Resource, job_role: tuple[str, str], org: Resource | None = None,
                 text: str | None = None) -> Resource:
    """CareTeam participant; onBehalfOf is set only for Practitioner members (invariant ctm-1)."""
    participant: Resource = {"role": [_cc(SNOMED, *job_role, text=text)], "member": _ref(member)}
    if org is not None:
        participant["onBehalfOf"] = _ref(org)
    return participant


def _care_team_and_plan(rng: random.Random, ids: _Ids, person: _Person, orgs: _Orgs, staff: _Staff,
                        active: bool) -> list[Resource]:
    """A multidisciplinary team across GP, hospital, community, mental health and social care,
    and the integrated care plan it works to."""
    conditions = person.conditions
    _, gp_role = staff.pick(rng, _GP, person.practice)
    members = [_team_member(gp_role, _GP.role, text=_GP.role_text)]
    contributors = [gp_role]
    if {"diabetes", "copd", "asthma", "hypertension"}.intersection(conditions):
        _, nurse_role = staff.pick(rng, _PRACTICE_NURSE, person.practice)
        members.append(_team_member(nurse_role, _PRACTICE_NURSE.role, text=_PRACTICE_NURSE.role_text))
    if {"heart_failure", "copd", "dementia"}.intersection(conditions) or person.age >= 80:
        _, district_nurse = staff.pick(rng, _DISTRICT_NURSE, orgs.community)
        members.append(_team_member(district_nurse, _DISTRICT_NURSE.role,
                                    text=_DISTRICT_NURSE.role_text))
        contributors.append(district_nurse)
    job = _RESPIRATORY if "copd" in conditions else _GERIATRICIAN
    if person.age >= 75 or {"copd", "heart_failure"}.intersection(conditions):
        consultant, _ = staff.pick(rng, job, orgs.acute)
        members.append(_team_member(consultant, job.role, orgs.acute, text=job.role_text))
    if _MENTAL_HEALTH.intersection(conditions):
        _, cpn = staff.pick(rng, _CPN, orgs.community)
        members.append(_team_member(cpn, _CPN.role, text=_CPN.role_text))
        contributors.append(cpn)
    social_care = "dementia" in conditions or person.age >= 80 or len(members) < 3
    if social_care:
        social_worker, _ = staff.pick(rng, _SOCIAL_WORKER, orgs.council)
        members.append(_team_member(social_worker, _SOCIAL_WORKER.role, orgs.council,
                                    text=_SOCIAL_WORKER.role_text))
    if person.carer is not None:
        members.append(_team_member(person.carer, ("133932002", "Caregiver"), text="Carer"))

    started = AS_OF - timedelta(days=rng.randint(120, 900))
    period: Resource = {"start": started.isoformat()}
    if not active:
        period["end"] = (started + timedelta(days=rng.randint(60, 110))).isoformat()
    problems = [person.condition_resources[name] for name in conditions]
    family = person.patient["name"][0]["family"]
    team = {
        "resourceType": "CareTeam", "id": ids("CareTeam"),
        "status": "active" if active else "inactive",
        "category": [_cc(LOINC, "LA28865-6", "Longitudinal care-coordination focused care team")],
        "name": f"Integrated care MDT ({family})",
        "subject": _ref(person.patient),
        "period": period,
        "participant": members,
        "reasonReference": [_ref(c) for c in problems],
        "managingOrganization": [_ref(person.practice)],
    }

    if "diabetes" in conditions:
        focus = ("735985000", "Diabetes clinical management plan")
    elif "heart_failure" in conditions:
        focus = ("735984001", "Heart failure self management plan")
    elif _MENTAL_HEALTH.intersection(conditions):
        focus = ("718347000", "Mental health care plan")
    else:
        focus = None
    category = [_cc(SNOMED, "734163000", "Care plan")]
    if focus:
        category.append(_cc(SNOMED, *focus))
    plan = {
        "resourceType": "CarePlan", "id": ids("CarePlan"),
        "status": "active" if active else "completed",
        "intent": "plan",
        "category": category,
        "title": "Integrated care plan",
        "description": "Shared plan agreed by the person, their GP practice, community, hospital "
                       "and social care teams.",
        "subject": _ref(person.patient),
        "period": dict(period),
        "created": started.isoformat(),
        "author": _ref(gp_role),
        "contributor": [_ref(c) for c in contributors],
        "careTeam": [_ref(team)],
        "addresses": [_ref(c) for c in problems],
        "activity": _activities(rng, person, gp_role, active, social_care),
    }
    return [team, plan]


def _activities(rng: random.Random, person: _Person, gp_role: Resource, active: bool,
                social_care: bool) -> list[Resource]:
    review_day = _random_day(rng, 14, 90) if active else AS_OF - timedelta(days=rng.randint(200, 400))
    activities = [{"detail": {
        "kind": "Appointment",
        "code": _cc(SNOMED, "390906007", "Follow-up encounter"),
        "status": "scheduled" if active else "completed",
        "description": "Multidisciplinary review of the care plan with the person and their carer",
        "scheduledString": f"Week of {review_day.isoformat()}",
        "performer": [_ref(gp_role)],
    }}]
    if social_care:
        activities.append({"detail": {
            "kind": "Task",
            "code": {"text": "Care Act 2014 needs assessment review"},
            "status": rng.choice(("in-progress", "not-started")) if active else "completed",
            "description": "Adult social care to review the package of care at home",
        }})
    if "heart_failure" in person.conditions:
        activities.append({"detail": {
            "code": {"text": "Daily weight monitoring"},
            "status": "in-progress" if active else "stopped",
            "description": "Weigh each morning; contact the community heart failure nurse after a "
                           "gain of 2 kg in 3 days",
        }})
    return activities


# -- assembly ------------------------------------------------------------------------------------

def demo_resources(seed: int = 2026) -> list[dict]:
    """The synthetic population as FHIR R4 JSON, ordered so every reference points backwards."""
    rng = random.Random(seed)
    numbers = _Numbers(rng)
    ids = _Ids()
    orgs = _organizations(numbers)
    staff = _staff(rng, numbers, orgs)

    people = [_patient(rng, numbers, i + 1, orgs.practices[i % len(orgs.practices)], orgs)
              for i in range(PATIENT_COUNT)]
    out: list[Resource] = [*orgs.all(), *staff.practitioners, *staff.roles]
    out += [person.patient for person in people]

    for person in people:
        if "dementia" in person.conditions or rng.random() < 0.06:
            person.carer = _related_person(rng, numbers, person, ids("RelatedPerson"),
                                           carer="dementia" in person.conditions)
            out.append(person.carer)

    # Three opt out of sharing; a fourth shares for direct care but has a National Data Opt-out.
    *opt_outs, ndop = rng.sample(range(PATIENT_COUNT), 4)
    for index, person in enumerate(people):
        out.append(_consent(rng, ids("Consent"), person, opt_out=index in opt_outs))
        if index == ndop:
            out.append(_consent(rng, ids("Consent"), person, opt_out=False,
                                national_data_opt_out=True))

    for person in people:
        out += _record(rng, ids, person, orgs, staff)
    for person in people:
        if _needs_care_team(person):
            out += _care_team_and_plan(rng, ids, person, orgs, staff, active=rng.random() < 0.8)

    rank = {name: i for i, name in enumerate(TYPE_ORDER)}
    out.sort(key=lambda r: rank[r["resourceType"]])  # stable: keeps order within a type
    _tag_custodians(out, orgs)
    for resource in out:
        resource.pop("_display", None)
    return out


def _tag_custodians(resources: list[Resource], orgs: _Orgs) -> None:
    """Each record entry names the organisation whose data it is (the custodian meta.tag the access
    policy reads): the trust or council it involves, else the GP practice; a Patient's is its practice."""
    role_org = {f"PractitionerRole/{r['id']}": r["organization"]["reference"]
                for r in resources if r["resourceType"] == "PractitionerRole"}
    practices = {f"Organization/{o['id']}" for o in orgs.practices}
    for res in resources:
        if res["resourceType"] in ("Organization", "Practitioner", "PractitionerRole"):
            continue
        found = [role_org.get(ref, ref) for ref in _references(res)]
        found = [ref for ref in found if ref.startswith("Organization/")]
        custodian = next((o for o in found if o not in practices), None) or next(iter(found), None)
        if custodian is not None:
            res.setdefault("meta", {}).setdefault("tag", []).append({"system": CUSTODIAN_SYSTEM, "code": custodian})


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return own + [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []
