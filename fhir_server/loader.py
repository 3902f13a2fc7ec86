"""`carebroker load`: Bulk Data NDJSON and Bundle JSON files into the database, fast, losing nothing.

Resources with ids go in batches through `FhirService.bulk_put` (validated, indexed, committed per
batch; loading the same files again changes nothing), spread over worker processes; ones without an
id are created. Files are loaded in reference order: types outside the Patient compartment
(Organization, Location, Practitioner...) first, then Patient, then the rest, so conditional
references such as `Practitioner?identifier=...` find their targets; a resource whose conditional
reference still finds nothing is retried once everything else is in. A transaction or batch Bundle
is POSTed to the FHIR router in-process, exactly as if it came over HTTP.

Whatever is rejected is written, as it was read, to `rejected.ndjson` (ready to load again once
fixed) with the reasons in `errors.ndjson`, and the command exits with status 1.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from conformance.search_parameters import patient_compartment
from fhir_server import jsonfmt
from fhir_server.api.messages import FHIR_JSON, FhirRequest
from fhir_server.api.router import FhirRouter
from fhir_server.outcome import FhirError
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store

SUFFIXES = (".ndjson", ".json")


@dataclass
class Record:
    """One resource read from a file, remembered with where it came from."""

    source: str
    line: int
    raw: str
    resource: dict[str, Any]


@dataclass
class Rejection:
    source: str
    line: int
    raw: str
    status: int
    reason: str


@dataclass
class Bundle:
    """A Bundle file, loaded whole: a transaction or batch goes to the router, others by entry."""

    source: str
    raw: str
    data: dict[str, Any]


@dataclass
class Outcome:
    loaded: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    deferred: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files that are not FHIR
    elapsed: float = 0.0

    def add(self, other: Outcome) -> None:
        self.loaded += other.loaded
        for rtype, n in other.by_type.items():
            self.by_type[rtype] = self.by_type.get(rtype, 0) + n
        self.rejected += other.rejected
        self.deferred += other.deferred


def load(paths: list[Path], database_url: str, rejects: Path, batch: int = 500,
         processes: int | None = None, progress: bool = True) -> Outcome:
    """Load every file under `paths`; returns what happened (rejections are also written out)."""
    files, skipped = _files(paths)
    processes = processes or min(2, os.cpu_count() or 1)
    outcome = Outcome(skipped=skipped)
    started = time.perf_counter()
    with tqdm(total=sum(f.stat().st_size for _, f in files), unit="B", unit_scale=True, disable=not progress,
              desc="loading") as bar, \
            ProcessPoolExecutor(processes, initializer=_init_worker, initargs=(database_url,)) as pool:
        def collect(job: Future[tuple[Outcome, int]]) -> None:
            done, size = job.result()
            outcome.add(done)
            bar.update(size)
            bar.set_postfix(resources=outcome.loaded, refresh=False)

        for rank in sorted({rank for rank, _ in files}):
            # a rank at a time: its conditional-reference targets are all in before the next starts
            pending: deque[Future[tuple[Outcome, int]]] = deque()
            for path in (path for r, path in files if r == rank):
                for items, size in _batches(path, batch, outcome):
                    pending.append(pool.submit(_load_batch, items, size))
                    if len(pending) > 2 * processes:  # a bounded window keeps memory flat
                        collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        retry, outcome.deferred = outcome.deferred, []
        if retry:
            collect(pool.submit(_load_batch, list(retry), 0, True))
    outcome.elapsed = time.perf_counter() - started
    _write_rejects(rejects, outcome.rejected)
    engine = create_engine(database_url)
    Store(engine).refresh_statistics()
    engine.dispose()
    return outcome


def _files(paths: list[Path]) -> tuple[list[tuple[int, Path]], list[str]]:
    """(rank, file) in load order, and the files skipped as not FHIR (e.g. a Bulk export's log)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    ranked, skipped = [], []
    for path in found:
        rtype = _first_type(path)
        if rtype is None:
            skipped.append(f"{path}: not FHIR (its first record has no resourceType)")
        else:
            ranked.append((_rank(rtype), path))
    return sorted(ranked, key=lambda item: (item[0], str(item[1]))), skipped


def _first_type(path: Path) -> str | None:
    with path.open("rb") as fh:
        if path.name.endswith(".ndjson"):
            line = next((ln for ln in fh if ln.strip()), b"")
        else:
            line = fh.read()
    try:
        data = jsonfmt.loads(line)
    except ValueError:
        return "?" if line.strip() else None  # broken JSON is a rejection, reported per line
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        return None
    return data["resourceType"]


def _rank(rtype: str) -> int:
    if rtype == "Patient":
        return 1
    return 2 if rtype in patient_compartment() or rtype == "Bundle" else 0


def _batches(path: Path, size: int, outcome: Outcome) -> Iterator[tuple[list[Record | Bundle], int]]:
    """Records of a file in batches, with the bytes they came from (for the progress bar); lines
    that are not JSON objects are rejected here."""
    source = str(path)
    if path.name.endswith(".json"):
        raw = path.read_text(encoding="utf-8")
        item = _record(source, 1, raw, outcome)
        yield ([item] if item is not None else []), len(raw.encode())
        return
    chunk: list[Record | Bundle] = []
    nbytes = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            nbytes += len(line.encode())
            if line.strip() and (rec := _record(source, lineno, line.rstrip("\n"), outcome)) is not None:
                chunk.append(rec)
            if len(chunk) >= size:
                yield chunk, nbytes
                chunk, nbytes = [], 0
    if chunk or nbytes:
        yield chunk, nbytes


def _record(source: str, line: int, raw: str, outcome: Outcome) -> Record | Bundle | None:
    try:
        data = jsonfmt.loads(raw)
    except ValueError as exc:
        outcome.rejected.append(Rejection(source, line, raw, 400, f"not valid JSON: {exc}"))
        return None
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        outcome.rejected.append(Rejection(source, line, raw, 400, "not a FHIR resource (no resourceType)"))
        return None
    if data["resourceType"] == "Bundle":
        return Bundle(source, raw, data)
    return Record(source, line, raw, data)


# -- in the worker processes --------------------------------------------------------------------

_service: FhirService | None = None


def _init_worker(database_url: str) -> None:
    global _service
    _service = FhirService(Store(create_engine(database_url)))


def _load_batch(records: list[Record | Bundle], size: int, final: bool = False) -> tuple[Outcome, int]:
    """Store a batch; when the batch as a whole fails, find the culprits one by one. A conditional
    reference that matches nothing is deferred (its target may be in a later file) unless `final`.
    Returns what happened and `size` (the bytes read for it), for the progress bar."""
    outcome = Outcome()
    plain = [r for r in records if isinstance(r, Record)]
    for bundle in (r for r in records if isinstance(r, Bundle)):
        _load_bundle(bundle, outcome)
    with_id = [r for r in plain if r.resource.get("id")]
    try:
        _store(with_id, outcome)
    except FhirError:
        for rec in with_id:
            _one(rec, outcome, final)
    for rec in (r for r in plain if not r.resource.get("id")):
        _one(rec, outcome, final)
    return outcome, size


def _store(records: list[Record], outcome: Outcome) -> None:
    assert _service is not None
    if records:
        _service.bulk_put([r.resource for r in records])
    for rec in records:
        _count(outcome, rec.resource["resourceType"])


def _one(rec: Record, outcome: Outcome, final: bool) -> None:
    assert _service is not None
    try:
        if rec.resource.get("id"):
            _store([rec], outcome)
        else:
            _service.create(rec.resource["resourceType"], rec.resource)
            _count(outcome, rec.resource["resourceType"])
    except FhirError as exc:
        reason = "; ".join(i.diagnostics + (f" (at {i.expression})" if i.expression else "") for i in exc.issues)
        if exc.status == 404 and "Conditional reference" in reason and not final:
            outcome.deferred.append(rec)
        else:
            outcome.rejected.append(Rejection(rec.source, rec.line, rec.raw, exc.status, reason))


def _count(outcome: Outcome, rtype: str) -> None:
    outcome.loaded += 1
    outcome.by_type[rtype] = outcome.by_type.get(rtype, 0) + 1


def _load_bundle(bundle: Bundle, outcome: Outcome) -> None:
    assert _service is not None
    data = bundle.data
    if data.get("type") in ("transaction", "batch"):
        resp = FhirRouter(_service).handle(FhirRequest("POST", "", headers={"content-type": FHIR_JSON,
                                                                            "prefer": "return=minimal"},
                                                       body=bundle.raw.encode()))
        body = json.loads(resp.body or b"{}")
        if resp.status != 200:
            reason = "; ".join(i.get("diagnostics", "") for i in body.get("issue", []))
            outcome.rejected.append(Rejection(bundle.source, 1, bundle.raw, resp.status, reason))
            return
        for i, entry in enumerate(body.get("entry", [])):
            status = entry["response"]["status"]
            if status[:1] == "2":
                _count(outcome, (data["entry"][i].get("resource") or {}).get("resourceType", "Bundle entry"))
            else:
                issues = (entry["response"].get("outcome") or {}).get("issue", [])
                raw = jsonfmt.dumps(data["entry"][i]).decode()
                outcome.rejected.append(Rejection(bundle.source, 1, raw, int(status[:3]),
                                                  "; ".join(x.get("diagnostics", "") for x in issues)))
        return
    for i, entry in enumerate(data.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            _one(Record(bundle.source, 1, jsonfmt.dumps(resource).decode(), resource), outcome, final=True)


def _write_rejects(folder: Path, rejected: list[Rejection]) -> None:
    if not rejected:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "rejected.ndjson").open("a", encoding="utf-8") as out, \
            (folder / "errors.ndjson").open("a", encoding="utf-8") as errors:
        for r in rejected:
            out.write(r.raw.rstrip("\n") + "\n")
            errors.write(json.dumps({"source": r.source, "line": r.line, "status": r.status, "error": r.reason}) + "\n")
