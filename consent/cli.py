"""`carebroker policy ...`: Information Governance's view of the access policy, read from the
database directly (whoever runs it needs the database URL, as for `serve`).

- `policy break-glass`: emergency accesses for review: who, which patient, why, when, what was read.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from consent.break_glass import BreakGlassLog, Grant
from fhir_server.config import Settings
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


_COMMANDS = {
    "break-glass": _break_glass,
    # "explain": a later issue adds it here, with its parser in add_parsers.
}
