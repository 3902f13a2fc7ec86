"""Break-glass: a clinician's time-limited emergency access to one patient's record, and every
request made under it, kept durably so that Information Governance can review it
(`carebroker policy break-glass`). The audit log will take these records over.

A grant is keyed by the requester (`issuer|subject`), not by the token: a new token in the same
emergency keeps the grant, and another clinician needs a grant (and a reason) of their own.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from fhir_server.service.timefmt import now_us
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import break_glass, break_glass_access

DEFAULT_TTL = 3600  # seconds a grant lasts
TTL_ENV = "CAREBROKER_BREAK_GLASS_TTL"
MAX_REASON = 1000  # characters of the reason kept

# Asked on every request of an emergency-purpose clinician: built once, one probe of
# ix_break_glass_requester. Latest-expiring last, so it wins when turned into a dict.
_ACTIVE = (sa.select(break_glass.c.patient_id, break_glass.c.id)
           .where(break_glass.c.requester == sa.bindparam("requester"), break_glass.c.expires > sa.bindparam("now"))
           .order_by(break_glass.c.expires))


@dataclass(frozen=True)
class Grant:
    id: str
    requester: str  # issuer|subject
    fhir_user: str | None
    organization: str | None
    patient_id: str
    reason: str
    started: int  # microseconds since the epoch
    expires: int


class BreakGlassLog:
    """Grants and their accesses in the `break_glass` and `break_glass_access` tables."""

    def __init__(self, store: Store, ttl: int | None = None) -> None:
        self.store = store
        self.ttl = ttl if ttl is not None else int(os.environ.get(TTL_ENV, DEFAULT_TTL))

    def open(self, requester: str, fhir_user: str | None, organization: str | None, patient_id: str,
             reason: str, ttl: int | None = None, now: int | None = None) -> Grant:
        """The requester's open grant for the patient, else a new one: repeating the header during an
        emergency does not stack grants (nor extend one)."""
        reason = reason.strip()[:MAX_REASON].rstrip()
        if not reason:
            raise ValueError("break-glass access needs a reason")
        now = now_us() if now is None else now
        with self.store.writing() as conn:
            self.store.lock_key(conn, f"break-glass|{requester}|{patient_id}")  # two first requests: one grant
            row = conn.execute(sa.select(break_glass).where(
                break_glass.c.requester == requester, break_glass.c.patient_id == patient_id,
                break_glass.c.expires > now).order_by(break_glass.c.expires.desc()).limit(1)).first()
            if row is not None:
                return Grant(**row._mapping)
            grant = Grant(str(uuid.uuid4()), requester, fhir_user, organization, patient_id, reason, now,
                          now + (self.ttl if ttl is None else ttl) * 1_000_000)
            conn.execute(break_glass.insert().values(**asdict(grant)))
        return grant

    def active(self, requester: str, now: int | None = None) -> dict[str, str]:
        """Patient id -> grant id of the requester's unexpired grants."""
        with self.store.single_read() as conn:
            rows = conn.execute(_ACTIVE, {"requester": requester, "now": now_us() if now is None else now})
            return {patient: grant for patient, grant in rows}

    def record(self, grant_ids: Iterable[str], method: str, url: str, status: int, resources: Iterable[str]) -> None:
        """One access row per grant, committed before returning: an emergency read is not left
        unrecorded by a crash after the response. (Inside a `Store.atomic()` block it joins, and
        commits with, that block's transaction.)"""
        ids = list(dict.fromkeys(grant_ids))
        if not ids:
            return
        row = {"at": now_us(), "method": method, "url": url, "status": status,
               "resources": json.dumps(list(dict.fromkeys(resources)))}
        with self.store.writing() as conn:
            conn.execute(break_glass_access.insert(), [{"grant_id": g, **row} for g in ids])

    def list(self, *, patient_id: str | None = None, requester: str | None = None,
             since: int | None = None) -> list[tuple[Grant, list[dict[str, Any]]]]:
        """Grants newest first, each with its accesses oldest first. `requester` matches any part of
        `issuer|subject` (a reviewer knows the user's name, rarely the issuer URL); `since` keeps
        grants started at or after it."""
        conds: list[sa.ColumnElement[bool]] = []
        if patient_id is not None:
            conds.append(break_glass.c.patient_id == patient_id)
        if requester is not None:
            conds.append(break_glass.c.requester.contains(requester, autoescape=True))
        if since is not None:
            conds.append(break_glass.c.started >= since)
        access = break_glass_access.c
        with self.store.reading() as conn:
            grants = [Grant(**r._mapping) for r in conn.execute(
                sa.select(break_glass).where(*conds).order_by(break_glass.c.started.desc(), break_glass.c.id))]
            rows = conn.execute(
                sa.select(access.grant_id, access.at, access.method, access.url, access.status, access.resources)
                .where(access.grant_id.in_(sa.select(break_glass.c.id).where(*conds))).order_by(access.seq))
            accesses: dict[str, list[dict[str, Any]]] = {g.id: [] for g in grants}
            for r in rows:  # (setdefault: a grant opened between the two statements is not listed)
                accesses.setdefault(r.grant_id, []).append(
                    {"at": r.at, "method": r.method, "url": r.url, "status": r.status,
                     "resources": json.loads(r.resources)})
        return [(g, accesses[g.id]) for g in grants]
