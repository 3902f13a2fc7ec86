"""Why a user sees a resource or not: the access policy's decision for one request, step by step
(`carebroker policy explain`).

The explanation does not re-implement the policy. The caller's policy is built by the server's own
`PolicyDecisionPoint.for_principal` (their PractitionerRoles, care teams and break-glass grants,
looked up the same way), and every verdict is the server's own SQL evaluated on this one row: the
relationship test is `is_related`, a Consent's provision applies by `provision_applies`, a Consent
denies by `consent_denies` and permits explicitly by `consent_permits_explicitly` (through
`consents_deciding`), direct care is `care_rows`, secondary use `deidentified_rows`, each rule's
reach `RequestPolicy.rows_reached`, and the final answer `RequestPolicy.where` and
`RequestPolicy.refusal`, exactly as a read or search asks them. What is listed besides
(relationship rows, provisions, flags) are the policy facts those conditions read. The
per-patient verdicts are then combined as `care_rows` combines them, and the combination is
checked against `care_rows` itself, and the rules' reach against `where`: any difference is
reported as an inconsistency in the explanation (a bug), never hidden.
"""
from __future__ import annotations

import textwrap
from typing import Any

import sqlalchemy as sa

from conformance.validation import supported_resource_types
from consent import facts
from consent.policy import (PolicyDecisionPoint, RequestPolicy, care_rows, consent_denies, consent_permits_explicitly,
                            consents_deciding, deidentified_rows, is_related, provision_applies)
from consent.rules import DIRECTORY, ROLE_RULES, SEARCH_ONLY
from fhir_server import jsonfmt
from fhir_server.auth.principal import EMERGENCY_PURPOSE, Principal, principal_from_claims
from fhir_server.auth.registry import Registry
from fhir_server.auth.resource_server import organization_finder
from fhir_server.outcome import FhirError
from fhir_server.search.values import MAX_US, MIN_US
from fhir_server.service.interactions import FhirService
from fhir_server.service.timefmt import now_us, to_instant
from fhir_server.storage.repository import Version
from fhir_server.storage.schema import (break_glass, policy_consent, policy_consent_term, policy_relationship,
                                        policy_subject, resource, search_reference)

# The SMART permission letter each interaction is checked against (router: scopes; where: rows).
PERMISSION = {
    "read": "r", "vread": "r", "history-instance": "r", "history-type": "s", "history-system": "s",
    "search-type": "s", "search-system": "s", "search-compartment": "s", "$everything": "s", "$export": "s",
    "$validate": "r", "create": "c", "update": "u", "patch": "u", "delete": "d",
}
INTERACTIONS = tuple(sorted(PERMISSION))
ROW_KINDS = {
    "all": "every row of the types it may use",
    "care": "direct care: a relationship with the patient, then Consents and labels",
    "own": "the user's own record only",
    "deidentified": "secondary use: pseudonymised; patients who opted out are left out",
}
FLAG_NAMES = ((facts.SENSITIVE, "sensitive"), (facts.RESTRICTED, "restricted"), (facts.HIDDEN, "hidden (REDACTED)"))
KIND_NAMES = {"careteam": "care team", "encounter": "encounter", "gp": "registered GP"}
WIDTH = 100  # text lines are wrapped to this
SHOWN_CARE_TEAMS = 8  # listed in the text output; --json has them all
DEFAULT_ISSUER = "carebroker"  # a principal's issuer when none is known (it only keys break-glass grants)
EXPLAIN_CLIENT = "carebroker-policy-explain"


# -- who is asking --------------------------------------------------------------------------------

def principal_for_user(service: FhirService, username: str, *, purpose: str | None = None,
                       scope: str | None = None, issuer: str | None = None) -> Principal:
    """The principal a token of the built-in authorization server would carry for a registered user
    (their roles, fhirUser, organisation, patient and purpose of use; the organisation found from
    their PractitionerRole when the registry names none, as the resource server does). `issuer`
    keys break-glass grants (issuer|username); by default the issuer of the user's open grants."""
    user = Registry(service.store).user(username)
    if user is None:
        raise ValueError(f"no user named {username!r} is registered (carebroker user list)")
    if issuer is None:
        issuer = _grant_issuer(service, username) or DEFAULT_ISSUER
    claims = {"iss": issuer, "sub": user.username, "client_id": EXPLAIN_CLIENT, "roles": list(user.roles),
              "scope": scope or default_scope(user.patient), "fhirUser": user.fhir_user,
              "organization": user.organization, "patient": user.patient,
              "purpose_of_use": purpose or user.purpose_of_use}
    return _principal(service, claims)


def principal_direct(service: FhirService, *, roles: list[str], fhir_user: str | None, organization: str | None,
                     purpose: str | None = None, scope: str | None = None, patient: str | None = None,
                     subject: str | None = None, issuer: str | None = None) -> Principal:
    """A principal from the attributes themselves (no registered user)."""
    if issuer is None and subject:
        issuer = _grant_issuer(service, subject)
    claims = {"iss": issuer or DEFAULT_ISSUER, "sub": subject, "client_id": EXPLAIN_CLIENT, "roles": roles,
              "scope": scope or default_scope(patient or (fhir_user or "").startswith("Patient/") or None),
              "fhirUser": fhir_user, "organization": organization, "patient": patient, "purpose_of_use": purpose}
    return _principal(service, claims)


def default_scope(patient: Any) -> str:
    """The widest scopes a token could carry: the explanation is about roles, not about a narrower token."""
    return "patient/*.cruds" if patient else "user/*.cruds"


def _principal(service: FhirService, claims: dict[str, Any]) -> Principal:
    """As the resource server makes it of a token's claims (InvalidClaims is a ValueError)."""
    return principal_from_claims({k: v for k, v in claims.items() if v is not None}, builtin=True,
                                 find_organization=organization_finder(service))


def _grant_issuer(service: FhirService, subject: str) -> str | None:
    """The issuer of `subject`'s latest open break-glass grant (grants are keyed issuer|subject)."""
    with service.store.single_read() as conn:
        row = conn.execute(sa.select(break_glass.c.requester).where(
            break_glass.c.requester.endswith("|" + subject, autoescape=True), break_glass.c.expires > now_us())
            .order_by(break_glass.c.expires.desc()).limit(1)).first()
    return row[0].rsplit("|", 1)[0] if row else None


# -- the explanation ------------------------------------------------------------------------------

def explain(service: FhirService, principal: Principal, rtype: str, rid: str, interaction: str | None = None,
            *, user: str | None = None, pdp: PolicyDecisionPoint | None = None) -> dict[str, Any]:
    """The decision `interaction` (default: read; search-type for search-only roles) on `rtype/rid`
    by `principal` meets, as a JSON-able dict (see `render_text`)."""
    if not rtype or rtype not in (types := frozenset(supported_resource_types())):
        raise ValueError(f"{rtype!r} is not a resource type this server serves")
    if interaction is not None and interaction not in PERMISSION:
        raise ValueError(f"unknown interaction {interaction!r}; one of {', '.join(INTERACTIONS)}")
    pdp = pdp or PolicyDecisionPoint(service, types)
    policy = pdp.for_principal(principal, "")
    defaulted = interaction is None
    if interaction is None:
        interaction = "read"
        if not policy.allows("read", rtype) and policy.allows("search-type", rtype):
            interaction = "search-type"
    return _Explainer(service, pdp, policy, rtype, rid, interaction, defaulted, user).run()


class _Explainer:
    def __init__(self, service: FhirService, pdp: PolicyDecisionPoint, policy: RequestPolicy, rtype: str, rid: str,
                 interaction: str, defaulted: bool, user: str | None) -> None:
        self.service, self.pdp, self.policy = service, pdp, policy
        self.rtype, self.rid, self.interaction, self.defaulted, self.user = rtype, rid, interaction, defaulted, user
        self.letter = PERMISSION[interaction]
        # The interaction `RequestPolicy._role_where` checks a rule's types with, for this letter.
        self.row_interaction = {"c": "create", "u": "update", "d": "delete"}.get(self.letter, "search-type")
        self.caller = policy.caller
        self.problems: list[str] = []

    def run(self) -> dict[str, Any]:
        p, policy = self.principal, self.policy
        roles = self._roles()
        scopes_allow = policy.access.permits(self.letter, self.rtype) if policy.access is not None else True
        gate = policy.allows(self.interaction, self.rtype) and scopes_allow
        out: dict[str, Any] = {
            "caller": self._caller(),
            "request": {"interaction": self.interaction, "defaulted": self.defaulted, "permission": self.letter,
                        "resource": f"{self.rtype}/{self.rid}"},
            "roles": roles,
            "scopes": {"scope": p.scope, "allows": scopes_allow},
            "allowed": gate,
        }
        with self.service.store.reading() as conn:
            head = conn.execute(sa.select(resource.c.pk, resource.c.deleted).where(
                resource.c.type == self.rtype, resource.c.id == self.rid)).first()
            found = self.service.store.current(conn, self.rtype, self.rid) if head is not None else None
            content = jsonfmt.loads(found.content) if found is not None and found.content else None
            out["resource"] = self._resource(conn, head, content)
            pk = head.pk if head is not None else None
            # The row reach, per rule, then as the server asks it (scopes and every rule together).
            out["reach"] = [self._rule_reach(conn, name, rule, pk, out["resource"]) for name, rule in
                            zip([r["role"] for r in roles], policy.rules) if rule.may(self.row_interaction, self.rtype)]
            final_cond = policy.where(self.letter, (self.rtype,), resource)
            scoped_cond = policy.access.where(self.letter, (self.rtype,), resource) if policy.access else None
            reached = pk is not None and not head.deleted and _holds(conn, resource, final_cond, resource.c.pk == pk)
            in_scopes = pk is not None and _holds(conn, resource, scoped_cond, resource.c.pk == pk)
            out["scopes"]["row"] = in_scopes
            expected = pk is not None and not head.deleted and in_scopes and any(r["reaches"] for r in out["reach"])
            if expected != reached:
                self.problems.append(f"the rules' reach combined ({_yes(expected)}) differs from RequestPolicy.where "
                                     f"({_yes(reached)})")
            out["reached"] = reached
            out["answer"] = self._answer(conn, gate, reached, found, out)
        out["inconsistencies"] = self.problems
        return out

    @property
    def principal(self) -> Principal:
        return self.policy.principal

    # -- steps --------------------------------------------------------------------------------------

    def _caller(self) -> dict[str, Any]:
        p, c = self.principal, self.caller
        requester = f"{p.issuer}|{p.subject or p.client_id}"
        out = {"user": self.user, "roles": sorted(p.roles), "fhirUser": p.fhir_user, "organization": p.organization,
               "patient": p.patient, "purpose": p.purpose_of_use, "actsAs": list(c.refs),
               "careTeams": list(c.careteams),
               "breakGlass": dict(c.break_glass), "requester": requester}
        if self.user is not None and (registered := Registry(self.service.store).user(self.user)) is not None:
            out["active"] = registered.active
        if not p.emergency and "clinician" in p.roles:
            # Open grants that do not count: only a token with purpose ETREAT uses them.
            idle = self.pdp.break_glass.active(requester, now=c.now)
            if idle:
                out["idleBreakGlass"] = idle
        return out

    def _roles(self) -> list[dict[str, Any]]:
        names = [r for r in sorted(self.principal.roles) if r in ROLE_RULES]
        if not names:
            system = self.principal.scopes and all(s.context == "system" for s in self.principal.scopes)
            names = ["(system client: scopes only, as integration)" if system else "(no carebroker role)"]
        out = []
        for name, rule in zip(names, self.policy.rules):
            out.append({"role": name, "allows": rule.may(self.interaction, self.rtype), "rows": rule.rows,
                        "searchOnly": rule.interactions <= SEARCH_ONLY})
        # (zip: _rules gives one rule per known role in sorted order, or the one fallback rule)
        return out

    def _resource(self, conn: sa.Connection, head: Any, content: dict[str, Any] | None) -> dict[str, Any]:
        if head is None:
            return {"exists": False, "deleted": False, "directory": self.rtype in DIRECTORY}
        subjects = conn.execute(sa.select(policy_subject.c.param, policy_subject.c.patient_id,
                                          policy_subject.c.custodian, policy_subject.c.flags,
                                          policy_subject.c.data_lo, policy_subject.c.data_hi)
                                .where(policy_subject.c.resource_pk == head.pk)
                                .order_by(policy_subject.c.patient_id, policy_subject.c.param)).all()
        labels = sorted(f"{_short(s)}|{c}" for s, c in facts.security_labels(content)) if content else []
        return {"exists": True, "deleted": bool(head.deleted), "directory": self.rtype in DIRECTORY,
                "custodian": facts.custodian_of(content) if content else None, "labels": labels,
                "subjects": [{"patient": s.patient_id, "via": s.param, "custodian": s.custodian,
                              "flags": _flags(s.flags), "dataPeriod": _span(s.data_lo, s.data_hi)} for s in subjects]}

    def _rule_reach(self, conn: sa.Connection, name: str, rule: Any, pk: int | None,
                    res: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"role": name, "rows": rule.rows, "meaning": ROW_KINDS[rule.rows]}
        if rule.rows == "all" or self.rtype in DIRECTORY:
            out["reaches"] = pk is not None
            if rule.rows != "all":
                out["note"] = f"{self.rtype} is a directory type: part of nobody's record, every row is reached"
            return out
        cond = self.policy.rows_reached(rule, self.letter, resource, True)
        out["reaches"] = pk is not None and _holds(conn, resource, cond, resource.c.pk == pk)
        if pk is None:
            return out
        patients = _patients(res["subjects"])
        if not patients:
            out["note"] = "part of no patient's record: outside every patient's compartment"
        if rule.rows == "own":
            mine = self.principal.patient
            out["patient"] = mine
            out["patients"] = [{"patient": pid, "own": pid == mine} for pid in patients]
            composite = bool(patients) and mine in patients
        elif rule.rows == "deidentified":
            out["deidentified"] = self._deidentified(conn, pk, res, patients)
            composite = out["deidentified"]["reaches"]
        else:
            out["care"] = care = self._care(conn, pk, res, patients)
            composite = care["reaches"]
            if self.letter in ("u", "d"):
                custodian_only = not care["foreign"]
                out["custodianOnly"] = {"applies": True, "ok": custodian_only}
                composite = composite and custodian_only
        if composite != out["reaches"]:
            self.problems.append(f"{name}: the verdicts combined ({_yes(composite)}) differ from the rule's SQL "
                                 f"condition ({_yes(out['reaches'])})")
        return out

    # -- direct care ----------------------------------------------------------------------------------

    def _care(self, conn: sa.Connection, pk: int, res: dict[str, Any],
              patients: dict[str, list[str]]) -> dict[str, Any]:
        caller = self.caller
        custodian = next((s["custodian"] for s in res["subjects"]), None)
        foreign = (custodian or "") != (caller.organization or "")
        out: dict[str, Any] = {"custodian": custodian, "organization": caller.organization, "foreign": foreign,
                               "patients": []}
        for pid, vias in patients.items():
            subject = next(s for s in res["subjects"] if s["patient"] == pid)
            flags = set(subject["flags"])
            ps = policy_subject.alias()
            related = _holds(conn, ps, is_related(ps.c.patient_id, caller), ps.c.resource_pk == pk,
                             ps.c.patient_id == pid)
            row = ps.join(resource, resource.c.pk == ps.c.resource_pk)
            denies = _holds(conn, row, consents_deciding(ps, resource, caller, consent_denies),
                            ps.c.resource_pk == pk, ps.c.patient_id == pid)
            permits = _holds(conn, row, consents_deciding(ps, resource, caller, consent_permits_explicitly),
                             ps.c.resource_pk == pk, ps.c.patient_id == pid)
            hidden = foreign and "hidden (REDACTED)" in flags
            sensitive = "sensitive" in flags
            entry = {
                "patient": pid, "via": vias, "flags": sorted(flags),
                "relationships": self._relationships(conn, pid),
                "breakGlass": caller.break_glass.get(pid),
                "related": related,
                "consents": self._consents(conn, pk, pid),
                "consentDenies": denies, "explicitlyPermitted": permits, "sensitive": sensitive,
                # The verdicts `care_rows` combines (each only binds users of another organisation).
                "hidden": hidden, "denied": foreign and denies,
                "sensitiveWithheld": foreign and sensitive and not permits,
            }
            for key, verdict in (("denies", denies), ("permitsExplicitly", permits)):
                if any(c.get(key) for c in entry["consents"]) != verdict:
                    self.problems.append(f"Patient/{pid}: the Consents one by one ({key}) differ from consents_deciding "
                                         f"({_yes(verdict)})")
            out["patients"].append(entry)
        ps = out["patients"]
        out["verdicts"] = {
            "related": any(e["related"] for e in ps),
            "hidden": any(e["hidden"] for e in ps),
            "denied": any(e["denied"] for e in ps),
            "sensitiveWithheld": any(e["sensitiveWithheld"] for e in ps),
        }
        v = out["verdicts"]
        out["reaches"] = v["related"] and not (v["hidden"] or v["denied"] or v["sensitiveWithheld"])
        care_sql = _holds(conn, resource, care_rows(resource, caller), resource.c.pk == pk)
        if care_sql != out["reaches"]:
            self.problems.append(f"direct care: the per-patient verdicts combined ({_yes(out['reaches'])}) differ "
                                 f"from care_rows ({_yes(care_sql)})")
        return out

    def _relationships(self, conn: sa.Connection, pid: str) -> list[dict[str, Any]]:
        """The policy_relationship rows of `pid` naming one of the caller's references."""
        caller, rel, src = self.caller, policy_relationship, resource.alias()
        if not caller.refs:
            return []
        rows = conn.execute(sa.select(rel.c.param, rel.c.actor, rel.c.until, src.c.type, src.c.id)
                            .select_from(rel.join(src, src.c.pk == rel.c.resource_pk))
                            .where(rel.c.patient_id == pid, rel.c.actor.in_(caller.refs))
                            .order_by(src.c.type, src.c.id, rel.c.actor)).all()
        return [{"kind": r.param, "actor": r.actor, "source": f"{r.type}/{r.id}",
                 "until": to_instant(r.until) if r.until is not None else None,
                 "current": r.until is None or r.until > caller.now} for r in rows]

    def _consents(self, conn: sa.Connection, pk: int, pid: str) -> list[dict[str, Any]]:
        """Each Consent of `pid`: its flattened provisions, whether each applies to this row for this
        caller (`provision_applies`), and whether the Consent denies / explicitly permits (`consents_deciding`)."""
        caller = self.caller
        c, ps, src = policy_consent.alias(), policy_subject.alias(), resource.alias()
        param = conn.execute(sa.select(sa.func.min(ps.c.param)).where(ps.c.resource_pk == pk,
                                                                      ps.c.patient_id == pid)).scalar()
        rows = conn.execute(
            sa.select(c.c.resource_pk, src.c.type, src.c.id, c.c.param, c.c.depth, c.c.effect, c.c.explicit,
                      c.c.groups, c.c.lo, c.c.hi, c.c.data_lo, c.c.data_hi,
                      sa.case((provision_applies(c, ps, resource, caller), 1), else_=0).label("applies"))
            .select_from(c.join(src, src.c.pk == c.c.resource_pk).join(ps, ps.c.patient_id == c.c.patient_id)
                         .join(resource, resource.c.pk == ps.c.resource_pk))
            .where(c.c.patient_id == pid, ps.c.resource_pk == pk, ps.c.param == param)
            .order_by(src.c.id, c.c.param)).all()
        terms: dict[tuple[int, str], dict[int, list[str]]] = {}
        if rows:
            t = policy_consent_term
            for r in conn.execute(sa.select(t.c.resource_pk, t.c.param, t.c.kind, t.c.grp, t.c.system, t.c.code)
                                  .where(t.c.resource_pk.in_({r.resource_pk for r in rows}))
                                  .order_by(t.c.grp, t.c.code)):
                groups = terms.setdefault((r.resource_pk, r.param), {})
                groups.setdefault(r.grp, [r.kind]).append(f"{_short(r.system)}|{r.code}" if r.system else r.code)
        by_consent: dict[int, dict[str, Any]] = {}
        for r in rows:
            entry = by_consent.setdefault(r.resource_pk, {"consent": f"{r.type}/{r.id}", "provisions": [],
                                                          "secondaryOptOut": None})
            if r.effect == "secondary-opt-out":
                in_force = (r.lo is None or r.lo <= caller.now) and (r.hi is None or r.hi > caller.now)
                entry["secondaryOptOut"] = {"period": _span(r.lo, r.hi), "inForce": in_force}
                continue
            groups = terms.get((r.resource_pk, r.param), {})
            entry["provisions"].append({
                "path": r.param, "effect": r.effect, "depth": r.depth, "explicit": bool(r.explicit),
                "period": _span(r.lo, r.hi), "dataPeriod": _span(r.data_lo, r.data_hi),
                "groups": [{"kind": groups[g][0], "values": groups[g][1:]} if g in groups else
                           {"kind": "?", "values": [], "note": "names nothing usable: matches nothing"}
                           for g in range(r.groups)],
                "applies": bool(r.applies)})
        for cpk, entry in by_consent.items():
            if not entry["provisions"]:
                entry["privacy"] = False
                continue
            entry["privacy"] = True
            entry["denies"] = self._consent_decides(conn, pk, pid, cpk, consent_denies)
            entry["permitsExplicitly"] = self._consent_decides(conn, pk, pid, cpk, consent_permits_explicitly)
            applying = [p for p in entry["provisions"] if p["applies"]]
            entry["deepest"] = _deepest_applying(applying)
            if (entry["deepest"] is not None and entry["deepest"]["effect"] == "deny") != entry["denies"]:
                self.problems.append(f"{entry['consent']}: its deepest applying provision and consent_denies disagree")
        out = list(by_consent.values())
        out += self._silent_consents(conn, pid, set(by_consent))
        return out

    def _consent_decides(self, conn: sa.Connection, pk: int, pid: str, consent_pk: int, decides: Any) -> bool:
        """Whether this one Consent's applying provisions meet `decides` (`consent_denies`,
        `consent_permits_explicitly`): `consents_deciding` narrowed to that Consent (the patient's
        verdict is `consents_deciding` itself; `_care` checks the two agree)."""
        ps = policy_subject.alias()
        return _holds(conn, ps.join(resource, resource.c.pk == ps.c.resource_pk),
                      consents_deciding(ps, resource, self.caller, decides, consent_pk),
                      ps.c.resource_pk == pk, ps.c.patient_id == pid)

    def _silent_consents(self, conn: sa.Connection, pid: str, known: set[int]) -> list[dict[str, Any]]:
        """The patient's Consents that state no policy rows (not active, not about privacy, never in force)."""
        ref, cr = search_reference, resource.alias()
        rows = conn.execute(sa.select(cr.c.pk, cr.c.id).select_from(ref.join(cr, cr.c.pk == ref.c.resource_pk))
                            .where(ref.c.type == "Consent", ref.c.param == "patient", ref.c.target_type == "Patient",
                                   ref.c.target_id == pid, cr.c.deleted.is_(False)).distinct().order_by(cr.c.id)).all()
        out = []
        for r in rows:
            if r.pk in known:
                continue
            found = self.service.store.current(conn, "Consent", r.id)
            body = jsonfmt.loads(found.content) if found is not None and found.content else {}
            out.append({"consent": f"Consent/{r.id}", "status": body.get("status"), "provisions": [],
                        "secondaryOptOut": None, "privacy": False, "silent": True})
        return out

    # -- secondary use ---------------------------------------------------------------------------------

    def _deidentified(self, conn: sa.Connection, pk: int, res: dict[str, Any],
                      patients: dict[str, list[str]]) -> dict[str, Any]:
        entries = []
        for pid in patients:
            subject = next(s for s in res["subjects"] if s["patient"] == pid)
            consents = self._consents(conn, pk, pid)
            opt_outs = [{"consent": c["consent"], **c["secondaryOptOut"]} for c in consents if c["secondaryOptOut"]]
            hidden = "hidden (REDACTED)" in subject["flags"]
            excluded = hidden or any(o["inForce"] for o in opt_outs)
            entries.append({"patient": pid, "hidden": hidden, "optOuts": opt_outs, "excluded": excluded})
        reaches = _holds(conn, resource, deidentified_rows(resource, self.caller.now), resource.c.pk == pk)
        if reaches == any(e["excluded"] for e in entries):
            self.problems.append(f"secondary use: the per-patient exclusions differ from deidentified_rows "
                                 f"({_yes(reaches)})")
        return {"patients": entries, "reaches": reaches}

    # -- the answer ------------------------------------------------------------------------------------

    def _answer(self, conn: sa.Connection, gate: bool, reached: bool, found: Version | None,
                out: dict[str, Any]) -> dict[str, Any]:
        what = f"{self.interaction} of {self.rtype}"
        kinds = {r.rows for r in self.policy.rules}
        if not gate:
            if not self.policy.allows(self.interaction, self.rtype):
                roles = ", ".join(sorted(self.principal.roles)) or "no carebroker role"
                reason = f"{what} is not allowed for {roles}"
            else:
                reason = f"the token's scopes ({self.principal.scope or 'none'}) grant no {what}"
            return {"status": 403, "outcome": "forbidden", "reason": reason,
                    "notes": ["refused before any row is looked at: the same for every resource of the type"]}
        notes: list[str] = []
        if self.letter == "s":
            answer = {"status": 200, "outcome": "included" if reached else "left out",
                      "reason": self._why(reached, out, search=True)}
            if not reached:
                notes.append("the search answers 200 without it: not in the results, nor in any total")
        elif self.letter == "r":
            if reached:
                answer = {"status": 200, "outcome": "visible", "reason": self._why(True, out)}
            else:
                refusal: FhirError = self.policy.refusal(conn, self.rtype, self.rid)
                answer = {"status": refusal.status, "outcome": "forbidden" if refusal.status == 403 else "not found",
                          "reason": self._why(False, out),
                          "server": refusal.issues[0].diagnostics if refusal.issues else ""}
                if refusal.status == 403:
                    notes.append("403 is also the answer for an id that does not exist: it does not tell "
                                 "whether the resource exists")
                elif "care" in kinds and not kinds & {"all"} and out["resource"]["exists"]:
                    notes.append("404, not 403: you are related to the patient, so the record is yours to see; "
                                 "this resource is not")
        else:
            status = 201 if self.letter == "c" else 200
            answer = {"status": status if reached else 403, "outcome": "allowed" if reached else "forbidden",
                      "reason": self._why(reached, out)}
        if reached and self.letter in "rs":
            answer["deidentified"] = kinds == {"deidentified"}
            answer["redacted"] = False
            if self.rtype == "Patient" and found is not None and not answer["deidentified"]:
                shown = self.policy.present(found)
                answer["redacted"] = shown.content != found.content
        answer["notes"] = notes
        return answer

    def _why(self, reached: bool, out: dict[str, Any], search: bool = False) -> str:
        res = out["resource"]
        ref = f"{self.rtype}/{self.rid}"
        if not res["exists"]:
            return f"there is no {ref}"
        if res["deleted"]:
            return f"{ref} is deleted"
        if reached:
            how = next((r for r in out["reach"] if r["reaches"]), None)
            if how is None:
                return "reached"
            if how["rows"] == "all" or self.rtype in DIRECTORY:
                return f"{how['role']} reaches every row of {self.rtype}"
            if how["rows"] == "own":
                return f"it is part of your own record (Patient/{how['patient']})"
            if how["rows"] == "deidentified":
                return "none of its patients opted out of secondary use"
            care = how["care"]
            rel = [e for e in care["patients"] if e["related"]]
            basis = _relation_text(rel[0]) if rel else "a relationship"
            if care["foreign"]:
                return f"you have {basis}; it is {care['custodian'] or 'unattributed'} data, and nothing withholds it"
            return f"you have {basis}; it is your organisation's own data"
        reasons = []
        for r in out["reach"]:
            if r["rows"] == "own":
                reasons.append(f"{r['role']}: it is not part of your own record")
            elif r["rows"] == "deidentified":
                excl = [_exclusion_text(e) for e in r["deidentified"]["patients"] if e["excluded"]]
                reasons.append(f"{r['role']}: {'; '.join(excl) or 'not reached'}")
            elif "care" in r:
                reasons.append(f"{r['role']}: " + _care_reason(r["care"], r.get("custodianOnly")))
            elif "note" in r and r["rows"] != "all":
                reasons.append(f"{r['role']}: {r['note']}")
        if len(reasons) == 1:
            reasons = [reasons[0].split(": ", 1)[1]]
        if not out["scopes"]["row"]:
            pinned = f" (Patient/{self.principal.patient}'s record)" if self.policy.pinned_patient() else ""
            reasons.append(f"the row is outside what the token's scopes reach{pinned}")
        return "; ".join(reasons) or f"no role of yours reaches rows of {self.rtype}"


def _exclusion_text(entry: dict[str, Any]) -> str:
    if entry["hidden"]:
        return f"Patient/{entry['patient']} is REDACTED"
    consents = ", ".join(o["consent"] for o in entry["optOuts"] if o["inForce"])
    return f"Patient/{entry['patient']} has a secondary-use opt-out in force ({consents})"


def _care_reason(care: dict[str, Any], custodian_only: dict[str, Any] | None) -> str:
    v = care["verdicts"]
    if not care["patients"]:
        return "it is part of no patient's record, and direct care reaches only patients' records"
    if not v["related"]:
        who = ", ".join(f"Patient/{e['patient']}" for e in care["patients"])
        return (f"you have no legitimate relationship with {who} "
                "(no care team, encounter, GP registration or break-glass)")
    parts = []
    for e in care["patients"]:
        if e["hidden"]:
            parts.append(f"Patient/{e['patient']} is REDACTED: they do not exist outside {care['custodian']}")
        if e["denied"]:
            deny = [c["consent"] for c in e["consents"] if c.get("denies")]
            parts.append(f"{', '.join(deny) or 'a Consent'} of Patient/{e['patient']} withholds "
                         f"{care['custodian'] or 'unattributed'}'s data from other organisations")
        if e["sensitiveWithheld"]:
            parts.append(f"it is sensitive ({care['custodian'] or 'no custodian'}'s) and no Consent of "
                         f"Patient/{e['patient']} explicitly permits you")
    if not parts and custodian_only is not None and not custodian_only["ok"]:
        parts.append(f"only {care['custodian'] or 'the custodian'}'s users change or delete its data")
    return "; ".join(parts) or "not reached"


def _relation_text(entry: dict[str, Any]) -> str:
    current = [r for r in entry["relationships"] if r["current"]]
    if current:
        r = current[0]
        return f"a relationship with Patient/{entry['patient']} ({KIND_NAMES.get(r['kind'], r['kind'])} {r['source']})"
    if entry["breakGlass"]:
        return f"a break-glass grant for Patient/{entry['patient']} ({entry['breakGlass']})"
    return f"a relationship with Patient/{entry['patient']}"


# -- helpers ---------------------------------------------------------------------------------------

def _holds(conn: sa.Connection, table: sa.FromClause, cond: sa.ColumnElement[bool] | None,
           *where: sa.ColumnElement[bool]) -> bool:
    """Whether `cond` (None: true) holds for the rows of `table` that `where` picks (the resource's
    row, or one of its policy_subject rows): the condition is correlated with them, as inside a query."""
    conds = [*where, *([cond] if cond is not None else [])]
    return conn.execute(sa.select(sa.literal(1)).select_from(table).where(*conds).limit(1)).first() is not None


def _patients(subjects: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in subjects:
        out.setdefault(s["patient"], []).append(s["via"])
    return out


def _flags(value: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES if value & bit]


def _span(lo: int | None, hi: int | None) -> dict[str, str | None] | None:
    lo = None if lo is None or lo <= MIN_US else lo
    hi = None if hi is None or hi >= MAX_US else hi
    if lo is None and hi is None:
        return None
    return {"start": to_instant(lo) if lo is not None else None, "end": to_instant(hi) if hi is not None else None}


def _short(system: str | None) -> str:
    return (system or "").rstrip("/").rsplit("/", 1)[-1]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _deepest_applying(applying: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not applying:
        return None
    depth = max(p["depth"] for p in applying)
    at = [p for p in applying if p["depth"] == depth]
    return {"depth": depth, "effect": "deny" if any(p["effect"] == "deny" for p in at) else "permit",
            "paths": [p["path"] for p in at]}


# -- text -------------------------------------------------------------------------------------------

def render_text(report: dict[str, Any]) -> str:
    """The explanation for a reader in Information Governance: short lines, ids and reasons."""
    c, req, res = report["caller"], report["request"], report["resource"]
    ref = req["resource"]
    who = c["user"] or c["fhirUser"] or "the caller"
    if req["permission"] == "s":
        question = f"Would {who}'s {req['interaction']} of {ref.split('/')[0]} include {ref}?"
    else:
        question = f"Can {who} {req['interaction']} {ref}?"
    lines = [question,
             f"  roles {', '.join(c['roles']) or 'none'} | fhirUser {c['fhirUser'] or '-'}",
             f"  organisation {c['organization'] or '-'} | purpose of use {c['purpose']}"]
    if c.get("active") is False:
        lines.append("  (this account is inactive: it cannot log in now)")
    if c["patient"]:
        lines.append(f"  patient Patient/{c['patient']}")
    lines.append(f"  acts as: {', '.join(c['actsAs']) or 'nobody (no fhirUser, no organisation)'}")
    teams = c["careTeams"][:SHOWN_CARE_TEAMS]
    more = f", ... ({len(c['careTeams'])} in all)" if len(c["careTeams"]) > SHOWN_CARE_TEAMS else ""
    lines.append(f"  care teams: {', '.join(teams) or 'none'}{more}")
    if c["breakGlass"]:
        grants = ", ".join(f"Patient/{p} ({g})" for p, g in c["breakGlass"].items())
        lines.append(f"  break-glass grants open: {grants}")
    if c.get("idleBreakGlass"):
        lines.append(f"  open break-glass grants that do not count (purpose is not {EMERGENCY_PURPOSE}): "
                     + ", ".join(f"Patient/{p}" for p in c["idleBreakGlass"]))
    if req["defaulted"] and req["interaction"] != "read":
        lines.append(f"  ({req['interaction']}: the roles may not read single resources; --interaction to change)")

    lines += ["", "1. Role rules"]
    for r in report["roles"]:
        extra = " (search only)" if r["searchOnly"] else ""
        allowed = "allowed" if r["allows"] else "NOT allowed"
        rtype = ref.split("/")[0]
        lines.append(f"   {r['role']}: {req['interaction']} of {rtype}: {allowed}{extra}; rows: {r['rows']}")
    s = report["scopes"]
    lines.append(f"   token scopes {s['scope']}: {'allow' if s['allows'] else 'do NOT allow'} it"
                 + ("" if s.get("row", True) or not res["exists"] else "; this row is outside them"))

    lines += ["", f"2. The resource: {ref}"]
    if not res["exists"]:
        lines.append("   does not exist")
    else:
        if res["deleted"]:
            lines.append("   deleted")
        if res["directory"]:
            lines.append("   a directory type: part of nobody's record")
        else:
            lines.append(f"   custodian {res['custodian'] or 'none'}; labels {', '.join(res['labels']) or 'none'}")
            flags = sorted({f for s in res["subjects"] for f in s["flags"]})
            if flags:
                lines.append(f"   policy flags: {', '.join(flags)}")
            pats = _patients(res["subjects"])
            lines.append("   record of: " + (", ".join(f"Patient/{p} (via {', '.join(v)})" for p, v in pats.items())
                                             or "no patient"))
            dates = next((s["dataPeriod"] for s in res["subjects"] if s["dataPeriod"]), None)
            if dates:
                lines.append(f"   clinical date: {_period_text(dates)}")

    lines += ["", "3. Row reach"]
    if not report["allowed"] and report["reach"]:
        lines.append("   (for information only: the request is refused at step 1)")
    if not report["reach"]:
        lines.append(f"   no role of yours reaches rows of {ref.split('/')[0]}")
    for r in report["reach"]:
        lines.append(f"   {r['role']} -> {r['rows']}: {r['meaning']}")
        if "note" in r:
            lines.append(f"     {r['note']}")
        if r["rows"] == "own" and "patients" in r:
            for p in r["patients"]:
                lines.append(f"     Patient/{p['patient']}: {'yours' if p['own'] else 'not yours'}")
        if "deidentified" in r:
            lines += _deidentified_text(r["deidentified"])
        if "care" in r:
            lines += _care_text(r["care"])
        if "custodianOnly" in r:
            lines.append(f"     changes and deletions: only the custodian's users -> "
                         f"{'you are' if r['custodianOnly']['ok'] else 'you are NOT'}")
        lines.append(f"     => {'reached' if r['reaches'] else 'NOT reached'} under {r['role']}")

    a = report["answer"]
    lines += ["", f"Answer: {a['status']} {a['outcome']}"]
    server = [f"(the server answers: {a['server']})"] if a.get("server") else []
    lines += [f"  {text}" for text in (a["reason"], *a.get("notes", ()), *server)]
    if a.get("redacted"):
        lines.append("  shown redacted: address, telecom, GP, contacts and photo withheld (tagged SUBSETTED)")
    if a.get("deidentified"):
        lines.append("  shown de-identified: pseudonymised ids and identifiers, no names or contact details")
    if report["inconsistencies"]:
        lines += ["", "WARNING: this explanation disagrees with the policy (a bug; please report it):"]
        lines += [f"  {p}" for p in report["inconsistencies"]]
    return "\n".join(_wrapped(lines))


def _wrapped(lines: list[str]) -> list[str]:
    """Lines longer than WIDTH wrapped, continued indented under their start."""
    out = []
    for line in lines:
        if len(line) <= WIDTH:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        out += textwrap.wrap(line.lstrip(), WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                             break_on_hyphens=False, break_long_words=False)
    return out


def _care_text(care: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for e in care["patients"]:
        lines.append(f"     Patient/{e['patient']}")
        rels = e["relationships"]
        if rels:
            lines.append("       your relationships:")
            for r in rels:
                until = f"until {r['until']}" if r["until"] else "open-ended"
                lapsed = "" if r["current"] else " (LAPSED)"
                kind = KIND_NAMES.get(r["kind"], r["kind"])
                lines.append(f"         {kind}: {r['source']}, naming {r['actor']}, {until}{lapsed}")
        else:
            lines.append("       your relationships: none")
        lines.append(f"       break-glass: {e['breakGlass'] or 'none'}")
        lines.append(f"       => related: {_yes(e['related'])}")
    if care["patients"]:
        lines.append(f"     custodian {care['custodian'] or 'none'}; "
                     f"you are {care['organization'] or 'no organisation'}")
        if care["foreign"]:
            lines.append("       another organisation's data: the patient's Consents, sensitivity labels")
            lines.append("       and REDACTED status apply to you")
        else:
            lines.append("       your organisation's own data: Consents, labels and REDACTED do not withhold it")
    for e in care["patients"]:
        if not e["consents"]:
            lines.append(f"     Patient/{e['patient']} Consents: none")
        for cons in e["consents"]:
            lines += _consent_text(e["patient"], cons)
        permit = ", explicitly permitted" if e["explicitlyPermitted"] else ", no explicit permit"
        sensitivity = f"sensitive label{permit}" if e["sensitive"] else "none"
        lines.append(f"     Patient/{e['patient']} sensitivity: {sensitivity}")
        lines.append(f"       => hidden: {_yes(e['hidden'])}; denied: {_yes(e['denied'])}; "
                     f"explicitly permitted: {_yes(e['explicitlyPermitted'])}; "
                     f"withheld as sensitive: {_yes(e['sensitiveWithheld'])}")
    return lines


def _consent_text(pid: str, cons: dict[str, Any]) -> list[str]:
    if cons.get("silent"):
        return [f"     {cons['consent']} (Patient/{pid}): status {cons['status'] or '?'}; states no rule (no effect)"]
    lines = [f"     {cons['consent']} (Patient/{pid}):"]
    if cons["secondaryOptOut"]:
        o = cons["secondaryOptOut"]
        lines.append(f"       secondary-use opt-out (Type 1 / National Data Opt-out), {_period_text(o['period'])}, "
                     f"{'in force' if o['inForce'] else 'not in force'}")
    for p in cons["provisions"]:
        groups = " and ".join(f"{g['kind']} {' or '.join(g['values']) or '(nothing usable)'}"
                              for g in p["groups"]) or "always (no conditions)"
        extra = f", data {_period_text(p['dataPeriod'])}" if p["dataPeriod"] else ""
        lines.append(f"       provision {p['path']}: {p['effect']} (depth {p['depth']}), "
                     f"in force {_period_text(p['period'])}{extra}")
        lines.append(f"         when: {groups}")
        lines.append(f"         -> {'APPLIES' if p['applies'] else 'does not apply'} to this row for you")
    if cons["privacy"]:
        d = cons.get("deepest")
        deepest = f" (deepest applying provision: {', '.join(d['paths'])}, a {d['effect']})" if d else ""
        verdict = "DENIES this row" if cons["denies"] else "does not deny this row"
        if cons["permitsExplicitly"]:
            verdict += "; explicitly PERMITS it"
        lines.append(f"       => {verdict}{deepest}")
    return lines


def _period_text(span: dict[str, str | None] | None) -> str:
    if not span:
        return "always"
    return f"{_when(span['start'])} to {_when(span['end'])}"


def _when(instant: str | None) -> str:
    """An instant, short: a date when it is midnight UTC."""
    if instant is None:
        return "..."
    short = instant.replace(".000+00:00", "Z")
    return short.removesuffix("T00:00:00Z")


def _deidentified_text(d: dict[str, Any]) -> list[str]:
    lines = []
    for e in d["patients"]:
        lines.append(f"     Patient/{e['patient']}" + (" [hidden (REDACTED)]" if e["hidden"] else ""))
        if not e["optOuts"]:
            lines.append("       secondary-use opt-outs: none")
        for o in e["optOuts"]:
            lines.append(f"       {o['consent']}: secondary-use opt-out, {_period_text(o['period'])}, "
                         f"{'in force' if o['inForce'] else 'not in force'}")
        lines.append(f"       => left out of secondary use: {_yes(e['excluded'])}")
    return lines
