"""Storage primitives for Bulk Data export: jobs, their chunks, and resources as they were at an instant.

Every change a worker makes to a job is a compare-and-set on (job id, owner): a worker that lost its
lease (or whose job was cancelled) changes nothing and learns so from the row count, so two workers
never write the same job and a cancelled job stays gone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fhir_server.storage.schema import export_chunk, export_job, export_patient, resource, resource_version, \
    search_reference


@dataclass(frozen=True)
class Job:
    """An export job as stored; (type_index, after_pk, file_no, part) is where it goes on from."""

    id: str
    status: str
    level: str
    group_id: str | None
    types: tuple[str, ...]
    since: int | None
    request: str
    transaction_time: int
    expires: int
    attempts: int
    type_index: int
    after_pk: int
    file_no: int
    part: int
    exported: int
    error: str | None
    requester: str | None
    principal: str | None  # JSON: the requester's policy attributes


@dataclass(frozen=True)
class ExportFile:
    """One output file: its number in the job, the resource type and how many resources it holds."""

    number: int
    type: str
    count: int


_JOB_COLUMNS = [export_job.c[name] for name in Job.__dataclass_fields__]


def _job(row: Any) -> Job:
    values = dict(row._mapping)
    values["types"] = tuple(values["types"].split(",")) if values["types"] else ()
    return Job(**values)


def insert_job(conn: sa.Connection, job_id: str, level: str, group_id: str | None, types: Sequence[str],
               since: int | None, request: str, transaction_time: int, now: int, expires: int,
               requester: str | None, principal: str | None = None) -> None:
    conn.execute(export_job.insert().values(
        id=job_id, status="queued", level=level, group_id=group_id, types=",".join(types), since=since,
        request=request, transaction_time=transaction_time, created=now, expires=expires, attempts=0,
        type_index=0, after_pk=0, file_no=0, part=0, exported=0, requester=requester, principal=principal))


def add_group_patients(conn: sa.Connection, job_id: str, group_pk: int) -> None:
    """The job's patients: the Patients the Group's `member` index rows name (Group.member.entity)."""
    sr = search_reference
    members = (sa.select(sa.literal(job_id), sr.c.target_id)
               .where(sr.c.resource_pk == group_pk, sr.c.param == "member", sr.c.target_type == "Patient",
                      sr.c.target_id.is_not(None))
               .distinct())
    conn.execute(export_patient.insert().from_select(["job_id", "patient_id"], members))


def group_patients(job_id: str) -> sa.Select[Any]:
    """The ids of a Group export's patients, as a query."""
    return sa.select(export_patient.c.patient_id).where(export_patient.c.job_id == job_id)


def get_job(conn: sa.Connection, job_id: str) -> Job | None:
    row = conn.execute(sa.select(*_JOB_COLUMNS).where(export_job.c.id == job_id)).first()
    return _job(row) if row else None


def delete_job(conn: sa.Connection, job_id: str) -> bool:
    """Remove a job with its files (cascade). False if there was no such job."""
    return conn.execute(export_job.delete().where(export_job.c.id == job_id)).rowcount == 1


def remove_expired(conn: sa.Connection, now: int) -> int:
    return conn.execute(export_job.delete().where(export_job.c.expires < now)).rowcount


def claimable(conn: sa.Connection, now: int, settled: int) -> list[str]:
    """Jobs a worker may take, oldest first: queued ones whose transaction time is at least
    `settled`-old, and running ones whose owner's lease ran out (the owner died)."""
    j = export_job.c
    return list(conn.execute(sa.select(j.id).where(sa.or_(
        sa.and_(j.status == "queued", j.transaction_time <= settled),
        sa.and_(j.status == "running", j.lease_until < now))).order_by(j.created).limit(5)).scalars())


def claim(conn: sa.Connection, job_id: str, owner: str, now: int, lease_until: int, settled: int) -> Job | None:
    """Take the job if it is still claimable (compare-and-set), counting the attempt."""
    j = export_job.c
    taken = conn.execute(export_job.update().where(j.id == job_id, sa.or_(
        sa.and_(j.status == "queued", j.transaction_time <= settled),
        sa.and_(j.status == "running", j.lease_until < now)))
        .values(status="running", owner=owner, lease_until=lease_until, attempts=j.attempts + 1)).rowcount
    return get_job(conn, job_id) if taken == 1 else None


@dataclass(frozen=True)
class Chunk:
    """Part `part` of output file `file_no`: `count` resources of `type` as NDJSON."""

    file_no: int
    part: int
    type: str
    count: int
    data: bytes


def checkpoint(conn: sa.Connection, job: Job, owner: str, lease_until: int, expires: int,
               chunk: Chunk | None = None) -> bool:
    """Store `chunk` (if any) and the job's progress (the checkpoint fields of `job`) together, and
    renew the lease. False, and nothing written, if this worker no longer owns the job."""
    j = export_job.c
    owned = conn.execute(export_job.update().where(j.id == job.id, j.owner == owner, j.status == "running").values(
        lease_until=lease_until, expires=expires, type_index=job.type_index, after_pk=job.after_pk,
        file_no=job.file_no, part=job.part, exported=job.exported)).rowcount == 1
    if owned and chunk is not None:  # after the update, which holds the job row: a cancel waits for us
        conn.execute(export_chunk.insert().values(job_id=job.id, file_no=chunk.file_no, part=chunk.part,
                                                  type=chunk.type, count=chunk.count, data=chunk.data))
    return owned


def finish(conn: sa.Connection, job_id: str, owner: str, status: str, expires: int, error: str | None = None) -> bool:
    j = export_job.c
    return conn.execute(export_job.update().where(j.id == job_id, j.owner == owner, j.status == "running").values(
        status=status, owner=None, lease_until=None, expires=expires, error=error)).rowcount == 1


def release(conn: sa.Connection, job_id: str, owner: str, graceful: bool) -> None:
    """Hand a job back to the queue, its checkpoint kept; `graceful` (the worker is stopping, not
    failing): the attempt does not count."""
    j = export_job.c
    conn.execute(export_job.update().where(j.id == job_id, j.owner == owner, j.status == "running").values(
        status="queued", owner=None, lease_until=None, attempts=j.attempts - 1 if graceful else j.attempts))


def files(conn: sa.Connection, job_id: str) -> list[ExportFile]:
    c = export_chunk.c
    rows = conn.execute(sa.select(c.file_no, c.type, sa.func.sum(c.count)).where(c.job_id == job_id)
                        .group_by(c.file_no, c.type).order_by(c.file_no))
    return [ExportFile(int(n), t, int(count)) for n, t, count in rows]


def file_extent(conn: sa.Connection, job_id: str, file_no: int) -> tuple[int, int]:
    """(chunks, bytes) of one file; (0, 0) if there is no such file."""
    c = export_chunk.c
    parts, size = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sa.func.length(c.data)), 0))
                               .where(c.job_id == job_id, c.file_no == file_no)).one()
    return int(parts), int(size)


def chunk(conn: sa.Connection, job_id: str, file_no: int, part: int) -> bytes | None:
    c = export_chunk.c
    return conn.execute(sa.select(c.data).where(c.job_id == job_id, c.file_no == file_no, c.part == part)).scalar()


def max_pk(conn: sa.Connection, rtype: str) -> int:
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(resource.c.pk), 0))
                            .where(resource.c.type == rtype)).scalar_one())


def snapshot_batch(conn: sa.Connection, rtype: str, after_pk: int, upto_pk: int, as_at: int, since: int | None,
                   condition: sa.ColumnElement[bool] | None, limit: int) -> list[tuple[int, str]]:
    """(pk, content) of the first `limit` resources of `rtype` with a pk in (after_pk, upto_pk] (a
    bounded range: the cost of a query never depends on the planner's row estimates), each as it was at
    `as_at`: the current version if it was last changed by then (nearly always: a join on the head),
    else the newest version from by then; resources deleted at `as_at`, or created after it, are left
    out. `since`: only versions changed at or after it. `condition` is on `resource`."""
    r, v, older = resource, resource_version, resource_version.alias("older")
    version_at = sa.case((r.c.last_updated <= as_at, r.c.version_id), else_=(
        sa.select(sa.func.max(older.c.version_id))
        .where(older.c.resource_pk == r.c.pk, older.c.last_updated <= as_at).scalar_subquery()))
    q = (sa.select(r.c.pk, v.c.content)
         .select_from(r.join(v, sa.and_(v.c.resource_pk == r.c.pk, v.c.version_id == version_at)))
         .where(r.c.type == rtype, r.c.pk > after_pk, r.c.pk <= upto_pk, sa.or_(r.c.deleted.is_(False), r.c.last_updated > as_at),
                v.c.content.is_not(None)))
    if since is not None:
        q = q.where(v.c.last_updated >= since)
    if condition is not None:
        q = q.where(condition)
    if conn.dialect.name == "postgresql":
        # A batch is a bounded pk range, where nested loops over the indexes are always right; but
        # PostgreSQL misjudges how few rows the correlated conditions leave, and may then hash-join,
        # scanning a whole table for every batch. (SET LOCAL: for this transaction only.)
        conn.exec_driver_sql("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
    return [(int(pk), content) for pk, content in conn.execute(q.order_by(r.c.pk).limit(limit)).all()]
