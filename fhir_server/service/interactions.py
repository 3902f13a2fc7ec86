"""The FHIR RESTful interactions, written once over the storage primitives, knowing nothing of HTTP.

Each write runs in one database transaction: the version, the head and the search index rows commit
together, before anyone is told the write succeeded. Conditional interactions are the plain ones
plus a search inside the same transaction.
"""
from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import jsonpatch
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from conformance.profiles import known_profiles
from conformance.search_parameters import patient_compartment
from conformance.validation import resource_issues, validate_resource
from fhir_server import jsonfmt
from fhir_server.outcome import FhirError, Issue, error
from fhir_server.search.engine import (Page, compartment_condition, conditional_matches, everything_search,
                                       parse_search, run_search)
from fhir_server.search.index import INDEX_VERSION, IndexRows, index_resource
from fhir_server.service.references import CONDITIONAL_REFERENCE, has_conditional_references, rewrite_references
from fhir_server.service.timefmt import now_us, to_instant
from fhir_server.storage.repository import Head, StaleHead, Store, Version
from fhir_server.storage.schema import resource

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
T = TypeVar("T")


@dataclass
class Result:
    """What a write did: the HTTP-ish status, the version now current, and any informational issues."""

    status: int
    version: Version | None
    issues: list[Issue] = field(default_factory=list)


@dataclass
class HistoryPage:
    versions: list[Version]
    total: int | None
    has_more: bool


def check_id(rid: str) -> str:
    if not ID_PATTERN.fullmatch(rid):
        raise error(400, "invalid", f"'{rid}' is not a valid resource id ([A-Za-z0-9-.], 1 to 64 characters)")
    return rid


def parse_etag(value: str) -> int:
    """`W/"3"` or `"3"` -> 3."""
    raw = value.strip().removeprefix("W/").strip('"')
    if not raw.isdigit():
        raise error(400, "invalid", f"ETag '{value}' is not of the form W/\"<versionId>\"")
    return int(raw)


class RowPolicy(Protocol):
    """What a caller may reach and see (consent/policy.py's `RequestPolicy`): a condition on a
    resource table alias for the rows of `types` (None: any type) that a permission letter (`cruds`)
    reaches, None when it reaches them all; an extra condition on rows matched by a search
    parameter; the one patient every grant is bound to, if so; the answer to a read of a row out of
    reach; each version as shown to the caller; and each resource the caller writes, as stored."""

    def where(self, permission: str, types: Sequence[str] | None, r: sa.FromClause,
              exact: bool = True) -> sa.ColumnElement[bool] | None: ...

    def guard(self, rtype: str, code: str, r: sa.FromClause) -> sa.ColumnElement[bool] | None: ...

    def pinned_patient(self) -> str | None: ...

    def refusal(self, conn: sa.Connection, rtype: str, rid: str) -> FhirError: ...

    def present(self, v: Version) -> Version: ...

    def admit(self, rtype: str, body: dict[str, Any]) -> dict[str, Any]: ...


class FhirService:
    """create, read, vread, update, patch, delete, history and their conditional forms."""

    policy: RowPolicy | None = None  # None: every row (internal callers, or no token checks)

    def __init__(self, store: Store) -> None:
        self.store = store

    def restricted(self, policy: RowPolicy | None) -> "FhirService":
        """The same service, every interaction of it kept to the rows `policy` allows: conditions
        in the queries themselves (so pages and totals count only those), checks on single reads
        and on what writes leave behind."""
        if policy is None:
            return self
        view = copy.copy(self)
        view.policy = policy
        return view

    def _where(self, permission: str, types: Sequence[str] | None,
               r: sa.FromClause = resource) -> sa.ColumnElement[bool] | None:
        return self.policy.where(permission, types, r) if self.policy is not None else None

    def _search_reach(self, r: sa.FromClause, rtype: str | None, nested: bool) -> sa.ColumnElement[bool] | None:
        """For the search engine: the rows of `rtype` (None: any type) a search may reach through
        `r` (chains, `_has`, `_include`/`_revinclude`); `nested`: inside a chain or `_has`."""
        assert self.policy is not None
        return self.policy.where("s", (rtype,) if rtype else None, r, exact=not nested)

    def _reachable(self, conn: sa.Connection, permission: str, rtype: str, rid: str) -> bool:
        """Whether the live resource `rtype/rid` is among the rows `permission` reaches."""
        cond = self._where(permission, (rtype,))
        if cond is None:
            return True
        return conn.execute(sa.select(resource.c.pk).where(
            resource.c.type == rtype, resource.c.id == rid, resource.c.deleted.is_(False), cond)).first() is not None

    def _check_readable(self, conn: sa.Connection, rtype: str, rid: str) -> None:
        """A read outside the caller's reach answers as the policy says, the same whether or not the
        resource exists: the answer must not tell another patient's record exists."""
        if not self._reachable(conn, "r", rtype, rid):
            assert self.policy is not None
            raise self.policy.refusal(conn, rtype, rid)

    def _shown(self, versions: list[Version]) -> list[Version]:
        """Versions as the caller may see them (redacted, de-identified)."""
        return versions if self.policy is None else [self.policy.present(v) for v in versions]

    def _incoming(self, rtype: str, body: Any) -> dict[str, Any]:
        """A body to write: a `rtype` resource, as the caller's policy stores it (its custodian)."""
        self._check_body(rtype, body)
        return body if self.policy is None else self.policy.admit(rtype, body)

    def _check_writable(self, conn: sa.Connection, permission: str, rtype: str, rid: str, after: bool) -> None:
        if not self._reachable(conn, permission, rtype, rid):
            what = "would be" if after else "is"
            raise FhirError(403, [Issue("forbidden", f"{rtype}/{rid} {what} outside what the access token may "
                                        f"{'create' if permission == 'c' else 'update' if permission == 'u' else 'delete'}")],
                            headers={"WWW-Authenticate": 'Bearer realm="carebroker", error="insufficient_scope"'})

    # -- reads ----------------------------------------------------------------------------------

    def read(self, rtype: str, rid: str) -> Version:
        with self.store.single_read() as conn:
            self._check_readable(conn, rtype, rid)
            found = _live(self.store.current(conn, rtype, rid), rtype, rid)
        return found if self.policy is None else self.policy.present(found)

    def vread(self, rtype: str, rid: str, vid: str) -> Version:
        if not vid.isdigit():
            raise error(404, "not-found", f"{rtype}/{rid} has no version '{vid}'")
        with self.store.single_read() as conn:
            self._check_readable(conn, rtype, rid)
            found = self.store.version(conn, rtype, rid, int(vid))
        if found is None:
            raise error(404, "not-found", f"{rtype}/{rid} has no version {vid}")
        if found.deleted:
            raise error(410, "deleted", f"Version {vid} of {rtype}/{rid} is a deletion")
        return found if self.policy is None else self.policy.present(found)

    def history(self, rtype: str | None, rid: str | None, since: int | None, count: int,
                before_seq: int | None = None, after_seq: int | None = None) -> HistoryPage:
        with self.store.reading() as conn:
            if rtype and rid and self.store.head(conn, rtype, rid) is None:
                raise error(404, "not-found", f"{rtype}/{rid} is not known")
            extra = []
            if rtype and rid:
                self._check_readable(conn, rtype, rid)
            elif (cond := self._where("s", (rtype,) if rtype else None)) is not None:
                extra.append(sa.select(resource.c.pk).where(cond))
            rows = self.store.history(conn, rtype, rid, since, before_seq, after_seq, count + 1, *extra)
            total = self.store.count_history(conn, rtype, rid, since) if rtype and rid else None
        rows = self._shown(rows)
        more = len(rows) > count
        if after_seq is not None:  # paging backwards: the extra row is the oldest, at the end
            return HistoryPage(rows[-count:] if more else rows, total, True)
        return HistoryPage(rows[:count], total, more)

    def search(self, types: tuple[str, ...], params: list[tuple[str, str]], *, strict: bool, base_url: str,
               count: int, cursor: str | None, want_total: bool,
               compartment: str | None = None) -> tuple[Page, list[Version], list[Version], list[str]]:
        """Run a search in one snapshot: (page, matches in order, included resources, ignored parameters)."""
        reach = self._search_reach if self.policy is not None else None
        guard = self.policy.guard if self.policy is not None else None
        search = parse_search(types, params, strict, base_url, reach=reach, guard=guard)
        extra = [compartment_condition(types[0], compartment, resource)] if compartment else []
        if (cond := self._where("s", types)) is not None:
            extra.append(cond)
        try:
            with self.store.reading(generic_plans=cond is not None) as conn:
                page = run_search(conn, search, extra, count, cursor, want_total, reach=reach,
                                  one_pass=cond is not None)
                matches = self.store.current_by_pks(conn, page.pks)
                included = self.store.current_by_pks(conn, page.included)
        except OperationalError as exc:
            if "parser stack overflow" not in str(exc.orig):
                raise
            raise error(400, "too-costly", "The search nests chains and _has too deeply for this server's SQLite "
                        "database; simplify it (PostgreSQL takes deeper nesting)") from None
        return page, self._shown(matches), self._shown(included), search.ignored

    def everything(self, patients: list[str] | None, types: tuple[str, ...], since: int | None, count: int,
                   cursor: str | None) -> tuple[Page, list[Version], list[Version]]:
        """Patient `$everything`, one page in one snapshot: (page, the patients and their compartments'
        resources, the resources those refer to). `patients` None: every patient; a named one that is
        unknown is a 404, a deleted one a 410, as for a read."""
        extra = []
        if self.policy is not None:
            if patients is None and (pinned := self.policy.pinned_patient()) is not None:
                patients = [pinned]
            if (cond := self._where("s", types)) is not None:
                extra.append(cond)
        with self.store.reading(generic_plans=bool(extra)) as conn:
            for pid in patients or ():
                self._check_readable(conn, "Patient", pid)
                _live(self.store.head(conn, "Patient", pid), "Patient", pid)
            page = run_search(conn, everything_search(patients, types, since), extra, count, cursor, want_total=True,
                              one_pass=bool(extra))
            found = self._shown(self.store.current_by_pks(conn, page.pks))
        compartment_types = patient_compartment()
        return (page, [v for v in found if v.type in compartment_types],
                [v for v in found if v.type not in compartment_types])

    def validate(self, rtype: str, rid: str | None, body: Any, mode: str | None,
                 profile: str | None = None) -> list[Issue]:
        """`$validate`: the issues the write `mode` (create, update or delete of `rid`; None: none in
        particular) would meet with `body`, found as that write finds them, without writing. Raises
        only when validation cannot run: a body that is not a `rtype`, an unknown mode or profile."""
        if mode not in (None, "create", "update", "delete"):
            raise error(400, "invalid", f"Parameter 'mode': '{mode}' is not create, update or delete")
        if mode in ("update", "delete") and rid is None:
            raise error(400, "invalid", f"mode '{mode}' validates a change to one resource: use [type]/[id]/$validate")
        if profile is not None and profile not in known_profiles(rtype):
            raise error(400, "not-supported", f"Profile '{profile}' is not known here for {rtype}")
        issues: list[Issue] = []
        if mode != "delete":
            self._check_body(rtype, body)
            issues.extend(resource_issues(body)[1])
        if rid is None or mode is None or mode == "create":
            return issues
        issues.extend(_raised(check_id, rid))
        with self.store.single_read() as conn:
            head = self.store.head(conn, rtype, rid)
        if mode == "update":
            issues.extend(_raised(self._check_body_id, rtype, rid, body))
            if head is None or head.deleted:
                issues.append(Issue("informational", f"{rtype}/{rid} does not exist: the update would create it",
                                    severity="information"))
        elif head is None:
            issues.append(Issue("not-found", f"{rtype}/{rid} is not known: there is nothing to delete"))
        elif head.deleted:
            issues.append(Issue("informational", f"{rtype}/{rid} was already deleted", severity="information"))
        return issues

    # -- maintenance ----------------------------------------------------------------------------

    def reindex_if_needed(self, batch: int = 500) -> int:
        """Rebuild every search index row if they were built by another version of the extraction
        (or before the index tables existed). Returns the number of resources reindexed."""
        with self.store.reading() as conn:
            if self.store.state(conn, "search_index_version") == INDEX_VERSION:
                return 0
        done = 0
        for rows in self.store.live_batches(batch):
            parsed = {pk: jsonfmt.loads(content) for pk, content in rows}
            with self.store.writing() as conn:
                self.store.replace_index(conn, {pk: (res["resourceType"], index_resource(res))
                                                for pk, res in parsed.items()})
            done += len(rows)
        with self.store.writing() as conn:
            self.store.set_state(conn, "search_index_version", INDEX_VERSION)
        return done

    # -- writes ---------------------------------------------------------------------------------

    def create(self, rtype: str, body: dict[str, Any], if_none_exist: str | None = None,
               rid: str | None = None) -> Result:
        """POST: a new resource with a server id (`rid`: one chosen beforehand, by a transaction that
        rewrote references to it)."""
        body = self._incoming(rtype, body)
        validate_resource(body)
        index = _early_index(body)

        def tx(conn: sa.Connection) -> Result:
            if if_none_exist is not None:
                found = self._conditional_pks(conn, rtype, if_none_exist.split("?", 1)[-1], lock=True)
                if len(found) > 1:
                    raise error(412, "multiple-matches",
                                f"If-None-Exist '{if_none_exist}' matches more than one {rtype}")
                if found:
                    existing = self.store.current_by_pks(conn, found)[0]
                    return Result(200, existing, [Issue("informational",
                                  f"{rtype}/{existing.id} already matches '{if_none_exist}'; nothing created",
                                  severity="information")])
            return Result(201, self._put_version(conn, None, rtype, rid or str(uuid.uuid4()), body, "POST", index))

        return self._in_write(tx)

    def conditional_ids(self, rtype: str, query: str, lock: bool = False) -> list[str]:
        """ids of the live resources matching a conditional URL's criteria (at most 2: callers need
        0/1/many). `lock` (inside `atomically`) holds the criteria until the transaction ends, so a
        concurrent conditional create of the same criteria waits and then sees ours."""
        with self.store.reading() as conn:
            pks = self._conditional_pks(conn, rtype, query, lock)
            return [v.id for v in self.store.current_by_pks(conn, pks)]

    def _conditional_pks(self, conn: sa.Connection, rtype: str, query: str, lock: bool) -> list[int]:
        if lock:
            self.store.lock_key(conn, f"{rtype}?{query}")
        cond = self._where("s", (rtype,))
        return conditional_matches(conn, rtype, query, extra=() if cond is None else (cond,))

    def update(self, rtype: str, rid: str, body: dict[str, Any], if_match: str | None = None) -> Result:
        check_id(rid)
        body = self._incoming(rtype, body)
        self._check_body_id(rtype, rid, body)
        validate_resource(body)
        expected = parse_etag(if_match) if if_match else None
        index = _early_index(body)
        return self._in_write(lambda conn: self._update_in(conn, rtype, rid, body, expected, index=index))

    def conditional_update(self, rtype: str, query: str, body: dict[str, Any],
                           if_match: str | None = None, rid: str | None = None) -> Result:
        """PUT by criteria; `rid`: the id to create with when nothing matches and the body has none."""
        body = self._incoming(rtype, body)
        validate_resource(body)
        index = _early_index(body)
        expected = parse_etag(if_match) if if_match else None
        body_id = body.get("id")
        if body_id is not None:
            check_id(body_id)

        def tx(conn: sa.Connection) -> Result:
            found = self._conditional_pks(conn, rtype, query, lock=True)
            if len(found) > 1:
                raise error(412, "multiple-matches", f"'{query}' matches more than one {rtype}")
            if found:
                target = self.store.current_by_pks(conn, found)[0].id
                if body_id is not None and body_id != target:
                    raise error(400, "invalid", f"'{query}' matches {rtype}/{target}, but the body has id "
                                f"'{body_id}'", expression=f"{rtype}.id")
                return self._update_in(conn, rtype, target, {**body, "id": target}, expected, index=index)
            if body_id is not None:
                if self.store.head(conn, rtype, body_id) is not None:
                    raise error(409, "conflict", f"{rtype}/{body_id} exists but does not match '{query}'")
                return self._update_in(conn, rtype, body_id, body, expected, index=index)
            return Result(201, self._put_version(conn, None, rtype, rid or str(uuid.uuid4()), body, "PUT", index))

        return self._in_write(tx)

    def patch(self, rtype: str, rid: str, patch: Any, if_match: str | None = None) -> Result:
        check_id(rid)
        expected = parse_etag(if_match) if if_match else None
        return self._in_write(lambda conn: self._patch_in(conn, rtype, rid, patch, expected))

    def conditional_patch(self, rtype: str, query: str, patch: Any, if_match: str | None = None) -> Result:
        expected = parse_etag(if_match) if if_match else None

        def tx(conn: sa.Connection) -> Result:
            found = self._conditional_pks(conn, rtype, query, lock=False)
            if len(found) != 1:
                raise error(404 if not found else 412, "not-found" if not found else "multiple-matches",
                            f"'{query}' matches {'no' if not found else 'more than one'} {rtype}")
            return self._patch_in(conn, rtype, self.store.current_by_pks(conn, found)[0].id, patch, expected)

        return self._in_write(tx)

    def delete(self, rtype: str, rid: str, if_match: str | None = None) -> Result:
        expected = parse_etag(if_match) if if_match else None

        def tx(conn: sa.Connection) -> Result:
            head = self.store.head(conn, rtype, rid, lock=True)
            if head is None:
                raise error(404, "not-found", f"{rtype}/{rid} is not known")
            return self._delete_in(conn, rtype, rid, head, expected)

        return self._in_write(tx)

    def conditional_delete(self, rtype: str, query: str) -> Result:
        def tx(conn: sa.Connection) -> Result:
            found = self._conditional_pks(conn, rtype, query, lock=False)
            if len(found) > 1:
                raise error(412, "multiple-matches", f"'{query}' matches more than one {rtype}; nothing deleted")
            if not found:
                return Result(204, None, [Issue("informational", f"'{query}' matches no {rtype}; nothing deleted",
                                                severity="information")])
            rid = self.store.current_by_pks(conn, found)[0].id
            head = self.store.head(conn, rtype, rid, lock=True)
            assert head is not None  # found inside this transaction
            return self._delete_in(conn, rtype, rid, head, None)

        return self._in_write(tx)

    # -- write steps (inside a transaction) -------------------------------------------------------

    def _update_in(self, conn: sa.Connection, rtype: str, rid: str, body: dict[str, Any],
                   expected: int | None, method: str = "PUT", index: IndexRows | None = None) -> Result:
        if index is None:  # the body may hold conditional references: resolve them before comparing
            body = self._resolve_conditional_references(conn, body)
            index = index_resource(body)
        head = self.store.head(conn, rtype, rid, lock=True)
        if expected is not None and (head is None or head.version_id != expected):
            raise error(412, "conflict", f"If-Match W/\"{expected}\" does not match the current version of "
                        f"{rtype}/{rid} ({head.version_id if head else 'none'})")
        if head is not None and not head.deleted:
            self._check_writable(conn, "u", rtype, rid, after=False)
            current = self.store.current(conn, rtype, rid)
            if current is not None and current.content is not None and _same_content(current.content, body):
                return Result(200, current, [Issue("informational", "No change: no new version was created",
                                                   severity="information")])
        version = self._put_version(conn, head, rtype, rid, body, method, index)
        return Result(201 if head is None or head.deleted else 200, version)

    def _patch_in(self, conn: sa.Connection, rtype: str, rid: str, patch: Any, expected: int | None) -> Result:
        current = self.store.current(conn, rtype, rid)
        if current is None:
            raise error(404, "not-found", f"{rtype}/{rid} is not known")
        if current.content is None:
            raise error(410, "deleted", f"{rtype}/{rid} was deleted")
        try:
            patched = jsonpatch.apply_patch(jsonfmt.loads(current.content), patch)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise error(422, "processing", f"JSON Patch test failed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
            raise error(422, "processing", f"JSON Patch cannot be applied: {exc}") from None
        if not isinstance(patched, dict) or patched.get("resourceType") != rtype or patched.get("id") != rid:
            raise error(422, "processing", "A patch may not change the resourceType or id")
        patched = self._incoming(rtype, patched)
        validate_resource(patched)
        return self._update_in(conn, rtype, rid, patched, expected, "PATCH")

    def _delete_in(self, conn: sa.Connection, rtype: str, rid: str, head: Head, expected: int | None) -> Result:
        if expected is not None and head.version_id != expected:
            raise error(412, "conflict", f"If-Match W/\"{expected}\" does not match the current version of "
                        f"{rtype}/{rid} ({head.version_id})")
        if head.deleted:
            return Result(204, None, [Issue("informational", f"{rtype}/{rid} was already deleted",
                                            severity="information")])
        self._check_writable(conn, "d", rtype, rid, after=False)
        version = self.store.write(conn, head, rtype, rid, head.version_id + 1,
                                   max(now_us(), head.last_updated), "DELETE", None)
        return Result(204, version)

    def _put_version(self, conn: sa.Connection, head: Head | None, rtype: str, rid: str,
                     body: dict[str, Any], method: str, index: IndexRows | None = None) -> Version:
        """Write the next version. `index`: the body's index rows if already extracted (they do not
        depend on id, version or time, so callers extract them before taking the write lock); None
        when the body may still hold conditional references, which are resolved here."""
        if index is None:
            body = self._resolve_conditional_references(conn, body)
        version_id = 1 if head is None else head.version_id + 1
        stamp = now_us() if head is None else max(now_us(), head.last_updated)
        stored = _stored_form(body, rtype, rid, version_id, stamp)
        version = self.store.write(conn, head, rtype, rid, version_id, stamp, method,
                                   jsonfmt.dumps(stored).decode(), index if index is not None else index_resource(stored))
        if self.policy is not None:  # what was written must be within reach (else the whole write rolls back)
            self._check_writable(conn, "c" if head is None or head.deleted else "u", rtype, rid, after=True)
        return version

    def bulk_put(self, resources: list[dict[str, Any]], validate: bool = True) -> int:
        """Store a batch of resources with client ids in one transaction (the loader's fast path):
        new ones are inserted together; any that exist already go through the ordinary update.
        Validation and index extraction happen before the write lock is taken, except for resources
        with conditional references, which are resolved inside the transaction. Returns the count."""
        stamp = now_us()
        prepared: dict[tuple[str, str], tuple[dict[str, Any], IndexRows | None]] = {}
        for res in resources:
            rtype = res.get("resourceType", "") if isinstance(res, dict) else ""
            res = self._incoming(rtype, res)
            rid = check_id(str(res.get("id", "")))
            validate_resource(res, structure=validate)
            prepared[(rtype, rid)] = (res, _early_index(res))

        def tx(conn: sa.Connection) -> int:
            existing = self.store.existing_ids(conn, list(prepared))
            resolved: dict[str, str] = {}  # conditional reference -> Type/id, for this batch
            new = []
            for (rtype, rid), (res, index) in prepared.items():
                if (rtype, rid) in existing:
                    self._update_in(conn, rtype, rid, res, None, index=index)
                    continue
                if index is None:
                    res = self._resolve_conditional_references(conn, res, resolved)
                    index = index_resource(res)
                content = jsonfmt.dumps(_stored_form(res, rtype, rid, 1, stamp)).decode()
                new.append((rtype, rid, content, index))
            self.store.insert_many(conn, new, stamp)
            return len(prepared)

        return self._in_write(tx, weight=len(prepared))

    def _resolve_conditional_references(self, conn: sa.Connection, body: dict[str, Any],
                                        cache: dict[str, str] | None = None) -> dict[str, Any]:
        """Replace each `Type?criteria` reference by the one resource matching it (as HAPI does:
        none -> 404, several -> 412). `cache` remembers answers across the resources of one batch."""
        cache = {} if cache is None else cache

        def resolve(ref: str) -> str:
            if not CONDITIONAL_REFERENCE.fullmatch(ref):
                return ref
            if ref not in cache:
                rtype, query = ref.split("?", 1)
                found = self._conditional_pks(conn, rtype, query, lock=False)
                if len(found) != 1:
                    raise error(404 if not found else 412, "not-found" if not found else "multiple-matches",
                                f"Conditional reference '{ref}' matches {'no' if not found else 'more than one'} "
                                f"{rtype}")
                cache[ref] = f"{rtype}/{self.store.current_by_pks(conn, found)[0].id}"
            return cache[ref]

        return rewrite_references(body, resolve)

    @staticmethod
    def _check_body(rtype: str, body: Any) -> None:
        if not isinstance(body, dict):
            raise error(400, "structure", "The body must be a JSON object (a FHIR resource)")
        found = body.get("resourceType")
        if found != rtype:
            raise error(400, "invalid", f"resourceType in the body ({found!r}) must be '{rtype}'",
                        expression="resourceType")

    @staticmethod
    def _check_body_id(rtype: str, rid: str, body: dict[str, Any]) -> None:
        if body.get("id") != rid:
            raise error(400, "invalid", f"The resource id in the body ({body.get('id')!r}) must equal the id "
                        f"in the URL ('{rid}')", expression=f"{rtype}.id")

    def atomically(self, work: Callable[[], T], weight: int = 1) -> T:
        """Run `work` (any number of interactions) as one database transaction, retried as a whole
        when a concurrent writer got there first: the transaction Bundle's all-or-nothing."""
        return self._in_write(lambda _conn: work(), weight, atomic=True)

    def _in_write(self, work: Callable[[sa.Connection], T], weight: int = 1, atomic: bool = False) -> T:
        """Run `work` in a write transaction, retrying when a concurrent writer got there first.
        Inside `atomically` it joins the enclosing transaction, and the retry is the enclosing one's.
        `weight`: how many resources it writes (for the statistics refresh)."""
        if self.store.in_atomic:
            with self.store.writing() as conn:
                return work(conn)
        for attempt in range(5):
            try:
                with self.store.atomic() if atomic else self.store.writing() as conn:
                    result = work(conn)
                self.store.note_written(weight)
                return result
            except (StaleHead, IntegrityError) as exc:
                if attempt == 4:
                    raise error(409, "conflict", f"Concurrent writes kept conflicting: {exc}") from None
            except DBAPIError as exc:
                if not _is_transient(exc) or attempt == 4:
                    raise
        raise AssertionError("unreachable")


def _early_index(body: dict[str, Any]) -> IndexRows | None:
    """The body's index rows, extracted before the write lock; None when conditional references in
    it must first be resolved inside the transaction."""
    return None if has_conditional_references(body) else index_resource(body)


Found = TypeVar("Found", Head, Version)


def _live(found: Found | None, rtype: str, rid: str) -> Found:
    """`found` if the resource exists and is not deleted; otherwise the 404 or 410 a read answers."""
    if found is None:
        raise error(404, "not-found", f"{rtype}/{rid} is not known")
    if found.deleted:
        raise FhirError(410, [Issue("deleted", f"{rtype}/{rid} was deleted (version {found.version_id})")],
                        headers={"ETag": f'W/"{found.version_id}"'})
    return found


def _raised(check: Callable[..., Any], *args: Any) -> list[Issue]:
    """The issues `check` raises (none if it passes): $validate reports them rather than failing."""
    try:
        check(*args)
    except FhirError as exc:
        return exc.issues
    return []


def _stored_form(body: dict[str, Any], rtype: str, rid: str, version_id: int, stamp: int) -> dict[str, Any]:
    """The resource as stored: server-set id and meta first, the client's content after."""
    meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    stored = {"resourceType": rtype, "id": rid,
              "meta": {"versionId": str(version_id), "lastUpdated": to_instant(stamp), **meta}}
    stored.update((k, v) for k, v in body.items() if k not in ("resourceType", "id", "meta"))
    return stored


def _same_content(stored: str, body: dict[str, Any]) -> bool:
    """True when `body` says nothing new compared with the stored version (server-set meta aside)."""
    old = jsonfmt.loads(stored)
    strip = ("versionId", "lastUpdated")
    old_meta = {k: v for k, v in (old.pop("meta", None) or {}).items() if k not in strip}
    new = dict(body)
    new_meta = {k: v for k, v in (new.pop("meta", None) or {}).items() if k not in strip}
    return old == new and old_meta == new_meta


def _is_transient(exc: DBAPIError) -> bool:
    """Serialisation failures and dead-locks (PostgreSQL), busy database (SQLite): worth a retry."""
    code = getattr(exc.orig, "sqlstate", None)
    return code in ("40001", "40P01") or "database is locked" in str(exc.orig)
