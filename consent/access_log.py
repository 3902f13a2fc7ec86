"""Privileged access records: every request of a user whose role sees everything (`admin`), with
what it returned, kept for IG review (`carebroker policy access`).

They are queued and written in batches by one thread per process (every FLUSH_SECONDS, and when the
server stops), so an administrator's reads never wait for a write, nor take SQLite's write lock. A
process killed outright loses at most the last batch; break-glass accesses, which must never be
lost, are written before the response instead (consent/break_glass.py).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from fhir_server.service.timefmt import now_us
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import access_record

FLUSH_SECONDS = 0.2
log = logging.getLogger("carebroker.access")


class AccessLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, requester: str, roles: Iterable[str], method: str, url: str, status: int,
            resources: Iterable[str]) -> None:
        self._pending.put({"at": now_us(), "requester": requester, "roles": " ".join(sorted(roles)),
                           "method": method, "url": url, "status": status,
                           "resources": json.dumps(list(dict.fromkeys(resources)))})
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="carebroker-access-log", daemon=True)
                self._thread.start()

    def flush(self) -> int:
        """Write what is queued; the number of records written."""
        rows = []
        while True:
            try:
                rows.append(self._pending.get_nowait())
            except queue.Empty:
                break
        if rows:
            try:
                with self.store.writing() as conn:
                    conn.execute(access_record.insert(), rows)
            except Exception:
                for row in rows:  # kept for the next round
                    self._pending.put(row)
                raise
        return len(rows)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # the next round retries what is still queued; never kill the thread
                log.exception("writing access records failed")

    def list(self, *, requester: str | None = None, since: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Newest first."""
        q = sa.select(access_record).order_by(access_record.c.seq.desc()).limit(limit)
        if requester is not None:
            q = q.where(access_record.c.requester.contains(requester))
        if since is not None:
            q = q.where(access_record.c.at >= since)
        with self.store.reading() as conn:
            return [{**row._mapping, "resources": json.loads(row.resources)} for row in conn.execute(q)]
