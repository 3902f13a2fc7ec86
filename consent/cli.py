"""`carebroker policy ...`: Information Governance's view of the access policy, read from the
database directly (whoever runs it needs the database URL, as for `serve`).

- `policy break-glass`: emergency accesses for review: who, which patient, why, when, what was read.
- `policy explain`: the decision a request by a user would meet for one resource, step by step:
  role rules, row reach, relationships, custodian, Consents and labels, and the answer (exit
  status 1 if the explanation were ever to disagree with the policy itself: a bug to report).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from consent.break_glass import BreakGlassLog, Grant
from consent.explain import INTERACTIONS, explain, principal_direct, principal_for_user, render_text
from consent.rules import ROLE_RULES
from fhir_server.config import Settings
from fhir_server.service.interactions import FhirService
from fhir_server.service.timefmt import now_us, to_instant
from fhir_server.storage.repository import Store

COMMANDS = frozenset({"policy"})
SHOWN_RESOURCES = 5  # ids listed per access in the text output; --json has them all


def add_parsers(sub: Any) -> None:
    """Add `policy` and its subcommands to the `carebroker` argument parser."""
    policy = sub.add_parser("policy", help="review the access policy's records (Information Governance)")
    policy_sub = policy.add_subparsers(dest="action", required=True)

    bg = policy_sub.add_parser("break-glass", help="list break-glass grants, newest first, with every "
                                                   "request made under each")
    bg.add_argument("--patient", metavar="ID", help="only grants for this Patient id")
    bg.add_argument("--user", metavar="REQUESTER", help="only grants whose requester (issuer|subject) "
                                                         "contains this")
    bg.add_argument("--since", metavar="DATE_OR_INSTANT", help="only grants started at or after this "
                                                               "(YYYY-MM-DD is midnight UTC)")
    bg.add_argument("--json", action="store_true", help="print a JSON array")
    bg.add_argument("--database")

    ex = policy_sub.add_parser("explain", help="explain the decision a request by a user would meet for one "
                                               "resource: role rules, relationships, Consents, labels, answer")
    ex.add_argument("--user", metavar="USERNAME", help="a user registered in the built-in authorization server")
    ex.add_argument("--fhir-user", metavar="REF", help="instead of --user: Practitioner/<id>, PractitionerRole/<id>, "
                                                       "Patient/<id>, ...")
    ex.add_argument("--organization", metavar="REF", help="instead of --user: Organization/<id> (default: from the "
                                                          "fhirUser's PractitionerRole)")
    ex.add_argument("--role", action="append", default=[], metavar="ROLE",
                    help=f"instead of --user (repeatable): {', '.join(sorted(ROLE_RULES))}")
    ex.add_argument("--resource", required=True, metavar="TYPE/ID")
    ex.add_argument("--interaction", choices=INTERACTIONS,
                    help="default: read (search-type for roles that may only search)")
    ex.add_argument("--purpose", metavar="CODE", help="purpose of use, e.g. TREAT or ETREAT (break-glass); "
                                                      "default: the user's")
    ex.add_argument("--scope", help="the token's scopes (default: the widest, user/*.cruds or patient/*.cruds)")
    ex.add_argument("--issuer", help="the token issuer, which keys break-glass grants (default: that of the "
                                     "user's open grants)")
    ex.add_argument("--json", action="store_true", help="print the explanation as JSON")
    ex.add_argument("--database")


def run(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    try:
        return _COMMANDS[args.action](args, store)
    except ValueError as exc:
        print(f"carebroker policy {args.action}: {exc}", file=sys.stderr)
        return 2


# -- policy break-glass ---------------------------------------------------------------------------

def _break_glass(args: argparse.Namespace, store: Store) -> int:
    grants = BreakGlassLog(store).list(
        patient_id=args.patient.removeprefix("Patient/") if args.patient else None,
        requester=args.user, since=_parse_since(args.since) if args.since else None)
    if args.json:
        print(json.dumps([_grant_json(g, accesses) for g, accesses in grants], indent=2))
    elif not grants:
        print("no break-glass grants")
    else:
        now = now_us()
        print("\n\n".join(_grant_text(g, accesses, now) for g, accesses in grants))
    return 0


def _parse_since(value: str) -> int:
    """A date (midnight UTC) or an instant; one without a time zone is taken as UTC."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {value!r} is neither a date (YYYY-MM-DD) nor an instant") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1_000_000)


def _grant_json(g: Grant, accesses: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": g.id, "requester": g.requester, "fhirUser": g.fhir_user, "organization": g.organization,
            "patient": g.patient_id, "reason": g.reason, "started": to_instant(g.started),
            "expires": to_instant(g.expires), "accesses": [{**a, "at": to_instant(a["at"])} for a in accesses]}


def _grant_text(g: Grant, accesses: list[dict[str, Any]], now: int) -> str:
    lines = [f"break-glass grant {g.id}{' (open)' if g.expires > now else ''}",
             f"  started       {to_instant(g.started)}",
             f"  expires       {to_instant(g.expires)}",
             f"  requester     {g.requester}",
             f"  fhirUser      {g.fhir_user or '-'}",
             f"  organisation  {g.organization or '-'}",
             f"  patient       Patient/{g.patient_id}",
             f"  reason        {g.reason}",
             f"  accesses      {len(accesses) or 'none'}"]
    for a in accesses:
        ids = a["resources"]
        shown = ", ".join(ids[:SHOWN_RESOURCES]) + (", ..." if len(ids) > SHOWN_RESOURCES else "")
        lines.append(f"    {to_instant(a['at'])}  {a['method']} {a['url']}  {a['status']}  "
                     f"{len(ids)} resource{'' if len(ids) == 1 else 's'}{': ' + shown if ids else ''}")
    return "\n".join(lines)


# -- policy explain ------------------------------------------------------------------------------

def _explain(args: argparse.Namespace, store: Store) -> int:
    rtype, _, rid = args.resource.strip().strip("/").partition("/")
    if not rtype or not rid or "/" in rid:
        raise ValueError(f"--resource {args.resource!r} is not Type/id")
    direct = args.fhir_user or args.organization or args.role
    if bool(args.user) == bool(direct):
        raise ValueError("give --user, or --fhir-user/--organization/--role (not both)")
    service = FhirService(store)
    if args.user:
        principal = principal_for_user(service, args.user, purpose=args.purpose, scope=args.scope, issuer=args.issuer)
    else:
        if unknown := [r for r in args.role if r not in ROLE_RULES]:
            raise ValueError(f"unknown role(s) {', '.join(unknown)}; one of {', '.join(sorted(ROLE_RULES))}")
        principal = principal_direct(service, roles=args.role, fhir_user=args.fhir_user,
                                     organization=args.organization, purpose=args.purpose, scope=args.scope,
                                     issuer=args.issuer)
    report = explain(service, principal, rtype, rid, args.interaction, user=args.user)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 1 if report["inconsistencies"] else 0


_COMMANDS = {
    "break-glass": _break_glass,
    "explain": _explain,
}
