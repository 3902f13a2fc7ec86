"""FHIR Bulk Data export ($export, Bulk Data Access IG v2): kick-off, status, cancel, files, worker.

A kick-off only records a job. A worker thread in every server process (`ExportWorker`) claims
queued jobs from the database and writes their NDJSON into chunk rows of about 1 MB, each stored
together with the checkpoint after it. So a job survives the death of the process running it
(another takes it over when the lease runs out, and goes on from the checkpoint without writing a
line twice), any node can report on or serve any job, and memory stays flat whatever the size.

Each resource is exported as it was at the transaction time (the kick-off): what is written while an
export runs does not show in it. Deleted resources never do.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import urlencode

import sqlalchemy as sa

from conformance.search_parameters import patient_compartment
from fhir_server.outcome import error
from fhir_server.search.engine import in_patient_compartments
from fhir_server.service.timefmt import now_us, parse_instant, to_instant
from fhir_server.storage import export as jobs
from fhir_server.storage.export import Chunk, ExportFile, Job
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import resource

log = logging.getLogger("carebroker.export")

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
PARAMETERS = frozenset({"_type", "_since", "_outputFormat"})
PASSIVE_PARAMETERS = frozenset({"_format", "_pretty"})  # they shape the kick-off's own response

SECOND_US = 1_000_000
CHUNK_BYTES = 1 << 20  # NDJSON per chunk row, and so per checkpoint
FILE_CHUNKS = 100  # a file is at most this many chunks; a type with more output gets several files
BATCH = 1000  # resources per query, at most
BATCH_BYTES = 4 << 20  # and about this much of them: large resources (Binary, documents) come fewer at a time
FIRST_BATCH = 10  # resources of a type read before their size is known
MAX_WINDOW = 64 * BATCH  # the widest pk range one query reads (types and matches may be sparse)
LEASE_US = 10 * SECOND_US  # a worker that has not renewed its lease for this long is taken to be dead
SETTLE_US = SECOND_US  # a job starts this long after its transaction time, when writes stamped before it have committed
EXPIRY_US = 24 * 3600 * SECOND_US  # a finished job and its files are removed this long after it finished
POLL_SECONDS = 0.5
CLEANUP_SECONDS = 60
MAX_ATTEMPTS = 10  # claims by workers that then died: a job that keeps killing its worker fails


class ExportPolicy(Protocol):
    """What the requester may see (consent/policy.py): rows, and each resource as shown to them."""

    unrestricted: bool

    def where(self, permission: str, types: Sequence[str] | None,
              r: sa.FromClause) -> sa.ColumnElement[bool] | None: ...

    def present_content(self, rtype: str, rid: str, content: str) -> str: ...


class LeaseLost(Exception):
    """The job was cancelled, or another worker took it over: stop without writing anything more."""


class BulkExport:
    """Export jobs over the store: the API side (kick-off, status, cancel, files) and the worker side."""

    def __init__(self, store: Store, types: frozenset[str], chunk_bytes: int = CHUNK_BYTES,
                 policy_for: Callable[[str], ExportPolicy] | None = None) -> None:
        self.store = store
        self.types = types  # the resource types this server supports
        self.chunk_bytes = chunk_bytes
        self.policy_for = policy_for  # a job's recorded requester -> what they may see

    # -- the API side -----------------------------------------------------------------------------

    def kick_off(self, level: str, group_id: str | None, params: list[tuple[str, str]], request: str,
                 lenient: bool = False, requester: str | None = None, principal: str | None = None) -> str:
        """Record a job for a system, Patient or Group (`group_id`) level export; its id. Parameters
        this server does not support are a 400 (the IG forbids ignoring them) unless `lenient`.
        `requester` (who asked, as `issuer|subject`) is the only one who may see the job afterwards;
        `principal` (their policy attributes) decides what the job exports."""
        unsupported = list(dict.fromkeys(k for k, _ in params if k not in PARAMETERS | PASSIVE_PARAMETERS))
        if unsupported and not lenient:
            raise error(400, "not-supported", f"$export parameter(s) not supported here: {', '.join(unsupported)}")
        output_format = next((v for k, v in params if k == "_outputFormat"), None)
        if output_format is not None and output_format not in OUTPUT_FORMATS:
            raise error(400, "not-supported", f"Parameter '_outputFormat': '{output_format}' is not supported; "
                        "use application/fhir+ndjson")
        since = next((parse_instant(v, "_since") for k, v in params if k == "_since"), None)
        types = self._types(level, [t.strip() for k, v in params if k == "_type" for t in v.split(",") if t.strip()])
        job_id = uuid.uuid4().hex
        now = now_us()
        # Stamps are whole milliseconds: those of this one may come after the kick-off, so it is out.
        transaction_time = now - 1000
        with self.store.writing() as conn:
            jobs.insert_job(conn, job_id, level, group_id, types, since, request, transaction_time, now,
                            now + EXPIRY_US, requester, principal)
            if group_id is not None:
                group = self.store.head(conn, "Group", group_id)
                if group is None or group.deleted:
                    raise error(404, "not-found", f"Group/{group_id} is not known")
                jobs.add_group_patients(conn, job_id, group.pk)
        return job_id

    def _types(self, level: str, asked: list[str]) -> list[str]:
        unknown = [t for t in asked if t not in self.types]
        if unknown:
            raise error(400, "not-supported", f"Parameter '_type': unknown resource type(s) {', '.join(unknown)}")
        if level == "system":
            return list(dict.fromkeys(asked)) or sorted(self.types)
        outside = [t for t in asked if t not in patient_compartment()]
        if outside:
            raise error(400, "not-supported", f"Parameter '_type': {', '.join(outside)} not in the Patient "
                        "compartment, so not part of a Patient or Group export")
        return list(dict.fromkeys(asked)) or sorted(t for t in patient_compartment() if t in self.types)

    def status(self, job_id: str, requester: str | None = None) -> tuple[Job, list[ExportFile]]:
        """The job and, once it completed, its files."""
        with self.store.reading() as conn:
            job = _owned(jobs.get_job(conn, job_id), job_id, requester)
            return job, jobs.files(conn, job_id) if job.status == "completed" else []

    def cancel(self, job_id: str, requester: str | None = None) -> None:
        """Stop the job if it runs, and remove it with its files."""
        with self.store.writing() as conn:
            _owned(jobs.get_job(conn, job_id), job_id, requester)
            jobs.delete_job(conn, job_id)

    def file(self, job_id: str, file_no: int, requester: str | None = None) -> tuple[int, Iterator[bytes]]:
        """(size in bytes, its chunks) of one output file of a completed job."""
        with self.store.reading() as conn:
            job = _owned(jobs.get_job(conn, job_id), job_id, requester)
            parts, size = jobs.file_extent(conn, job_id, file_no) if job.status == "completed" else (0, 0)
        if not parts:
            raise error(404, "not-found", f"Export job '{job_id}' has no file {file_no}")
        return size, self._chunks(job_id, file_no, parts)

    def _chunks(self, job_id: str, file_no: int, parts: int) -> Iterator[bytes]:
        """One chunk at a time, each read on its own, so no connection is held between them."""
        for part in range(parts):
            with self.store.single_read() as conn:
                data = jobs.chunk(conn, job_id, file_no, part)
            if data is None:  # cancelled or expired while being read: the transfer must not look complete
                raise LookupError(f"export file {job_id}/{file_no} was removed while being sent")
            yield data

    # -- the worker side --------------------------------------------------------------------------

    def remove_expired(self) -> int:
        with self.store.writing() as conn:
            return jobs.remove_expired(conn, now_us())

    def claim(self, owner: str) -> Job | None:
        """Take the oldest job that is waiting, or whose worker died; None if there is none."""
        now = now_us()
        with self.store.single_read() as conn:
            candidates = jobs.claimable(conn, now, now - SETTLE_US)
        for job_id in candidates:
            with self.store.writing() as conn:
                job = jobs.claim(conn, job_id, owner, now, now + LEASE_US, now - SETTLE_US)
            if job is not None:
                return job
        return None

    def run(self, job: Job, owner: str, stop: threading.Event) -> None:
        """Export from the job's checkpoint to the end. Stops early, leaving the checkpoint for another
        worker, when `stop` is set or a database error may pass; a cancelled job is simply dropped."""
        try:
            if job.attempts > MAX_ATTEMPTS:
                raise RuntimeError(f"the export was interrupted {job.attempts - 1} times")
            self._export(job, owner, stop)
        except LeaseLost:
            log.info("export %s: cancelled or taken over; stopped", job.id)
        except sa.exc.OperationalError:
            log.warning("export %s: database error; handed back to the queue", job.id, exc_info=True)
            self._release(job, owner, graceful=False)
        except Exception as exc:
            log.exception("export %s failed", job.id)
            with self.store.writing() as conn:
                jobs.finish(conn, job.id, owner, "failed", now_us() + EXPIRY_US, f"{type(exc).__name__}: {exc}")

    def _release(self, job: Job, owner: str, graceful: bool) -> None:
        try:
            with self.store.writing() as conn:
                jobs.release(conn, job.id, owner, graceful)
        except sa.exc.OperationalError:  # the lease runs out by itself
            log.warning("export %s: could not hand it back", job.id, exc_info=True)

    def _export(self, job: Job, owner: str, stop: threading.Event) -> None:
        patients = jobs.group_patients(job.id) if job.level == "group" else None
        policy = self.policy_for(job.principal) if job.principal and self.policy_for else None
        if policy is not None and policy.unrestricted:
            policy = None
        renewed = time.monotonic()
        while job.type_index < len(job.types):
            rtype = job.types[job.type_index]
            condition = None if job.level == "system" else in_patient_compartments(rtype, patients)
            if policy is not None and (allowed := policy.where("s", (rtype,), resource)) is not None:
                condition = allowed if condition is None else sa.and_(condition, allowed)
            with self.store.single_read() as conn:
                top = jobs.max_pk(conn, rtype)  # anything above came later than the transaction time
            buffer, count, after, window, limit = bytearray(), 0, job.after_pk, BATCH, FIRST_BATCH
            while after < top:
                if stop.is_set():
                    self._release(job, owner, graceful=True)
                    return
                upto = min(after + window, top)
                with self.store.reading() as conn:
                    rows = jobs.snapshot_batch(conn, rtype, after, upto, job.transaction_time, job.since, condition,
                                               limit)
                for pk, content in rows:
                    if policy is not None:
                        content = policy.present_content(rtype, "", content)
                    buffer += content.encode()
                    buffer += b"\n"
                    count += 1
                    if len(buffer) >= self.chunk_bytes:
                        job = self._save(job, owner, _next_chunk(job, rtype, count, buffer), after_pk=pk)
                        buffer, count, renewed = bytearray(), 0, time.monotonic()
                if len(rows) == limit:  # the range held more: go on after the last one read
                    after, window = rows[-1][0], max(BATCH, window // 2)
                else:  # the range is done; sparse matches widen the next one
                    after, window = upto, min(window * 2, MAX_WINDOW) if len(rows) < limit // 2 else window
                if rows:
                    limit = max(1, min(BATCH, BATCH_BYTES * len(rows) // sum(len(c) for _, c in rows)))
                if time.monotonic() - renewed > LEASE_US / SECOND_US / 3:  # a long stretch without output
                    job, renewed = self._save(job, owner, None), time.monotonic()
            last = _next_chunk(job, rtype, count, buffer) if count else None
            file_no = job.file_no + (1 if job.part or last else 0)  # each type starts a new file
            job = self._save(job, owner, last, type_index=job.type_index + 1, after_pk=0, file_no=file_no, part=0)
            renewed = time.monotonic()
        with self.store.writing() as conn:
            if not jobs.finish(conn, job.id, owner, "completed", now_us() + EXPIRY_US):
                raise LeaseLost(job.id)
        log.info("export %s completed: %d resources", job.id, job.exported)

    def _save(self, job: Job, owner: str, chunk: Chunk | None, **progress: int) -> Job:
        """Store the chunk and the checkpoint after it in one transaction; the job as now stored."""
        if chunk is not None:
            advanced = {"part": chunk.part + 1} if chunk.part + 1 < FILE_CHUNKS else {"file_no": chunk.file_no + 1,
                                                                                      "part": 0}
            job = replace(job, exported=job.exported + chunk.count, **advanced)
        job = replace(job, **progress)
        now = now_us()
        with self.store.writing() as conn:
            if not jobs.checkpoint(conn, job, owner, now + LEASE_US, now + EXPIRY_US, chunk):
                raise LeaseLost(job.id)
        return job


def _owned(job: Job | None, job_id: str, requester: str | None) -> Job:
    """The job, if it exists and the requester is the one who started it; otherwise the same 404,
    so that another client cannot even learn that a job id exists."""
    if job is None or (requester is not None and job.requester != requester):
        raise error(404, "not-found", f"No export job '{job_id}' (unknown, cancelled or expired)")
    return job


def export_progress(job: Job) -> str:
    """The status URL's X-Progress while the job is not done."""
    if job.status == "queued" and not job.exported and not job.type_index:
        return "waiting to start"
    where = (f"; now {job.types[job.type_index]} (type {job.type_index + 1} of {len(job.types)})"
             if job.type_index < len(job.types) else "")
    return f"{job.exported} resources exported{where}"


def export_manifest(job: Job, files: list[ExportFile], base_url: str, requires_token: bool = True) -> dict[str, Any]:
    """The completed job's manifest (Bulk Data IG v2), with absolute file URLs under `base_url`;
    the files need the bearer token every /fhir request needs (unless token checks are off)."""
    return {
        "transactionTime": to_instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": requires_token,
        "output": [{"type": f.type, "url": f"{base_url}/$export-file?{urlencode({'_jobId': job.id, '_file': f.number})}",
                    "count": f.count} for f in files],
        "error": [],
    }


def _next_chunk(job: Job, rtype: str, count: int, buffer: bytearray) -> Chunk:
    return Chunk(job.file_no, job.part, rtype, count, bytes(buffer))


class ExportWorker:
    """Runs export jobs in a daemon thread of this server process, one at a time. Every process runs
    one; they share nothing but the database, where claims are compare-and-set with a lease."""

    def __init__(self, exports: BulkExport) -> None:
        self.exports = exports
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carebroker-export", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15) -> None:
        """Hand the running job (if any) back at its checkpoint and end the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        next_cleanup = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_cleanup:
                    self.exports.remove_expired()
                    next_cleanup = time.monotonic() + CLEANUP_SECONDS
                job = self.exports.claim(self.owner)
                if job is not None:
                    self.exports.run(job, self.owner, self._stop)
                    continue
            except Exception:  # the database may be away for a while: keep the thread alive
                log.exception("bulk export worker")
            self._stop.wait(POLL_SECONDS)
